//! `trainer tokenize INPUT... --out NAME.bin --tokenizer T`: a corpus into a token file, its
//! document index and its summary (`trainer::data::tokenize`); prints the summary and the recipe
//! line that reads the result.

use clap::{Args, ValueEnum};
use std::path::PathBuf;
use trainer::data::corpus::{CorpusSpec, FileFormat, TextDocs};
use trainer::data::tokenize::{tokenize, EosChoice, TokenizeOptions};

#[derive(Args)]
pub struct TokenizeArgs {
    /// Text, JSONL or Parquet files, or directories of them (read in sorted path order).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The token file to write (NAME.bin; NAME.idx and NAME.json are written beside it).
    #[arg(long)]
    out: PathBuf,
    /// A tokenizer.json, a directory holding one (a Hugging Face checkpoint), or `bytes`.
    #[arg(long)]
    tokenizer: String,
    /// How the files are read: by extension (`.jsonl`/`.ndjson` are JSONL, `.parquet` Parquet,
    /// others text), or all as one format.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    format: FormatArg,
    /// The JSONL field (or Parquet column) that holds each document's text.
    #[arg(long, default_value = "text")]
    field: String,
    /// What a document of a text file is: the whole file, or each non-empty line.
    #[arg(long, value_enum, default_value_t = DocsArg::File)]
    docs: DocsArg,
    /// The token appended after each document: a token of the vocabulary, or `none`. Default:
    /// eos_token of the tokenizer_config.json beside the tokenizer (none for bytes).
    #[arg(long)]
    eos: Option<String>,
    /// Encoding threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Replace existing output files.
    #[arg(long)]
    force: bool,
    /// Count and skip malformed JSONL records (not JSON, no such field, not a string) instead of
    /// stopping at the first.
    #[arg(long)]
    skip_bad_records: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Auto,
    Text,
    Jsonl,
    Parquet,
}

#[derive(Clone, Copy, ValueEnum)]
enum DocsArg {
    File,
    Line,
}

pub fn run(args: TokenizeArgs) -> anyhow::Result<()> {
    let opts = TokenizeOptions {
        corpus: CorpusSpec {
            inputs: args.inputs,
            format: match args.format {
                FormatArg::Auto => None,
                FormatArg::Text => Some(FileFormat::Text),
                FormatArg::Jsonl => Some(FileFormat::Jsonl),
                FormatArg::Parquet => Some(FileFormat::Parquet),
            },
            field: args.field,
            text_docs: match args.docs {
                DocsArg::File => TextDocs::File,
                DocsArg::Line => TextDocs::Line,
            },
            skip_bad_records: args.skip_bad_records,
        },
        tokenizer: args.tokenizer,
        out: args.out.clone(),
        eos: match args.eos.as_deref() {
            None => EosChoice::Default,
            Some("none") => EosChoice::None,
            Some(token) => EosChoice::Token(token.to_string()),
        },
        threads: args.threads,
        force: args.force,
        progress: true,
    };
    let info = tokenize(&opts)?;
    let per_byte = info.tokens as f64 / info.input_bytes.max(1) as f64;
    println!(
        "{}: {} documents, {} tokens ({}), {} input bytes, {per_byte:.4} tokens per byte, {:.2} s, \
         {:.0} tokens/s",
        args.out.display(),
        info.documents,
        info.tokens,
        info.dtype.as_str(),
        info.input_bytes,
        info.seconds,
        info.tokens as f64 / info.seconds.max(1e-9)
    );
    if info.skipped_bad_records > 0 || info.skipped_empty_documents > 0 {
        println!(
            "skipped: {} malformed records, {} empty documents",
            info.skipped_bad_records, info.skipped_empty_documents
        );
    }
    println!(
        "recipe: train = {{ kind = \"tokens\", path = \"{}\" }}",
        args.out.display()
    );
    Ok(())
}
