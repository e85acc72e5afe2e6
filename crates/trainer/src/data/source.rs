//! Token sources: where the ids come from, checked once at open.
//!
//! - token files: flat little-endian uint16 or uint32 arrays (nanoGPT's `.bin`), memory-mapped;
//! - text files: UTF-8, one token per byte (vocab 256);
//! - the built-in corpus: Alice's Adventures in Wonderland (Project Gutenberg #11, public domain),
//!   compiled into the binary so that the quickstart needs no download.

use super::config::{SourceConfig, TokenDtype};
use super::corpus::FileFormat;
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// The built-in corpus, byte-level.
pub static BUILTIN_CORPUS: &[u8] = include_bytes!("../../data/wonderland.txt");

enum Storage {
    Bytes(Vec<u8>),
    Mapped {
        map: memmap2::Mmap,
        dtype: TokenDtype,
    },
    /// Ids produced in memory (text run through a tokenizer).
    Ids(Vec<u32>),
}

/// An immutable sequence of token ids.
pub struct TokenData {
    storage: Storage,
    /// Where it came from, for messages.
    pub name: String,
    /// Where each document starts, then the total, when the source knows its documents (a
    /// token file with an index, a JSONL source).
    pub documents: Option<Vec<u64>>,
}

impl TokenData {
    pub fn len(&self) -> usize {
        match &self.storage {
            Storage::Bytes(b) => b.len(),
            Storage::Mapped { map, dtype } => map.len() / dtype.width(),
            Storage::Ids(ids) => ids.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Byte-level tokens held in memory (tests, generated data).
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Arc<TokenData> {
        Arc::new(TokenData {
            storage: Storage::Bytes(bytes),
            name: name.to_string(),
            documents: None,
        })
    }

    /// Token id at position `i`.
    pub fn get(&self, i: usize) -> i64 {
        match &self.storage {
            Storage::Bytes(b) => b[i] as i64,
            Storage::Ids(ids) => ids[i] as i64,
            Storage::Mapped {
                map,
                dtype: TokenDtype::Uint16,
            } => u16::from_le_bytes([map[2 * i], map[2 * i + 1]]) as i64,
            Storage::Mapped {
                map,
                dtype: TokenDtype::Uint32,
            } => {
                let o = 4 * i;
                u32::from_le_bytes([map[o], map[o + 1], map[o + 2], map[o + 3]]) as i64
            }
        }
    }

    /// Appends tokens `[start, start + n)` to `out`.
    pub fn extend_window(&self, start: usize, n: usize, out: &mut Vec<i64>) {
        match &self.storage {
            Storage::Bytes(b) => out.extend(b[start..start + n].iter().map(|&x| x as i64)),
            Storage::Ids(ids) => out.extend(ids[start..start + n].iter().map(|&x| x as i64)),
            Storage::Mapped {
                map,
                dtype: TokenDtype::Uint16,
            } => out.extend(
                map[2 * start..2 * (start + n)]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64),
            ),
            Storage::Mapped {
                map,
                dtype: TokenDtype::Uint32,
            } => out.extend(
                map[4 * start..4 * (start + n)]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64),
            ),
        }
    }

    fn max_id(&self) -> i64 {
        match &self.storage {
            Storage::Bytes(b) => b.iter().copied().max().unwrap_or(0) as i64,
            Storage::Ids(ids) => ids.iter().copied().max().unwrap_or(0) as i64,
            Storage::Mapped {
                map,
                dtype: TokenDtype::Uint16,
            } => map
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .max()
                .unwrap_or(0),
            Storage::Mapped {
                map,
                dtype: TokenDtype::Uint32,
            } => map
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .max()
                .unwrap_or(0),
        }
    }
}

/// A UTF-8 text file run through `tokenizer` (for evaluating models with their own vocabulary),
/// checked like `open`.
pub fn open_tokenized(
    path: &Path,
    tokenizer: &super::tokenizer::Tokenizer,
    key: &str,
    vocab_size: i64,
) -> Result<Arc<TokenData>> {
    checked(tokenized_text(path, tokenizer, key)?, key, vocab_size)
}

fn tokenized_text(
    path: &Path,
    tokenizer: &super::tokenizer::Tokenizer,
    key: &str,
) -> Result<TokenData> {
    let bytes = read_file(path, key)?;
    let text = String::from_utf8(bytes).map_err(|e| Error::Data {
        path: format!("{key} = {}", path.display()),
        msg: format!("is not UTF-8 text ({e})"),
    })?;
    let ids: Vec<u32> = tokenizer
        .encode(&text, false)?
        .into_iter()
        .map(|i| i as u32)
        .collect();
    Ok(TokenData {
        storage: Storage::Ids(ids),
        name: path.display().to_string(),
        documents: None,
    })
}

