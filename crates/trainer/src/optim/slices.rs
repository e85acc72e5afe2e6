//! Slices of parameters (`run.shard_layout = "flat"`): each rank updates a contiguous range of
//! the flattened values of some parameters, not whole tensors, so its optimizer state is kept
//! per slice and saved as `slot.name@offset+len` (`exp_avg.layers.0.mlp.up.weight@1024+512`).
//! A checkpoint's state, saved whole or in slices of any other layout and world size, is cut
//! and pieced together into what an optimizer holds (`assemble`).

use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tch::Tensor;

/// One rank's contiguous slice of a parameter's flattened values: the optimizer updates
/// `param.view(-1)[offset..offset + len]` from `grad`, this rank's slice of the averaged
/// gradient (a view into the sharding's buffer, refilled at every step).
pub struct Slice {
    pub offset: i64,
    pub len: i64,
    pub grad: Tensor,
}

impl Slice {
    /// The slice of `param` (a view: updating it in place updates the parameter). Taken anew
    /// at each use, since casting the weights to bf16 gives `param` new memory.
    pub fn of(&self, param: &Tensor) -> Tensor {
        param.view([-1]).narrow(0, self.offset, self.len)
    }

    /// The name of this slice's state tensors of parameter `name` (`name@offset+len`).
    pub fn state_name(&self, name: &str) -> String {
        format!("{name}@{}+{}", self.offset, self.len)
    }
}

/// What one optimizer slot updates: a whole parameter, or with `run.shard_layout = "flat"` a
/// slice of it.
pub struct Weights {
    pub param: Tensor,
    pub slice: Option<Slice>,
}

impl Weights {
    /// The weights updated: the parameter, or its slice (a view).
    pub fn values(&self) -> Tensor {
        match &self.slice {
            Some(s) => s.of(&self.param),
            None => self.param.shallow_clone(),
        }
    }

    /// How many elements they are (no view made, unlike `values`).
    pub fn numel(&self) -> usize {
        match &self.slice {
            Some(s) => s.len as usize,
            None => self.param.numel(),
        }
    }

    /// Their gradient: the slice's, or the parameter's when it has one.
    pub fn grad(&self) -> Option<Tensor> {
        match &self.slice {
            Some(s) => Some(s.grad.shallow_clone()),
            None => super::grad_of(&self.param),
        }
    }

    /// The name of their state tensors, for parameter `name` (`Slice::state_name` for a slice).
    pub fn state_name(&self, name: &str) -> String {
        match &self.slice {
            Some(s) => s.state_name(name),
            None => name.to_string(),
        }
    }
}

/// A state tensor's name without its slice (`exp_avg.w@8+4` -> `exp_avg.w`), and the slice's
/// (offset, len) if it has one.
pub fn split_name(name: &str) -> (&str, Option<(i64, i64)>) {
    let Some((base, range)) = name.rsplit_once('@') else {
        return (name, None);
    };
    let parsed = range
        .split_once('+')
        .and_then(|(o, l)| Some((o.parse().ok()?, l.parse().ok()?)));
    match parsed {
        Some(r) => (base, Some(r)),
        None => (name, None),
    }
}

/// The state `targets` (an optimizer's named state tensors) take from `loaded` (read from
/// `path`): a tensor saved under the target's own name as it is; otherwise the target's range
/// of its flattened tensor cut from the saved pieces of that tensor (whole, or slices saved by
/// another layout or world size), which must cover it exactly once. Saved pieces of a target's
/// tensor that it does not need (another rank's slices) are left out; what belongs to no
/// target stays, for `copy_named` to name as unexpected (or a target's as missing).
pub fn assemble(
    loaded: Vec<(String, Tensor)>,
    targets: &[(String, Tensor)],
    path: &Path,
) -> Result<Vec<(String, Tensor)>> {
    let names: BTreeSet<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    let bases: BTreeSet<&str> = targets.iter().map(|(n, _)| split_name(n).0).collect();
    // The loaded pieces of each target's tensor: (offset, values flattened).
    let mut pieces: BTreeMap<String, Vec<(i64, Tensor)>> = BTreeMap::new();
    let mut kept = Vec::new();
    for (name, t) in loaded {
        let (base, range) = split_name(&name);
        if bases.contains(base) {
            let flat = (range.map_or(0, |r| r.0), t.reshape([-1]));
            pieces.entry(base.to_string()).or_default().push(flat);
        }
        if names.contains(name.as_str()) || !bases.contains(base) {
            kept.push((name, t));
        }
    }
    let have: BTreeSet<String> = kept.iter().map(|(n, _)| n.clone()).collect();
    for (name, target) in targets.iter().filter(|(n, _)| !have.contains(n)) {
        let (base, range) = split_name(name);
        let Some(from) = pieces.get(base) else {
            continue;
        };
        let (offset, len) = range.unwrap_or((0, target.numel() as i64));
        let values = cut(from, offset, len).map_err(|msg| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("{base}: {msg}"),
        })?;
        kept.push((name.clone(), values.reshape(target.size())));
    }
    Ok(kept)
}

