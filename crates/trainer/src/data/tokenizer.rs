//! Text to token ids and back: bytes (vocab 256, the built-in default) or a Hugging Face
//! `tokenizer.json` read by the `tokenizers` crate (the same library transformers' fast
//! tokenizers run).

use crate::error::{Error, Result};
use std::path::Path;

/// A token's bytes in the text it came from: (start, end).
pub type ByteRange = (usize, usize);

pub enum Tokenizer {
    /// One token per byte.
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| Tokenizer::Hf(Box::new(t)))
            .map_err(|e| Error::Data {
                path: path.display().to_string(),
                msg: format!(
                    "cannot read tokenizer: {}",
                    crate::error::first_line(&e.to_string())
                ),
            })
    }

    /// The tokenizer for a model source: `tokenizer.json` beside a Hugging Face checkpoint when
    /// there is one, bytes otherwise.
    pub fn for_model_dir(dir: Option<&Path>) -> Result<Tokenizer> {
        match dir.map(|d| d.join("tokenizer.json")) {
            Some(path) if path.is_file() => Tokenizer::from_file(&path),
            _ => Ok(Tokenizer::Bytes),
        }
    }

    /// `bytes` (one token per byte), a `tokenizer.json` file, or a directory holding one (a
    /// Hugging Face checkpoint).
    pub fn from_arg(arg: &str) -> Result<Tokenizer> {
        let path = Path::new(arg);
        if arg == "bytes" {
            return Ok(Tokenizer::Bytes);
        }
        if path.is_dir() {
            let file = path.join("tokenizer.json");
            if !file.is_file() {
                return Err(Error::Data {
                    path: arg.to_string(),
                    msg: "is a directory without a tokenizer.json".into(),
                });
            }
            return Tokenizer::from_file(&file);
        }
        Tokenizer::from_file(path)
    }

    /// The number of token ids, added tokens included (256 for bytes).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf(t) => t.get_vocab_size(true),
        }
    }

    /// The id of a token spelled exactly `token` (an added or regular token), if there is one.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(t) => t.token_to_id(token),
        }
    }

    /// Token ids of `text` without special tokens, as `u32` (the corpus path: no offsets are
    /// tracked, which is what makes `encode_fast` fast; the ids are those of `encode`).
    pub fn encode_corpus(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf(t) => t
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| crate::error::first_line(&e.to_string())),
        }
    }

    /// Token ids of `text` without special tokens added (those spelled in the text, as a chat
    /// template writes them, are recognised), with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        match self {
            Tokenizer::Bytes => Ok((
                text.bytes().map(u32::from).collect(),
                (0..text.len()).map(|i| (i, i + 1)).collect(),
            )),
            Tokenizer::Hf(t) => t
                .encode(text, false)
                .map(|e| (e.get_ids().to_vec(), e.get_offsets().to_vec()))
                .map_err(|e| Error::Data {
                    path: "tokenizer.json".into(),
                    msg: crate::error::first_line(&e.to_string()),
                }),
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Tokenizer::Bytes => "bytes",
            Tokenizer::Hf(_) => "tokenizer.json",
        }
    }

    /// Token ids of `text`. `special`: add the tokenizer's special tokens (a BOS, as
    /// `tokenizer(prompt)` does in transformers); off for a continuous corpus.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(i64::from).collect()),
            Tokenizer::Hf(t) => t
                .encode(text, special)
                .map(|e| e.get_ids().iter().map(|&i| i64::from(i)).collect())
                .map_err(|e| Error::Data {
                    path: "tokenizer.json".into(),
                    msg: e.to_string(),
                }),
        }
    }

    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&t| t.clamp(0, 255) as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::Hf(t) => {
                let ids: Vec<u32> = ids.iter().map(|&i| i.max(0) as u32).collect();
                t.decode(&ids, true).map_err(|e| Error::Data {
                    path: "tokenizer.json".into(),
                    msg: e.to_string(),
                })
            }
        }
    }
}

/// The files of a Hugging Face checkpoint that describe its tokenizer and generation defaults.
/// They travel with the model: into a run directory started from it, and into `trainer export`
/// output, so that `trainer generate --init RUN` and `AutoTokenizer.from_pretrained(EXPORT)` find
/// the model's own tokenizer.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
];

/// Copies the `TOKENIZER_FILES` present in `from` into `to`, never over a file already there;
/// returns the names copied.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<Vec<&'static str>> {
    let mut copied = Vec::new();
    for name in TOKENIZER_FILES {
        let (src, dst) = (from.join(name), to.join(name));
        if src.is_file() && !dst.exists() {
            std::fs::copy(&src, &dst).map_err(crate::error::io_err(format!(
                "copying {} to {}",
                src.display(),
                dst.display()
            )))?;
            copied.push(*name);
        }
    }
    Ok(copied)
}
