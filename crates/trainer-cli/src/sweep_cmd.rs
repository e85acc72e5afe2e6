//! `trainer sweep SWEEP.toml [--parallel N]`: runs every (point, seed) of a sweep on this
//! machine as a child `trainer run ... --resume auto` (the same binary), at most N at a time,
//! skipping runs that already have a summary.json and resuming half-done ones, then writes the
//! results table (`trainer::sweep::results`).
//!
//! Each child's stdout and stderr go to `<run_dir>/sweep.log`. A run that fails is reported and
//! makes the sweep exit non-zero, but the others go on. SIGINT/SIGTERM/SIGUSR1 to the sweep stop
//! it from starting more runs and are passed on to the running ones (which checkpoint and exit
//! with 75); the sweep then writes the table of what finished and exits with 75 itself.
//!
//! For a scheduler's job array: `--index I` runs only the I-th run (0-based, in `--dry-run`'s
//! order) in this process's place (exec, so signals reach the trainer itself), and `--collect`
//! writes the results table from the runs that finished, starting nothing. `--slurm` writes (and
//! with `--submit` submits) that job array: `sweep_slurm_cmd.rs`.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use trainer::config::{self, Override};
use trainer::signals::{StopFlag, EXIT_INTERRUPTED};
use trainer::sweep::{results, RunStatus, Sweep, SweepRun};

#[derive(clap::Args)]
pub struct SweepArgs {
    /// The sweep file (`[sweep]` with base, seeds, grid and/or points).
    sweep: PathBuf,
    /// Runs at a time.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// List the runs (in order, with their state) without starting any.
    #[arg(long, conflicts_with_all = ["index", "collect"])]
    dry_run: bool,
    /// Run only the run with this 0-based index (e.g. $SLURM_ARRAY_TASK_ID), in the foreground.
    #[arg(long, value_name = "I", conflicts_with = "collect")]
    index: Option<usize>,
    /// With --index: passed on to `trainer run` (wait up to SECONDS for another run holding
    /// the run directory, as a requeued array task may start while the old one still writes).
    #[arg(long, value_name = "SECONDS", requires = "index")]
    wait_for_lock: Option<u64>,
    /// Write results.csv, results.md and runs.csv from the finished runs; start nothing.
    #[arg(long)]
    collect: bool,
    /// Write an sbatch script that runs the sweep as a Slurm job array instead: task I runs
    /// `--index I`, each run on one node (a run never spans nodes) with --gpus-per-node GPUs,
    /// requeued after the pre-emption signal; --submit submits it, and a job that runs
    /// --collect once the array has ended.
    #[arg(long, conflicts_with_all = ["dry_run", "index", "collect", "parallel"])]
    slurm: bool,
    /// GPUs of each array task (one node, one task per GPU); 0 for CPU-only nodes.
    #[arg(long, value_name = "G", requires = "slurm", help_heading = SLURM_HEADING)]
    gpus_per_node: Option<u32>,
    /// At most K array tasks at a time (`#SBATCH --array=0-N%K`).
    #[arg(long, value_name = "K", requires = "slurm", help_heading = SLURM_HEADING)]
    max_parallel: Option<u32>,
    /// The job options of `trainer slurm`, with the same meaning.
    #[command(flatten, next_help_heading = SLURM_HEADING)]
    job: crate::slurm_cmd::JobOptions,
}

const SLURM_HEADING: &str = "With --slurm (as for `trainer slurm`)";

