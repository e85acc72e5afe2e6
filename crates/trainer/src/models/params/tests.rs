use super::*;

/// A tiny Llama's 2-D weights, by name: two layers, or layers 0 and 10 with `ten`.
fn llama_weights(layers: &[usize]) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for l in layers {
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            names.push(format!("model.layers.{l}.{m}.weight"));
        }
    }
    names.push("lm_head.weight".to_string());
    names
}

fn strs(names: &[String]) -> Vec<&str> {
    names.iter().map(String::as_str).collect()
}

fn select_err(candidates: &[&str], pattern: &str, key: &str, what: &str) -> String {
    match select(
        candidates,
        &[pattern.to_string()],
        key,
        what,
        Before::Substring,
    ) {
        Ok(names) => panic!("expected an error for {pattern:?}, selected {names:?}"),
        Err(e) => e.to_string(),
    }
}

/// Moved from `peft/lora/tests.rs` (`target_patterns_follow_peft_suffix_rule_with_globs`): the
/// rule LoRA's `target` always had is now everyone's.
#[test]
fn names_match_the_whole_path_or_a_suffix_after_a_dot() {
    let q = "model.layers.0.self_attn.q_proj";
    assert!(name_matches("q_proj", q));
    assert!(name_matches("self_attn.q_proj", q));
    assert!(name_matches(q, q));
    assert!(!name_matches("proj", q), "suffixes start after a dot");
    assert!(!name_matches("_proj", q));
    assert!(name_matches("*_proj", q));
    assert!(name_matches("mlp.*", "model.layers.1.mlp.down_proj"));
    assert!(!name_matches("mlp.*", q));
    assert!(name_matches("layers.1.*", "model.layers.1.mlp.up_proj"));
    assert!(!name_matches("layers.1.*", "model.layers.11.mlp.up_proj"));
    assert!(name_matches("c_attn", "transformer.h.0.attn.c_attn"));
    assert!(name_matches("attn.c_proj", "transformer.h.0.attn.c_proj"));
    assert!(!name_matches("attn.c_proj", "transformer.h.0.mlp.c_proj"));
    // Not a part of a component, at either end.
    assert!(!name_matches("q_pro", q));
    assert!(!name_matches("attn.q_proj", q));
    assert!(!name_matches("model.layers.0.self_attn.q", q));
}

#[test]
fn a_star_matches_any_run_at_either_end_or_in_the_middle() {
    let q = "model.layers.0.self_attn.q_proj";
    assert!(name_matches("*", q));
    assert!(name_matches("*attn*", q));
    assert!(name_matches("self_*", q));
    assert!(name_matches("layers.*.q_proj", q));
    assert!(name_matches("layers.*_proj", q));
    assert!(name_matches("model.*.q_proj", q));
    assert!(name_matches("*.q_proj", q));
    assert!(!name_matches("layers.*.k_proj", q));
    assert!(!name_matches("*attn", q));
    // A star also matches the empty run.
    assert!(name_matches("q_*proj", q));
    // The pieces keep their order and do not overlap.
    assert!(!name_matches("q_proj*q_proj", q));
}

/// The old GaLore test (`patterns_match_substrings_with_wildcards`), with its cases under the
/// name rule: the substring "self_attn" now selects nothing and is spelled "self_attn.*".
#[test]
fn parameters_match_by_name_or_module_path() {
    let q = "model.layers.0.self_attn.q_proj.weight";
    for pattern in [
        "q_proj",
        "self_attn.q_proj",
        "q_proj.weight",
        "self_attn.*",
        "layers.0.*",
        "*attn*",
        "*",
    ] {
        assert!(param_matches(pattern, q), "{pattern:?}");
    }
    for pattern in [
        "proj",
        "self_attn",
        "attn",
        "mlp.*",
        "layers.1.*",
        "q_proj.bias",
    ] {
        assert!(!param_matches(pattern, q), "{pattern:?}");
    }
    assert!(param_matches(
        "q_proj",
        "model.layers.0.self_attn.q_proj.bias"
    ));
    assert!(param_matches(
        "layers.1.*proj",
        "model.layers.1.mlp.up_proj.weight"
    ));
    assert!(!param_matches(
        "layers.1.*proj",
        "model.layers.0.mlp.up_proj.weight"
    ));
    assert!(!param_matches(
        "layers.1.*",
        "model.layers.10.mlp.up_proj.weight"
    ));
    assert!(!param_matches(
        "mlp",
        "model.layers.0.self_attn.o_proj.weight"
    ));
    // Only the last `.weight` or `.bias` is the parameter's own component.
    assert!(!param_matches("q_proj", "model.q_proj.weight.scale"));
    assert!(param_matches("ln_f", "transformer.ln_f.bias"));
}

