//! `trainer soup RUN RUN... --out DIR [--greedy]`: averages the weights of runs fine-tuned from
//! the same start (`trainer::train::soup`) and prints each ingredient's validation loss.

use std::path::PathBuf;
use std::process::ExitCode;
use trainer::train::soup;

#[derive(clap::Args)]
pub struct SoupArgs {
    /// Run or checkpoint directories (at least two).
    #[arg(required = true, num_args = 2..)]
    runs: Vec<String>,
    /// Greedy soup: add runs best first while the validation loss does not get worse
    /// (default: the uniform soup of all).
    #[arg(long)]
    greedy: bool,
    /// Output directory; must not exist or be empty.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(args: &SoupArgs) -> anyhow::Result<ExitCode> {
    let method = if args.greedy {
        soup::Method::Greedy
    } else {
        soup::Method::Uniform
    };
    let r = soup::run(&args.runs, method, &args.out, &args.device)?;
    for i in &r.ingredients {
        println!(
            "{} {:.6}  {}",
            if i.in_soup { "+" } else { " " },
            i.valid_loss,
            i.source
        );
    }
    println!(
        "{} soup of {}: valid loss {:.6} (uniform soup {:.6}) -> {}",
        r.method,
        r.ingredients.iter().filter(|i| i.in_soup).count(),
        r.valid_loss,
        r.uniform_valid_loss,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
