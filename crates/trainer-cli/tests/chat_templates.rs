//! The chat-template renderer (`trainer::data::chat`, minijinja) against transformers'
//! `apply_chat_template` on three real templates (Llama 3.2, Qwen2.5, Gemma 3; verbatim copies,
//! sources in tests/reference/chat/README.md) and conversations written for the test; the
//! expected strings and errors come from tests/reference/chat/chat_reference.py. Also: the
//! assistant spans the SFT loss trains on hold each reply and nothing of the other turns.

use serde_json::Value;
use std::path::{Path, PathBuf};
use trainer::data::chat::ChatTemplate;

fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/chat")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("JSON")
}

/// The template with the special tokens (and, for Llama, the date) chat_reference.py renders with.
fn template(name: &str, dir: &Path) -> ChatTemplate {
    let (special, vars) = match name {
        "llama3.jinja" => (
            serde_json::json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
            serde_json::json!({"date_string": "26 Jul 2024"}),
        ),
        "chatml_qwen2.5.jinja" => (
            serde_json::json!({"eos_token": "<|im_end|>"}),
            serde_json::json!({}),
        ),
        "gemma.jinja" => (
            serde_json::json!({"bos_token": "<bos>", "eos_token": "<eos>"}),
            serde_json::json!({}),
        ),
        other => panic!("no special tokens for {other}"),
    };
    let config = dir.join(format!("{name}.tokenizer_config.json"));
    std::fs::write(&config, special.to_string()).expect("write");
    let Value::Object(vars) = vars else {
        unreachable!()
    };
    ChatTemplate::from_file(&reference_dir().join(name), Some(&config))
        .expect("the template parses")
        .with_variables(vars)
}

#[test]
fn three_real_templates_render_as_transformers_renders_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = read_json(&reference_dir().join("expected.json"));
    let conversations = read_json(&reference_dir().join("conversations.json"));
    let mut checked = 0;
    for (name, cases) in expected.as_object().expect("object") {
        let t = template(name, dir.path());
        for (key, want) in cases.as_object().expect("object") {
            let conv_name = key.trim_end_matches("+gen");
            let messages = conversations
                .as_array()
                .expect("list")
                .iter()
                .find(|c| c["name"] == conv_name)
                .unwrap_or_else(|| panic!("no conversation {conv_name}"))["messages"]
                .as_array()
                .expect("messages")
                .clone();
            let gen = want["add_generation_prompt"].as_bool().expect("flag");
            let got = t.render(&messages, gen);
            match (want.get("text"), want.get("error")) {
                (Some(text), _) => {
                    let got = got.unwrap_or_else(|e| panic!("{name} {key}: {e}"));
                    assert_eq!(got, text.as_str().expect("string"), "{name} {key}");
                }
                (None, Some(error)) => {
                    let err = got.expect_err("transformers refused it").to_string();
                    assert!(
                        err.contains(error.as_str().expect("string")) && !err.contains('\n'),
                        "{name} {key}: {err}"
                    );
                }
                _ => panic!("{name} {key}: neither text nor error"),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 33, "three templates, eleven cases each");
}

#[test]
fn assistant_spans_hold_each_reply_and_nothing_of_the_other_turns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conversations = read_json(&reference_dir().join("conversations.json"));
    for name in ["llama3.jinja", "chatml_qwen2.5.jinja", "gemma.jinja"] {
        let t = template(name, dir.path());
        for conv in conversations.as_array().expect("list") {
            let messages = conv["messages"].as_array().expect("messages").clone();
            let Ok((text, spans)) = t.render_with_assistant_spans(&messages) else {
                continue; // Gemma refuses consecutive user turns (tested above)
            };
            let replies: Vec<&str> = messages
                .iter()
                .filter(|m| m["role"] == "assistant")
                .map(|m| m["content"].as_str().expect("string").trim())
                .collect();
            assert_eq!(spans.len(), replies.len(), "{name} {}", conv["name"]);
            for (span, reply) in spans.iter().zip(&replies) {
                let part = &text[span.clone()];
                assert!(
                    part.contains(reply),
                    "{name} {}: {part:?} lacks {reply:?}",
                    conv["name"]
                );
                for other in messages.iter().filter(|m| m["role"] != "assistant") {
                    let content = other["content"].as_str().expect("string").trim();
                    if !content.is_empty() && !reply.contains(content) {
                        assert!(!part.contains(content), "{name} {}: {part:?}", conv["name"]);
                    }
                }
            }
        }
    }
}

/// Llama 3's template writes today's date unless `date_string` is given: the trainer knows
/// (and warns, since the same data would render differently on another day).
#[test]
fn templates_that_read_the_date_are_known() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = |name: &str| {
        ChatTemplate::from_file(&reference_dir().join(name), None).expect("the template parses")
    };
    assert!(plain("llama3.jinja").reads_the_date());
    assert!(
        !template("llama3.jinja", dir.path()).reads_the_date(),
        "date_string pins it"
    );
    assert!(!plain("chatml_qwen2.5.jinja").reads_the_date());
    assert!(!plain("gemma.jinja").reads_the_date());
}