#[test]
fn star_pattern_star_is_the_old_substring_meaning() {
    let names = llama_weights(&[0, 1, 10]);
    for pattern in [
        "attn", "proj", "0.*proj", "layers.1", "mlp", "q_proj.w", "s.1",
    ] {
        for n in &names {
            assert_eq!(
                param_matches(&format!("*{pattern}*"), n),
                substring_matches(pattern, n),
                "{pattern:?} on {n}"
            );
        }
    }
}

#[test]
fn select_keeps_the_candidates_order_and_takes_the_union() {
    let names = llama_weights(&[0, 1]);
    let patterns = [
        "mlp.down_proj".to_string(),
        "layers.0.self_attn.q_proj".to_string(),
    ];
    let got = select(&strs(&names), &patterns, "k", "weight", Before::Substring).expect("select");
    assert_eq!(
        got,
        vec![
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        ]
    );
    // A pattern that selects nothing either way keeps the message it always had.
    assert_eq!(
        select_err(
            &strs(&names),
            "experts",
            "optim.target",
            "2-D trainable weight"
        ),
        "optim.target: pattern \"experts\" matches no 2-D trainable weight"
    );
}

/// An old GaLore `target` or `prunable` pattern that only matched as a substring: one line with
/// the key, the pattern and the spelling that keeps its meaning.
#[test]
fn old_substring_patterns_that_now_match_nothing_name_the_new_spelling() {
    let names = llama_weights(&[0, 1]);
    let c = strs(&names);
    assert_eq!(
        select_err(&c, "attn", "optim.target", "2-D trainable weight"),
        "optim.target: pattern \"attn\" matches no 2-D trainable weight under the name rule (a \
         whole module path or a suffix after '.', '*' any run); as a substring it would match 8 \
         (\"model.layers.0.self_attn.q_proj.weight\", \"model.layers.0.self_attn.k_proj.weight\", \
         ...): write \"*attn*\""
    );
    assert_eq!(
        select_err(&c, "self_attn", "optim.target", "2-D trainable weight"),
        "optim.target: pattern \"self_attn\" matches no 2-D trainable weight under the name rule \
         (a whole module path or a suffix after '.', '*' any run); as a substring it would match \
         8 (\"model.layers.0.self_attn.q_proj.weight\", \
         \"model.layers.0.self_attn.k_proj.weight\", ...): write \"self_attn.*\""
    );
    assert_eq!(
        select_err(&c, "proj.", "prune.prunable", "trainable weight"),
        "prune.prunable: pattern \"proj.\" matches no trainable weight under the name rule (a \
         whole module path or a suffix after '.', '*' any run); as a substring it would match 14 \
         (\"model.layers.0.self_attn.q_proj.weight\", \"model.layers.0.self_attn.k_proj.weight\", \
         ...): write \"*proj.*\""
    );
    assert_eq!(
        select_err(&c, "down", "--prunable", "linear layer"),
        "--prunable: pattern \"down\" matches no linear layer under the name rule (a whole module \
         path or a suffix after '.', '*' any run); as a substring it would match 2 \
         (\"model.layers.0.mlp.down_proj.weight\", \"model.layers.1.mlp.down_proj.weight\"): \
         write \"*down*\""
    );
    // LoRA's target always had this rule: no substring hint there.
    let err = select(
        &c,
        &["attn".to_string()],
        "peft.target",
        "projection",
        Before::SameRule,
    )
    .map(|_| ())
    .map_err(|e| e.to_string());
    assert_eq!(
        err,
        Err("peft.target: pattern \"attn\" matches no projection".to_string())
    );
}

