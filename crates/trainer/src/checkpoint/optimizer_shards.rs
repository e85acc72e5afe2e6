//! The optimizer state of a sharded run (`run.shard = "optimizer"` or `"gradients"`), written by
//! every rank for itself: `optimizer-rank0000R-of-0000N.safetensors` holds rank R's share (with
//! the step counter in each), and `optimizer.index.json` (written by rank 0 from the files'
//! headers) maps every tensor to its file, as Hugging Face's `model.safetensors.index.json`
//! does. No rank ever holds the whole state. A reader takes what it needs from the files that
//! hold it, so the checkpoint resumes under any world size and shard mode, or in one process.
//!
//! An unsharded checkpoint has one `optimizer.safetensors` instead; `read` takes either.

use super::{sync_file, OPTIMIZER_FILE};
use crate::error::{Error, Result};
use crate::models::params::{read_safetensors, safetensors_header};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tch::Tensor;

pub const INDEX_FILE: &str = "optimizer.index.json";

/// The file of rank `rank` among `world`.
pub fn file_name(rank: usize, world: usize) -> String {
    format!("optimizer-rank{rank:05}-of-{world:05}.safetensors")
}

/// `optimizer.index.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Index {
    /// The ranks that wrote the files, one file each.
    world_size: usize,
    /// Tensor name -> the file holding it (the step counter: the first rank's file).
    weight_map: BTreeMap<String, String>,
}

/// Writes this rank's named optimizer state into the checkpoint being written at `dir`, synced.
pub fn write_share(
    dir: &Path,
    rank: usize,
    world: usize,
    named: Vec<(String, Tensor)>,
) -> Result<()> {
    let path = dir.join(file_name(rank, world));
    crate::optim::write_state(named, &path)?;
    sync_file(&path)
}

