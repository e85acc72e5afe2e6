//! What a run writes as it goes: `metrics.jsonl` (one JSON object per logged step or eval),
//! TensorBoard event files under `tb/`, and what the user sees on the terminal (progress).
//!
//! Imports: `error` only.

pub mod progress;
pub mod tensorboard;

use crate::error::{io_err, Result};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct MetricsLog {
    jsonl: File,
    tb: tensorboard::EventWriter,
    pub path: PathBuf,
}

impl MetricsLog {
    /// Opens the run's metrics for appending. When resuming from step `resume_step`, rows logged
    /// after it (by the run that was stopped) are dropped first, since the resumed run logs those
    /// steps again; the file is rewritten through a temporary file and a rename.
    pub fn open(run_dir: &Path, resume_step: Option<i64>) -> Result<MetricsLog> {
        let path = run_dir.join(METRICS_FILE);
        if let Some(step) = resume_step {
            truncate_after(&path, step)?;
        }
        let jsonl = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        let mut tb = tensorboard::EventWriter::create(&run_dir.join("tb"))?;
        if let Some(step) = resume_step {
            // The steps after `step` are logged again: TensorBoard drops the older files' ones.
            tb.add_session_start(step + 1)?;
            tb.flush()?;
        }
        Ok(MetricsLog { jsonl, tb, path })
    }

    /// Appends one row. Numeric fields other than `step` also go to TensorBoard, as
    /// `<prefix><field>` (prefix `valid/` for rows with a `split`).
    pub fn log(&mut self, row: Map<String, Value>) -> Result<()> {
        let step = row.get("step").and_then(Value::as_i64).unwrap_or(0);
        let prefix = match row.get("split").and_then(Value::as_str) {
            Some(split) => format!("{split}/"),
            None => String::new(),
        };
        for (k, v) in &row {
            if k == "step" {
                continue;
            }
            if let Some(x) = v.as_f64() {
                self.tb
                    .add_scalar(&format!("{prefix}{k}"), x as f32, step)?;
            }
        }
        let mut line = serde_json::to_string(&Value::Object(row)).unwrap_or_default();
        line.push('\n');
        let path = self.path.display().to_string();
        self.jsonl
            .write_all(line.as_bytes())
            .map_err(io_err(format!("writing {path}")))?;
        self.jsonl
            .flush()
            .map_err(io_err(format!("writing {path}")))?;
        self.tb.flush()
    }
}

fn truncate_after(path: &Path, step: i64) -> Result<()> {
    let Ok(file) = File::open(path) else {
        return Ok(());
    };
    let mut kept = String::new();
    let mut dropped = 0;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io_err(format!("reading {}", path.display())))?;
        let row_step = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("step").and_then(Value::as_i64));
        match row_step {
            Some(s) if s > step => dropped += 1,
            // A line cut short by a killed process: not JSON; its step is logged again.
            None if serde_json::from_str::<Value>(&line).is_err() => dropped += 1,
            _ => {
                kept.push_str(&line);
                kept.push('\n');
            }
        }
    }
    if dropped > 0 {
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, kept).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(io_err(format!("renaming {}", tmp.display())))?;
        tracing::info!(
            "dropped {dropped} metrics rows logged after step {step}; they are logged again"
        );
    }
    Ok(())
}

/// A JSON object from (key, value) pairs.
pub fn row(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}
