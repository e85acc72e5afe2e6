//! Bad input, end to end: every mistake a user can make in a recipe, a data file, a checkpoint, a
//! flag or a device gives exit code 1, exactly one `error:` line on stderr that names the file,
//! key or path and what was expected, no panic, and leaves what is already on disk as it was.
//!
//! Run-time cases are tried twice: into a fresh run directory (which must not be left looking
//! like a run, or the corrected command would be refused) and, with `--resume auto`, into a
//! directory that holds an earlier run (which must be left byte for byte as it was).

mod common;

use common::*;
use std::path::Path;

const RECIPE: &str = "tiny.toml";

/// A working directory holding the tiny recipe (out_dir "run").
fn setup() -> (tempfile::TempDir, String) {
    let work = workdir();
    let text = tiny_recipe("run");
    write_recipe(work.path(), RECIPE, &text);
    (work, text)
}

/// Writes a directory that looks like an earlier run: resolved recipe, metrics, summary, tb.
fn fake_prior_run(dir: &Path) {
    std::fs::create_dir_all(dir.join("tb")).expect("mkdir");
    std::fs::write(dir.join("config.toml"), "# the recipe of an earlier run\n").expect("write");
    let rows: String = (1..=3)
        .map(|s| format!("{{\"step\":{s},\"loss\":5.5,\"lr\":0.001,\"tokens\":{},\"tokens_per_s\":1000.0}}\n", 64 * s))
        .collect();
    std::fs::write(dir.join("metrics.jsonl"), rows).expect("write");
    std::fs::write(dir.join("summary.json"), "{\"steps\": 3}\n").expect("write");
    std::fs::write(
        dir.join("tb/events.out.tfevents.0.earlier"),
        b"\x00\x01earlier",
    )
    .expect("write");
}

fn holds_run(dir: &Path) -> bool {
    [
        "config.toml",
        "metrics.jsonl",
        "checkpoints",
        "summary.json",
    ]
    .iter()
    .any(|f| dir.join(f).exists())
}

/// `trainer run RECIPE ARGS` must be refused with one error line containing `needles`, both into
/// a fresh run directory and (with `--resume auto`) into one that holds an earlier run.
/// Returns the error line of the first attempt.
fn assert_run_refused(work: &Path, recipe: &str, args: &[&str], needles: &[&str]) -> String {
    let mut fresh = vec!["run", recipe];
    fresh.extend_from_slice(args);
    fresh.extend_from_slice(&["--set", "run.out_dir=fresh"]);
    let line = trainer(work, &fresh).assert_one_error(needles);
    assert!(
        !holds_run(&work.join("fresh")),
        "a refused run left a run directory behind: {line}"
    );
    let resumed_line = assert_resume_refused(work, recipe, args, needles);
    assert_eq!(
        line,
        resumed_line.replace("run.out_dir=prior", "run.out_dir=fresh")
    );
    line
}

/// `trainer run RECIPE ARGS --resume auto` into a directory holding an earlier run must be
/// refused with one error line containing `needles`, and leave that directory as it was.
fn assert_resume_refused(work: &Path, recipe: &str, args: &[&str], needles: &[&str]) -> String {
    let prior = work.join("prior");
    fake_prior_run(&prior);
    let before = snapshot(&prior);
    let mut resumed = vec!["run", recipe];
    resumed.extend_from_slice(args);
    resumed.extend_from_slice(&["--set", "run.out_dir=prior", "--resume", "auto"]);
    let line = trainer(work, &resumed).assert_one_error(needles);
    assert_same_files(
        &before,
        &snapshot(&prior),
        &format!("refused `trainer {}`", resumed.join(" ")),
    );
    line
}

/// A recipe error: `validate` and `run` (into a directory holding an earlier run, which must be
/// left as it was) both refuse it with the same message.
fn assert_recipe_refused(work: &Path, recipe: &str, args: &[&str], needles: &[&str]) -> String {
    let mut validate = vec!["validate", recipe];
    validate.extend_from_slice(args);
    let line = trainer(work, &validate).assert_one_error(needles);
    let run_line = assert_resume_refused(work, recipe, args, needles);
    assert_eq!(
        line, run_line,
        "validate and run report a recipe error differently"
    );
    line
}

