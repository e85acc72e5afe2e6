// The parts of libtorch that tch 0.24 does not bind. No logic lives here: each function forwards
// to one libtorch call and turns C++ exceptions into a return code and a message.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/DeviceAccelerator.h>
#include <cstring>
#include <vector>
#include <string>

static thread_local std::string last_error;

static void set_error(const std::exception &e) { last_error = e.what(); }

extern "C" {

const char *te_last_error() { return last_error.c_str(); }

// Enters (enabled != 0) or leaves an autocast region with bfloat16 as the lower dtype, on CUDA
// (cuda != 0) or the CPU. tch's own `autocast` is CUDA only and keeps PyTorch's CUDA default,
// float16.
int te_autocast_bf16(int cuda, int enabled) {
  try {
    const auto dev = cuda ? at::kCUDA : at::kCPU;
    if (enabled) {
      at::autocast::set_autocast_dtype(dev, at::kBFloat16);
      at::autocast::set_autocast_enabled(dev, true);
      at::autocast::increment_nesting();
    } else {
      at::autocast::set_autocast_enabled(dev, false);
      if (at::autocast::decrement_nesting() == 0) {
        at::autocast::clear_cache();
      }
    }
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

// Allocator statistics of the current accelerator (CUDA when libtorch_cuda is loaded):
// out[0] = bytes allocated now, out[1] = peak bytes allocated, out[2] = bytes reserved now,
// out[3] = peak bytes reserved. Returns -1 when there is no accelerator.
int te_accelerator_memory(int device_index, int64_t *out) {
  try {
    auto acc = at::getAccelerator(false);
    if (!acc.has_value()) {
      last_error = "no accelerator";
      return -1;
    }
    auto stats = at::accelerator::getDeviceStats(device_index);
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[agg].current;
    out[1] = stats.allocated_bytes[agg].peak;
    out[2] = stats.reserved_bytes[agg].current;
    out[3] = stats.reserved_bytes[agg].peak;
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

int te_accelerator_reset_peak(int device_index) {
  try {
    at::accelerator::resetPeakStats(device_index);
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

// torch.optim.AdamW(fused=True)'s kernel over n parameters of one weight-decay group.
// Pointers are tch's tensor handles (at::Tensor*). `step` is a float32 scalar tensor on the
// parameters' device holding the step number being taken (the kernel reads, never increments it).
int te_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                   at::Tensor **exp_avg_sqs, at::Tensor *step, int n, double lr, double beta1,
                   double beta2, double weight_decay, double eps) {
  try {
    std::vector<at::Tensor> p, g, m, v, s;
    for (int i = 0; i < n; i++) {
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      s.push_back(*step);
    }
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps, false, false);
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

// The global L2 norm of n gradients (torch.nn.utils.clip_grad_norm_ with foreach kernels); when
// max_norm > 0 the gradients are scaled in place by min(1, max_norm / (norm + 1e-6)).
// Writes the norm before clipping to *out_norm.
int te_clip_grad_norm(at::Tensor **grads, int n, double max_norm, double *out_norm) {
  try {
    std::vector<at::Tensor> g;
    for (int i = 0; i < n; i++) g.push_back(*grads[i]);
    auto norms = at::_foreach_norm(g, 2);
    auto total = at::linalg_vector_norm(at::stack(norms).to(at::kFloat), 2);
    if (max_norm > 0) {
      auto coef = at::clamp_max(max_norm / (total + 1e-6), 1.0);
      at::_foreach_mul_(g, coef);
    }
    *out_norm = total.item<double>();
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

// Drops the gradients of n tensors (torch's zero_grad(set_to_none=True)): the next backward
// hands its fresh gradient over instead of adding into a zeroed buffer, and the memory is free
// in between.
int te_grads_to_none(at::Tensor **tensors, int n) {
  try {
    for (int i = 0; i < n; i++) tensors[i]->mutable_grad().reset();
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

}  // extern "C"
