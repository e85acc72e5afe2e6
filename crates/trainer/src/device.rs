//! Choosing the device a run trains on, and refusing one that this machine does not have.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

/// What the recipe asked for, before looking at the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

/// Parses `auto`, `cpu`, `cuda` (device 0) or `cuda:N`; None for anything else.
pub fn parse_device_spec(text: &str) -> Option<DeviceSpec> {
    match text {
        "auto" => Some(DeviceSpec::Auto),
        "cpu" => Some(DeviceSpec::Cpu),
        "cuda" => Some(DeviceSpec::Cuda(0)),
        _ => text
            .strip_prefix("cuda:")?
            .parse()
            .ok()
            .map(DeviceSpec::Cuda),
    }
}

/// Resolves a device spec against this machine: `auto` is the first GPU when there is one.
pub fn resolve(text: &str) -> Result<Device> {
    let spec = parse_device_spec(text).ok_or_else(|| {
        Error::Device(format!(
            "run.device: expected auto, cpu, cuda or cuda:N, got {text:?}"
        ))
    })?;
    let n_gpus = if tch::Cuda::is_available() {
        tch::Cuda::device_count() as usize
    } else {
        0
    };
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto if n_gpus > 0 => Ok(Device::Cuda(0)),
        DeviceSpec::Auto => Ok(Device::Cpu),
        DeviceSpec::Cuda(_) if n_gpus == 0 => Err(Error::Device(format!(
            "run.device = {text:?} but no CUDA device is visible on this machine (use cpu or auto)"
        ))),
        DeviceSpec::Cuda(i) if i >= n_gpus => Err(Error::Device(format!(
            "run.device = {text:?} but this machine has {n_gpus} CUDA device(s): cuda:0..cuda:{}",
            n_gpus - 1
        ))),
        DeviceSpec::Cuda(i) => Ok(Device::Cuda(i)),
    }
}

pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

/// `[run] deterministic`: requires deterministic kernels (PyTorch's
/// `torch.use_deterministic_algorithms(True)`, `cudnn.deterministic = True`,
/// `cudnn.benchmark = False`), so that a CUDA run repeats bitwise; an op with no deterministic
/// kernel then fails with libtorch's message instead of running. cuBLAS reads
/// `CUBLAS_WORKSPACE_CONFIG` when it starts; `:4096:8` (what PyTorch's reproducibility notes ask
/// for) is set here unless the environment already has a value, before any CUDA work. Off: the
/// settings are left at libtorch's defaults.
pub fn set_deterministic(on: bool) -> Result<()> {
    if !on {
        return Ok(());
    }
    if std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_none() {
        std::env::set_var("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
    }
    torch_ext::set_deterministic(true).map_err(Error::Torch)
}

/// `run.precision`: the dtypes a run keeps its weights in and computes in.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum Precision {
    /// fp32 weights and compute.
    #[default]
    #[serde(rename = "fp32")]
    Fp32,
    /// fp32 master weights and optimizer state, bf16 compute through CUDA autocast.
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
    /// bf16 weights, gradients, optimizer state and compute.
    #[serde(rename = "bf16")]
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Runs `f` under bf16 autocast for `bf16-mixed` (on CUDA, or the CPU), as every training loop
/// runs its forward pass; plainly for `fp32` and `bf16`.
pub fn autocast<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> Result<T> {
    match precision {
        Precision::Bf16Mixed => {
            torch_ext::with_autocast_bf16(device.is_cuda(), f).map_err(Error::Torch)
        }
        Precision::Fp32 | Precision::Bf16 => Ok(f()),
    }
}
