//! `[schedule]` read through a whole recipe: a schedule is a pure function of (recipe, step),
//! validation messages name the key, and the classic kinds keep their meaning. (The schedule's
//! own values at every boundary are tested in `schedule/tests.rs`.)

use crate::config::{self, Override};
use crate::schedule::{Schedule, ScheduleConfig};

#[track_caller]
fn at(s: &Schedule, step: i64, want: f64) {
    let got = s.lr(step);
    assert!(
        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
        "step {step}: lr {got}, expected {want} ({s:?})"
    );
}
const RECIPE: &str = r#"[run]
name = "t"
out_dir = "runs/t"

[model]
kind = "llama"
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 4
d_ff = 64
max_seq_len = 32

[data]
seq_len = 16
train = { kind = "builtin" }

[optim]
kind = "adamw"
lr = 1e-3

[train]
batch_size = 4
max_steps = 100

[schedule]
kind = "phases"
start_lr = 1e-5

[[schedule.phases]]
shape = "warmup"
steps = 10
to = 1e-3

[[schedule.phases]]
shape = "constant"

[[schedule.phases]]
shape = "sqrt"
steps = 20
to = 1e-5
"#;

fn build(text: &str, overrides: &[&str]) -> Schedule {
    let ovs: Vec<Override> = overrides
        .iter()
        .map(|o| Override::parse(o).expect("override"))
        .collect();
    let r = config::parse(text, "r.toml", &ovs).expect("valid recipe");
    Schedule::new(&r.schedule, r.optim.lr(), r.max_steps())
}

#[test]
fn a_schedule_is_a_pure_function_of_recipe_and_step() {
    // Nothing is saved in checkpoints: a resumed run rebuilds the schedule from the recipe (or
    // from the resolved config.toml of the run directory) and must see the same values.
    let a = build(RECIPE, &[]);
    let b = build(RECIPE, &[]);
    let resolved = config::to_toml(&config::parse(RECIPE, "r.toml", &[]).expect("valid"));
    let c = build(&resolved, &[]);
    assert_eq!(a, b);
    assert_eq!(a, c);
    for step in 0..=a.total_steps {
        assert_eq!(a.lr(step).to_bits(), b.lr(step).to_bits(), "step {step}");
        assert_eq!(a.lr(step).to_bits(), c.lr(step).to_bits(), "step {step}");
    }
    // Queried in any order, any number of times.
    let forward: Vec<u64> = (0..100).map(|s| a.lr(s).to_bits()).collect();
    let backward: Vec<u64> = (0..100).rev().map(|s| a.lr(s).to_bits()).rev().collect();
    assert_eq!(forward, backward);
    at(&a, 0, 1e-5 + (1e-3 - 1e-5) / 10.0);
    at(&a, 79, 1e-3);
    at(&a, 90, 1e-5 + (1e-3 - 1e-5) * (1.0 - 0.5f64.sqrt()));
}

fn err(text: &str, overrides: &[&str]) -> String {
    let ovs: Vec<Override> = overrides
        .iter()
        .map(|o| Override::parse(o).expect("override"))
        .collect();
    match config::parse(text, "r.toml", &ovs) {
        Ok(r) => panic!("expected an error, got {:?}", r.schedule),
        Err(e) => e.to_string(),
    }
}

const WSD: &str = "[schedule]\nkind = \"wsd\"\nwarmup_steps = 10\ndecay_fraction = 0.2\n";

fn with_schedule(schedule: &str) -> String {
    let base = RECIPE.split("[schedule]").next().expect("base");
    format!("{base}{schedule}")
}

