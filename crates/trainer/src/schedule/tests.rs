//! Schedule values at every phase boundary against the formulas (written out in each test), the
//! classic kinds against the implementation they replace, purity, and validation messages.

use super::*;
use std::f64::consts::PI;

const MAX: f64 = 1.0;
const MIN: f64 = 0.1;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

#[track_caller]
fn at(s: &Schedule, step: i64, want: f64) {
    let got = s.lr(step);
    assert!(
        close(got, want),
        "step {step}: lr {got}, expected {want} ({s:?})"
    );
}

fn cosine(warmup_steps: i64) -> ScheduleConfig {
    ScheduleConfig::Cosine {
        warmup_steps,
        min_lr: MIN,
    }
}

/// The schedule this module replaced, verbatim: the classic kinds must keep its values exactly.
fn classic(kind: &str, max: f64, min: f64, w: i64, n: i64, step: i64) -> f64 {
    if step < w {
        return max * (step + 1) as f64 / w as f64;
    }
    let span = (n - w).max(1) as f64;
    let p = ((step - w) as f64 / span).clamp(0.0, 1.0);
    let (hi, lo) = (max, min);
    match kind {
        "cosine" => lo + (hi - lo) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        "linear" => hi - (hi - lo) * p,
        _ => hi,
    }
}

#[test]
fn classic_kinds_keep_their_values_bit_for_bit() {
    for (w, n) in [(0, 7), (10, 110), (30, 600), (5, 40), (3, 3)] {
        for kind in ["cosine", "linear", "constant"] {
            let (max, min) = (3e-3, 3e-4);
            let cfg = match kind {
                "cosine" => ScheduleConfig::Cosine {
                    warmup_steps: w,
                    min_lr: min,
                },
                "linear" => ScheduleConfig::Linear {
                    warmup_steps: w,
                    min_lr: min,
                },
                _ => ScheduleConfig::Constant {
                    warmup_steps: w,
                    min_lr: min,
                },
            };
            let s = Schedule::new(&cfg, max, n);
            for step in 0..n {
                assert_eq!(
                    s.lr(step).to_bits(),
                    classic(kind, max, min, w, n, step).to_bits(),
                    "{kind} w={w} n={n} step={step}"
                );
            }
        }
    }
}

#[test]
fn warmup_is_linear_from_zero_and_ends_at_the_peak() {
    // lr = max * (s + 1) / w for s < w
    let s = Schedule::new(&cosine(10), MAX, 110);
    at(&s, 0, MAX * 1.0 / 10.0);
    at(&s, 4, MAX * 5.0 / 10.0);
    at(&s, 9, MAX);
}

#[test]
fn cosine_boundaries_and_midpoint() {
    // s >= w: min + (max - min) * (1 + cos(pi (s - w) / (n - w))) / 2, w = 10, n = 110
    let s = Schedule::new(&cosine(10), MAX, 110);
    at(&s, 10, MAX);
    at(&s, 60, MIN + (MAX - MIN) * 0.5 * (1.0 + (PI * 0.5).cos()));
    at(
        &s,
        109,
        MIN + (MAX - MIN) * 0.5 * (1.0 + (PI * 99.0 / 100.0).cos()),
    );
    at(&s, 110, MIN); // past the end: the final value holds
    at(&s, 1000, MIN);
    for k in 10..110 {
        assert!(s.lr(k + 1) <= s.lr(k));
    }
}

#[test]
fn linear_and_constant() {
    // linear: max - (max - min) * (s - w) / (n - w)
    let l = Schedule::new(
        &ScheduleConfig::Linear {
            warmup_steps: 10,
            min_lr: MIN,
        },
        MAX,
        110,
    );
    at(&l, 35, MAX - (MAX - MIN) * 0.25);
    let c = Schedule::new(
        &ScheduleConfig::Constant {
            warmup_steps: 10,
            min_lr: MIN,
        },
        MAX,
        110,
    );
    at(&c, 50, MAX);
    at(&c, 109, MAX);
}

fn wsd(decay_shape: DecayShape) -> Schedule {
    let cfg = ScheduleConfig::Wsd {
        warmup_steps: 10,
        decay_fraction: 0.2,
        decay_shape,
        min_lr: MIN,
    };
    Schedule::new(&cfg, MAX, 100)
}

