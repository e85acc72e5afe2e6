//! Hugging Face checkpoints in and out through the real binary, against transformers itself
//! (reference: tests/reference/hf_eval.py):
//! - a model created and saved by transformers, evaluated by `trainer eval --init hf:DIR`, gives
//!   transformers' own loss on the same windows;
//! - `trainer export --to hf` of it loads in `AutoModelForCausalLM.from_pretrained` and gives the
//!   same loss again (the round trip);
//! - a recipe with `[init] from = "hf:DIR"` and no `[model]` trains from those weights.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn reference_script() -> String {
    repo_root()
        .join("crates/trainer-cli/tests/reference/hf_eval.py")
        .display()
        .to_string()
}

fn py(args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(reference_script())
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/test, which installs Python and transformers",
                python()
            )
        });
    assert!(
        out.status.success(),
        "hf_eval.py {args:?} failed (run scripts/test to install transformers):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn loss_of(json_text: &str) -> f64 {
    let line = json_text.lines().last().expect("a JSON line");
    let v: Value = serde_json::from_str(line).expect("JSON");
    v["loss"].as_f64().expect("loss")
}

/// `trainer eval --init INIT` of `data` in windows of 32 (batches of 4, CPU): the mean loss.
fn trainer_eval(cwd: &Path, init: &str, data: &str) -> f64 {
    let out = trainer(
        cwd,
        &[
            "eval",
            "--init",
            init,
            "--data",
            data,
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--json",
        ],
    );
    out.assert_success();
    loss_of(&out.stdout)
}

fn write_data(dir: &Path) -> String {
    let text = std::fs::read_to_string(repo_root().join("crates/trainer/data/wonderland.txt"))
        .expect("corpus");
    std::fs::write(dir.join("data.txt"), &text.as_bytes()[..3000]).expect("data");
    "data.txt".to_string()
}

fn check_case(case: &str) {
    let dir = workdir();
    let cwd = dir.path();
    let hf = cwd.join("hf");
    let data = write_data(cwd);
    let data_path = cwd.join(&data);
    let data_path = data_path.to_str().expect("utf-8");
    let hf_arg = hf.to_str().expect("utf-8");
    let reference = loss_of(&py(&["create_eval", case, hf_arg, data_path, "32", "4"]));

    let init = format!("hf:{}", hf.display());
    let ours = trainer_eval(cwd, &init, &data);
    assert!(
        (ours - reference).abs() / reference < 1e-5,
        "{case}: trainer {ours} vs transformers {reference}"
    );

    // Round trip: export what we loaded, and let transformers load it: the same loss, and the
    // same logits as the original checkpoint.
    trainer(cwd, &["export", &init, "--to", "hf", "exported"]).assert_success();
    let exported = cwd.join("exported");
    let compared: Value = serde_json::from_str(
        py(&[
            "compare",
            hf_arg,
            exported.to_str().expect("utf-8"),
            data_path,
            "32",
            "4",
        ])
        .trim(),
    )
    .expect("json");
    let again = compared["loss"].as_f64().expect("loss");
    assert!(
        (again - reference).abs() / reference < 1e-5,
        "{case}: exported {again} vs original {reference}"
    );
    let diff = compared["max_rel_diff"].as_f64().expect("number");
    assert!(diff < 1e-6, "{case}: round-trip logits differ by {diff}");

    fine_tune_and_export(case, cwd, &init, &data);

    // Exporting into a non-empty directory is refused and leaves it alone.
    let before = std::fs::read(cwd.join("exported/config.json")).expect("config");
    let refused = trainer(cwd, &["export", &init, "--to", "hf", "exported"]);
    assert_eq!(refused.code, Some(1), "{}", refused.describe());
    assert!(
        refused.stderr.contains("not empty"),
        "{}",
        refused.describe()
    );
    assert_eq!(
        std::fs::read(cwd.join("exported/config.json")).expect("config"),
        before
    );
}

