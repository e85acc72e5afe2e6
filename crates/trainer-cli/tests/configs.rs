//! Every recipe in `configs/` is one that `trainer validate` accepts, and `--set` overrides show
//! up in the resolved recipe it prints.

mod common;

use common::*;
use std::path::PathBuf;

fn config_files() -> Vec<PathBuf> {
    let dir = repo_root().join("configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no recipes in {}", dir.display());
    files
}

#[test]
fn every_config_validates_and_its_resolved_form_is_a_fixpoint() {
    let work = workdir();
    let w = work.path();
    // Recipes that start from a checkpoint name the quickstart's run and its Hugging Face export
    // (as their comments say to create them); make tiny ones of both.
    let quickstart = repo_root().join("configs/quickstart.toml");
    trainer(
        w,
        &[
            "run",
            quickstart.to_str().expect("utf-8"),
            "--set",
            "train.max_steps=2",
            "--set",
            "run.threads=1",
            "--set",
            "schedule.warmup_steps=1",
        ],
    )
    .assert_success();
    trainer(
        w,
        &[
            "export",
            "runs/quickstart",
            "--to",
            "hf",
            "runs/quickstart-hf",
        ],
    )
    .assert_success();
    // configs/continual_mixture.toml reads new data from data/new.txt (its comment makes one).
    std::fs::create_dir_all(w.join("data")).expect("data dir");
    std::fs::write(
        w.join("data/new.txt"),
        "abcdefghijklmnopqrstuvwxyz ".repeat(4000),
    )
    .expect("data/new.txt");
    // configs/sft_chat.toml reads the example its comment makes (a tiny model, its tokenizer and
    // chat template, generated conversations).
    let made = std::process::Command::new(python())
        .arg(repo_root().join("configs/sft/make_sft_example.py"))
        .arg(w.join("runs/sft-example"))
        .output()
        .expect("python runs");
    assert!(
        made.status.success(),
        "make_sft_example.py: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    for (i, path) in config_files().iter().enumerate() {
        let p = path.to_str().expect("utf-8 path");
        let out = trainer(w, &["validate", p]);
        out.assert_success();
        assert!(
            out.stdout.contains("[run]") && out.stdout.contains("[train]"),
            "no resolved recipe:\n{}",
            out.describe()
        );
        assert!(out.stderr.contains("valid ("), "{}", out.describe());
        // The same text as before the config types moved (reference/resolved/README.md).
        let name = path.file_name().expect("file name");
        let reference = repo_root()
            .join("crates/trainer-cli/tests/reference/resolved")
            .join(name);
        let want = std::fs::read_to_string(&reference)
            .unwrap_or_else(|e| panic!("{}: {e} (add the reference)", reference.display()));
        assert_eq!(out.stdout, want, "{p}: the resolved recipe changed");
        // The printed recipe is itself a valid recipe that resolves to the same text.
        let resolved = format!("resolved-{i}.toml");
        write_recipe(w, &resolved, &out.stdout);
        let again = trainer(w, &["validate", &resolved]);
        again.assert_success();
        assert_eq!(
            again.stdout, out.stdout,
            "{p}: the resolved recipe does not resolve to itself"
        );
    }
    // Validating trains nothing and writes no run directory.
    let left: Vec<String> = std::fs::read_dir(w)
        .expect("workdir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n != ".logs" && n != "runs" && n != "data" && !n.starts_with("resolved-"))
        .collect();
    assert!(left.is_empty(), "validate wrote {left:?}");
}

#[test]
fn set_overrides_show_up_in_the_resolved_recipe() {
    let work = workdir();
    let w = work.path();
    let quickstart = repo_root().join("configs/quickstart.toml");
    let out = trainer(
        w,
        &[
            "validate",
            quickstart.to_str().expect("utf-8 path"),
            "--set",
            "train.max_steps=77",
            "--set",
            "optim.lr=0.001",
            "--set",
            "run.device=cpu",
            "--set",
            "run.out_dir=/somewhere/else",
            "--set",
            "optim.betas=[0.8, 0.99]",
            "--set",
            "data.train={kind=\"text\", path=\"corpus.txt\"}",
        ],
    );
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    for want in [
        "max_steps = 77",
        "lr = 0.001",
        "device = \"cpu\"",
        "out_dir = \"/somewhere/else\"",
        "kind = \"text\"",
        "path = \"corpus.txt\"",
    ] {
        assert!(
            lines.contains(&want),
            "{want:?} is not in the resolved recipe:\n{}",
            out.describe()
        );
    }
    let betas = out
        .stdout
        .split("betas = ")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .unwrap_or_default();
    assert!(
        betas.contains("0.8") && betas.contains("0.99"),
        "betas not overridden:\n{}",
        out.describe()
    );
    assert!(out.stderr.contains("valid (77 steps"), "{}", out.describe());
    // Keys not overridden keep their values from the file.
    assert!(lines.contains(&"d_model = 128"), "{}", out.describe());
}
