//! Safe wrappers over `csrc/shim.cpp`: what tch 0.24 does not bind.
//!
//! - bf16 autocast on CUDA (tch's `autocast` keeps PyTorch's float16 default);
//! - accelerator allocator statistics (peak memory for `summary.json`).
//! - c10d process groups (TCPStore rendezvous, ProcessGroupGloo / ProcessGroupNCCL) for data
//!   parallelism: broadcast, all-reduce (sum), barrier.

pub mod grad_hooks;
pub use grad_hooks::GradReadyHooks;
pub mod linear_cross_entropy;
pub use linear_cross_entropy::linear_cross_entropy;
pub mod recompute;
pub use recompute::{grad_mode_enabled, recompute, recompute_many, with_backward_prelude};

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use tch::Tensor;

// Make sure libtorch is linked through torch-sys for the symbols the shim uses.
use torch_sys as _;

extern "C" {
    fn te_last_error() -> *const c_char;
    fn te_autocast_bf16(cuda: c_int, enabled: c_int) -> c_int;
    fn te_accelerator_memory(device_index: c_int, out: *mut i64) -> c_int;
    fn te_accelerator_reset_peak(device_index: c_int) -> c_int;
    fn te_accelerator_memory_info(device_index: c_int, out: *mut i64) -> c_int;

    fn te_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        step: *mut c_void,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> c_int;
    fn te_grads_to_none(tensors: *const *mut c_void, n: c_int) -> c_int;
    fn te_grads_zero_if_none(tensors: *const *mut c_void, n: c_int) -> c_int;
    fn te_clip_grad_norm(
        grads: *const *mut c_void,
        n: c_int,
        max_norm: f64,
        out: *mut f64,
    ) -> c_int;
    fn te_grad_norms(grads: *const *mut c_void, n: c_int, out: *mut f32) -> c_int;
    fn te_storage_release(t: *mut c_void) -> c_int;
    fn te_storage_materialize(t: *mut c_void, out_bytes: *mut i64) -> c_int;
    fn te_storage_bytes(t: *mut c_void) -> i64;
    fn te_empty_pinned_like(t: *mut c_void) -> *mut c_void;
    fn te_clip_with_norms(
        grads: *const *mut c_void,
        n: c_int,
        norms: *const f32,
        m: c_int,
        max_norm: f64,
        out: *mut f64,
    ) -> c_int;
}

fn handles(ts: &[&Tensor]) -> Vec<*mut c_void> {
    ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

/// One step of `at::_fused_adamw_` (torch.optim.AdamW with fused=True) over a group of
/// parameters sharing a weight decay. `step` is a float32 scalar tensor on the parameters' device
/// holding the (1-based) step being taken. All lists must have the same length.
#[allow(clippy::too_many_arguments)]
pub fn fused_adamw(
    params: &[&Tensor],
    grads: &[&Tensor],
    exp_avgs: &[&Tensor],
    exp_avg_sqs: &[&Tensor],
    step: &Tensor,
    lr: f64,
    betas: [f64; 2],
    weight_decay: f64,
    eps: f64,
) -> Result<(), String> {
    let n = params.len();
    if grads.len() != n || exp_avgs.len() != n || exp_avg_sqs.len() != n {
        return Err("fused_adamw: lists of different lengths".to_string());
    }
    if n == 0 {
        return Ok(());
    }
    let (p, g, m, v) = (
        handles(params),
        handles(grads),
        handles(exp_avgs),
        handles(exp_avg_sqs),
    );
    // SAFETY: every pointer is a live tch tensor handle borrowed for the duration of the call.
    let rc = unsafe {
        te_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            step.as_ptr() as *mut c_void,
            n as c_int,
            lr,
            betas[0],
            betas[1],
            weight_decay,
            eps,
        )
    };
    if rc != 0 {
        return Err(last_error());
    }
    Ok(())
}

/// Drops the gradients of `tensors` (torch's `zero_grad(set_to_none=True)`).
pub fn grads_to_none(tensors: &[&Tensor]) -> Result<(), String> {
    let t = handles(tensors);
    // SAFETY: live tensor handles for the duration of the call.
    let rc = unsafe { te_grads_to_none(t.as_ptr(), t.len() as c_int) };
    if rc != 0 {
        return Err(last_error());
    }
    Ok(())
}

