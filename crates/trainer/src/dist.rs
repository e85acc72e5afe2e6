//! Data parallelism across processes on libtorch's own c10d (the engine under PyTorch's DDP).
//!
//! - [`World`]: who this process is, read from torchrun's variables (RANK, WORLD_SIZE,
//!   LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or Slurm's (SLURM_PROCID, SLURM_NTASKS,
//!   SLURM_LOCALID, the first host of SLURM_JOB_NODELIST); a single process when neither is set.
//! - [`DataParallel`]: the process group (a TCPStore rendezvous hosted by rank 0, then
//!   ProcessGroupGloo on the CPU or ProcessGroupNCCL on CUDA, through `torch_ext`) and the three
//!   things a training loop needs from it: broadcast the parameters from rank 0 once, average the
//!   gradients after every backward pass, and sum a few scalars (loss, stop flag).
//!
//! Gradients are averaged as torch.nn.parallel.DistributedDataParallel does (bucketed
//! all-reduce, then division by the world size): overlapped with the backward pass through
//! gradient-ready hooks ([`OverlappedGrads`]) for dense models, after it (`reduce_step`) for MoE
//! models and distillation.
//! Every rank then holds the same gradients and takes the same optimizer step, so AdamW, SGD,
//! GaLore (same SVD of the same gradient) and ReLoRA (merge and re-draw seeded from (seed, step))
//! stay in step without exchanging optimizer state.
//!
//! Imports: `models/` (the parameter store) and the shim; the training loops (`train/`) call it
//! with flat arguments (`Collectives`), not the recipe.

use crate::error::{Error, Result};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tch::{Device, Kind, Tensor};
use torch_ext::{Backend, ProcessGroup};

/// How the collectives of a multi-process run behave (`run.collective_timeout_s`,
/// `run.bucket_mb` in a recipe).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Collectives {
    /// Seconds a rank waits at a collective (and at the rendezvous) before failing.
    pub timeout_s: f64,
    /// Gradients are averaged in flat buckets of about this many MiB.
    pub bucket_mb: f64,
}

impl Collectives {
    /// `bucket_mb` in bytes (at least one).
    pub fn bucket_bytes(&self) -> i64 {
        ((self.bucket_mb * (1 << 20) as f64) as i64).max(1)
    }
}

/// This process's place among the processes of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// Rank among the processes of this machine: picks the GPU.
    pub local_rank: usize,
    /// Where rank 0 hosts the rendezvous store.
    pub master_addr: String,
    pub master_port: u16,
    /// Joins a process group: several processes, or a torchrun-style launch of one (WORLD_SIZE=1,
    /// as `trainer launch --nproc 1` gives), which runs the collectives of the real backend
    /// (NCCL on one GPU) as torch.distributed does under torchrun.
    pub in_group: bool,
}

impl World {
    /// One process, no communication.
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            in_group: false,
        }
    }

    /// Whether this process communicates with a process group (see `in_group`).
    pub fn is_distributed(&self) -> bool {
        self.in_group
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Reads the process's environment.
    pub fn from_env() -> Result<World> {
        World::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// torchrun's variables when WORLD_SIZE is set, else Slurm's when SLURM_STEP_NUM_TASKS (the
    /// tasks of this srun step) or SLURM_NTASKS (the job's) is, else a single process.
    /// Start the ranks with srun (or `trainer launch`): one trainer started by hand inside a
    /// multi-task allocation would wait for its missing peers until the rendezvous times out. A variable that is set but malformed is an error naming it.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<World> {
        let int = |key: &str| -> Result<Option<usize>> {
            match var(key) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::Recipe(format!("{key}: expected a non-negative integer, got {v:?}"))
                }),
            }
        };
        let required = |key: &str, why: &str| -> Result<usize> {
            int(key)?.ok_or_else(|| Error::Recipe(format!("{key}: missing ({why})")))
        };
        let (rank, size, local_rank, addr) = if let Some(size) = int("WORLD_SIZE")? {
            let rank = required("RANK", "torchrun's WORLD_SIZE is set")?;
            let local = int("LOCAL_RANK")?.unwrap_or(rank);
            (rank, size, local, var("MASTER_ADDR"))
        } else if let Some(size) = match int("SLURM_STEP_NUM_TASKS")? {
            // The tasks of this srun step; SLURM_NTASKS (the job's) where srun does not say.
            Some(n) => Some(n),
            None => int("SLURM_NTASKS")?,
        } {
            let rank = required("SLURM_PROCID", "SLURM_NTASKS is set")?;
            let local = int("SLURM_LOCALID")?.unwrap_or(0);
            let addr = var("MASTER_ADDR").or_else(|| {
                var("SLURM_JOB_NODELIST")
                    .or_else(|| var("SLURM_NODELIST"))
                    .and_then(|l| first_host(&l))
            });
            (rank, size, local, addr)
        } else {
            return Ok(World::single());
        };
        if size == 0 {
            return Err(Error::Recipe(
                "WORLD_SIZE: expected at least 1 process, got 0".into(),
            ));
        }
        if rank >= size {
            return Err(Error::Recipe(format!(
                "RANK: expected a rank below the world size {size}, got {rank}"
            )));
        }
        // One Slurm task is a plain single process; torchrun's WORLD_SIZE=1 joins a group of one.
        let torchrun = var("WORLD_SIZE").is_some();
        if size == 1 && !torchrun {
            return Ok(World {
                local_rank,
                ..World::single()
            });
        }
        let port = match var("MASTER_PORT") {
            // Under Slurm, a port of this job's own (as PyTorch Lightning derives it), so that two
            // jobs sharing a node do not meet at the same one; else torchrun's default.
            None if var("WORLD_SIZE").is_none() => match int("SLURM_JOB_ID")? {
                Some(job) => 20000 + (job % 10000) as u16,
                None => 29500,
            },
            None => 29500,
            Some(p) => match p.trim().parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    return Err(Error::Recipe(format!(
                        "MASTER_PORT: expected a TCP port 1..65535, got {p:?}"
                    )))
                }
            },
        };
        Ok(World {
            rank,
            size,
            local_rank,
            master_addr: addr.unwrap_or_else(|| "127.0.0.1".into()),
            master_port: port,
            in_group: true,
        })
    }

    /// The device this rank trains on: with several processes and a CUDA device, the GPU
    /// numbered LOCAL_RANK (one process per GPU); otherwise `device` as resolved.
    pub fn device(&self, device: Device) -> Result<Device> {
        match device {
            Device::Cuda(_) if self.is_distributed() => {
                let n = tch::Cuda::device_count() as usize;
                if self.local_rank >= n {
                    return Err(Error::Device(format!(
                        "LOCAL_RANK {} but this machine has {n} CUDA device(s): start at most {n} processes per node",
                        self.local_rank
                    )));
                }
                Ok(Device::Cuda(self.local_rank))
            }
            other => Ok(other),
        }
    }

    /// The rows `[start, start + len)` of a global batch of `batch` rows that this rank trains
    /// on; an error naming `key` when the world size does not divide it.
    pub fn shard(&self, batch: usize, key: &str) -> Result<(usize, usize)> {
        if !batch.is_multiple_of(self.size) {
            return Err(Error::Recipe(format!(
                "{key}: the global batch of {batch} does not divide evenly over {} processes: use a multiple of {}",
                self.size, self.size
            )));
        }
        let len = batch / self.size;
        Ok((self.rank * len, len))
    }
}

