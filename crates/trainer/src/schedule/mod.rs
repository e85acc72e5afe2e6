//! Learning-rate schedules: phases joined end to end, each a closed-form function of the step.
//!
//! A `[schedule]` (see `config.rs`) compiles to a list of phases that cover the run's optimizer
//! steps `0..n` back to back. Each phase starts at the LR the previous one ended at (`from`; the
//! first starts from 0, or from `start_lr` for `rewarm` and `phases`) and ends at `to`. For a phase
//! of `len` steps starting at milestone `m`, step `s` has `t = s - m` and `p = t / len`:
//!
//! ```text
//! warmup:      from + (to - from) * (t + 1) / len     reaches `to` at its last step
//! constant:    from                                   (to = from)
//! linear:      from + (to - from) * p
//! cosine:      to + (from - to) * (1 + cos(pi p)) / 2
//! sqrt:        to + (from - to) * (1 - sqrt(p))       "1 - sqrt" cooldown (Hägele et al. 2024)
//! exponential: from * (to / from)^p                   geometric; from, to > 0
//! inv_sqrt:    from / sqrt(1 + t / timescale)         (to = from / sqrt(1 + len / timescale))
//! ```
//!
//! Warmup counts `t + 1` so that its first step already trains (no step at LR 0) and its last
//! step is at the peak; every other shape starts at `from` and reaches `to` at the milestone,
//! which is the first step of the next phase. Past the last step the final `to` holds. So the
//! classic kinds keep their meaning: `cosine` with warmup `w` is `lr = max * (s + 1) / w` for
//! `s < w`, then `min + (max - min) * (1 + cos(pi (s - w) / (n - w))) / 2`.
//!
//! The named kinds are phase lists: `wsd` (Hägele et al. 2024, "Scaling Laws and
//! Compute-Optimal Training Beyond Fixed Training Durations") is warmup, constant, decay over
//! `round(decay_fraction * n)` steps; `infinite` (Ibrahim et al. 2024, "Simple and Scalable
//! Strategies to Continually Pre-train Large Language Models", sec. 7) is warmup, cooldown to
//! `constant_lr`, constant, anneal; `rewarm` (Gupta et al. 2023, "Continual Pre-Training of
//! Large Language Models: How to (re)warm your model?") is warmup from `start_lr`, then decay.
//! `wsd` and `infinite` are what make a run extendable: lengthening `train.max_steps` only moves
//! the decay (or anneal), so every step before the old decay has the same LR and a checkpoint
//! taken there continues as if the longer run had been planned.
//!
//! Checkpoints: the LR is a pure function of (recipe, step). Nothing about the schedule is saved
//! in a checkpoint; a resumed run rebuilds the `Schedule` from the same recipe and gets the same
//! value at every step (tested: two builds, and a build from the resolved recipe that a run
//! directory keeps as `config.toml`, give bit-identical values).
//!
//! `config.rs` holds `[schedule]`; `coupled.rs` the weight-decay and momentum schedules that
//! follow the LR. Imports: `validate` only.

mod config;
pub mod coupled;
pub mod report;

pub use config::{DecayShape, PhaseConfig, PhaseShape, ScheduleConfig};
pub use coupled::{MomentumSchedule, WeightDecaySchedule};

/// One compiled phase: `steps` optimizer steps from milestone `start`, from `from` to `to`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    pub shape: PhaseShape,
    pub start: i64,
    pub steps: i64,
    pub from: f64,
    pub to: f64,
    /// `inv_sqrt` only (unused by the other shapes).
    pub timescale: f64,
}

impl Phase {
    /// The LR at `t` steps into the phase (`0 <= t < steps`).
    pub fn at(&self, t: i64) -> f64 {
        let (from, to) = (self.from, self.to);
        let len = self.steps.max(1) as f64;
        let t = t as f64;
        let p = t / len;
        match self.shape {
            PhaseShape::Warmup => from + (to - from) * (t + 1.0) / len,
            PhaseShape::Constant => from,
            PhaseShape::Linear => from + (to - from) * p,
            PhaseShape::Cosine => to + (from - to) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            PhaseShape::Sqrt => to + (from - to) * (1.0 - p.sqrt()),
            // Validation rules out non-positive ends; fall back to a line rather than NaN.
            PhaseShape::Exponential if from > 0.0 && to > 0.0 => from * (to / from).powf(p),
            PhaseShape::Exponential => from + (to - from) * p,
            PhaseShape::InvSqrt => from / (1.0 + t / self.timescale).sqrt(),
        }
    }

    /// The step after the phase's last one: the next milestone.
    pub fn end(&self) -> i64 {
        self.start + self.steps
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Which `[schedule] kind` this came from.
    pub kind: &'static str,
    /// The phases, back to back from step 0.
    pub phases: Vec<Phase>,
    /// The LR after the last phase (the last `to`).
    pub end_lr: f64,
    pub total_steps: i64,
}

/// Appends phases end to end, each starting at the LR the previous one ended at.
struct Builder {
    phases: Vec<Phase>,
    at: i64,
    lr: f64,
}

impl Builder {
    fn new(start_lr: f64) -> Builder {
        Builder {
            phases: Vec::new(),
            at: 0,
            lr: start_lr,
        }
    }