/// Gives each of `tensors` that has no gradient a zero one.
pub fn grads_zero_if_none(tensors: &[&Tensor]) -> Result<(), String> {
    let t = handles(tensors);
    // SAFETY: live tensor handles for the duration of the call.
    let rc = unsafe { te_grads_zero_if_none(t.as_ptr(), t.len() as c_int) };
    if rc != 0 {
        return Err(last_error());
    }
    Ok(())
}

/// Global L2 norm of `grads` (before clipping); with `max_norm`, scales them in place by
/// min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_ does.
pub fn clip_grad_norm(grads: &[&Tensor], max_norm: Option<f64>) -> Result<f64, String> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let g = handles(grads);
    let mut out = 0.0f64;
    // SAFETY: live tensor handles; `out` is a valid f64.
    let rc = unsafe {
        te_clip_grad_norm(
            g.as_ptr(),
            g.len() as c_int,
            max_norm.unwrap_or(0.0),
            &mut out,
        )
    };
    if rc != 0 {
        return Err(last_error());
    }
    Ok(out)
}

/// Frees the memory of `t`'s storage; the tensor (shape, dtype, autograd identity, every
/// handle on it) stays, and must not be read until `materialize_storage` (`run.shard = "full"`).
pub fn release_storage(t: &Tensor) -> Result<(), String> {
    // SAFETY: a live tensor handle.
    if unsafe { te_storage_release(t.as_ptr() as *mut c_void) } != 0 {
        return Err(last_error());
    }
    Ok(())
}

/// Gives a released storage uninitialised memory again (nothing when it has its memory);
/// returns the bytes it holds.
pub fn materialize_storage(t: &Tensor) -> Result<i64, String> {
    let mut bytes = 0i64;
    // SAFETY: a live tensor handle; `bytes` is a valid i64.
    if unsafe { te_storage_materialize(t.as_ptr() as *mut c_void, &mut bytes) } != 0 {
        return Err(last_error());
    }
    Ok(bytes)
}

/// An uninitialised host tensor of `t`'s shape and dtype in pinned (page-locked) memory; an
/// error where there is no pinned allocator (no CUDA).
pub fn empty_pinned_like(t: &Tensor) -> Result<Tensor, String> {
    // SAFETY: a live tensor handle; a non-null result is a heap at::Tensor we now own.
    let ptr = unsafe { te_empty_pinned_like(t.as_ptr() as *mut c_void) };
    if ptr.is_null() {
        return Err(last_error());
    }
    Ok(unsafe { Tensor::from_ptr(ptr as *mut torch_sys::C_tensor) })
}

/// The bytes `t`'s storage holds now (0 once released).
pub fn storage_bytes(t: &Tensor) -> i64 {
    // SAFETY: a live tensor handle.
    unsafe { te_storage_bytes(t.as_ptr() as *mut c_void) }
}

/// The L2 norm of each of `grads` (float32), the per-tensor norms `clip_grad_norm` forms its
/// global norm from.
pub fn grad_norms(grads: &[&Tensor]) -> Result<Vec<f32>, String> {
    let g = handles(grads);
    let mut out = vec![0f32; g.len()];
    // SAFETY: live tensor handles; `out` holds one f32 per gradient.
    if unsafe { te_grad_norms(g.as_ptr(), g.len() as c_int, out.as_mut_ptr()) } != 0 {
        return Err(last_error());
    }
    Ok(out)
}

/// `clip_grad_norm` when the per-tensor norms are known (every rank's, gathered in order): the
/// global norm of `norms`, with `max_norm` this rank's `grads` scaled as `clip_grad_norm`
/// scales them; bitwise the unsharded result when `norms` are those it would compute.
pub fn clip_with_norms(
    grads: &[&Tensor],
    norms: &[f32],
    max_norm: Option<f64>,
) -> Result<f64, String> {
    if norms.is_empty() {
        return Ok(0.0);
    }
    let g = handles(grads);
    let mut out = 0.0f64;
    // SAFETY: live tensor handles; `norms` is read for its length; `out` is a valid f64.
    let rc = unsafe {
        te_clip_with_norms(
            g.as_ptr(),
            g.len() as c_int,
            norms.as_ptr(),
            norms.len() as c_int,
            max_norm.unwrap_or(0.0),
            &mut out,
        )
    };
    if rc != 0 {
        return Err(last_error());
    }
    Ok(out)
}

