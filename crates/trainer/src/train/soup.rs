//! Model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned
//! models improves accuracy without increasing inference time", arXiv:2203.05482; reference
//! implementation github.com/mlfoundations/model-soups): the weights of runs fine-tuned from the
//! same start, averaged.
//!
//! - Uniform soup: the mean of every ingredient's weights.
//! - Greedy soup: ingredients sorted by validation loss, best first; each is added when the soup
//!   with it has a validation loss no worse than without it (the paper's rule with loss for
//!   accuracy). The soup starts as the best ingredient, so it is never worse than that one on
//!   the validation data it was picked on.
//!
//! Every ingredient must have the first run's architecture (`[model]`, `[peft]`) and the same
//! parameter names and shapes. Validation is the first run's: its recipe's validation sets and
//! `train.eval_batches`, computed exactly as the training loop computes `final_valid_loss`
//! (`pretrain::evaluate`); the soup is picked on the first set. Means are taken in fp32 (in the
//! parameters' own dtype when that is wider) and stored in the parameters' dtype.
//!
//! The soup is written like a run: `config.toml` (the first run's recipe, `run.out_dir` the
//! soup's directory), `checkpoints/step-N/{model.safetensors, state.json}` (N: the first run's
//! step; no optimizer state) and `soup.json`, so `trainer eval --init`, `trainer export`,
//! `trainer generate` and `[init] from` read it as they read a run.

use super::pretrain;
use crate::checkpoint::{self, TrainState};
use crate::config::{self, ModelConfig, PeftConfig, Recipe};
use crate::device;
use crate::error::{io_err, Error, Result};
use crate::load::{self, ModelSource};
use crate::models::params::read_safetensors;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Uniform,
    Greedy,
}

