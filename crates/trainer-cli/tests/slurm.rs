//! `trainer slurm`: the sbatch script it writes, its bad input, the script's requeue logic
//! against stand-ins for srun and scontrol, and the whole flow on a real one-node Slurm
//! (`scripts/slurm/local_cluster.sh`): submit, pre-emption signal, checkpoint, requeue, resume,
//! finish with the same final loss as an uninterrupted run.
//!
//! `trainer sweep --slurm` (a sweep as a job array) likewise: the array script, its bad input,
//! `--submit` with the collect job after it, the script's decisions against stand-ins, what an
//! array task relies on (`--index` skips a finished run and resumes a half-done one), and on the
//! real Slurm a 4-task array with one task pre-empted and requeued, then the results table.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `trainer ARGS` in `cwd` with extra environment variables (`None` removes one).
fn trainer_with_env(cwd: &Path, args: &[&str], env: &[(&str, Option<&str>)]) -> Out {
    let mut cmd = Command::new(trainer_bin());
    cmd.args(args).current_dir(cwd).env_remove("RUST_LOG");
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("starting the trainer binary");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

/// The names of the files in `dir` that `keep` accepts.
fn file_names(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("listing the work dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .to_string()
        })
        .filter(|n| keep(n))
        .collect()
}

fn write_exe(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("writing a script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn writes_the_sbatch_script() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &tiny_recipe("runs/tiny"));
    let args = [
        "slurm",
        "tiny.toml",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--time",
        "01:00:00",
        "--partition",
        "gpu",
        "--account",
        "proj",
        "--cpus-per-task",
        "8",
        "--set",
        "train.max_steps=30",
        "--",
        "--log-level",
        "debug",
    ];
    let out = trainer(w, &args);
    out.assert_success();
    let script = std::fs::read_to_string(w.join("tiny.sbatch")).expect("the script");
    let dir = w.display().to_string();
    for line in [
        "#SBATCH --job-name=tiny".to_string(),
        "#SBATCH --nodes=2".to_string(),
        "#SBATCH --ntasks-per-node=4".to_string(),
        "#SBATCH --gpus-per-node=4".to_string(),
        "#SBATCH --cpus-per-task=8".to_string(),
        "#SBATCH --time=01:00:00".to_string(),
        "#SBATCH --partition=gpu".to_string(),
        "#SBATCH --account=proj".to_string(),
        format!("#SBATCH --chdir={dir}"),
        format!("#SBATCH --output={dir}/slurm-%x-%j.out"),
        "#SBATCH --open-mode=append".to_string(),
        "#SBATCH --requeue".to_string(),
        "#SBATCH --signal=USR1@120".to_string(),
        // The run directory, resolved against the submit directory.
        format!("run_dir={dir}/runs/tiny"),
        format!("recipe={dir}/tiny.toml"),
        "srun \"$trainer\" run \"$recipe\" --resume auto --wait-for-lock 300 --set train.max_steps=30 \
         --log-level debug"
            .to_string(),
        "    if scontrol requeue \"$SLURM_JOB_ID\"; then".to_string(),
    ] {
        assert!(
            script.lines().any(|l| l.starts_with(&line)),
            "no line starting with {line:?} in:\n{script}"
        );
    }
    assert!(
        script.contains(&format!(
            "trainer={}",
            trainer_bin().canonicalize().expect("binary path").display()
        )),
        "{script}"
    );
    assert!(!script.contains("{{"), "an unfilled placeholder:\n{script}");
    let syntax = Command::new("bash")
        .args(["-n", "tiny.sbatch"])
        .current_dir(w)
        .status()
        .expect("bash");
    assert!(syntax.success(), "bash -n refuses the script:\n{script}");

    // The same command again: the same script, nothing to do.
    let again = trainer(w, &args);
    again.assert_success();
    assert!(again.stderr.contains("unchanged"), "{}", again.describe());

    // Another script for the same file: refused without --force, the old file kept.
    let other = ["slurm", "tiny.toml", "--nodes", "1", "--gpus-per-node", "0"];
    trainer(w, &other).assert_one_error(&["tiny.sbatch", "--force"]);
    assert_eq!(
        std::fs::read_to_string(w.join("tiny.sbatch")).expect("the script"),
        script
    );
    let mut forced = other.to_vec();
    forced.push("--force");
    trainer(w, &forced).assert_success();
    let cpu = std::fs::read_to_string(w.join("tiny.sbatch")).expect("the script");
    assert!(cpu.contains("#SBATCH --ntasks-per-node=1\n"), "{cpu}");
    assert!(!cpu.contains("--gpus-per-node"), "{cpu}");
    // No temporary file left behind.
    let names = file_names(w, |n| n.contains("tmp"));
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn bad_input() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &tiny_recipe("run"));
    let base = ["slurm", "tiny.toml", "--nodes", "1", "--gpus-per-node", "0"];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        a
    }

    // --submit without sbatch: one line, and nothing written.
    let empty = w.join("empty-path");
    std::fs::create_dir(&empty).expect("mkdir");
    let out = trainer_with_env(
        w,
        &with(&base, &["--submit"]),
        &[("PATH", Some(empty.to_str().expect("utf-8 path")))],
    );
    let line = out.assert_one_error(&["--submit needs sbatch on PATH"]);
    assert_eq!(line, "error: --submit needs sbatch on PATH");
    assert!(!w.join("tiny.sbatch").exists());

    // sbatch that refuses the job: its last stderr line, in one line.
    let fake = w.join("fake-sbatch");
    std::fs::create_dir(&fake).expect("mkdir");
    write_exe(
        &fake.join("sbatch"),
        "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\nexit 1\n",
    );
    let out = trainer_with_env(
        w,
        &with(&base, &["--submit", "--out", "refused.sbatch"]),
        &[("PATH", Some(fake.to_str().expect("utf-8 path")))],
    );
    out.assert_one_error(&["refused.sbatch", "Invalid partition name specified"]);

    trainer(w, &with(&base, &["--signal-lead", "0"])).assert_one_error(&["--signal-lead"]);
    trainer(w, &with(&base, &["--time", "1h"])).assert_one_error(&["--time 1h", "HH:MM:SS"]);
    trainer(w, &with(&base, &["--time", "00:01:00"]))
        .assert_one_error(&["--time 00:01:00", "--signal-lead"]);
    trainer(
        w,
        &["slurm", "tiny.toml", "--nodes", "0", "--gpus-per-node", "0"],
    )
    .assert_one_error(&["--nodes"]);
    trainer(w, &with(&base, &["--partition", "a b"])).assert_one_error(&["--partition", "#SBATCH"]);
    trainer(w, &with(&base, &["--", "--resume", "auto"])).assert_one_error(&["--resume"]);
    trainer(w, &with(&base, &["--set", "train.nope=1"])).assert_one_error(&["train.nope"]);
    trainer(
        w,
        &[
            "slurm",
            "missing.toml",
            "--nodes",
            "1",
            "--gpus-per-node",
            "0",
        ],
    )
    .assert_one_error(&["missing.toml"]);
    std::fs::write(w.join("bad.tmpl"), "#!/bin/bash\n{{nodes}} {{node}}\n").expect("writing");
    trainer(w, &with(&base, &["--template", "bad.tmpl"]))
        .assert_one_error(&["bad.tmpl", "{{node}}"]);
    assert!(!w.join("tiny.sbatch").exists(), "bad input wrote a script");
}