fn last_error() -> String {
    // SAFETY: te_last_error returns a pointer to a thread-local NUL-terminated string that lives
    // until the next shim call on this thread; we copy it out at once.
    unsafe {
        CStr::from_ptr(te_last_error())
            .to_string_lossy()
            .into_owned()
    }
}

/// Allocator statistics of one accelerator device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub allocated: i64,
    pub peak_allocated: i64,
    pub reserved: i64,
    pub peak_reserved: i64,
}

/// Allocator statistics of accelerator `device_index`; an error where there is no accelerator.
pub fn accelerator_memory(device_index: usize) -> Result<MemoryStats, String> {
    let mut out = [0i64; 4];
    // SAFETY: `out` has room for the four values the shim writes.
    let rc = unsafe { te_accelerator_memory(device_index as c_int, out.as_mut_ptr()) };
    if rc != 0 {
        return Err(last_error());
    }
    Ok(MemoryStats {
        allocated: out[0],
        peak_allocated: out[1],
        reserved: out[2],
        peak_reserved: out[3],
    })
}

/// Free and total bytes of accelerator `device_index`, as its driver reports them
/// (`cudaMemGetInfo`: memory held by this process's caching allocator counts as used).
/// An error without an accelerator.
pub fn accelerator_memory_info(device_index: usize) -> Result<(u64, u64), String> {
    let mut out = [0i64; 2];
    // SAFETY: `out` has room for the two values the shim writes.
    let rc = unsafe { te_accelerator_memory_info(device_index as c_int, out.as_mut_ptr()) };
    if rc != 0 {
        return Err(last_error());
    }
    Ok((out[0].max(0) as u64, out[1].max(0) as u64))
}

/// Resets the peak statistics of accelerator `device_index`.
pub fn accelerator_reset_peak(device_index: usize) -> Result<(), String> {
    // SAFETY: plain call with an integer argument.
    let rc = unsafe { te_accelerator_reset_peak(device_index as c_int) };
    if rc != 0 {
        return Err(last_error());
    }
    Ok(())
}

/// Runs `f` with autocast enabled on CUDA (`cuda`) or the CPU, with bfloat16 as the
/// lower-precision dtype. Weights stay in their own dtype (fp32 master weights for `bf16-mixed`).
pub fn with_autocast_bf16<T>(cuda: bool, f: impl FnOnce() -> T) -> Result<T, String> {
    let cuda = c_int::from(cuda);
    // SAFETY: plain calls; the pairing of enter and leave is kept by this function.
    if unsafe { te_autocast_bf16(cuda, 1) } != 0 {
        return Err(last_error());
    }
    let out = f();
    if unsafe { te_autocast_bf16(cuda, 0) } != 0 {
        return Err(last_error());
    }
    Ok(out)
}

// ---- c10d ----------------------------------------------------------------------------------

extern "C" {
    fn te_have_gloo() -> c_int;
    fn te_have_nccl() -> c_int;
    fn te_pg_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        nccl: c_int,
        connect_timeout_ms: i64,
        timeout_ms: i64,
    ) -> *mut c_void;
    fn te_pg_broadcast(
        group: *mut c_void,
        tensors: *const *mut c_void,
        n: c_int,
        root: c_int,
    ) -> c_int;
    fn te_pg_allreduce_sum(group: *mut c_void, tensors: *const *mut c_void, n: c_int) -> c_int;
    fn te_pg_allreduce_sum_start(group: *mut c_void, tensor: *mut c_void) -> *mut c_void;
    fn te_pg_reduce_sum_start(group: *mut c_void, tensor: *mut c_void, root: c_int) -> *mut c_void;
    fn te_pg_broadcast_start(group: *mut c_void, tensor: *mut c_void, root: c_int) -> *mut c_void;
    fn te_pg_reduce_scatter_sum_start(
        group: *mut c_void,
        output: *mut c_void,
        input: *mut c_void,
    ) -> *mut c_void;
    fn te_pg_all_gather_start(
        group: *mut c_void,
        output: *mut c_void,
        input: *mut c_void,
    ) -> *mut c_void;
    fn te_work_wait(group: *mut c_void, work: *mut c_void) -> c_int;
    fn te_work_free(work: *mut c_void);
    fn te_pg_barrier(group: *mut c_void) -> c_int;
    fn te_pg_destroy(group: *mut c_void);
}

