//! Model weights loaded from memory-mapped safetensors files, one tensor at a time.
//!
//! `Tensor::read_safetensors` reads a whole file into a buffer and makes a tensor of every entry,
//! so loading a checkpoint into a model held the file twice beside the model at its peak. Here a
//! file is mapped, its header checked against the file's length before any data is touched, and
//! each tensor is copied straight from the mapping into the parameter it fills (`copy_named`),
//! converting the dtype on the way; its pages are then dropped from the process's resident set
//! (they stay in the page cache). The peak is the model plus at most one tensor's temporary (a
//! dtype conversion on the way to a GPU, or a tensor whose bytes are not aligned for its dtype).
//! safetensors' own `safe_open` maps files the same way.
//!
//! A [`Stored`] is a tensor still in its file, or several of them joined as `Tensor::cat` and
//! `Tensor::stack` would join them (Mixtral's per-expert weights fused, `fuse_checkpoint_experts`),
//! copied part by part into slices of the target.

use super::params::{Join, Source};
use crate::error::{Error, Result};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A mapped safetensors file.
struct Mapping {
    path: PathBuf,
    map: Mmap,
}

/// A tensor to be copied out of a mapped file when it is loaded (see the module docs).
#[derive(Clone)]
pub struct Stored(Node);

#[derive(Clone)]
enum Node {
    /// One entry of a file: bytes `start..end` of the mapping hold it.
    One {
        file: Arc<Mapping>,
        kind: Kind,
        shape: Vec<i64>,
        start: usize,
        end: usize,
    },
    /// Parts joined along dim 0 (`Tensor::cat`); `size` is the result's.
    Cat { parts: Vec<Stored>, size: Vec<i64> },
    /// Parts stacked along a new dim 0 (`Tensor::stack`).
    Stack { parts: Vec<Stored>, size: Vec<i64> },
}

/// Maps the safetensors file at `path` and lists its tensors in file order, without reading
/// their data. A missing file, a header that is malformed or whose offsets do not fit the file's
/// length (a truncated file), or a dtype libtorch has no kind for is one error naming the file.
pub fn open(path: &Path) -> Result<Vec<(String, Stored)>> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    if !path.is_file() {
        return Err(err("file not found".into()));
    }
    let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    // SAFETY: the file is opened read-only and the trainer never writes to a checkpoint it
    // loads. Every read below stays within the file's length at this point (the header's offsets
    // are checked against it first); a file truncated by another process while mapped would
    // fault, as with any mmap reader (safetensors' safe_open included).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| err(format!("cannot map: {e}")))?;
    // Checks the header length, the JSON, each entry's dtype, shape and byte count, and that the
    // offsets tile the data exactly up to the end of the file.
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
        err(format!(
            "cannot read safetensors (truncated or corrupt?): {}",
            describe(&e, map.len())
        ))
    })?;
    let data_start = 8 + header_len;
    let mut entries = Vec::new();
    for (name, info) in metadata.tensors() {
        let kind = kind_of(info.dtype).ok_or_else(|| {
            err(format!(
                "cannot read safetensors: tensor {name} is stored as {:?}, which has no libtorch \
                 kind",
                info.dtype
            ))
        })?;
        let (begin, end) = info.data_offsets;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        entries.push((name, kind, shape, data_start + begin, data_start + end));
    }
    // Belt and braces: `read_metadata` guarantees this; a read past the end would be a fault.
    if let Some((name, ..)) = entries.iter().find(|e| e.4 > map.len() || e.3 > e.4) {
        return Err(err(format!(
            "cannot read safetensors (truncated or corrupt?): tensor {name} lies past the end \
             of the file ({} bytes)",
            map.len()
        )));
    }
    entries.sort_by_key(|e| e.3);
    let file = Arc::new(Mapping {
        path: path.to_path_buf(),
        map,
    });
    Ok(entries
        .into_iter()
        .map(|(name, kind, shape, start, end)| {
            let node = Node::One {
                file: file.clone(),
                kind,
                shape,
                start,
                end,
            };
            (name, Stored(node))
        })
        .collect())
}

/// safetensors' error, said for a reader who has the file in front of them.
fn describe(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("{file_len} bytes, shorter than the 8-byte header length"),
        E::InvalidHeaderLength => {
            format!("the header's length runs past the end of the file ({file_len} bytes)")
        }
        E::MetadataIncompleteBuffer => format!(
            "the header's data offsets do not end at the end of the file ({file_len} bytes)"
        ),
        E::InvalidOffset(name) => {
            format!("tensor {name} has data offsets that overlap or leave gaps")
        }
        E::TensorInvalidInfo => "a tensor's shape and dtype do not match its byte count".into(),
        other => format!("{other:?}"),
    }
}

/// The libtorch kind of a safetensors dtype (the ones tch's reader knows, and FP8).
fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F8_E5M2 => Kind::Float8e5m2,
        Dtype::F8_E4M3 => Kind::Float8e4m3fn,
        _ => return None,
    })
}

