//! The files `trainer tokenize` writes beside a token file `NAME.bin`:
//!
//! - `NAME.idx`: the document index, little-endian `u64`s: the start of each document in tokens,
//!   then the total number of tokens (so `documents + 1` values, the first 0);
//! - `NAME.json`: what the token file holds (`TokenFileInfo`): dtype, token and document counts,
//!   the tokenizer and its EOS id. Written last: a token file with its `.json` is complete.
//!
//! A source `{ kind = "tokens", path = "NAME.bin" }` reads `NAME.json` when it is there: the
//! dtype comes from it, and a file whose length disagrees with it is refused.

use super::config::TokenDtype;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `NAME.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenFileInfo {
    /// Always "trainer-tokens".
    pub format: String,
    pub dtype: TokenDtype,
    pub tokens: u64,
    pub documents: u64,
    /// The tokenizer's vocabulary (added tokens included); every id is below it.
    pub vocab_size: u64,
    /// The token appended after each document, if any.
    pub eos_id: Option<u32>,
    /// `bytes`, or the tokenizer.json path as given, and its SHA-256.
    pub tokenizer: String,
    pub tokenizer_sha256: Option<String>,
    /// The index file's name (beside the token file).
    pub index: String,
    pub input_bytes: u64,
    pub input_files: Vec<String>,
    pub skipped_bad_records: u64,
    pub skipped_empty_documents: u64,
    pub seconds: f64,
}

pub const FORMAT: &str = "trainer-tokens";

/// `NAME.idx` and `NAME.json` for a token file path `NAME.bin`.
pub fn companion_paths(bin: &Path) -> (PathBuf, PathBuf) {
    (bin.with_extension("idx"), bin.with_extension("json"))
}

impl TokenFileInfo {
    /// `NAME.json` beside `bin`, if there is one; a file there that does not parse is an error
    /// (it is not ours to ignore).
    pub fn read_beside(bin: &Path) -> Result<Option<TokenFileInfo>> {
        let (_, json) = companion_paths(bin);
        if !json.is_file() {
            return Ok(None);
        }
        let err = |msg: String| Error::Data {
            path: json.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(&json).map_err(|e| err(format!("cannot read: {e}")))?;
        let info: TokenFileInfo = serde_json::from_str(&text).map_err(|e| {
            err(format!(
                "is not a trainer-tokens summary ({}); move it away if it is unrelated",
                crate::error::one_line(&e.to_string())
            ))
        })?;
        if info.format != FORMAT {
            return Err(err(format!(
                "format is {:?}, expected {FORMAT:?}",
                info.format
            )));
        }
        Ok(Some(info))
    }
}

/// Writes an index (document starts, then the total) as little-endian u64s.
pub fn write_index(out: &mut impl std::io::Write, starts: &[u64]) -> std::io::Result<()> {
    for s in starts {
        out.write_all(&s.to_le_bytes())?;
    }
    Ok(())
}

/// Reads and checks an index for a token file of `tokens` tokens: at least two values, the first
/// 0, non-decreasing, the last `tokens`. Returns the document starts and the total.
pub fn read_index(path: &Path, tokens: u64) -> Result<Vec<u64>> {
    let err = |msg: String| Error::Data {
        path: path.display().to_string(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if bytes.len() % 8 != 0 || bytes.len() < 16 {
        return Err(err(format!(
            "is {} bytes: an index is at least two little-endian u64 values",
            bytes.len()
        )));
    }
    let starts: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    if starts[0] != 0 {
        return Err(err(format!("starts at {}, not 0", starts[0])));
    }
    if let Some(i) = starts.windows(2).position(|w| w[1] < w[0]) {
        return Err(err(format!(
            "offset {} ({}) is below the one before it ({})",
            i + 1,
            starts[i + 1],
            starts[i]
        )));
    }
    let last = *starts.last().expect("two values");
    if last != tokens {
        return Err(err(format!(
            "ends at token {last} but the token file holds {tokens} tokens: not this file's index"
        )));
    }
    Ok(starts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_round_trips_and_a_foreign_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.idx");
        let mut buf = Vec::new();
        write_index(&mut buf, &[0, 5, 9]).expect("write");
        std::fs::write(&path, &buf).expect("write");
        assert_eq!(read_index(&path, 9).expect("read"), vec![0, 5, 9]);
        let err = read_index(&path, 10).expect_err("wrong total").to_string();
        assert!(
            err.contains("ends at token 9 but the token file holds 10"),
            "{err}"
        );
        buf.clear();
        write_index(&mut buf, &[0, 5, 3]).expect("write");
        std::fs::write(&path, &buf).expect("write");
        let err = read_index(&path, 3).expect_err("decreasing").to_string();
        assert!(err.contains("offset 2 (3) is below"), "{err}");
        std::fs::write(&path, [0u8; 12]).expect("write");
        let err = read_index(&path, 0).expect_err("ragged").to_string();
        assert!(err.contains("is 12 bytes"), "{err}");
    }
}
