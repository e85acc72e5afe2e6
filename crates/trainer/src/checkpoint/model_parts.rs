//! A checkpoint's model file written by every rank of a `run.shard = "full"` run, each the
//! weights it holds, straight into one safetensors file: no rank gathers the model, or keeps a
//! host copy of all of it, to save it.
//!
//! Where each tensor's bytes go follows from the names, dtypes and shapes alone, which every rank
//! knows (a released tensor keeps its shape): rank 0 creates the file at its full length with
//! the header (`ModelLayout::create`), then every rank writes its own tensors' bytes at their
//! offsets (`write_part`). The order and the header are those of the `safetensors` crate's own
//! writer (by dtype's alignment, largest first, then by name), so the file is byte for byte the
//! one `Tensor::write_safetensors` writes for the same tensors.

use crate::error::{Error, Result};
use crate::models::params::ParamStore;
use safetensors::tensor::{Dtype, TensorInfo};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Where each tensor of a model file lies (see the module docs).
pub struct ModelLayout {
    /// The header's length (8 bytes, little endian) and its JSON, padded to 8 bytes.
    header: Vec<u8>,
    entries: HashMap<String, Entry>,
    /// The file's length.
    len: u64,
}

/// One tensor: its dtype and shape, and its bytes' range in the file.
struct Entry {
    kind: Kind,
    shape: Vec<i64>,
    start: u64,
    end: u64,
}

impl ModelLayout {
    /// The layout of a file holding every tensor of `params` (a checkpoint's model file).
    pub fn of(params: &ParamStore) -> Result<ModelLayout> {
        Self::from_tensors(params.iter().map(|p| (p.name.clone(), &p.tensor)))
    }

    /// The layout of a file holding `tensors` (their dtypes and shapes; released ones too).
    pub fn from_tensors<'a>(
        tensors: impl IntoIterator<Item = (String, &'a Tensor)>,
    ) -> Result<ModelLayout> {
        let mut listed: Vec<(String, Dtype, Kind, Vec<i64>)> = Vec::new();
        for (name, t) in tensors {
            let kind = t.kind();
            let dtype = dtype_of(kind).ok_or_else(|| {
                Error::Torch(format!(
                    "checkpoint: {name} is {kind:?}, not a safetensors dtype"
                ))
            })?;
            listed.push((name, dtype, kind, t.size()));
        }
        listed.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut json = Vec::with_capacity(listed.len());
        let mut entries = HashMap::with_capacity(listed.len());
        let mut offset = 0usize;
        for (name, dtype, kind, shape) in listed {
            let numel: usize = shape.iter().map(|&d| d as usize).product();
            let bytes = numel * dtype.size();
            let info = TensorInfo {
                dtype,
                shape: shape.iter().map(|&d| d as usize).collect(),
                data_offsets: (offset, offset + bytes),
            };
            let to_json =
                |v: serde_json::Result<String>| v.map_err(|e| Error::Torch(e.to_string()));
            json.push(format!(
                "{}:{}",
                to_json(serde_json::to_string(&name))?,
                to_json(serde_json::to_string(&info))?
            ));
            let (start, end) = (offset as u64, (offset + bytes) as u64);
            entries.insert(
                name,
                Entry {
                    kind,
                    shape,
                    start,
                    end,
                },
            );
            offset += bytes;
        }
        let mut text = format!("{{{}}}", json.join(",")).into_bytes();
        text.resize(text.len().div_ceil(8) * 8, b' ');
        let data_start = 8 + text.len() as u64;
        for e in entries.values_mut() {
            e.start += data_start;
            e.end += data_start;
        }
        let mut header = (text.len() as u64).to_le_bytes().to_vec();
        header.extend(text);
        Ok(ModelLayout {
            header,
            entries,
            len: data_start + offset as u64,
        })
    }

    /// The bytes of tensor data the file holds (all the ranks' parts together).
    pub fn data_bytes(&self) -> u64 {
        self.len - self.header.len() as u64
    }