/// `--submit` prints the job id that `sbatch --parsable` gives (`ID` or `ID;CLUSTER`).
#[test]
fn submit_prints_the_job_id() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &tiny_recipe("run"));
    let fake = w.join("fake-sbatch");
    std::fs::create_dir(&fake).expect("mkdir");
    write_exe(
        &fake.join("sbatch"),
        "#!/bin/sh\necho \"$@\" > sbatch.args\necho '4242;cluster'\n",
    );
    let out = trainer_with_env(
        w,
        &[
            "slurm",
            "tiny.toml",
            "--nodes",
            "1",
            "--gpus-per-node",
            "0",
            "--submit",
        ],
        &[("PATH", Some(fake.to_str().expect("utf-8 path")))],
    );
    out.assert_success();
    assert_eq!(out.stdout, "4242\n", "{}", out.describe());
    let args = std::fs::read_to_string(w.join("sbatch.args")).expect("sbatch was called");
    assert_eq!(
        args.trim(),
        format!("--parsable {}", w.join("tiny.sbatch").display())
    );
}

/// The batch script's decisions, with stand-ins for srun (exits with $FAKE_SRUN_RC after
/// $FAKE_SRUN_SLEEP seconds) and scontrol (records its arguments).
#[test]
fn the_script_requeues_only_after_the_preemption_signal() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &tiny_recipe("run"));
    trainer(
        w,
        &["slurm", "tiny.toml", "--nodes", "1", "--gpus-per-node", "0"],
    )
    .assert_success();
    let bin = w.join("fake-bin");
    std::fs::create_dir(&bin).expect("mkdir");
    write_exe(
        &bin.join("srun"),
        "#!/bin/bash\necho \"$@\" > \"$FAKE_DIR/srun.args\"\ntouch \"$FAKE_DIR/srun.started\"\n\
         sleep \"${FAKE_SRUN_SLEEP:-0}\"\nexit \"$FAKE_SRUN_RC\"\n",
    );
    write_exe(
        &bin.join("scontrol"),
        "#!/bin/bash\necho \"$@\" >> \"$FAKE_DIR/scontrol.calls\"\n",
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").expect("PATH"));

    // Returns (exit code, scontrol calls, output).
    let case = |rc: i32, term_to_shell: bool| -> (Option<i32>, String, String) {
        let dir = tempfile::tempdir_in(w).expect("tempdir");
        let mut child = Command::new("bash")
            .arg(w.join("tiny.sbatch"))
            .current_dir(w)
            .env("PATH", &path)
            .env("FAKE_DIR", dir.path())
            .env("FAKE_SRUN_RC", rc.to_string())
            .env("FAKE_SRUN_SLEEP", if term_to_shell { "1" } else { "0" })
            .env("SLURM_JOB_ID", "42")
            .stdout(std::fs::File::create(dir.path().join("out")).expect("out file"))
            .stderr(Stdio::null())
            .spawn()
            .expect("bash");
        if term_to_shell {
            let start = Instant::now();
            while !dir.path().join("srun.started").exists() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "srun did not start"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            send_signal(child.id(), "TERM");
        }
        let code = child.wait().expect("wait").code();
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap_or_default();
        assert!(
            read("srun.args").contains("/tiny.toml --resume auto --wait-for-lock 300"),
            "{}",
            read("srun.args")
        );
        (code, read("scontrol.calls"), read("out"))
    };

    let (code, calls, out) = case(75, false);
    assert_eq!((code, calls.as_str()), (Some(0), "requeue 42\n"), "{out}");
    assert!(out.contains("requeueing"), "{out}");
    let (code, calls, out) = case(0, false);
    assert_eq!((code, calls.as_str()), (Some(0), ""), "{out}");
    assert!(out.contains("the run finished"), "{out}");
    let (code, calls, out) = case(1, false);
    assert_eq!((code, calls.as_str()), (Some(1), ""), "{out}");
    // Slurm ending the job (scancel, time limit) signals the shell too: no requeue.
    let (code, calls, out) = case(75, true);
    assert_eq!((code, calls.as_str()), (Some(75), ""), "{out}");
    assert!(out.contains("SIGTERM"), "{out}");
}

// ---- the real Slurm ----------------------------------------------------------------------------

/// Stops the test cluster's daemons when the test ends, passed or failed.
struct Cluster {
    script: PathBuf,
    conf: String,
    /// The cluster's directory and ports are fixed: one test at a time uses it.
    _turn: std::sync::MutexGuard<'static, ()>,
}