/// Rank 0, once every rank's file is in `dir`: the index, from the files' headers. Nothing
/// when `dir` holds no rank files (an unsharded checkpoint).
pub fn write_index(dir: &Path) -> Result<()> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map_err(crate::error::io_err(format!("listing {}", dir.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("optimizer-rank") && n.ends_with(".safetensors"))
        .collect();
    if files.is_empty() {
        return Ok(());
    }
    files.sort();
    let mut weight_map = BTreeMap::new();
    for f in &files {
        for t in safetensors_header(&dir.join(f))? {
            weight_map.entry(t.name).or_insert_with(|| f.clone());
        }
    }
    let index = Index {
        world_size: files.len(),
        weight_map,
    };
    let json = serde_json::to_string_pretty(&index).unwrap_or_default();
    super::write_synced(&dir.join(INDEX_FILE), json.as_bytes())
}

/// The optimizer state of checkpoint `dir`: all of it, or with `wanted` only those tensors and
/// the saved slices of them (a rank's share; each must be there). Reads
/// `optimizer.safetensors`, or the rank files that hold what is wanted through the index.
/// Returns the tensors and the path to name in errors.
pub fn read(
    dir: &Path,
    wanted: Option<&BTreeSet<String>>,
) -> Result<(Vec<(String, Tensor)>, std::path::PathBuf)> {
    let whole = dir.join(OPTIMIZER_FILE);
    let index_path = dir.join(INDEX_FILE);
    if whole.is_file() || !index_path.is_file() {
        let mut loaded = read_safetensors(&whole)?;
        if let Some(w) = wanted {
            loaded.retain(|(n, _)| w.contains(base(n)));
        }
        return Ok((loaded, whole));
    }
    let index = read_index(&index_path)?;
    let files: BTreeSet<&String> = index.weight_map.values().collect();
    let err = |path: &Path, msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    if files.len() != index.world_size {
        return Err(err(
            &index_path,
            format!(
                "lists {} files but says {} ranks wrote them",
                files.len(),
                index.world_size
            ),
        ));
    }
    let last_file = files
        .iter()
        .next_back()
        .copied()
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for f in files {
        let path = dir.join(f);
        if !path.is_file() {
            return Err(err(
                &path,
                format!("checkpoint shard missing (listed in {INDEX_FILE})"),
            ));
        }
        let listed: BTreeSet<&String> = index
            .weight_map
            .iter()
            .filter(|(n, file)| *file == f && wanted.is_none_or(|w| w.contains(base(n))))
            .map(|(n, _)| n)
            .collect();
        // Nothing this rank needs here (the step counter, which every file holds, aside)?
        let needs_step = out.is_empty() && *f == last_file;
        if wanted.is_some() && listed.iter().all(|n| *n == "step") && !needs_step {
            continue;
        }
        let mut loaded = read_safetensors(&path)?;
        loaded.retain(|(n, _)| wanted.is_none_or(|w| w.contains(base(n))));
        let held: BTreeSet<&String> = loaded.iter().map(|(n, _)| n).collect();
        let missing: Vec<&&String> = listed
            .iter()
            .filter(|n| !held.contains(**n) && **n != "step")
            .collect();
        if let Some(name) = missing.first() {
            return Err(err(
                &path,
                format!("does not hold {name}, which {INDEX_FILE} places in it"),
            ));
        }
        for (n, t) in loaded {
            if !out.iter().any(|(m, _): &(String, Tensor)| *m == n) {
                out.push((n, t));
            }
        }
    }
    Ok((out, index_path))
}

/// The tensor a saved state tensor belongs to: itself, or the whole of which it is a slice
/// (`run.shard_layout = "flat"`, `optim::slices`).
fn base(name: &str) -> &str {
    crate::optim::slices::split_name(name).0
}

fn read_index(path: &Path) -> Result<Index> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| err(format!("malformed {INDEX_FILE}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }

    fn step() -> Tensor {
        Tensor::from_slice(&[7i64]).reshape([] as [i64; 0])
    }

    /// Two ranks' files and the index: read whole, a share, and the bad cases in one line each.
    #[test]
    fn rank_files_read_whole_or_in_shares_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        write_share(
            d,
            0,
            2,
            vec![("a.m".into(), t(&[1.0])), ("step".into(), step())],
        )
        .expect("rank 0");
        write_share(
            d,
            1,
            2,
            vec![("b.m".into(), t(&[2.0, 3.0])), ("step".into(), step())],
        )
        .expect("rank 1");
        write_index(d).expect("index");
        let names = |v: &[(String, Tensor)]| {
            let mut n: Vec<String> = v.iter().map(|(n, _)| n.clone()).collect();
            n.sort();
            n
        };
        let (all, _) = read(d, None).expect("whole");
        assert_eq!(names(&all), ["a.m", "b.m", "step"]);
        let want: BTreeSet<String> = ["b.m".to_string(), "step".to_string()].into();
        let (share, _) = read(d, Some(&want)).expect("share");
        assert_eq!(names(&share), ["b.m", "step"]);

        // A rank's file that lost a tensor the index places in it.
        let f1 = d.join(file_name(1, 2));
        let saved = std::fs::read(&f1).expect("read");
        write_share(d, 1, 2, vec![("step".into(), step())]).expect("rewrite");
        let e = read(d, None).err().expect("mismatch").to_string();
        assert!(
            e.contains("does not hold b.m") && e.contains("rank00001"),
            "{e}"
        );
        // A missing file.
        std::fs::remove_file(&f1).expect("rm");
        let e = read(d, Some(&want)).err().expect("missing").to_string();
        assert!(
            e.contains("checkpoint shard missing") && !e.contains('\n'),
            "{e}"
        );
        std::fs::write(&f1, saved).expect("restore");
        // An index whose rank count disagrees with its files.
        let index = std::fs::read_to_string(d.join(INDEX_FILE)).expect("index");
        std::fs::write(
            d.join(INDEX_FILE),
            index.replace("\"world_size\": 2", "\"world_size\": 3"),
        )
        .expect("edit");
        let e = read(d, None).err().expect("count").to_string();
        assert!(e.contains("lists 2 files but says 3 ranks"), "{e}");
    }
}
