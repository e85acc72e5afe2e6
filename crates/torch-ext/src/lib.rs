//! Safe wrappers over `csrc/shim.cpp`: what tch 0.24 does not bind.
//!
//! - bf16 autocast on CUDA (tch's `autocast` keeps PyTorch's float16 default);
//! - accelerator allocator statistics (peak memory for `summary.json`).

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};

// Make sure libtorch is linked through torch-sys for the symbols the shim uses.
use torch_sys as _;

extern "C" {
    fn te_last_error() -> *const c_char;
    fn te_autocast_bf16(cuda: c_int, enabled: c_int) -> c_int;
    fn te_accelerator_memory(device_index: c_int, out: *mut i64) -> c_int;
    fn te_accelerator_reset_peak(device_index: c_int) -> c_int;
}

fn last_error() -> String {
    // SAFETY: te_last_error returns a pointer to a thread-local NUL-terminated string that lives
    // until the next shim call on this thread; we copy it out at once.
    unsafe { CStr::from_ptr(te_last_error()).to_string_lossy().into_owned() }
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