static CLUSTER_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.script).arg("stop").status();
    }
}

/// Starts the one-node cluster for the test `test`; None (after printing why) where this
/// machine cannot run one.
fn start_cluster(test: &str) -> Option<Cluster> {
    // A test that failed while holding the cluster leaves the lock poisoned; the next one
    // starts the cluster afresh anyway.
    let turn = CLUSTER_TURN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let script = repo_root().join("scripts/slurm/local_cluster.sh");
    let dir = std::env::temp_dir().join("trainer-slurm");
    let out = Command::new(&script)
        .arg("start")
        .env("TRAINER_SLURM_DIR", &dir)
        .stdin(Stdio::null())
        .output()
        .expect("running scripts/slurm/local_cluster.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => Some(Cluster {
            script,
            conf: dir.join("slurm.conf").display().to_string(),
            _turn: turn,
        }),
        Some(77) => {
            let why = stdout
                .lines()
                .rev()
                .find(|l| l.starts_with("SKIPPED:"))
                .unwrap_or("SKIPPED");
            // Where Slurm is expected (CI), a skip is a failure.
            assert!(
                std::env::var_os("TRAINER_REQUIRE_SLURM").is_none(),
                "TRAINER_REQUIRE_SLURM is set, but {why}\n{stderr}"
            );
            // Straight to stderr: libtest captures print!/eprint! of a passing test, and a skip
            // must be seen.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{test}: {why}");
            None
        }
        code => panic!("local_cluster.sh start failed ({code:?}):\n{stdout}\n{stderr}"),
    }
}

/// `scontrol show job ID` as key=value pairs (None once the job is forgotten).
fn show_job(conf: &str, id: &str) -> Option<BTreeMap<String, String>> {
    let out = Command::new("scontrol")
        .args(["show", "job", id])
        .env("SLURM_CONF", conf)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// A recipe that takes about 15 s on one CPU thread, with a checkpoint every 100 of its 1000
/// steps: long enough to be signalled mid-run.
fn slurm_recipe() -> String {
    let mut r = tiny_recipe("run");
    for (from, to) in [
        ("name = \"tiny\"", "name = \"slurm-e2e\""),
        ("d_model = 32", "d_model = 128"),
        ("d_ff = 64", "d_ff = 256"),
        ("max_seq_len = 16", "max_seq_len = 32"),
        ("seq_len = 16", "seq_len = 32"),
        ("batch_size = 4", "batch_size = 8"),
        ("max_steps = 40", "max_steps = 1000"),
        ("eval_every = 10", "eval_every = 250"),
        ("log_every = 1", "log_every = 10"),
        ("checkpoint_every = 5", "checkpoint_every = 100"),
    ] {
        r = replace_line(&r, from, to);
    }
    r
}

/// A job submitted with `trainer slurm --submit` to the test cluster.
struct Job<'a> {
    conf: &'a str,
    id: String,
    log: PathBuf,
    run: PathBuf,
}