/// Opens a source and checks it against the model: not missing, not empty, a whole number of
/// tokens, every id below `vocab_size`. `key` names the recipe key in messages (`data.train`).
pub fn open(cfg: &SourceConfig, key: &str, vocab_size: i64) -> Result<Arc<TokenData>> {
    let data = match cfg {
        SourceConfig::Builtin {} => TokenData {
            storage: Storage::Bytes(BUILTIN_CORPUS.to_vec()),
            name: "builtin:wonderland".to_string(),
            documents: None,
        },
        SourceConfig::Text {
            path,
            tokenizer: None,
        } => TokenData {
            storage: Storage::Bytes(read_file(path, key)?),
            name: path.display().to_string(),
            documents: None,
        },
        SourceConfig::Text {
            path,
            tokenizer: Some(t),
        } => {
            let tokenizer = super::tokenizer::Tokenizer::from_arg(&t.display().to_string())?;
            tokenized_text(path, &tokenizer, key)?
        }
        SourceConfig::Tokens { path, dtype, index } => {
            open_tokens(path, *dtype, index.as_deref(), key)?
        }
        SourceConfig::Jsonl {
            path,
            field,
            tokenizer,
        } => open_records(path, FileFormat::Jsonl, field, tokenizer.as_deref(), key)?,
        SourceConfig::Parquet {
            path,
            column,
            tokenizer,
        } => open_records(path, FileFormat::Parquet, column, tokenizer.as_deref(), key)?,
        SourceConfig::Chat { .. } | SourceConfig::Instruction { .. } => {
            return Err(Error::Data {
                path: key.to_string(),
                msg: "chat and instruction samples are read as whole samples (data.train), not \
                      as a stream of tokens"
                    .into(),
            })
        }
    };
    checked(data, key, vocab_size)
}

/// Not empty, every id below `vocab_size`.
fn checked(data: TokenData, key: &str, vocab_size: i64) -> Result<Arc<TokenData>> {
    let err = |msg: String| Error::Data {
        path: format!("{key} = {}", data.name),
        msg,
    };
    if data.is_empty() {
        return Err(err("is empty: it holds no tokens".to_string()));
    }
    let max = data.max_id();
    if max >= vocab_size {
        return Err(err(format!(
            "holds token id {max} but model.vocab_size is {vocab_size} (ids must be < vocab_size)"
        )));
    }
    Ok(Arc::new(data))
}

/// A JSONL or Parquet source: each record's `field` a document, tokenized now.
fn open_records(
    path: &Path,
    format: FileFormat,
    field: &str,
    tokenizer: Option<&Path>,
    key: &str,
) -> Result<TokenData> {
    let spec = super::corpus::CorpusSpec {
        inputs: vec![path.to_path_buf()],
        format: Some(format),
        field: field.to_string(),
        text_docs: super::corpus::TextDocs::File,
        skip_bad_records: false,
    };
    let tokenizer = tokenizer.map_or("bytes".to_string(), |t| t.display().to_string());
    let (ids, starts) =
        super::tokenize::tokenize_in_memory(spec, &tokenizer).map_err(|e| Error::Data {
            path: key.to_string(),
            msg: e.to_string(),
        })?;
    Ok(TokenData {
        storage: Storage::Ids(ids),
        name: path.display().to_string(),
        documents: Some(starts),
    })
}

fn read_file(path: &Path, key: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Data {
        path: format!("{key} = {}", path.display()),
        msg: format!("cannot read: {e}"),
    })
}

