//! Learning-rate schedules: a pure function of the step, so that a resumed run recomputes the
//! same rate without saving anything.
//!
//! For optimizer step `s` (0-based) of a run of `n` steps with `w` warmup steps:
//!
//! ```text
//! s <  w:  lr = max_lr * (s + 1) / w                         (linear warmup from 0)
//! s >= w:  p  = (s - w) / (n - w)                            (progress in [0, 1))
//!          cosine:   lr = min + (max - min) * (1 + cos(pi p)) / 2
//!          linear:   lr = max - (max - min) * p
//!          constant: lr = max
//! ```

use crate::recipe::{DecayShape, ScheduleConfig};

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub shape: DecayShape,
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: i64,
    pub total_steps: i64,
}

impl Schedule {
    pub fn new(cfg: &ScheduleConfig, max_lr: f64, total_steps: i64) -> Schedule {
        Schedule {
            shape: cfg.kind,
            max_lr,
            min_lr: cfg.min_lr,
            warmup_steps: cfg.warmup_steps,
            total_steps,
        }
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: i64) -> f64 {
        let (w, n) = (self.warmup_steps, self.total_steps);
        if step < w {
            return self.max_lr * (step + 1) as f64 / w as f64;
        }
        let span = (n - w).max(1) as f64;
        let p = ((step - w) as f64 / span).clamp(0.0, 1.0);
        let (hi, lo) = (self.max_lr, self.min_lr);
        match self.shape {
            DecayShape::Cosine => lo + (hi - lo) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            DecayShape::Linear => hi - (hi - lo) * p,
            DecayShape::Constant => hi,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(shape: DecayShape) -> Schedule {
        Schedule { shape, max_lr: 1.0, min_lr: 0.1, warmup_steps: 10, total_steps: 110 }
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        let s = sched(DecayShape::Cosine);
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(4) - 0.5).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn cosine_boundaries_and_midpoint() {
        let s = sched(DecayShape::Cosine);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        // p = 0.5: min + (max - min) / 2
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        // monotone after warmup
        for k in 10..110 {
            assert!(s.lr(k + 1) <= s.lr(k));
        }
    }

    #[test]
    fn linear_and_constant() {
        let l = sched(DecayShape::Linear);
        assert!((l.lr(35) - (1.0 - 0.9 * 0.25)).abs() < 1e-12);
        let c = sched(DecayShape::Constant);
        assert_eq!(c.lr(50), 1.0);
        assert_eq!(c.lr(109), 1.0);
    }
}
