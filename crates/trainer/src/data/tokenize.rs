//! `trainer tokenize`: a corpus (text, JSONL; files or directories) through a tokenizer into a
//! token file, its document index and its summary (`token_file`).
//!
//! - Streaming: a reader thread hands chunks of documents (about 8 MiB of text each) to the
//!   encoder, which encodes a chunk's documents on all threads and writes them in order. Memory
//!   holds a few chunks, never the corpus (a text file read as one document is held whole).
//! - Deterministic: documents are written in reading order whatever the thread count, so the
//!   token and index files are the same bytes on any machine.
//! - Atomic: everything is written to hidden temporary files beside the output and renamed into
//!   place at the end, the summary last; an interrupted run leaves no file under the output's
//!   names. Existing outputs are refused unless `force`; an output may never be an input.

use super::config::TokenDtype;
use super::corpus::{list_files, CorpusSpec, Document, DocumentReader, Skipped};
use super::token_file::{companion_paths, write_index, TokenFileInfo, FORMAT};
use super::tokenizer::Tokenizer;
use crate::error::{io_err, Error, Result};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

/// The token appended after each document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EosChoice {
    /// The `eos_token` of the `tokenizer_config.json` beside the tokenizer (none for bytes).
    Default,
    /// Documents follow each other directly (the index still records where each starts).
    None,
    /// This token, which must be in the vocabulary.
    Token(String),
}

pub struct TokenizeOptions {
    pub corpus: CorpusSpec,
    /// `bytes`, a tokenizer.json file, or a directory holding one.
    pub tokenizer: String,
    /// The token file to write; must end in `.bin` (the index and summary take `.idx`, `.json`).
    pub out: PathBuf,
    pub eos: EosChoice,
    /// Encoding threads; 0: one per core.
    pub threads: usize,
    /// Replace existing outputs.
    pub force: bool,
    /// Draw a progress bar on stderr when it is a terminal.
    pub progress: bool,
}

/// Text per chunk handed to the encoder: large enough to keep every thread busy, small enough
/// that a few chunks in flight stay far below the memory of any machine that trains.
const CHUNK_BYTES: u64 = 8 << 20;

/// Tokenizes the corpus into `opts.out`; returns its summary (also written as `NAME.json`).
pub fn tokenize(opts: &TokenizeOptions) -> Result<TokenFileInfo> {
    let started = std::time::Instant::now();
    let outputs = Outputs::new(&opts.out)?;
    let files = list_files(&opts.corpus.inputs)?;
    outputs.check_free(opts.force, &files)?;
    let tokenizer = Tokenizer::from_arg(&opts.tokenizer)?;
    let eos_id = resolve_eos(&tokenizer, &opts.tokenizer, &opts.eos)?;
    let vocab = tokenizer.vocab_size() as u64;
    let dtype = if vocab <= 1 << 16 {
        TokenDtype::Uint16
    } else {
        TokenDtype::Uint32
    };
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Data {
            path: "tokenize".into(),
            msg: format!("cannot start {threads} threads: {e}"),
        })?;
    let input_bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    let progress = Progress::new(opts.progress, input_bytes);
    outputs.remove_stale_temporaries();
    let mut temp = TempOutputs::create(&outputs)?;
    let mut writer = TokenWriter {
        dtype,
        vocab,
        eos_id,
        tokens: 0,
        documents: 0,
    };
    let skipped = encode_corpus(opts, &tokenizer, &pool, &mut temp, &mut writer, &progress)?;
    progress.finish();
    let info = TokenFileInfo {
        format: FORMAT.into(),
        dtype,
        tokens: writer.tokens,
        documents: writer.documents,
        vocab_size: vocab,
        eos_id,
        tokenizer: opts.tokenizer.clone(),
        tokenizer_sha256: tokenizer_sha256(&opts.tokenizer)?,
        index: file_name(&outputs.idx),
        input_bytes,
        input_files: files.iter().map(|f| f.display().to_string()).collect(),
        skipped_bad_records: skipped.bad_records,
        skipped_empty_documents: skipped.empty,
        seconds: started.elapsed().as_secs_f64(),
    };
    if info.documents == 0 {
        return Err(Error::Data {
            path: info.input_files.join(", "),
            msg: "holds no non-empty documents; nothing written".into(),
        });
    }
    temp.commit(&outputs, &info)?;
    Ok(info)
}