impl Job<'_> {
    /// Submits `recipe` from `dir` under `name`, training into `dir/out_dir`.
    fn submit<'a>(conf: &'a str, dir: &Path, recipe: &str, name: &str, out_dir: &str) -> Job<'a> {
        let set = format!("run.out_dir={out_dir}");
        let script = format!("{name}.sbatch");
        let out = trainer_with_env(
            dir,
            &[
                "slurm",
                recipe,
                "--nodes",
                "1",
                "--gpus-per-node",
                "0",
                "--job-name",
                name,
                "--set",
                &set,
                "--out",
                &script,
                "--submit",
            ],
            &[("SLURM_CONF", Some(conf))],
        );
        out.assert_success();
        let id = out.stdout.trim().to_string();
        assert!(id.parse::<u64>().is_ok(), "{}", out.describe());
        Job {
            conf,
            log: dir.join(format!("slurm-{name}-{id}.out")),
            run: dir.join(out_dir),
            id,
        }
    }

    fn show(&self) -> BTreeMap<String, String> {
        show_job(self.conf, &self.id).unwrap_or_default()
    }

    /// `what`, the job's record and its log, for a failed assertion.
    fn diagnose(&self, what: &str) -> String {
        format!(
            "{what}\n--- scontrol show job {} ---\n{:?}\n--- {} ---\n{}",
            self.id,
            self.show(),
            self.log.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    /// Waits for the first complete checkpoint; returns the newest logged step then.
    fn wait_for_checkpoint(&self, start: Instant) -> i64 {
        while !checkpoint_entries(&self.run)
            .iter()
            .any(|n| n.starts_with("step-"))
        {
            let state = self.show().get("JobState").cloned();
            assert!(
                matches!(
                    state.as_deref(),
                    Some("PENDING" | "RUNNING" | "CONFIGURING")
                ),
                "{}",
                self.diagnose(&format!("the job is {state:?} before its first checkpoint"))
            );
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "{}",
                self.diagnose("no checkpoint within 90 s")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        last_logged_step(&self.run.join("metrics.jsonl")).unwrap_or(0)
    }

    fn scancel(&self, args: &[&str]) {
        let status = Command::new("scancel")
            .args(args)
            .arg(&self.id)
            .env("SLURM_CONF", self.conf)
            .status()
            .expect("scancel");
        assert!(status.success(), "scancel {args:?} {} failed", self.id);
    }

    /// Waits until the job has ended; returns its record.
    fn wait_for_end(&self, start: Instant) -> BTreeMap<String, String> {
        loop {
            let job = self.show();
            let state = job.get("JobState").map(String::as_str).unwrap_or("");
            if matches!(
                state,
                "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT" | "NODE_FAIL"
            ) {
                return job;
            }
            assert!(
                start.elapsed() < Duration::from_secs(240),
                "{}",
                self.diagnose("the job did not end within 240 s")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).expect("the job's log")
    }
}

#[test]
fn preempted_job_requeues_and_resumes_on_a_real_slurm() {
    let Some(cluster) = start_cluster("preempted_job_requeues_and_resumes_on_a_real_slurm") else {
        return;
    };
    let conf = cluster.conf.as_str();
    let work = workdir();
    let w = work.path();
    write_recipe(w, "job.toml", &slurm_recipe());

    // The uninterrupted reference, alongside (one thread each; the machine has two cores).
    let reference = spawn(w, &["run", "job.toml", "--set", "run.out_dir=reference"]);

    let start = Instant::now();
    let job = Job::submit(conf, w, "job.toml", "preempted", "run");
    let id = job.id.clone();
    // Once the job has written a checkpoint, send the pre-emption warning to its tasks, as
    // `#SBATCH --signal=USR1@120` does before the time limit.
    let signalled_at = job.wait_for_checkpoint(start);
    job.scancel(&["--signal=USR1"]);

    // It checkpoints, exits 75, requeues itself, waits out the requeue delay, resumes, finishes.
    let end = job.wait_for_end(start);
    assert_eq!(
        (
            end["JobState"].as_str(),
            end["Restarts"].as_str(),
            end["ExitCode"].as_str()
        ),
        ("COMPLETED", "1", "0:0"),
        "{}",
        job.diagnose("expected one requeue and success")
    );
    let text = job.log_text();
    for needle in [
        format!("job {id} start 1 "),
        "stopped by signal after step".to_string(),
        "requeueing".to_string(),
        format!("job {id} start 2 "),
        "the run finished".to_string(),
    ] {
        assert!(text.contains(&needle), "{needle:?} not in the log:\n{text}");
    }

    let reference = reference.wait(TIMEOUT);
    reference.assert_success();
    let summary = |run: &str| read_summary(&w.join(run));
    let (a, b) = (summary("reference"), summary("run"));
    let resumed_from = b["resumed_from"].as_str().unwrap_or_default().to_string();
    assert!(
        resumed_from.contains("step-"),
        "the second start resumed from a checkpoint: {b}"
    );
    for key in ["steps", "tokens", "final_train_loss", "final_valid_loss"] {
        assert_eq!(
            a[key], b[key],
            "{key}: uninterrupted vs pre-empted and requeued"
        );
    }
    // Every logged training step, bitwise, once each.
    let rows = |run: &str| -> BTreeMap<i64, f64> {
        let mut m = BTreeMap::new();
        for r in train_rows(&read_metrics(&w.join(run).join("metrics.jsonl"))) {
            assert!(
                m.insert(step_of(&r), num(&r, "loss")).is_none(),
                "{run}: a step logged twice"
            );
        }
        m
    };
    assert_eq!(rows("reference"), rows("run"));
    eprintln!(
        "slurm job {id}: signalled after step {signalled_at}, {resumed_from}, final train loss {} \
         (uninterrupted: {}), {:.0} s",
        b["final_train_loss"],
        a["final_train_loss"],
        start.elapsed().as_secs_f64()
    );

    // A plain `scancel` is the user ending the job: SIGTERM to the tasks and the batch shell; the
    // tasks checkpoint, and the job is not requeued.
    let start = Instant::now();
    let job = Job::submit(conf, w, "job.toml", "cancelled", "cancelled");
    let cancelled_at = job.wait_for_checkpoint(start);
    job.scancel(&[]);
    let end = job.wait_for_end(start);
    assert_eq!(
        (end["JobState"].as_str(), end["Restarts"].as_str()),
        ("CANCELLED", "0"),
        "{}",
        job.diagnose("expected a cancelled job, not requeued")
    );
    let text = job.log_text();
    for needle in ["SIGTERM", "the run exited with code 75"] {
        assert!(text.contains(needle), "{needle:?} not in the log:\n{text}");
    }
    assert!(!text.contains("requeueing"), "{text}");
    let newest = checkpoint_entries(&job.run)
        .iter()
        .filter_map(|n| n.strip_prefix("step-")?.parse::<i64>().ok())
        .max()
        .unwrap_or(0);
    assert!(
        newest > cancelled_at,
        "the SIGTERM should leave a checkpoint newer than step {cancelled_at}, newest: {newest}\n{text}"
    );
}

// ---- sweeps as job arrays (`trainer sweep --slurm`) --------------------------------------------

/// The tiny recipe, 10 steps, evaluating at 5 and 10, a checkpoint every 5.
fn short_recipe() -> String {
    let r = tiny_recipe("unused");
    let r = replace_line(&r, "max_steps = 40", "max_steps = 10");
    replace_line(&r, "eval_every = 10", "eval_every = 5")
}

/// 2 learning rates x 2 seeds: 4 runs.
const LR_SWEEP: &str = "[sweep]\nbase = \"tiny.toml\"\nseeds = [1, 2]\n\
                        [sweep.grid]\n\"optim.lr\" = [1e-3, 3e-3]\n";

#[test]
fn writes_the_sweep_array_script() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &short_recipe());
    write_recipe(w, "lr.toml", LR_SWEEP);
    let out = trainer(
        w,
        &[
            "sweep",
            "lr.toml",
            "--slurm",
            "--gpus-per-node",
            "2",
            "--max-parallel",
            "3",
            "--time",
            "02:00:00",
            "--partition",
            "gpu",
            "--cpus-per-task",
            "4",
        ],
    );
    out.assert_success();
    // Where the script went and how to collect the results afterwards.
    for needle in [
        "wrote lr.sbatch (job array 0-3%3: 4 runs",
        "sbatch lr.sbatch",
        "trainer sweep lr.toml --collect",
    ] {
        assert!(
            out.stderr.contains(needle),
            "{needle:?}: {}",
            out.describe()
        );
    }
    let script = std::fs::read_to_string(w.join("lr.sbatch")).expect("the script");
    let dir = w.display().to_string();
    for line in [
        "#SBATCH --job-name=lr".to_string(),
        "#SBATCH --array=0-3%3".to_string(),
        "#SBATCH --nodes=1".to_string(),
        "#SBATCH --ntasks-per-node=2".to_string(),
        "#SBATCH --gpus-per-node=2".to_string(),
        "#SBATCH --cpus-per-task=4".to_string(),
        "#SBATCH --time=02:00:00".to_string(),
        "#SBATCH --partition=gpu".to_string(),
        format!("#SBATCH --chdir={dir}"),
        format!("#SBATCH --output={dir}/slurm-%x-%A_%a.out"),
        "#SBATCH --open-mode=append".to_string(),
        "#SBATCH --requeue".to_string(),
        "#SBATCH --signal=USR1@120".to_string(),
        format!("sweep={dir}/lr.toml"),
        format!("out_dir={dir}/runs/lr"),
        "index=\"${SLURM_ARRAY_TASK_ID:?".to_string(),
        "srun \"$trainer\" sweep \"$sweep\" --index \"$index\" --wait-for-lock 300".to_string(),
        "    if scontrol requeue \"$SLURM_JOB_ID\"; then".to_string(),
    ] {
        assert!(
            script.lines().any(|l| l.starts_with(&line)),
            "no line starting with {line:?} in:\n{script}"
        );
    }
    assert!(!script.contains("{{"), "an unfilled placeholder:\n{script}");
    let syntax = Command::new("bash")
        .args(["-n", "lr.sbatch"])
        .current_dir(w)
        .status()
        .expect("bash");
    assert!(syntax.success(), "bash -n refuses the script:\n{script}");

    // No throttle without --max-parallel; CPU-only: one task, no GPUs; another warning time.
    trainer(
        w,
        &[
            "sweep",
            "lr.toml",
            "--slurm",
            "--gpus-per-node",
            "0",
            "--signal-lead",
            "300",
            "--out",
            "cpu.sbatch",
        ],
    )
    .assert_success();
    let cpu = std::fs::read_to_string(w.join("cpu.sbatch")).expect("the script");
    for line in [
        "#SBATCH --array=0-3\n",
        "#SBATCH --ntasks-per-node=1\n",
        "#SBATCH --signal=USR1@300\n",
    ] {
        assert!(cpu.contains(line), "{line:?} not in:\n{cpu}");
    }
    assert!(!cpu.contains("--gpus-per-node"), "{cpu}");
    // Writing the script starts nothing.
    assert!(!w.join("runs").exists());
}

#[test]
fn sweep_array_bad_input() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &short_recipe());
    write_recipe(w, "lr.toml", LR_SWEEP);
    let base = ["sweep", "lr.toml", "--slurm", "--gpus-per-node", "0"];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        a
    }
    trainer(w, &with(&base, &["--max-parallel", "0"]))
        .assert_one_error(&["--max-parallel", "positive"]);
    trainer(w, &["sweep", "lr.toml", "--slurm"]).assert_one_error(&["--gpus-per-node"]);
    // trainer slurm's checks, with its messages.
    trainer(w, &with(&base, &["--time", "1h"])).assert_one_error(&["--time 1h", "HH:MM:SS"]);
    trainer(w, &with(&base, &["--time", "00:01:00"]))
        .assert_one_error(&["--time 00:01:00", "--signal-lead"]);
    trainer(w, &with(&base, &["--cpus-per-task", "0"])).assert_one_error(&["--cpus-per-task"]);
    trainer(w, &with(&base, &["--partition", "a b"])).assert_one_error(&["--partition", "#SBATCH"]);
    let empty = w.join("empty-path");
    std::fs::create_dir(&empty).expect("mkdir");
    let line = trainer_with_env(
        w,
        &with(&base, &["--submit"]),
        &[("PATH", Some(empty.to_str().expect("utf-8 path")))],
    )
    .assert_one_error(&[]);
    assert_eq!(line, "error: --submit needs sbatch on PATH");
    // Job flags without --slurm would be silently ignored by the local runner: refused.
    trainer(w, &["sweep", "lr.toml", "--time", "10"]).assert_one_error(&["--time", "--slurm"]);
    // The sweep's own errors, before anything is written: a grid key with no values (an empty
    // sweep), a key the recipe does not have, a missing sweep file.
    write_recipe(
        w,
        "empty.toml",
        "[sweep]\nbase = \"tiny.toml\"\n[sweep.grid]\n\"optim.lr\" = []\n",
    );
    trainer(
        w,
        &["sweep", "empty.toml", "--slurm", "--gpus-per-node", "0"],
    )
    .assert_one_error(&[
        "empty.toml",
        "sweep.grid.\"optim.lr\"",
        "at least one value",
    ]);
    write_recipe(
        w,
        "typo.toml",
        "[sweep]\nbase = \"tiny.toml\"\n[sweep.grid]\n\"optim.lrr\" = [1e-3]\n",
    );
    trainer(
        w,
        &["sweep", "typo.toml", "--slurm", "--gpus-per-node", "0"],
    )
    .assert_one_error(&["sweep key \"optim.lrr\"", "unknown field `lrr`"]);
    trainer(
        w,
        &["sweep", "missing.toml", "--slurm", "--gpus-per-node", "0"],
    )
    .assert_one_error(&["missing.toml"]);
    // --slurm with --index or --parallel is a usage error: one line, exit code 1.
    for extra in [["--index", "1"], ["--parallel", "2"]] {
        let out = trainer(w, &with(&base, &extra));
        assert_eq!(out.code, Some(1), "{}", out.describe());
        out.assert_one_error(&[extra[0]]);
    }
    let names = file_names(w, |n| n.ends_with(".sbatch"));
    assert!(names.is_empty(), "bad input wrote a script: {names:?}");
}

