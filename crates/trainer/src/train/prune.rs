//! `trainer prune`: one-shot pruning of a saved model into a new, pruned one.
//!
//! The input is a trainer checkpoint or run directory (language model or ResNet classifier) or
//! `hf:PATH`; the output directory must be new. A trainer source gives a run-like directory
//! (`config.toml` copied from the source run, `checkpoints/step-N/` with the pruned weights and
//! `masks.safetensors`), which `trainer eval --init OUT` reads and `[init] from` fine-tunes with
//! the zeros kept; an `hf:` source gives a Hugging Face directory plus `masks.safetensors`. Both
//! hold `pruning.json`: the method and the per-layer sparsity table.

use crate::checkpoint;
use crate::config::{self, AnyRecipe, SourceConfig};
use crate::data::source;
use crate::error::{io_err, Error, Result};
use crate::load::{self, ModelSource};
use crate::models::params::{select_prunable, ParamStore};
use crate::prune::structured::{self, Shape};
use crate::prune::wanda::{self, Sparsity};
use crate::prune::{magnitude, PruneScope, SparsityReport};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Magnitude,
    Wanda,
}

#[derive(Debug, Clone)]
pub struct OneShot {
    pub method: Method,
    pub sparsity: Sparsity,
    /// Magnitude only: one ranking over all prunable weights, or per tensor.
    pub scope: PruneScope,
    /// Name patterns; empty: the defaults (linear and convolution weights).
    pub prunable: Vec<String>,
    /// Wanda's calibration tokens; None: the built-in corpus.
    pub calib: Option<SourceConfig>,
    pub calib_batches: usize,
    /// Calibration window length; None: the model's max_seq_len.
    pub seq_len: Option<usize>,
    pub batch_size: usize,
}

#[derive(Debug, Serialize)]
pub struct Pruned {
    pub source: String,
    pub method: Method,
    pub sparsity: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_m: Option<String>,
    /// Where to point `trainer eval --init` or `[init] from`.
    pub model: PathBuf,
    pub report: SparsityReport,
}

/// Prunes the model at `init` (see the module docs) into `out`.
pub fn run(init: &str, opts: &OneShot, out: &Path, device: Device) -> Result<Pruned> {
    check_new_dir(out)?;
    if let Sparsity::Unstructured(s) = opts.sparsity {
        if !(s > 0.0 && s < 1.0) {
            return Err(Error::Recipe(format!(
                "--sparsity: expected a fraction in (0, 1), got {s}"
            )));
        }
    }
    if opts.method == Method::Magnitude && matches!(opts.sparsity, Sparsity::NM { .. }) {
        return Err(Error::Recipe(
            "--nm: N:M sparsity is for --method wanda".into(),
        ));
    }
    let source = ModelSource::parse(init)?;
    let (params, names) = match classifier_recipe(&source)? {
        Some(r) => {
            if opts.method == Method::Wanda {
                return Err(Error::Recipe(
                    "--method: wanda prunes transformers; use magnitude for a ResNet classifier"
                        .into(),
                ));
            }
            let ModelSource::Checkpoint { dir, .. } = &source else {
                unreachable!()
            };
            let mut params = ParamStore::new(device);
            let _model = crate::models::resnet::ResNet::new(&r.model.build()?, &mut params)?;
            params.load(&dir.join(checkpoint::MODEL_FILE))?;
            params.load_masks_if_present(&dir.join(checkpoint::MASKS_FILE))?;
            let names = select_prunable(&params, &opts.prunable, "--prunable")?;
            magnitude::prune(&mut params, &names, opts.sparsity.fraction(), opts.scope)?;
            (params, names)
        }
        None => {
            let loaded = load::load(&source, device)?;
            let mut params = loaded.params;
            let names = match opts.method {
                Method::Magnitude => {
                    let names = select_prunable(&params, &opts.prunable, "--prunable")?;
                    magnitude::prune(&mut params, &names, opts.sparsity.fraction(), opts.scope)?;
                    names
                }
                Method::Wanda => {
                    wanda::check_patterns(&loaded.model, &opts.prunable)?;
                    let calib = calibration(
                        opts,
                        loaded.config.vocab_size,
                        loaded.config.max_seq_len,
                        device,
                    )?;
                    wanda::prune(
                        &loaded.model,
                        &mut params,
                        &calib,
                        opts.sparsity,
                        &opts.prunable,
                    )?
                }
            };
            if let ModelSource::Hf(_) = &source {
                crate::models::hf::export(&loaded.config, &params, out)?;
            }
            (params, names)
        }
    };
    let report = SparsityReport::measure(&params, &names);
    let model = match &source {
        ModelSource::Hf(_) => {
            params.save_masks(&out.join(checkpoint::MASKS_FILE))?;
            out.to_path_buf()
        }
        ModelSource::Checkpoint { dir, run_dir } => {
            let config = std::fs::read_to_string(run_dir.join("config.toml")).map_err(io_err(
                format!("reading {}", run_dir.join("config.toml").display()),
            ))?;
            write_checkpoint(&params, dir, &config, out)?
        }
    };
    let pruned = Pruned {
        source: source.describe(),
        method: opts.method,
        sparsity: opts.sparsity.fraction(),
        n_m: match opts.sparsity {
            Sparsity::NM { n, m } => Some(format!("{n}:{m}")),
            Sparsity::Unstructured(_) => None,
        },
        model,
        report,
    };
    let json = serde_json::to_string_pretty(&pruned).unwrap_or_default();
    std::fs::write(out.join("pruning.json"), json).map_err(io_err(format!(
        "writing {}",
        out.join("pruning.json").display()
    )))?;
    Ok(pruned)
}