/// The first host of a Slurm node list: `node[01-04,07],other` gives `node01`,
/// `a,b` gives `a`, `gpu-[3-5]` gives `gpu-3`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first entry ends at the first comma outside brackets.
    let mut depth = 0;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    // Each bracket expression stands for its first value: `n[1-2]` -> `n1`.
    let mut host = String::new();
    let mut rest = &list[..end];
    while let Some(open) = rest.find('[') {
        let close = rest[open..].find(']')? + open;
        let first = rest[open + 1..close].split(',').next()?.split('-').next()?;
        host.push_str(&rest[..open]);
        host.push_str(first);
        rest = &rest[close + 1..];
    }
    host.push_str(rest);
    (!host.is_empty()).then_some(host)
}

/// The process group this process joined, kept from one training run to the next: the stages
/// of a `[[stages]]` recipe run one after another in the same processes, and a second
/// rendezvous on the same port could meet the previous run's store before rank 0 closed it.
/// Never dropped: the process's exit closes it.
static GROUP: Mutex<Option<Joined>> = Mutex::new(None);

struct Joined {
    world: World,
    backend: Backend,
    timeout: Duration,
    group: ProcessGroup,
}

/// A training run's view of the process group (every operation is a no-op for a single
/// process, so that the training loop reads the same either way).
pub struct DataParallel {
    pub world: World,
    /// The training device: NCCL reduces CUDA tensors only, Gloo CPU ones.
    device: Device,
    /// Bounds every collective (for the error message; the group enforces it).
    timeout: Duration,
    /// Gradients are averaged in flat buckets of about this many bytes (`run.bucket_mb`).
    bucket_bytes: i64,
    /// Reused flat buffers, one per bucket, on the training device.
    buckets: std::cell::RefCell<Vec<Tensor>>,
}

impl DataParallel {
    /// Joins the group (rank 0 hosts the rendezvous), or keeps the one this process already
    /// joined for the same world: Gloo for CPU training, NCCL for CUDA. `timeout` bounds the
    /// rendezvous and every collective (a kept group keeps its own).
    pub fn init(
        world: World,
        device: Device,
        timeout: Duration,
        bucket_bytes: i64,
    ) -> Result<DataParallel> {
        let mut timeout = timeout;
        if world.is_distributed() {
            let backend = if device.is_cuda() {
                Backend::Nccl
            } else {
                Backend::Gloo
            };
            let mut joined = GROUP.lock().unwrap_or_else(PoisonError::into_inner);
            match joined.as_ref() {
                Some(j) if j.world == world && j.backend == backend => timeout = j.timeout,
                _ => {
                    *joined = None; // leave another group first
                    let group = ProcessGroup::new(
                        &world.master_addr,
                        world.master_port,
                        world.rank,
                        world.size,
                        backend,
                        timeout,
                        timeout,
                    )
                    .map_err(|e| rendezvous_error(&world, timeout, &e))?;
                    tracing::info!(
                        "rank {} of {} ({:?}, rendezvous at {}:{})",
                        world.rank,
                        world.size,
                        backend,
                        world.master_addr,
                        world.master_port
                    );
                    *joined = Some(Joined {
                        world: world.clone(),
                        backend,
                        timeout,
                        group,
                    });
                }
            }
        }
        Ok(DataParallel {
            world,
            device,
            timeout,
            bucket_bytes,
            buckets: Default::default(),
        })
    }

    /// Runs `f` on the process group; nothing for a single process. `what` names the operation
    /// in the error.
    fn collective(
        &self,
        what: &str,
        f: impl FnOnce(&ProcessGroup) -> std::result::Result<(), String>,
    ) -> Result<()> {
        if !self.world.is_distributed() {
            return Ok(());
        }
        self.with_group(what, f)
    }