    /// Creates the file at `path` (replacing one there): the header, and the data's length of
    /// zeros for the ranks' parts to fill.
    pub fn create(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path).map_err(io_err(path, "creating"))?;
        file.write_all_at(&self.header, 0)
            .map_err(io_err(path, "writing the header of"))?;
        file.set_len(self.len).map_err(io_err(path, "sizing"))?;
        Ok(())
    }

    /// Writes `part` (tensors of this layout, on any device) into the file `create` made at
    /// `path`, each at its offset, and syncs it. A tensor the layout does not list, or of
    /// another dtype or shape, is an error naming it.
    pub fn write_part(&self, path: &Path, part: &[(String, Tensor)]) -> Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path, "opening"))?;
        for (name, t) in part {
            let entry = self.entry_for(name, t)?;
            let host = t.to_device(Device::Cpu).contiguous();
            let bytes = (entry.end - entry.start) as usize;
            // SAFETY: `host` is a contiguous CPU tensor of `entry`'s dtype and shape (checked
            // above), so its data is exactly `bytes` bytes at `data_ptr`, alive while `host` is.
            let data = unsafe { std::slice::from_raw_parts(host.data_ptr() as *const u8, bytes) };
            file.write_all_at(data, entry.start)
                .map_err(io_err(path, &format!("writing {name} into")))?;
        }
        file.sync_all().map_err(io_err(path, "syncing"))
    }

    /// The bytes `part` fills of the file.
    pub fn part_bytes(&self, part: &[(String, Tensor)]) -> u64 {
        part.iter()
            .filter_map(|(n, _)| self.entries.get(n))
            .map(|e| e.end - e.start)
            .sum()
    }

    fn entry_for(&self, name: &str, t: &Tensor) -> Result<&Entry> {
        let entry = self.entries.get(name).ok_or_else(|| {
            Error::Torch(format!(
                "checkpoint: {name} is not a tensor of the model file"
            ))
        })?;
        if entry.kind != t.kind() || entry.shape != t.size() {
            return Err(Error::Torch(format!(
                "checkpoint: {name} is {:?} {:?}, the model file lists {:?} {:?}",
                t.kind(),
                t.size(),
                entry.kind,
                entry.shape
            )));
        }
        Ok(entry)
    }
}

/// The safetensors dtype of a libtorch kind (none for kinds safetensors has no name for).
fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int => Dtype::I32,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        _ => return None,
    })
}

fn io_err<'a>(path: &'a Path, what: &'a str) -> impl Fn(std::io::Error) -> Error + 'a {
    move |e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("{what} the model file: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, Tensor)> {
        let f = |n: i64| Tensor::arange(n, (Kind::Float, Device::Cpu)) / 7.0;
        vec![
            ("b.weight".into(), f(12).view([3, 4])),
            ("a.\"odd\" name".into(), f(5).to_kind(Kind::BFloat16)),
            ("c.bias".into(), f(3)),
            (
                "d.ids".into(),
                Tensor::arange(4, (Kind::Int64, Device::Cpu)),
            ),
            ("e.scalar".into(), Tensor::from(2.5f64)),
        ]
    }

    #[test]
    fn parts_written_by_several_writers_make_the_file_write_safetensors_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let all = tensors();
        // The layout from a rank that holds no memory for one of the tensors (its shape is
        // enough).
        let released = all[0].1.copy();
        torch_ext::release_storage(&released).expect("release");
        assert_eq!(torch_ext::storage_bytes(&released), 0);
        let shapes = std::iter::once((all[0].0.clone(), &released))
            .chain(all[1..].iter().map(|(n, t)| (n.clone(), t)));
        let layout = ModelLayout::from_tensors(shapes).expect("layout");
        let shared = dir.path().join("shared.safetensors");
        layout.create(&shared).expect("create");
        // Two "ranks", each its own tensors, the second first.
        let (first, second): (Vec<_>, Vec<_>) = all
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .enumerate()
            .partition(|(i, _)| i % 2 == 0);
        let strip = |v: Vec<(usize, (String, Tensor))>| -> Vec<(String, Tensor)> {
            v.into_iter().map(|(_, x)| x).collect()
        };
        let (first, second) = (strip(first), strip(second));
        layout.write_part(&shared, &second).expect("second");
        layout.write_part(&shared, &first).expect("first");
        assert_eq!(
            layout.part_bytes(&first) + layout.part_bytes(&second),
            layout.data_bytes()
        );
        let whole = dir.path().join("whole.safetensors");
        Tensor::write_safetensors(&all, &whole).expect("whole");
        let read = |p: &Path| std::fs::read(p).expect("read");
        assert!(read(&shared) == read(&whole), "the same bytes");
        let back = crate::models::params::read_safetensors(&shared).expect("read back");
        for (name, t) in &all {
            let (_, got) = back.iter().find(|(n, _)| n == name).expect(name);
            assert!(got.equal(t), "{name}");
        }
    }

    #[test]
    fn a_tensor_the_layout_does_not_list_or_of_another_shape_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let all = tensors();
        let layout =
            ModelLayout::from_tensors(all.iter().map(|(n, t)| (n.clone(), t))).expect("layout");
        let path = dir.path().join("m.safetensors");
        layout.create(&path).expect("create");
        let stranger = vec![(
            "z".to_string(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        )];
        let e = layout
            .write_part(&path, &stranger)
            .expect_err("refused")
            .to_string();
        assert!(e.contains("z is not a tensor of the model file"), "{e}");
        let reshaped = vec![(
            "c.bias".to_string(),
            Tensor::zeros([4], (Kind::Float, Device::Cpu)),
        )];
        let e = layout
            .write_part(&path, &reshaped)
            .expect_err("refused")
            .to_string();
        assert!(e.contains("c.bias") && e.contains("[3]"), "{e}");
        let complex = Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu));
        match ModelLayout::from_tensors([("w".to_string(), &complex)]) {
            Ok(_) => panic!("a complex tensor was given a layout"),
            Err(e) => assert!(e.to_string().contains("w is ComplexFloat"), "{e}"),
        }
    }
}