/// Two training steps from the checkpoint (`[init] from`, no `[model]`), exported: transformers
/// loads the export and gives the loss `trainer eval` gives of the run.
fn fine_tune_and_export(case: &str, cwd: &Path, init: &str, data: &str) {
    let name = write_recipe(cwd, "ft.toml", &tiny_recipe_from(init, "runs/ft"));
    let out = trainer(
        cwd,
        &[
            "run",
            &name,
            "--set",
            "train.max_steps=2",
            "--set",
            "schedule.warmup_steps=0",
        ],
    );
    out.assert_success();
    let (start_loss, tuned) = (
        trainer_eval(cwd, init, data),
        trainer_eval(cwd, "runs/ft", data),
    );
    assert!(
        (start_loss - tuned).abs() > 1e-6,
        "{case}: two steps changed nothing ({tuned})"
    );
    trainer(cwd, &["export", "runs/ft", "--to", "hf", "ft-export"]).assert_success();
    let theirs = loss_of(&py(&[
        "eval",
        cwd.join("ft-export").to_str().expect("utf-8"),
        cwd.join(data).to_str().expect("utf-8"),
        "32",
        "4",
    ]));
    assert!(
        (theirs - tuned).abs() / tuned < 1e-5,
        "{case}: fine-tuned export in transformers {theirs} vs trainer {tuned}"
    );
}

/// One test per family and variant of tests/reference/hf_eval.py's CASES.
macro_rules! hf_cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_case(stringify!($name));
            }
        )*

        #[test]
        fn every_reference_case_has_a_test() {
            let listed: Vec<String> = py(&["cases"]).lines().map(str::to_string).collect();
            let tested = [$(stringify!($name)),*];
            assert_eq!(listed, tested, "hf_eval.py's CASES and this file's hf_cases! differ");
        }
    };
}

mod from_transformers_and_back {
    use super::check_case;
    use super::py;
    hf_cases!(
        llama,
        llama_bias,
        llama3_rope,
        llama_linear_rope,
        llama_dynamic_rope,
        llama_yarn_rope,
        mistral,
        qwen2,
        qwen2_tied_window,
        qwen3,
        qwen3_bias,
        gemma,
        gemma_untied_bias,
        gemma2,
        gemma2_untied_bias,
        gemma3,
        phi3,
        phi3_tied,
        olmo2,
        olmo2_bias_tied,
        granite,
        mixtral,
        gpt_neox,
        gpt_neox_sequential_tied,
        gpt2,
        gpt2_unscaled,
        gpt2_layer_scaled,
        gpt2_untied,
    );
}

#[test]
fn recipe_initialised_from_hf_takes_its_architecture_and_weights() {
    let dir = workdir();
    let cwd = dir.path();
    let hf = cwd.join("hf");
    py(&["create", "llama", hf.to_str().expect("utf-8")]);
    // No [model]: the architecture comes from config.json.
    let recipe = tiny_recipe_from(&format!("hf:{}", hf.display()), "runs/from-hf");
    let name = write_recipe(cwd, "from_hf.toml", &recipe);
    let validated = trainer(cwd, &["validate", &name]);
    validated.assert_success();
    assert!(
        validated.stdout.contains("d_model = 48"),
        "{}",
        validated.describe()
    );
    assert!(
        validated.stdout.contains("n_kv_heads = 2"),
        "{}",
        validated.describe()
    );
    let rows = run_tiny(
        cwd,
        &name,
        "runs/from-hf",
        &[
            "--set",
            "train.max_steps=3",
            "--set",
            "train.eval_every=1",
            "--set",
            "schedule.warmup_steps=0",
        ],
    );
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(cwd.join("runs/from-hf/summary.json")).expect("summary"),
    )
    .expect("json");
    assert!(
        summary["init_from"]
            .as_str()
            .expect("init_from")
            .starts_with("hf:"),
        "{summary}"
    );
    assert!(!rows.is_empty());

    // A [model] that contradicts the checkpoint is refused, naming the key.
    let bad = recipe.replace("[data]", "[model]\nkind = \"llama\"\nvocab_size = 256\nd_model = 32\nn_layers = 2\nn_heads = 4\nd_ff = 64\nmax_seq_len = 16\n\n[data]");
    let bad_name = write_recipe(cwd, "bad.toml", &bad);
    let out = trainer(cwd, &["validate", &bad_name]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr
            .contains("model: differs from the architecture of init.from"),
        "{}",
        out.describe()
    );
}