    /// Runs `f` on the joined process group; `what` names the operation in the error.
    fn with_group<T>(
        &self,
        what: &str,
        f: impl FnOnce(&ProcessGroup) -> std::result::Result<T, String>,
    ) -> Result<T> {
        let joined = GROUP.lock().unwrap_or_else(PoisonError::into_inner);
        match joined.as_ref() {
            Some(j) => f(&j.group).map_err(|e| self.collective_error(what, &e)),
            None => Err(Error::Torch(format!("{what}: not in a process group"))),
        }
    }

    /// A training loop's start: joins the group, gives every rank rank 0's parameters and
    /// buffers (all but those sharded under `run.shard = "full"`, which live on one rank), and
    /// checks that all ranks are at the same `step` (resumed from the same checkpoint of
    /// `run_dir`).
    pub fn start(
        world: &World,
        device: Device,
        run: &Collectives,
        params: &crate::models::params::ParamStore,
        step: i64,
        run_dir: &std::path::Path,
    ) -> Result<DataParallel> {
        let timeout = Duration::from_secs_f64(run.timeout_s);
        let bucket_bytes = run.bucket_bytes();
        let dp = DataParallel::init(world.clone(), device, timeout, bucket_bytes)?;
        if world.is_distributed() {
            let whole = params.iter().filter(|p| !p.is_sharded()).map(|p| &p.tensor);
            dp.broadcast_from_main(&whole.collect::<Vec<_>>())?;
            let mut steps = [step as f64];
            dp.sum(&mut steps)?;
            if steps[0] != (step * world.size as i64) as f64 {
                return Err(Error::RunDir {
                    path: run_dir.to_path_buf(),
                    msg: format!(
                        "rank {} is at step {step} but the ranks disagree: start every rank with the same run.out_dir and --resume",
                        world.rank
                    ),
                });
            }
        }
        Ok(dp)
    }

    /// Overwrites `tensors` with rank 0's values on every rank (parameters at the start,
    /// BatchNorm statistics after each step).
    pub fn broadcast_from_main(&self, tensors: &[&Tensor]) -> Result<()> {
        self.collective("broadcasting rank 0's tensors", |g| {
            tch::no_grad(|| g.broadcast(tensors, 0))
        })
    }

    /// Overwrites `tensors` with rank `root`'s values on every rank, in one coalesced call.
    pub fn broadcast_from(&self, tensors: &[&Tensor], root: usize, what: &str) -> Result<()> {
        self.collective(what, |g| tch::no_grad(|| g.broadcast(tensors, root)))
    }

    /// Overwrites `tensors` (of one dtype and device) with rank `root`'s values in one
    /// collective: packed into a flat buffer on `root`, broadcast, unpacked on the others.
    pub fn broadcast_flat(&self, tensors: &[Tensor], root: usize, what: &str) -> Result<()> {
        let pending = self.start_broadcast_flat(tensors, root, what)?;
        self.finish_broadcast(pending, what)
    }

    /// Another handle on the same joined group (no bucket buffers of its own): for a part of
    /// the run that issues its own collectives in the same order on every rank.
    pub fn view(&self) -> DataParallel {
        DataParallel {
            world: self.world.clone(),
            device: self.device,
            timeout: self.timeout,
            bucket_bytes: self.bucket_bytes,
            buckets: Default::default(),
        }
    }

    /// `broadcast_flat` started and not waited for: `tensors` are packed now (on `root`) and
    /// take `root`'s values in `finish_broadcast`, which every rank must call, in the order the
    /// broadcasts were started. Until then the flat buffer holds a copy of them.
    pub fn start_broadcast_flat(
        &self,
        tensors: &[Tensor],
        root: usize,
        what: &str,
    ) -> Result<PendingBroadcast> {
        let mut pending = PendingBroadcast {
            root,
            buf: None,
            work: None,
            tensors: tensors.iter().map(Tensor::shallow_clone).collect(),
        };
        if !self.world.is_distributed() || tensors.is_empty() {
            return Ok(pending);
        }
        let n: i64 = tensors.iter().map(|t| t.numel() as i64).sum();
        let buf = Tensor::empty([n], (tensors[0].kind(), tensors[0].device()));
        if self.world.rank == root {
            pack(&buf, tensors);
        }
        pending.work = Some(self.with_group(what, |g| g.broadcast_start(&buf, root))?);
        pending.buf = Some(buf);
        Ok(pending)
    }

    /// Waits for a broadcast from `start_broadcast_flat` and copies the values into its
    /// tensors (which must have memory by now).
    pub fn finish_broadcast(&self, pending: PendingBroadcast, what: &str) -> Result<()> {
        self.settle_broadcast(pending, what, true)
    }

    /// Waits for a broadcast from `start_broadcast_flat` and drops its values.
    pub fn wait_broadcast(&self, pending: PendingBroadcast, what: &str) -> Result<()> {
        self.settle_broadcast(pending, what, false)
    }

    fn settle_broadcast(&self, pending: PendingBroadcast, what: &str, keep: bool) -> Result<()> {
        let (Some(buf), Some(work)) = (pending.buf, pending.work) else {
            return Ok(());
        };
        self.collective(what, |g| g.wait(work))?;
        if keep && self.world.rank != pending.root {
            unpack(&buf, &pending.tensors);
        }
        Ok(())
    }

    /// The training device (where NCCL's tensors must be).
    pub fn device(&self) -> Device {
        self.device
    }

