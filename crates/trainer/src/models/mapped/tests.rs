use super::*;
use crate::models::moe::fuse_checkpoint_experts;
use crate::models::params::{copy_named, read_safetensors};
use std::collections::BTreeMap;

fn cpu(kind: Kind) -> (Kind, Device) {
    (kind, Device::Cpu)
}

/// Tensors of every dtype a Hugging Face or trainer checkpoint holds, odd sizes included, a
/// scalar and an empty one.
fn sample() -> Vec<(String, Tensor)> {
    tch::manual_seed(7);
    let f32 = Tensor::randn([5, 3], cpu(Kind::Float));
    vec![
        ("a.f32".into(), f32.shallow_clone()),
        (
            "b.bf16".into(),
            Tensor::randn([7], cpu(Kind::Float)).to_kind(Kind::BFloat16),
        ),
        (
            "c.f16".into(),
            Tensor::randn([3, 1, 3], cpu(Kind::Float)).to_kind(Kind::Half),
        ),
        ("d.f64".into(), Tensor::randn([2, 2], cpu(Kind::Double))),
        (
            "e.i64".into(),
            Tensor::arange(9, cpu(Kind::Int64)).reshape([3, 3]),
        ),
        ("f.scalar".into(), Tensor::from_slice(&[2.5f32]).squeeze()),
        ("g.empty".into(), Tensor::zeros([0, 4], cpu(Kind::Float))),
        ("h.bool".into(), f32.gt(0.0)),
    ]
}

/// `sample()` written to `model.safetensors` in a new temporary directory.
fn written_sample() -> (tempfile::TempDir, PathBuf, Vec<(String, Tensor)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    let tensors = sample();
    Tensor::write_safetensors(&tensors, &path).expect("write");
    (dir, path, tensors)
}

fn targets_like(tensors: &[(String, Tensor)], kind: Option<Kind>) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(n, t)| {
            let k = match (kind, t.is_floating_point()) {
                (Some(k), true) => k,
                _ => t.kind(),
            };
            (n.clone(), Tensor::full(t.size(), -1, cpu(k)))
        })
        .collect()
}

fn load(targets: &[(String, Tensor)], path: &Path) -> Result<()> {
    copy_named(
        &mut targets.iter().map(|(n, t)| (n.as_str(), t)),
        open(path)?,
        path,
    )
}

/// A safetensors file written byte by byte: `entries` (name, dtype, shape, data) in that order,
/// the header padded with spaces to `header_len` bytes.
fn write_raw(path: &Path, entries: &[(&str, &str, &[i64], &[u8])], header_len: usize) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, data) in entries {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape,
                               "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let mut text = serde_json::to_vec(&header).expect("json");
    assert!(text.len() <= header_len, "header of {} bytes", text.len());
    text.resize(header_len, b' ');
    let mut out = (header_len as u64).to_le_bytes().to_vec();
    out.extend(text);
    for (.., data) in entries {
        out.extend_from_slice(data);
    }
    std::fs::write(path, out).expect("write");
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut v = vec![0u8; n];
    t.copy_data_u8(&mut v, t.numel());
    v
}

#[test]
fn mapped_loading_equals_reading_the_whole_file_bitwise() {
    let (_dir, path, tensors) = written_sample();
    let old: BTreeMap<String, Tensor> =
        read_safetensors(&path).expect("read").into_iter().collect();
    let targets = targets_like(&tensors, None);
    load(&targets, &path).expect("mapped load");
    for (name, t) in &targets {
        assert_eq!(t.kind(), old[name].kind(), "{name}");
        assert_eq!(bytes_of(t), bytes_of(&old[name]), "{name}");
    }
    // Stored::to_tensor too, and the file order.
    let stored = open(&path).expect("open");
    let names: Vec<&str> = stored.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), tensors.len());
    for (name, s) in &stored {
        let t = s.to_tensor().expect("to_tensor");
        assert_eq!(bytes_of(&t), bytes_of(&old[name]), "{name}");
    }
}

