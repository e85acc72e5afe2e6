//! The shared vocabulary of range checks, a leaf every component's config type uses: a failed
//! check names its key path (`optim.lr`) and what was expected. `config/` turns an `Invalid`
//! into one line with the file, line and column (or the `--set` override) in front.

/// A failed range check: the key path and what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub key: String,
    pub msg: String,
}

/// `Ok` when `ok`, else an `Invalid` at `key` saying `msg`.
pub fn check(ok: bool, key: &str, msg: impl Into<String>) -> Result<(), Invalid> {
    if ok {
        Ok(())
    } else {
        Err(Invalid {
            key: key.to_string(),
            msg: msg.into(),
        })
    }
}

pub fn positive(v: i64, key: &str) -> Result<(), Invalid> {
    check(v > 0, key, format!("expected a positive integer, got {v}"))
}

pub fn positive_finite(v: f64, key: &str) -> Result<(), Invalid> {
    check(
        v > 0.0 && v.is_finite(),
        key,
        format!("expected a positive number, got {v}"),
    )
}