    /// After the backward pass of a step: sums `scalars` over the ranks (the step's loss and stop
    /// flag) and replaces the gradient of every parameter in `params` by its mean over the
    /// ranks. The gradients are copied into flat buckets of about `run.bucket_mb` (one dtype
    /// each), all-reduced (summed) together, divided by the world size and copied back.
    /// A parameter without a gradient on every rank (unused by the whole global batch, e.g. an
    /// idle expert) keeps none, as in a single process; one that some ranks used gets a zero
    /// gradient on the others first.
    pub fn reduce_step(&self, params: &[&Tensor], scalars: &mut [f64]) -> Result<()> {
        if !self.world.is_distributed() {
            return Ok(());
        }
        let k = scalars.len();
        let mut values = scalars.to_vec();
        values.extend(
            params
                .iter()
                .map(|p| f64::from(u8::from(p.grad().defined()))),
        );
        self.sum(&mut values)?;
        scalars.copy_from_slice(&values[..k]);
        let used: Vec<&Tensor> = params
            .iter()
            .zip(&values[k..])
            .filter(|(_, &n)| n > 0.0)
            .map(|(p, _)| *p)
            .collect();
        torch_ext::grads_zero_if_none(&used).map_err(Error::Torch)?;
        let grads: Vec<Tensor> = used.iter().map(|p| p.grad()).collect();
        if grads.is_empty() {
            return Ok(());
        }
        let groups = bucket_groups(&grads, self.bucket_bytes, None);
        let sizes: Vec<i64> = groups
            .iter()
            .map(|idx| idx.iter().map(|&i| grads[i].numel() as i64).sum())
            .collect();
        let mut buffers = self.buckets.borrow_mut();
        let reusable = buffers.len() == groups.len()
            && buffers
                .iter()
                .zip(groups.iter().zip(&sizes))
                .all(|(b, (idx, &n))| b.numel() as i64 == n && b.kind() == grads[idx[0]].kind());
        if !reusable {
            *buffers = groups
                .iter()
                .zip(&sizes)
                .map(|(idx, &n)| Tensor::empty([n], (grads[idx[0]].kind(), grads[idx[0]].device())))
                .collect();
        }
        let bucket = |idx: &Vec<usize>| idx.iter().map(|&i| &grads[i]).collect::<Vec<_>>();
        for (buf, idx) in buffers.iter().zip(&groups) {
            pack(buf, &bucket(idx));
        }
        let refs: Vec<&Tensor> = buffers.iter().collect();
        self.collective("averaging the gradients", |g| g.all_reduce_sum(&refs))?;
        for (buf, idx) in buffers.iter().zip(&groups) {
            unpack_mean(buf, &bucket(idx), self.world.size);
        }
        Ok(())
    }

    /// Starts the sum all-reduce of `t` without waiting (see `OverlappedGrads`).
    fn start_sum(&self, t: &Tensor) -> Result<torch_ext::Work> {
        self.with_group("averaging the gradients", |g| g.all_reduce_sum_start(t))
    }

    /// Starts the sum reduce of `t` onto rank `root` without waiting (`run.shard = "gradients"`).
    fn start_reduce(&self, t: &Tensor, root: usize) -> Result<torch_ext::Work> {
        self.with_group("reducing the gradients onto their owners", |g| {
            g.reduce_sum_start(t, root)
        })
    }

    /// Starts the sum reduce-scatter of `input` (world times as long as `output`): `output`
    /// receives this rank's slice of the sum (`run.shard_layout = "flat"`).
    pub(crate) fn start_reduce_scatter(
        &self,
        output: &Tensor,
        input: &Tensor,
    ) -> Result<torch_ext::Work> {
        self.with_group("reduce-scattering the gradients", |g| {
            g.reduce_scatter_sum_start(output, input)
        })
    }

    /// Starts the all-gather of every rank's `input` into `output` (`run.shard_layout =
    /// "flat"`: the updated slices of the parameters).
    pub(crate) fn start_all_gather(
        &self,
        output: &Tensor,
        input: &Tensor,
    ) -> Result<torch_ext::Work> {
        self.with_group("gathering the updated parameters", |g| {
            g.all_gather_start(output, input)
        })
    }

    /// Waits for a collective from `start_sum`, `start_reduce`, `start_reduce_scatter` or
    /// `start_all_gather`.
    pub(crate) fn wait(&self, work: torch_ext::Work) -> Result<()> {
        self.collective("averaging the gradients", |g| g.wait(work))
    }

    /// Sums `values` over the ranks (in float64), in place: losses, counts, stop flags.
    pub fn sum(&self, values: &mut [f64]) -> Result<()> {
        if !self.world.is_distributed() {
            return Ok(());
        }
        let t = Tensor::from_slice(values).to_device(self.device);
        self.collective("summing the step's loss and stop flag", |g| {
            g.all_reduce_sum(&[&t])
        })?;
        let back = Vec::<f64>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double))
            .map_err(|e| Error::Torch(e.to_string()))?;
        values.copy_from_slice(&back);
        Ok(())
    }

    /// Returns when every rank has reached it. An all-reduce of one number on the training
    /// device rather than c10d's barrier, which on NCCL guesses the GPU from the rank (wrong when
    /// LOCAL_RANK differs from RANK).
    pub fn barrier(&self) -> Result<()> {
        self.sum(&mut [0.0])
    }

    fn collective_error(&self, what: &str, e: &str) -> Error {
        let msg = crate::error::first_line(e);
        let (rank, size) = (self.world.rank, self.world.size);
        let cause = if msg.to_lowercase().contains("timed out") {
            format!(
                "timed out after {}s (run.collective_timeout_s): another rank hangs or stopped",
                self.timeout.as_secs_f64()
            )
        } else {
            "another rank died or stopped".to_string()
        };
        Error::Torch(format!(
            "rank {rank} of {size}: {what} failed: {cause}: {msg}"
        ))
    }
}