/// `--submit` submits the array, prints its id, and submits the collect job after it.
#[test]
fn sweep_array_submit_prints_the_array_id_and_queues_the_collect_job() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &short_recipe());
    write_recipe(w, "lr.toml", LR_SWEEP);
    let fake = w.join("fake-sbatch");
    std::fs::create_dir(&fake).expect("mkdir");
    // The first call (the array) gets job 4242, the second (the collect job) 4243.
    write_exe(
        &fake.join("sbatch"),
        "#!/bin/bash\nn=$(ls calls 2>/dev/null | wc -l)\nmkdir -p calls\n\
         printf '%s\\n' \"$@\" > calls/$n\necho \"$(( 4242 + n ));cluster\"\n",
    );
    // Before the system's PATH: the stand-in uses ls, mkdir and wc.
    let path = format!(
        "{}:{}",
        fake.display(),
        std::env::var("PATH").expect("PATH")
    );
    let path = path.as_str();
    let args = [
        "sweep",
        "lr.toml",
        "--slurm",
        "--gpus-per-node",
        "0",
        "--partition",
        "cpu",
        "--submit",
    ];
    let out = trainer_with_env(w, &args, &[("PATH", Some(path))]);
    out.assert_success();
    assert_eq!(out.stdout, "4242\n", "{}", out.describe());
    for needle in [
        "submitted array job 4242 (4 tasks)",
        "slurm-lr-4242_<index>.out",
        "submitted job 4243: trainer sweep lr.toml --collect",
    ] {
        assert!(
            out.stderr.contains(needle),
            "{needle:?}: {}",
            out.describe()
        );
    }
    let call = |n: usize| -> Vec<String> {
        std::fs::read_to_string(w.join("calls").join(n.to_string()))
            .expect("sbatch was called")
            .lines()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        call(0),
        [
            "--parsable".to_string(),
            w.join("lr.sbatch").display().to_string()
        ]
    );
    let collect = call(1);
    let dir = w.display().to_string();
    for arg in [
        "--parsable".to_string(),
        "--dependency=afterany:4242".to_string(),
        "--job-name=lr-collect".to_string(),
        format!("--chdir={dir}"),
        "--partition=cpu".to_string(),
    ] {
        assert!(collect.contains(&arg), "{arg:?} not in {collect:?}");
    }
    let wrap = collect
        .iter()
        .find(|a| a.starts_with("--wrap="))
        .expect("a --wrap command");
    assert!(
        wrap.ends_with(&format!(" sweep {dir}/lr.toml --collect")),
        "{wrap}"
    );

    // An sbatch that takes the array but refuses the collect job: the array's id still comes
    // out (it is in the queue), with a warning that says how to collect by hand.
    write_exe(
        &fake.join("sbatch"),
        "#!/bin/bash\ncase \"$*\" in *--wrap*) echo 'sbatch: error: no' >&2; exit 1;; esac\n\
         echo 99\n",
    );
    let out = trainer_with_env(w, &args, &[("PATH", Some(path))]);
    out.assert_success();
    assert_eq!(out.stdout, "99\n", "{}", out.describe());
    assert!(
        out.stderr
            .contains("warning: the collect job was not submitted")
            && out.stderr.contains("trainer sweep lr.toml --collect"),
        "{}",
        out.describe()
    );
}

