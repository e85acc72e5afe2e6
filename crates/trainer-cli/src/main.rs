//! The `trainer` command line.
//!
//! Exit codes: 0 done; 1 an error (one line on stderr: `error: ...`); 2 bad command-line usage;
//! 75 stopped by SIGINT/SIGTERM/SIGUSR1 after writing a checkpoint (continue with
//! `--resume auto`); 130 a second SIGINT (immediate exit).

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::recipe::{self, Override};
use trainer::recipes::pretrain::{self, Outcome, Resume};
use trainer::signals::{StopFlag, EXIT_INTERRUPTED};

#[derive(Parser)]
#[command(name = "trainer", version, about = "Config-driven training on libtorch")]
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
    },
    /// Check a recipe and print its resolved form, without training.
    Validate {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Print what this binary sees: libtorch version, CUDA devices, threads.
    Info,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
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
    set.iter().map(|s| Override::parse(s).map_err(anyhow::Error::from)).collect()
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { recipe: path, set } => {
            let overrides = parse_overrides(&set)?;
            let recipe = recipe::load(&path, &overrides)?;
            print!("{}", recipe::to_toml(&recipe));
            eprintln!(
                "{}: valid ({} steps, {} tokens per step)",
                path.display(),
                recipe.max_steps(),
                recipe.tokens_per_step()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { recipe: path, set, resume } => {
            let overrides = parse_overrides(&set)?;
            let recipe = recipe::load(&path, &overrides)?;
            let resume = match resume.as_deref() {
                None => Resume::No,
                Some("auto") => Resume::Auto,
                Some(dir) => Resume::From(PathBuf::from(dir)),
            };
            let stop = StopFlag::install().context("installing signal handlers")?;
            match pretrain::run(&recipe, resume, &stop)? {
                Outcome::Finished(summary) => {
                    pretrain::print_summary(&summary);
                    eprintln!("  run directory     {}", recipe.run.out_dir.display());
                    Ok(ExitCode::SUCCESS)
                }
                Outcome::Interrupted { .. } => Ok(ExitCode::from(EXIT_INTERRUPTED as u8)),
                Outcome::AlreadyDone { step } => {
                    tracing::info!(
                        "{}: the run already reached step {step} of {}; nothing to do",
                        recipe.run.out_dir.display(),
                        recipe.max_steps()
                    );
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Command::Info => {
            println!("trainer {}", env!("CARGO_PKG_VERSION"));
            println!("cuda available: {}", tch::Cuda::is_available());
            println!("cuda devices: {}", tch::Cuda::device_count());
            println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
            println!("threads: {}", tch::get_num_threads());
            Ok(ExitCode::SUCCESS)
        }
    }
}