/// What `run_structured` made.
#[derive(Debug, Serialize)]
pub struct Shrunk {
    pub source: String,
    pub method: &'static str,
    /// Where to point `trainer eval --init` or `[init] from`.
    pub model: PathBuf,
    pub params_before: i64,
    pub params_after: i64,
    /// The source layers kept, in order (layer i of the new model is `layers[i]`).
    pub layers: Vec<i64>,
    pub n_layers: i64,
    pub d_ff: i64,
    pub n_heads: i64,
    /// Block importance (1 - cos(input, output)) of every source layer.
    pub block_importance: Vec<f64>,
}

/// Structured pruning (`structured.rs`): a smaller dense transformer with the most important
/// layers and MLP channels of the model at `init`, written to `out` (see the module docs).
/// `opts` gives the calibration data.
pub fn run_structured(
    init: &str,
    shape: Shape,
    opts: &OneShot,
    out: &Path,
    device: Device,
) -> Result<Shrunk> {
    check_new_dir(out)?;
    if shape.d_ff.is_none() && shape.n_layers.is_none() && shape.n_heads.is_none() {
        return Err(Error::Recipe(
            "--method structured: give --d-ff, --heads and/or --layers".into(),
        ));
    }
    let source = ModelSource::parse(init)?;
    if classifier_recipe(&source)?.is_some() {
        return Err(Error::Recipe(
            "--method: structured prunes transformers; use magnitude for a ResNet classifier"
                .into(),
        ));
    }
    let loaded = load::load(&source, device)?;
    if loaded.lora.is_some() {
        return Err(Error::Recipe(
            "--init: a run with LoRA adapters; export it merged (trainer export --to hf --merged) and prune that".into(),
        ));
    }
    let calib = calibration(
        opts,
        loaded.config.vocab_size,
        loaded.config.max_seq_len,
        device,
    )?;
    let imp = structured::importance(&loaded.model, &calib)?;
    let sel = structured::selection(&imp, &loaded.config, shape)?;
    let d_ff = shape.d_ff.unwrap_or(loaded.config.d_ff);
    let n_heads = shape.n_heads.unwrap_or(loaded.config.n_heads);
    let model_cfg = structured::smaller_model_config(
        &source.model_config()?,
        &loaded.config,
        &sel.layers,
        d_ff,
        n_heads,
    );
    let new_cfg = crate::models::transformer::TransformerConfig::from_recipe(&model_cfg);
    let (params, _) = structured::shrink(&loaded.params, &loaded.config, &sel, &new_cfg)?;
    let layers = sel.layers.clone();
    let model = match &source {
        ModelSource::Hf(_) => {
            crate::models::hf::export(&new_cfg, &params, out)?;
            out.to_path_buf()
        }
        ModelSource::Checkpoint { dir, run_dir } => {
            let mut r = config::load(&run_dir.join("config.toml"), &[])?;
            r.model = model_cfg;
            write_checkpoint(&params, dir, &config::to_toml(&r), out)?
        }
    };
    let shrunk = Shrunk {
        source: source.describe(),
        method: "structured",
        model,
        params_before: loaded.params.num_params(),
        params_after: params.num_params(),
        n_layers: layers.len() as i64,
        layers,
        d_ff,
        n_heads,
        block_importance: imp.blocks,
    };
    let json = serde_json::to_string_pretty(&shrunk).unwrap_or_default();
    std::fs::write(out.join("pruning.json"), json).map_err(io_err(format!(
        "writing {}",
        out.join("pruning.json").display()
    )))?;
    Ok(shrunk)
}