fn open_tokens(
    path: &Path,
    dtype: Option<TokenDtype>,
    index: Option<&Path>,
    key: &str,
) -> Result<TokenData> {
    let name = path.display().to_string();
    let err = |msg: String| Error::Data {
        path: format!("{key} = {name}"),
        msg,
    };
    let info = super::token_file::TokenFileInfo::read_beside(path)?;
    let dtype = match (dtype, &info) {
        (Some(given), Some(info)) if given != info.dtype => {
            return Err(err(format!(
                "{key}.dtype is {} but the file's summary says {}; drop dtype or fix it",
                given.as_str(),
                info.dtype.as_str()
            )))
        }
        (Some(given), _) => given,
        (None, Some(info)) => info.dtype,
        (None, None) => TokenDtype::Uint16,
    };
    let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| err(format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(err("is not a regular file".to_string()));
    }
    let width = dtype.width() as u64;
    if meta.len() % width != 0 {
        return Err(err(format!(
            "size {} bytes is not a multiple of the token width ({width} bytes for {}); \
             wrong dtype or a truncated file?",
            meta.len(),
            dtype.as_str()
        )));
    }
    if meta.len() == 0 {
        return Err(err("is empty".to_string()));
    }
    let tokens = meta.len() / width;
    if let Some(info) = &info {
        if info.tokens != tokens {
            return Err(err(format!(
                "holds {tokens} tokens but its summary says {}: replaced or truncated since \
                 trainer tokenize wrote it",
                info.tokens
            )));
        }
    }
    let index_path = match (index, &info) {
        (Some(p), _) => Some(p.to_path_buf()),
        (None, Some(info)) => Some(path.with_file_name(&info.index)),
        (None, None) => None,
    };
    let documents = index_path
        .map(|p| super::token_file::read_index(&p, tokens))
        .transpose()
        .map_err(|e| Error::Data {
            path: format!("{key}.index"),
            msg: e.to_string(),
        })?;
    // SAFETY: the file is opened read-only; the trainer never writes to its data files. A file
    // truncated by another process while mapped would fault, as with any mmap reader (nanoGPT's
    // np.memmap included).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err(format!("cannot map: {e}")))?;
    Ok(TokenData {
        storage: Storage::Mapped { map, dtype },
        name,
        documents,
    })
}

/// A contiguous range of a token sequence: the train or validation part of a source.
#[derive(Clone)]
pub struct Span {
    pub data: Arc<TokenData>,
    pub start: usize,
    pub len: usize,
    /// `data.document_mask`: windows carry each token's document and its position in it, so
    /// that attention stays within documents (needs the source's document index).
    pub document_mask: bool,
}

impl Span {
    pub fn whole(data: Arc<TokenData>) -> Span {
        let len = data.len();
        Span {
            data,
            start: 0,
            len,
            document_mask: false,
        }
    }

    /// Splits off the last `fraction` as validation: (train, valid).
    pub fn split(data: Arc<TokenData>, fraction: f64) -> (Span, Span) {
        let n = data.len();
        let n_valid = ((n as f64) * fraction).round() as usize;
        let n_train = n - n_valid;
        (
            Span {
                data: data.clone(),
                start: 0,
                len: n_train,
                document_mask: false,
            },
            Span {
                data,
                start: n_train,
                len: n_valid,
                document_mask: false,
            },
        )
    }

    /// With `data.document_mask`: attention within documents, which needs the document index.
    pub fn with_document_mask(mut self, on: bool, key: &str) -> Result<Span> {
        if on && self.data.documents.is_none() {
            return Err(Error::Data {
                path: format!("{key} = {}", self.data.name),
                msg: "has no document index, which data.document_mask needs (a token file \
                      written by trainer tokenize, or a jsonl/parquet source)"
                    .into(),
            });
        }
        self.document_mask = on;
        Ok(self)
    }

    /// For the window of `n` tokens at absolute position `start`: each token's document
    /// (numbered from 0 within the window) and its position in the document (counted from the
    /// window's start for a document that began before it).
    pub fn documents_of_window(&self, start: usize, n: usize) -> (Vec<i64>, Vec<i64>) {
        let starts = self.data.documents.as_deref().unwrap_or(&[]);
        // The document holding `start`: the last document start at or before it.
        let mut doc = starts.partition_point(|&s| s as usize <= start).max(1) - 1;
        let mut doc_start = start;
        let (mut segments, mut positions) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut segment = 0i64;
        for i in start..start + n {
            while doc + 1 < starts.len() && starts[doc + 1] as usize <= i {
                doc += 1;
                if starts[doc] as usize == i {
                    segment += 1;
                    doc_start = i;
                }
            }
            segments.push(segment);
            positions.push((i - doc_start) as i64);
        }
        (segments, positions)
    }

    /// Checks that at least one window of `window` tokens fits.
    pub fn check_fits(&self, window: usize, key: &str) -> Result<()> {
        if self.len < window {
            return Err(Error::Data {
                path: format!("{key} = {}", self.data.name),
                msg: format!(
                    "has {} tokens but one training window needs seq_len + 1 = {window}",
                    self.len
                ),
            });
        }
        Ok(())
    }
}