/// Whether this build has c10d's ProcessGroupGloo (CPU collectives; needs gloo's headers at
/// build time).
pub fn have_gloo() -> bool {
    // SAFETY: plain call.
    unsafe { te_have_gloo() != 0 }
}

/// Whether this build has c10d's ProcessGroupNCCL (CUDA collectives).
pub fn have_nccl() -> bool {
    // SAFETY: plain call.
    unsafe { te_have_nccl() != 0 }
}

/// Which c10d backend a [`ProcessGroup`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors.
    Gloo,
    /// ProcessGroupNCCL: CUDA tensors.
    Nccl,
}

/// A c10d process group: a TCPStore rendezvous (rank 0 hosts it) and a Gloo or NCCL backend.
/// Every collective blocks until it has finished on this rank, and fails (instead of waiting for
/// ever) when a peer is gone or has not joined within the group's timeout.
pub struct ProcessGroup {
    handle: *mut c_void,
    pub rank: usize,
    pub world: usize,
    pub backend: Backend,
}

// SAFETY: the handle is only used through &mut self / &self calls that c10d serialises itself;
// the group is moved between threads at most, never shared.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group of `world` processes meeting at `host:port` as `rank`. Rank 0 hosts the
    /// store there (an error if the port is taken); the others connect, retrying for up to
    /// `connect_timeout`. `timeout` bounds every collective.
    pub fn new(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        backend: Backend,
        connect_timeout: std::time::Duration,
        timeout: std::time::Duration,
    ) -> Result<ProcessGroup, String> {
        match backend {
            Backend::Gloo if !have_gloo() => {
                return Err("this trainer was built without gloo's headers: install libgloo-dev (apt-get install libgloo-dev) and rebuild".into())
            }
            Backend::Nccl if !have_nccl() => {
                return Err("this trainer was built without NCCL (nccl.h and cuda_runtime_api.h were not found at build time)".into())
            }
            _ => {}
        }
        let host_c = std::ffi::CString::new(host).map_err(|_| "host contains NUL".to_string())?;
        // SAFETY: host_c outlives the call; the shim copies it.
        let handle = unsafe {
            te_pg_new(
                host_c.as_ptr(),
                c_int::from(port),
                rank as c_int,
                world as c_int,
                c_int::from(backend == Backend::Nccl),
                connect_timeout.as_millis() as i64,
                timeout.as_millis() as i64,
            )
        };
        if handle.is_null() {
            return Err(last_error());
        }
        Ok(ProcessGroup {
            handle,
            rank,
            world,
            backend,
        })
    }

    /// Overwrites `tensors` on every rank with rank `root`'s values.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<(), String> {
        let t = handles(tensors);
        // SAFETY: live group handle and tensor handles for the duration of the call.
        let rc =
            unsafe { te_pg_broadcast(self.handle, t.as_ptr(), t.len() as c_int, root as c_int) };
        if rc != 0 {
            return Err(last_error());
        }
        Ok(())
    }

    /// Replaces each of `tensors` by its sum over all ranks (one collective per tensor, all
    /// started before the first is waited for).
    pub fn all_reduce_sum(&self, tensors: &[&Tensor]) -> Result<(), String> {
        let t = handles(tensors);
        // SAFETY: live group handle and tensor handles for the duration of the call.
        let rc = unsafe { te_pg_allreduce_sum(self.handle, t.as_ptr(), t.len() as c_int) };
        if rc != 0 {
            return Err(last_error());
        }
        Ok(())
    }

    /// Starts a sum all-reduce of `tensor` over all ranks and returns without waiting; the
    /// tensor must stay alive and untouched until `Work::wait` returns.
    pub fn all_reduce_sum_start(&self, tensor: &Tensor) -> Result<Work, String> {
        // SAFETY: live group and tensor handles for the duration of the call.
        let work =
            unsafe { te_pg_allreduce_sum_start(self.handle, tensor.as_ptr() as *mut c_void) };
        if work.is_null() {
            return Err(last_error());
        }
        Ok(Work(work))
    }

    /// Starts a sum reduce of `tensor` onto rank `root` and returns without waiting; only
    /// `root`'s copy holds the sum afterwards. The tensor must stay alive and untouched until
    /// `Work::wait` returns.
    pub fn reduce_sum_start(&self, tensor: &Tensor, root: usize) -> Result<Work, String> {
        // SAFETY: live group and tensor handles for the duration of the call.
        let work = unsafe {
            te_pg_reduce_sum_start(self.handle, tensor.as_ptr() as *mut c_void, root as c_int)
        };
        if work.is_null() {
            return Err(last_error());
        }
        Ok(Work(work))
    }

    /// Starts a broadcast of `tensor` from rank `root` and returns without waiting; every rank's
    /// copy holds `root`'s values once `Work::wait` returns, and the tensor must stay alive and
    /// untouched until then.
    pub fn broadcast_start(&self, tensor: &Tensor, root: usize) -> Result<Work, String> {
        // SAFETY: live group and tensor handles for the duration of the call.
        let work = unsafe {
            te_pg_broadcast_start(self.handle, tensor.as_ptr() as *mut c_void, root as c_int)
        };
        if work.is_null() {
            return Err(last_error());
        }
        Ok(Work(work))
    }

    /// Starts a sum reduce-scatter and returns without waiting: `input` (world times as long
    /// as `output`) is summed over the ranks, and this rank's `output` receives slice `rank` of
    /// the sum. Both must stay alive and untouched until `Work::wait` returns.
    pub fn reduce_scatter_sum_start(
        &self,
        output: &Tensor,
        input: &Tensor,
    ) -> Result<Work, String> {
        self.start_into(te_pg_reduce_scatter_sum_start, output, input)
    }

    /// Starts an all-gather and returns without waiting: `output` (world times as long as
    /// `input`) receives every rank's `input`, rank r's as slice r. Both must stay alive and
    /// untouched until `Work::wait` returns.
    pub fn all_gather_start(&self, output: &Tensor, input: &Tensor) -> Result<Work, String> {
        self.start_into(te_pg_all_gather_start, output, input)
    }

    /// Starts the shim's collective `start` from `input` into `output`.
    fn start_into(
        &self,
        start: unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_void) -> *mut c_void,
        output: &Tensor,
        input: &Tensor,
    ) -> Result<Work, String> {
        // SAFETY: live group and tensor handles for the duration of the call.
        let work = unsafe {
            start(
                self.handle,
                output.as_ptr() as *mut c_void,
                input.as_ptr() as *mut c_void,
            )
        };
        if work.is_null() {
            return Err(last_error());
        }
        Ok(Work(work))
    }

    /// Waits for a collective started on this group (bounded by the group's timeout).
    pub fn wait(&self, work: Work) -> Result<(), String> {
        // SAFETY: live group handle and a work handle from this group.
        if unsafe { te_work_wait(self.handle, work.0) } != 0 {
            return Err(last_error());
        }
        Ok(())
    }

    /// Returns when every rank has reached it.
    pub fn barrier(&self) -> Result<(), String> {
        // SAFETY: live group handle.
        if unsafe { te_pg_barrier(self.handle) } != 0 {
            return Err(last_error());
        }
        Ok(())
    }
}