#[test]
fn wsd_boundaries() {
    // n = 100, warmup 10 (steps 0..9), stable 70 (10..79), decay round(0.2 * 100) = 20 (80..99);
    // in the decay p = (s - 80) / 20.
    for shape in [DecayShape::Sqrt, DecayShape::Linear, DecayShape::Cosine] {
        let s = wsd(shape);
        let starts: Vec<i64> = s.phases.iter().map(|p| p.start).collect();
        assert_eq!(starts, [0, 10, 80], "{shape:?}");
        at(&s, 0, MAX / 10.0);
        at(&s, 9, MAX);
        at(&s, 10, MAX);
        at(&s, 79, MAX);
        at(&s, 80, MAX); // the decay starts at the peak: p = 0
        at(&s, 100, MIN);
        let decay = |p: f64| match shape {
            // 1 - sqrt (Hägele et al. 2024): min + (max - min) * (1 - sqrt(p))
            DecayShape::Sqrt => MIN + (MAX - MIN) * (1.0 - p.sqrt()),
            DecayShape::Linear => MAX + (MIN - MAX) * p,
            DecayShape::Cosine => MIN + (MAX - MIN) * 0.5 * (1.0 + (PI * p).cos()),
            DecayShape::Exponential => unreachable!(),
        };
        at(&s, 85, decay(0.25));
        at(&s, 90, decay(0.5));
        at(&s, 99, decay(19.0 / 20.0));
    }
}

#[test]
fn wsd_extended_run_keeps_every_step_before_the_old_decay() {
    // Lengthening the run only moves the decay: a checkpoint from the stable phase continues.
    let cfg = |_n: i64| ScheduleConfig::Wsd {
        warmup_steps: 10,
        decay_fraction: 0.1,
        decay_shape: DecayShape::Linear,
        min_lr: 0.0,
    };
    let short = Schedule::new(&cfg(100), MAX, 100);
    let long = Schedule::new(&cfg(200), MAX, 200);
    for step in 0..90 {
        assert_eq!(
            short.lr(step).to_bits(),
            long.lr(step).to_bits(),
            "step {step}"
        );
    }
}

#[test]
fn infinite_boundaries() {
    // Ibrahim et al. 2024: warmup 10 (0..9) to max; cosine cooldown 20 (10..29) to const;
    // constant (30..89); exponential anneal 10 (90..99) to min: const * (min / const)^p.
    let (konst, min) = (0.4, 0.01);
    let cfg = ScheduleConfig::Infinite {
        warmup_steps: 10,
        cooldown_steps: 20,
        cooldown_shape: DecayShape::Cosine,
        constant_lr: konst,
        anneal_steps: 10,
        anneal_shape: DecayShape::Exponential,
        min_lr: min,
    };
    let s = Schedule::new(&cfg, MAX, 100);
    let starts: Vec<i64> = s.phases.iter().map(|p| p.start).collect();
    assert_eq!(starts, [0, 10, 30, 90]);
    at(&s, 9, MAX);
    at(&s, 10, MAX);
    // cooldown: const + (max - const) * (1 + cos(pi (s - 10) / 20)) / 2
    at(
        &s,
        20,
        konst + (MAX - konst) * 0.5 * (1.0 + (PI * 0.5).cos()),
    );
    at(
        &s,
        29,
        konst + (MAX - konst) * 0.5 * (1.0 + (PI * 19.0 / 20.0).cos()),
    );
    at(&s, 30, konst);
    at(&s, 89, konst);
    at(&s, 90, konst);
    at(&s, 95, konst * (min / konst).powf(0.5));
    at(&s, 99, konst * (min / konst).powf(0.9));
    at(&s, 100, min);
}