/// Writes the tiny recipe with one line replaced and checks it is refused; the message must
/// start with `tiny.toml:LINE:` where LINE is that of `at` in the edited text.
fn assert_edit_refused(from: &str, to: &str, at: &str, needles: &[&str]) -> String {
    let (work, text) = setup();
    let edited = replace_line(&text, from, to);
    write_recipe(work.path(), RECIPE, &edited);
    let line = assert_recipe_refused(work.path(), RECIPE, &[], needles);
    let want = format!("error: {RECIPE}:{}:", line_of(&edited, at));
    assert!(
        line.starts_with(&want),
        "expected the location {want:?}, got:\n{line}"
    );
    line
}

// ---- the recipe ------------------------------------------------------------------------

#[test]
fn malformed_toml_names_line_and_column() {
    let line = assert_edit_refused(
        "batch_size = 4",
        "batch_size = = 4",
        "batch_size",
        &["malformed TOML"],
    );
    // error: tiny.toml:LINE:COL: malformed TOML: ...
    let col = line.split(':').nth(3).expect("a column");
    assert!(
        col.parse::<usize>().is_ok_and(|c| c > 0),
        "no column number in {line:?}"
    );
}

#[test]
fn malformed_toml_unclosed_table_header() {
    assert_edit_refused("[optim]", "[optim", "[optim", &["malformed TOML"]);
}

#[test]
fn unknown_key_names_file_line_column_and_key_path() {
    // Followed by other keys of its table, and as the last key of its table.
    let line = assert_edit_refused(
        "batch_size = 4",
        "batch_size = 4\nbogus = 1",
        "bogus",
        &[
            ":1: train.bogus: unknown field `bogus`",
            "expected one of",
            "`batch_size`",
        ],
    );
    assert!(
        !line.contains("train.bogus.bogus"),
        "the key is named twice: {line}"
    );
    assert_edit_refused(
        "keep_checkpoints = 2",
        "keep_checkpoints = 2\nbogus = 1",
        "bogus",
        &[":1: train.bogus: unknown field `bogus`", "expected one of"],
    );
    // In a `kind`-tagged section.
    assert_edit_refused(
        "lr = 3e-3",
        "lr = 3e-3\nmomentom = 0.9",
        "momentom",
        &["optim.momentom", "unknown field"],
    );
}

#[test]
fn unknown_section_is_named() {
    assert_edit_refused(
        "[schedule]",
        "[shedule]",
        "[shedule]",
        &["shedule", "unknown field"],
    );
}

#[test]
fn wrong_type_names_key_and_expected_type() {
    assert_edit_refused(
        "batch_size = 4",
        "batch_size = \"x\"",
        "batch_size",
        &[":1: train.batch_size: invalid type: string \"x\", expected"],
    );
}

/// In the `kind`-tagged sections (`[model]`, `[optim]`, `data.train`) serde buffers the fields
/// before it picks the variant, and the key path is found by the recipe loader, not by serde.
#[test]
fn wrong_type_in_a_kind_tagged_section_names_the_key() {
    assert_edit_refused(
        "lr = 3e-3",
        "lr = \"fast\"",
        "lr",
        &[":1: optim.lr: invalid type", "expected f64"],
    );
    assert_edit_refused(
        "d_model = 32",
        "d_model = \"x\"",
        "d_model",
        &[":1: model.d_model: invalid type", "expected i64"],
    );
    let (work, _) = setup();
    assert_recipe_refused(
        work.path(),
        RECIPE,
        &["--set", "model.d_model=\"x\""],
        &["--set model.d_model=\"x\"", "model.d_model", "invalid type"],
    );
}

#[test]
fn zero_or_negative_lr_is_refused() {
    for lr in ["0.0", "-3e-3"] {
        assert_edit_refused(
            "lr = 3e-3",
            &format!("lr = {lr}"),
            "lr",
            &[":1: optim.lr: expected a positive number"],
        );
    }
}

#[test]
fn zero_or_negative_batch_size_is_refused() {
    for b in ["0", "-4"] {
        assert_edit_refused(
            "batch_size = 4",
            &format!("batch_size = {b}"),
            "batch_size",
            &[&format!(
                ":1: train.batch_size: expected a positive integer, got {b}"
            )],
        );
    }
}