/// A collective started with one of `ProcessGroup`'s `*_start` methods.
pub struct Work(*mut c_void);

// SAFETY: a c10d work handle may be waited for from any thread (DDP waits for work started in
// autograd's hooks).
unsafe impl Send for Work {}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: the handle came from a te_pg_*_start call and is freed once.
        unsafe { te_work_free(self.0) }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from te_pg_new and is destroyed once.
        unsafe { te_pg_destroy(self.handle) }
    }
}

// ---- Determinism (`[run] deterministic = true`; sweeps and reproducibility) ---------------------

extern "C" {
    fn te_set_deterministic(on: c_int) -> c_int;
    fn te_deterministic_enabled() -> c_int;
}

/// `torch.use_deterministic_algorithms(on)` (errors, not warnings, for an op that has no
/// deterministic kernel) and `torch.backends.cudnn.deterministic = on`; when on, also
/// `torch.backends.cudnn.benchmark = False`. On CUDA, cuBLAS also needs
/// `CUBLAS_WORKSPACE_CONFIG=:4096:8` in the environment before its first use.
pub fn set_deterministic(on: bool) -> Result<(), String> {
    // SAFETY: plain call with an integer argument.
    if unsafe { te_set_deterministic(c_int::from(on)) } != 0 {
        return Err(last_error());
    }
    Ok(())
}

