//! Data parallelism on the CPU (c10d's ProcessGroupGloo), end to end with the real binary:
//! two processes (`trainer launch --nproc 2`) with global batch B log the same losses as one
//! process with batch B; a two-process run stopped by a signal (to the launcher or to one rank)
//! and resumed ends exactly like the uninterrupted one; a rank that dies or hangs ends the other
//! with an error within `run.collective_timeout_s`; a port in use and a batch the world size
//! does not divide are one-line errors.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const RECIPE: &str = "tiny.toml";

fn setup() -> tempfile::TempDir {
    let work = workdir();
    write_recipe(work.path(), RECIPE, &tiny_recipe("run"));
    work
}

/// A TCP port that is free now.
fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Starts `trainer run ARGS` as rank `rank` of `world` (torchrun's variables).
fn spawn_rank(cwd: &Path, rank: usize, world: usize, port: u16, args: &[&str]) -> Running {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    spawn_env(
        cwd,
        &all,
        &[
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.to_string()),
        ],
    )
}

/// The ranks a launcher started, by rank (read from their environment).
fn ranks_of(launcher: u32, n: usize) -> Vec<u32> {
    let start = Instant::now();
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
                .unwrap_or_default();
        let mut ranks = vec![0u32; n];
        let mut found = 0;
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            for var in env.split(|&b| b == 0) {
                if let Some(r) = var.strip_prefix(b"RANK=") {
                    let r: usize = String::from_utf8_lossy(r).parse().expect("RANK");
                    ranks[r] = pid;
                    found += 1;
                }
            }
        }
        if found == n {
            return ranks;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "the launcher did not start {n} ranks"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Training losses by step (one row per step).
fn losses(rows: &[Value]) -> BTreeMap<i64, f64> {
    let mut out = BTreeMap::new();
    for r in train_rows(rows) {
        assert!(
            out.insert(step_of(&r), num(&r, "loss")).is_none(),
            "step {} logged twice",
            step_of(&r)
        );
    }
    out
}

fn assert_close(what: &str, a: f64, b: f64, rel: f64) {
    assert!(
        (a - b).abs() <= rel * a.abs().max(b.abs()),
        "{what}: {a} vs {b} (relative difference {:e} > {rel:e})",
        (a - b).abs() / a.abs().max(b.abs())
    );
}

/// Gradient accumulation under data parallel: the earlier micro-batches only accumulate, and the
/// gradients are averaged (overlapped with the last backward pass, in small buckets here) once
/// per step; the curve equals one process's.
#[test]
fn gradient_accumulation_matches_one_process() {
    let work = setup();
    let dir = work.path();
    let set = [
        "--set",
        "train.max_steps=8",
        "--set",
        "train.grad_accum=3",
        "--set",
        "run.bucket_mb=0.01",
    ];
    let one = run_tiny(dir, RECIPE, "one", &set);
    let mut args = vec!["launch", "--nproc", "2", RECIPE, "--set", "run.out_dir=two"];
    args.extend_from_slice(&set);
    trainer(dir, &args).assert_success();
    let two = read_metrics(&dir.join("two/metrics.jsonl"));
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 8);
    for (step, la) in &a {
        assert_close(&format!("grad_accum 3, step {step}"), *la, b[step], 1e-5);
    }
}

