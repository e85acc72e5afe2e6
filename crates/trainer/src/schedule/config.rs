//! `[schedule]` in a recipe: a closed registry tagged by `kind`, and its range checks.
//!
//! Every learning rate written here is absolute (the same unit as `optim.lr`), and `optim.lr`
//! is the peak: no value in `[schedule]` may exceed it. Lengths are in optimizer steps.
//!
//! ```toml
//! [schedule]               # warmup, then cosine to min_lr (also "linear", "constant")
//! kind = "cosine"
//! warmup_steps = 100
//! min_lr = 3e-5
//!
//! [schedule]               # warmup-stable-decay: the last 20% of the run decays as 1 - sqrt
//! kind = "wsd"
//! warmup_steps = 100
//! decay_fraction = 0.2
//! decay_shape = "sqrt"     # or "linear", "cosine"
//!
//! [schedule]               # phases written out, joined end to end
//! kind = "phases"
//! [[schedule.phases]]
//! shape = "warmup"
//! steps = 100
//! to = 3e-4
//! [[schedule.phases]]
//! shape = "constant"       # no `steps`: the rest of the run
//! [[schedule.phases]]
//! shape = "cosine"
//! steps = 200
//! to = 3e-5
//! ```

use crate::validate::Invalid;
use serde::{Deserialize, Serialize};

/// The schedule registry. Each variant compiles to a list of phases (`Schedule::new`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleConfig {
    /// Linear warmup from 0 to `optim.lr`, then `optim.lr` to the end. `min_lr` is accepted
    /// (and unused) so that switching between constant, cosine and linear is one edit.
    Constant {
        /// Optimizer steps of the linear warmup from 0 to `optim.lr`.
        #[serde(default)]
        warmup_steps: i64,
        /// Unused by this kind (accepted so that switching kinds is one edit).
        #[serde(default)]
        min_lr: f64,
    },
    /// Linear warmup from 0 to `optim.lr`, then a half cosine to `min_lr` at the end of the run.
    Cosine {
        /// Optimizer steps of the linear warmup from 0 to `optim.lr`.
        #[serde(default)]
        warmup_steps: i64,
        /// The learning rate at the end of the run (absolute, at most `optim.lr`).
        #[serde(default)]
        min_lr: f64,
    },
    /// Linear warmup from 0 to `optim.lr`, then a straight line to `min_lr` at the end of the run.
    Linear {
        /// Optimizer steps of the linear warmup from 0 to `optim.lr`.
        #[serde(default)]
        warmup_steps: i64,
        /// The learning rate at the end of the run (absolute, at most `optim.lr`).
        #[serde(default)]
        min_lr: f64,
    },
    /// Warmup-stable-decay (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
    /// Beyond Fixed Training Durations"): warmup, `optim.lr` held, then the last
    /// `decay_fraction` of the run decays to `min_lr`. Their best cooldown is `1 - sqrt` over
    /// about 20% of the run, hence the defaults.
    Wsd {
        /// Optimizer steps of the linear warmup from 0 to `optim.lr`.
        #[serde(default)]
        warmup_steps: i64,
        /// The share of the run's steps spent decaying at its end, in (0, 1].
        #[serde(default = "default_decay_fraction")]
        decay_fraction: f64,
        /// The shape of the final decay.
        #[serde(default = "default_wsd_shape")]
        decay_shape: DecayShape,
        /// The learning rate at the end of the run (absolute, at most `optim.lr`).
        #[serde(default)]
        min_lr: f64,
    },
    /// The infinite schedule of continual pretraining (Ibrahim et al. 2024, "Simple and
    /// Scalable Strategies to Continually Pre-train LLMs", sec. 7): warmup to `optim.lr`, a
    /// cooldown to `constant_lr`, `constant_lr` for as long as data comes (the rest of the
    /// run), and a final `anneal_steps` anneal to `min_lr` (exponential in the paper).
    Infinite {
        /// Optimizer steps of the linear warmup from 0 to `optim.lr`.
        #[serde(default)]
        warmup_steps: i64,
        /// Optimizer steps of the cooldown from `optim.lr` to `constant_lr`.
        cooldown_steps: i64,
        /// The shape of the cooldown.
        #[serde(default = "default_cosine")]
        cooldown_shape: DecayShape,
        /// The learning rate held after the cooldown (absolute, at most `optim.lr`).
        constant_lr: f64,
        /// Optimizer steps of the final anneal from `constant_lr` to `min_lr`; 0: none.
        #[serde(default)]
        anneal_steps: i64,
        /// The shape of the final anneal.
        #[serde(default = "default_exponential")]
        anneal_shape: DecayShape,
        /// The learning rate at the end of the run (absolute, at most `optim.lr`).
        #[serde(default)]
        min_lr: f64,
    },
    /// Re-warm and re-decay (Gupta et al. 2023, "Continual Pre-Training of Large Language
    /// Models: How to (re)warm your model?"): linear warmup from `start_lr` (the checkpoint's
    /// final LR, or 0) to `optim.lr` over `warmup_steps`, then decay to `min_lr` at the end.
    Rewarm {
        /// The learning rate the re-warmup starts from (absolute; the checkpoint's final LR).
        #[serde(default)]
        start_lr: f64,
        /// Optimizer steps of the linear re-warmup from `start_lr` to `optim.lr`.
        warmup_steps: i64,
        /// The shape of the decay after the re-warmup.
        #[serde(default = "default_cosine")]
        decay_shape: DecayShape,
        /// The learning rate at the end of the run (absolute, at most `optim.lr`).
        #[serde(default)]
        min_lr: f64,
    },
    /// Phases written out in order (`[[schedule.phases]]`), each starting where the previous
    /// one ended; the first starts from `start_lr`.
    Phases {
        /// The learning rate the first phase starts from (absolute, at most `optim.lr`).
        #[serde(default)]
        start_lr: f64,
        /// The phases in order, one `[[schedule.phases]]` table each.
        phases: Vec<PhaseConfig>,
    },
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig::Constant {
            warmup_steps: 0,
            min_lr: 0.0,
        }
    }
}