impl Stored {
    /// The tensor in memory (on the CPU, in its stored dtype): for the few that are used as
    /// values rather than copied into a parameter (upcycling's dense MLP).
    pub fn to_tensor(&self) -> Result<Tensor> {
        let mut out = Tensor::f_empty(self.size(), (self.kind(), Device::Cpu))?;
        tch::no_grad(|| self.copy_to(&mut out))?;
        Ok(out)
    }
}

impl Source for Stored {
    fn size(&self) -> Vec<i64> {
        match &self.0 {
            Node::One { shape, .. } => shape.clone(),
            Node::Cat { size, .. } | Node::Stack { size, .. } => size.clone(),
        }
    }

    /// The stored kind (of the first part of a join; each part converts on its own).
    fn kind(&self) -> Kind {
        match &self.0 {
            Node::One { kind, .. } => *kind,
            Node::Cat { parts, .. } | Node::Stack { parts, .. } => {
                parts.first().map_or(Kind::Float, Source::kind)
            }
        }
    }

    fn copy_to(&self, target: &mut Tensor) -> Result<()> {
        match &self.0 {
            Node::One {
                file,
                kind,
                shape,
                start,
                end,
            } => copy_entry(file, *kind, shape, *start, *end, target),
            Node::Cat { parts, .. } => {
                let mut offset = 0;
                for part in parts {
                    let rows = part.size().first().copied().unwrap_or(1);
                    part.copy_to(&mut target.f_narrow(0, offset, rows)?)?;
                    offset += rows;
                }
                Ok(())
            }
            Node::Stack { parts, .. } => {
                for (i, part) in parts.iter().enumerate() {
                    part.copy_to(&mut target.f_select(0, i as i64)?)?;
                }
                Ok(())
            }
        }
    }
}

/// Copies bytes `start..end` of `file`, a tensor of `kind` and `shape`, into `target`.
fn copy_entry(
    file: &Mapping,
    kind: Kind,
    shape: &[i64],
    start: usize,
    end: usize,
    target: &mut Tensor,
) -> Result<()> {
    if target.size() != shape {
        return Err(Error::Checkpoint {
            path: file.path.clone(),
            msg: format!(
                "a tensor of shape {shape:?} cannot fill one of shape {:?}",
                target.size()
            ),
        });
    }
    if start == end {
        return Ok(()); // no elements
    }
    let bytes = &file.map[start..end];
    let view = if (bytes.as_ptr() as usize).is_multiple_of(kind.elt_size_in_bytes()) {
        // SAFETY: `bytes` lies within the mapping (checked against the file's length in
        // `open`) and holds exactly the shape's elements of `kind` (safetensors checks the byte
        // count), laid out contiguously (empty strides); the view only lives until the copy
        // below, while `file` (and so the mapping) is borrowed. libtorch only reads it.
        unsafe { Tensor::f_from_blob(bytes.as_ptr(), shape, &[], kind, Device::Cpu)? }
    } else {
        // A writer that did not align its data: one tensor's copy, then the same path.
        Tensor::f_from_data_size(bytes, shape, kind)?
    };
    target.f_copy_(&view)?;
    drop(view);
    // Drop the pages just read from this process's resident set (they stay in the page cache),
    // so that the mapped file never adds up beside the model.
    // SAFETY: the mapping is read-only and file-backed: dropped pages read back from the file if
    // touched again, and no reference into the range is alive (the view is dropped).
    let _ = unsafe {
        file.map
            .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
    };
    Ok(())
}

impl Join for Stored {
    fn cat(parts: Vec<Stored>) -> Result<Stored> {
        let mut size = match parts.first() {
            Some(p) if !p.size().is_empty() => p.size(),
            _ => {
                return Err(Error::Torch(
                    "cat: expected tensors of 1 or more dims".into(),
                ))
            }
        };
        for p in &parts[1..] {
            let s = p.size();
            if s.len() != size.len() || s[1..] != size[1..] {
                return Err(Error::Torch(format!(
                    "cat: sizes {size:?} and {s:?} differ outside dim 0"
                )));
            }
            size[0] += s[0];
        }
        Ok(Stored(Node::Cat { parts, size }))
    }

    fn stack(parts: Vec<Stored>) -> Result<Stored> {
        let Some(first) = parts.first().map(Source::size) else {
            return Err(Error::Torch("stack: expects a non-empty list".into()));
        };
        if let Some(other) = parts.iter().map(Source::size).find(|s| *s != first) {
            return Err(Error::Torch(format!(
                "stack: every tensor must have the same size, got {first:?} and {other:?}"
            )));
        }
        let size = [vec![parts.len() as i64], first].concat();
        Ok(Stored(Node::Stack { parts, size }))
    }
}

#[cfg(test)]
mod tests;
