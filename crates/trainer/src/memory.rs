//! Refusing, before any tensor is made, a model or a training run that cannot fit: what it needs
//! at least (weights, gradients, optimizer state, the logits that exist at once; a lower bound, since
//! activations and the allocator's slack come on top) against what the device has free.
//!
//! A lower bound on purpose: the check may let through a run that later runs out of memory
//! (libtorch's own error stands then), but never refuses one that fits.
//!
//! - CPU: `MemAvailable` of /proc/meminfo, capped by the cgroup v2 `memory.max` -
//!   `memory.current` (a container, a Slurm job) when that is less; processes of one machine
//!   (LOCAL_WORLD_SIZE of a `trainer launch`) share it, so their needs add up.
//! - CUDA: the driver's free memory of the rank's GPU (`cudaMemGetInfo`).
//!
//! `TRAINER_NO_MEMORY_CHECK=1` skips the check (for the brave);
//! `TRAINER_ASSUME_MEMORY_AVAILABLE=BYTES` replaces what was read (tests, or a machine that
//! reports its memory wrongly).

use crate::error::{Error, Result};
use tch::Device;

/// What a model or a run holds at least, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryNeed {
    pub weights: u128,
    pub gradients: u128,
    pub optimizer_state: u128,
    /// The logits that exist at once: one micro-batch's, or one chunk's with a chunked loss.
    pub logits: u128,
    /// Processes of this machine sharing its memory (CPU): each needs the above.
    pub processes: u128,
}

impl MemoryNeed {
    /// Only `params` weights of `bytes_per_weight` each (evaluation, export, generation).
    pub fn weights(params: u128, bytes_per_weight: u128) -> MemoryNeed {
        MemoryNeed {
            weights: params.saturating_mul(bytes_per_weight),
            processes: 1,
            ..MemoryNeed::default()
        }
    }

    pub fn total(&self) -> u128 {
        self.weights
            .saturating_add(self.gradients)
            .saturating_add(self.optimizer_state)
            .saturating_add(self.logits)
            .saturating_mul(self.processes.max(1))
    }

    /// "weights 1.2 GiB, gradients ..." for the parts that are not zero.
    fn parts(&self) -> String {
        let mut parts = vec![format!("weights {}", gib(self.weights))];
        for (name, bytes) in [
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("logits", self.logits),
        ] {
            if bytes > 0 {
                parts.push(format!("{name} {}", gib(bytes)));
            }
        }
        let mut s = parts.join(", ");
        if self.processes > 1 {
            s.push_str(&format!(
                ", times {} processes on this machine",
                self.processes
            ));
        }
        s
    }
}

fn gib(bytes: u128) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Refuses in one line when `need` exceeds the free memory of `device`; `what` names the
/// model or run ("model (8030261248 parameters)", "training").
pub fn check(need: &MemoryNeed, device: Device, what: &str) -> Result<()> {
    if std::env::var("TRAINER_NO_MEMORY_CHECK").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    let Some(available) = std::env::var("TRAINER_ASSUME_MEMORY_AVAILABLE")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or_else(|| available(device))
    else {
        return Ok(()); // nothing to compare with: libtorch reports its own failure
    };
    let total = need.total();
    if total > available as u128 {
        let place = match device {
            Device::Cuda(i) => format!("GPU {i} has"),
            _ => "this machine has".to_string(),
        };
        return Err(Error::Recipe(format!(
            "{what}: at least {} needed ({}), but {place} {} available; set \
             TRAINER_NO_MEMORY_CHECK=1 to try anyway",
            gib(total),
            need.parts(),
            gib(available as u128)
        )));
    }
    Ok(())
}

/// Free memory of `device` in bytes, when it can be read.
pub fn available(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(i) => torch_ext::accelerator_memory_info(i)
            .ok()
            .map(|(free, _)| free),
        _ => available_host_memory(),
    }
}

/// /proc/meminfo's MemAvailable, capped by the cgroup v2 limit.
fn available_host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let host = kb * 1024;
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let cgroup =
        read("memory.max").map(|max| max.saturating_sub(read("memory.current").unwrap_or(0)));
    Some(cgroup.map_or(host, |c| c.min(host)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_need_adds_its_parts_per_process_and_the_refusal_names_them() {
        let need = MemoryNeed {
            weights: 4 << 30,
            gradients: 4 << 30,
            optimizer_state: 8 << 30,
            logits: 1 << 30,
            processes: 2,
        };
        assert_eq!(need.total(), 34 << 30);
        assert_eq!(
            need.parts(),
            "weights 4.00 GiB, gradients 4.00 GiB, optimizer state 8.00 GiB, logits \
             1.00 GiB, times 2 processes on this machine"
        );
        assert_eq!(MemoryNeed::weights(10, 4).total(), 40);
        assert_eq!(MemoryNeed::weights(u128::MAX, 4).total(), u128::MAX);
    }

    #[test]
    fn the_host_has_some_memory_and_no_accelerator_reads_as_unknown() {
        assert!(available(Device::Cpu).is_some_and(|b| b > 0));
        if !tch::Cuda::is_available() {
            assert_eq!(available(Device::Cuda(0)), None);
        }
    }
}