fn default_decay_fraction() -> f64 {
    0.2
}
fn default_wsd_shape() -> DecayShape {
    DecayShape::Sqrt
}
fn default_cosine() -> DecayShape {
    DecayShape::Cosine
}
fn default_exponential() -> DecayShape {
    DecayShape::Exponential
}

/// How a named schedule's decay, cooldown or anneal goes from one LR to the next.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecayShape {
    Linear,
    Cosine,
    /// `1 - sqrt` (Hägele et al. 2024).
    Sqrt,
    /// Geometric: needs positive LRs at both ends.
    Exponential,
}

impl DecayShape {
    pub fn phase_shape(self) -> PhaseShape {
        match self {
            DecayShape::Linear => PhaseShape::Linear,
            DecayShape::Cosine => PhaseShape::Cosine,
            DecayShape::Sqrt => PhaseShape::Sqrt,
            DecayShape::Exponential => PhaseShape::Exponential,
        }
    }
}

/// One `[[schedule.phases]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PhaseConfig {
    /// How the LR moves during the phase.
    pub shape: PhaseShape,
    /// Length in optimizer steps; at most one phase leaves it out and takes the rest of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<i64>,
    /// The LR the phase ends at (all shapes but `constant` and `inv_sqrt`, which take none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<f64>,
    /// `inv_sqrt` only: the LR falls as `1 / sqrt(1 + t / timescale)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timescale: Option<f64>,
}

/// The shape of one phase; the formulas are in the module doc of `schedule`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PhaseShape {
    Warmup,
    Constant,
    Linear,
    Cosine,
    Sqrt,
    Exponential,
    InvSqrt,
}

