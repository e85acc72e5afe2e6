//! Recipe parsing, overrides and validation messages.

use super::*;

const BASE: &str = r#"[run]
name = "t"
out_dir = "runs/t"

[model]
kind = "llama"
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 4
d_ff = 64
max_seq_len = 32

[data]
seq_len = 16
train = { kind = "builtin" }

[optim]
kind = "adamw"
lr = 1e-3

[train]
batch_size = 4
max_steps = 10
"#;

fn err(text: &str, overrides: &[&str]) -> String {
    let ovs: Vec<Override> = overrides
        .iter()
        .map(|o| Override::parse(o).expect("override"))
        .collect();
    match parse(text, "r.toml", &ovs) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn base_recipe_parses_with_defaults() {
    let r = parse(BASE, "r.toml", &[]).expect("valid");
    assert_eq!(r.run.device, "auto");
    assert_eq!(r.run.precision, Precision::Fp32);
    assert_eq!(r.train.grad_accum, 1);
    assert_eq!(r.max_steps(), 10);
    assert_eq!(r.tokens_per_step(), 64);
    assert!(matches!(r.optim, OptimConfig::Adamw { weight_decay, .. } if weight_decay == 0.1));
    assert_eq!(r.schedule, ScheduleConfig::default());
}

#[test]
fn resolved_recipe_round_trips() {
    let r = parse(BASE, "r.toml", &[]).expect("valid");
    let again = parse(&to_toml(&r), "resolved.toml", &[]).expect("resolved recipe parses");
    assert_eq!(r, again);
}

#[test]
fn malformed_toml_names_line_and_column() {
    let text = BASE.replace("max_steps = 10", "max_steps = = 10");
    let e = err(&text, &[]);
    assert!(e.starts_with("r.toml:24:13:"), "{e}");
    assert!(e.contains("malformed TOML"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
}

#[test]
fn unknown_key_names_file_line_column_and_key_path() {
    let text = BASE.replace("max_steps = 10", "max_steps = 10\nbogus = 3");
    let e = err(&text, &[]);
    assert!(
        e.starts_with(
            "r.toml:25:1: train.bogus: unknown field `bogus`, expected one of `batch_size`"
        ),
        "{e}"
    );
}

#[test]
fn unknown_key_in_tagged_section() {
    let text = BASE.replace("lr = 1e-3", "lr = 1e-3\nmomentom = 0.9");
    let e = err(&text, &[]);
    assert!(e.contains("optim.momentom"), "{e}");
    assert!(e.contains("unknown field"), "{e}");
    assert!(e.starts_with("r.toml:"), "{e}");
}

#[test]
fn wrong_type_names_key_and_expectation() {
    let text = BASE.replace("batch_size = 4", "batch_size = \"four\"");
    let e = err(&text, &[]);
    assert_eq!(
        e,
        "r.toml:23:1: train.batch_size: invalid type: string \"four\", expected i64"
    );
}

#[test]
fn unknown_kind_lists_the_choices() {
    let text = BASE.replace("kind = \"adamw\"", "kind = \"adamx\"");
    let e = err(&text, &[]);
    assert!(e.contains("optim"), "{e}");
    assert!(e.contains("adamw") && e.contains("sgd"), "{e}");
}

#[test]
fn out_of_range_values_name_location_and_key() {
    let e = err(&BASE.replace("lr = 1e-3", "lr = -1e-3"), &[]);
    assert_eq!(
        e,
        "r.toml:20:1: optim.lr: expected a positive number, got -0.001"
    );
    let e = err(&BASE.replace("batch_size = 4", "batch_size = 0"), &[]);
    assert_eq!(
        e,
        "r.toml:23:1: train.batch_size: expected a positive integer, got 0"
    );
    let e = err(&BASE.replace("seq_len = 16", "seq_len = 0"), &[]);
    assert!(e.starts_with("r.toml:15:1: data.seq_len:"), "{e}");
    let e = err(&BASE.replace("n_heads = 4", "n_heads = 3"), &[]);
    assert!(
        e.contains("model.d_model") && e.contains("divisible by n_heads (3)"),
        "{e}"
    );
    let e = err(&BASE.replace("seq_len = 16", "seq_len = 64"), &[]);
    assert!(e.contains("must not exceed model.max_seq_len (32)"), "{e}");
}

/// The decoder families' switches are checked by name: experts only where the family's MLP is
/// the experts' SwiGLU, soft-caps and the rotary share in range.
#[test]
fn family_switches_are_checked() {
    let gemma_moe = BASE.replace(
        "max_seq_len = 32",
        "max_seq_len = 32\nfamily = \"gemma2\"\nmoe = { n_experts = 4, top_k = 2 }",
    );
    let e = err(&gemma_moe, &[]);
    assert!(
        e.contains("model.moe") && e.contains("gemma2") && e.contains("SwiGLU"),
        "{e}"
    );
    let e = err(&BASE, &["model.attention_softcap=0"]);
    assert!(e.contains("model.attention_softcap"), "{e}");
    // d_model 32 / 4 heads = 8 wide: a share of 0.1 rotates no whole pair.
    let e = err(&BASE, &["model.partial_rotary_factor=0.1"]);
    assert!(
        e.contains("model.partial_rotary_factor") && e.contains("0 dimensions"),
        "{e}"
    );
}

#[test]
fn overrides_are_typed_and_validated() {
    let ovs = [
        Override::parse("train.max_steps=100").expect("parse"),
        Override::parse("run.device=cpu").expect("parse"),
        Override::parse("optim.betas=[0.8, 0.9]").expect("parse"),
    ];
    let r = parse(BASE, "r.toml", &ovs).expect("valid");
    assert_eq!(r.train.max_steps, Some(100));
    assert_eq!(r.run.device, "cpu");
    assert!(matches!(r.optim, OptimConfig::Adamw { betas, .. } if betas == [0.8, 0.9]));

    let e = err(BASE, &["train.max_steps=abc"]);
    assert!(
        e.starts_with("--set train.max_steps=abc: train.max_steps:"),
        "{e}"
    );
    let e = err(BASE, &["train.batch_size=-2"]);
    assert_eq!(
        e,
        "--set train.batch_size=-2: train.batch_size: expected a positive integer, got -2"
    );
    let e = err(BASE, &["train.nope=1"]);
    assert!(
        e.contains("--set train.nope=1") && e.contains("unknown field"),
        "{e}"
    );
    assert!(Override::parse("novalue").is_err());
    assert!(Override::parse("a..b=1").is_err());
}

#[test]
fn override_can_add_a_missing_key() {
    let text = BASE.replace("max_steps = 10\n", "");
    let e = err(&text, &[]);
    assert!(
        e.contains("train.max_steps") && e.contains("expected max_steps or max_tokens"),
        "{e}"
    );
    let r = parse(
        &text,
        "r.toml",
        &[Override::parse("train.max_tokens=1000").expect("parse")],
    )
    .expect("valid");
    assert_eq!(r.max_steps(), 16); // ceil(1000 / 64)
}

#[test]
fn missing_section_is_named() {
    let text = BASE.replace("[optim]\nkind = \"adamw\"\nlr = 1e-3\n", "");
    let e = err(&text, &[]);
    assert!(e.contains("missing field `optim`"), "{e}");
}

#[test]
fn device_spec_is_checked() {
    let e = err(BASE, &["run.device=gpu"]);
    assert!(
        e.contains("run.device") && e.contains("auto, cpu, cuda or cuda:N"),
        "{e}"
    );
    parse(
        BASE,
        "r.toml",
        &[Override::parse("run.device=cuda:1").expect("parse")],
    )
    .expect("valid spec");
}

#[test]
fn byte_level_data_needs_vocab_256() {
    let e = err(&BASE.replace("vocab_size = 256", "vocab_size = 100"), &[]);
    assert!(
        e.contains("model.vocab_size") && e.contains("byte-level"),
        "{e}"
    );
}

#[test]
fn wrong_type_in_a_kind_tagged_section_names_the_key() {
    // serde buffers these sections before choosing the variant; the loader finds the key.
    let text = BASE.replace("lr = 1e-3", "lr = \"1e-3\"");
    let e = err(&text, &[]);
    let line = text
        .lines()
        .position(|l| l.starts_with("lr = "))
        .expect("lr line")
        + 1;
    assert_eq!(
        e,
        format!("r.toml:{line}:1: optim.lr: invalid type: string \"1e-3\", expected f64")
    );
    let e = err(BASE, &["model.d_model=\"x\""]);
    assert_eq!(
        e,
        "--set model.d_model=\"x\": model.d_model: invalid type: string \"x\", expected i64"
    );
    let e = err(BASE, &["data.train={kind=\"tokens\", path=3}"]);
    assert!(e.contains("data.train.path: invalid type"), "{e}");
    // Errors that are not about one value keep naming the section.
    let e = err(&BASE.replace("d_ff = 64\n", ""), &[]);
    assert!(e.contains("model: missing field `d_ff`"), "{e}");
}

const MIXTURE: &str = r#"
[[data.mixture.sources]]
name = "new"
weight = 0.95
source = { kind = "builtin" }

[[data.mixture.sources]]
name = "replay"
weight = 0.05
source = { kind = "builtin" }
"#;

fn with_mixture(extra: &str) -> String {
    BASE.replace("train = { kind = \"builtin\" }\n", "") + MIXTURE + extra
}

#[test]
fn mixture_parses_round_trips_and_excludes_data_train() {
    let r = parse(&with_mixture(""), "r.toml", &[]).expect("valid");
    let m = r.data.mixture.as_ref().expect("mixture");
    assert_eq!(
        (m.sources[1].name.as_str(), m.sources[1].weight),
        ("replay", 0.05)
    );
    assert_eq!(
        parse(&to_toml(&r), "resolved.toml", &[]).expect("round trip"),
        r
    );
    let both = BASE.to_string() + MIXTURE;
    assert!(err(&both, &[])
        .contains("data.mixture: give either data.train or [data.mixture], not both"));
    let neither = BASE.replace("train = { kind = \"builtin\" }\n", "");
    assert!(
        err(&neither, &[]).contains("data.train: missing"),
        "{}",
        err(&neither, &[])
    );
}

#[test]
fn bad_mixtures_name_their_key() {
    let neg = with_mixture("").replace("weight = 0.05", "weight = -0.05");
    let e = err(&neg, &[]);
    assert!(
        e.starts_with("r.toml:")
            && e.contains(
                "data.mixture.sources[1].weight: expected a non-negative weight, got -0.05"
            ),
        "{e}"
    );
    let zero = with_mixture("")
        .replace("weight = 0.05", "weight = 0")
        .replace("weight = 0.95", "weight = 0");
    assert!(
        err(&zero, &[]).contains("data.mixture.sources: the weights are all zero"),
        "{}",
        err(&zero, &[])
    );
    let dup = with_mixture("").replace("name = \"replay\"", "name = \"new\"");
    assert!(
        err(&dup, &[]).contains("data.mixture.sources[1].name: duplicate source name \"new\""),
        "{}",
        err(&dup, &[])
    );
    let missing = with_mixture("").replacen(
        "source = { kind = \"builtin\" }",
        "source = { kind = \"text\", path = \"/no/such/file.txt\" }",
        1,
    );
    let e = err(&missing, &[]);
    assert!(
        e.contains("data.mixture.sources[0].source.path: no such file: /no/such/file.txt"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn valid_sets_and_init_load() {
    let r = parse(
        &(BASE.to_string() + "\n[data.valid_sets]\nupstream = { kind = \"builtin\" }\n"),
        "r.toml",
        &[],
    )
    .expect("valid");
    assert_eq!(
        r.data.valid_sets.keys().collect::<Vec<_>>(),
        vec!["upstream"]
    );
    assert_eq!(
        parse(&to_toml(&r), "resolved.toml", &[]).expect("round trip"),
        r
    );
    let e = err(
        &(BASE.to_string() + "\n[data.valid_sets]\n\"bad/name\" = { kind = \"builtin\" }\n"),
        &[],
    );
    assert!(e.contains("expected a name of letters"), "{e}");
    let mut full = parse(BASE, "r.toml", &[]).expect("valid");
    full.init = Some(InitConfig {
        from: "hf:x".into(),
        upcycle: None,
        load: InitLoad::Full,
    });
    assert_eq!(
        full.validate().expect_err("hf: cannot continue").key,
        "init.load"
    );
    let e = err(
        &(BASE.to_string() + "\n[init]\nfrom = \"x\"\nload = \"everything\"\n"),
        &[],
    );
    assert!(
        e.contains("init.load") && e.contains("unknown variant"),
        "{e}"
    );
}
