//! Documents read from corpus files, one at a time (never the corpus in memory): text files (a
//! whole file, or each non-empty line, is a document), JSONL files (one record per line, the
//! document is the string in a named field) and Parquet files (one record per row, the string
//! in a named column; read row group by row group). Directories are walked in sorted path order,
//! so the same inputs give the same documents in the same order on any machine.
//!
//! Every error names the file and the line or row: `corpus.jsonl:17: not JSON (...)`,
//! `corpus.parquet:row 9: column "text" is null, not a string`. With `skip_bad_records`, a bad
//! record is counted and skipped instead. `RecordReader` gives whole records (JSONL lines,
//! Parquet rows) as JSON values, for chat and instruction sets.

use crate::error::{Error, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// How a file's documents are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// UTF-8 text.
    Text,
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet.
    Parquet,
}

impl FileFormat {
    /// By extension: `.jsonl`/`.ndjson` are JSONL, `.parquet` Parquet, anything else is text.
    pub fn of_path(path: &Path) -> FileFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson") => FileFormat::Jsonl,
            Some("parquet") => FileFormat::Parquet,
            _ => FileFormat::Text,
        }
    }
}

/// What one document of a text file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextDocs {
    /// The whole file.
    File,
    /// Each non-empty line, without its `\n`.
    Line,
}

/// Which files, and how to read documents from them.
#[derive(Debug, Clone)]
pub struct CorpusSpec {
    /// Files and directories (walked recursively; hidden entries skipped).
    pub inputs: Vec<PathBuf>,
    /// `None`: by each file's extension.
    pub format: Option<FileFormat>,
    /// The JSONL field that holds the text.
    pub field: String,
    pub text_docs: TextDocs,
    /// Count and skip malformed JSONL records instead of stopping.
    pub skip_bad_records: bool,
}