fn rendezvous_error(world: &World, timeout: Duration, e: &str) -> Error {
    let msg = crate::error::first_line(e);
    let addr = format!("{}:{}", world.master_addr, world.master_port);
    if world.is_main() && (msg.contains("EADDRINUSE") || msg.contains("already in use")) {
        return Error::Recipe(format!(
            "MASTER_PORT: port {} is already in use on {}: choose a free port (trainer launch --master-port P)",
            world.master_port, world.master_addr
        ));
    }
    Error::Torch(format!(
        "rank {} of {}: rendezvous at {addr} failed within {}s (run.collective_timeout_s): {msg}",
        world.rank,
        world.size,
        timeout.as_secs_f64()
    ))
}

/// Gradient averaging overlapped with the backward pass, as DistributedDataParallel's reducer
/// does it: the trainable parameters are grouped into buckets of about `run.bucket_mb` in
/// reverse order (the order in which backward completes their gradients). During the step's
/// last backward pass a hook marks each gradient ready; a bucket whose gradients are all ready,
/// once the buckets before it are started (so that every rank starts the same collectives in
/// the same order), is copied into its flat buffer and its all-reduce started while backward
/// goes on. `finish` waits for them, divides by the world size and copies back; the buckets
/// that were not started (a parameter without a gradient this step, e.g. frozen by ReLoRA) go
/// through `reduce_step` with the step's scalars, as without overlap.
///
/// With owners (`run.shard = "gradients"`), buckets do not straddle two owners' parameters and
/// each is reduced onto its owner only: the other ranks drop their copies of its gradients as
/// soon as they are packed, and at most `IN_FLIGHT` started buckets (and their flat buffers,
/// made for the step) are kept before the oldest is waited for, so that a rank never holds
/// much more than its own gradients.
///
/// With `ScatterInto` (`run.shard_layout = "flat"`, `flat_shard.rs`), each bucket is instead
/// reduce-scattered into this rank's slice of it and its gradients dropped; every trainable
/// parameter must then have a gradient at every step (`finish` stops the step otherwise).
///
/// Only for models in which every rank uses the same parameters at every step (not MoE, whose
/// routing decides per rank which experts get gradients): otherwise ranks would start different
/// buckets during backward.
pub struct OverlappedGrads {
    hooks: torch_ext::GradReadyHooks,
    params: Vec<Tensor>,
    /// The parameters' names (for errors), in `params`' order.
    names: Vec<String>,
    buckets: Vec<Vec<usize>>,
    /// `run.shard = "gradients"`: the owning rank of each parameter (in `params`' order).
    owners: Option<Vec<usize>>,
    /// `run.shard_layout = "flat"`: each bucket reduce-scattered into this rank's slice.
    scatter: Option<ScatterInto>,
    /// Without owners: one flat buffer per bucket, kept from step to step.
    buffers: Vec<Tensor>,
    step: Mutex<OverlapStep>,
    /// The first step's overlap has been logged (debug).
    logged: std::sync::atomic::AtomicBool,
}

/// With owners: how many started buckets may be in flight when another starts.
const IN_FLIGHT: usize = 2;

/// `run.shard_layout = "flat"` (`flat_shard.rs`): the buckets of `OverlappedGrads`, each
/// reduce-scattered into this rank's slice of it, padded to a multiple of the world size.
pub struct ScatterInto {
    /// The trainable parameters of each bucket, as indices in reverse registration order.
    pub buckets: Vec<Vec<usize>>,
    /// Per bucket: this rank's slice of the averaged gradient (the world's slices together,
    /// the bucket and its zero padding).
    pub slices: Vec<Tensor>,
    /// `run.shard = "optimizer"`: per bucket, the whole padded bucket kept from step to step
    /// (zero padding), of which `slices` are views: packed and reduce-scattered in place.
    /// Else a buffer is made for each bucket as it is sent.
    pub whole: Option<Vec<Tensor>>,
}

/// What one step's backward pass has done so far.
#[derive(Default)]
struct OverlapStep {
    ready: Vec<bool>,
    /// The next bucket to start.
    next: usize,
    /// The started buckets not yet waited for (from bucket `waited` on), with their buffers.
    started: std::collections::VecDeque<(torch_ext::Work, Tensor)>,
    /// How many buckets have been waited for and unpacked.
    waited: usize,
    /// The step's last backward pass: a bucket's sum becomes its mean when it is unpacked
    /// (earlier passes, with owners, leave the owner the sum; `backward_accumulating`).
    last: bool,
    error: Option<Error>,
}

impl OverlappedGrads {
    /// Hooks on the trainable parameters of `store`, in `dp`'s bucket size. `owners`: with
    /// `run.shard = "gradients"`, the rank owning each trainable parameter, in registration
    /// order.
    /// `scatter`: with `run.shard_layout = "flat"`, the buckets and this rank's slices of them
    /// (`owners` then None).
    pub fn new(
        dp: &DataParallel,
        store: &crate::models::params::ParamStore,
        owners: Option<Vec<usize>>,
        scatter: Option<ScatterInto>,
    ) -> Result<OverlappedGrads> {
        let mut params: Vec<Tensor> = store
            .trainable()
            .map(|p| p.tensor.shallow_clone())
            .collect();
        params.reverse();
        let mut names: Vec<String> = store.trainable().map(|p| p.name.clone()).collect();
        names.reverse();
        let owners = owners.map(|mut o| {
            o.reverse();
            o
        });
        let buckets = match &scatter {
            Some(s) => s.buckets.clone(),
            None => bucket_groups(&params, dp.bucket_bytes, owners.as_deref()),
        };
        let buffers = match owners.is_some() || scatter.is_some() {
            true => Vec::new(),
            false => buckets
                .iter()
                .map(|idx| flat_buffer(&params, idx))
                .collect(),
        };
        let hooks =
            torch_ext::GradReadyHooks::install(params.iter().map(Tensor::shallow_clone).collect())
                .map_err(Error::Torch)?;
        Ok(OverlappedGrads {
            hooks,
            params,
            names,
            buckets,
            owners,
            scatter,
            buffers,
            step: Mutex::new(OverlapStep::default()),
            logged: Default::default(),
        })
    }