#[test]
fn eval_and_generate_refuse_bad_input_in_one_line() {
    let dir = workdir();
    let cwd = dir.path();
    for args in [
        vec![
            "eval",
            "--init",
            "hf:nowhere",
            "--data",
            "x.txt",
            "--seq-len",
            "8",
        ],
        vec![
            "eval",
            "--init",
            "nowhere",
            "--data",
            "x.txt",
            "--seq-len",
            "8",
        ],
        vec!["generate", "--init", "hf:nowhere", "--prompt", "a"],
        vec!["export", "nowhere", "--to", "hf", "out"],
    ] {
        let out = trainer(cwd, &args);
        assert_eq!(out.code, Some(1), "{}", out.describe());
        let errors: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{}", out.describe());
        assert!(errors[0].contains("nowhere"), "{}", out.describe());
        assert!(!out.stderr.contains("panicked"), "{}", out.describe());
    }
}

#[test]
fn generate_is_reproducible_for_a_seed() {
    let dir = workdir();
    let cwd = dir.path();
    let name = write_recipe(cwd, "tiny.toml", &tiny_recipe("runs/g"));
    run_tiny(cwd, &name, "runs/g", &["--set", "train.max_steps=5"]);
    let gen = |seed: &str| {
        let out = trainer(
            cwd,
            &[
                "generate",
                "--init",
                "runs/g",
                "--prompt",
                "Alice",
                "--max-new-tokens",
                "20",
                "--seed",
                seed,
                "--device",
                "cpu",
            ],
        );
        out.assert_success();
        out.stdout
    };
    let a = gen("1");
    assert_eq!(a, gen("1"));
    assert!(a.starts_with("Alice"), "{a}");
    let greedy = trainer(
        cwd,
        &[
            "generate",
            "--init",
            "runs/g",
            "--prompt",
            "Alice",
            "--max-new-tokens",
            "10",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ],
    );
    greedy.assert_success();
}