/// A small corpus tokenized in memory (a `jsonl` recipe source): the ids, with the default EOS
/// after each document, and the document starts followed by the total.
pub fn tokenize_in_memory(spec: CorpusSpec, tokenizer_arg: &str) -> Result<(Vec<u32>, Vec<u64>)> {
    let tokenizer = Tokenizer::from_arg(tokenizer_arg)?;
    let eos_id = resolve_eos(&tokenizer, tokenizer_arg, &EosChoice::Default)?;
    let mut reader = DocumentReader::new(spec)?;
    let mut docs = Vec::new();
    while let Some(doc) = reader.next_document()? {
        docs.push(doc.text);
    }
    let encoded: Vec<std::result::Result<Vec<u32>, String>> = docs
        .par_iter()
        .map(|d| tokenizer.encode_corpus(d))
        .collect();
    let (mut ids, mut starts) = (Vec::new(), Vec::with_capacity(docs.len() + 1));
    for (i, doc_ids) in encoded.into_iter().enumerate() {
        let doc_ids = doc_ids.map_err(|msg| Error::Data {
            path: format!("document {}", i + 1),
            msg: format!("cannot be tokenized: {msg}"),
        })?;
        starts.push(ids.len() as u64);
        ids.extend(doc_ids);
        ids.extend(eos_id);
    }
    starts.push(ids.len() as u64);
    Ok((ids, starts))
}

/// Reads documents on a thread of their own and encodes them chunk by chunk on the pool.
fn encode_corpus(
    opts: &TokenizeOptions,
    tokenizer: &Tokenizer,
    pool: &rayon::ThreadPool,
    temp: &mut TempOutputs,
    writer: &mut TokenWriter,
    progress: &Progress,
) -> Result<Skipped> {
    let mut reader = DocumentReader::new(opts.corpus.clone())?;
    let (tx, rx) = sync_channel::<Result<Vec<Document>>>(2);
    std::thread::scope(|scope| {
        let reading = scope.spawn(move || {
            loop {
                let chunk = read_chunk(&mut reader);
                let last = !matches!(&chunk, Ok(docs) if !docs.is_empty());
                if tx.send(chunk).is_err() || last {
                    break;
                }
            }
            reader.skipped
        });
        let mut first_doc = 0u64;
        for chunk in rx {
            let docs = chunk?;
            if docs.is_empty() {
                break;
            }
            let ids: Vec<std::result::Result<Vec<u32>, String>> = pool.install(|| {
                docs.par_iter()
                    .map(|d| tokenizer.encode_corpus(&d.text))
                    .collect()
            });
            for (i, doc_ids) in ids.into_iter().enumerate() {
                let doc_ids = doc_ids.map_err(|msg| Error::Data {
                    path: format!("document {}", first_doc + i as u64 + 1),
                    msg: format!("cannot be tokenized: {msg}"),
                })?;
                writer.write_document(&doc_ids, temp)?;
            }
            first_doc += docs.len() as u64;
            progress.advance(docs.iter().map(|d| d.bytes).sum(), writer.tokens);
        }
        reading.join().map_err(|_| Error::Data {
            path: "tokenize".into(),
            msg: "the reading thread panicked".into(),
        })
    })
}

/// Up to `CHUNK_BYTES` of documents; empty at the end of the corpus.
fn read_chunk(reader: &mut DocumentReader) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    let mut bytes = 0u64;
    while bytes < CHUNK_BYTES {
        match reader.next_document()? {
            Some(doc) => {
                bytes += doc.text.len() as u64;
                docs.push(doc);
            }
            None => break,
        }
    }
    Ok(docs)
}

/// Appends documents to the temporary token and index files.
struct TokenWriter {
    dtype: TokenDtype,
    vocab: u64,
    eos_id: Option<u32>,
    tokens: u64,
    documents: u64,
}