/// What `soup.json` records.
#[derive(Debug, Clone, Serialize)]
pub struct SoupReport {
    pub method: String,
    /// Validation loss of the written soup on the first validation set.
    pub valid_loss: f64,
    /// ... and on every validation set of the first run's recipe.
    pub valid_losses: BTreeMap<String, f64>,
    pub uniform_valid_loss: f64,
    pub greedy_valid_loss: Option<f64>,
    /// Ingredients in the order given.
    pub ingredients: Vec<IngredientReport>,
    pub out_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct IngredientReport {
    pub source: String,
    pub valid_loss: f64,
    pub in_soup: bool,
}

struct Ingredient {
    source: ModelSource,
    tensors: BTreeMap<String, Tensor>,
}

/// Makes the soup of `runs` (run or checkpoint directories), evaluates it and writes it to
/// `out` (which must not exist, or be empty).
pub fn run(runs: &[String], method: Method, out: &Path, device_name: &str) -> Result<SoupReport> {
    check_args(runs, out)?;
    let device = device::resolve(device_name)?;
    let sources: Vec<ModelSource> = runs
        .iter()
        .map(|r| ModelSource::parse(r))
        .collect::<Result<_>>()?;
    let ModelSource::Checkpoint {
        dir: first_dir,
        run_dir: first_run,
    } = &sources[0]
    else {
        return Err(bad(format!(
            "{}: expected a trainer run or checkpoint (its recipe gives the validation data)",
            runs[0]
        )));
    };
    let recipe = first_recipe(first_run)?;
    let architecture = sources[0].architecture()?;
    warn_on_different_starts(&sources);

    // The soup lives in the parameters of one loaded model.
    let loaded = load::load(&sources[0], device)?;
    let shapes: BTreeMap<String, Vec<i64>> = loaded
        .params
        .iter()
        .map(|p| (p.name.clone(), p.tensor.size()))
        .collect();
    let mut ingredients = Vec::new();
    for (text, source) in runs.iter().zip(&sources) {
        ingredients.push(read_ingredient(
            text,
            source,
            &runs[0],
            &architecture,
            &shapes,
        )?);
    }

    // Validation: the first run's sets, as its training loop evaluated them.
    let vocab = recipe.model.vocab_size();
    let (_, valid_sets) = pretrain::open_data(&recipe, vocab, recipe.data.seq_len as usize + 1)?;
    let eval = |members: &[usize]| -> Result<Vec<(String, f64)>> {
        set_mean(&loaded.params, &ingredients, members)?;
        valid_sets
            .iter()
            .map(|(name, span)| {
                let l =
                    pretrain::evaluate(&loaded.model, span, &recipe, device, recipe.run.precision)?;
                Ok((name.clone(), l))
            })
            .collect()
    };

    let mut own: Vec<f64> = Vec::new();
    for (i, ing) in ingredients.iter().enumerate() {
        let l = first_loss(&eval(&[i])?);
        tracing::info!("ingredient {}: valid loss {l:.4}", ing.source.describe());
        own.push(l);
    }
    let all: Vec<usize> = (0..ingredients.len()).collect();
    let uniform_losses = eval(&all)?;
    let uniform = first_loss(&uniform_losses);
    tracing::info!("uniform soup of {}: valid loss {uniform:.4}", all.len());

    let (members, losses, greedy) = match method {
        Method::Uniform => (all, uniform_losses, None),
        Method::Greedy => {
            let members = greedy_members(&own, &ingredients, &eval)?;
            let losses = eval(&members)?;
            let l = first_loss(&losses);
            (members, losses, Some(l))
        }
    };
    let report = SoupReport {
        method: match method {
            Method::Uniform => "uniform",
            Method::Greedy => "greedy",
        }
        .into(),
        valid_loss: first_loss(&losses),
        valid_losses: losses.into_iter().collect(),
        uniform_valid_loss: uniform,
        greedy_valid_loss: greedy,
        ingredients: ingredients
            .iter()
            .enumerate()
            .map(|(i, ing)| IngredientReport {
                source: ing.source.describe(),
                valid_loss: own[i],
                in_soup: members.contains(&i),
            })
            .collect(),
        out_dir: out.to_path_buf(),
    };
    // The parameters hold the chosen soup (the last evaluation).
    let step = checkpoint::read_state(first_dir)?.step;
    write_soup(out, &recipe, &loaded.params, step, &report)?;
    Ok(report)
}

/// A soup's error.
fn bad(msg: String) -> Error {
    Error::Recipe(format!("soup: {msg}"))
}

/// The loss on the first validation set (the one the soup is picked on).
fn first_loss(losses: &[(String, f64)]) -> f64 {
    losses.first().map(|(_, l)| *l).unwrap_or(f64::NAN)
}

/// At least two runs, and an output directory that does not exist or is empty.
fn check_args(runs: &[String], out: &Path) -> Result<()> {
    if runs.len() < 2 {
        return Err(bad(format!(
            "expected at least two runs to average, got {}",
            runs.len()
        )));
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(bad(format!(
            "--out {}: exists and is not empty; choose a new directory",
            out.display()
        )));
    }
    Ok(())
}

/// Reads the weights of the run or checkpoint `source` (given as `text`), checked against the
/// first run's (`first`) architecture and parameter shapes.
fn read_ingredient(
    text: &str,
    source: &ModelSource,
    first: &str,
    (model_cfg, peft): &(ModelConfig, Option<PeftConfig>),
    shapes: &BTreeMap<String, Vec<i64>>,
) -> Result<Ingredient> {
    let ModelSource::Checkpoint { dir, .. } = source else {
        return Err(bad(format!("{text}: expected a trainer run or checkpoint")));
    };
    let (their_model, their_peft) = source.architecture()?;
    if &their_model != model_cfg {
        return Err(bad(format!(
            "{text}: its [model] differs from {first}'s; a soup needs one architecture"
        )));
    }
    if &their_peft != peft {
        return Err(bad(format!(
            "{text}: its [peft] differs from {first}'s; a soup needs one architecture"
        )));
    }
    let path = dir.join(checkpoint::MODEL_FILE);
    let tensors: BTreeMap<String, Tensor> = read_safetensors(&path)?.into_iter().collect();
    for (name, shape) in shapes {
        match tensors.get(name) {
            None => return Err(bad(format!("{text}: has no parameter {name}"))),
            Some(t) if &t.size() != shape => {
                return Err(bad(format!(
                    "{text}: parameter {name} has shape {:?}, {first}'s has {shape:?}",
                    t.size()
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = tensors.keys().find(|k| !shapes.contains_key(*k)) {
        return Err(bad(format!(
            "{text}: has a parameter {extra} that {first} does not have"
        )));
    }
    Ok(Ingredient {
        source: source.clone(),
        tensors,
    })
}

/// The greedy soup's members: ingredients best first (`own`: each one's validation loss), each
/// added when the soup with it evaluates no worse than without it.
fn greedy_members(
    own: &[f64],
    ingredients: &[Ingredient],
    eval: &dyn Fn(&[usize]) -> Result<Vec<(String, f64)>>,
) -> Result<Vec<usize>> {
    let mut order: Vec<usize> = (0..own.len()).collect();
    order.sort_by(|&a, &b| own[a].total_cmp(&own[b]));
    let mut members = vec![order[0]];
    let mut best = own[order[0]];
    for &j in &order[1..] {
        let mut with = members.clone();
        with.push(j);
        let l = first_loss(&eval(&with)?);
        let keep = l <= best;
        tracing::info!(
            "greedy soup: with {} valid loss {l:.4} ({})",
            ingredients[j].source.describe(),
            if keep { "added" } else { "left out" }
        );
        if keep {
            members = with;
            best = l;
        }
    }
    Ok(members)
}

/// The first run's recipe from its `config.toml`: the soup's validation data.
fn first_recipe(run_dir: &Path) -> Result<Recipe> {
    let path = run_dir.join("config.toml");
    match config::load_any(&path, &[])? {
        config::AnyRecipe::Pretrain(r) => Ok(r),
        config::AnyRecipe::Classify(_) => Err(Error::Recipe(format!(
            "soup: {}: a classification run; soups are made of language-model runs",
            run_dir.display()
        ))),
    }
}

/// Runs fine-tuned from different starts average into nonsense: warn (the `init_from` of their
/// summaries) but go on, since a copied or moved start has another name.
fn warn_on_different_starts(sources: &[ModelSource]) {
    let init_of = |s: &ModelSource| -> Option<String> {
        let ModelSource::Checkpoint { run_dir, .. } = s else {
            return None;
        };
        let text = std::fs::read_to_string(run_dir.join("summary.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get("init_from")?.as_str().map(str::to_string)
    };
    let starts: Vec<Option<String>> = sources.iter().map(init_of).collect();
    if starts.windows(2).any(|w| w[0] != w[1]) {
        tracing::warn!(
            "the runs start from different [init] from ({starts:?}); a soup averages runs \
             fine-tuned from one start"
        );
    }
}

/// Sets every parameter to the mean of `members`' tensors.
fn set_mean(
    params: &crate::models::params::ParamStore,
    ingredients: &[Ingredient],
    members: &[usize],
) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for p in params.iter() {
            let kind = p.tensor.kind();
            let acc_kind = if kind == Kind::Double {
                Kind::Double
            } else {
                Kind::Float
            };
            let mut sum: Option<Tensor> = None;
            for &i in members {
                let t = ingredients[i].tensors[&p.name].to_kind(acc_kind);
                sum = Some(match sum {
                    None => t,
                    Some(s) => s + t,
                });
            }
            let mean = sum.expect("a soup has members") / members.len() as f64;
            p.tensor
                .shallow_clone()
                .f_copy_(&mean.to_kind(kind).to_device(params.device()))
                .map_err(|e| Error::Torch(e.to_string()))?;
        }
        Ok(())
    })
}

/// Writes the soup as a run directory, through a temporary directory renamed into place.
fn write_soup(
    out: &Path,
    recipe: &Recipe,
    params: &crate::models::params::ParamStore,
    step: i64,
    report: &SoupReport,
) -> Result<()> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "soup".into());
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let ckpt = checkpoint::step_dir(&tmp, step);
    std::fs::create_dir_all(&ckpt).map_err(io_err(format!("creating {}", ckpt.display())))?;
    params.save(&ckpt.join(checkpoint::MODEL_FILE))?;
    let state = TrainState {
        format: 1,
        step,
        tokens: 0,
        seed: recipe.run.seed,
        train_seconds: 0.0,
        last_valid_loss: Some(report.valid_loss),
    };
    let write = |path: PathBuf, text: String| {
        std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
    };
    write(
        ckpt.join(checkpoint::STATE_FILE),
        serde_json::to_string_pretty(&state).unwrap_or_default(),
    )?;
    checkpoint::write_checksums(&ckpt)?;
    let mut r = recipe.clone();
    r.run.out_dir = out.to_path_buf();
    r.run.name = name;
    write(tmp.join("config.toml"), config::to_toml(&r))?;
    write(
        tmp.join("soup.json"),
        serde_json::to_string_pretty(report).unwrap_or_default() + "\n",
    )?;
    if out.exists() {
        // Checked empty above.
        std::fs::remove_dir(out).map_err(io_err(format!("replacing {}", out.display())))?;
    }
    std::fs::rename(&tmp, out).map_err(io_err(format!("renaming {}", tmp.display())))
}
