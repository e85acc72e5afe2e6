//! `trainer launch --nproc N [--master-port P] RECIPE [run args]`: torchrun's single-node job in
//! one command. Starts N `trainer run` processes with torchrun's variables (RANK, LOCAL_RANK,
//! WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), forwards SIGINT/SIGTERM/SIGUSR1 to
//! all of them, stops the others when one fails, and exits with the worst exit code: a failing
//! rank's code, else 75 (stopped with a checkpoint) if any rank stopped, else 0.

use anyhow::Context;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};
use trainer::signals::EXIT_INTERRUPTED;

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// Processes to start on this machine (one per GPU on CUDA).
    #[arg(long)]
    nproc: usize,
    /// Port of the rendezvous store that rank 0 hosts on 127.0.0.1 (default: a free port).
    #[arg(long)]
    master_port: Option<u16>,
    recipe: PathBuf,
    /// Passed on to `trainer run` (e.g. --set train.max_steps=100 --resume auto).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    run_args: Vec<String>,
}

/// How long the other ranks get to exit on their own after one failed, before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

/// `log_level`: the launcher's own `--log-level`, passed on to every rank.
pub fn run(args: &LaunchArgs, log_level: &str) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.nproc >= 1,
        "--nproc: expected at least 1 process, got 0"
    );
    let port = match args.master_port {
        Some(p) => {
            anyhow::ensure!(p > 0, "--master-port: expected a TCP port 1..65535, got 0");
            // Rank 0 would fail on it too, but later and in every rank's output.
            if std::net::TcpListener::bind(("0.0.0.0", p)).is_err() {
                anyhow::bail!(
                    "--master-port: port {p} is already in use on this machine: choose another, or leave --master-port out to pick a free one"
                );
            }
            p
        }
        None => free_port()?,
    };
    check_batch(args)?;
    let exe = std::env::current_exe().context("finding the trainer binary")?;
    // The ranks run this very binary: /proc/self/exe still reaches it if the file has been
    // replaced meanwhile (a rebuild), where its path would name the new one or nothing.
    let program = match std::path::Path::new("/proc/self/exe") {
        p if p.exists() => p.to_path_buf(),
        _ => exe.clone(),
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGUSR1,
    ])
    .context("installing signal handlers")?;

    let mut children: Vec<Child> = Vec::with_capacity(args.nproc);
    for rank in 0..args.nproc {
        let mut cmd = Command::new(&program);
        cmd.arg0(&exe)
            .arg("--log-level")
            .arg(log_level)
            .arg("run")
            .arg(&args.recipe)
            .args(&args.run_args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", args.nproc.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            // Its own process group: a Ctrl-C on the terminal reaches the launcher alone, which
            // forwards it once (a second SIGINT would make a rank exit without its checkpoint).
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                // A rank does not outlive a launcher that was killed.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                for c in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        }
    }

    let pids: Vec<libc::pid_t> = children.iter().map(|c| c.id() as libc::pid_t).collect();
    // Sends `sig` to every rank that has not exited (and been reaped) yet.
    let signal_running = |codes: &[Option<i32>], sig: i32| {
        for (pid, code) in pids.iter().zip(codes) {
            if code.is_none() {
                // SAFETY: plain syscall on a child we started and have not reaped, so the pid
                // cannot have been reused.
                unsafe { libc::kill(*pid, sig) };
            }
        }
    };
    let mut codes: Vec<Option<i32>> = vec![None; args.nproc];
    let mut first_failure: Option<(usize, i32)> = None;
    let mut kill_at: Option<Instant> = None;
    loop {
        for sig in signals.pending() {
            signal_running(&codes, sig);
        }
        for (rank, child) in children.iter_mut().enumerate() {
            if codes[rank].is_some() {
                continue;
            }
            if let Some(status) = child.try_wait().context("waiting for a rank")? {
                let code = status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                codes[rank] = Some(code);
                if code != 0 && code != EXIT_INTERRUPTED && first_failure.is_none() {
                    first_failure = Some((rank, code));
                    if codes.iter().any(Option::is_none) {
                        eprintln!(
                            "launch: rank {rank} exited with code {code}; stopping the other ranks"
                        );
                        signal_running(&codes, libc::SIGTERM);
                        kill_at = Some(Instant::now() + GRACE);
                    }
                }
            }
        }
        if codes.iter().all(Option::is_some) {
            break;
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            for (rank, child) in children.iter_mut().enumerate() {
                if codes[rank].is_none() {
                    let _ = child.kill();
                }
            }
            kill_at = None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let worst = match first_failure {
        Some((_, code)) => code,
        None if codes.contains(&Some(EXIT_INTERRUPTED)) => EXIT_INTERRUPTED,
        None => 0,
    };
    Ok(ExitCode::from(worst.clamp(0, 255) as u8))
}

/// Refuses a global batch that the processes cannot share evenly, once, before any rank starts
/// (each rank would refuse it too). A recipe that does not load is left to the ranks to report.
fn check_batch(args: &LaunchArgs) -> anyhow::Result<()> {
    let mut sets = Vec::new();
    let mut it = args.run_args.iter();
    while let Some(a) = it.next() {
        if a == "--set" {
            sets.extend(it.next().cloned());
        } else if let Some(v) = a.strip_prefix("--set=") {
            sets.push(v.to_string());
        }
    }
    let Ok(overrides) = sets
        .iter()
        .map(|s| trainer::config::Override::parse(s))
        .collect::<Result<Vec<_>, _>>()
    else {
        return Ok(());
    };
    let batch = match trainer::config::load_any(&args.recipe, &overrides) {
        Ok(trainer::config::AnyRecipe::Pretrain(r)) => r.train.batch_size as usize,
        Ok(trainer::config::AnyRecipe::Classify(r)) => r.train.batch_size as usize,
        Err(_) => return Ok(()),
    };
    let world = trainer::dist::World {
        size: args.nproc,
        ..trainer::dist::World::single()
    };
    world.shard(batch, "train.batch_size")?;
    Ok(())
}

/// A port that is free now (the OS picks it); rank 0 binds it a moment later.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("finding a free port for the rendezvous")?;
    Ok(listener.local_addr()?.port())
}