/// A pattern that selects under both meanings but not the same weights is refused too.
#[test]
fn old_substring_patterns_that_now_select_other_weights_are_refused() {
    let names = llama_weights(&[0, 10]);
    let c = strs(&names);
    assert_eq!(
        select_err(&c, "0.*up_proj", "optim.prunable", "trainable weight"),
        "optim.prunable: pattern \"0.*up_proj\" selects 1 under the name rule (a whole module \
         path or a suffix after '.', '*' any run) but 2 as a substring \
         (\"model.layers.10.mlp.up_proj.weight\" only as a substring): write \"*0.*up_proj\" for \
         the substring meaning, or a pattern both agree on"
    );
    // Patterns that select the same either way pass.
    for pattern in [
        "q_proj",
        "mlp.*",
        "layers.0.*",
        "layers.10.mlp.*",
        "*attn*",
        "*",
    ] {
        select(&c, &[pattern.to_string()], "k", "weight", Before::Substring)
            .unwrap_or_else(|e| panic!("{pattern:?}: {e}"));
    }
}

/// `run.shard = "full"` builds the model under a rule that frees the tensors other ranks hold:
/// they keep their shape and seeded draws (the next tensor's values are those of a store built
/// without the rule), change dtype without memory, and a load checks but skips them.
#[test]
fn tensors_held_elsewhere_are_freed_as_added_converted_and_skipped_by_loads() {
    let build = |rule: Option<ShardRule>| {
        tch::manual_seed(7);
        let mut s = ParamStore::new(Device::Cpu);
        if let Some(rule) = rule {
            s.shard_as_added(0, rule);
        }
        let _ = s.normal("model.embed_tokens.weight", &[4, 3], 1.0);
        let _ = s.normal("model.layers.0.mlp.up_proj.weight", &[5, 3], 1.0);
        let _ = s.normal("model.layers.1.mlp.up_proj.weight", &[5, 3], 1.0);
        s.stop_sharding_as_added().expect("freed");
        s
    };
    let whole = build(None);
    // Rank 0 of two: keeps layer 0, frees layer 1; the embedding is not sharded.
    let mut sharded = build(Some(Box::new(|name: &str, _| {
        name.contains("layers.")
            .then(|| usize::from(!name.contains("layers.0.")))
    })));
    let flags: Vec<(Option<usize>, bool)> = sharded
        .iter()
        .map(|p| (p.held_by, is_released(&p.tensor)))
        .collect();
    assert_eq!(
        flags,
        vec![(None, false), (Some(0), false), (Some(1), true)]
    );
    let value = |s: &ParamStore, n: &str| Vec::<f32>::try_from(s.get(n).expect(n).reshape([-1]));
    let held = "model.layers.0.mlp.up_proj.weight";
    assert_eq!(value(&sharded, held).ok(), value(&whole, held).ok());
    // A load copies what this rank holds and leaves the freed tensor without memory.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("model.safetensors");
    tch::no_grad(|| {
        for p in whole.iter() {
            let _ = p.tensor.shallow_clone().fill_(2.0);
        }
    });
    whole.save(&file).expect("saved");
    sharded.load(&file).expect("loaded");
    assert_eq!(value(&sharded, held).ok(), Some(vec![2.0; 15]));
    let freed = sharded
        .get("model.layers.1.mlp.up_proj.weight")
        .expect("layer 1");
    assert!(is_released(freed));
    sharded.set_kind(Kind::BFloat16);
    let freed = sharded
        .get("model.layers.1.mlp.up_proj.weight")
        .expect("layer 1");
    assert_eq!((freed.kind(), freed.size()), (Kind::BFloat16, vec![5, 3]));
    assert!(is_released(freed));
    assert_eq!(sharded.get(held).expect("held").kind(), Kind::BFloat16);
}