#[test]
fn zero_or_negative_seq_len_is_refused() {
    for s in ["0", "-16"] {
        assert_edit_refused(
            "seq_len = 16",
            &format!("seq_len = {s}"),
            "seq_len",
            &[&format!(
                ":1: data.seq_len: expected a positive integer, got {s}"
            )],
        );
    }
}

#[test]
fn d_model_not_divisible_by_n_heads_is_refused() {
    assert_edit_refused(
        "d_model = 32",
        "d_model = 30",
        "d_model",
        &[
            "model.d_model",
            "d_model (30) must be divisible by n_heads (4)",
        ],
    );
}

// ---- --set -----------------------------------------------------------------------------

#[test]
fn set_with_a_bad_value_names_the_set() {
    let (work, _) = setup();
    let w = work.path();
    assert_recipe_refused(
        w,
        RECIPE,
        &["--set", "train.batch_size=abc"],
        &[
            "--set train.batch_size=abc",
            "train.batch_size",
            "invalid type",
            "expected",
        ],
    );
    assert_recipe_refused(
        w,
        RECIPE,
        &["--set", "optim.lr=-0.1"],
        &[
            "--set optim.lr=-0.1",
            "optim.lr",
            "expected a positive number",
        ],
    );
    assert_recipe_refused(
        w,
        RECIPE,
        &["--set", "train.nope=1"],
        &["--set train.nope=1", "train.nope", "unknown field"],
    );
    assert_recipe_refused(
        w,
        RECIPE,
        &["--set", "train.max_steps"],
        &["--set train.max_steps", "key.path=value"],
    );
    assert_recipe_refused(
        w,
        RECIPE,
        &["--set", "model.d_model.x=1"],
        &["--set model.d_model.x=1", "d_model is not a table"],
    );
}

// ---- data ------------------------------------------------------------------------------

/// The tiny recipe reading `data.train` from a token file `name` (uint16 unless `dtype`), with
/// `bytes` written to it (no file when None).
fn token_recipe(work: &Path, name: &str, dtype: &str, bytes: Option<&[u8]>) -> String {
    if let Some(b) = bytes {
        std::fs::write(work.join(name), b).expect("write tokens");
    }
    let text = replace_line(
        &tiny_recipe("run"),
        "train = { kind = \"builtin\" }",
        &format!(
            "train = {{ kind = \"tokens\", path = {}, dtype = \"{dtype}\" }}",
            toml_str(name)
        ),
    );
    write_recipe(work, "tokens.toml", &text)
}

fn u16_tokens(ids: impl IntoIterator<Item = u16>) -> Vec<u8> {
    ids.into_iter().flat_map(u16::to_le_bytes).collect()
}

#[test]
fn missing_data_file_is_refused() {
    let (work, text) = setup();
    let w = work.path();
    let r = token_recipe(w, "missing.bin", "uint16", None);
    assert_run_refused(w, &r, &[], &["data.train", "missing.bin", "No such file"]);
    // A text source, and a missing separate validation source.
    let t = replace_line(
        &text,
        "train = { kind = \"builtin\" }",
        "train = { kind = \"text\", path = \"missing.txt\" }",
    );
    let r = write_recipe(w, "text.toml", &t);
    assert_run_refused(w, &r, &[], &["data.train", "missing.txt", "No such file"]);
    let t = replace_line(
        &text,
        "train = { kind = \"builtin\" }",
        "train = { kind = \"builtin\" }\nvalid = { kind = \"text\", path = \"nope/valid.txt\" }",
    );
    let r = write_recipe(w, "valid.toml", &t);
    assert_run_refused(
        w,
        &r,
        &[],
        &["data.valid", "nope/valid.txt", "No such file"],
    );
}

#[test]
fn unreadable_data_file_is_refused() {
    // A directory where a file is expected.
    let (work, text) = setup();
    let w = work.path();
    std::fs::create_dir(w.join("adir.bin")).expect("mkdir");
    let r = token_recipe(w, "adir.bin", "uint16", None);
    assert_run_refused(w, &r, &[], &["data.train", "adir.bin"]);
    let t = replace_line(
        &text,
        "train = { kind = \"builtin\" }",
        "train = { kind = \"text\", path = \"adir.bin\" }",
    );
    let r = write_recipe(w, "text.toml", &t);
    assert_run_refused(w, &r, &[], &["data.train", "adir.bin"]);
}

