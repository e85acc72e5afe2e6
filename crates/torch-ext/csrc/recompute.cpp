// Activation recomputation (torch.utils.checkpoint's reentrant variant): a function of some
// tensors run without an autograd graph in the forward pass, keeping only its inputs, and run
// again with a graph in the backward pass, whose own backward then gives the inputs' gradients
// and adds the parameters' gradients.
//
// The function is a Rust closure behind (call, ctx); `drop_ctx` frees it once the backward pass
// has used it. The autocast state of the forward pass (CPU and CUDA, enabled and dtype) is
// restored around the recomputation: the backward pass runs after the caller's autocast region
// has ended, and on CUDA on another thread.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <string>
#include <vector>

// Returns f(inputs[0..n]) as a heap at::Tensor (whose ownership passes to the caller), or null.
typedef at::Tensor *(*te_recompute_call)(void *ctx, const at::Tensor *const *inputs, int n);
typedef void (*te_recompute_drop)(void *ctx);
// Runs before a WithPrelude function's backward pass; 0 on success.
typedef int (*te_prelude_call)(void *ctx);

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct AutocastState {
  bool cpu, cuda;
  at::ScalarType cpu_dtype, cuda_dtype;

  static AutocastState now() {
    return {at::autocast::is_autocast_enabled(at::kCPU), at::autocast::is_autocast_enabled(at::kCUDA),
            at::autocast::get_autocast_dtype(at::kCPU), at::autocast::get_autocast_dtype(at::kCUDA)};
  }
  void apply() const {
    at::autocast::set_autocast_enabled(at::kCPU, cpu);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
  }
};

// Sets an autocast state for a scope and puts the previous one back after it.
struct AutocastScope {
  AutocastState before;
  explicit AutocastScope(const AutocastState &s) : before(AutocastState::now()) {
    s.apply();
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    before.apply();
  }
};

at::Tensor call_rust(int64_t call, int64_t ctx, const variable_list &xs) {
  auto f = reinterpret_cast<te_recompute_call>(call);
  std::vector<const at::Tensor *> ptrs;
  for (const auto &x : xs) ptrs.push_back(&x);
  at::Tensor *y = f(reinterpret_cast<void *>(ctx), ptrs.data(), static_cast<int>(ptrs.size()));
  if (y == nullptr) {
    throw std::runtime_error("activation recomputation: the recomputed function panicked");
  }
  at::Tensor out = std::move(*y);
  delete y;
  return out;
}

struct Recompute : public torch::autograd::Function<Recompute> {
  // `xs` is an at::TensorList: autograd counts each of its tensors as an input (a
  // std::vector would count as a non-tensor argument and cut the inputs off the graph).
  static at::Tensor forward(AutogradContext *ctx, at::TensorList list, int64_t call,
                            int64_t fn_ctx, int64_t drop) {
    const variable_list xs = list.vec();
    const auto s = AutocastState::now();
    ctx->saved_data["call"] = call;
    ctx->saved_data["ctx"] = fn_ctx;
    ctx->saved_data["drop"] = drop;
    ctx->saved_data["cpu"] = s.cpu;
    ctx->saved_data["cuda"] = s.cuda;
    ctx->saved_data["cpu_dtype"] = s.cpu_dtype;
    ctx->saved_data["cuda_dtype"] = s.cuda_dtype;
    ctx->save_for_backward(xs);
    return call_rust(call, fn_ctx, xs);  // forward runs without a graph
  }

  static variable_list backward(AutogradContext *ctx, variable_list grad_out) {
    variable_list xs;
    for (const auto &saved : ctx->get_saved_variables()) {
      xs.push_back(saved.detach().requires_grad_(saved.requires_grad()));
    }
    const AutocastState s{ctx->saved_data["cpu"].toBool(), ctx->saved_data["cuda"].toBool(),
                          ctx->saved_data["cpu_dtype"].toScalarType(),
                          ctx->saved_data["cuda_dtype"].toScalarType()};
    const auto call = ctx->saved_data["call"].toInt();
    const auto fn_ctx = ctx->saved_data["ctx"].toInt();
    const auto drop = reinterpret_cast<te_recompute_drop>(ctx->saved_data["drop"].toInt());
    at::Tensor y;
    {
      at::AutoGradMode grad(true);
      AutocastScope autocast(s);
      y = call_rust(call, fn_ctx, xs);
    }
    drop(reinterpret_cast<void *>(fn_ctx));
    torch::autograd::backward({y}, {grad_out[0]});
    // One gradient per input tensor, then none for call, ctx and drop.
    variable_list grads;
    for (const auto &x : xs) grads.push_back(x.requires_grad() ? x.grad() : at::Tensor());
    grads.insert(grads.end(), {at::Tensor(), at::Tensor(), at::Tensor()});
    return grads;
  }
};

