// The language model's output projection and cross-entropy as one autograd function, computed a
// chunk of positions at a time, so that the [positions, vocab] logits never exist whole
// (Liger-Kernel's fused linear cross-entropy, in plain ATen ops).
//
// Forward, per chunk of rows of `hidden` [n, d]: logits = hidden_c @ weight^T / logit_scale in
// the dtype the matmul gives (bf16 under autocast), their fp32 log-sum-exp and the target's
// logit give each row's loss; where gradients are wanted, the logits' gradient
// (softmax - one_hot) / count is formed in place and multiplied out at once into the gradients
// of hidden_c and weight, in the matmul's dtype as autograd's own linear backward would. The
// chunk's logits are then freed. Backward only scales the stored gradients by the incoming one.
// The loss is the mean over the rows whose target is not `ignore_index` (cross_entropy's Mean).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <string>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &hidden,
                            const at::Tensor &weight, const at::Tensor &targets,
                            double logit_scale, int64_t chunk_rows, int64_t ignore_index,
                            bool grad_hidden_wanted, bool grad_weight_wanted) {
    const int64_t n = hidden.size(0);
    const auto valid = targets.ne(ignore_index);
    // The count stays on the device: no host sync. No valid target gives 0/0 = NaN, as
    // cross_entropy's Mean does.
    const auto count = valid.sum().to(at::kFloat);
    auto loss_sum = at::zeros({}, hidden.options().dtype(at::kFloat));
    at::Tensor grad_hidden, grad_weight;
    if (grad_hidden_wanted) grad_hidden = at::empty_like(hidden);
    if (grad_weight_wanted) grad_weight = at::zeros(weight.sizes(), weight.options().dtype(at::kFloat));
    // The weight in the matmul's dtype, cast once (not per chunk) when the gradients need it.
    at::Tensor w;
    for (int64_t start = 0; start < n; start += chunk_rows) {
      const int64_t len = std::min(chunk_rows, n - start);
      const auto h = hidden.narrow(0, start, len);
      const auto t = targets.narrow(0, start, len);
      const auto ok = valid.narrow(0, start, len);
      auto logits = at::linear(h, weight);  // autocast, when on, picks bf16 here
      if (logit_scale != 1.0) logits = logits / logit_scale;
      auto lf = logits.to(at::kFloat);
      const auto lse = lf.logsumexp({1});
      const auto safe = t.masked_fill(ok.logical_not(), 0).unsqueeze(1);
      const auto picked = lf.gather(1, safe).squeeze(1);
      loss_sum += ((lse - picked) * ok).sum();
      if (!grad_hidden_wanted && !grad_weight_wanted) continue;
      // d(mean loss)/d(logits) = (softmax - one_hot) / count on valid rows, 0 elsewhere.
      auto g = lf.sub_(lse.unsqueeze(1)).exp_();
      g.scatter_add_(1, safe, at::full({len, 1}, -1.0, g.options()));
      g.mul_((ok.to(at::kFloat) / count).unsqueeze(1));
      if (logit_scale != 1.0) g.div_(logit_scale);
      const auto gc = g.to(logits.scalar_type());
      if (!w.defined()) w = weight.to(logits.scalar_type());
      if (grad_hidden_wanted) grad_hidden.narrow(0, start, len).copy_(gc.mm(w));
      if (grad_weight_wanted) grad_weight.add_(gc.t().mm(h.to(logits.scalar_type())));
    }
    ctx->saved_data["grad_hidden"] = grad_hidden;
    ctx->saved_data["grad_weight"] = grad_weight;
    ctx->saved_data["weight_dtype"] = weight.scalar_type();
    return loss_sum / count;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grad_out) {
    const auto scale = grad_out[0];
    auto gh = ctx->saved_data["grad_hidden"].toTensor();
    auto gw = ctx->saved_data["grad_weight"].toTensor();
    at::Tensor out_h, out_w;
    if (gh.defined()) out_h = gh * scale.to(gh.scalar_type());
    if (gw.defined()) out_w = (gw * scale).to(ctx->saved_data["weight_dtype"].toScalarType());
    // hidden, weight, then no gradient for targets and the five options.
    return {out_h, out_w, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

thread_local std::string lce_error;

}  // namespace

extern "C" {

const char *te_linear_cross_entropy_error() { return lce_error.c_str(); }

// The mean cross-entropy of hidden [n, d] @ weight[V, d]^T / logit_scale against targets [n],
// chunk_rows rows at a time. Returns a new tensor (a heap at::Tensor, owned by the caller) or
// null with the message in te_linear_cross_entropy_error().
void *te_linear_cross_entropy(const at::Tensor *hidden, const at::Tensor *weight,
                              const at::Tensor *targets, double logit_scale, int64_t chunk_rows,
                              int64_t ignore_index) {
  try {
    const bool grad = at::GradMode::is_enabled();
    const bool want_h = grad && hidden->requires_grad();
    const bool want_w = grad && weight->requires_grad();
    auto loss = LinearCrossEntropy::apply(*hidden, *weight, *targets, logit_scale, chunk_rows,
                                          ignore_index, want_h, want_w);
    return new at::Tensor(std::move(loss));
  } catch (const std::exception &e) {
    lce_error = e.what();
    return nullptr;
  }
}

}  // extern "C"
