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

// Free and total bytes of accelerator `device_index` as its driver reports them (cudaMemGetInfo
// on CUDA): out[0] = free, out[1] = total. Returns -1 when there is no accelerator.
// The allocator's virtual call must stay virtual: GCC's speculative devirtualisation would
// inline CUDA's own getMemoryInfo (its header is seen through the NCCL headers), and this library
// would then need libcudart at link time (libtorch_cuda, loaded at run time, brings it).
__attribute__((optimize("no-devirtualize-speculatively", "no-devirtualize")))
int te_accelerator_memory_info(int device_index, int64_t *out) {
  try {
    auto acc = at::getAccelerator(false);
    if (!acc.has_value()) {
      last_error = "no accelerator";
      return -1;
    }
    c10::DeviceAllocator *allocator = at::getDeviceAllocator(acc.value());
    auto info = allocator->getMemoryInfo(static_cast<c10::DeviceIndex>(device_index));
    out[0] = static_cast<int64_t>(info.first);
    out[1] = static_cast<int64_t>(info.second);
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

// The L2 norm of each of n gradients as float32 into out[n] (the per-tensor norms of
// te_clip_grad_norm): with run.shard = "gradients" each rank computes those of the gradients it
// owns and the ranks exchange them, so that te_clip_with_norms forms the global norm from the
// same numbers in the same order as an unsharded run.
int te_grad_norms(at::Tensor **grads, int n, float *out) {
  try {
    if (n == 0) return 0;
    std::vector<at::Tensor> g;
    for (int i = 0; i < n; i++) g.push_back(*grads[i]);
    auto norms = at::stack(at::_foreach_norm(g, 2)).to(at::kFloat).cpu().contiguous();
    std::memcpy(out, norms.data_ptr<float>(), sizeof(float) * n);
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

// te_clip_grad_norm from given per-tensor norms (m of them, every rank's, in order): the global
// norm, written to *out_norm, and the n gradients of this rank scaled in place when max_norm > 0.
int te_clip_with_norms(at::Tensor **grads, int n, const float *norms, int m, double max_norm,
                       double *out_norm) {
  try {
    auto all = at::from_blob(const_cast<float *>(norms), {m}, at::kFloat).clone();
    auto total = at::linalg_vector_norm(all, 2);
    if (max_norm > 0 && n > 0) {
      std::vector<at::Tensor> g;
      for (int i = 0; i < n; i++) g.push_back(*grads[i]);
      auto coef = at::clamp_max(max_norm / (total + 1e-6), 1.0).to(g[0].device());
      at::_foreach_mul_(g, coef);
    }
    *out_norm = total.item<double>();
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

// run.shard = "full": frees the memory of a parameter's storage while the tensor (its shape,
// dtype, autograd identity and every handle on it) stays, as FSDP frees a gathered parameter.
int te_storage_release(at::Tensor *t) {
  try {
    auto storage = t->storage();
    storage.set_data_ptr_noswap(at::DataPtr(nullptr, t->device()));
    storage.set_nbytes(0);
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

// Gives a released storage memory again (uninitialised: the caller fills it); nothing when it
// has its memory. Writes the bytes it now holds to *out_bytes.
int te_storage_materialize(at::Tensor *t, int64_t *out_bytes) {
  try {
    auto storage = t->storage();
    const size_t need = static_cast<size_t>(t->storage_offset() + t->numel()) * t->element_size();
    if (storage.nbytes() < need) {
      c10::Allocator *alloc = storage.allocator();
      if (alloc == nullptr) alloc = c10::GetAllocator(t->device().type());
      storage.set_data_ptr_noswap(alloc->allocate(need));
      storage.set_nbytes(need);
    }
    *out_bytes = static_cast<int64_t>(storage.nbytes());
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

// An uninitialised host tensor of t's shape and dtype in pinned (page-locked) memory, which a
// device copies into at full speed (an asynchronous checkpoint's copy of a GPU tensor); null
// with the error set where no pinned allocator exists (a build or machine without CUDA).
void *te_empty_pinned_like(at::Tensor *t) {
  try {
    return new at::Tensor(at::empty(t->sizes(), t->options().device(at::kCPU).pinned_memory(true)));
  } catch (const std::exception &e) {
    set_error(e);
    return nullptr;
  }
}

// The bytes a tensor's storage holds now (0 once released).
int64_t te_storage_bytes(at::Tensor *t) {
  return t->has_storage() ? static_cast<int64_t>(t->storage().nbytes()) : 0;
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

// Sets the gradient of each of n tensors that has none to zeros (a parameter that another rank's
// batch used but this one's did not, so that every rank reduces the same gradient list).
int te_grads_zero_if_none(at::Tensor **tensors, int n) {
  try {
    for (int i = 0; i < n; i++) {
      auto &g = tensors[i]->mutable_grad();
      if (!g.defined()) g = at::zeros_like(*tensors[i]);
    }
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

}  // extern "C"

// ---- gradient-ready hooks (layer-wise optimizer updates) -------------------------------------

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

namespace {
// After autograd has accumulated a parameter's gradient (torch's
// register_post_accumulate_grad_hook), calls `callback(index)`: the optimizer can update that
// parameter and drop its gradient while the backward pass goes on with the earlier layers.
struct TeGradReadyHook : torch::autograd::PostAccumulateGradHook {
  void (*callback)(int64_t);
  int64_t index;
  TeGradReadyHook(void (*cb)(int64_t), int64_t i) : callback(cb), index(i) {}
  void operator()(const torch::autograd::Variable &) override { callback(index); }
};
}  // namespace

extern "C" {

// Installs (callback != nullptr) or removes the gradient-ready hook of a leaf tensor.
int te_set_grad_ready_hook(at::Tensor *t, void (*callback)(int64_t), int64_t index) {
  try {
    if (callback) {
      torch::autograd::impl::set_post_acc_grad_hooks(
          *t, std::make_unique<TeGradReadyHook>(callback, index));
    } else {
      torch::autograd::impl::set_post_acc_grad_hooks(*t, nullptr);
    }
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

}  // extern "C"

// ---- c10d: rendezvous and collectives (the engine under torch.nn.parallel.DDP) ---------------
//
// A process group is a TCPStore (rank 0 hosts it at host:port, the others connect) and one c10d
// backend on top: ProcessGroupGloo for CPU tensors, ProcessGroupNCCL for CUDA tensors (compiled
// only where NCCL's and CUDA's headers were found, TE_HAVE_NCCL). Collectives are blocking from
// the caller's point of view and time out after the group's timeout with an error.
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#ifdef TE_HAVE_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef TE_HAVE_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <chrono>
#include <cstdlib>

namespace {

struct TeGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

// c10::Error's what() carries a C++ backtrace; keep the message alone.
void set_c10_error(const c10::Error &e) { last_error = e.what_without_backtrace(); }

bool is_loopback(const std::string &host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

// Waits for every work item, in order; a failure or a timeout throws.
void wait_all(std::vector<c10::intrusive_ptr<c10d::Work>> &works, std::chrono::milliseconds timeout) {
  for (auto &w : works) {
    if (!w->wait(timeout)) {
      throw std::runtime_error("collective timed out after " + std::to_string(timeout.count()) + " ms");
    }
  }
}

// Runs f, turning a C++ exception into last_error: the c10d entry points' common frame.
// guarded returns 0 (or -1 on an exception), guarded_ptr f's pointer (or nullptr).
template <class F> int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const c10::Error &e) {
    set_c10_error(e);
  } catch (const std::exception &e) {
    set_error(e);
  }
  return -1;
}

template <class F> void *guarded_ptr(F f) {
  try {
    return f();
  } catch (const c10::Error &e) {
    set_c10_error(e);
  } catch (const std::exception &e) {
    set_error(e);
  }
  return nullptr;
}

// Starts a sum reduce of one tensor onto rank root (the others' copies are left undefined),
// bounded by the group's timeout.
c10::intrusive_ptr<c10d::Work> start_reduce_sum(TeGroup *g, const at::Tensor &t, int root) {
  std::vector<at::Tensor> one{t};
  c10d::ReduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  opts.rootRank = root;
  opts.rootTensor = 0;
  opts.timeout = g->timeout;
  return g->backend->reduce(one, opts);
}

// Starts a broadcast of one tensor from rank root, bounded by the group's timeout.
c10::intrusive_ptr<c10d::Work> start_broadcast(TeGroup *g, const at::Tensor &t, int root) {
  std::vector<at::Tensor> one{t};
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  opts.timeout = g->timeout;
  return g->backend->broadcast(one, opts);
}

// Starts a sum all-reduce of one tensor, bounded by the group's timeout.
c10::intrusive_ptr<c10d::Work> start_allreduce_sum(TeGroup *g, const at::Tensor &t) {
  std::vector<at::Tensor> one{t};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  opts.timeout = g->timeout;
  return g->backend->allreduce(one, opts);
}

}  // namespace

extern "C" {

int te_have_gloo() {
#ifdef TE_HAVE_GLOO
  return 1;
#else
  return 0;
#endif
}

int te_have_nccl() {
#ifdef TE_HAVE_NCCL
  return 1;
#else
  return 0;
#endif
}

// Joins (creates, for rank 0) the group of `world` processes that meet at host:port. `nccl` != 0
// selects ProcessGroupNCCL (CUDA tensors), else ProcessGroupGloo (CPU tensors).
// `connect_timeout_ms` bounds the rendezvous, `timeout_ms` every collective. Returns an opaque
// handle, or null with the message in te_last_error.
void *te_pg_new(const char *host, int port, int rank, int world, int nccl,
                int64_t connect_timeout_ms, int64_t timeout_ms) {
  return guarded_ptr([&]() -> void * {
    const std::string h(host);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = world;
    so.waitWorkers = true;
    so.timeout = std::chrono::milliseconds(connect_timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(h, so);
    // The prefix keeps this group's keys apart from anything else sharing the store.
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>("trainer", tcp);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto *g = new TeGroup{store, {}, timeout};
    if (nccl) {
#ifdef TE_HAVE_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
      delete g;
      last_error = "this trainer was built without NCCL (nccl.h or cuda_runtime_api.h not found at build time)";
      return nullptr;
#endif
    } else {
#ifdef TE_HAVE_GLOO
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      // torch.distributed's choice of network device: GLOO_SOCKET_IFNAME, else the loopback
      // address for a local group, else this host's name.
      const char *ifname = std::getenv("GLOO_SOCKET_IFNAME");
      if (ifname && *ifname) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else if (is_loopback(h)) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
#else
      delete g;
      last_error = "this trainer was built without gloo's headers (apt-get install libgloo-dev, then rebuild)";
      return nullptr;
#endif
    }
    return g;
  });
}

// Broadcasts n tensors in place from `root` to every rank.
int te_pg_broadcast(void *group, at::Tensor **tensors, int n, int root) {
  return guarded([&] {
    auto *g = static_cast<TeGroup *>(group);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (int i = 0; i < n; i++) works.push_back(start_broadcast(g, *tensors[i], root));
    wait_all(works, g->timeout);
  });
}

// Sums each of n tensors in place over all ranks. The collectives are all started before the
// first wait, so that the transfer of one overlaps with the reduction of the next.
int te_pg_allreduce_sum(void *group, at::Tensor **tensors, int n) {
  return guarded([&] {
    auto *g = static_cast<TeGroup *>(group);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (int i = 0; i < n; i++) works.push_back(start_allreduce_sum(g, *tensors[i]));
    wait_all(works, g->timeout);
  });
}

// Starts a sum all-reduce of one tensor and returns its work handle without waiting (the
// overlap of gradient communication with the backward pass); te_work_wait, then te_work_free.
void *te_pg_allreduce_sum_start(void *group, at::Tensor *tensor) {
  return guarded_ptr([&]() -> void * {
    auto *g = static_cast<TeGroup *>(group);
    return new c10::intrusive_ptr<c10d::Work>(start_allreduce_sum(g, *tensor));
  });
}

// Starts a sum reduce of one tensor onto rank root and returns its work handle without waiting
// (run.shard = "gradients": each bucket goes to the rank that owns its parameters).
void *te_pg_reduce_sum_start(void *group, at::Tensor *tensor, int root) {
  return guarded_ptr([&]() -> void * {
    auto *g = static_cast<TeGroup *>(group);
    return new c10::intrusive_ptr<c10d::Work>(start_reduce_sum(g, *tensor, root));
  });
}

// Starts a broadcast of one tensor from rank root and returns its work handle without waiting
// (run.shard = "full": the next block's weights are fetched while this one computes).
void *te_pg_broadcast_start(void *group, at::Tensor *tensor, int root) {
  return guarded_ptr([&]() -> void * {
    auto *g = static_cast<TeGroup *>(group);
    return new c10::intrusive_ptr<c10d::Work>(start_broadcast(g, *tensor, root));
  });
}

// Starts a sum reduce-scatter (c10d's _reduce_scatter_base, torch's reduce_scatter_tensor):
// `input`, world times the length of `output`, is summed over the ranks and rank r receives the
// r-th slice of the sum in `output` (run.shard_layout = "flat": each rank's slice of a bucket).
void *te_pg_reduce_scatter_sum_start(void *group, at::Tensor *output, at::Tensor *input) {
  return guarded_ptr([&]() -> void * {
    auto *g = static_cast<TeGroup *>(group);
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = g->timeout;
    return new c10::intrusive_ptr<c10d::Work>(g->backend->_reduce_scatter_base(*output, *input, opts));
  });
}

// Starts an all-gather into one flat tensor (c10d's _allgather_base, torch's
// all_gather_into_tensor): `output`, world times the length of `input`, receives rank r's
// `input` as its r-th slice (the updated slices of a bucket's parameters).
void *te_pg_all_gather_start(void *group, at::Tensor *output, at::Tensor *input) {
  return guarded_ptr([&]() -> void * {
    auto *g = static_cast<TeGroup *>(group);
    c10d::AllgatherOptions opts;
    opts.timeout = g->timeout;
    return new c10::intrusive_ptr<c10d::Work>(g->backend->_allgather_base(*output, *input, opts));
  });
}

// Waits for a started collective (the group's timeout bounds it).
int te_work_wait(void *group, void *work) {
  return guarded([&] {
    auto *g = static_cast<TeGroup *>(group);
    std::vector<c10::intrusive_ptr<c10d::Work>> works{*static_cast<c10::intrusive_ptr<c10d::Work> *>(work)};
    wait_all(works, g->timeout);
  });
}

void te_work_free(void *work) { delete static_cast<c10::intrusive_ptr<c10d::Work> *>(work); }

int te_pg_barrier(void *group) {
  return guarded([&] {
    auto *g = static_cast<TeGroup *>(group);
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    std::vector<c10::intrusive_ptr<c10d::Work>> works{g->backend->barrier(opts)};
    wait_all(works, g->timeout);
  });
}

// Leaves the group and frees it. Never fails: a peer that is already gone is not an error here.
void te_pg_destroy(void *group) {
  auto *g = static_cast<TeGroup *>(group);
  try {
    g->backend->shutdown();
  } catch (...) {
  }
  try {
    delete g;
  } catch (...) {
  }
}

}  // extern "C"

// ---- Determinism (`[run] deterministic = true`; sweeps and reproducibility) ---------------------
#include <ATen/Context.h>

extern "C" {

// torch.use_deterministic_algorithms(on, warn_only=False) plus
// torch.backends.cudnn.deterministic = on; when on, also torch.backends.cudnn.benchmark = False
// (benchmarking may pick a different algorithm on each run).
int te_set_deterministic(int on) {
  try {
    at::globalContext().setDeterministicAlgorithms(on != 0, /*warn_only=*/false);
    at::globalContext().setDeterministicCuDNN(on != 0);
    if (on) at::globalContext().setBenchmarkCuDNN(false);
    return 0;
  } catch (const std::exception &e) {
    set_error(e);
    return -1;
  }
}

// 1 when deterministic algorithms are required (torch.are_deterministic_algorithms_enabled()).
int te_deterministic_enabled() { return at::globalContext().deterministicAlgorithms() ? 1 : 0; }

}  // extern "C"
