//! `trainer schedule`, end to end: the table and plot on stdout, `--csv` values against the
//! formulas, `--png`, the LR a real run logs equal to the CSV, and one bad-input case per
//! validation rule (exit code 1, one `error:` line naming the key).

mod common;

use common::*;
use std::path::Path;

/// The tiny recipe (lr 3e-3, 40 steps) with its `[schedule]` replaced by `schedule`, written
/// to `work/name`.
fn recipe_with(work: &Path, name: &str, schedule: &str) -> String {
    let text = replace_line(&tiny_recipe("run"), "warmup_steps = 5", "");
    let text = replace_line(&text, "min_lr = 3e-4", "");
    let text = replace_line(&text, "kind = \"cosine\"", schedule);
    write_recipe(work, name, &text)
}

const WSD: &str = "kind = \"wsd\"\nwarmup_steps = 5\ndecay_fraction = 0.25\ndecay_shape = \"linear\"\nmin_lr = 3e-4";

/// `step,lr` rows of a CSV written by `trainer schedule --csv`.
fn read_csv(path: &Path) -> Vec<(i64, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("step,lr"));
    lines
        .map(|l| {
            let (s, lr) = l
                .split_once(',')
                .unwrap_or_else(|| panic!("not step,lr: {l:?}"));
            (s.parse().expect("step"), lr.parse().expect("lr"))
        })
        .collect()
}

#[track_caller]
fn assert_lr(rows: &[(i64, f64)], step: i64, want: f64) {
    let (s, got) = rows[step as usize];
    assert_eq!(s, step);
    assert!(
        (got - want).abs() <= 1e-15,
        "step {step}: lr {got}, expected {want}"
    );
}

#[test]
fn wsd_table_plot_and_csv() {
    let work = workdir();
    let w = work.path();
    let recipe = recipe_with(w, "wsd.toml", WSD);
    let out = trainer(
        w,
        &["schedule", &recipe, "--csv", "lr.csv", "--png", "lr.png"],
    );
    out.assert_success();
    // The table: one row per phase with its first and last step.
    let rows: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    for want in [
        ["0", "warmup", "5", "0", "4", "6.000e-4", "3.000e-3"],
        ["1", "constant", "25", "5", "29", "3.000e-3", "3.000e-3"],
        ["2", "linear", "10", "30", "39", "3.000e-3", "5.700e-4"],
    ] {
        assert!(
            rows.iter().any(|r| r[..] == want[..]),
            "no row {want:?}:\n{}",
            out.describe()
        );
    }
    assert!(
        out.stdout.contains("3.000e-3 |"),
        "no plot:\n{}",
        out.describe()
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("0 |")),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains(&format!("+{}\n", "-".repeat(40))),
        "{}",
        out.describe()
    );
    assert!(out.stdout.contains("39  (step)"), "{}", out.describe());

    // n = 40, max = 3e-3, min = 3e-4: warmup max * (s + 1) / 5 for s < 5; stable to step 29;
    // decay round(0.25 * 40) = 10 steps from 30: max + (min - max) * (s - 30) / 10.
    let (max, min) = (3e-3, 3e-4);
    let rows = read_csv(&w.join("lr.csv"));
    assert_eq!(rows.len(), 40);
    assert_lr(&rows, 0, max * 1.0 / 5.0);
    assert_lr(&rows, 4, max);
    assert_lr(&rows, 5, max);
    assert_lr(&rows, 29, max);
    assert_lr(&rows, 30, max);
    assert_lr(&rows, 35, max + (min - max) * 0.5);
    assert_lr(&rows, 39, max + (min - max) * 0.9);

    // Twice as long (`--steps`): only the decay moves, every step before it is unchanged.
    trainer(
        w,
        &["schedule", &recipe, "--steps", "80", "--csv", "long.csv"],
    )
    .assert_success();
    let long = read_csv(&w.join("long.csv"));
    assert_eq!(long.len(), 80);
    assert_eq!(long[..30], rows[..30]);
    assert_lr(&long, 59, max);
    assert_lr(&long, 70, max + (min - max) * 0.5);

    let png = std::fs::read(w.join("lr.png")).expect("lr.png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[16..24], &[0, 0, 3, 32, 0, 0, 1, 144], "not 800 x 400");
}