impl TokenWriter {
    fn write_document(&mut self, ids: &[u32], temp: &mut TempOutputs) -> Result<()> {
        write_index(&mut temp.idx, &[self.tokens]).map_err(temp.write_err())?;
        let mut bytes = Vec::with_capacity((ids.len() + 1) * self.dtype.width());
        for &id in ids.iter().chain(self.eos_id.as_ref()) {
            if u64::from(id) >= self.vocab {
                return Err(Error::Data {
                    path: format!("document {}", self.documents + 1),
                    msg: format!(
                        "tokenized to id {id}, outside the vocabulary ({})",
                        self.vocab
                    ),
                });
            }
            match self.dtype {
                TokenDtype::Uint16 => bytes.extend_from_slice(&(id as u16).to_le_bytes()),
                TokenDtype::Uint32 => bytes.extend_from_slice(&id.to_le_bytes()),
            }
        }
        temp.bin.write_all(&bytes).map_err(temp.write_err())?;
        self.tokens += (bytes.len() / self.dtype.width()) as u64;
        self.documents += 1;
        Ok(())
    }
}

/// The id appended after each document.
fn resolve_eos(tokenizer: &Tokenizer, arg: &str, eos: &EosChoice) -> Result<Option<u32>> {
    let err = |msg: String| Error::Data {
        path: format!("--tokenizer {arg}"),
        msg,
    };
    let token = match (eos, tokenizer) {
        (EosChoice::None, _) => return Ok(None),
        (EosChoice::Default, Tokenizer::Bytes) => return Ok(None),
        (EosChoice::Token(_), Tokenizer::Bytes) => {
            return Err(err(
                "bytes have no room for an EOS token (all 256 ids are bytes); drop --eos".into(),
            ))
        }
        (EosChoice::Token(t), _) => t.clone(),
        (EosChoice::Default, Tokenizer::Hf(_)) => default_eos_token(arg)?.ok_or_else(|| {
            err(
                "no eos_token in a tokenizer_config.json beside it; name the token after each \
                 document with --eos TOKEN, or --eos none"
                    .into(),
            )
        })?,
    };
    tokenizer
        .token_id(&token)
        .map(Some)
        .ok_or_else(|| err(format!("has no token {token:?} (the EOS)")))
}

/// `eos_token` of the `tokenizer_config.json` beside the tokenizer (a string, or an
/// `AddedToken` object with `content`).
fn default_eos_token(arg: &str) -> Result<Option<String>> {
    let dir = super::chat::tokenizer_dir(Path::new(arg));
    let special = super::chat::special_tokens_in(&dir)?;
    Ok(special
        .get("eos_token")
        .and_then(|t| t.as_str())
        .map(String::from))
}

fn tokenizer_sha256(arg: &str) -> Result<Option<String>> {
    if arg == "bytes" {
        return Ok(None);
    }
    let path = Path::new(arg);
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&file).map_err(io_err(file.display().to_string()))?;
    use sha2::Digest;
    Ok(Some(format!("{:x}", sha2::Sha256::digest(&bytes))))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The three output paths.
struct Outputs {
    bin: PathBuf,
    idx: PathBuf,
    json: PathBuf,
}

impl Outputs {
    fn new(out: &Path) -> Result<Outputs> {
        if out.extension().and_then(|e| e.to_str()) != Some("bin") {
            return Err(Error::Data {
                path: format!("--out {}", out.display()),
                msg: "must end in .bin (the index and summary are written beside it as .idx \
                      and .json)"
                    .into(),
            });
        }
        let (idx, json) = companion_paths(out);
        Ok(Outputs {
            bin: out.to_path_buf(),
            idx,
            json,
        })
    }

    fn all(&self) -> [&Path; 3] {
        [&self.bin, &self.idx, &self.json]
    }