impl PhaseShape {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseShape::Warmup => "warmup",
            PhaseShape::Constant => "constant",
            PhaseShape::Linear => "linear",
            PhaseShape::Cosine => "cosine",
            PhaseShape::Sqrt => "sqrt",
            PhaseShape::Exponential => "exponential",
            PhaseShape::InvSqrt => "inv_sqrt",
        }
    }

    /// Whether the phase ends at a `to` that the recipe gives.
    fn takes_to(self) -> bool {
        !matches!(self, PhaseShape::Constant | PhaseShape::InvSqrt)
    }
}

impl ScheduleConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            ScheduleConfig::Constant { .. } => "constant",
            ScheduleConfig::Cosine { .. } => "cosine",
            ScheduleConfig::Linear { .. } => "linear",
            ScheduleConfig::Wsd { .. } => "wsd",
            ScheduleConfig::Infinite { .. } => "infinite",
            ScheduleConfig::Rewarm { .. } => "rewarm",
            ScheduleConfig::Phases { .. } => "phases",
        }
    }

    /// `warmup_steps` of the kinds that have one.
    pub fn warmup_steps(&self) -> Option<i64> {
        match self {
            ScheduleConfig::Constant { warmup_steps, .. }
            | ScheduleConfig::Cosine { warmup_steps, .. }
            | ScheduleConfig::Linear { warmup_steps, .. }
            | ScheduleConfig::Wsd { warmup_steps, .. }
            | ScheduleConfig::Infinite { warmup_steps, .. }
            | ScheduleConfig::Rewarm { warmup_steps, .. } => Some(*warmup_steps),
            ScheduleConfig::Phases { .. } => None,
        }
    }

    /// WSD's decay length: `decay_fraction` of the run, rounded to the nearest step.
    pub fn wsd_decay_steps(decay_fraction: f64, total_steps: i64) -> i64 {
        (decay_fraction * total_steps as f64).round() as i64
    }

    /// The checks that do not depend on the run's length: signs, fractions, and every LR at
    /// most `peak_lr` (`optim.lr`).
    pub fn check_values(&self, peak_lr: f64) -> Result<(), Invalid> {
        if let Some(w) = self.warmup_steps() {
            check(
                w >= 0,
                "schedule.warmup_steps",
                format!("expected a non-negative integer, got {w}"),
            )?;
        }
        match self {
            ScheduleConfig::Constant { min_lr, .. }
            | ScheduleConfig::Cosine { min_lr, .. }
            | ScheduleConfig::Linear { min_lr, .. } => {
                lr_value(*min_lr, "schedule.min_lr", peak_lr)
            }
            ScheduleConfig::Wsd {
                decay_fraction,
                decay_shape,
                min_lr,
                ..
            } => {
                check(
                    *decay_fraction > 0.0 && *decay_fraction <= 1.0,
                    "schedule.decay_fraction",
                    format!("expected a fraction in (0, 1], got {decay_fraction}"),
                )?;
                lr_value(*min_lr, "schedule.min_lr", peak_lr)?;
                exponential_end(*decay_shape, *min_lr, "schedule.min_lr", "decay")
            }
            ScheduleConfig::Infinite {
                cooldown_steps,
                cooldown_shape,
                constant_lr,
                anneal_steps,
                anneal_shape,
                min_lr,
                ..
            } => {
                non_negative(*cooldown_steps, "schedule.cooldown_steps")?;
                non_negative(*anneal_steps, "schedule.anneal_steps")?;
                check(
                    *constant_lr > 0.0 && constant_lr.is_finite(),
                    "schedule.constant_lr",
                    format!("expected a positive number, got {constant_lr}"),
                )?;
                lr_value(*constant_lr, "schedule.constant_lr", peak_lr)?;
                lr_value(*min_lr, "schedule.min_lr", peak_lr)?;
                check(
                    min_lr <= constant_lr,
                    "schedule.min_lr",
                    format!("min_lr ({min_lr}) must not exceed constant_lr ({constant_lr})"),
                )?;
                if *cooldown_steps > 0 {
                    exponential_end(
                        *cooldown_shape,
                        *constant_lr,
                        "schedule.constant_lr",
                        "cooldown",
                    )?;
                }
                if *anneal_steps > 0 {
                    exponential_end(*anneal_shape, *min_lr, "schedule.min_lr", "anneal")?;
                }
                Ok(())
            }
            ScheduleConfig::Rewarm {
                start_lr,
                decay_shape,
                min_lr,
                ..
            } => {
                lr_value(*start_lr, "schedule.start_lr", peak_lr)?;
                lr_value(*min_lr, "schedule.min_lr", peak_lr)?;
                exponential_end(*decay_shape, *min_lr, "schedule.min_lr", "decay")
            }
            ScheduleConfig::Phases { start_lr, phases } => {
                lr_value(*start_lr, "schedule.start_lr", peak_lr)?;
                check(
                    !phases.is_empty(),
                    "schedule.phases",
                    "expected at least one [[schedule.phases]] entry",
                )?;
                for (i, p) in phases.iter().enumerate() {
                    let key = |field: &str| format!("schedule.phases[{i}].{field}");
                    let shape = p.shape.as_str();
                    if let Some(s) = p.steps {
                        check(
                            s > 0,
                            &key("steps"),
                            format!("expected a positive integer, got {s}"),
                        )?;
                    }
                    match (p.shape.takes_to(), p.to) {
                        (true, None) => {
                            return Err(invalid(
                                &key("to"),
                                format!("a {shape} phase needs `to`, the LR it ends at"),
                            ))
                        }
                        (false, Some(_)) => {
                            return Err(invalid(
                                &key("to"),
                                format!(
                                    "a {shape} phase takes no `to` (it starts where the previous \
                                     phase ended{})",
                                    if p.shape == PhaseShape::InvSqrt {
                                        " and falls by its timescale"
                                    } else {
                                        " and holds that LR"
                                    }
                                ),
                            ))
                        }
                        (true, Some(to)) => lr_value(to, &key("to"), peak_lr)?,
                        (false, None) => {}
                    }
                    match (p.shape, p.timescale) {
                        (PhaseShape::InvSqrt, None) => {
                            return Err(invalid(
                                &key("timescale"),
                                "an inv_sqrt phase needs `timescale` (steps; the LR falls as \
                                 1/sqrt(1 + t/timescale))",
                            ))
                        }
                        (PhaseShape::InvSqrt, Some(ts)) => check(
                            ts > 0.0 && ts.is_finite(),
                            &key("timescale"),
                            format!("expected a positive number, got {ts}"),
                        )?,
                        (_, Some(_)) => {
                            return Err(invalid(
                                &key("timescale"),
                                format!(
                                    "only an inv_sqrt phase takes `timescale`, not a {shape} phase"
                                ),
                            ))
                        }
                        (_, None) => {}
                    }
                }
                let open: Vec<usize> = phases
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.steps.is_none())
                    .map(|(i, _)| i)
                    .collect();
                if let [first, second, ..] = open[..] {
                    return Err(invalid(
                        &format!("schedule.phases[{second}].steps"),
                        format!(
                            "only one phase may leave out `steps` (it takes the rest of the run); \
                             phases[{first}] already does"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The checks against the run's length (`total_steps`, from `train.max_steps` or
    /// `train.max_tokens`): warmup within the run, phase lengths that add up to it, and
    /// positive LRs at both ends of every exponential phase.
    pub fn check_lengths(&self, peak_lr: f64, total_steps: i64) -> Result<(), Invalid> {
        let n = total_steps;
        if let Some(w) = self.warmup_steps() {
            check(
                w <= n,
                "schedule.warmup_steps",
                format!("warmup ({w} steps) exceeds the run ({n} steps)"),
            )?;
        }
        match self {
            ScheduleConfig::Wsd {
                warmup_steps,
                decay_fraction,
                ..
            } => {
                let d = Self::wsd_decay_steps(*decay_fraction, n);
                check(
                    d >= 1,
                    "schedule.decay_fraction",
                    format!("{decay_fraction} of the run ({n} steps) rounds to 0 decay steps"),
                )?;
                check(
                    warmup_steps + d <= n,
                    "schedule.decay_fraction",
                    format!(
                        "warmup ({warmup_steps} steps) and decay ({d} steps, {decay_fraction} of \
                         the run) exceed the run ({n} steps)"
                    ),
                )?;
            }
            ScheduleConfig::Infinite {
                warmup_steps,
                cooldown_steps,
                anneal_steps,
                ..
            } => {
                let used = warmup_steps + cooldown_steps + anneal_steps;
                check(
                    used <= n,
                    "schedule.cooldown_steps",
                    format!(
                        "warmup ({warmup_steps}) + cooldown ({cooldown_steps}) + anneal \
                         ({anneal_steps}) = {used} steps exceed the run ({n} steps)"
                    ),
                )?;
            }
            ScheduleConfig::Phases { phases, .. } => {
                let given: i64 = phases.iter().filter_map(|p| p.steps).sum();
                match phases.iter().position(|p| p.steps.is_none()) {
                    None => check(
                        given == n,
                        "schedule.phases",
                        format!(
                            "the phase lengths add up to {given} steps but the run has {n} \
                             (train.max_steps); make them add up, or leave out one phase's \
                             `steps` to give it the rest"
                        ),
                    )?,
                    Some(open) => check(
                        given < n,
                        &format!("schedule.phases[{open}].steps"),
                        format!(
                            "the other phases already take {given} of the run's {n} steps, \
                             leaving none for this one"
                        ),
                    )?,
                }
                let sched = super::Schedule::new(self, peak_lr, n);
                for (i, ph) in sched.phases.iter().enumerate() {
                    check(
                        ph.shape != PhaseShape::Exponential || (ph.from > 0.0 && ph.to > 0.0),
                        &format!("schedule.phases[{i}]"),
                        format!(
                            "an exponential phase needs positive LRs at both ends, got {} to {}",
                            ph.from, ph.to
                        ),
                    )?;
                }
            }
            ScheduleConfig::Constant { .. }
            | ScheduleConfig::Cosine { .. }
            | ScheduleConfig::Linear { .. }
            | ScheduleConfig::Rewarm { .. } => {}
        }
        Ok(())
    }
}

fn invalid(key: &str, msg: impl Into<String>) -> Invalid {
    Invalid {
        key: key.to_string(),
        msg: msg.into(),
    }
}

fn check(ok: bool, key: &str, msg: impl Into<String>) -> Result<(), Invalid> {
    if ok {
        Ok(())
    } else {
        Err(invalid(key, msg))
    }
}

fn non_negative(v: i64, key: &str) -> Result<(), Invalid> {
    check(
        v >= 0,
        key,
        format!("expected a non-negative integer, got {v}"),
    )
}

/// An LR in `[schedule]`: non-negative, finite, at most the peak (`optim.lr`).
fn lr_value(v: f64, key: &str, peak_lr: f64) -> Result<(), Invalid> {
    check(
        v >= 0.0 && v.is_finite(),
        key,
        format!("expected a non-negative number, got {v}"),
    )?;
    let name = key.rsplit('.').next().unwrap_or(key);
    check(
        v <= peak_lr,
        key,
        format!("{name} ({v}) must not exceed optim.lr ({peak_lr})"),
    )
}

/// A geometric decay cannot reach 0.
fn exponential_end(shape: DecayShape, end: f64, key: &str, what: &str) -> Result<(), Invalid> {
    check(
        shape != DecayShape::Exponential || end > 0.0,
        key,
        format!(
            "an exponential {what} needs a positive end LR, got {end} (or choose another shape)"
        ),
    )
}