#[test]
fn empty_data_file_is_refused() {
    let (work, text) = setup();
    let w = work.path();
    let r = token_recipe(w, "empty.bin", "uint16", Some(&[]));
    assert_run_refused(w, &r, &[], &["data.train", "empty.bin", "is empty"]);
    std::fs::write(w.join("empty.txt"), "").expect("write");
    let t = replace_line(
        &text,
        "train = { kind = \"builtin\" }",
        "train = { kind = \"text\", path = \"empty.txt\" }",
    );
    let r = write_recipe(w, "text.toml", &t);
    assert_run_refused(w, &r, &[], &["data.train", "empty.txt", "is empty"]);
}

#[test]
fn token_file_size_not_a_multiple_of_the_width_is_refused() {
    let (work, _) = setup();
    let w = work.path();
    let mut bytes = u16_tokens((0..100).map(|i| i % 200));
    bytes.push(7); // 201 bytes
    let r = token_recipe(w, "odd.bin", "uint16", Some(&bytes));
    assert_run_refused(
        w,
        &r,
        &[],
        &[
            "data.train",
            "odd.bin",
            "201 bytes",
            "not a multiple of the token width",
            "2 bytes",
        ],
    );
    let bytes = u16_tokens((0..101).map(|i| i % 200)); // 202 bytes: not a multiple of 4
    let r = token_recipe(w, "odd32.bin", "uint32", Some(&bytes));
    assert_run_refused(
        w,
        &r,
        &[],
        &[
            "data.train",
            "odd32.bin",
            "202 bytes",
            "not a multiple of the token width",
            "4 bytes",
        ],
    );
}

#[test]
fn token_file_shorter_than_a_window_is_refused() {
    let (work, _) = setup();
    let w = work.path();
    // seq_len 16 needs 17 tokens per window; 16 tokens do not make one (and the training part
    // left after holding out data.valid_fraction has fewer still).
    let r = token_recipe(w, "short.bin", "uint16", Some(&u16_tokens(0..16)));
    assert_run_refused(
        w,
        &r,
        &[],
        &[
            "data.train",
            "short.bin",
            "tokens but one training window needs seq_len + 1 = 17",
        ],
    );
    // A separate validation file that is too short, while the training data is fine.
    let text = replace_line(
        &tiny_recipe("run"),
        "train = { kind = \"builtin\" }",
        "train = { kind = \"builtin\" }\nvalid = { kind = \"tokens\", path = \"short.bin\" }",
    );
    let r = write_recipe(w, "valid.toml", &text);
    assert_run_refused(
        w,
        &r,
        &[],
        &[
            "data.valid",
            "short.bin",
            "has 16 tokens",
            "seq_len + 1 = 17",
        ],
    );
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let (work, _) = setup();
    let w = work.path();
    let mut ids: Vec<u16> = (0..1000).map(|i| (i % 256) as u16).collect();
    ids[500] = 256; // vocab_size is 256
    let r = token_recipe(w, "big.bin", "uint16", Some(&u16_tokens(ids)));
    assert_run_refused(
        w,
        &r,
        &[],
        &["data.train", "big.bin", "token id 256", "vocab_size is 256"],
    );
    let bytes: Vec<u8> = (0..1000u32)
        .map(|i| if i == 999 { 70_000 } else { i % 256 })
        .flat_map(u32::to_le_bytes)
        .collect();
    let r = token_recipe(w, "big32.bin", "uint32", Some(&bytes));
    assert_run_refused(
        w,
        &r,
        &[],
        &[
            "data.train",
            "big32.bin",
            "token id 70000",
            "vocab_size is 256",
        ],
    );
}

// ---- devices ---------------------------------------------------------------------------