    fn dir(&self) -> PathBuf {
        match self.bin.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// No output may be an input; existing outputs only with `force`.
    fn check_free(&self, force: bool, inputs: &[PathBuf]) -> Result<()> {
        let canonical: Vec<PathBuf> = inputs
            .iter()
            .filter_map(|f| f.canonicalize().ok())
            .collect();
        for out in self.all() {
            if out.canonicalize().is_ok_and(|c| canonical.contains(&c)) {
                return Err(Error::Data {
                    path: out.display().to_string(),
                    msg: "is also an input; choose another --out".into(),
                });
            }
            if out.exists() && !force {
                return Err(Error::Data {
                    path: out.display().to_string(),
                    msg: "exists; give --force to replace it".into(),
                });
            }
        }
        let dir = self.dir();
        if !dir.is_dir() {
            return Err(Error::Data {
                path: format!("--out {}", self.bin.display()),
                msg: format!("no such directory: {}", dir.display()),
            });
        }
        Ok(())
    }

    /// `.NAME.bin.tmp-PID` (and `.idx`, `.json`) for this process.
    fn temporary(&self, path: &Path) -> PathBuf {
        self.dir()
            .join(format!(".{}.tmp-{}", file_name(path), std::process::id()))
    }

    /// Temporaries of earlier runs that were killed (their PID no longer lives).
    fn remove_stale_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir()) else {
            return;
        };
        let prefixes: Vec<String> = self
            .all()
            .iter()
            .map(|p| format!(".{}.tmp-", file_name(p)))
            .collect();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = prefixes
                .iter()
                .find_map(|p| name.strip_prefix(p.as_str()))
                .and_then(|pid| pid.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// The temporary token and index files; removed on drop unless committed.
struct TempOutputs {
    bin_path: PathBuf,
    idx_path: PathBuf,
    json_path: PathBuf,
    bin: std::io::BufWriter<std::fs::File>,
    idx: std::io::BufWriter<std::fs::File>,
    committed: bool,
}

impl TempOutputs {
    fn create(out: &Outputs) -> Result<TempOutputs> {
        let create = |path: &Path| {
            std::fs::File::create(path)
                .map(|f| std::io::BufWriter::with_capacity(1 << 20, f))
                .map_err(io_err(format!("creating {}", path.display())))
        };
        let (bin_path, idx_path) = (out.temporary(&out.bin), out.temporary(&out.idx));
        let bin = create(&bin_path)?;
        let idx = match create(&idx_path) {
            Ok(idx) => idx,
            Err(e) => {
                let _ = std::fs::remove_file(&bin_path);
                return Err(e);
            }
        };
        Ok(TempOutputs {
            json_path: out.temporary(&out.json),
            bin_path,
            idx_path,
            bin,
            idx,
            committed: false,
        })
    }

    fn write_err(&self) -> impl Fn(std::io::Error) -> Error + '_ {
        move |e| Error::Io {
            context: format!("writing {}", self.bin_path.display()),
            source: e,
        }
    }

    /// Finishes the index, syncs both files, writes the summary, and renames the three into
    /// place (an old summary first out of the way, the new one last).
    fn commit(mut self, out: &Outputs, info: &TokenFileInfo) -> Result<()> {
        write_index(&mut self.idx, &[info.tokens]).map_err(self.write_err())?;
        for (w, path) in [
            (&mut self.bin, &self.bin_path),
            (&mut self.idx, &self.idx_path),
        ] {
            w.flush()
                .and_then(|_| w.get_ref().sync_all())
                .map_err(io_err(format!("writing {}", path.display())))?;
        }
        let json = serde_json::to_string_pretty(info).expect("a summary serialises");
        std::fs::write(&self.json_path, json + "\n")
            .map_err(io_err(format!("writing {}", self.json_path.display())))?;
        if out.json.exists() {
            std::fs::remove_file(&out.json)
                .map_err(io_err(format!("replacing {}", out.json.display())))?;
        }
        for (from, to) in [
            (&self.bin_path, &out.bin),
            (&self.idx_path, &out.idx),
            (&self.json_path, &out.json),
        ] {
            std::fs::rename(from, to).map_err(io_err(format!("renaming into {}", to.display())))?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempOutputs {
    fn drop(&mut self) {
        if !self.committed {
            for p in [&self.bin_path, &self.idx_path, &self.json_path] {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Bytes read, with tokens and tokens/s, on stderr when it is a terminal.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
}

impl Progress {
    fn new(enabled: bool, total_bytes: u64) -> Progress {
        let bar = (enabled && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total_bytes),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg} eta {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            bar,
            started: std::time::Instant::now(),
        }
    }

    fn advance(&self, bytes: u64, tokens: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
            let rate = tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("{tokens} tokens {rate:.0} tokens/s"));
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
