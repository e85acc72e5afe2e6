//! Helpers shared by the end-to-end tests: they drive the real `trainer` binary (built by cargo
//! for this test run) on tiny recipes in temporary directories.
//!
//! Every command runs with a temporary directory as its working directory, its output goes to
//! files (no pipe can fill up and block the child), and it is killed if it runs past a timeout,
//! so a hang fails the test instead of stalling the suite.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Exit code of a run stopped by SIGINT/SIGTERM/SIGUSR1 after writing a checkpoint.
pub const EXIT_INTERRUPTED: i32 = 75;

/// The longest any single trainer command in these tests may take.
pub const TIMEOUT: Duration = Duration::from_secs(300);

pub fn trainer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trainer"))
}

/// The repository root (this crate is `crates/trainer-cli`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// A fresh temporary working directory.
pub fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("trainer-e2e-")
        .tempdir()
        .expect("tempdir")
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub args: Vec<String>,
}

impl Out {
    /// A short description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "trainer {}\nexit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }

    pub fn assert_success(&self) -> &Self {
        assert_eq!(self.code, Some(0), "expected success:\n{}", self.describe());
        assert!(
            !self.stderr.contains("panicked"),
            "a panic:\n{}",
            self.describe()
        );
        self
    }

    /// The lines of stderr that start with `error:`.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect()
    }

    /// Asserts the bad-input contract: exit code 1, exactly one line starting with `error:`, no
    /// panic; returns that line. Each of `needles` must occur in it.
    pub fn assert_one_error(&self, needles: &[&str]) -> String {
        assert_eq!(
            self.code,
            Some(1),
            "expected exit code 1:\n{}",
            self.describe()
        );
        assert!(
            !self.stderr.contains("panicked"),
            "a panic is a bug:\n{}",
            self.describe()
        );
        let lines = self.error_lines();
        assert_eq!(
            lines.len(),
            1,
            "expected exactly one `error:` line:\n{}",
            self.describe()
        );
        let line = lines[0].to_string();
        for n in needles {
            assert!(
                line.contains(n),
                "the error line should contain {n:?}, got:\n{line}\n\n{}",
                self.describe()
            );
        }
        line
    }
}

/// A started trainer process whose output goes to files in `logs`.
pub struct Running {
    pub child: Child,
    pub args: Vec<String>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running (None) or its exit code.
    pub fn try_wait(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().expect("try_wait").map(|s| s.code())
    }

    /// What it has written to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits for the process (killing it after `timeout`) and collects its output.
    pub fn wait(mut self, timeout: Duration) -> Out {
        let start = Instant::now();
        let code = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status.code();
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let out = self.collect(None);
                panic!("timed out after {timeout:?}:\n{}", out.describe());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.collect(code)
    }

    fn collect(&self, code: Option<i32>) -> Out {
        Out {
            code,
            stdout: std::fs::read_to_string(&self.stdout_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr_path).unwrap_or_default(),
            args: self.args.clone(),
        }
    }
}

/// Starts `trainer ARGS` in `cwd`, its stdout and stderr going to files in a fresh directory
/// inside `cwd/.logs`.
pub fn spawn(cwd: &Path, args: &[&str]) -> Running {
    spawn_env(cwd, args, &[])
}