/// The input files in reading order: each input as given, directories expanded into their
/// files sorted by path.
pub fn list_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| Error::Data {
            path: input.display().to_string(),
            msg: format!("cannot read: {e}"),
        })?;
        if meta.is_dir() {
            walk(input, &mut files)?;
        } else {
            files.push(input.clone());
        }
    }
    if files.is_empty() {
        return Err(Error::Data {
            path: inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            msg: "holds no files".into(),
        });
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let read_err = |e: std::io::Error| Error::Data {
        path: dir.display().to_string(),
        msg: format!("cannot list: {e}"),
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(read_err)?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// One document and the input bytes it came from (for progress and tokens per byte).
pub struct Document {
    pub text: String,
    pub bytes: u64,
}

/// Counts of what was not read as a document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Malformed records skipped under `skip_bad_records`.
    pub bad_records: u64,
    /// Empty documents (an empty file, an empty string in the field).
    pub empty: u64,
}

/// Reads documents from the files of a `CorpusSpec` in order.
pub struct DocumentReader {
    spec: CorpusSpec,
    files: std::vec::IntoIter<PathBuf>,
    current: Option<OpenFile>,
    pub skipped: Skipped,
}

struct OpenFile {
    path: PathBuf,
    format: FileFormat,
    reader: Reader,
    /// Lines or rows read so far.
    line: u64,
    /// A text file read whole has given its one document.
    done: bool,
}

enum Reader {
    Bytes(std::io::BufReader<std::fs::File>),
    Parquet(parquet::record::reader::RowIter<'static>),
}

impl DocumentReader {
    pub fn new(spec: CorpusSpec) -> Result<DocumentReader> {
        let files = list_files(&spec.inputs)?;
        Ok(DocumentReader {
            spec,
            files: files.into_iter(),
            current: None,
            skipped: Skipped::default(),
        })
    }

    /// The next non-empty document, or `None` after the last file.
    pub fn next_document(&mut self) -> Result<Option<Document>> {
        loop {
            if self.current.is_none() {
                let Some(path) = self.files.next() else {
                    return Ok(None);
                };
                self.current = Some(self.open(path)?);
            }
            match self.read_from_current()? {
                Some(doc) if doc.text.is_empty() => self.skipped.empty += 1,
                Some(doc) => return Ok(Some(doc)),
                None => self.current = None,
            }
        }
    }

    fn open(&self, path: PathBuf) -> Result<OpenFile> {
        let format = self
            .spec
            .format
            .unwrap_or_else(|| FileFormat::of_path(&path));
        OpenFile::open(path, format)
    }

    /// The next document of the open file (possibly empty), or `None` at its end.
    fn read_from_current(&mut self) -> Result<Option<Document>> {
        let (spec, skipped) = (&self.spec, &mut self.skipped);
        let file = self.current.as_mut().expect("a file is open");
        match (file.format, spec.text_docs) {
            (FileFormat::Text, TextDocs::File) => file.whole_text(),
            (FileFormat::Text, TextDocs::Line) => file.next_text_line(),
            (FileFormat::Jsonl | FileFormat::Parquet, _) => loop {
                let found = match file.format {
                    FileFormat::Parquet => file
                        .next_row()?
                        .map(|(row, bytes)| (parquet_column(&row, &spec.field), bytes)),
                    _ => file
                        .next_json_line()?
                        .map(|(raw, bytes)| (json_field(&raw, &spec.field), bytes)),
                };
                let Some((text, bytes)) = found else {
                    return Ok(None);
                };
                match text {
                    Ok(text) => return Ok(Some(Document { text, bytes })),
                    Err(msg) if spec.skip_bad_records => {
                        tracing::debug!("{}: skipped: {msg}", file.location());
                        skipped.bad_records += 1;
                    }
                    Err(msg) => {
                        return Err(Error::Data {
                            path: file.location(),
                            msg: format!("{msg} (--skip-bad-records skips such records)"),
                        })
                    }
                }
            },
        }
    }
}

/// Whole records of a JSONL or Parquet file as JSON values (a Parquet row's columns become an
/// object's fields, lists and structs included), each with its `file:line` or `file:row N`.
pub struct RecordReader {
    file: OpenFile,
}

impl RecordReader {
    pub fn open(path: &Path) -> Result<RecordReader> {
        let format = match FileFormat::of_path(path) {
            FileFormat::Parquet => FileFormat::Parquet,
            _ => FileFormat::Jsonl,
        };
        Ok(RecordReader {
            file: OpenFile::open(path.to_path_buf(), format)?,
        })
    }

    /// The next record (or what is wrong with it) and where it is; `None` at the end.
    pub fn next_record(
        &mut self,
    ) -> Result<Option<(String, std::result::Result<serde_json::Value, String>)>> {
        let f = &mut self.file;
        let value = match f.format {
            FileFormat::Parquet => f.next_row()?.map(|(row, _)| Ok(row.to_json_value())),
            _ => f.next_json_line()?.map(|(raw, _)| {
                serde_json::from_slice(&raw)
                    .map_err(|e| format!("not JSON ({})", crate::error::first_line(&e.to_string())))
            }),
        };
        Ok(value.map(|v| (f.location(), v)))
    }
}

impl OpenFile {
    fn open(path: PathBuf, format: FileFormat) -> Result<OpenFile> {
        let err = |msg: String| Error::Data {
            path: path.display().to_string(),
            msg,
        };
        let file = std::fs::File::open(&path).map_err(|e| err(format!("cannot open: {e}")))?;
        let reader = match format {
            FileFormat::Parquet => {
                let reader =
                    parquet::file::reader::SerializedFileReader::new(file).map_err(|e| {
                        err(format!(
                            "is not a Parquet file ({})",
                            crate::error::first_line(&e.to_string())
                        ))
                    })?;
                Reader::Parquet(reader.into_iter())
            }
            _ => Reader::Bytes(std::io::BufReader::with_capacity(1 << 20, file)),
        };
        Ok(OpenFile {
            path,
            format,
            reader,
            line: 0,
            done: false,
        })
    }

    /// `file:line` (or `file:row N` for Parquet) of the record read last.
    fn location(&self) -> String {
        match self.format {
            FileFormat::Parquet => format!("{}:row {}", self.path.display(), self.line),
            _ => format!("{}:{}", self.path.display(), self.line),
        }
    }

    fn bytes(&mut self) -> &mut std::io::BufReader<std::fs::File> {
        match &mut self.reader {
            Reader::Bytes(r) => r,
            Reader::Parquet(_) => unreachable!("a Parquet file is read by rows"),
        }
    }

    /// The next row of a Parquet file and an estimate of its bytes (for progress).
    fn next_row(&mut self) -> Result<Option<(parquet::record::Row, u64)>> {
        let Reader::Parquet(rows) = &mut self.reader else {
            unreachable!("opened as Parquet")
        };
        match rows.next() {
            None => Ok(None),
            Some(Ok(row)) => {
                self.line += 1;
                Ok(Some((row, 0)))
            }
            Some(Err(e)) => Err(Error::Data {
                path: format!("{}:row {}", self.path.display(), self.line + 1),
                msg: format!("cannot read ({})", crate::error::first_line(&e.to_string())),
            }),
        }
    }

    /// The next non-blank line of a JSONL file.
    fn next_json_line(&mut self) -> Result<Option<(Vec<u8>, u64)>> {
        loop {
            let Some((raw, bytes)) = self.next_raw_line()? else {
                return Ok(None);
            };
            if !raw.iter().all(|b| b.is_ascii_whitespace()) {
                return Ok(Some((raw, bytes)));
            }
        }
    }

    fn read_err(&self, e: std::io::Error) -> Error {
        Error::Data {
            path: self.path.display().to_string(),
            msg: format!("cannot read: {e}"),
        }
    }

    fn not_utf8(&self, at_line: bool) -> Error {
        let path = if at_line {
            format!("{}:{}", self.path.display(), self.line)
        } else {
            self.path.display().to_string()
        };
        Error::Data {
            path,
            msg: "is not UTF-8 text".into(),
        }
    }

    fn whole_text(&mut self) -> Result<Option<Document>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        let mut bytes = Vec::new();
        let read = std::io::Read::read_to_end(self.bytes(), &mut bytes);
        read.map_err(|e| self.read_err(e))?;
        let n = bytes.len() as u64;
        let text = String::from_utf8(bytes).map_err(|_| self.not_utf8(false))?;
        Ok(Some(Document { text, bytes: n }))
    }

    /// The next line's bytes without `\n`, and the bytes it took in the file.
    fn next_raw_line(&mut self) -> Result<Option<(Vec<u8>, u64)>> {
        let mut raw = Vec::new();
        let read = self.bytes().read_until(b'\n', &mut raw);
        let n = read.map_err(|e| self.read_err(e))?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        if raw.last() == Some(&b'\n') {
            raw.pop();
        }
        Ok(Some((raw, n as u64)))
    }

    fn next_text_line(&mut self) -> Result<Option<Document>> {
        let Some((raw, bytes)) = self.next_raw_line()? else {
            return Ok(None);
        };
        let text = String::from_utf8(raw).map_err(|_| self.not_utf8(true))?;
        Ok(Some(Document { text, bytes }))
    }
}

/// The string in `field` of a JSON object line, or what is wrong with the line.
fn json_field(raw: &[u8], field: &str) -> std::result::Result<String, String> {
    let value: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| format!("not JSON ({})", crate::error::first_line(&e.to_string())))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err("not a JSON object".into());
    };
    match object.remove(field) {
        Some(serde_json::Value::String(text)) => Ok(text),
        Some(other) => Err(format!(
            "field {field:?} is {}, not a string",
            json_kind(&other)
        )),
        None => Err(format!("no field {field:?}")),
    }
}