// A function of some tensors whose graph is kept from the forward pass, as without
// recomputation, but whose backward pass first calls `before` (a Rust callback: sharded weights
// the forward pass let go of are gathered again, into the same storage the graph saved), then
// backpropagates through the kept graph. The function runs with a graph on detached leaves of
// the inputs; the output and the leaves are kept in the context until the backward pass.

struct WithPrelude : public torch::autograd::Function<WithPrelude> {
  static at::Tensor forward(AutogradContext *ctx, at::TensorList list, int64_t call,
                            int64_t fn_ctx, int64_t drop, int64_t before) {
    variable_list leaves;
    for (const auto &x : list.vec()) leaves.push_back(x.detach().requires_grad_(x.requires_grad()));
    at::Tensor y;
    {
      at::AutoGradMode grad(true);
      y = call_rust(call, fn_ctx, leaves);
    }
    ctx->saved_data["y"] = y;
    ctx->saved_data["leaves"] = c10::List<at::Tensor>(leaves);
    ctx->saved_data["ctx"] = fn_ctx;
    ctx->saved_data["drop"] = drop;
    ctx->saved_data["before"] = before;
    return y.detach();
  }

  static variable_list backward(AutogradContext *ctx, variable_list grad_out) {
    const auto fn_ctx = ctx->saved_data["ctx"].toInt();
    const auto drop = reinterpret_cast<te_recompute_drop>(ctx->saved_data["drop"].toInt());
    const auto before = reinterpret_cast<te_prelude_call>(ctx->saved_data["before"].toInt());
    const int failed = before(reinterpret_cast<void *>(fn_ctx));
    const at::Tensor y = ctx->saved_data["y"].toTensor();
    const variable_list leaves = ctx->saved_data["leaves"].toTensorList().vec();
    ctx->saved_data.erase("y");
    if (failed != 0) {
      drop(reinterpret_cast<void *>(fn_ctx));
      throw std::runtime_error("the prelude of a backward pass failed (it panicked)");
    }
    if (y.requires_grad()) torch::autograd::backward({y}, {grad_out[0]});
    drop(reinterpret_cast<void *>(fn_ctx));
    variable_list grads;
    for (const auto &x : leaves) grads.push_back(x.requires_grad() ? x.grad() : at::Tensor());
    grads.insert(grads.end(), {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()});
    return grads;
  }
};

thread_local std::string recompute_error;

}  // namespace

extern "C" {

const char *te_recompute_error() { return recompute_error.c_str(); }

int te_grad_mode_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// y = f(xs[0..n]) with f recomputed in the backward pass (see above). Returns a heap at::Tensor
// owned by the caller, or null with the message in te_recompute_error(); on null, ctx was not
// kept and the caller frees it.
void *te_recompute(const at::Tensor *const *xs, int n, te_recompute_call call, void *ctx,
                   te_recompute_drop drop) {
  try {
    variable_list inputs;
    for (int i = 0; i < n; i++) inputs.push_back(*xs[i]);
    auto y = Recompute::apply(at::TensorList(inputs), reinterpret_cast<int64_t>(call),
                              reinterpret_cast<int64_t>(ctx), reinterpret_cast<int64_t>(drop));
    return new at::Tensor(std::move(y));
  } catch (const std::exception &e) {
    recompute_error = e.what();
    return nullptr;
  }
}

// y = f(xs[0..n]) with its graph kept and `before` called first in its backward pass (see
// WithPrelude). Returns a heap at::Tensor owned by the caller, or null with the message in
// te_recompute_error(); on null, ctx was not kept and the caller frees it.
void *te_with_prelude(const at::Tensor *const *xs, int n, te_recompute_call call, void *ctx,
                      te_recompute_drop drop, te_prelude_call before) {
  try {
    variable_list inputs;
    for (int i = 0; i < n; i++) inputs.push_back(*xs[i]);
    auto y = WithPrelude::apply(at::TensorList(inputs), reinterpret_cast<int64_t>(call),
                                reinterpret_cast<int64_t>(ctx), reinterpret_cast<int64_t>(drop),
                                reinterpret_cast<int64_t>(before));
    return new at::Tensor(std::move(y));
  } catch (const std::exception &e) {
    recompute_error = e.what();
    return nullptr;
  }
}

}  // extern "C"