#[test]
fn two_processes_match_one_process_with_the_same_global_batch() {
    let work = setup();
    let dir = work.path();
    let steps = ["--set", "train.max_steps=20"];
    let one = run_tiny(dir, RECIPE, "one", &steps);
    let out = trainer(
        dir,
        &[
            "launch",
            "--nproc",
            "2",
            RECIPE,
            "--set",
            "run.out_dir=two",
            "--set",
            "train.max_steps=20",
        ],
    );
    out.assert_success();
    let two = read_metrics(&dir.join("two/metrics.jsonl"));

    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same steps are logged, once each (rank 0 alone writes)"
    );
    assert_eq!(a.len(), 20);
    for (step, la) in &a {
        assert_close(&format!("train loss at step {step}"), *la, b[step], 1e-5);
    }
    let (va, vb) = (eval_rows(&one, "valid"), eval_rows(&two, "valid"));
    assert_eq!(va.len(), vb.len());
    assert!(!va.is_empty());
    for (x, y) in va.iter().zip(&vb) {
        assert_eq!(step_of(x), step_of(y));
        assert_close("valid loss", num(x, "loss"), num(y, "loss"), 1e-5);
    }
    // The same number of tokens: the global batch, not the per-rank one.
    assert_eq!(
        train_rows(&one).last().map(|r| r["tokens"].clone()),
        train_rows(&two).last().map(|r| r["tokens"].clone())
    );
    assert!(dir.join("two/summary.json").exists());
    assert!(dir
        .join("two/checkpoints/step-00000020/model.safetensors")
        .exists());

    // Small buckets (10 KiB): the all-reduces of many buckets start one by one inside the
    // backward pass as their gradients complete, and the curve is the same.
    let out = trainer(
        dir,
        &[
            "--log-level",
            "debug",
            "launch",
            "--nproc",
            "2",
            RECIPE,
            "--set",
            "run.out_dir=buckets",
            "--set",
            "train.max_steps=20",
            "--set",
            "run.bucket_mb=0.01",
        ],
    );
    out.assert_success();
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("gradient buckets:"))
        .unwrap_or_else(|| panic!("no bucket log line:\n{}", out.describe()));
    let counts: Vec<usize> = line
        .split("gradient buckets: ")
        .nth(1)
        .and_then(|rest| {
            let mut words = rest.split_whitespace();
            Some(vec![
                words.next()?.parse().ok()?,
                words.nth(1)?.parse().ok()?,
            ])
        })
        .unwrap_or_else(|| panic!("unreadable: {line}"));
    assert!(counts[1] > 10 && counts[0] == counts[1], "{line}");
    let c = losses(&read_metrics(&dir.join("buckets/metrics.jsonl")));
    for (step, la) in &a {
        assert_close(&format!("small buckets, step {step}"), *la, c[step], 1e-5);
    }

    // A checkpoint does not depend on the number of processes: one process continues it.
    let ckpt = dir.join("two/checkpoints/step-00000015");
    let ckpt = ckpt.to_str().expect("utf-8 path");
    let cont = run_tiny(
        dir,
        RECIPE,
        "cont",
        &["--set", "train.max_steps=20", "--resume", ckpt],
    );
    let c = losses(&cont);
    assert_eq!(
        c.keys().copied().collect::<Vec<_>>(),
        (16..=20).collect::<Vec<_>>()
    );
    for (step, lc) in &c {
        assert_close(
            &format!("1-process continuation at step {step}"),
            b[step],
            *lc,
            1e-5,
        );
    }
}