#[test]
fn tokenizer_json_drives_generate_and_eval_as_in_transformers() {
    let dir = workdir();
    let cwd = dir.path();
    let data = write_data(cwd);
    let hf = cwd.join("hf");
    let out = Command::new(python())
        .arg(reference_script())
        .args(["create", "llama_tok", hf.to_str().expect("utf-8")])
        .env("DATA_FOR_BPE", cwd.join(&data))
        .output()
        .expect("python (run scripts/test)");
    assert!(
        out.status.success(),
        "creating the model: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init = format!("hf:{}", hf.display());

    // Greedy decoding: the same token ids as transformers, from the same tokenized prompt.
    let reference: Value = serde_json::from_str(
        py(&["greedy", hf.to_str().expect("utf-8"), "Alice was", "12"]).trim(),
    )
    .expect("json");
    let ours = trainer(
        cwd,
        &[
            "generate",
            "--init",
            &init,
            "--prompt",
            "Alice was",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--device",
            "cpu",
            "--json",
        ],
    );
    ours.assert_success();
    let ours: Value = serde_json::from_str(ours.stdout.trim()).expect("json");
    assert_eq!(
        ours["prompt_ids"], reference["prompt_ids"],
        "prompt tokenized differently"
    );
    assert_eq!(ours["ids"], reference["ids"], "greedy continuation differs");
    assert_eq!(ours["tokenizer"], "tokenizer.json");

    // Evaluation of a text file through the tokenizer.
    let reference = loss_of(&py(&[
        "eval",
        hf.to_str().expect("utf-8"),
        cwd.join(&data).to_str().expect("utf-8"),
        "16",
        "4",
        "--tokenizer",
    ]));
    let ours = trainer(
        cwd,
        &[
            "eval",
            "--init",
            &init,
            "--data",
            &data,
            "--seq-len",
            "16",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--json",
        ],
    );
    ours.assert_success();
    let ours = loss_of(&ours.stdout);
    assert!(
        (ours - reference).abs() / reference < 1e-5,
        "trainer {ours} vs transformers {reference}"
    );
}

/// Every config.json field of every family, set one at a time to a value other than its
/// default (tests/reference/hf_eval.py `field_sweep`): `trainer eval` gives transformers' loss,
/// or refuses the checkpoint in one line that names the field. Nothing is silently dropped.
#[test]
fn every_config_field_is_honoured_or_refused_by_name() {
    let dir = workdir();
    let cwd = dir.path();
    let text = std::fs::read_to_string(repo_root().join("crates/trainer/data/wonderland.txt"))
        .expect("corpus");
    std::fs::write(cwd.join("data.txt"), &text.as_bytes()[..1000]).expect("data");
    let sweep = cwd.join("sweep");
    let data = cwd.join("data.txt");
    py(&[
        "field_sweep",
        sweep.to_str().expect("utf-8"),
        data.to_str().expect("utf-8"),
        "32",
        "4",
    ]);
    let manifest: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(sweep.join("manifest.json")).expect("manifest"),
    )
    .expect("json");
    assert!(manifest.len() > 100, "only {} configs", manifest.len());
    let check = |entry: &Value| -> Result<bool, String> {
        let field = entry["field"].as_str().expect("field");
        let what = format!("{}.{field} = {}", entry["family"], entry["value"]);
        let init = format!("hf:{}", entry["dir"].as_str().expect("dir"));
        let out = trainer(
            cwd,
            &[
                "eval",
                "--init",
                &init,
                "--data",
                "data.txt",
                "--seq-len",
                "32",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--json",
            ],
        );
        match out.code {
            Some(0) => {
                let ours = loss_of(&out.stdout);
                let reference = entry["loss"].as_f64().expect("loss");
                if (ours - reference).abs() / reference < 1e-5 {
                    Ok(true)
                } else {
                    Err(format!("{what}: loss {ours}, transformers {reference}"))
                }
            }
            Some(1) => {
                let errors: Vec<&str> = out
                    .stderr
                    .lines()
                    .filter(|l| l.starts_with("error:"))
                    .collect();
                // The message after the file's path must name the field.
                let named = errors.len() == 1
                    && errors[0]
                        .rsplit("config.json")
                        .next()
                        .is_some_and(|msg| msg.contains(field));
                if named {
                    Ok(false)
                } else {
                    Err(format!("{what}: refused without naming it: {}", out.stderr))
                }
            }
            _ => Err(format!("{what}: {}", out.describe())),
        }
    };
    // Two workers: each eval is a process of about half a second.
    let (left, right) = manifest.split_at(manifest.len() / 2);
    let results: Vec<Result<bool, String>> = std::thread::scope(|s| {
        let a = s.spawn(|| left.iter().map(check).collect::<Vec<_>>());
        let b = s.spawn(|| right.iter().map(check).collect::<Vec<_>>());
        let mut all = a.join().expect("worker");
        all.extend(b.join().expect("worker"));
        all
    });
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "{failures:#?}");
    let honoured = results.iter().filter(|r| matches!(r, Ok(true))).count();
    eprintln!(
        "{honoured} honoured, {} refused by name",
        results.len() - honoured
    );
    assert!(
        honoured > results.len() / 2,
        "most fields should be honoured"
    );
}