/// `spawn` with extra environment variables (e.g. torchrun's RANK, WORLD_SIZE, MASTER_PORT).
pub fn spawn_env(cwd: &Path, args: &[&str], env: &[(&str, String)]) -> Running {
    let logs = cwd.join(".logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let logs = tempfile::Builder::new()
        .prefix("cmd-")
        .tempdir_in(&logs)
        .expect("log dir")
        .keep();
    let stdout_path = logs.join("stdout");
    let stderr_path = logs.join("stderr");
    let child = Command::new(trainer_bin())
        .args(args)
        .current_dir(cwd)
        // Plain, predictable logs whatever the caller's environment says.
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("starting the trainer binary");
    Running {
        child,
        args: args.iter().map(|s| s.to_string()).collect(),
        stdout_path,
        stderr_path,
    }
}

/// Runs `trainer ARGS` in `cwd` to the end.
pub fn trainer(cwd: &Path, args: &[&str]) -> Out {
    spawn(cwd, args).wait(TIMEOUT)
}

/// Sends `signal` (e.g. "TERM", "KILL") to a process through the `kill` utility.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Quotes a string as a TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The tiny recipe the tests start from: a 2-layer, d_model 32 Llama on the built-in corpus,
/// seq_len 16, batch 4, 40 steps, one thread (bitwise reproducible on the CPU), logging every
/// step, evaluating every 10 steps, a checkpoint every 5 steps and the last 2 kept.
/// Tests change it with `--set` or by replacing whole lines (each `key = value` is on its own
/// line, unique within the file).
/// `tiny_recipe(out_dir)` starting from `init` (`[init] from`), with no `[model]`: the
/// architecture comes from the checkpoint.
pub fn tiny_recipe_from(init: &str, out_dir: &str) -> String {
    let recipe = tiny_recipe(out_dir);
    let start = recipe.find("[model]").expect("model section");
    let end = recipe.find("[data]").expect("data section");
    format!(
        "{}[init]\nfrom = {}\n\n{}",
        &recipe[..start],
        toml_str(init),
        &recipe[end..]
    )
}

pub fn tiny_recipe(out_dir: &str) -> String {
    format!(
        r#"# A tiny recipe for the end-to-end tests.
[run]
name = "tiny"
seed = 7
out_dir = {out_dir}
device = "cpu"
threads = 1

[model]
kind = "llama"
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
d_ff = 64
max_seq_len = 16

[data]
seq_len = 16
train = {{ kind = "builtin" }}

[optim]
kind = "adamw"
lr = 3e-3

[schedule]
kind = "cosine"
warmup_steps = 5
min_lr = 3e-4

[train]
batch_size = 4
max_steps = 40
eval_every = 10
eval_batches = 2
log_every = 1
checkpoint_every = 5
keep_checkpoints = 2
"#,
        out_dir = toml_str(out_dir)
    )
}

/// Replaces the line that is exactly `from` with `to` (which may span several lines); panics
/// when `from` is not one line of `text`.
pub fn replace_line(text: &str, from: &str, to: &str) -> String {
    let mut found = false;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            if l == from {
                found = true;
                to.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "no line {from:?} in the recipe");
    lines.join("\n") + "\n"
}

/// The 1-based number of the first line of `text` that starts with `prefix`.
pub fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.starts_with(prefix))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no line {prefix:?}"))
}

/// Writes `text` to `dir/name` and returns the name (commands run in `dir`).
pub fn write_recipe(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).expect("writing recipe");
    name.to_string()
}

/// All rows of a metrics.jsonl.
pub fn read_metrics(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}:{}: not JSON ({e}): {l}", path.display(), i + 1))
        })
        .collect()
}

/// Training rows (no `split`).
pub fn train_rows(rows: &[Value]) -> Vec<Value> {
    rows.iter()
        .filter(|r| r.get("split").is_none())
        .cloned()
        .collect()
}

/// Evaluation rows of `split`.
pub fn eval_rows(rows: &[Value], split: &str) -> Vec<Value> {
    rows.iter()
        .filter(|r| r.get("split").and_then(Value::as_str) == Some(split))
        .cloned()
        .collect()
}

pub fn step_of(row: &Value) -> i64 {
    row.get("step")
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("row without an integer step: {row}"))
}

pub fn num(row: &Value, key: &str) -> f64 {
    row.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("row without a number {key:?}: {row}"))
}

/// The newest row of a metrics file written so far (tolerates a partly written last line).
pub fn last_logged_step(path: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("step").and_then(Value::as_i64))
        .max()
}

