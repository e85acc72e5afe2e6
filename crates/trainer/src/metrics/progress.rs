//! Progress on the terminal: an indicatif bar (step, loss, lr, tokens/s, ETA) when stderr is a
//! terminal, plain periodic log lines otherwise (Slurm logs, CI, pipes).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub enum Progress {
    Bar(ProgressBar),
    Lines {
        total: u64,
        /// The stage of a `[[stages]]` run, shown in every line.
        stage: Option<String>,
    },
    /// Nothing at all: the ranks other than 0 of a multi-process run.
    Silent,
}

impl Progress {
    pub fn new(total_steps: i64, start_step: i64) -> Progress {
        let total = total_steps.max(0) as u64;
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix}{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(start_step.max(0) as u64);
            bar.reset_eta();
            Progress::Bar(bar)
        } else {
            Progress::Lines { total, stage: None }
        }
    }

    /// Names the stage of a `[[stages]]` run in the bar and in every line.
    pub fn in_stage(self, name: &str) -> Progress {
        match self {
            Progress::Bar(bar) => {
                bar.set_prefix(format!("[{name}] "));
                Progress::Bar(bar)
            }
            Progress::Lines { total, .. } => Progress::Lines {
                total,
                stage: Some(name.to_string()),
            },
            Progress::Silent => Progress::Silent,
        }
    }

    pub fn silent() -> Progress {
        Progress::Silent
    }

    /// Called at every logged step.
    pub fn update(&self, step: i64, loss: f64, lr: f64, tokens_per_s: f64, eta_s: f64) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(step as u64);
                bar.set_message(format!(
                    "loss {loss:.4}  lr {lr:.2e}  {tokens_per_s:.0} tok/s"
                ));
            }
            Progress::Lines { total, stage } => tracing::info!(
                "{}step {step}/{total}  loss {loss:.4}  lr {lr:.3e}  {tokens_per_s:.0} tok/s  eta {}",
                stage.as_ref().map(|s| format!("[{s}] ")).unwrap_or_default(),
                format_duration(eta_s)
            ),
            Progress::Silent => {}
        }
    }

    /// Prints a line without breaking the bar.
    pub fn println(&self, line: &str) {
        match self {
            Progress::Bar(bar) => bar.println(line),
            Progress::Lines { .. } => tracing::info!("{line}"),
            Progress::Silent => {}
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".to_string();
    }
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}