/// Elements `offset..offset + len` of a flattened tensor saved as `pieces` (offset, values).
fn cut(pieces: &[(i64, Tensor)], offset: i64, len: i64) -> std::result::Result<Tensor, String> {
    let first = &pieces[0].1;
    let out = Tensor::zeros([len], (first.kind(), first.device()));
    let mut covered = 0;
    for (start, values) in pieces {
        let (lo, hi) = (
            offset.max(*start),
            (offset + len).min(start + values.numel() as i64),
        );
        if lo >= hi {
            continue;
        }
        if values.kind() != first.kind() {
            return Err("its saved slices differ in dtype".into());
        }
        out.narrow(0, lo - offset, hi - lo)
            .copy_(&values.narrow(0, lo - start, hi - lo));
        covered += hi - lo;
    }
    if covered != len {
        return Err(format!(
            "the saved slices cover {covered} of elements {offset}..{} (a slice missing or \
             saved twice)",
            offset + len
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(n: i64) -> Tensor {
        Tensor::arange(n, (tch::Kind::Float, tch::Device::Cpu))
    }

    #[test]
    fn names_split_into_tensor_and_slice() {
        assert_eq!(split_name("exp_avg.w@8+4"), ("exp_avg.w", Some((8, 4))));
        assert_eq!(split_name("exp_avg.w"), ("exp_avg.w", None));
        assert_eq!(split_name("odd@name"), ("odd@name", None));
        let s = Slice {
            offset: 3,
            len: 2,
            grad: range(2),
        };
        assert_eq!(split_name(&s.state_name("m.w")), ("m.w", Some((3, 2))));
    }

    /// Whole state cut into slices, slices pieced into whole state and into other slices;
    /// a gap or an overlap is one line naming the tensor.
    #[test]
    fn state_is_cut_and_pieced_across_layouts() {
        let p = Path::new("ckpt");
        let whole = range(12).reshape([3, 4]);
        // Whole -> two slices.
        let targets = vec![
            (
                "m.w@0+5".to_string(),
                Tensor::zeros([5], tch::kind::FLOAT_CPU),
            ),
            (
                "m.w@5+7".to_string(),
                Tensor::zeros([7], tch::kind::FLOAT_CPU),
            ),
        ];
        let got = assemble(vec![("m.w".into(), whole.copy())], &targets, p).expect("cut");
        assert_eq!(got.len(), 2);
        assert!(got[1].1.equal(&range(12).narrow(0, 5, 7)));
        // Slices -> whole, and -> slices of another split.
        let saved = [
            ("m.w@0+5".to_string(), range(12).narrow(0, 0, 5)),
            ("m.w@5+7".to_string(), range(12).narrow(0, 5, 7)),
            ("step".to_string(), Tensor::from(3i64)),
        ];
        let back = assemble(
            saved.iter().map(|(n, t)| (n.clone(), t.copy())).collect(),
            &[("m.w".into(), whole.zeros_like())],
            p,
        )
        .expect("piece");
        let w = &back.iter().find(|(n, _)| n == "m.w").expect("whole").1;
        assert!(w.equal(&whole));
        assert!(
            back.iter().any(|(n, _)| n == "step"),
            "other state passes through"
        );
        let other = [(
            "m.w@4+6".to_string(),
            Tensor::zeros([6], tch::kind::FLOAT_CPU),
        )];
        let mid = assemble(
            saved.iter().map(|(n, t)| (n.clone(), t.copy())).collect(),
            &other,
            p,
        )
        .expect("resplit");
        assert!(mid
            .iter()
            .find(|(n, _)| n == "m.w@4+6")
            .expect("slice")
            .1
            .equal(&range(12).narrow(0, 4, 6)));
        // The same layout: a rank's own slice as saved, another rank's left out.
        let own = [(
            "m.w@0+5".to_string(),
            Tensor::zeros([5], tch::kind::FLOAT_CPU),
        )];
        let mine = assemble(
            saved.iter().map(|(n, t)| (n.clone(), t.copy())).collect(),
            &own,
            p,
        )
        .expect("own");
        let names: Vec<&str> = mine.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["m.w@0+5", "step"]);
        // A gap.
        let gap = vec![("m.w@0+5".to_string(), range(5))];
        let e = assemble(gap, &[("m.w".into(), whole.zeros_like())], p)
            .expect_err("gap")
            .to_string();
        assert!(
            e.contains("m.w: the saved slices cover 5 of elements 0..12") && !e.contains('\n'),
            "{e}"
        );
    }
}
