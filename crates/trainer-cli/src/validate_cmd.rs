//! `trainer validate RECIPE [--set K=V]...`: checks a recipe and prints its resolved form on
//! stdout (every stage's, for a `[[stages]]` recipe), without training.

use std::path::Path;
use std::process::ExitCode;
use trainer::config::{self, AnyRecipe};

pub fn run(path: &Path, set: &[String]) -> anyhow::Result<ExitCode> {
    let overrides = crate::parse_overrides(set)?;
    if let Some(stages) = trainer::config::stages::load(path, &overrides)? {
        for s in &stages {
            println!("# stage {:?}: steps {}..{}", s.name, s.start, s.end());
            print!("{}", config::to_toml(&s.recipe));
        }
        eprintln!(
            "{}: valid ({} stages, {} steps)",
            path.display(),
            stages.len(),
            stages.last().map_or(0, |s| s.end())
        );
        return Ok(ExitCode::SUCCESS);
    }
    match config::load_any(path, &overrides)? {
        AnyRecipe::Pretrain(recipe) => {
            print!("{}", config::to_toml(&recipe));
            eprintln!(
                "{}: valid ({} steps, {} tokens per step)",
                path.display(),
                recipe.max_steps(),
                recipe.tokens_per_step()
            );
        }
        AnyRecipe::Classify(recipe) => {
            print!("{}", config::to_toml(&recipe));
            eprintln!(
                "{}: valid ({}, {} images per step)",
                path.display(),
                recipe.describe_length(),
                recipe.train.batch_size
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
