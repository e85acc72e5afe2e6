//! `[peft]` in a recipe: low-rank adapters on a frozen base model (`lora.rs` for the method and
//! the rule by which `target` patterns select projections, `relora.rs` for the merges).
//!
//! ```toml
//! [peft]
//! kind = "lora"            # or "lora_fa", "relora"
//! rank = 8
//! alpha = 16
//! target = ["q_proj", "v_proj"]
//! ```

use crate::validate::{check, positive, positive_finite, Invalid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `[peft]`: low-rank adapters on a frozen base model (see `peft/lora.rs` for the method and
/// `models/params.rs` for the rule by which `target` patterns select projections).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeftConfig {
    /// The adapter method.
    pub kind: PeftKind,
    /// Rank r of the update B A.
    pub rank: i64,
    /// The update is scaled by alpha / r (alpha / sqrt(r) with `rslora`); absent: alpha = r.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Dropout on the adapter's input (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Name patterns of the projections to adapt, e.g. ["q_proj", "v_proj", "mlp.*"].
    pub target: Vec<String>,
    /// Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023; PEFT's `use_rslora`).
    #[serde(default)]
    pub rslora: bool,
    /// Per-module ranks, as peft's `rank_pattern`: a key (a regular expression) applies to the
    /// projections whose module path ends with it after a `.` (`q_proj`, `layers\.0\..*`);
    /// the first matching key wins; others get `rank`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(!skip_serializing_if)]
    pub rank_pattern: BTreeMap<String, i64>,
    /// Per-module alphas, as peft's `alpha_pattern` (keys as in `rank_pattern`); others get
    /// `alpha`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(!skip_serializing_if)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to start the
    /// adapters from instead of their fresh initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBuf>,
    /// ReLoRA only (see `peft/relora.rs`): merge the adapters into the base weights,
    /// re-initialise them and reset their optimizer state every `merge_every` steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_every: Option<i64>,
    /// ReLoRA only: how the adapters' optimizer state is reset at a merge (default "zero").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_reset: Option<OptimizerReset>,
    /// ReLoRA with `optimizer_reset = "magnitude"`: the fraction of each adapter moment kept
    /// (the largest by magnitude); the rest is zeroed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_fraction: Option<f64>,
    /// ReLoRA only: after each merge the LR ramps linearly from 0 back to the main schedule over
    /// this many steps (the jagged schedule; default 0: no re-warm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewarm_steps: Option<i64>,
    /// ReLoRA only: train every weight full-rank for the first N steps, then switch to ReLoRA
    /// (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_rank_warmup_steps: Option<i64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PeftKind {
    /// LoRA (Hu et al. 2021): A and B trained.
    Lora,
    /// LoRA-FA (Zhang et al. 2023): A frozen at its random initialisation, only B trained.
    LoraFa,
    /// ReLoRA (Lialin et al. 2023): LoRA whose factors are merged and restarted periodically.
    Relora,
}

/// ReLoRA's reset of the adapters' optimizer state at each merge.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerReset {
    /// Zero the moments entirely.
    Zero,
    /// Keep the `keep_fraction` largest moments by magnitude, zero the rest.
    Magnitude,
}

