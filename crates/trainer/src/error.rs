//! The library's error type. Every variant renders as one line that names what the user can fix:
//! the file, the key or path, and what was expected.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A recipe that does not parse or does not validate. The message already names the file,
    /// line and column (or the `--set` override), the key path, and what was expected.
    #[error("{0}")]
    Recipe(String),

    /// A data source that is missing, empty, malformed or does not fit the model.
    #[error("{path}: {msg}")]
    Data { path: String, msg: String },

    /// A checkpoint that is missing, truncated, or does not match the model or optimizer.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    /// A device that does not exist on this machine, or a precision it cannot run.
    #[error("device: {0}")]
    Device(String),

    /// The run directory is in a state that would make us lose or overwrite work.
    #[error("run directory {path}: {msg}")]
    RunDir { path: PathBuf, msg: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("libtorch: {0}")]
    Torch(String),
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        // libtorch messages carry a C++ backtrace after the first line; keep the first line.
        let text = e.to_string();
        Error::Torch(first_line(&text))
    }
}

/// The first non-empty line of a message (libtorch errors are many lines long).
pub fn first_line(text: &str) -> String {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// A message on one line: runs of whitespace (newlines included) become one space. Parser
/// messages (toml, serde) span several lines; every error this library reports is one.
pub fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