    /// Runs the step's last backward pass, starting each bucket's all-reduce as soon as it can.
    pub fn backward<R>(&self, dp: &DataParallel, backward: impl FnOnce() -> R) -> R {
        self.run_backward(dp, true, backward)
    }

    /// With owners (`run.shard = "gradients"` or `"full"`) and `run.reduce_every_micro_batch`,
    /// a backward pass before the step's last one: its buckets are reduced onto their owners as
    /// in the last pass and `settle` waits for them, so that between micro-batches no rank keeps
    /// the gradients of parameters it does not own. An owner's gradient is then the sum over
    /// the ranks of everything reduced so far, to which its next backward pass adds its own; the
    /// last pass's reduction adds the other ranks' and divides by the world size once: the mean
    /// of every rank's micro-batches (summed in another order than a whole all-reduce, so equal
    /// to rounding). Costs one reduction of the gradients per micro-batch instead of per step.
    pub fn backward_accumulating<R>(&self, dp: &DataParallel, backward: impl FnOnce() -> R) -> R {
        self.run_backward(dp, false, backward)
    }

    /// After `backward_accumulating`: waits for the buckets it started (a bucket it could not
    /// start keeps this pass's gradients on every rank; a later reduction takes them along).
    pub fn settle(&self, dp: &DataParallel) -> Result<()> {
        let mut st = self.step.lock().unwrap_or_else(PoisonError::into_inner);
        while !st.started.is_empty() {
            self.wait_oldest(dp, &mut st)?;
        }
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn run_backward<R>(&self, dp: &DataParallel, last: bool, backward: impl FnOnce() -> R) -> R {
        *self.step.lock().unwrap_or_else(PoisonError::into_inner) = OverlapStep {
            ready: vec![false; self.params.len()],
            last,
            ..OverlapStep::default()
        };
        self.hooks.backward(
            &mut |i| {
                let mut st = self.step.lock().unwrap_or_else(PoisonError::into_inner);
                st.ready[i] = true;
                while st.error.is_none()
                    && st.next < self.buckets.len()
                    && self.buckets[st.next].iter().all(|&j| st.ready[j])
                {
                    let b = st.next;
                    let started = self.make_room(dp, &mut st).and_then(|()| self.start(dp, b));
                    match started {
                        Ok(work) => st.started.push_back(work),
                        Err(e) => st.error = Some(e),
                    }
                    st.next += 1;
                }
            },
            backward,
        )
    }

    /// With owners: waits for the oldest started buckets until fewer than `IN_FLIGHT` are.
    fn make_room(&self, dp: &DataParallel, st: &mut OverlapStep) -> Result<()> {
        let made_for_the_step = self.owners.is_some() || self.scatter.is_some();
        while made_for_the_step && st.started.len() >= IN_FLIGHT {
            self.wait_oldest(dp, st)?;
        }
        Ok(())
    }

    /// Waits for the oldest started bucket and gives this rank its mean gradients (all of them
    /// without owners, only its own with owners).
    fn wait_oldest(&self, dp: &DataParallel, st: &mut OverlapStep) -> Result<()> {
        let Some((work, buf)) = st.started.pop_front() else {
            return Ok(());
        };
        let b = st.waited;
        st.waited += 1;
        dp.wait(work)?;
        if let Some(s) = &self.scatter {
            let slice = s.slices[b].shallow_clone();
            let _ = tch::no_grad(|| slice.data().g_mul_scalar_(1.0 / dp.world.size as f64));
            return Ok(());
        }
        if self.owner(b).is_none_or(|o| o == dp.world.rank) {
            match st.last {
                true => unpack_mean(&buf, &self.grads(b), dp.world.size),
                false => unpack(&buf, &self.grads(b)),
            }
        }
        Ok(())
    }

    /// The rank that owns bucket `b` (with owners).
    fn owner(&self, b: usize) -> Option<usize> {
        self.owners.as_ref().map(|o| o[self.buckets[b][0]])
    }

    /// The gradients of bucket `b`'s parameters.
    fn grads(&self, b: usize) -> Vec<Tensor> {
        self.buckets[b]
            .iter()
            .map(|&i| self.params[i].grad())
            .collect()
    }

    /// Copies bucket `b`'s gradients into its buffer and starts its all-reduce, or with owners
    /// its reduce onto the owner (a rank that does not own it drops its gradients at once).
    fn start(&self, dp: &DataParallel, b: usize) -> Result<(torch_ext::Work, Tensor)> {
        if let Some(s) = &self.scatter {
            return self.start_scatter(dp, s, b);
        }
        let Some(owner) = self.owner(b) else {
            pack(&self.buffers[b], &self.grads(b));
            let work = dp.start_sum(&self.buffers[b])?;
            return Ok((work, self.buffers[b].shallow_clone()));
        };
        let buf = flat_buffer(&self.params, &self.buckets[b]);
        pack(&buf, &self.grads(b));
        if owner != dp.world.rank {
            let theirs: Vec<&Tensor> = self.buckets[b].iter().map(|&i| &self.params[i]).collect();
            torch_ext::grads_to_none(&theirs).map_err(Error::Torch)?;
        }
        Ok((dp.start_reduce(&buf, owner)?, buf))
    }

    /// `run.shard_layout = "flat"`: copies bucket `b`'s gradients into its whole buffer (or a
    /// new one padded with zeros to the world's slices), drops them, and starts the buffer's
    /// reduce-scatter into this rank's slice.
    fn start_scatter(
        &self,
        dp: &DataParallel,
        s: &ScatterInto,
        b: usize,
    ) -> Result<(torch_ext::Work, Tensor)> {
        let slice = &s.slices[b];
        let grads = self.grads(b);
        let buf = match &s.whole {
            Some(whole) => whole[b].shallow_clone(),
            None => {
                let padded = slice.numel() as i64 * dp.world.size as i64;
                let len: i64 = grads.iter().map(|g| g.numel() as i64).sum();
                let buf = Tensor::empty([padded], (slice.kind(), slice.device()));
                let _ = buf.narrow(0, len, padded - len).zero_();
                buf
            }
        };
        pack(&buf, &grads);
        let mine: Vec<&Tensor> = self.buckets[b].iter().map(|&i| &self.params[i]).collect();
        torch_ext::grads_to_none(&mine).map_err(Error::Torch)?;
        Ok((dp.start_reduce_scatter(slice, &buf)?, buf))
    }

    /// After the step's backward passes: waits for the started collectives and replaces those
    /// gradients by their means; averages the rest with `reduce_step`, which also sums `scalars`
    /// (with owners, the caller then drops the gradients this rank does not own).
    pub fn finish(&self, dp: &DataParallel, scalars: &mut [f64]) -> Result<()> {
        let mut st = std::mem::take(&mut *self.step.lock().unwrap_or_else(PoisonError::into_inner));
        let started = st.next;
        if !self.logged.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::debug!(
                "gradient buckets: {started} of {} started during the backward pass",
                self.buckets.len()
            );
        }
        while !st.started.is_empty() {
            self.wait_oldest(dp, &mut st)?;
        }
        if let Some(e) = st.error {
            return Err(e);
        }
        if self.scatter.is_some() {
            if let Some(b) = self.buckets.get(started) {
                return Err(self.no_gradient(b, &st.ready));
            }
            return dp.sum(scalars);
        }
        let rest: Vec<&Tensor> = self.buckets[started..]
            .iter()
            .flatten()
            .map(|&i| &self.params[i])
            .collect();
        dp.reduce_step(&rest, scalars)
    }
}