#[test]
fn phases_recipe_and_overrides() {
    let work = workdir();
    let w = work.path();
    let schedule = "kind = \"phases\"\nstart_lr = 1e-4\n\n\
                    [[schedule.phases]]\nshape = \"warmup\"\nsteps = 4\nto = 2e-3\n\n\
                    [[schedule.phases]]\nshape = \"inv_sqrt\"\ntimescale = 8.0\n\n\
                    [[schedule.phases]]\nshape = \"cosine\"\nsteps = 10\nto = 0.0";
    let recipe = recipe_with(w, "phases.toml", schedule);
    trainer(
        w,
        &[
            "schedule",
            &recipe,
            "--set",
            "train.max_steps=30",
            "--csv",
            "lr.csv",
        ],
    )
    .assert_success();
    // warmup 1e-4 + (2e-3 - 1e-4) * (s + 1) / 4 for s < 4; inv_sqrt takes the rest, 30 - 14 =
    // 16 steps (4..19): 2e-3 / sqrt(1 + (s - 4) / 8); cosine 10 (20..29) from a = 2e-3 / sqrt(3)
    // to 0: a * (1 + cos(pi (s - 20) / 10)) / 2.
    let rows = read_csv(&w.join("lr.csv"));
    assert_eq!(rows.len(), 30);
    assert_lr(&rows, 0, 1e-4 + (2e-3 - 1e-4) / 4.0);
    assert_lr(&rows, 3, 2e-3);
    assert_lr(&rows, 4, 2e-3);
    assert_lr(&rows, 12, 2e-3 / 2f64.sqrt());
    let a = 2e-3 / 3f64.sqrt();
    assert_lr(&rows, 20, a);
    assert_lr(&rows, 25, a * 0.5);
}

#[test]
fn a_run_logs_the_lr_that_schedule_prints() {
    let work = workdir();
    let w = work.path();
    let recipe = recipe_with(w, "wsd.toml", WSD);
    let short = [
        "--set",
        "train.max_steps=8",
        "--set",
        "schedule.warmup_steps=2",
    ];
    let mut args = vec!["schedule", &recipe, "--csv", "lr.csv"];
    args.extend(short);
    trainer(w, &args).assert_success();
    let mut args = vec![
        "run",
        &recipe,
        "--set",
        "train.eval_every=8",
        "--set",
        "train.checkpoint_every=8",
    ];
    args.extend(short);
    trainer(w, &args).assert_success();
    let csv = read_csv(&w.join("lr.csv"));
    let logged = train_rows(&read_metrics(&w.join("run/metrics.jsonl")));
    assert_eq!(logged.len(), 8);
    for row in &logged {
        // Row `step` is logged after optimizer step `step - 1` (0-based) was taken.
        let (_, want) = csv[(step_of(row) - 1) as usize];
        assert_eq!(
            num(row, "lr").to_bits(),
            want.to_bits(),
            "step {}",
            step_of(row)
        );
    }
}

#[track_caller]
fn refused(work: &Path, recipe: &str, args: &[&str], needles: &[&str]) {
    let mut all = vec!["schedule", recipe];
    all.extend_from_slice(args);
    trainer(work, &all).assert_one_error(needles);
}