#[test]
fn a_stopped_two_process_run_resumes_to_the_same_final_loss() {
    let work = setup();
    let dir = work.path();
    let n = "train.max_steps=300";
    fn as_refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let launch = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["launch", "--nproc", "2", RECIPE, "--set", n, "--set"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(format!("run.out_dir={out}"));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    let full = launch("full", &[]);
    trainer(dir, &as_refs(&full)).assert_success();
    let reference = read_metrics(&dir.join("full/metrics.jsonl"));

    // SIGTERM to the launcher: forwarded to both ranks, one checkpoint, exit 75.
    let metrics = dir.join("cut/metrics.jsonl");
    let first = launch("cut", &[]);
    let mut proc = spawn(dir, &as_refs(&first));
    wait_for_step(&mut proc, &metrics, 5);
    send_signal(proc.pid(), "TERM");
    let out = proc.wait(TIMEOUT);
    assert_eq!(out.code, Some(EXIT_INTERRUPTED), "{}", out.describe());
    let stopped_at = last_logged_step(&metrics).expect("a logged step");
    assert!(stopped_at < 300, "stopped before the end");
    assert!(
        dir.join(format!("cut/checkpoints/step-{stopped_at:08}"))
            .exists(),
        "the checkpoint of the last step, {stopped_at}"
    );

    // SIGTERM to rank 1 only: both ranks stop after the same step, rank 0 checkpoints.
    let second = launch("cut", &["--resume", "auto"]);
    let mut proc = spawn(dir, &as_refs(&second));
    let ranks = ranks_of(proc.pid(), 2);
    wait_for_step(&mut proc, &metrics, stopped_at + 5);
    send_signal(ranks[1], "TERM");
    let out = proc.wait(TIMEOUT);
    assert_eq!(out.code, Some(EXIT_INTERRUPTED), "{}", out.describe());
    let stopped_again = last_logged_step(&metrics).expect("a logged step");
    assert!(stopped_again > stopped_at && stopped_again < 300);
    assert!(dir
        .join(format!("cut/checkpoints/step-{stopped_again:08}"))
        .exists());

    trainer(dir, &as_refs(&second)).assert_success();
    let resumed = read_metrics(&metrics);
    let (a, b) = (losses(&reference), losses(&resumed));
    assert_eq!(a.len(), 300);
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "every step logged once across the three starts"
    );
    for (step, la) in &a {
        assert_eq!(
            la.to_bits(),
            b[step].to_bits(),
            "step {step}: loss {} resumed vs {la} uninterrupted",
            b[step]
        );
    }
    let last_valid = |rows: &[Value]| eval_rows(rows, "valid").last().map(|r| num(r, "loss"));
    assert_eq!(last_valid(&reference), last_valid(&resumed));
}

#[test]
fn a_port_in_use_is_one_line() {
    let work = setup();
    let dir = work.path();
    let taken = std::net::TcpListener::bind(("0.0.0.0", 0)).expect("a port");
    let port = taken.local_addr().expect("addr").port().to_string();
    let out = trainer(
        dir,
        &["launch", "--nproc", "2", "--master-port", &port, RECIPE],
    );
    assert_eq!(out.code, Some(1), "{}", out.describe());
    out.assert_one_error(&["--master-port", &port, "already in use"]);

    // Rank 0 started by hand (torchrun's variables) on the taken port.
    let out = spawn_rank(dir, 0, 2, port.parse().expect("port"), &[RECIPE]).wait(TIMEOUT);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    out.assert_one_error(&["MASTER_PORT", &port, "already in use"]);
    assert!(!dir.join("run").exists(), "nothing written");
}

#[test]
fn a_batch_the_world_size_does_not_divide_is_one_line() {
    let work = setup();
    let dir = work.path();
    let out = trainer(dir, &["launch", "--nproc", "3", RECIPE]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    out.assert_one_error(&["train.batch_size", "4", "3 processes"]);
    let out = spawn_rank(dir, 1, 3, free_port(), &[RECIPE]).wait(TIMEOUT);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    out.assert_one_error(&["train.batch_size"]);
    assert!(!dir.join("run").exists(), "nothing written");
}

#[test]
fn bad_collective_timeout_is_refused() {
    let work = setup();
    let out = trainer(
        work.path(),
        &["validate", RECIPE, "--set", "run.collective_timeout_s=0"],
    );
    assert_eq!(out.code, Some(1), "{}", out.describe());
    out.assert_one_error(&["run.collective_timeout_s"]);
}

/// Starts two ranks by hand on the long tiny run and waits until they train.
fn two_ranks(dir: &Path, timeout_s: u32) -> (Running, Running) {
    let port = free_port();
    let timeout = format!("run.collective_timeout_s={timeout_s}");
    let args = [RECIPE, "--set", "train.max_steps=100000", "--set", &timeout];
    let r0 = spawn_rank(dir, 0, 2, port, &args);
    let r1 = spawn_rank(dir, 1, 2, port, &args);
    let mut r0 = r0;
    wait_for_step(&mut r0, &dir.join("run/metrics.jsonl"), 3);
    (r0, r1)
}

#[test]
fn a_killed_rank_ends_the_other_with_an_error() {
    let work = setup();
    let dir = work.path();
    let (r0, mut r1) = two_ranks(dir, 20);
    let killed = Instant::now();
    send_signal(r1.pid(), "KILL");
    let _ = r1.child.wait();
    let out = r0.wait(Duration::from_secs(60));
    let waited = killed.elapsed();
    assert_eq!(out.code, Some(1), "{}", out.describe());
    out.assert_one_error(&["rank 0 of 2", "another rank died or stopped"]);
    assert!(
        waited < Duration::from_secs(25),
        "rank 0 took {waited:?} to give up"
    );
}

#[test]
fn a_hung_rank_ends_the_other_after_the_collective_timeout() {
    let work = setup();
    let dir = work.path();
    let (r0, r1) = two_ranks(dir, 4);
    let stopped = Instant::now();
    send_signal(r1.pid(), "STOP");
    let out = r0.wait(Duration::from_secs(60));
    let waited = stopped.elapsed();
    send_signal(r1.pid(), "KILL");
    let _ = r1.wait(TIMEOUT);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    out.assert_one_error(&["rank 0 of 2", "timed out after 4s", "collective_timeout_s"]);
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(30),
        "rank 0 gave up after {waited:?}, expected about the 4 s timeout"
    );
}