/// Step numbers of the complete and temporary entries of `run/checkpoints`.
pub fn checkpoint_entries(run_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(run_dir.join("checkpoints")) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// Every file under `dir` with its bytes (an empty map when `dir` does not exist), but the run
/// directory's `.lock`: the lock's bookkeeping (who last held it), not the run's data, which
/// every start that gets as far as taking the lock rewrites.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("under root").to_path_buf();
                out.insert(
                    rel,
                    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out.remove(Path::new(".lock"));
    out
}

/// Asserts that two snapshots hold the same files with the same bytes, naming the differences.
pub fn assert_same_files(
    before: &BTreeMap<PathBuf, Vec<u8>>,
    after: &BTreeMap<PathBuf, Vec<u8>>,
    what: &str,
) {
    let mut diffs = Vec::new();
    for (p, b) in before {
        match after.get(p) {
            None => diffs.push(format!("removed {}", p.display())),
            Some(a) if a != b => diffs.push(format!("changed {}", p.display())),
            _ => {}
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        diffs.push(format!("added {}", p.display()));
    }
    assert!(
        diffs.is_empty(),
        "{what}: the run directory changed: {}",
        diffs.join(", ")
    );
}

/// Runs the tiny recipe to the end in `cwd/<out_dir>` and returns its metrics rows.
pub fn run_tiny(cwd: &Path, recipe: &str, out_dir: &str, extra: &[&str]) -> Vec<Value> {
    let set_out = format!("run.out_dir={out_dir}");
    let mut args = vec!["run", recipe, "--set", set_out.as_str()];
    args.extend_from_slice(extra);
    trainer(cwd, &args).assert_success();
    read_metrics(&cwd.join(out_dir).join("metrics.jsonl"))
}

/// Waits until the metrics of a running process reach `step`; panics if the process exits first
/// or the wait exceeds the timeout. Returns the newest step seen.
pub fn wait_for_step(proc: &mut Running, metrics: &Path, step: i64) -> i64 {
    let start = Instant::now();
    loop {
        if let Some(s) = last_logged_step(metrics).filter(|s| *s >= step) {
            return s;
        }
        if let Some(code) = proc.try_wait() {
            panic!("the run exited (code {code:?}) before logging step {step}");
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "the run did not reach step {step} within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The Python interpreter the tests use to read TensorBoard files: `TRAINER_PYTHON`, else
/// `python3`.
pub fn python() -> String {
    std::env::var("TRAINER_PYTHON")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

/// Number of CUDA devices the binary sees (from `trainer info`).
pub fn cuda_devices(cwd: &Path) -> usize {
    let out = trainer(cwd, &["info"]);
    out.assert_success();
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("cuda devices: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `cuda devices:` line:\n{}", out.describe()))
}

/// The summary.json of a run directory; panics when it is missing or not JSON.
pub fn read_summary(run_dir: &Path) -> Value {
    let text = std::fs::read_to_string(run_dir.join("summary.json"))
        .unwrap_or_else(|e| panic!("{}: no summary.json: {e}", run_dir.display()));
    serde_json::from_str(&text).expect("summary JSON")
}

/// The cells of one CSV line (RFC 4180 quoting, as results.csv writes a point's label; no
/// newlines inside cells).
pub fn csv_cells(line: &str) -> Vec<String> {
    let (mut cells, mut cell, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cell.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => cells.push(std::mem::take(&mut cell)),
            (c, _) => cell.push(c),
        }
    }
    cells.push(cell);
    cells
}

/// (split, step, loss, grad_norm) of every metrics row with a loss (training rows: split
/// "train"): what two runs compare when their curves must be the same.
pub fn curve(rows: &[Value]) -> Vec<(String, i64, f64, Option<f64>)> {
    rows.iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| {
            (
                r.get("split")
                    .and_then(|s| s.as_str())
                    .unwrap_or("train")
                    .to_string(),
                step_of(r),
                num(r, "loss"),
                r.get("grad_norm").and_then(|g| g.as_f64()),
            )
        })
        .collect()
}
