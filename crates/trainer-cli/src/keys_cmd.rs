//! `trainer keys [--task pretrain|classify] [--format text|markdown]`: every recipe key with its
//! type, default and meaning, generated from the config types (`trainer::config::keys`).
//! docs/recipe-keys.md is `trainer keys --format markdown` (a test keeps it current).

use clap::{Args, ValueEnum};
use std::process::ExitCode;
use trainer::config::keys;
use trainer::config::Task;

#[derive(Args)]
pub struct KeysArgs {
    /// Only this task's recipe keys; default: both.
    #[arg(long, value_enum)]
    task: Option<TaskArg>,
    /// `text` for a terminal, `markdown` for docs/recipe-keys.md.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum TaskArg {
    /// Language-model recipes.
    Pretrain,
    /// Image-classification recipes (`[run] task = "classify"`).
    Classify,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Markdown,
}

pub fn run(args: &KeysArgs) -> anyhow::Result<ExitCode> {
    let tasks = match args.task {
        Some(TaskArg::Pretrain) => vec![Task::Pretrain],
        Some(TaskArg::Classify) => vec![Task::Classify],
        None => vec![Task::Pretrain, Task::Classify],
    };
    let refs: Vec<keys::Reference> = tasks.into_iter().map(keys::reference).collect();
    let text = match args.format {
        Format::Text => keys::render_text(&refs),
        Format::Markdown => keys::render_markdown(&refs),
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}
