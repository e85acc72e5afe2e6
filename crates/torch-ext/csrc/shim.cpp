// The parts of libtorch that tch 0.24 does not bind. No logic lives here: each function forwards
// to one libtorch call and turns C++ exceptions into a return code and a message.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/DeviceAccelerator.h>
#include <cstring>
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

}  // extern "C"