#[test]
fn bad_schedules_are_one_line_naming_the_key() {
    let work = workdir();
    let w = work.path();
    let wsd = recipe_with(w, "wsd.toml", WSD);
    // Warmup exceeding the run.
    refused(
        w,
        &wsd,
        &["--set", "schedule.warmup_steps=41"],
        &["schedule.warmup_steps: warmup (41 steps) exceeds the run (40 steps)"],
    );
    // Warmup and decay exceeding the run.
    refused(
        w,
        &wsd,
        &["--set", "schedule.warmup_steps=35"],
        &[
            "wsd.toml:",
            "schedule.decay_fraction: warmup (35 steps) and decay (10 steps",
        ],
    );
    // Negative values.
    refused(
        w,
        &wsd,
        &["--set", "schedule.warmup_steps=-3"],
        &["schedule.warmup_steps: expected a non-negative integer, got -3"],
    );
    refused(
        w,
        &wsd,
        &["--set", "schedule.min_lr=-1e-4"],
        &["schedule.min_lr: expected a non-negative number, got -0.0001"],
    );
    refused(
        w,
        &wsd,
        &["--set", "schedule.decay_fraction=0"],
        &["schedule.decay_fraction: expected a fraction in (0, 1], got 0"],
    );
    // An LR above the peak.
    refused(
        w,
        &wsd,
        &["--set", "schedule.min_lr=1"],
        &["schedule.min_lr: min_lr (1) must not exceed optim.lr (0.003)"],
    );
    // Infinite: lengths over the run, an exponential anneal to 0.
    let inf = recipe_with(
        w,
        "infinite.toml",
        "kind = \"infinite\"\nwarmup_steps = 5\ncooldown_steps = 10\nconstant_lr = 1e-3\n\
         anneal_steps = 5\nmin_lr = 1e-5",
    );
    trainer(w, &["schedule", &inf]).assert_success();
    refused(
        w,
        &inf,
        &["--set", "schedule.anneal_steps=30"],
        &["schedule.cooldown_steps: warmup (5) + cooldown (10) + anneal (30) = 45 steps exceed the run (40 steps)"],
    );
    refused(
        w,
        &inf,
        &["--set", "schedule.min_lr=0"],
        &["schedule.min_lr: an exponential anneal needs a positive end LR, got 0"],
    );
    // Phases that do not add up to the run, and two phases without steps.
    let write_phases = |second: &str| {
        recipe_with(
            w,
            "phases.toml",
            &format!(
                "kind = \"phases\"\n\n[[schedule.phases]]\nshape = \"warmup\"\nsteps = 5\n\
                 to = 3e-3\n\n[[schedule.phases]]\n{second}"
            ),
        )
    };
    let r = write_phases("shape = \"linear\"\nsteps = 30\nto = 0.0\n");
    refused(
        w,
        &r,
        &[],
        &[
            "phases.toml:",
            "schedule.phases: the phase lengths add up to 35 steps but the run has 40",
        ],
    );
    let r =
        write_phases("shape = \"constant\"\n\n[[schedule.phases]]\nshape = \"linear\"\nto = 0.0\n");
    refused(
        w,
        &r,
        &[],
        &["schedule.phases[2].steps: only one phase may leave out `steps`"],
    );
    let r = write_phases("shape = \"linear\"\nsteps = -35\nto = 0.0\n");
    refused(
        w,
        &r,
        &[],
        &["schedule.phases[1].steps: expected a positive integer, got -35"],
    );
    let r = write_phases("shape = \"cosine\"\n");
    refused(
        w,
        &r,
        &[],
        &["schedule.phases[1].to: a cosine phase needs `to`, the LR it ends at"],
    );
    // The training command refuses the same recipe with the same line, before writing anything.
    let line = trainer(w, &["run", &r, "--set", "run.out_dir=never"])
        .assert_one_error(&["schedule.phases[1].to"]);
    assert!(!w.join("never").exists(), "{line}");
    // A length from the command line that the schedule does not fit.
    refused(
        w,
        &wsd,
        &["--steps", "4"],
        &["--steps 4: schedule.warmup_steps: warmup (5 steps) exceeds the run (4 steps)"],
    );
    // An output path in a missing directory.
    refused(
        w,
        &wsd,
        &["--csv", "no/such/dir/lr.csv"],
        &["--csv no/such/dir/lr.csv: no directory"],
    );
    assert!(!w.join("no").exists());
}