pub fn run(args: &SweepArgs) -> anyhow::Result<ExitCode> {
    if args.slurm {
        crate::sweep_slurm_cmd::run(
            &args.sweep,
            args.gpus_per_node,
            args.max_parallel,
            &args.job,
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(flag) = args.job.first_given() {
        anyhow::bail!("{flag}: only with --slurm");
    }
    let parallel = args.parallel;
    anyhow::ensure!(
        parallel > 0,
        "--parallel: expected a positive integer, got {parallel}"
    );
    let sweep = Sweep::load(&args.sweep)?;
    sweep.validate()?;
    let runs = sweep.runs()?;
    if parallel > 1 && base_threads(&sweep)? == 0 {
        tracing::warn!(
            "--parallel {parallel} with run.threads = 0: every run uses all cores; give each \
             a share, e.g. set = [\"run.threads=1\"] in the sweep file"
        );
    }
    eprintln!(
        "sweep {}: {} points x {} seeds = {} runs in {}",
        sweep.name,
        sweep.points.len(),
        runs.len() / sweep.points.len().max(1),
        runs.len(),
        sweep.out_dir.display()
    );
    if args.dry_run {
        for r in &runs {
            println!("{:<9} {}", status_word(r.status()), r.run_dir.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(i) = args.index {
        let Some(r) = runs.get(i) else {
            anyhow::bail!(
                "--index {i}: the sweep has {} runs (0 to {})",
                runs.len(),
                runs.len().saturating_sub(1)
            );
        };
        return run_one(&sweep.base, r, args.wait_for_lock);
    }
    if args.collect {
        write_results(&sweep, &runs)?;
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe().context("finding the trainer binary")?;
    let stop = StopFlag::install().context("installing signal handlers")?;

    let mut pending: std::collections::VecDeque<&SweepRun> = Default::default();
    let mut skipped = 0;
    for r in &runs {
        if r.status() == RunStatus::Finished {
            skipped += 1;
        } else {
            pending.push_back(r);
        }
    }
    if skipped > 0 {
        eprintln!("  {skipped} runs already finished (summary.json present): skipped");
    }
    let mut running: Vec<(&SweepRun, Child, Instant)> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let mut interrupted = 0;
    let mut forwarded = false;
    loop {
        if stop.requested() && !forwarded {
            // Children in our process group already got a terminal's SIGINT; one that came
            // only to us (kill, Slurm) is passed on so that every run checkpoints.
            for (_, child, _) in &running {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
            if !pending.is_empty() {
                eprintln!(
                    "  stopping: {} runs not started; continue with the same command",
                    pending.len()
                );
            }
            pending.clear();
            forwarded = true;
        }
        while running.len() < parallel {
            let Some(r) = pending.pop_front() else { break };
            let how = match r.status() {
                RunStatus::Started => "resuming",
                _ => "new",
            };
            let child = spawn(&exe, &sweep.base, r)
                .with_context(|| format!("starting the run {}", r.run_dir.display()))?;
            eprintln!("  start  {} ({how})", r.run_dir.display());
            running.push((r, child, Instant::now()));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut i = 0;
        while i < running.len() {
            let done = running[i].1.try_wait().context("waiting for a run")?;
            let Some(status) = done else {
                i += 1;
                continue;
            };
            let (r, _, started) = running.swap_remove(i);
            let secs = started.elapsed().as_secs_f64();
            let log = r.run_dir.join("sweep.log");
            match status.code() {
                Some(0) if r.status() == RunStatus::Finished => {
                    eprintln!("  done   {} ({secs:.1}s)", r.run_dir.display())
                }
                Some(code) if code == EXIT_INTERRUPTED => {
                    interrupted += 1;
                    eprintln!(
                        "  stopped {} after a checkpoint (exit {code}); the next sweep resumes it",
                        r.run_dir.display()
                    );
                }
                other => {
                    let why = match other {
                        Some(0) => "finished without a summary.json".to_string(),
                        Some(c) => format!("exit code {c}"),
                        None => "killed by a signal".to_string(),
                    };
                    let last = last_error_line(&log);
                    eprintln!(
                        "  FAILED {} ({why}){}; log: {}",
                        r.run_dir.display(),
                        last.as_deref()
                            .map(|l| format!(": {l}"))
                            .unwrap_or_default(),
                        log.display()
                    );
                    failed.push(format!("{} ({why})", r.run_dir.display()));
                }
            }
        }
    }
    write_results(&sweep, &runs)?;
    if !failed.is_empty() {
        anyhow::bail!(
            "sweep {}: {} of {} runs failed: {}",
            sweep.name,
            failed.len(),
            runs.len(),
            failed.join(", ")
        );
    }
    if interrupted > 0 || stop.requested() {
        return Ok(ExitCode::from(EXIT_INTERRUPTED as u8));
    }
    Ok(ExitCode::SUCCESS)
}

fn write_results(sweep: &Sweep, runs: &[SweepRun]) -> anyhow::Result<()> {
    let written = results::write(sweep, runs)?;
    for p in &written {
        eprintln!("wrote {}", p.display());
    }
    if let Ok(md) = std::fs::read_to_string(sweep.out_dir.join("results.md")) {
        println!("{md}");
    }
    Ok(())
}

/// `--index`: a finished run is left alone; any other becomes this process (exec), so that a
/// scheduler's signals and exit code are the trainer's own.
fn run_one(base: &Path, r: &SweepRun, wait_for_lock: Option<u64>) -> anyhow::Result<ExitCode> {
    if r.status() == RunStatus::Finished {
        eprintln!(
            "{}: finished (summary.json present); nothing to do",
            r.run_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe().context("finding the trainer binary")?;
    let mut run_args = r.trainer_args(base);
    if let Some(s) = wait_for_lock {
        run_args.extend(["--wait-for-lock".to_string(), s.to_string()]);
    }
    eprintln!("{}: trainer {}", r.run_dir.display(), run_args.join(" "));
    use std::os::unix::process::CommandExt;
    let err = Command::new(exe).args(run_args).exec();
    Err(anyhow::anyhow!(
        "starting the run {}: {err}",
        r.run_dir.display()
    ))
}

/// `run.threads` of the base recipe with the sweep's shared overrides.
fn base_threads(sweep: &Sweep) -> anyhow::Result<u32> {
    let overrides = sweep
        .set
        .iter()
        .map(|s| Override::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match config::load_any(&sweep.base, &overrides)? {
        config::AnyRecipe::Pretrain(r) => r.run.threads,
        config::AnyRecipe::Classify(r) => r.run.threads,
    })
}

fn status_word(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Finished => "finished",
        RunStatus::Started => "started",
        RunStatus::New => "new",
    }
}

/// Starts `trainer run BASE --set ... --resume auto` with its output appended to
/// `<run_dir>/sweep.log`.
fn spawn(exe: &Path, base: &Path, r: &SweepRun) -> anyhow::Result<Child> {
    std::fs::create_dir_all(&r.run_dir)
        .with_context(|| format!("creating {}", r.run_dir.display()))?;
    let log_path = r.run_dir.join("sweep.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let err = log.try_clone().context("duplicating the log file")?;
    Ok(Command::new(exe)
        .args(r.trainer_args(base))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()?)
}

/// The last `error: ...` line of a run's log, for the failure report.
fn last_error_line(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .map(str::to_string)
}
