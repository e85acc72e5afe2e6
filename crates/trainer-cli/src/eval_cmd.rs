//! `trainer eval --init MODEL --data FILE --seq-len N`: a model's loss and perplexity on a token
//! or text file.

use std::path::PathBuf;
use std::process::ExitCode;
use trainer::config::{SourceConfig, TokenDtype};
use trainer::data::tokenizer::Tokenizer;
use trainer::load::{self, ModelSource};
use trainer::train::evaluate;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// hf:PATH, a checkpoint directory, or a run directory (its newest checkpoint).
    #[arg(long)]
    init: String,
    /// A token file (.bin: little-endian ids) or a UTF-8 text file (bytes as tokens).
    #[arg(long)]
    data: PathBuf,
    /// How to read --data; default: tokens for .bin files, text otherwise.
    #[arg(long, value_enum)]
    data_kind: Option<DataKind>,
    /// Width of the ids in a token file (default: the one in the NAME.json summary that
    /// `trainer tokenize` writes beside NAME.bin, else uint16).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
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

pub fn run(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    let seq_len = args.seq_len;
    anyhow::ensure!(
        seq_len > 0,
        "--seq-len: expected a positive integer, got {seq_len}"
    );
    anyhow::ensure!(
        args.batches != Some(0),
        "--batches: expected a positive integer (or leave it out for the whole file), got 0"
    );
    anyhow::ensure!(
        args.batch_size > 0,
        "--batch-size: expected a positive integer, got 0"
    );
    anyhow::ensure!(
        args.batch_size > 0,
        "--batch-size: expected a positive integer"
    );
    let device = trainer::device::resolve(&args.device)?;
    let source = ModelSource::parse(&args.init)?;
    let loaded = load::load(&source, device)?;
    let data = &args.data;
    let is_bin = data.extension().is_some_and(|e| e == "bin");
    let kind = args.data_kind.unwrap_or(if is_bin {
        DataKind::Tokens
    } else {
        DataKind::Text
    });
    let cfg = match kind {
        DataKind::Text => SourceConfig::Text {
            path: data.clone(),
            tokenizer: None,
        },
        DataKind::Tokens => SourceConfig::Tokens {
            path: data.clone(),
            dtype: args.dtype.map(|d| match d {
                DtypeArg::Uint16 => TokenDtype::Uint16,
                DtypeArg::Uint32 => TokenDtype::Uint32,
            }),
            index: None,
        },
    };
    anyhow::ensure!(
        seq_len <= loaded.config.max_seq_len,
        "--seq-len {seq_len} exceeds the model's max_seq_len ({})",
        loaded.config.max_seq_len
    );
    let tokenizer = pick_tokenizer(args.tokenizer.as_deref(), &source)?;
    let vocab = loaded.config.vocab_size;
    let tokens = match (&cfg, &tokenizer) {
        (SourceConfig::Text { path, .. }, Tokenizer::Hf(_)) => {
            trainer::data::source::open_tokenized(path, &tokenizer, "--data", vocab)?
        }
        _ => trainer::data::source::open(&cfg, "--data", vocab)?,
    };
    let span = trainer::data::source::Span::whole(tokens);
    let r = evaluate::eval_span(
        &loaded.model,
        &span,
        seq_len as usize,
        args.batch_size,
        args.batches,
        device,
    )?;
    if args.json {
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

/// The tokenizer for eval/generate: the one given, else the model's tokenizer.json (beside an
/// hf: model, or kept in the run directory of a run started from one), else bytes.
pub fn pick_tokenizer(
    given: Option<&std::path::Path>,
    source: &ModelSource,
) -> anyhow::Result<Tokenizer> {
    Ok(match given {
        Some(path) => Tokenizer::from_file(path)?,
        None => Tokenizer::for_model_dir(Some(source.files_dir()))?,
    })
}