impl OverlappedGrads {
    /// `run.shard_layout = "flat"`: a bucket was not sent during the backward pass because a
    /// parameter of `bucket` got no gradient; its slices would take a zero gradient (and the
    /// optimizer update an unsharded run skips), so the step stops instead.
    fn no_gradient(&self, bucket: &[usize], ready: &[bool]) -> Error {
        let missing = bucket
            .iter()
            .find(|&&i| !ready.get(i).copied().unwrap_or(false));
        let which = missing.map_or("a parameter", |&i| self.names[i].as_str());
        Error::Recipe(format!(
            "run.shard_layout = \"flat\": {which} got no gradient in this step; flat slices \
             need every trainable parameter trained at every step: use run.shard_layout = \
             \"tensors\""
        ))
    }
}

/// A flat buffer for the parameters `idx` of `params` (one dtype and device).
fn flat_buffer(params: &[Tensor], idx: &[usize]) -> Tensor {
    let n: i64 = idx.iter().map(|&i| params[i].numel() as i64).sum();
    let first = &params[idx[0]];
    Tensor::empty([n], (first.kind(), first.device()))
}

/// Copies `grads` one after the other into the flat buffer `buf`.
pub(crate) fn pack(buf: &Tensor, grads: &[impl std::borrow::Borrow<Tensor>]) {
    tch::no_grad(|| {
        let mut offset = 0;
        for g in grads {
            let g = g.borrow();
            let n = g.numel() as i64;
            buf.narrow(0, offset, n).copy_(&g.reshape([-1]));
            offset += n;
        }
    });
}

/// Divides the all-reduced (summed) buffer `buf` by the world size and copies it back into
/// `grads`, the inverse of `pack`.
fn unpack_mean(buf: &Tensor, grads: &[impl std::borrow::Borrow<Tensor>], world_size: usize) {
    tch::no_grad(|| {
        let _ = buf.shallow_clone().g_mul_scalar_(1.0 / world_size as f64);
    });
    unpack(buf, grads);
}

/// A broadcast of packed tensors in flight (`DataParallel::start_broadcast_flat`).
pub struct PendingBroadcast {
    root: usize,
    /// The flat buffer the collective fills (`None` outside a process group).
    buf: Option<Tensor>,
    work: Option<torch_ext::Work>,
    tensors: Vec<Tensor>,
}

/// Copies the flat buffer `buf` back into `tensors`, the inverse of `pack`. Through `data()`
/// (the same memory, a version counter of its own): a sharded weight gathered again for the
/// backward pass refills the storage a kept graph saved it in, which must not count as a change
/// of the saved tensor (`Transformer::block_with_weights`).
pub(crate) fn unpack(buf: &Tensor, tensors: &[impl std::borrow::Borrow<Tensor>]) {
    tch::no_grad(|| {
        let mut offset = 0;
        for t in tensors {
            let t = t.borrow();
            let n = t.numel() as i64;
            t.data().copy_(&buf.narrow(0, offset, n).view_as(t));
            offset += n;
        }
    });
}