/// Whether deterministic algorithms are required (`torch.are_deterministic_algorithms_enabled()`).
pub fn deterministic_enabled() -> bool {
    // SAFETY: plain call.
    unsafe { te_deterministic_enabled() != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned host memory: the shape and dtype of the tensor with CUDA; without it an error,
    /// not a crash (the checkpoint copy then falls back to pageable memory).
    #[test]
    fn pinned_host_memory_is_an_error_without_cuda() {
        let t = Tensor::zeros([3, 2], (tch::Kind::BFloat16, tch::Device::Cpu));
        match empty_pinned_like(&t) {
            Ok(p) => {
                assert!(tch::Cuda::is_available());
                assert_eq!(
                    (p.size(), p.kind(), p.device()),
                    (t.size(), t.kind(), tch::Device::Cpu)
                );
            }
            Err(e) => assert!(!tch::Cuda::is_available(), "{e}"),
        }
    }

    /// A released parameter keeps its identity; materialised and filled it computes again, and
    /// its gradient flows as before.
    #[test]
    fn a_released_storage_comes_back_under_the_same_tensor() {
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
        let view = w.shallow_clone();
        assert_eq!(storage_bytes(&w), 12);
        release_storage(&w).expect("release");
        assert_eq!(storage_bytes(&view), 0);
        assert_eq!(w.size(), vec![3]);
        assert_eq!(materialize_storage(&view).expect("materialize"), 12);
        tch::no_grad(|| {
            let mut v = view.shallow_clone();
            v.copy_(&Tensor::from_slice(&[4.0f32, 5.0, 6.0]));
        });
        let loss = (&w * &w).sum(tch::Kind::Float);
        loss.backward();
        assert_eq!(
            Vec::<f32>::try_from(w.grad()).expect("grad"),
            vec![8.0, 10.0, 12.0]
        );
        assert_eq!(materialize_storage(&w).expect("again"), 12);
    }

    /// The norms of two halves of the gradients, put together, clip bitwise as the whole list
    /// does (what `run.shard = "gradients"` relies on).
    #[test]
    fn clipping_from_gathered_norms_is_bitwise_clipping_the_whole_list() {
        tch::manual_seed(5);
        let grads: Vec<Tensor> = [[7, 3], [11, 1], [2, 5], [13, 4]]
            .iter()
            .map(|s| Tensor::randn(s, (tch::Kind::Float, tch::Device::Cpu)))
            .collect();
        let whole: Vec<Tensor> = grads.iter().map(|g| g.copy()).collect();
        let refs: Vec<&Tensor> = whole.iter().collect();
        let want = clip_grad_norm(&refs, Some(0.5)).expect("clip");
        let (a, b) = grads.split_at(2);
        let (a, b): (Vec<&Tensor>, Vec<&Tensor>) = (a.iter().collect(), b.iter().collect());
        let mut norms = grad_norms(&a).expect("norms");
        norms.extend(grad_norms(&b).expect("norms"));
        let got_a = clip_with_norms(&a, &norms, Some(0.5)).expect("clip a");
        let got_b = clip_with_norms(&b, &norms, Some(0.5)).expect("clip b");
        assert_eq!(got_a.to_bits(), want.to_bits());
        assert_eq!(got_b.to_bits(), want.to_bits());
        assert!(want > 0.5, "the test must clip: {want}");
        for (g, w) in grads.iter().zip(&whole) {
            assert!(g.equal(w), "clipped differently");
        }
        assert_eq!(clip_with_norms(&[], &[], Some(1.0)), Ok(0.0));
    }
}