impl PeftConfig {
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }

    /// The factor of the low-rank update: alpha / r, or alpha / sqrt(r) with `rslora`.
    pub fn scale(&self) -> f64 {
        scale_of(self.alpha(), self.rank, self.rslora)
    }

    /// The rank of the adapter on module `path` (`rank_pattern`, else `rank`).
    pub fn rank_for(&self, path: &str) -> i64 {
        matching(&self.rank_pattern, path)
            .first()
            .map_or(self.rank, |(_, r)| **r)
    }

    /// The alpha of the adapter on module `path` (`alpha_pattern`, else `alpha`).
    pub fn alpha_for(&self, path: &str) -> f64 {
        matching(&self.alpha_pattern, path)
            .first()
            .map_or(self.alpha(), |(_, a)| **a)
    }

    /// peft takes the first matching key of `rank_pattern` / `alpha_pattern` in file order,
    /// which a TOML table does not keep: keys that match module `path` with different values
    /// are refused.
    pub fn patterns_unambiguous_at(&self, path: &str) -> Result<(), Invalid> {
        fn one_value<V: PartialEq + std::fmt::Debug>(
            section: &str,
            map: &BTreeMap<String, V>,
            path: &str,
        ) -> Result<(), Invalid> {
            let hits = matching(map, path);
            match hits.iter().find(|(_, v)| *v != hits[0].1) {
                Some((k2, v2)) => Err(Invalid {
                    key: section.to_string(),
                    msg: format!(
                        "keys {:?} ({:?}) and {k2:?} ({v2:?}) both match {path}; peft would take \
                         the first in file order: keep one",
                        hits[0].0, hits[0].1
                    ),
                }),
                None => Ok(()),
            }
        }
        one_value("peft.rank_pattern", &self.rank_pattern, path)?;
        one_value("peft.alpha_pattern", &self.alpha_pattern, path)
    }

    /// The factor of the update on module `path`.
    pub fn scale_for(&self, path: &str) -> f64 {
        scale_of(self.alpha_for(path), self.rank_for(path), self.rslora)
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        positive(self.rank, "peft.rank")?;
        for (k, r) in &self.rank_pattern {
            check_pattern(k, "peft.rank_pattern")?;
            positive(*r, &format!("peft.rank_pattern.{k}"))?;
        }
        for (k, a) in &self.alpha_pattern {
            check_pattern(k, "peft.alpha_pattern")?;
            positive_finite(*a, &format!("peft.alpha_pattern.{k}"))?;
        }
        if let Some(a) = self.alpha {
            positive_finite(a, "peft.alpha")?;
        }
        check(
            (0.0..1.0).contains(&self.dropout),
            "peft.dropout",
            format!("expected a probability in [0, 1), got {}", self.dropout),
        )?;
        check(
            !self.target.is_empty(),
            "peft.target",
            "expected at least one name pattern, e.g. [\"q_proj\", \"v_proj\"]",
        )?;
        for (i, p) in self.target.iter().enumerate() {
            check(
                !p.trim().is_empty(),
                "peft.target",
                format!("expected a non-empty name pattern, got target[{i}] = {p:?}"),
            )?;
        }
        if let Some(from) = &self.from {
            check(
                !from.as_os_str().is_empty(),
                "peft.from",
                "expected a PEFT adapter directory",
            )?;
        }
        self.validate_relora()
    }

    fn validate_relora(&self) -> Result<(), Invalid> {
        if self.kind != PeftKind::Relora {
            let set = [
                ("peft.merge_every", self.merge_every.is_some()),
                ("peft.optimizer_reset", self.optimizer_reset.is_some()),
                ("peft.keep_fraction", self.keep_fraction.is_some()),
                ("peft.rewarm_steps", self.rewarm_steps.is_some()),
                (
                    "peft.full_rank_warmup_steps",
                    self.full_rank_warmup_steps.is_some(),
                ),
            ];
            for (key, present) in set {
                check(!present, key, "only applies to kind = \"relora\"")?;
            }
            return Ok(());
        }
        let merge_every = self.merge_every.unwrap_or(0);
        check(
            self.merge_every.is_some(),
            "peft.merge_every",
            "expected a positive number of steps between ReLoRA merges (required for kind = \"relora\")",
        )?;
        positive(merge_every, "peft.merge_every")?;
        let rewarm = self.rewarm_steps.unwrap_or(0);
        check(
            rewarm >= 0,
            "peft.rewarm_steps",
            format!("expected a non-negative integer, got {rewarm}"),
        )?;
        check(
            rewarm < merge_every,
            "peft.rewarm_steps",
            format!("expected fewer steps than peft.merge_every ({merge_every}), got {rewarm}"),
        )?;
        let warm = self.full_rank_warmup_steps.unwrap_or(0);
        check(
            warm >= 0,
            "peft.full_rank_warmup_steps",
            format!("expected a non-negative integer, got {warm}"),
        )?;
        match (self.optimizer_reset.unwrap_or(OptimizerReset::Zero), self.keep_fraction) {
            (OptimizerReset::Zero, Some(_)) => check(
                false,
                "peft.keep_fraction",
                "only applies to optimizer_reset = \"magnitude\" (\"zero\" resets fully)",
            ),
            (OptimizerReset::Magnitude, None) => check(
                false,
                "peft.keep_fraction",
                "expected a fraction in [0, 1) of the moments to keep (required for optimizer_reset = \"magnitude\")",
            ),
            (OptimizerReset::Magnitude, Some(k)) => check(
                (0.0..1.0).contains(&k),
                "peft.keep_fraction",
                format!("expected a fraction in [0, 1), got {k}"),
            ),
            (OptimizerReset::Zero, None) => Ok(()),
        }
    }
}

fn scale_of(alpha: f64, rank: i64, rslora: bool) -> f64 {
    if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// The entries of a pattern table whose key matches module `path` by peft's `get_pattern_key`
/// rule (the whole path matches `(.*\.)?(key)`, the key a regular expression), in key order.
fn matching<'a, V>(map: &'a BTreeMap<String, V>, path: &str) -> Vec<(&'a String, &'a V)> {
    map.iter()
        .filter(|(k, _)| {
            regex::Regex::new(&format!("^(?:.*\\.)?(?:{k})$")).is_ok_and(|re| re.is_match(path))
        })
        .collect()
}

fn check_pattern(key: &str, section: &str) -> Result<(), Invalid> {
    check(
        regex::Regex::new(key).is_ok(),
        &format!("{section}.{key}"),
        "expected a regular expression over module paths",
    )
}
