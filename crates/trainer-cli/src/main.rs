//! The `trainer` command line: the clap definitions and the dispatch; each subcommand is a thin
//! file over the library (`run_cmd.rs`, `eval_cmd.rs`, ...).
//!
//! Exit codes: 0 done; 1 an error (one line on stderr: `error: ...`); 2 bad command-line usage;
//! 75 stopped by SIGINT/SIGTERM/SIGUSR1 after writing a checkpoint (continue with
//! `--resume auto`); 130 a second SIGINT (immediate exit).

mod eval_cmd;
mod export_cmd;
mod generate_cmd;
mod keys_cmd;
mod launch_cmd;
mod prune_cmd;
mod report_cmd;
mod run_cmd;
mod schedule_cmd;
mod slurm_cmd;
mod soup_cmd;
mod sweep_cmd;
mod sweep_slurm_cmd;
mod tokenize_cmd;
mod validate_cmd;
mod verify_cmd;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::config::Override;

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "Config-driven training on libtorch"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train from a recipe.
    Run {
        recipe: PathBuf,
        /// Override a recipe key, e.g. --set train.max_steps=100 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// `auto`: continue from the newest complete checkpoint of the run directory;
        /// or a checkpoint directory to continue from.
        #[arg(long)]
        resume: Option<String>,
        /// While another run holds the run directory's lock, wait up to SECONDS for it to end
        /// (a Slurm requeue that starts while the old job is still writing its checkpoint)
        /// instead of failing at once.
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        wait_for_lock: u64,
    },
    /// Train with N local processes (data parallel, torchrun's conventions): `trainer launch
    /// --nproc 2 RECIPE [run args]`.
    Launch(launch_cmd::LaunchArgs),
    /// One-shot pruning (magnitude or Wanda) of a saved model into a new directory; prints the
    /// sparsity table.
    Prune(prune_cmd::PruneArgs),
    /// Check a recipe and print its resolved form, without training.
    Validate {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Evaluate a model on a data file: prints loss, perplexity and tokens.
    Eval(eval_cmd::EvalArgs),
    /// Continue a prompt: byte-level models, or any model with a Hugging Face tokenizer.json
    /// (found beside an hf: checkpoint, or given with --tokenizer).
    Generate(generate_cmd::GenerateArgs),
    /// Export a run or checkpoint to another format (`hf`: config.json + safetensors; `peft`: a
    /// LoRA run's adapters as Hugging Face peft saves them).
    Export(export_cmd::ExportArgs),
    /// Show the learning rate over the whole run: a table at the phase boundaries and an ASCII
    /// plot on stdout; every step as CSV and a PNG plot on request.
    Schedule(schedule_cmd::ScheduleArgs),
    /// Write an sbatch script that trains RECIPE on Slurm (one task per GPU, requeued after
    /// the pre-emption signal, resumed with --resume auto); --submit submits it.
    Slurm(slurm_cmd::SlurmArgs),
    /// Run every point of a sweep file (a grid or list of recipe overrides, times seeds), each
    /// in its own run directory, skipping finished ones; write results.csv and results.md.
    /// With --slurm, write (--submit: submit) a Slurm job array that does the same.
    Sweep(sweep_cmd::SweepArgs),
    /// Average the weights of runs fine-tuned from the same start (a model soup), evaluate it
    /// on the first run's validation data and write it as a run directory.
    Soup(soup_cmd::SoupArgs),
    /// Draw the curves of one or several runs (metrics.jsonl) to a PNG or SVG file.
    Report {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// .png or .svg (default: report.png in the first run directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Metrics to draw, one panel each (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "loss,lr")]
        metrics: Vec<String>,
    },
    /// Every recipe key with its type, default and meaning (docs/recipe-keys.md).
    Keys(keys_cmd::KeysArgs),
    /// Check a run's checkpoints (or one checkpoint) against their SHA-256 checksums, without
    /// training; exit 1 if any is corrupt.
    Verify {
        /// A run directory (every complete checkpoint) or a checkpoint directory.
        target: std::path::PathBuf,
    },
    /// Tokenize text, JSONL or Parquet files (or directories of them) into a token file, its document
    /// index and a summary, for `{ kind = "tokens", path }` sources.
    Tokenize(tokenize_cmd::TokenizeArgs),
    /// Print what this binary sees: libtorch version, CUDA devices, threads.
    Info,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // The ranks other than 0 of a multi-process run keep to warnings and errors.
    let other_rank = ["RANK", "SLURM_PROCID"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .is_some_and(|r| r.trim() != "0");
    let level = if other_rank && cli.log_level == "info" {
        "warn"
    } else {
        &cli.log_level
    };
    init_logging(level);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of contexts, outermost first. A cause that its context
            // already ends with (thiserror's `{source}` in the message) is not repeated.
            let mut msg = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if msg.ends_with(&cause) {
                    continue;
                }
                if !msg.is_empty() {
                    msg.push_str(": ");
                }
                msg.push_str(&cause);
            }
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// Argument errors follow the convention of every other error: one line, `error: ...`, exit
/// code 1 (clap's multi-line usage text and exit code 2 would be a second convention). Help and
/// version requests print as clap prints them.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.use_stderr() {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        };
    }
    // clap's message up to its usage text, on one line.
    let text = e.to_string();
    let msg: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(|l| l.trim().trim_start_matches("error: "))
        .filter(|l| !l.is_empty())
        .collect();
    eprintln!("error: {} (see --help)", msg.join(" "));
    ExitCode::from(1)
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn parse_overrides(set: &[String]) -> anyhow::Result<Vec<Override>> {
    set.iter()
        .map(|s| Override::parse(s).map_err(anyhow::Error::from))
        .collect()
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            recipe,
            set,
            resume,
            wait_for_lock,
        } => run_cmd::run(&recipe, &set, resume.as_deref(), wait_for_lock),
        Command::Validate { recipe, set } => validate_cmd::run(&recipe, &set),
        Command::Eval(args) => eval_cmd::run(&args),
        Command::Generate(args) => generate_cmd::run(&args),
        Command::Export(args) => export_cmd::run(&args),
        Command::Schedule(args) => schedule_cmd::run(&args),
        Command::Launch(args) => launch_cmd::run(&args, &cli.log_level),
        Command::Prune(args) => {
            prune_cmd::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Slurm(args) => {
            slurm_cmd::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sweep(args) => sweep_cmd::run(&args),
        Command::Soup(args) => soup_cmd::run(&args),
        Command::Report { runs, out, metrics } => {
            report_cmd::run(&runs, out.as_deref(), &metrics)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(args) => keys_cmd::run(&args),
        Command::Verify { target } => verify_cmd::run(&target),
        Command::Tokenize(args) => tokenize_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Command::Info => {
            info();
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `trainer info`: what this binary sees.
fn info() {
    println!("trainer {}", env!("CARGO_PKG_VERSION"));
    println!("cuda available: {}", tch::Cuda::is_available());
    println!("cuda devices: {}", tch::Cuda::device_count());
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    println!("threads: {}", tch::get_num_threads());
    // What multi-process training this build has (c10d backends compiled into the shim).
    println!("gloo (multi-process CPU): {}", torch_ext::have_gloo());
    println!("nccl (multi-GPU): {}", torch_ext::have_nccl());
}