/// Splits the gradients (in order) into groups of one dtype and device (and one owner, with
/// `owners`) of at most `cap` bytes each (a single larger tensor is a group of its own).
pub(crate) fn bucket_groups(
    grads: &[Tensor],
    cap: i64,
    owners: Option<&[usize]>,
) -> Vec<Vec<usize>> {
    let owner = |i: usize| owners.map_or(0, |o| o[i]);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0i64;
    for (i, g) in grads.iter().enumerate() {
        let size = g.numel() as i64 * g.kind().elt_size_in_bytes() as i64;
        let fits = groups.last().is_some_and(|last| {
            let first = &grads[last[0]];
            first.kind() == g.kind()
                && first.device() == g.device()
                && owner(last[0]) == owner(i)
                && bytes + size <= cap
        });
        match groups.last_mut() {
            Some(last) if fits => {
                last.push(i);
                bytes += size;
            }
            _ => {
                groups.push(vec![i]);
                bytes = size;
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<World> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn no_variables_is_a_single_process() {
        assert_eq!(world(&[]).expect("ok"), World::single());
    }

    #[test]
    fn torchrun_variables() {
        let w = world(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "29600"),
        ])
        .expect("ok");
        assert_eq!(
            w,
            World {
                rank: 3,
                size: 4,
                local_rank: 1,
                master_addr: "10.0.0.2".into(),
                master_port: 29600,
                in_group: true,
            }
        );
        // torchrun with one process joins a group of one (the backend's collectives run).
        let w = world(&[("RANK", "0"), ("WORLD_SIZE", "1")]).expect("ok");
        assert!(w.is_distributed() && w.size == 1, "{w:?}");
        let e = world(&[("RANK", "4"), ("WORLD_SIZE", "4")]).expect_err("an error");
        assert!(e.to_string().starts_with("RANK:"), "{e}");
        let e = world(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "http")])
            .expect_err("an error");
        assert!(e.to_string().starts_with("MASTER_PORT:"), "{e}");
        let e = world(&[("WORLD_SIZE", "2")]).expect_err("an error");
        assert!(e.to_string().starts_with("RANK: missing"), "{e}");
    }

    #[test]
    fn slurm_variables_take_the_first_host_of_the_node_list() {
        let w = world(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[03-04,07],login"),
        ])
        .expect("ok");
        assert_eq!((w.rank, w.size, w.local_rank), (5, 8, 1));
        assert_eq!(w.master_addr, "gpu03");
        assert_eq!(w.master_port, 29500);
        let w = world(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_JOB_NODELIST", "n1"),
        ])
        .expect("ok");
        assert_eq!((w.master_addr.as_str(), w.master_port), ("n1", 23456));
        // The srun step's task count wins over the job's.
        let w = world(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_STEP_NUM_TASKS", "1"),
        ])
        .expect("ok");
        assert_eq!(w, World::single());
    }

    #[test]
    fn first_host_of_node_lists() {
        assert_eq!(first_host("node[01-04],other").as_deref(), Some("node01"));
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("single").as_deref(), Some("single"));
        assert_eq!(first_host("gpu-[3-5]").as_deref(), Some("gpu-3"));
        assert_eq!(first_host("rack[7,2]-n[1-2]").as_deref(), Some("rack7-n1"));
        assert_eq!(first_host(""), None);
    }

    #[test]
    fn shards_split_the_global_batch() {
        let w = World {
            rank: 1,
            size: 2,
            ..World::single()
        };
        assert_eq!(w.shard(8, "train.batch_size").expect("ok"), (4, 4));
        let e = w
            .shard(7, "train.batch_size")
            .expect_err("an error")
            .to_string();
        assert!(e.starts_with("train.batch_size: "), "{e}");
    }

    #[test]
    fn buckets_respect_the_cap_and_the_dtype() {
        let g = |n: i64, k: Kind| Tensor::zeros([n], (k, Device::Cpu));
        let grads = vec![
            g(10, Kind::Float),
            g(10, Kind::Float),
            g(30, Kind::Float),
            g(5, Kind::Double),
            g(5, Kind::Double),
        ];
        // 80 bytes fit two 10-element floats, not a third tensor of 30.
        assert_eq!(
            bucket_groups(&grads, 80, None),
            vec![vec![0, 1], vec![2], vec![3, 4]]
        );
        // With owners, no bucket holds two owners' gradients.
        assert_eq!(
            bucket_groups(&grads, 80, Some(&[0, 1, 1, 1, 1])),
            vec![vec![0], vec![1], vec![2], vec![3, 4]]
        );
        assert_eq!(
            bucket_groups(&grads, 1000, Some(&[0, 0, 0, 1, 1])),
            vec![vec![0, 1, 2], vec![3, 4]]
        );
    }

    /// `run.shard_layout = "flat"`: a trainable parameter without a gradient keeps its bucket
    /// from being sent, and the step stops naming it instead of giving its slices a zero
    /// gradient (which an unsharded run would not: AdamW skips a parameter without one).
    #[test]
    fn a_flat_bucket_with_a_parameter_without_gradient_stops_the_step_naming_it() {
        let mut store = crate::models::params::ParamStore::new(Device::Cpu);
        let used = store.add("used", Tensor::ones([3], (Kind::Float, Device::Cpu)));
        let _ = store.add("unused", Tensor::ones([2], (Kind::Float, Device::Cpu)));
        let dp = DataParallel::init(
            World::single(),
            Device::Cpu,
            Duration::from_secs(5),
            1 << 20,
        )
        .expect("one process");
        // One bucket holding both (reverse registration order), slices for 2 ranks.
        let scatter = ScatterInto {
            buckets: vec![vec![0, 1]],
            slices: vec![Tensor::zeros([3], (Kind::Float, Device::Cpu))],
            whole: None,
        };
        let overlap = OverlappedGrads::new(&dp, &store, None, Some(scatter)).expect("hooks");
        overlap
            .backward(&dp, || (&used * 2.0).sum(Kind::Float).f_backward())
            .expect("backward");
        let e = overlap
            .finish(&dp, &mut [])
            .expect_err("stopped")
            .to_string();
        assert!(
            e.contains("unused got no gradient") && e.contains("\"tensors\"") && !e.contains('\n'),
            "{e}"
        );
    }
}
