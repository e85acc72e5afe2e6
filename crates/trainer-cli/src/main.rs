//! The `trainer` command line.
//!
//! Exit codes: 0 done; 1 an error (one line on stderr: `error: ...`); 2 bad command-line usage;
//! 75 stopped by SIGINT/SIGTERM/SIGUSR1 after writing a checkpoint (continue with
//! `--resume auto`); 130 a second SIGINT (immediate exit).

mod keys_cmd;
mod launch_cmd;
mod prune_cmd;
mod report_cmd;
mod schedule_cmd;
mod slurm_cmd;
mod sweep_cmd;
mod sweep_slurm_cmd;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::data::tokenizer::Tokenizer;
use trainer::load::{self, ModelSource};
use trainer::config::{self, Override};
use trainer::train::evaluate;
use trainer::train::pretrain::{self, Outcome, Resume};
use trainer::signals::{StopFlag, EXIT_INTERRUPTED};

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
    /// Every recipe key with its type, default and meaning (docs/recipe-keys.md).
    Keys(keys_cmd::KeysArgs),
    /// Evaluate a model on a data file: prints loss, perplexity and tokens.
    Eval {
        /// hf:PATH, a checkpoint directory, or a run directory (its newest checkpoint).
        #[arg(long)]
        init: String,
        /// A token file (.bin: little-endian ids) or a UTF-8 text file (bytes as tokens).
        #[arg(long)]
        data: PathBuf,
        /// How to read --data; default: tokens for .bin files, text otherwise.
        #[arg(long, value_enum)]
        data_kind: Option<DataKind>,
        /// Width of the ids in a token file.
        #[arg(long, value_enum, default_value = "uint16")]
        dtype: DtypeArg,
        /// Tokenize a text file with this tokenizer.json (default: the one in the hf:
        /// directory, else bytes).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long)]
        seq_len: i64,
        /// Evaluate at most this many batches (default: the whole file).
        #[arg(long)]
        batches: Option<usize>,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long, default_value = "auto")]
        device: String,
        /// Print one JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Continue a prompt: byte-level models, or any model with a Hugging Face tokenizer.json
    /// (found beside an hf: checkpoint, or given with --tokenizer).
    Generate {
        #[arg(long)]
        init: String,
        #[arg(long)]
        prompt: String,
        /// A tokenizer.json (default: the one in the hf: directory, else bytes).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Print one JSON object (text and the generated token ids).
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 200)]
        max_new_tokens: usize,
        /// 0 for greedy decoding.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<i64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Export a run or checkpoint to another format (`hf`: config.json + safetensors; `peft`: a
    /// LoRA run's adapters as Hugging Face peft saves them).
    Export {
        /// A run directory (its newest checkpoint), a checkpoint directory, or hf:PATH.
        source: String,
        #[arg(long, value_enum)]
        to: ExportFormat,
        /// Output directory; must not exist or be empty.
        out: PathBuf,
        /// `--to hf` of a LoRA run: merge the adapters into the weights (without it, the base
        /// model is exported).
        #[arg(long)]
        merged: bool,
    },
    /// Show the learning rate over the whole run: a table at the phase boundaries and an ASCII
    /// plot on stdout; every step as CSV and a PNG plot on request.
    Schedule {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Write `step,lr` for every step of the run to this file.
        #[arg(long, value_name = "FILE")]
        csv: Option<PathBuf>,
        /// Write a plot of the learning rate to this PNG file.
        #[arg(long, value_name = "FILE")]
        png: Option<PathBuf>,
        /// The run's length in optimizer steps (default: the recipe's; needed when it gives
        /// epochs).
        #[arg(long, value_name = "N")]
        steps: Option<i64>,
    },
    /// Write an sbatch script that trains RECIPE on Slurm (one task per GPU, requeued after
    /// the pre-emption signal, resumed with --resume auto); --submit submits it.
    Slurm(slurm_cmd::SlurmArgs),
    /// Run every point of a sweep file (a grid or list of recipe overrides, times seeds), each
    /// in its own run directory, skipping finished ones; write results.csv and results.md.
    /// With --slurm, write (--submit: submit) a Slurm job array that does the same.
    Sweep(sweep_cmd::SweepArgs),
    /// Average the weights of runs fine-tuned from the same start (a model soup), evaluate it
    /// on the first run's validation data and write it as a run directory.
    Soup {
        /// Run or checkpoint directories (at least two).
        #[arg(required = true, num_args = 2..)]
        runs: Vec<String>,
        /// Greedy soup: add runs best first while the validation loss does not get worse
        /// (default: the uniform soup of all).
        #[arg(long)]
        greedy: bool,
        /// Output directory; must not exist or be empty.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
    },
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
    /// Print what this binary sees: libtorch version, CUDA devices, threads.
    Info,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DataKind {
    Text,
    Tokens,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DtypeArg {
    Uint16,
    Uint32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Hf,
    Peft,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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

/// The tokenizer for eval/generate: the one given, else a tokenizer.json beside an hf: model,
/// else bytes.
fn pick_tokenizer(
    given: Option<&std::path::Path>,
    source: &ModelSource,
) -> anyhow::Result<Tokenizer> {
    Ok(match (given, source) {
        (Some(path), _) => Tokenizer::from_file(path)?,
        (None, ModelSource::Hf(dir)) => Tokenizer::for_model_dir(Some(dir))?,
        (None, _) => Tokenizer::Bytes,
    })
}

fn parse_overrides(set: &[String]) -> anyhow::Result<Vec<Override>> {
    set.iter()
        .map(|s| Override::parse(s).map_err(anyhow::Error::from))
        .collect()
}

/// `trainer validate` of a `[[stages]]` recipe: every stage's resolved recipe.
fn validate_stages(
    path: &std::path::Path,
    stages: &[trainer::config::Stage],
) -> anyhow::Result<ExitCode> {
    for s in stages {
        println!("# stage {:?}: steps {}..{}", s.name, s.start, s.end());
        print!("{}", config::to_toml(&s.recipe));
    }
    eprintln!(
        "{}: valid ({} stages, {} steps)",
        path.display(),
        stages.len(),
        stages.last().map_or(0, |s| s.end())
    );
    Ok(ExitCode::SUCCESS)
}

/// `trainer run` of a `[[stages]]` recipe (`trainer::train::stages`).
fn run_stages(
    stages: &[trainer::config::Stage],
    resume: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let resume = match resume {
        None => Resume::No,
        Some("auto") => Resume::Auto,
        Some(dir) => Resume::From(PathBuf::from(dir)),
    };
    let stop = StopFlag::install().context("installing signal handlers")?;
    let run_dir = stages[0].recipe.run.out_dir.display().to_string();
    match trainer::train::stages::run(stages, resume, &stop)? {
        Outcome::Finished(summary) => {
            pretrain::print_summary(&summary);
            eprintln!("  run directory     {run_dir}");
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Interrupted { .. } => Ok(ExitCode::from(EXIT_INTERRUPTED as u8)),
        Outcome::AlreadyDone { step } => {
            tracing::info!("{run_dir}: the run already reached step {step}; nothing to do");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { recipe: path, set } => {
            let overrides = parse_overrides(&set)?;
            if let Some(stages) = trainer::config::stages::load(&path, &overrides)? {
                return validate_stages(&path, &stages);
            }
            let recipe = match config::load_any(&path, &overrides)? {
                config::AnyRecipe::Pretrain(r) => r,
                config::AnyRecipe::Classify(r) => return validate_classify(&path, &r),
            };
            print!("{}", config::to_toml(&recipe));
            eprintln!(
                "{}: valid ({} steps, {} tokens per step)",
                path.display(),
                recipe.max_steps(),
                recipe.tokens_per_step()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            recipe: path,
            set,
            resume,
        } => {
            let overrides = parse_overrides(&set)?;
            if let Some(stages) = trainer::config::stages::load(&path, &overrides)? {
                return run_stages(&stages, resume.as_deref());
            }
            let recipe = match config::load_any(&path, &overrides)? {
                config::AnyRecipe::Pretrain(r) => r,
                config::AnyRecipe::Classify(r) => return run_classify(&r, resume.as_deref()),
            };
            let resume = match resume.as_deref() {
                None => Resume::No,
                Some("auto") => Resume::Auto,
                Some(dir) => Resume::From(PathBuf::from(dir)),
            };
            let stop = StopFlag::install().context("installing signal handlers")?;
            match pretrain::run(&recipe, resume, &stop)? {
                Outcome::Finished(summary) => {
                    // Rank 0 speaks for a multi-process run.
                    if trainer::dist::World::from_env().is_ok_and(|w| w.is_main()) {
                        pretrain::print_summary(&summary);
                        eprintln!("  run directory     {}", recipe.run.out_dir.display());
                    }
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
        Command::Eval {
            init,
            data,
            data_kind,
            dtype,
            tokenizer,
            seq_len,
            batches,
            batch_size,
            device,
            json,
        } => {
            use trainer::config::{SourceConfig, TokenDtype};
            anyhow::ensure!(
                seq_len > 0,
                "--seq-len: expected a positive integer, got {seq_len}"
            );
            anyhow::ensure!(batch_size > 0, "--batch-size: expected a positive integer");
            let device = trainer::device::resolve(&device)?;
            let source = ModelSource::parse(&init)?;
            let loaded = load::load(&source, device)?;
            let kind = data_kind.unwrap_or(if data.extension().is_some_and(|e| e == "bin") {
                DataKind::Tokens
            } else {
                DataKind::Text
            });
            let cfg = match kind {
                DataKind::Text => SourceConfig::Text { path: data.clone() },
                DataKind::Tokens => SourceConfig::Tokens {
                    path: data.clone(),
                    dtype: match dtype {
                        DtypeArg::Uint16 => TokenDtype::Uint16,
                        DtypeArg::Uint32 => TokenDtype::Uint32,
                    },
                },
            };
            anyhow::ensure!(
                seq_len <= loaded.config.max_seq_len,
                "--seq-len {seq_len} exceeds the model's max_seq_len ({})",
                loaded.config.max_seq_len
            );
            let tokenizer = pick_tokenizer(tokenizer.as_deref(), &source)?;
            let tokens = match (&cfg, &tokenizer) {
                (SourceConfig::Text { path }, Tokenizer::Hf(_)) => {
                    trainer::data::source::open_tokenized(
                        path,
                        &tokenizer,
                        "--data",
                        loaded.config.vocab_size,
                    )?
                }
                _ => trainer::data::source::open(&cfg, "--data", loaded.config.vocab_size)?,
            };
            let span = trainer::data::source::Span::whole(tokens);
            let r = evaluate::eval_span(
                &loaded.model,
                &span,
                seq_len as usize,
                batch_size,
                batches,
                device,
            )?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens,
                        "windows": r.windows, "init": source.describe(), "data": data.display().to_string(),
                        "seq_len": seq_len,
                    })
                );
            } else {
                println!(
                    "{}: loss {:.4}, perplexity {:.3} over {} tokens ({} windows of {seq_len})",
                    data.display(),
                    r.loss,
                    r.perplexity,
                    r.tokens,
                    r.windows
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            init,
            prompt,
            tokenizer,
            json,
            max_new_tokens,
            temperature,
            top_k,
            seed,
            device,
        } => {
            let device = trainer::device::resolve(&device)?;
            let source = ModelSource::parse(&init)?;
            let loaded = load::load(&source, device)?;
            let tokenizer = pick_tokenizer(tokenizer.as_deref(), &source)?;
            anyhow::ensure!(
                matches!(tokenizer, Tokenizer::Hf(_)) || loaded.config.vocab_size >= 256,
                "generate: a byte-level prompt needs vocab_size >= 256, this model has {}; give its \
                 tokenizer.json with --tokenizer",
                loaded.config.vocab_size
            );
            anyhow::ensure!(!prompt.is_empty(), "--prompt: expected a non-empty prompt");
            if let Some(k) = top_k {
                anyhow::ensure!(k > 0, "--top-k: expected a positive integer, got {k}");
            }
            let ids = tokenizer.encode(&prompt, true)?;
            anyhow::ensure!(!ids.is_empty(), "--prompt: tokenizes to no tokens");
            let sampling = evaluate::Sampling {
                max_new_tokens,
                temperature,
                top_k,
                seed,
            };
            let out = evaluate::generate(&loaded.model, &ids, &sampling, device)?;
            let text = tokenizer.decode(&out)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "prompt": prompt, "prompt_ids": ids, "ids": out, "text": text,
                        "tokenizer": tokenizer.describe(),
                    })
                );
            } else {
                println!("{prompt}{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            source,
            to,
            out,
            merged,
        } => {
            use trainer::peft::lora;
            let source = ModelSource::parse(&source)?;
            let loaded = load::load(&source, tch::Device::Cpu)?;
            match to {
                ExportFormat::Hf => {
                    match (&loaded.lora, merged) {
                        (Some(_), true) => lora::merge(&loaded.model)?,
                        (None, true) => anyhow::bail!("--merged: {} has no LoRA adapters ([peft]) to merge", source.describe()),
                        (Some(_), false) => tracing::warn!("exporting the base model without the LoRA adapters (add --merged to merge them in, or export them with --to peft)"),
                        (None, false) => {}
                    }
                    trainer::models::hf::export(&loaded.config, &loaded.params, &out)?;
                    eprintln!(
                        "exported {} to {} (Hugging Face format{})",
                        source.describe(),
                        out.display(),
                        if merged { ", adapters merged" } else { "" }
                    );
                }
                ExportFormat::Peft => {
                    anyhow::ensure!(!merged, "--merged: only with --to hf");
                    let Some(adapters) = &loaded.lora else {
                        anyhow::bail!(
                            "--to peft: {} has no LoRA adapters ([peft] in its recipe)",
                            source.describe()
                        );
                    };
                    lora::export_peft(&loaded.model, adapters, None, &out)?;
                    eprintln!(
                        "exported the LoRA adapters of {} to {} (peft format)",
                        source.describe(),
                        out.display()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schedule {
            recipe: path,
            set,
            csv,
            png,
            steps,
        } => {
            let overrides = parse_overrides(&set)?;
            if let Some(stages) = trainer::config::stages::load(&path, &overrides)? {
                anyhow::ensure!(
                    steps.is_none(),
                    "--steps: a [[stages]] recipe is as long as its stages"
                );
                let peak = stages
                    .iter()
                    .map(|s| s.recipe.optim.lr())
                    .fold(0.0, f64::max);
                let s = trainer::config::stages::schedule(&stages);
                schedule_cmd::show(&s, peak, csv.as_deref(), png.as_deref())?;
                return Ok(ExitCode::SUCCESS);
            }
            let (schedule, lr, recipe_steps) = match config::load_any(&path, &overrides)? {
                config::AnyRecipe::Pretrain(r) => {
                    (r.schedule.clone(), r.optim.lr(), Some(r.max_steps()))
                }
                config::AnyRecipe::Classify(r) => (r.schedule, r.optim.lr(), r.train.max_steps),
            };
            let steps = schedule_cmd::run_length(&path, &schedule, lr, recipe_steps, steps)?;
            schedule_cmd::run(&schedule, lr, steps, csv.as_deref(), png.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Launch(args) => launch_cmd::run(&args, &cli.log_level),
        Command::Keys(args) => keys_cmd::run(&args),
        Command::Prune(args) => {
            prune_cmd::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Slurm(args) => {
            slurm_cmd::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sweep(args) => sweep_cmd::run(&args),
        Command::Soup {
            runs,
            greedy,
            out,
            device,
        } => {
            use trainer::train::soup;
            let method = if greedy {
                soup::Method::Greedy
            } else {
                soup::Method::Uniform
            };
            let r = soup::run(&runs, method, &out, &device)?;
            for i in &r.ingredients {
                println!(
                    "{} {:.6}  {}",
                    if i.in_soup { "+" } else { " " },
                    i.valid_loss,
                    i.source
                );
            }
            println!(
                "{} soup of {}: valid loss {:.6} (uniform soup {:.6}) -> {}",
                r.method,
                r.ingredients.iter().filter(|i| i.in_soup).count(),
                r.valid_loss,
                r.uniform_valid_loss,
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { runs, out, metrics } => {
            report_cmd::run(&runs, out.as_deref(), &metrics)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Info => {
            println!("trainer {}", env!("CARGO_PKG_VERSION"));
            println!("cuda available: {}", tch::Cuda::is_available());
            println!("cuda devices: {}", tch::Cuda::device_count());
            println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
            println!("threads: {}", tch::get_num_threads());
            // What multi-process training this build has (c10d backends compiled into the shim).
            println!("gloo (multi-process CPU): {}", torch_ext::have_gloo());
            println!("nccl (multi-GPU): {}", torch_ext::have_nccl());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `trainer validate` of a `task = "classify"` recipe.
fn validate_classify(
    path: &std::path::Path,
    recipe: &config::ClassifyRecipe,
) -> anyhow::Result<ExitCode> {
    print!("{}", config::to_toml(recipe));
    eprintln!(
        "{}: valid ({}, {} images per step)",
        path.display(),
        recipe.describe_length(),
        recipe.train.batch_size
    );
    Ok(ExitCode::SUCCESS)
}

/// `trainer run` of a `task = "classify"` recipe.
fn run_classify(recipe: &config::ClassifyRecipe, resume: Option<&str>) -> anyhow::Result<ExitCode> {
    use trainer::train::classify;
    let resume = match resume {
        None => Resume::No,
        Some("auto") => Resume::Auto,
        Some(dir) => Resume::From(PathBuf::from(dir)),
    };
    let stop = StopFlag::install().context("installing signal handlers")?;
    match classify::run(recipe, resume, &stop)? {
        classify::Outcome::Finished(summary) => {
            if trainer::dist::World::from_env().is_ok_and(|w| w.is_main()) {
                classify::print_summary(&summary);
                eprintln!("  run directory     {}", recipe.run.out_dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        classify::Outcome::Interrupted { .. } => Ok(ExitCode::from(EXIT_INTERRUPTED as u8)),
        classify::Outcome::AlreadyDone { step } => {
            tracing::info!(
                "{}: the run already reached step {step} ({}); nothing to do",
                recipe.run.out_dir.display(),
                recipe.describe_length()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