/// A run started from a Hugging Face model keeps its tokenizer files: `trainer generate --init
/// RUN` tokenizes with them, and `trainer export` writes them beside the weights, where
/// transformers' AutoTokenizer finds the same tokenizer.
#[test]
fn the_tokenizer_travels_with_the_model() {
    let dir = workdir();
    let cwd = dir.path();
    let data = write_data(cwd);
    let hf = cwd.join("hf");
    let out = Command::new(python())
        .arg(reference_script())
        .args(["create", "llama_tok", hf.to_str().expect("utf-8")])
        .env("DATA_FOR_BPE", cwd.join(&data))
        .output()
        .expect("python (run scripts/test)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init = format!("hf:{}", hf.display());
    let bytes = tiny_recipe_from(&init, "runs/tok");
    let steps = [
        "--set",
        "train.max_steps=1",
        "--set",
        "schedule.warmup_steps=0",
    ];
    // Byte-level data for a model with a tokenizer of its own is refused, naming both.
    let name = write_recipe(cwd, "bytes.toml", &bytes);
    let refused = trainer(cwd, &[&["run", name.as_str()][..], &steps[..]].concat());
    refused.assert_one_error(&["data.train", "byte-level", "tokenizer.json"]);
    assert!(
        !cwd.join("runs/tok").exists(),
        "a refused recipe writes nothing"
    );
    // The corpus as the tokenizer's ids trains.
    py(&[
        "encode",
        hf.to_str().expect("utf-8"),
        cwd.join(&data).to_str().expect("utf-8"),
        cwd.join("tokens.bin").to_str().expect("utf-8"),
    ]);
    let tokens = replace_line(
        &bytes,
        "train = { kind = \"builtin\" }",
        "train = { kind = \"tokens\", path = \"tokens.bin\" }",
    );
    let name = write_recipe(cwd, "tok.toml", &tokens);
    trainer(cwd, &[&["run", name.as_str()][..], &steps[..]].concat()).assert_success();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(cwd.join("runs/tok").join(f)).expect("kept in the run"),
            std::fs::read(hf.join(f)).expect("original"),
            "{f}"
        );
    }
    let gen = trainer(
        cwd,
        &[
            "generate",
            "--init",
            "runs/tok",
            "--prompt",
            "Alice was",
            "--max-new-tokens",
            "3",
            "--temperature",
            "0",
            "--device",
            "cpu",
            "--json",
        ],
    );
    gen.assert_success();
    let gen: Value = serde_json::from_str(gen.stdout.trim()).expect("json");
    assert_eq!(gen["tokenizer"], "tokenizer.json", "{gen}");
    let reference: Value =
        serde_json::from_str(py(&["greedy", hf.to_str().expect("utf-8"), "Alice was", "1"]).trim())
            .expect("json");
    assert_eq!(gen["prompt_ids"], reference["prompt_ids"]);

    trainer(cwd, &["export", "runs/tok", "--to", "hf", "exported"]).assert_success();
    let same: Value = serde_json::from_str(
        py(&[
            "same_tokenizer",
            hf.to_str().expect("utf-8"),
            cwd.join("exported").to_str().expect("utf-8"),
            "Alice was beginning to get very tired",
        ])
        .trim(),
    )
    .expect("json");
    assert_eq!(same["same"], true, "{same}");
}

/// `hf:ORG/NAME` resolves in the local Hugging Face hub cache as transformers does offline
/// (`$HF_HUB_CACHE/models--ORG--NAME/snapshots/<refs/main>`); a repository not there is one line
/// saying where it looked.
#[test]
fn hub_cache_ids_resolve_offline() {
    let dir = workdir();
    let cwd = dir.path();
    let data = write_data(cwd);
    let cache = cwd.join("hub");
    let repo = cache.join("models--tiny-org--tiny-llama");
    let snapshot = repo.join("snapshots/0123abcd");
    py(&["create", "llama", snapshot.to_str().expect("utf-8")]);
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs/main"), "0123abcd").expect("ref");
    let eval = |id: &str| {
        let out = Command::new(trainer_bin())
            .current_dir(cwd)
            .env("HF_HUB_CACHE", &cache)
            .args([
                "eval",
                "--init",
                id,
                "--data",
                &data,
                "--seq-len",
                "32",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--json",
            ])
            .output()
            .expect("trainer");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, stdout, stderr) = eval("hf:tiny-org/tiny-llama");
    assert_eq!(code, Some(0), "{stderr}");
    let direct = trainer_eval(cwd, &format!("hf:{}", snapshot.display()), &data);
    assert_eq!(loss_of(&stdout), direct);

    let (code, _, stderr) = eval("hf:tiny-org/missing");
    assert_eq!(code, Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("models--tiny-org--missing")
            && errors[0].contains("nothing is downloaded"),
        "{stderr}"
    );
}