#[test]
fn validation_messages_name_the_key() {
    let line = |text: &str, prefix: &str| {
        text.lines()
            .position(|l| l.starts_with(prefix))
            .expect("line")
            + 1
    };
    // Phase lengths that do not add up to the run.
    let text = RECIPE.replace(
        "shape = \"constant\"\n",
        "shape = \"constant\"\nsteps = 50\n",
    );
    assert_eq!(
        err(&text, &[]),
        format!(
            "r.toml:{}:12: schedule.phases: the phase lengths add up to 80 steps but the run has \
             100 (train.max_steps); make them add up, or leave out one phase's `steps` to give it \
             the rest",
            line(&text, "[[schedule.phases]]")
        )
    );
    assert_eq!(
        err(RECIPE, &["train.max_steps=30"]),
        "r.toml:35:1: schedule.phases[1].steps: the other phases already take 30 of the run's 30 \
         steps, leaving none for this one"
    );
    let text = RECIPE.replace("steps = 20\n", "");
    assert!(
        err(&text, &[]).ends_with(
            "schedule.phases[2].steps: only one phase may leave out `steps` (it takes the rest \
             of the run); phases[1] already does"
        ),
        "{}",
        err(&text, &[])
    );
    // Warmup exceeding the run.
    assert_eq!(
        err(&with_schedule(WSD), &["schedule.warmup_steps=101"]),
        "--set schedule.warmup_steps=101: schedule.warmup_steps: warmup (101 steps) exceeds the \
         run (100 steps)"
    );
    assert_eq!(
        err(&with_schedule(WSD), &["schedule.warmup_steps=90"]),
        "r.toml:29:1: schedule.decay_fraction: warmup (90 steps) and decay \
         (20 steps, 0.2 of the run) exceed the run (100 steps)"
    );
    // Negative values.
    assert_eq!(
        err(&with_schedule(WSD), &["schedule.warmup_steps=-1"]),
        "--set schedule.warmup_steps=-1: schedule.warmup_steps: expected a non-negative integer, \
         got -1"
    );
    let text = RECIPE.replace("start_lr = 1e-5", "start_lr = -1e-5");
    assert_eq!(
        err(&text, &[]),
        format!(
            "r.toml:{}:1: schedule.start_lr: expected a non-negative number, got -0.00001",
            line(&text, "start_lr")
        )
    );
    let text = RECIPE.replace("steps = 20", "steps = -20");
    assert_eq!(
        err(&text, &[]),
        format!(
            "r.toml:{}:1: schedule.phases[2].steps: expected a positive integer, got -20",
            line(&text, "steps = -20")
        )
    );
    // An LR above the peak, a missing `to`, and keys the shape does not take.
    let text = RECIPE.replace("to = 1e-3", "to = 2e-3");
    assert!(
        err(&text, &[])
            .ends_with("schedule.phases[0].to: to (0.002) must not exceed optim.lr (0.001)"),
        "{}",
        err(&text, &[])
    );
    let text = RECIPE.replace("to = 1e-5\n", "");
    assert!(
        err(&text, &[])
            .ends_with("schedule.phases[2].to: a sqrt phase needs `to`, the LR it ends at"),
        "{}",
        err(&text, &[])
    );
    let text = RECIPE.replace(
        "shape = \"constant\"\n",
        "shape = \"constant\"\nto = 1e-4\n",
    );
    assert!(err(&text, &[]).contains("schedule.phases[1].to: a constant phase takes no `to`"));
    let text = RECIPE.replace("shape = \"constant\"\n", "shape = \"inv_sqrt\"\n");
    assert!(err(&text, &[]).contains("schedule.phases[1].timescale: an inv_sqrt phase needs"));
    // Named kinds.
    assert!(err(&with_schedule(WSD), &["schedule.decay_fraction=1.5"])
        .ends_with("schedule.decay_fraction: expected a fraction in (0, 1], got 1.5"));
    assert!(err(&with_schedule(WSD), &["schedule.min_lr=-1"])
        .ends_with("schedule.min_lr: expected a non-negative number, got -1"));
    let inf = "[schedule]\nkind = \"infinite\"\nwarmup_steps = 10\ncooldown_steps = 50\n\
               constant_lr = 3e-4\nanneal_steps = 50\nmin_lr = 1e-5\n";
    assert!(err(&with_schedule(inf), &[]).ends_with(
        "schedule.cooldown_steps: warmup (10) + cooldown (50) + anneal (50) = 110 steps exceed \
         the run (100 steps)"
    ));
    assert!(err(&with_schedule(inf), &["schedule.min_lr=0"]).ends_with(
        "schedule.min_lr: an exponential anneal needs a positive end LR, got 0 (or choose another \
         shape)"
    ));
    assert!(err(&with_schedule(inf), &["schedule.constant_lr=2e-3"])
        .ends_with("schedule.constant_lr: constant_lr (0.002) must not exceed optim.lr (0.001)"));
    let rewarm = "[schedule]\nkind = \"rewarm\"\nstart_lr = 1e-4\nwarmup_steps = 10\n";
    build(&with_schedule(rewarm), &[]);
    assert!(err(&with_schedule(rewarm), &["schedule.start_lr=-1"])
        .ends_with("schedule.start_lr: expected a non-negative number, got -1"));
    assert!(err(&with_schedule(rewarm), &["schedule.warmup_steps=200"])
        .ends_with("schedule.warmup_steps: warmup (200 steps) exceeds the run (100 steps)"));
}

#[test]
fn classic_recipes_still_parse_with_the_same_meaning() {
    let classic = "[schedule]\nkind = \"cosine\"\nwarmup_steps = 5\nmin_lr = 1e-4\n";
    let r = config::parse(&with_schedule(classic), "r.toml", &[]).expect("valid");
    assert_eq!(
        r.schedule,
        ScheduleConfig::Cosine {
            warmup_steps: 5,
            min_lr: 1e-4
        }
    );
    let r = config::parse(&with_schedule(""), "r.toml", &[]).expect("valid");
    assert_eq!(r.schedule, ScheduleConfig::default());
    let e = err(&with_schedule(classic), &["schedule.min_lr=2e-3"]);
    assert!(
        e.ends_with("schedule.min_lr: min_lr (0.002) must not exceed optim.lr (0.001)"),
        "{e}"
    );
}