#[test]
fn the_launcher_stops_the_others_when_a_rank_dies() {
    let work = setup();
    let dir = work.path();
    let mut proc = spawn(
        dir,
        &[
            "launch",
            "--nproc",
            "2",
            RECIPE,
            "--set",
            "train.max_steps=100000",
        ],
    );
    let ranks = ranks_of(proc.pid(), 2);
    wait_for_step(&mut proc, &dir.join("run/metrics.jsonl"), 3);
    send_signal(ranks[1], "KILL");
    let out = proc.wait(Duration::from_secs(60));
    // The killed rank's status (128 + SIGKILL) is the worst one.
    assert_eq!(out.code, Some(137), "{}", out.describe());
    assert!(
        out.stderr.contains("launch: rank 1 exited with code 137"),
        "{}",
        out.describe()
    );
}

/// The optimizers with more than per-element state stay in step across ranks: they see the same
/// averaged gradients, so GaLore's SVD projections, ReLoRA's merges and re-drawn factors and
/// GSM's global selection are the same on every rank, and the two-process run follows the
/// one-process run.
#[test]
fn galore_relora_and_gsm_match_one_process_under_two() {
    let work = workdir();
    let dir = work.path();
    let tiny = tiny_recipe("run");
    let adamw = "kind = \"adamw\"";
    let variants = [
        (
            "galore",
            replace_line(&tiny, adamw, "kind = \"galore_adamw\"\nrank = 4\nupdate_proj_gap = 5"),
        ),
        (
            "relora",
            format!(
                "{tiny}\n[peft]\nkind = \"relora\"\nrank = 2\nalpha = 4\ntarget = [\"q_proj\", \"v_proj\", \"mlp.*\"]\n\
                 merge_every = 6\noptimizer_reset = \"magnitude\"\nkeep_fraction = 0.1\nrewarm_steps = 2\n\
                 full_rank_warmup_steps = 4\n"
            ),
        ),
        (
            "gsm",
            replace_line(
                &replace_line(&tiny, adamw, "kind = \"gsm\"\ndensity = 0.5\ncut_step = 10"),
                "lr = 3e-3",
                "lr = 0.05",
            ),
        ),
    ];
    for (name, text) in &variants {
        let recipe = write_recipe(dir, &format!("{name}.toml"), text);
        let steps = ["--set", "train.max_steps=16"];
        let one = run_tiny(dir, &recipe, &format!("{name}-1"), &steps);
        let out_dir = format!("run.out_dir={name}-2");
        let out = trainer(
            dir,
            &[
                "launch",
                "--nproc",
                "2",
                &recipe,
                "--set",
                &out_dir,
                "--set",
                "train.max_steps=16",
            ],
        );
        out.assert_success();
        let two = read_metrics(&dir.join(format!("{name}-2/metrics.jsonl")));
        let (a, b) = (losses(&one), losses(&two));
        assert_eq!(a.len(), 16, "{name}");
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (step, la) in &a {
            assert_close(
                &format!("{name}: train loss at step {step}"),
                *la,
                b[step],
                1e-5,
            );
        }
    }
}

