//! `trainer prune --init MODEL --method (magnitude|wanda) --sparsity S --out DIR`: one-shot
//! pruning into a new model directory (see `trainer::train::prune`), then the sparsity table.
//! `--method structured --d-ff N --layers L`: a smaller dense model (Minitron-style width and
//! depth pruning, `trainer::prune::structured`).

use std::path::PathBuf;
use trainer::config::SourceConfig;
use trainer::prune::wanda::Sparsity;
use trainer::prune::PruneScope;
use trainer::train::prune::{self as oneshot, Method, OneShot};

#[derive(clap::Args)]
pub struct PruneArgs {
    /// hf:PATH, a checkpoint directory, or a run directory (its newest checkpoint).
    #[arg(long)]
    init: String,
    #[arg(long, value_enum)]
    method: MethodArg,
    /// Fraction of the prunable weights set to zero, in (0, 1).
    #[arg(long)]
    sparsity: Option<f64>,
    /// Wanda only: N:M sparsity, N weights kept of every M consecutive inputs (e.g. 2:4).
    #[arg(long, conflicts_with = "sparsity")]
    nm: Option<String>,
    /// Magnitude only: rank all prunable weights together (global) or each tensor alone.
    #[arg(long, value_enum, default_value = "global")]
    scope: ScopeArg,
    /// Name patterns of the weights to prune (repeatable; a whole module path or a suffix after
    /// a `.`, `*` for any run, as `[prune] prunable`); default: linear and convolution weights.
    #[arg(long)]
    prunable: Vec<String>,
    /// Wanda's calibration data: a token file (.bin, uint16) or a text file (bytes as tokens);
    /// default: the built-in corpus.
    #[arg(long)]
    calib: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    calib_batches: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Calibration window length (default: the model's max_seq_len).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Structured: MLP channels kept per layer.
    #[arg(long)]
    d_ff: Option<i64>,
    /// Structured: layers kept (the least important, by block importance, are dropped).
    #[arg(long)]
    layers: Option<i64>,
    /// Structured (Llama): query heads kept per layer, in whole key/value groups.
    #[arg(long)]
    heads: Option<i64>,
    /// The new model directory (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    Magnitude,
    Wanda,
    Structured,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ScopeArg {
    Global,
    Layer,
}

pub fn run(args: &PruneArgs) -> anyhow::Result<()> {
    let structured = matches!(args.method, MethodArg::Structured);
    if structured {
        anyhow::ensure!(
            args.sparsity.is_none() && args.nm.is_none(),
            "--sparsity/--nm: not for --method structured (give --d-ff, --heads and/or --layers)"
        );
    } else {
        anyhow::ensure!(
            args.d_ff.is_none() && args.layers.is_none() && args.heads.is_none(),
            "--d-ff/--layers/--heads: only for --method structured"
        );
    }
    let sparsity = match (&args.nm, args.sparsity) {
        _ if structured => Sparsity::Unstructured(0.0),
        (Some(nm), _) => Sparsity::parse_nm(nm, "--nm")?,
        (None, Some(s)) => Sparsity::Unstructured(s),
        (None, None) => anyhow::bail!("--sparsity: required (or --nm N:M with --method wanda)"),
    };
    let calib = args.calib.as_ref().map(|path| {
        if path.extension().is_some_and(|e| e == "bin") {
            SourceConfig::Tokens {
                path: path.clone(),
                dtype: None,
                index: None,
            }
        } else {
            SourceConfig::Text {
                path: path.clone(),
                tokenizer: None,
            }
        }
    });
    let opts = OneShot {
        method: match args.method {
            MethodArg::Magnitude => Method::Magnitude,
            MethodArg::Wanda | MethodArg::Structured => Method::Wanda,
        },
        sparsity,
        scope: match args.scope {
            ScopeArg::Global => PruneScope::Global,
            ScopeArg::Layer => PruneScope::Layer,
        },
        prunable: args.prunable.clone(),
        calib,
        calib_batches: args.calib_batches,
        seq_len: args.seq_len,
        batch_size: args.batch_size,
    };
    let device = trainer::device::resolve(&args.device)?;
    if structured {
        let shape = trainer::prune::structured::Shape {
            d_ff: args.d_ff,
            n_layers: args.layers,
            n_heads: args.heads,
        };
        let s = oneshot::run_structured(&args.init, shape, &opts, &args.out, device)?;
        println!(
            "kept layers {:?} of {} (block importance {}), d_ff {}, {} heads: {} -> {} parameters",
            s.layers,
            s.block_importance.len(),
            s.block_importance
                .iter()
                .map(|b| format!("{b:.4}"))
                .collect::<Vec<_>>()
                .join(", "),
            s.d_ff,
            s.n_heads,
            s.params_before,
            s.params_after
        );
        eprintln!(
            "wrote {} (evaluate with `trainer eval --init {}`)",
            s.model.display(),
            args.out.display()
        );
        return Ok(());
    }
    let pruned = oneshot::run(&args.init, &opts, &args.out, device)?;
    println!("{}", pruned.report.table());
    eprintln!(
        "pruned {} with {} to {:.2}% sparsity: {} (evaluate with `trainer eval --init {}`)",
        pruned.source,
        match pruned.method {
            Method::Magnitude => "magnitude",
            Method::Wanda => "wanda",
        },
        100.0 * pruned.report.global_sparsity,
        pruned.model.display(),
        match &pruned.model {
            m if m == &args.out => format!("hf:{}", m.display()),
            _ => args.out.display().to_string(),
        }
    );
    Ok(())
}