/// A bf16 (and f16, f64) checkpoint into fp32 parameters converts as `to_kind` does.
#[test]
fn a_bf16_file_loads_into_fp32_parameters() {
    let (_dir, path, tensors) = written_sample();
    let targets = targets_like(&tensors, Some(Kind::Float));
    load(&targets, &path).expect("mapped load");
    for ((name, t), (_, src)) in targets.iter().zip(&tensors) {
        let want = match src.is_floating_point() {
            true => src.to_kind(Kind::Float),
            false => src.shallow_clone(),
        };
        assert_eq!(t.kind(), want.kind(), "{name}");
        assert!(t.equal(&want), "{name}");
    }
}

/// Data that is not aligned for its dtype (a writer that does not pad) is copied first, with the
/// same result.
#[test]
fn unaligned_data_loads_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("unaligned.safetensors");
    let f = Tensor::from_slice(&[1.5f32, -2.0, 3.25]);
    let d = Tensor::from_slice(&[0.1f64, 0.2]);
    let (fb, db) = (bytes_of(&f), bytes_of(&d));
    // The data starts at byte 8 + 203 (odd), and `f` after 3 more bytes.
    write_raw(
        &path,
        &[
            ("x", "U8", &[3], &[1, 2, 3]),
            ("f", "F32", &[3], &fb),
            ("d", "F64", &[2], &db),
        ],
        203,
    );
    let targets = vec![
        ("x".to_string(), Tensor::zeros([3], cpu(Kind::Uint8))),
        ("f".to_string(), Tensor::zeros([3], cpu(Kind::Float))),
        ("d".to_string(), Tensor::zeros([2], cpu(Kind::Float))),
    ];
    load(&targets, &path).expect("load");
    assert!(targets[0].1.equal(&Tensor::from_slice(&[1u8, 2, 3])));
    assert!(targets[1].1.equal(&f));
    assert!(targets[2].1.equal(&d.to_kind(Kind::Float)));
}

/// Truncated files and headers that point past the end are refused before any data is read, in
/// one line naming the file.
#[test]
fn truncated_and_lying_files_are_one_line_errors() {
    let (dir, good, tensors) = written_sample();
    let bytes = std::fs::read(&good).expect("read");
    let targets = targets_like(&tensors, None);
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;

    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "shorter than the 8-byte header length"),
        ("five bytes", bytes[..5].to_vec(), "shorter than"),
        (
            "half",
            bytes[..bytes.len() / 2].to_vec(),
            "truncated or corrupt",
        ),
        (
            "last byte cut",
            bytes[..bytes.len() - 1].to_vec(),
            "do not end at the end of the file",
        ),
        (
            "header cut",
            bytes[..8 + header_len / 2].to_vec(),
            "header's length runs past the end",
        ),
    ];
    // A header whose last offsets point far past the end of the file, over the same data.
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + header_len]).expect("header");
    let mut lying = header.clone();
    let entry = lying
        .as_object_mut()
        .expect("object")
        .values_mut()
        .max_by_key(|v| v["data_offsets"][1].as_u64())
        .expect("an entry");
    entry["data_offsets"][1] = serde_json::json!(1u64 << 40);
    let mut text = serde_json::to_vec(&lying).expect("json");
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut past_end = (text.len() as u64).to_le_bytes().to_vec();
    past_end.extend(text);
    past_end.extend_from_slice(&bytes[8 + header_len..]);
    cases.push(("offsets past the end", past_end, "truncated or corrupt"));
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("header length 2^40", huge, "truncated or corrupt"));

    for (what, content, want) in cases {
        let path = dir
            .path()
            .join(format!("{}.safetensors", what.replace(' ', "_")));
        std::fs::write(&path, &content).expect("write");
        let e = load(&targets, &path).expect_err(what).to_string();
        assert!(!e.contains('\n'), "{what}: {e}");
        assert!(
            e.contains(&path.display().to_string()) && e.contains(want),
            "{what}: {e}"
        );
    }
    let missing = dir.path().join("missing.safetensors");
    let e = load(&targets, &missing).expect_err("missing").to_string();
    assert!(
        e.contains("missing.safetensors") && e.contains("file not found"),
        "{e}"
    );
    // A dtype libtorch has no kind for.
    let path = dir.path().join("u16.safetensors");
    write_raw(&path, &[("u", "U16", &[2], &[0, 1, 2, 3])], 64);
    let e = load(&targets, &path).expect_err("u16").to_string();
    assert!(e.contains("tensor u is stored as U16"), "{e}");
}