/// The Llama-3.2- and Qwen2.5-shaped checkpoints of configs/from_hf/make_checkpoints.py, made
/// by transformers into `cwd/runs/hf`.
fn make_shaped_checkpoints(cwd: &Path) {
    let made = Command::new(python())
        .arg(repo_root().join("configs/from_hf/make_checkpoints.py"))
        .arg(cwd.join("runs/hf"))
        .output()
        .expect("python (run scripts/test)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// `trainer export RUN --to hf` loads in transformers with the trainer's own loss on `data`
/// (within 1e-5).
fn exports_what_transformers_loads(cwd: &Path, run: &str, data: &str) {
    let export = format!("{run}-hf");
    trainer(cwd, &["export", run, "--to", "hf", &export]).assert_success();
    let ours = trainer_eval(cwd, run, data);
    let theirs = loss_of(&py(&[
        "eval",
        cwd.join(&export).to_str().expect("utf-8"),
        cwd.join(data).to_str().expect("utf-8"),
        "32",
        "4",
    ]));
    assert!(
        (ours - theirs).abs() / theirs < 1e-5,
        "{run}: trainer {ours} vs transformers {theirs}"
    );
}

/// configs/from_hf/: continual pretraining from a Llama-3.2-shaped and a Qwen2.5-shaped
/// checkpoint (made locally by its make_checkpoints.py) runs end to end, and the result exports
/// to what transformers loads with the trainer's loss.
#[test]
fn continual_pretraining_from_llama32_and_qwen25_shapes() {
    let dir = workdir();
    let cwd = dir.path();
    let data = write_data(cwd);
    make_shaped_checkpoints(cwd);
    for (shape, family) in [
        ("llama3.2", "type = \"llama3\""),
        ("qwen2.5", "family = \"qwen2\""),
    ] {
        let recipe = repo_root().join(format!("configs/from_hf/{shape}.toml"));
        let recipe = recipe.to_str().expect("utf-8");
        let validated = trainer(cwd, &["validate", recipe]);
        validated.assert_success();
        assert!(
            validated.stdout.contains(family),
            "{}",
            validated.describe()
        );
        trainer(
            cwd,
            &[
                "run",
                recipe,
                "--set",
                "train.max_steps=3",
                "--set",
                "schedule.warmup_steps=1",
                "--set",
                "train.eval_every=3",
                "--set",
                "run.threads=1",
            ],
        )
        .assert_success();
        exports_what_transformers_loads(cwd, &format!("runs/from-{shape}"), &data);
    }
}

/// `run.shard = "full"` from a Hugging Face checkpoint (`[init] from = "hf:DIR"`, each rank
/// copying in only the weights it holds from the mapped file): a Llama-3.2 shape (tied
/// embeddings) and a Qwen2.5 shape (attention biases) on 2 processes log the unsharded curve
/// within 1e-5, and the checkpoint the ranks wrote together exports to what transformers loads
/// with the trainer's loss.
#[test]
fn full_sharding_from_hf_checkpoints_exports_what_transformers_loads() {
    let dir = workdir();
    let cwd = dir.path();
    let data = write_data(cwd);
    make_shaped_checkpoints(cwd);
    for shape in ["llama3.2", "qwen2.5"] {
        let recipe = repo_root().join(format!("configs/from_hf/{shape}.toml"));
        let recipe = recipe.to_str().expect("utf-8");
        let launch = |out: &str, shard: &str| {
            let out_dir = format!("run.out_dir=\"{out}\"");
            let shard = format!("run.shard=\"{shard}\"");
            let mut args = vec!["launch", "--nproc", "2", recipe];
            for s in [
                "train.max_steps=4",
                "train.batch_size=8",
                "train.eval_every=2",
                "train.checkpoint_every=4",
                "schedule.warmup_steps=1",
                "train.recompute=\"block\"",
                "run.threads=1",
                &out_dir,
                &shard,
            ] {
                args.extend(["--set", s]);
            }
            trainer(cwd, &args).assert_success();
            curve(&read_metrics(&cwd.join(out).join("metrics.jsonl")))
        };
        let (whole, full) = (
            launch(&format!("runs/{shape}-whole"), "none"),
            launch(&format!("runs/{shape}-full"), "full"),
        );
        assert_eq!(whole.len(), full.len(), "{shape}");
        for (a, b) in full.iter().zip(&whole) {
            assert_eq!((&a.0, a.1), (&b.0, b.1), "{shape}");
            assert!((a.2 - b.2).abs() / b.2 < 1e-5, "{shape}: {a:?} vs {b:?}");
        }
        exports_what_transformers_loads(cwd, &format!("runs/{shape}-full"), &data);
    }
}

/// A checkpoint directory that is not what it claims is one `error:` line naming the file and
/// what is wrong, exit 1, nothing allocated for sizes the weights do not back: a config.json that
/// is not JSON, an unknown model_type, an unsupported value, sizes that disagree with the
/// weights (a little, or by 10^12), a tensor missing or not floating point, a shard index naming
/// a missing file.
#[test]
fn bad_checkpoints_are_one_line_errors_naming_file_and_field() {
    let dir = workdir();
    let cwd = dir.path();
    let data = write_data(cwd);
    let good = cwd.join("good");
    // Llama with tied embeddings: the file holds no lm_head.weight.
    py(&["create", "llama", good.to_str().expect("utf-8")]);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(good.join("config.json")).expect("config"))
            .expect("json");
    let with_config = |edit: &dyn Fn(&mut Value)| -> String {
        let mut c = config.clone();
        edit(&mut c);
        serde_json::to_string(&c).expect("json")
    };
    type Edit<'a> = Box<dyn Fn(&Path) + 'a>;
    let write_config = |text: String| -> Edit {
        Box::new(move |d: &Path| std::fs::write(d.join("config.json"), &text).expect("write"))
    };
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "not_json",
            write_config("{ not json".into()),
            &["config.json", "malformed JSON"],
        ),
        (
            "unknown_type",
            write_config(with_config(&|c| c["model_type"] = "mamba".into())),
            &["config.json", "mamba"],
        ),
        (
            "bad_value",
            write_config(with_config(&|c| c["hidden_act"] = "relu".into())),
            &["config.json", "hidden_act"],
        ),
        (
            "narrower_mlp",
            write_config(with_config(&|c| c["intermediate_size"] = 64.into())),
            &["good-narrower_mlp", "mlp", "shape"],
        ),
        (
            "wider_mlp",
            write_config(with_config(&|c| c["intermediate_size"] = 128.into())),
            &["config.json", "parameters", "intermediate_size"],
        ),
        (
            "huge_vocab",
            write_config(with_config(&|c| {
                c["vocab_size"] = 1_000_000_000_000i64.into()
            })),
            &["config.json", "parameters", "vocab_size"],
        ),
        (
            "huge_depth",
            write_config(with_config(&|c| c["num_hidden_layers"] = 1_000_000.into())),
            &["config.json", "parameters"],
        ),
        (
            "huge_context",
            write_config(with_config(&|c| {
                c["max_position_embeddings"] = 1_000_000_000_000i64.into()
            })),
            &["config.json", "max_position_embeddings"],
        ),
        (
            "untied_without_head",
            write_config(with_config(&|c| c["tie_word_embeddings"] = false.into())),
            &["config.json", "tie_word_embeddings"],
        ),
        (
            "missing_shard",
            Box::new(|d: &Path| {
                std::fs::remove_file(d.join("model.safetensors")).expect("remove");
                std::fs::write(
                    d.join("model.safetensors.index.json"),
                    r#"{"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}"#,
                )
                .expect("index");
            }),
            &["model-00002-of-00002.safetensors"],
        ),
    ];
    for (name, edit, expected) in cases {
        let case_dir = cwd.join(format!("good-{name}"));
        copy_dir(&good, &case_dir);
        edit(&case_dir);
        let init = format!("hf:{}", case_dir.display());
        let out = trainer(
            cwd,
            &[
                "eval",
                "--init",
                &init,
                "--data",
                &data,
                "--seq-len",
                "8",
                "--device",
                "cpu",
            ],
        );
        assert_eq!(out.code, Some(1), "{name}: {}", out.describe());
        let errors: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{name}: {}", out.describe());
        for want in expected {
            assert!(
                errors[0].contains(want),
                "{name}: {want:?} not in {}",
                errors[0]
            );
        }
    }
    // Weights stored as integers are refused by name before they are read.
    let ints = cwd.join("good-int-weights");
    py(&["create", "llama_int_weights", ints.to_str().expect("utf-8")]);
    let out = trainer(
        cwd,
        &[
            "eval",
            "--init",
            &format!("hf:{}", ints.display()),
            "--data",
            &data,
            "--seq-len",
            "8",
        ],
    );
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("model.embed_tokens.weight") && out.stderr.contains("floating point"),
        "{}",
        out.describe()
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// Fuzz-style: every size field of a config.json set to zero, negative, 10^12, a fraction, a
/// string, null and a boolean, and the safetensors header broken in dtype, shape, offsets and
/// length. Each load either works (a value transformers would also take) or is one `error:`
/// line with exit code 1: never a panic, never an allocation the weights do not back.
#[test]
fn broken_configs_and_safetensors_headers_are_one_line_never_a_panic() {
    use serde_json::json;
    let dir = workdir();
    let cwd = dir.path();
    let data = write_data(cwd);
    let good = cwd.join("good");
    py(&["create", "llama", good.to_str().expect("utf-8")]);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(good.join("config.json")).expect("config"))
            .expect("json");
    let weights = std::fs::read(good.join("model.safetensors")).expect("weights");
    let header_len = u64::from_le_bytes(weights[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&weights[8..8 + header_len]).expect("header");
    let body = &weights[8 + header_len..];

    let mut cases: Vec<(String, Value, Vec<u8>)> = Vec::new();
    let fields = [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "head_dim",
        "rms_norm_eps",
        "tie_word_embeddings",
    ];
    let values = [
        json!(0),
        json!(-1),
        json!(1_000_000_000_000i64),
        json!(3),
        json!(2.5),
        json!("x"),
        Value::Null,
        json!(true),
    ];
    for f in fields {
        for v in &values {
            let mut c = config.clone();
            c[f] = v.clone();
            cases.push((format!("{f} = {v}"), c, weights.clone()));
        }
    }
    // Safetensors files with a broken header over the same data.
    let with_header = |h: &Value| -> Vec<u8> {
        let mut text = serde_json::to_vec(h).expect("json");
        while text.len() % 8 != 0 {
            text.push(b' ');
        }
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        out.extend_from_slice(body);
        out
    };
    let embed = "model.embed_tokens.weight";
    let mut edit = |what: &str, f: &dyn Fn(&mut Value)| {
        let mut h = header.clone();
        f(&mut h);
        cases.push((what.to_string(), config.clone(), with_header(&h)));
    };
    edit("dtype I8", &|h| h[embed]["dtype"] = json!("I8"));
    edit("dtype unknown", &|h| h[embed]["dtype"] = json!("Q4"));
    edit("shape doubled", &|h| {
        let rows = h[embed]["shape"][0].as_i64().expect("rows");
        h[embed]["shape"][0] = json!(rows * 2)
    });
    edit("shape negative", &|h| h[embed]["shape"][0] = json!(-4));
    edit("offsets past the end", &|h| {
        h[embed]["data_offsets"][1] = json!(1u64 << 40)
    });
    edit("offsets reversed", &|h| {
        let o = h[embed]["data_offsets"].clone();
        h[embed]["data_offsets"] = json!([o[1], o[0]])
    });
    let mut huge_len = weights.clone();
    huge_len[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("header length 2^40".into(), config.clone(), huge_len));
    let mut not_json = weights.clone();
    not_json[8] = b'#';
    cases.push(("header not JSON".into(), config.clone(), not_json));
    cases.push(("empty file".into(), config.clone(), Vec::new()));

    let check = |(i, (what, c, w)): (usize, &(String, Value, Vec<u8>))| -> Option<String> {
        let d = cwd.join(format!("case-{i}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("config.json"), serde_json::to_vec(c).expect("json")).expect("w");
        std::fs::write(d.join("model.safetensors"), w).expect("w");
        let init = format!("hf:{}", d.display());
        let out = trainer(
            cwd,
            &[
                "eval",
                "--init",
                &init,
                "--data",
                &data,
                "--seq-len",
                "8",
                "--batches",
                "1",
            ],
        );
        let errors = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count();
        let fine = match out.code {
            Some(0) => true,
            Some(1) => errors == 1,
            _ => false,
        };
        (!fine || out.stderr.contains("panicked")).then(|| format!("{what}: {}", out.describe()))
    };
    let indexed: Vec<(usize, &(String, Value, Vec<u8>))> = cases.iter().enumerate().collect();
    let (left, right) = indexed.split_at(indexed.len() / 2);
    let failures: Vec<String> = std::thread::scope(|s| {
        let a = s.spawn(|| left.iter().copied().filter_map(check).collect::<Vec<_>>());
        let b = s.spawn(|| right.iter().copied().filter_map(check).collect::<Vec<_>>());
        let mut all = a.join().expect("worker");
        all.extend(b.join().expect("worker"));
        all
    });
    assert!(failures.is_empty(), "{failures:#?}");
}
