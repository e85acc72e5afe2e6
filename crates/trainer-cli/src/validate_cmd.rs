//! `trainer validate RECIPE [--set K=V]...`: checks a recipe and prints its resolved form on
//! stdout (every stage's, for a `[[stages]]` recipe), without training.

use std::path::Path;
use std::process::ExitCode;
use trainer::recipe::{self, AnyRecipe};
use trainer::recipes::stages;

pub fn run(path: &Path, set: &[String]) -> anyhow::Result<ExitCode> {
    let overrides = crate::parse_overrides(set)?;
    if let Some(stages) = stages::load(path, &overrides)? {
        for s in &stages {
            println!("# stage {:?}: steps {}..{}", s.name, s.start, s.end());
            print!("{}", recipe::to_toml(&s.recipe));
        }
        eprintln!(
            "{}: valid ({} stages, {} steps)",
            path.display(),
            stages.len(),
            stages.last().map_or(0, |s| s.end())
        );
        return Ok(ExitCode::SUCCESS);
    }
    match recipe::load_any(path, &overrides)? {
        AnyRecipe::Pretrain(recipe) => {
            print!("{}", recipe::to_toml(&recipe));
            eprintln!(
                "{}: valid ({} steps, {} tokens per step)",
                path.display(),
                recipe.max_steps(),
                recipe.tokens_per_step()
            );
        }
        AnyRecipe::Classify(recipe) => {
            print!("{}", recipe::to_toml(&recipe));
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
