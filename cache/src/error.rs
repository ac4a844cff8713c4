//! Errors of the store, each with the path it concerns.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub type Result<T, E = CacheError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot {what} `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cache entry `{}` is corrupt: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "timed out after {}s waiting for the lock `{}` (held by {holder}); \
         another distillery run is computing this step: wait for it or raise --lock-timeout",
        waited.as_secs(), path.display()
    )]
    LockTimeout {
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
    #[error("`{}` exists and is not empty; choose a new or empty directory, or pass --replace to replace a previous export there (a folder without `.distillery-export.json` is never replaced)", path.display())]
    Exists { path: PathBuf },
    /// A source (a model directory, dataset files) that cannot be read as one.
    #[error("source file `{}`: {why}", path.display())]
    Source { path: PathBuf, why: String },
    #[error("bundle `{}` is not valid: {why}", path.display())]
    Bundle { path: PathBuf, why: String },
}

pub(crate) fn io_err(path: &Path, what: &'static str, source: std::io::Error) -> CacheError {
    CacheError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}