/// The string in column `name` of a Parquet row, or what is wrong with it.
fn parquet_column(row: &parquet::record::Row, name: &str) -> std::result::Result<String, String> {
    use parquet::record::Field;
    let field = row
        .get_column_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, f)| f)
        .ok_or_else(|| format!("no column {name:?}"))?;
    match field {
        Field::Str(s) => Ok(s.clone()),
        Field::Null => Err(format!("column {name:?} is null, not a string")),
        other => Err(format!(
            "column {name:?} is {}, not a string",
            json_kind(&other.to_json_value())
        )),
    }
}

/// "a number", "null", ...: for messages about a JSON value of the wrong type.
pub fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, format: Option<FileFormat>, docs: TextDocs, skip: bool) -> CorpusSpec {
        CorpusSpec {
            inputs: vec![dir.to_path_buf()],
            format,
            field: "text".into(),
            text_docs: docs,
            skip_bad_records: skip,
        }
    }

    fn read_all(spec: CorpusSpec) -> Result<(Vec<String>, Skipped)> {
        let mut r = DocumentReader::new(spec)?;
        let mut docs = Vec::new();
        while let Some(d) = r.next_document()? {
            docs.push(d.text);
        }
        Ok((docs, r.skipped))
    }

    #[test]
    fn directories_are_read_in_sorted_order_with_documents_per_file_or_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("b")).expect("mkdir");
        std::fs::write(dir.path().join("b/2.txt"), "two\n\nthree\n").expect("write");
        std::fs::write(dir.path().join("a.txt"), "one").expect("write");
        std::fs::write(dir.path().join(".hidden.txt"), "never").expect("write");
        std::fs::write(dir.path().join("c.txt"), "").expect("write");
        let (docs, skipped) =
            read_all(spec(dir.path(), None, TextDocs::File, false)).expect("read");
        assert_eq!(docs, vec!["one", "two\n\nthree\n"]);
        assert_eq!(skipped.empty, 1);
        let (docs, _) = read_all(spec(dir.path(), None, TextDocs::Line, false)).expect("read");
        assert_eq!(docs, vec!["one", "two", "three"]);
    }

    #[test]
    fn bad_jsonl_records_name_file_and_line_or_are_counted_when_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.jsonl");
        let lines = [
            r#"{"text": "good"}"#,
            "",
            r#"{"text": 3}"#,
            r#"{"other": "x"}"#,
            r#"{"text": "#,
            r#"[1, 2]"#,
            r#"{"text": "also good", "id": 7}"#,
        ];
        std::fs::write(&path, lines.join("\n")).expect("write");
        let err = read_all(spec(&path, None, TextDocs::File, false))
            .expect_err("a bad record stops the read")
            .to_string();
        assert!(
            err.contains("c.jsonl:3: field \"text\" is a number"),
            "{err}"
        );
        let (docs, skipped) = read_all(spec(&path, None, TextDocs::File, true)).expect("read");
        assert_eq!(docs, vec!["good", "also good"]);
        assert_eq!(skipped.bad_records, 4);
        let field = CorpusSpec {
            field: "other".into(),
            ..spec(&path, None, TextDocs::File, false)
        };
        let err = read_all(field).expect_err("missing field").to_string();
        assert!(err.contains("c.jsonl:1: no field \"other\""), "{err}");
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bin.txt");
        std::fs::write(&path, b"ok\n\xff\xfe\n").expect("write");
        let err = read_all(spec(&path, None, TextDocs::Line, false))
            .expect_err("not UTF-8")
            .to_string();
        assert!(err.contains("bin.txt:2: is not UTF-8 text"), "{err}");
        let missing = read_all(spec(&dir.path().join("nope"), None, TextDocs::File, false))
            .expect_err("missing input")
            .to_string();
        assert!(missing.contains("nope: cannot read"), "{missing}");
    }
}
