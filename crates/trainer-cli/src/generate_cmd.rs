//! `trainer generate --init MODEL --prompt TEXT`: continues a prompt (byte-level models, or any
//! model with a Hugging Face tokenizer.json).

use crate::eval_cmd::pick_tokenizer;
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::data::tokenizer::Tokenizer;
use trainer::load::{self, ModelSource};
use trainer::train::evaluate;

#[derive(clap::Args)]
pub struct GenerateArgs {
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
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<ExitCode> {
    let device = trainer::device::resolve(&args.device)?;
    let source = ModelSource::parse(&args.init)?;
    let loaded = load::load(&source, device)?;
    let tokenizer = pick_tokenizer(args.tokenizer.as_deref(), &source)?;
    anyhow::ensure!(
        matches!(tokenizer, Tokenizer::Hf(_)) || loaded.config.vocab_size >= 256,
        "generate: a byte-level prompt needs vocab_size >= 256, this model has {}; give its \
         tokenizer.json with --tokenizer",
        loaded.config.vocab_size
    );
    let prompt = &args.prompt;
    anyhow::ensure!(!prompt.is_empty(), "--prompt: expected a non-empty prompt");
    if let Some(k) = args.top_k {
        anyhow::ensure!(k > 0, "--top-k: expected a positive integer, got {k}");
    }
    let ids = tokenizer.encode(prompt, true)?;
    anyhow::ensure!(!ids.is_empty(), "--prompt: tokenizes to no tokens");
    let sampling = evaluate::Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
    };
    let out = evaluate::generate(&loaded.model, &ids, &sampling, device)?;
    let text = tokenizer.decode(&out)?;
    if args.json {
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