    /// A phase of `steps` steps to `to`; a phase of no steps only moves the LR to `to` (a
    /// warmup of 0 steps starts the next phase at the peak).
    fn push(&mut self, shape: PhaseShape, steps: i64, to: f64) {
        self.push_phase(shape, steps, to, 0.0);
    }

    fn push_phase(&mut self, shape: PhaseShape, steps: i64, to: f64, timescale: f64) {
        let to = match shape {
            PhaseShape::Constant => self.lr,
            PhaseShape::InvSqrt => self.lr / (1.0 + steps.max(0) as f64 / timescale).sqrt(),
            _ => to,
        };
        if steps > 0 {
            self.phases.push(Phase {
                shape,
                start: self.at,
                steps,
                from: self.lr,
                to,
                timescale,
            });
            self.at += steps;
        }
        self.lr = to;
    }

    fn finish(self, kind: &'static str, total_steps: i64) -> Schedule {
        Schedule {
            kind,
            phases: self.phases,
            end_lr: self.lr,
            total_steps,
        }
    }
}

impl Schedule {
    /// Compiles `cfg` for a run of `total_steps` optimizer steps whose peak LR is `max_lr`
    /// (`optim.lr`). Never fails: lengths that do not fit are clamped here and reported by
    /// `ScheduleConfig::check_values` / `check_lengths` (which `Recipe::validate` runs).
    pub fn new(cfg: &ScheduleConfig, max_lr: f64, total_steps: i64) -> Schedule {
        use PhaseShape as S;
        let n = total_steps.max(0);
        let mut b = Builder::new(0.0);
        match cfg {
            ScheduleConfig::Constant { warmup_steps, .. } => {
                let w = (*warmup_steps).clamp(0, n);
                b.push(S::Warmup, w, max_lr);
                b.push(S::Constant, n - w, max_lr);
            }
            ScheduleConfig::Cosine {
                warmup_steps,
                min_lr,
            }
            | ScheduleConfig::Linear {
                warmup_steps,
                min_lr,
            } => {
                let shape = if matches!(cfg, ScheduleConfig::Cosine { .. }) {
                    S::Cosine
                } else {
                    S::Linear
                };
                let w = (*warmup_steps).clamp(0, n);
                b.push(S::Warmup, w, max_lr);
                b.push(shape, n - w, *min_lr);
            }
            ScheduleConfig::Wsd {
                warmup_steps,
                decay_fraction,
                decay_shape,
                min_lr,
            } => {
                let w = (*warmup_steps).clamp(0, n);
                let d = ScheduleConfig::wsd_decay_steps(*decay_fraction, n).clamp(0, n - w);
                b.push(S::Warmup, w, max_lr);
                b.push(S::Constant, n - w - d, max_lr);
                b.push(decay_shape.phase_shape(), d, *min_lr);
            }
            ScheduleConfig::Infinite {
                warmup_steps,
                cooldown_steps,
                cooldown_shape,
                constant_lr,
                anneal_steps,
                anneal_shape,
                min_lr,
            } => {
                let w = (*warmup_steps).clamp(0, n);
                let c = (*cooldown_steps).clamp(0, n - w);
                let a = (*anneal_steps).clamp(0, n - w - c);
                b.push(S::Warmup, w, max_lr);
                b.push(cooldown_shape.phase_shape(), c, *constant_lr);
                b.push(S::Constant, n - w - c - a, *constant_lr);
                b.push(anneal_shape.phase_shape(), a, *min_lr);
            }
            ScheduleConfig::Rewarm {
                start_lr,
                warmup_steps,
                decay_shape,
                min_lr,
            } => {
                b = Builder::new(*start_lr);
                let w = (*warmup_steps).clamp(0, n);
                b.push(S::Warmup, w, max_lr);
                b.push(decay_shape.phase_shape(), n - w, *min_lr);
            }
            ScheduleConfig::Phases { start_lr, phases } => {
                b = Builder::new(*start_lr);
                let given: i64 = phases.iter().filter_map(|p| p.steps).sum();
                let mut rest = (n - given).max(0);
                for p in phases {
                    let steps = match p.steps {
                        Some(s) => s.max(0),
                        None => std::mem::take(&mut rest),
                    };
                    b.push_phase(
                        p.shape,
                        steps,
                        p.to.unwrap_or(b.lr),
                        p.timescale.unwrap_or(1.0),
                    );
                }
            }
        }
        b.finish(cfg.kind(), total_steps)
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: i64) -> f64 {
        let step = step.max(0);
        match self.phases.iter().find(|ph| step < ph.end()) {
            Some(ph) => ph.at(step - ph.start),
            None => self.end_lr,
        }
    }

    /// The largest LR of any step of the run.
    pub fn peak(&self) -> f64 {
        self.phases
            .iter()
            .flat_map(|ph| [ph.from, ph.to, ph.at(0), ph.at(ph.steps - 1)])
            .fold(self.end_lr, f64::max)
    }
}

#[cfg(test)]
mod tests;
