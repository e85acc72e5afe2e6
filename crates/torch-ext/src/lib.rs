//! Safe wrappers over `csrc/shim.cpp`: what tch 0.24 does not bind.
//!
//! - bf16 autocast on CUDA (tch's `autocast` keeps PyTorch's float16 default);
//! - accelerator allocator statistics (peak memory for `summary.json`).

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
    fn te_clip_grad_norm(
        grads: *const *mut c_void,
        n: c_int,
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