#[test]
fn rewarm_boundaries() {
    // Gupta et al. 2023: start + (max - start) * (s + 1) / w for s < w, then cosine to min.
    let start = 0.05;
    let cfg = ScheduleConfig::Rewarm {
        start_lr: start,
        warmup_steps: 10,
        decay_shape: DecayShape::Cosine,
        min_lr: MIN,
    };
    let s = Schedule::new(&cfg, MAX, 100);
    at(&s, 0, start + (MAX - start) * 1.0 / 10.0);
    at(&s, 4, start + (MAX - start) * 5.0 / 10.0);
    at(&s, 9, MAX);
    at(&s, 10, MAX);
    at(
        &s,
        55,
        MIN + (MAX - MIN) * 0.5 * (1.0 + (PI * 45.0 / 90.0).cos()),
    );
    at(
        &s,
        99,
        MIN + (MAX - MIN) * 0.5 * (1.0 + (PI * 89.0 / 90.0).cos()),
    );
    // Without warmup the run starts at the peak.
    let cold = ScheduleConfig::Rewarm {
        start_lr: 0.0,
        warmup_steps: 0,
        decay_shape: DecayShape::Linear,
        min_lr: 0.0,
    };
    at(&Schedule::new(&cold, MAX, 10), 0, MAX);
}

fn phase(shape: PhaseShape, steps: Option<i64>, to: Option<f64>) -> PhaseConfig {
    PhaseConfig {
        shape,
        steps,
        to,
        timescale: None,
    }
}

#[test]
fn phases_boundaries() {
    // n = 100: warmup 10 (0..9) 0 -> 0.8; constant, the rest: 100 - 50 = 50 (10..59);
    // inv_sqrt 20 (60..79), timescale 10: 0.8 / sqrt(1 + t / 10); exponential 10 (80..89) to
    // 0.01: a * (0.01 / a)^p with a = 0.8 / sqrt(3); linear 10 (90..99) to 0.
    let mut inv = phase(PhaseShape::InvSqrt, Some(20), None);
    inv.timescale = Some(10.0);
    let cfg = ScheduleConfig::Phases {
        start_lr: 0.0,
        phases: vec![
            phase(PhaseShape::Warmup, Some(10), Some(0.8)),
            phase(PhaseShape::Constant, None, None),
            inv,
            phase(PhaseShape::Exponential, Some(10), Some(0.01)),
            phase(PhaseShape::Linear, Some(10), Some(0.0)),
        ],
    };
    cfg.check_values(MAX).expect("valid values");
    cfg.check_lengths(MAX, 100).expect("valid lengths");
    let s = Schedule::new(&cfg, MAX, 100);
    let starts: Vec<i64> = s.phases.iter().map(|p| p.start).collect();
    assert_eq!(starts, [0, 10, 60, 80, 90]);
    at(&s, 0, 0.08);
    at(&s, 9, 0.8);
    at(&s, 10, 0.8);
    at(&s, 59, 0.8);
    at(&s, 60, 0.8);
    at(&s, 70, 0.8 / 2f64.sqrt());
    at(&s, 79, 0.8 / (1.0 + 19.0 / 10.0f64).sqrt());
    let a = 0.8 / 3f64.sqrt(); // inv_sqrt's end: t = 20
    at(&s, 80, a);
    at(&s, 85, a * (0.01 / a).powf(0.5));
    at(&s, 90, 0.01);
    at(&s, 95, 0.01 * 0.5);
    at(&s, 99, 0.01 * 0.1);
    at(&s, 100, 0.0);
}

#[test]
fn report_shows_every_boundary_and_the_whole_run() {
    let s = wsd(DecayShape::Linear);
    let table = report::table(&s);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(
        rows[1].contains("warmup") && rows[1].contains("1.000e-1") && rows[1].contains("1.000e0"),
        "{table}"
    );
    assert!(
        rows[2].contains("constant") && rows[2].contains(" 70 "),
        "{table}"
    );
    assert!(
        rows[3].contains("linear") && rows[3].contains(" 80 ") && rows[3].contains(" 99 "),
        "{table}"
    );
    let plot = report::ascii_plot(&s, 50, 8);
    let lines: Vec<&str> = plot.lines().collect();
    assert_eq!(lines.len(), 10, "{plot}");
    assert!(lines[0].starts_with("1.000e0 |"), "{plot}");
    assert_eq!(plot.matches('*').count(), 50, "{plot}");
    let csv = report::csv(&s);
    assert_eq!(csv.lines().count(), 101);
    assert_eq!(csv.lines().nth(10), Some("9,1"));
}