#[test]
fn a_device_this_machine_does_not_have_is_refused() {
    let (work, _) = setup();
    let w = work.path();
    let n = cuda_devices(w);
    if n == 0 {
        // `cuda` on a machine without CUDA.
        assert_run_refused(
            w,
            RECIPE,
            &["--set", "run.device=cuda"],
            &["run.device", "\"cuda\"", "no CUDA device"],
        );
    }
    // An index past the last device (cuda:3 on a CPU or one-GPU box).
    let idx = n.max(3);
    let set = format!("run.device=cuda:{idx}");
    assert_run_refused(
        w,
        RECIPE,
        &["--set", &set],
        &["run.device", &format!("cuda:{idx}")],
    );
    // Not a device at all: a recipe error.
    assert_recipe_refused(
        w,
        RECIPE,
        &["--set", "run.device=tpu"],
        &["run.device", "expected auto, cpu, cuda or cuda:N"],
    );
}

// ---- run directories and checkpoints ---------------------------------------------------

#[test]
fn a_second_run_into_a_run_directory_is_refused() {
    let (work, _) = setup();
    let w = work.path();
    run_tiny(w, RECIPE, "run", &["--set", "train.max_steps=10"]);
    let metrics_before = std::fs::read(w.join("run/metrics.jsonl")).expect("metrics");
    let before = snapshot(&w.join("run"));
    trainer(w, &["run", RECIPE, "--set", "train.max_steps=10"]).assert_one_error(&[
        "run directory run",
        "already holds a run",
        "--resume auto",
    ]);
    // Also with a different recipe that would otherwise be valid.
    trainer(
        w,
        &[
            "run",
            RECIPE,
            "--set",
            "train.max_steps=12",
            "--set",
            "optim.lr=1e-3",
        ],
    )
    .assert_one_error(&["run directory run", "already holds a run"]);
    assert_eq!(
        metrics_before,
        std::fs::read(w.join("run/metrics.jsonl")).expect("metrics"),
        "metrics.jsonl changed"
    );
    assert_same_files(&before, &snapshot(&w.join("run")), "a refused second run");
}

#[test]
fn a_checkpoint_that_does_not_match_the_model_is_refused() {
    let (work, text) = setup();
    let w = work.path();
    run_tiny(w, RECIPE, "run", &["--set", "train.max_steps=10"]);
    let before = snapshot(&w.join("run"));
    let wider = write_recipe(
        w,
        "wider.toml",
        &replace_line(&text, "d_model = 32", "d_model = 64"),
    );
    trainer(
        w,
        &[
            "run",
            &wider,
            "--set",
            "train.max_steps=10",
            "--resume",
            "auto",
        ],
    )
    .assert_one_error(&[
        "checkpoint",
        "step-00000010",
        "model.safetensors",
        "[256, 32] in the checkpoint but [256, 64] in the model",
    ]);
    assert_same_files(
        &before,
        &snapshot(&w.join("run")),
        "resume with a wider model",
    );
    // Another optimizer: the model loads, the optimizer state does not match.
    let sgd = write_recipe(
        w,
        "sgd.toml",
        &replace_line(&text, "kind = \"adamw\"", "kind = \"sgd\"\nmomentum = 0.9"),
    );
    trainer(
        w,
        &[
            "run",
            &sgd,
            "--set",
            "train.max_steps=10",
            "--resume",
            "auto",
        ],
    )
    .assert_one_error(&["checkpoint", "optimizer.safetensors"]);
    assert_same_files(
        &before,
        &snapshot(&w.join("run")),
        "resume with another optimizer",
    );
}