/// The array script's task runs its own index, and requeues only itself after the pre-emption
/// signal (stand-ins for srun and scontrol, as for the single-run script above).
#[test]
fn the_array_script_runs_its_index_and_requeues_the_task() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &short_recipe());
    write_recipe(w, "lr.toml", LR_SWEEP);
    trainer(w, &["sweep", "lr.toml", "--slurm", "--gpus-per-node", "0"]).assert_success();
    let bin = w.join("fake-bin");
    std::fs::create_dir(&bin).expect("mkdir");
    write_exe(
        &bin.join("srun"),
        "#!/bin/bash\necho \"$@\" > \"$FAKE_DIR/srun.args\"\nexit \"$FAKE_SRUN_RC\"\n",
    );
    write_exe(
        &bin.join("scontrol"),
        "#!/bin/bash\necho \"$@\" >> \"$FAKE_DIR/scontrol.calls\"\n",
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").expect("PATH"));
    let case = |rc: i32, task: Option<&str>| -> (Option<i32>, String, String, String) {
        let dir = tempfile::tempdir_in(w).expect("tempdir");
        let mut cmd = Command::new("bash");
        cmd.arg(w.join("lr.sbatch"))
            .current_dir(w)
            .env("PATH", &path)
            .env("FAKE_DIR", dir.path())
            .env("FAKE_SRUN_RC", rc.to_string())
            .env("SLURM_JOB_ID", "57")
            .env("SLURM_ARRAY_JOB_ID", "50")
            .env_remove("SLURM_ARRAY_TASK_ID");
        if let Some(t) = task {
            cmd.env("SLURM_ARRAY_TASK_ID", t);
        }
        let out = cmd.output().expect("bash");
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap_or_default();
        (
            out.status.code(),
            read("srun.args"),
            read("scontrol.calls"),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, srun, calls, out) = case(75, Some("3"));
    assert_eq!((code, calls.as_str()), (Some(0), "requeue 57\n"), "{out}");
    assert!(
        srun.trim_end().ends_with(&format!(
            " sweep {}/lr.toml --index 3 --wait-for-lock 300",
            w.display()
        )),
        "{srun}"
    );
    assert!(out.contains("array 50 task 3 (job 57) start 1"), "{out}");
    let (code, _, calls, out) = case(0, Some("0"));
    assert_eq!((code, calls.as_str()), (Some(0), ""), "{out}");
    assert!(out.contains("task 0: the run finished"), "{out}");
    let (code, _, calls, out) = case(1, Some("1"));
    assert_eq!((code, calls.as_str()), (Some(1), ""), "{out}");
    // Run outside an array: a clear message, srun never started.
    let (code, srun, _, out) = case(0, None);
    assert_ne!(code, Some(0), "{out}");
    assert!(srun.is_empty(), "{srun}");
    assert!(out.contains("not an array task"), "{out}");
}

/// What an array task relies on: `--index I` leaves a finished run alone and resumes a half-done
/// one from its newest checkpoint, to the same result.
#[test]
fn index_skips_a_finished_run_and_resumes_a_half_done_one() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &short_recipe());
    write_recipe(
        w,
        "one.toml",
        "[sweep]\nbase = \"tiny.toml\"\nseeds = [3]\n",
    );
    let run = w.join("runs/one/base/seed=3");
    trainer(w, &["sweep", "one.toml", "--index", "0"]).assert_success();
    let full = read_summary(&run);
    assert_eq!(full["steps"], 10);

    let before = snapshot(&run);
    let again = trainer(w, &["sweep", "one.toml", "--index", "0"]);
    again.assert_success();
    assert!(
        again.stderr.contains("nothing to do"),
        "{}",
        again.describe()
    );
    assert_same_files(
        &before,
        &snapshot(&run),
        "a finished run, run again by --index",
    );

    // Stopped after its step-5 checkpoint (as a pre-empted task leaves it).
    std::fs::remove_file(run.join("summary.json")).expect("removing summary.json");
    std::fs::remove_dir_all(run.join("checkpoints/step-00000010")).expect("removing a checkpoint");
    trainer(w, &["sweep", "one.toml", "--index", "0"]).assert_success();
    let resumed = read_summary(&run);
    assert!(
        resumed["resumed_from"]
            .as_str()
            .expect("resumed_from is set")
            .ends_with("step-00000005"),
        "{resumed}"
    );
    for key in ["steps", "final_train_loss", "final_valid_loss"] {
        assert_eq!(resumed[key], full[key], "{key}");
    }
}

