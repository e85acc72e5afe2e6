//! `trainer tokenize` through the real binary, against the Python `tokenizers` library
//! (tests/reference/tokenize_reference.py) on generated text:
//! - the ids equal Python's `encode_batch` for a byte-level BPE trained locally, for documents
//!   per line, per file, per JSONL record and per Parquet row (pyarrow's files, snappy and
//!   zstd), with the EOS after each; the index holds the document starts;
//! - the output is the same bytes on 1 and 2 threads;
//! - a recipe trains on the result (dtype and index from its summary), also with attention kept
//!   within documents (`data.document_mask`); a wrong dtype or a token file changed since is
//!   refused;
//! - bad input is one line and leaves no output behind; outputs are never overwritten without
//!   --force, an input never.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// Runs the reference script in `cwd`.
fn reference(cwd: &Path, args: &[&str]) -> String {
    let script = repo_root().join("crates/trainer-cli/tests/reference/tokenize_reference.py");
    let out = Command::new(python())
        .current_dir(cwd)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); set TRAINER_PYTHON", python()));
    assert!(
        out.status.success(),
        "tokenize_reference.py failed; it needs tokenizers and numpy (scripts/requirements-test.txt):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Generated text with what tokenizers trip over: accents, emoji, CJK, tabs, runs of spaces,
/// digits, blank lines, a line without its final newline.
fn write_corpus(dir: &Path) {
    let words = [
        "the",
        "river",
        "été",
        "naïve",
        "garçon",
        "数据",
        "🙂",
        "x2",
        "3.14",
        "don't",
        "  ",
        "\t",
        "Ünïcödé",
        "",
        "hello-world",
        "λόγος",
    ];
    let mut a = String::new();
    for i in 0..300usize {
        let n = 3 + i % 11;
        let line: Vec<&str> = (0..n)
            .map(|j| words[(i * 7 + j * 5) % words.len()])
            .collect();
        a.push_str(&line.join(" "));
        a.push('\n');
        if i % 13 == 0 {
            a.push('\n');
        }
    }
    std::fs::create_dir_all(dir.join("corpus/sub")).expect("mkdir");
    std::fs::write(dir.join("corpus/a.txt"), &a).expect("write");
    std::fs::write(
        dir.join("corpus/sub/b.txt"),
        "Second file.\n\nIts last line  ",
    )
    .expect("write");
    let mut jsonl = String::new();
    for (i, line) in a.lines().filter(|l| !l.is_empty()).take(40).enumerate() {
        jsonl.push_str(&serde_json::json!({"id": i, "body": line}).to_string());
        jsonl.push('\n');
    }
    std::fs::write(dir.join("records.jsonl"), jsonl).expect("write");
}

fn tokenize(dir: &Path, args: &[&str]) -> Out {
    let mut all = vec!["tokenize"];
    all.extend(args);
    trainer(dir, &all)
}

fn index(path: &Path) -> Vec<u64> {
    std::fs::read(path)
        .expect("index")
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

#[test]
fn ids_equal_python_tokenizers_and_do_not_depend_on_threads() {
    let work = workdir();
    let w = work.path();
    write_corpus(w);
    std::fs::create_dir(w.join("tok")).expect("mkdir");
    reference(
        w,
        &[
            "train_bpe",
            "tok",
            "400",
            "corpus/a.txt",
            "corpus/sub/b.txt",
        ],
    );
    let cases: [(&str, &[&str], &[&str]); 3] = [
        (
            "line",
            &["--docs", "line"],
            &["corpus/a.txt", "corpus/sub/b.txt"],
        ),
        (
            "file",
            &["--docs", "file"],
            &["corpus/a.txt", "corpus/sub/b.txt"],
        ),
        ("jsonl:body", &["--field", "body"], &["records.jsonl"]),
    ];
    reference(w, &["to_parquet", "records.jsonl", "records.parquet"]);
    reference(
        w,
        &[
            "to_parquet",
            "records.jsonl",
            "records-zstd.parquet",
            "zstd",
        ],
    );
    for (mode, flags, inputs) in cases {
        let want = reference(
            w,
            &[
                &[
                    "encode",
                    "tok/tokenizer.json",
                    "<|endoftext|>",
                    mode,
                    "want.bin",
                ],
                inputs,
            ]
            .concat(),
        );
        let want: serde_json::Value = serde_json::from_str(want.trim()).expect("JSON");
        // The directory stands for its two files, read in sorted order.
        let given: &[&str] = if mode == "jsonl:body" {
            inputs
        } else {
            &["corpus"]
        };
        for threads in ["1", "2"] {
            let out_name = format!("got-{threads}.bin");
            let mut args = given.to_vec();
            args.extend([
                "--tokenizer",
                "tok/tokenizer.json",
                "--out",
                &out_name,
                "--threads",
                threads,
            ]);
            args.extend(flags);
            tokenize(w, &args).assert_success();
        }
        if mode == "jsonl:body" {
            // The same records as Parquet (several row groups; snappy and zstd): the same ids.
            for file in ["records.parquet", "records-zstd.parquet"] {
                let args = [
                    file,
                    "--field",
                    "body",
                    "--tokenizer",
                    "tok",
                    "--out",
                    "pq.bin",
                ];
                tokenize(w, &[&args[..], &["--force"]].concat()).assert_success();
                let pq = std::fs::read(w.join("pq.bin")).expect("tokens");
                assert_eq!(
                    pq,
                    std::fs::read(w.join("want.bin")).expect("reference"),
                    "{file}"
                );
            }
        }
        let got = std::fs::read(w.join("got-1.bin")).expect("tokens");
        assert_eq!(
            got,
            std::fs::read(w.join("want.bin")).expect("reference"),
            "{mode}"
        );
        assert_eq!(
            got,
            std::fs::read(w.join("got-2.bin")).expect("tokens"),
            "{mode}: threads"
        );
        assert_eq!(
            std::fs::read(w.join("got-1.idx")).expect("index"),
            std::fs::read(w.join("got-2.idx")).expect("index")
        );
        let starts = index(&w.join("got-1.idx"));
        let docs = want["documents"].as_u64().expect("count");
        assert_eq!(starts.len() as u64, docs + 1, "{mode}");
        assert_eq!(
            *starts.last().expect("total") as usize,
            got.len() / 2,
            "{mode}"
        );
        // Each document ends with the EOS (id 0 here).
        for s in &starts[1..] {
            let at = 2 * (*s as usize - 1);
            assert_eq!(&got[at..at + 2], &[0, 0], "{mode}: no EOS before token {s}");
        }
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(w.join("got-1.json")).expect("summary"))
                .expect("JSON");
        assert_eq!(summary["documents"].as_u64(), Some(docs));
        assert_eq!(summary["dtype"], "uint16");
        for f in [
            "got-1.bin",
            "got-1.idx",
            "got-1.json",
            "got-2.bin",
            "got-2.idx",
            "got-2.json",
        ] {
            std::fs::remove_file(w.join(f)).expect("remove");
        }
    }
}

#[test]
fn a_recipe_trains_on_the_tokens_and_refuses_a_mismatch() {
    let work = workdir();
    let w = work.path();
    write_corpus(w);
    std::fs::create_dir(w.join("tok")).expect("mkdir");
    reference(w, &["train_bpe", "tok", "400", "corpus/a.txt"]);
    tokenize(
        w,
        &[
            "corpus",
            "--tokenizer",
            "tok",
            "--out",
            "c.bin",
            "--docs",
            "line",
        ],
    )
    .assert_success();
    let recipe = replace_line(
        &replace_line(
            &tiny_recipe("runs/t"),
            "train = { kind = \"builtin\" }",
            "train = { kind = \"tokens\", path = \"c.bin\" }",
        ),
        "vocab_size = 256",
        "vocab_size = 400",
    );
    let path = write_recipe(w, "t.toml", &recipe);
    let rows = run_tiny(w, &path, "runs/t", &[]);
    assert!(!train_rows(&rows).is_empty());
    // Attention within documents (the index from the summary): trains, and sees less than
    // the plain windows do, so its first loss differs.
    let masked = run_tiny(w, &path, "runs/m", &["--set", "data.document_mask=true"]);
    let first = |rows: &[serde_json::Value]| num(&train_rows(rows)[0], "loss");
    assert!((first(&masked) - first(&rows)).abs() > 1e-6);
    let out = trainer(
        w,
        &[
            "validate",
            &path,
            "--set",
            "data.train={kind=\"builtin\"}",
            "--set",
            "data.document_mask=true",
        ],
    );
    out.assert_one_error(&["data.document_mask", "data.train has no document index"]);
    // A token file without an index (nanoGPT's): known when the run opens it.
    std::fs::copy(w.join("c.bin"), w.join("plain.bin")).expect("copy");
    let out = trainer(
        w,
        &[
            "run",
            &path,
            "--set",
            "data.train={kind=\"tokens\", path=\"plain.bin\"}",
            "--set",
            "data.document_mask=true",
            "--set",
            "run.out_dir=runs/n",
        ],
    );
    out.assert_one_error(&["data.train = plain.bin: has no document index"]);
    // A dtype that contradicts the summary.
    let out = trainer(
        w,
        &[
            "run",
            &path,
            "--set",
            "data.train={kind=\"tokens\", path=\"c.bin\", dtype=\"uint32\"}",
            "--set",
            "run.out_dir=runs/u",
        ],
    );
    out.assert_one_error(&["data.train.dtype is uint32 but the file's summary says uint16"]);
    // A token file cut short since the summary was written.
    let bytes = std::fs::read(w.join("c.bin")).expect("tokens");
    std::fs::write(w.join("c.bin"), &bytes[..bytes.len() - 2]).expect("truncate");
    let out = trainer(w, &["run", &path, "--set", "run.out_dir=runs/v"]);
    out.assert_one_error(&["c.bin", "but its summary says"]);
}

#[test]
fn bad_input_is_one_line_and_leaves_no_output() {
    let work = workdir();
    let w = work.path();
    write_corpus(w);
    let no_output = |w: &Path| {
        let left: Vec<String> = std::fs::read_dir(w)
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("o.") || n.starts_with(".o."))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    };
    // A malformed record far into the file: refused with its line, nothing written.
    let mut text = std::fs::read_to_string(w.join("records.jsonl")).expect("jsonl");
    text.push_str("{\"body\": \"fine\"}\n{\"body\": 7}\n");
    std::fs::write(w.join("bad.jsonl"), &text).expect("write");
    let out = tokenize(
        w,
        &[
            "bad.jsonl",
            "--tokenizer",
            "bytes",
            "--field",
            "body",
            "--out",
            "o.bin",
        ],
    );
    out.assert_one_error(&["bad.jsonl:42: field \"body\" is a number, not a string"]);
    no_output(w);
    // --skip-bad-records counts and skips it.
    let out = tokenize(
        w,
        &[
            "bad.jsonl",
            "--tokenizer",
            "bytes",
            "--field",
            "body",
            "--out",
            "o.bin",
            "--skip-bad-records",
        ],
    );
    out.assert_success();
    assert!(
        out.stdout.contains("skipped: 1 malformed records"),
        "{}",
        out.describe()
    );
    // Existing outputs need --force; an input is never an output.
    let out = tokenize(
        w,
        &[
            "records.jsonl",
            "--tokenizer",
            "bytes",
            "--field",
            "body",
            "--out",
            "o.bin",
        ],
    );
    out.assert_one_error(&["o.bin: exists; give --force to replace it"]);
    tokenize(
        w,
        &[
            "records.jsonl",
            "--tokenizer",
            "bytes",
            "--field",
            "body",
            "--out",
            "o.bin",
            "--force",
        ],
    )
    .assert_success();
    std::fs::write(w.join("in.bin"), "text").expect("write");
    let out = tokenize(
        w,
        &[
            "in.bin",
            "--tokenizer",
            "bytes",
            "--out",
            "in.bin",
            "--force",
        ],
    );
    out.assert_one_error(&["in.bin: is also an input"]);
    assert_eq!(
        std::fs::read_to_string(w.join("in.bin")).expect("kept"),
        "text"
    );
    // A leftover temporary of a killed run (a PID that no longer lives) is removed.
    std::fs::write(w.join(".o.bin.tmp-4000000"), "half").expect("write");
    tokenize(
        w,
        &[
            "records.jsonl",
            "--tokenizer",
            "bytes",
            "--field",
            "body",
            "--out",
            "o.bin",
            "--force",
        ],
    )
    .assert_success();
    assert!(!w.join(".o.bin.tmp-4000000").exists());
    // Each of these is one line.
    std::fs::write(w.join("broken.json"), "{ not json").expect("write");
    std::fs::write(w.join("fake.parquet"), "PAR1 but not really").expect("write");
    reference(w, &["to_parquet", "records.jsonl", "records.parquet"]);
    for (args, needle) in [
        (
            vec!["corpus", "--tokenizer", "broken.json", "--out", "p.bin"],
            "cannot read tokenizer",
        ),
        (
            vec!["corpus", "--tokenizer", "bytes", "--out", "p.tokens"],
            "must end in .bin",
        ),
        (
            vec![
                "corpus",
                "--tokenizer",
                "bytes",
                "--out",
                "p.bin",
                "--eos",
                "</s>",
            ],
            "bytes have no room for an EOS",
        ),
        (
            vec!["nowhere", "--tokenizer", "bytes", "--out", "p.bin"],
            "nowhere: cannot read",
        ),
        (
            vec![
                "corpus",
                "--tokenizer",
                "bytes",
                "--out",
                "no/such/dir/p.bin",
            ],
            "no such directory",
        ),
    ] {
        tokenize(w, &args).assert_one_error(&[needle]);
    }
}