#[test]
fn a_truncated_checkpoint_is_refused() {
    let (work, _) = setup();
    let w = work.path();
    run_tiny(w, RECIPE, "run", &["--set", "train.max_steps=10"]);
    let ckpt = w.join("run/checkpoints/step-00000010");
    let model = ckpt.join("model.safetensors");
    let len = std::fs::metadata(&model).expect("model file").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .expect("open");
    f.set_len(len / 2).expect("truncate");
    drop(f);
    let before = snapshot(&w.join("run"));
    let set = ["--set", "train.max_steps=10"];
    let from = "run/checkpoints/step-00000010";
    // Named explicitly: its checksum no longer matches, one line naming the file.
    trainer(w, &["run", RECIPE, set[0], set[1], "--resume", from]).assert_one_error(&[
        "checkpoint",
        "step-00000010/model.safetensors",
        "checksum mismatch",
    ]);
    assert_same_files(
        &before,
        &snapshot(&w.join("run")),
        "resume from a truncated checkpoint",
    );
    // Without checksums (a checkpoint written before them), the reader finds the truncation.
    let sums = ckpt.join("checksums.json");
    let kept_sums = std::fs::read(&sums).expect("checksums");
    std::fs::remove_file(&sums).expect("remove");
    trainer(w, &["run", RECIPE, set[0], set[1], "--resume", from])
        .assert_one_error(&["step-00000010/model.safetensors", "truncated or corrupt"]);
    std::fs::write(&sums, kept_sums).expect("restore");
    // `--resume auto` falls back to the older intact checkpoint, with a warning naming the
    // corrupt one, and writes step 10 again.
    let auto = trainer(w, &["run", RECIPE, set[0], set[1], "--resume", "auto"]);
    auto.assert_success();
    assert!(
        auto.stderr.contains("not resuming from")
            && auto.stderr.contains("step-00000010/model.safetensors"),
        "{}",
        auto.describe()
    );
    trainer(w, &["verify", "run"]).assert_success();
    // Truncated to nothing, and a header cut short (checksums removed: the reader's own checks).
    std::fs::remove_file(&sums).expect("remove");
    for keep in [0, 5] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&model)
            .expect("open");
        f.set_len(keep).expect("truncate");
        drop(f);
        trainer(w, &["run", RECIPE, set[0], set[1], "--resume", from])
            .assert_one_error(&["step-00000010/model.safetensors"]);
    }
}

#[test]
fn resuming_from_a_directory_that_is_not_a_checkpoint_is_refused() {
    let (work, _) = setup();
    let w = work.path();
    run_tiny(w, RECIPE, "run", &["--set", "train.max_steps=5"]);
    let before = snapshot(&w.join("run"));
    trainer(
        w,
        &[
            "run",
            RECIPE,
            "--set",
            "train.max_steps=5",
            "--resume",
            "run/checkpoints/step-00000099",
        ],
    )
    .assert_one_error(&["checkpoint", "step-00000099", "state.json"]);
    assert_same_files(
        &before,
        &snapshot(&w.join("run")),
        "resume from a missing checkpoint",
    );
    std::fs::write(
        w.join("run/checkpoints/step-00000005/state.json"),
        "{\"step\": ",
    )
    .expect("write");
    let before2 = snapshot(&w.join("run"));
    trainer(
        w,
        &[
            "run",
            RECIPE,
            "--set",
            "train.max_steps=5",
            "--resume",
            "run/checkpoints/step-00000005",
        ],
    )
    .assert_one_error(&["checkpoint", "step-00000005/state.json", "malformed"]);
    assert_same_files(
        &before2,
        &snapshot(&w.join("run")),
        "resume from a malformed state.json",
    );
}

#[test]
fn a_run_directory_that_cannot_be_created_is_refused() {
    let (work, _) = setup();
    let w = work.path();
    // A path below a regular file.
    let line = trainer(w, &["run", RECIPE, "--set", "run.out_dir=tiny.toml/sub"])
        .assert_one_error(&["tiny.toml/sub", "Not a directory"]);
    assert_eq!(
        line.matches("Not a directory").count(),
        1,
        "the cause is repeated: {line}"
    );
}

/// Command-line argument errors follow the one convention: one `error:` line naming the
/// argument, exit code 1 (not clap's usage text and exit code 2); help still prints, exit 0.
#[test]
fn argument_errors_are_one_line_with_exit_code_1() {
    let work = workdir();
    let w = work.path();
    for (args, needle) in [
        (vec!["launch", "--nproc", "-1", "x.toml"], "-1"),
        (vec!["export", "run", "--to", "onnx", "out"], "onnx"),
        (vec!["frobnicate"], "frobnicate"),
        (vec!["run"], "<RECIPE>"),
        (
            vec!["eval", "--init", "x", "--data", "d", "--seq-len", "many"],
            "many",
        ),
        (
            vec![
                "eval",
                "--init",
                "x",
                "--data",
                "d",
                "--seq-len",
                "8",
                "--batches",
                "0",
            ],
            "--batches",
        ),
    ] {
        trainer(w, &args).assert_one_error(&[needle]);
    }
    let help = trainer(w, &["--help"]);
    assert_eq!(help.code, Some(0), "{}", help.describe());
    assert!(help.stdout.contains("Usage"), "{}", help.describe());
}