/// `scontrol -o show job ID`: one record per line (an array gives one per task, pending tasks
/// possibly folded into one record).
fn job_records(conf: &str, id: &str) -> Vec<BTreeMap<String, String>> {
    let Ok(out) = Command::new("scontrol")
        .args(["-o", "show", "job", id])
        .env("SLURM_CONF", conf)
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn ended(state: &str) -> bool {
    matches!(
        state,
        "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT" | "NODE_FAIL" | "OUT_OF_MEMORY"
    )
}

/// A sweep submitted with `trainer sweep --slurm --submit` to the test cluster.
struct ArrayJob<'a> {
    conf: &'a str,
    dir: PathBuf,
    name: String,
    id: String,
    /// The job that runs `--collect` after the array.
    collect_id: String,
    tasks: usize,
}

impl ArrayJob<'_> {
    fn submit<'a>(
        conf: &'a str,
        dir: &Path,
        sweep: &str,
        name: &str,
        tasks: usize,
    ) -> ArrayJob<'a> {
        let out = trainer_with_env(
            dir,
            &[
                "sweep",
                sweep,
                "--slurm",
                "--gpus-per-node",
                "0",
                "--cpus-per-task",
                "1",
                "--max-parallel",
                "2",
                "--job-name",
                name,
                "--submit",
            ],
            &[("SLURM_CONF", Some(conf))],
        );
        out.assert_success();
        let id = out.stdout.trim().to_string();
        assert!(id.parse::<u64>().is_ok(), "{}", out.describe());
        let collect_id = out
            .stderr
            .split("submitted job ")
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .unwrap_or_else(|| panic!("no collect job: {}", out.describe()))
            .to_string();
        ArrayJob {
            conf,
            dir: dir.to_path_buf(),
            name: name.to_string(),
            id,
            collect_id,
            tasks,
        }
    }

    fn log(&self, task: usize) -> PathBuf {
        self.dir
            .join(format!("slurm-{}-{}_{task}.out", self.name, self.id))
    }

    fn log_text(&self, task: usize) -> String {
        std::fs::read_to_string(self.log(task)).unwrap_or_default()
    }

    /// The task records, by index, once every task has ended.
    fn ended_tasks(&self) -> Option<BTreeMap<usize, BTreeMap<String, String>>> {
        let mut tasks = BTreeMap::new();
        for r in job_records(self.conf, &self.id) {
            let index = r.get("ArrayTaskId")?.parse::<usize>().ok()?;
            if !ended(r.get("JobState")?) {
                return None;
            }
            tasks.insert(index, r);
        }
        (tasks.len() == self.tasks).then_some(tasks)
    }

    fn diagnose(&self, what: &str) -> String {
        let mut text = format!("{what}\n--- scontrol show job {} ---\n", self.id);
        for r in job_records(self.conf, &self.id) {
            text += &format!("{r:?}\n");
        }
        for t in 0..self.tasks {
            text += &format!("--- {} ---\n{}\n", self.log(t).display(), self.log_text(t));
        }
        text
    }

    /// Waits until every task has ended; returns their records by index.
    fn wait_for_end(&self, start: Instant) -> BTreeMap<usize, BTreeMap<String, String>> {
        loop {
            if let Some(tasks) = self.ended_tasks() {
                return tasks;
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "{}",
                self.diagnose("the array did not end within 180 s")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits for the collect job (the job after the array) to end; returns its record.
    fn wait_for_collect_job(&self, start: Instant) -> BTreeMap<String, String> {
        let id = &self.collect_id;
        loop {
            if let Some(r) = job_records(self.conf, id).into_iter().next() {
                assert_eq!(
                    r.get("JobName").map(String::as_str),
                    Some(format!("{}-collect", self.name).as_str()),
                    "job {id}: {r:?}"
                );
                if r.get("JobState").is_some_and(|s| ended(s)) {
                    return r;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "{}",
                self.diagnose("the collect job did not end within 180 s")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn sweep_array_runs_every_point_on_a_real_slurm() {
    let Some(cluster) = start_cluster("sweep_array_runs_every_point_on_a_real_slurm") else {
        return;
    };
    let conf = cluster.conf.as_str();
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &short_recipe());
    // Two points x two seeds: a long one (about 5 s, a checkpoint every 100 steps; tasks 0 and
    // 1), which is signalled mid-run, and the short base (tasks 2 and 3).
    write_recipe(
        w,
        "arr.toml",
        r#"
[sweep]
base = "tiny.toml"
seeds = [1, 2]
[[sweep.points]]
"train.max_steps" = 2000
"train.checkpoint_every" = 100
"train.log_every" = 50
"train.eval_every" = 1000
[[sweep.points]]
"train.max_steps" = 10
"#,
    );
    // The run directories in array order.
    let listed = trainer(w, &["sweep", "arr.toml", "--dry-run"]);
    listed.assert_success();
    let runs: Vec<PathBuf> = listed
        .stdout
        .lines()
        .map(|l| w.join(l.trim_start_matches("new").trim()))
        .collect();
    assert_eq!(runs.len(), 4, "{}", listed.describe());
    assert!(
        runs[0].display().to_string().contains("max_steps=2000"),
        "{runs:?}"
    );

    let start = Instant::now();
    let job = ArrayJob::submit(conf, w, "arr.toml", "arr", 4);
    let id = job.id.clone();
    // Task 0 gets the pre-emption warning after its first checkpoint.
    while !checkpoint_entries(&runs[0])
        .iter()
        .any(|n| n.starts_with("step-"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{}",
            job.diagnose("task 0 wrote no checkpoint within 90 s")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // To the trainer process itself: `scancel --signal=USR1 ID_0` would do the same, but Slurm
    // 22.05 answers it with "Job can not be altered now" while other tasks of the array are
    // pending, and scancel then retries every few seconds, signalling the task again after its
    // requeue. (The time-limit warning, #SBATCH --signal, comes from slurmctld itself.)
    let task_job = job_records(conf, &id)
        .into_iter()
        .find(|r| r.get("ArrayTaskId").map(String::as_str) == Some("0"))
        .and_then(|r| r.get("JobId").cloned())
        .unwrap_or_else(|| panic!("{}", job.diagnose("no record of task 0")));
    let pids = Command::new("scontrol")
        .args(["listpids", &task_job])
        .env("SLURM_CONF", conf)
        .output()
        .expect("scontrol listpids");
    // PID JOBID STEPID LOCALID GLOBALID: the srun step is step 0.
    let trainer_pids: Vec<u32> = String::from_utf8_lossy(&pids.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"0"))
                .then(|| f[0].parse().ok())
                .flatten()
        })
        .collect();
    assert_eq!(
        trainer_pids.len(),
        1,
        "{}",
        job.diagnose(&format!(
            "scontrol listpids {task_job}:\n{}",
            String::from_utf8_lossy(&pids.stdout)
        ))
    );
    send_signal(trainer_pids[0], "USR1");

    let tasks = job.wait_for_end(start);
    for (i, t) in &tasks {
        let want_restarts = if *i == 0 { "1" } else { "0" };
        assert_eq!(
            (
                t["JobState"].as_str(),
                t["ExitCode"].as_str(),
                t["Restarts"].as_str()
            ),
            ("COMPLETED", "0:0", want_restarts),
            "{}",
            job.diagnose(&format!("task {i}"))
        );
    }
    let text = job.log_text(0);
    for needle in [
        format!("array {id} task 0 "),
        "start 1 ".to_string(),
        "requeueing".to_string(),
        "start 2 ".to_string(),
        "task 0: the run finished".to_string(),
    ] {
        assert!(text.contains(&needle), "{needle:?} not in the log:\n{text}");
    }
    for (run, steps) in runs.iter().zip([2000, 2000, 10, 10]) {
        let s = read_summary(run);
        assert_eq!(s["steps"], steps, "{}", run.display());
    }
    let resumed = read_summary(&runs[0]);
    assert!(
        resumed["resumed_from"]
            .as_str()
            .is_some_and(|r| r.contains("step-")),
        "task 0 resumed from a checkpoint: {resumed}"
    );

    // The collect job ran after the array and wrote the table.
    let collect = job.wait_for_collect_job(start);
    assert_eq!(
        (collect["JobState"].as_str(), collect["ExitCode"].as_str()),
        ("COMPLETED", "0:0"),
        "{collect:?}"
    );
    let table = w.join("runs/arr/results.csv");
    let by_job = std::fs::read_to_string(&table).expect("results.csv from the collect job");
    let check_table = |text: &str| {
        let mut lines = text.lines();
        let header = csv_cells(lines.next().expect("a header"));
        let rows: Vec<Vec<String>> = lines.map(csv_cells).collect();
        assert_eq!(rows.len(), 2, "{text}");
        let col = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .unwrap_or_else(|| panic!("no column {name}: {text}"))
        };
        for row in &rows {
            assert_eq!(row[col("runs")], "2", "{text}");
            assert_eq!(row[col("unfinished")], "0", "{text}");
            assert_eq!(row[col("final_valid_loss_n")], "2", "{text}");
            assert!(
                row[col("final_valid_loss_mean")].parse::<f64>().is_ok(),
                "{text}"
            );
        }
    };
    check_table(&by_job);

    // `--collect` by hand writes the same table.
    std::fs::remove_file(&table).expect("removing results.csv");
    let out = trainer(w, &["sweep", "arr.toml", "--collect"]);
    out.assert_success();
    let by_hand = std::fs::read_to_string(&table).expect("results.csv");
    check_table(&by_hand);
    assert_eq!(by_hand, by_job);
    assert!(out.stdout.contains("| 0 of 2 |"), "{}", out.describe());

    // Submitted again, every task finds its run finished and leaves it alone.
    let before: Vec<_> = runs.iter().map(|r| snapshot(r)).collect();
    let start = Instant::now();
    let again = ArrayJob::submit(conf, w, "arr.toml", "arr", 4);
    for (i, t) in again.wait_for_end(start) {
        assert_eq!(
            t["JobState"],
            "COMPLETED",
            "{}",
            again.diagnose("resubmitted")
        );
        let log = again.log_text(i);
        assert!(log.contains("nothing to do"), "task {i}:\n{log}");
    }
    for (run, b) in runs.iter().zip(&before) {
        assert_same_files(b, &snapshot(run), &run.display().to_string());
    }
    eprintln!(
        "slurm array {id}: 4 tasks, task 0 pre-empted and requeued ({}), collect job {}",
        resumed["resumed_from"], collect["JobId"]
    );
}
