//! `trainer export SOURCE --to hf|peft OUT`: a run or checkpoint in another format (`hf`:
//! config.json + safetensors; `peft`: a LoRA run's adapters as Hugging Face peft saves them).

use std::path::PathBuf;
use std::process::ExitCode;
use trainer::load::{self, ModelSource};
use trainer::peft::lora;

#[derive(clap::Args)]
pub struct ExportArgs {
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
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Hf,
    Peft,
}

pub fn run(args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let (out, merged) = (&args.out, args.merged);
    let source = ModelSource::parse(&args.source)?;
    let loaded = load::load(&source, tch::Device::Cpu)?;
    match args.to {
        ExportFormat::Hf => {
            match (&loaded.lora, merged) {
                (Some(_), true) => lora::merge(&loaded.model)?,
                (None, true) => anyhow::bail!("--merged: {} has no LoRA adapters ([peft]) to merge", source.describe()),
                (Some(_), false) => tracing::warn!("exporting the base model without the LoRA adapters (add --merged to merge them in, or export them with --to peft)"),
                (None, false) => {}
            }
            trainer::models::hf::export(&loaded.config, &loaded.params, out)?;
            // The model's tokenizer goes with it (AutoTokenizer.from_pretrained(out) works).
            trainer::data::tokenizer::copy_tokenizer_files(source.files_dir(), out)?;
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
            lora::export_peft(&loaded.model, adapters, None, out)?;
            eprintln!(
                "exported the LoRA adapters of {} to {} (peft format)",
                source.describe(),
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