/// The classification recipe of a trainer run whose model is a ResNet; None for language models
/// and `hf:` sources.
fn classifier_recipe(source: &ModelSource) -> Result<Option<crate::config::ClassifyRecipe>> {
    Ok(match source {
        ModelSource::Checkpoint { run_dir, .. } => {
            match config::load_any(&run_dir.join("config.toml"), &[])? {
                AnyRecipe::Classify(r) => Some(r),
                AnyRecipe::Pretrain(_) => None,
            }
        }
        ModelSource::Hf(_) => None,
    })
}

fn check_new_dir(out: &Path) -> Result<()> {
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::RunDir {
            path: out.to_path_buf(),
            msg: "--out already exists and is not empty; choose a new output directory".into(),
        });
    }
    Ok(())
}

/// `out/config.toml` (`config`: the source run's recipe, with the new model for a structured
/// pruning) and `out/checkpoints/step-N/` with the pruned weights, their masks and the source's
/// state. No optimizer state: the pruned model starts a new run.
fn write_checkpoint(
    params: &ParamStore,
    src_dir: &Path,
    config: &str,
    out: &Path,
) -> Result<PathBuf> {
    let state = checkpoint::read_state(src_dir)?;
    let dir = checkpoint::step_dir(out, state.step);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    std::fs::write(out.join("config.toml"), config).map_err(io_err(format!(
        "writing {}",
        out.join("config.toml").display()
    )))?;
    params.save(&dir.join(checkpoint::MODEL_FILE))?;
    params.save_masks(&dir.join(checkpoint::MASKS_FILE))?;
    // state.json last: it marks the checkpoint complete.
    let json = serde_json::to_string_pretty(&state).unwrap_or_default();
    std::fs::write(dir.join(checkpoint::STATE_FILE), json).map_err(io_err(format!(
        "writing {}",
        dir.join(checkpoint::STATE_FILE).display()
    )))?;
    checkpoint::write_checksums(&dir)?;
    Ok(dir)
}

/// Consecutive windows of `seq_len` tokens from the start of the calibration data, in batches.
fn calibration(
    opts: &OneShot,
    vocab: i64,
    max_seq_len: i64,
    device: Device,
) -> Result<Vec<Tensor>> {
    let seq_len = opts.seq_len.unwrap_or(max_seq_len as usize);
    if seq_len == 0 || seq_len as i64 > max_seq_len {
        return Err(Error::Recipe(format!(
            "--seq-len: expected 1..={max_seq_len} (the model's max_seq_len), got {seq_len}"
        )));
    }
    if opts.calib_batches == 0 || opts.batch_size == 0 {
        return Err(Error::Recipe(
            "--calib-batches and --batch-size: expected positive integers".into(),
        ));
    }
    let cfg = opts.calib.clone().unwrap_or(SourceConfig::Builtin {});
    let data = source::open(&cfg, "--calib", vocab)?;
    let needed = opts.calib_batches * opts.batch_size * seq_len;
    if data.len() < needed {
        return Err(Error::Data {
            path: format!("--calib = {}", data.name),
            msg: format!(
                "has {} tokens; {} batches of {} x {} need {needed}",
                data.len(),
                opts.calib_batches,
                opts.batch_size,
                seq_len
            ),
        });
    }
    Ok((0..opts.calib_batches)
        .map(|b| {
            let mut tokens = Vec::with_capacity(opts.batch_size * seq_len);
            for i in 0..opts.batch_size {
                data.extend_window((b * opts.batch_size + i) * seq_len, seq_len, &mut tokens);
            }
            Tensor::from_slice(&tokens)
                .view([opts.batch_size as i64, seq_len as i64])
                .to_device(device)
        })
        .collect())
}