/// Image classification on two processes: BatchNorm normalises each rank's rows by their own
/// statistics (as DistributedDataParallel without SyncBatchNorm), so the curve follows the
/// one-process run closely but not exactly; resuming a two-process checkpoint replays the
/// uninterrupted two-process run bitwise.
#[test]
fn classify_trains_on_two_processes_and_resumes_exactly() {
    let work = workdir();
    let dir = work.path();
    let recipe = write_recipe(
        dir,
        "cls.toml",
        "[run]\nname = \"cls\"\ntask = \"classify\"\nseed = 3\nout_dir = \"one\"\ndevice = \"cpu\"\nthreads = 1\n\n\
             [model]\nkind = \"cifar_resnet\"\ndepth = 8\nnum_classes = 10\n\n\
             [data]\ntrain = { kind = \"builtin_shapes\", split = \"train\", images = 400 }\n\
             valid = { kind = \"builtin_shapes\", split = \"test\", images = 64 }\ncrop_padding = 4\nhflip = true\n\n\
             [optim]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.9\n\n\
             [schedule]\nkind = \"cosine\"\nwarmup_steps = 2\n\n\
             [train]\nbatch_size = 16\nmax_steps = 12\neval_every = 6\nlog_every = 1\ncheckpoint_every = 6\nkeep_checkpoints = 5\n",
    );
    trainer(dir, &["run", &recipe]).assert_success();
    let launch = |out: &str, extra: &[&str]| {
        let out_dir = format!("run.out_dir={out}");
        let mut args = vec!["launch", "--nproc", "2", &recipe, "--set", &out_dir];
        args.extend_from_slice(extra);
        trainer(dir, &args).assert_success();
        read_metrics(&dir.join(out).join("metrics.jsonl"))
    };
    let two = launch("two", &[]);
    let one = read_metrics(&dir.join("one/metrics.jsonl"));
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert_close("first loss", a[&1], b[&1], 0.02);
    assert!(
        dir.join("two/summary.json").exists() && dir.join("two/checkpoints/step-00000012").exists()
    );

    let ckpt = dir.join("two/checkpoints/step-00000006");
    let resumed = launch("resumed", &["--resume", ckpt.to_str().expect("utf-8 path")]);
    let c = losses(&resumed);
    for step in 7..=12 {
        assert_eq!(
            b[&step].to_bits(),
            c[&step].to_bits(),
            "step {step}: {} vs {}",
            c[&step],
            b[&step]
        );
    }
    let valid = |rows: &[Value]| eval_rows(rows, "valid").last().map(|r| num(r, "loss"));
    assert_eq!(valid(&two), valid(&resumed));
}

/// A `[[stages]]` recipe runs its stages one after another in the same processes, on one
/// process group (joined once), and follows the one-process run.
#[test]
fn stages_run_on_two_processes_like_on_one() {
    let work = workdir();
    let dir = work.path();
    let base = replace_line(&tiny_recipe("run"), "max_steps = 40", "");
    let recipe = write_recipe(
        dir,
        "staged.toml",
        &format!(
            "{base}\n[[stages]]\nname = \"first\"\nsteps = 8\n\n[[stages]]\nname = \"second\"\nsteps = 8\n\
             set = {{ \"optim.lr\" = 1e-3 }}\n"
        ),
    );
    let one = run_tiny(dir, &recipe, "one", &[]);
    let out = trainer(
        dir,
        &[
            "launch",
            "--nproc",
            "2",
            &recipe,
            "--set",
            "run.out_dir=two",
        ],
    );
    out.assert_success();
    assert_eq!(
        out.stderr.matches("rendezvous at").count(),
        1,
        "one process group for both stages:\n{}",
        out.describe()
    );
    let two = read_metrics(&dir.join("two/metrics.jsonl"));
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 16);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (step, la) in &a {
        assert_close(&format!("train loss at step {step}"), *la, b[step], 1e-5);
    }
}