/// `copy_named`'s checks hold for mapped tensors, with the same messages, and nothing is copied
/// when one fails.
#[test]
fn mapped_tensors_are_checked_as_loaded_ones() {
    let (_dir, path, tensors) = written_sample();
    let mut targets = targets_like(&tensors, None);
    targets[0].1 = Tensor::full([3, 5], -1, cpu(Kind::Float));
    let e = load(&targets, &path).expect_err("shape").to_string();
    assert!(
        e.contains("tensor a.f32 has shape [5, 3] in the checkpoint but [3, 5] in the model"),
        "{e}"
    );
    assert!(
        targets[1].1.eq(-1).all().int64_value(&[]) == 1,
        "nothing copied"
    );
    let mut targets = targets_like(&tensors, None);
    targets[4].1 = Tensor::full([3, 3], -1, cpu(Kind::Float));
    let e = load(&targets, &path).expect_err("ints").to_string();
    assert!(e.contains("tensor e.i64 is stored as Int64"), "{e}");
    let mut targets = targets_like(&tensors, None);
    targets.push(("z".into(), Tensor::zeros([1], cpu(Kind::Float))));
    let e = load(&targets, &path).expect_err("missing").to_string();
    assert!(e.contains("missing tensor z (expected shape [1])"), "{e}");
    let targets = targets_like(&tensors[1..], None);
    let e = load(&targets, &path).expect_err("extra").to_string();
    assert!(
        e.contains("unexpected tensor a.f32 (not in the model)"),
        "{e}"
    );
}

/// Mixtral's per-expert weights fused from mapped files equal the fused tensors, and fill the
/// fused parameters straight from the file.
#[test]
fn fused_experts_from_the_mapping_equal_the_fused_tensors() {
    tch::manual_seed(3);
    let lp = "model.layers.0.block_sparse_moe";
    let fp = "model.layers.0.mlp";
    let mut legacy: Vec<(String, Tensor)> = vec![(
        format!("{lp}.gate.weight"),
        Tensor::randn([3, 8], cpu(Kind::Float)),
    )];
    for e in 0..3 {
        for (w, shape) in [("w1", [12, 8]), ("w3", [12, 8]), ("w2", [8, 12])] {
            let t = Tensor::randn(shape, cpu(Kind::Float)).to_kind(Kind::BFloat16);
            legacy.push((format!("{lp}.experts.{e}.{w}.weight"), t));
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    Tensor::write_safetensors(&legacy, &path).expect("write");
    let mut eager: BTreeMap<String, Tensor> = legacy.into_iter().collect();
    fuse_checkpoint_experts(&mut eager, lp, fp, 3, &path).expect("fuse");
    let mut lazy: BTreeMap<String, Stored> = open(&path).expect("open").into_iter().collect();
    fuse_checkpoint_experts(&mut lazy, lp, fp, 3, &path).expect("fuse");
    let targets: Vec<(String, Tensor)> = eager
        .iter()
        .map(|(n, t)| (n.clone(), Tensor::zeros(t.size(), cpu(Kind::Float))))
        .collect();
    copy_named(
        &mut targets.iter().map(|(n, t)| (n.as_str(), t)),
        lazy.into_iter().collect(),
        &path,
    )
    .expect("load");
    for (name, t) in &targets {
        assert!(t.equal(&eager[name].to_kind(Kind::Float)), "{name}");
    }
}
