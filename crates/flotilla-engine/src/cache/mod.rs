//! Binary caches in Nix's own format (`flotilla cache`): key pairs ([`keys`]), publishing a
//! deployment's closures to a directory or an S3 bucket ([`push`], [`s3`]), serving a
//! directory or this host's store over HTTP ([`serve`]). The format itself
//! (narinfo, `nix-cache-info`, signatures) is `flotilla_store::cache`'s; this module does the
//! files, the network and the parallelism around it, and never writes a narinfo before the
//! NAR it names is complete.

pub mod keys;
pub mod nar;
pub mod push;
pub mod s3;
pub mod serve;

use std::path::{Path, PathBuf};

/// Why a cache command could not run (or stopped): each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file or directory operation failed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done (`create`, `read`, `rename`, ...).
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Input the user gave is wrong; the text names it and the fix.
    #[error("{0}")]
    Input(String),
    /// The local store does not hold what its database says (or a path is not in it).
    #[error("{0}")]
    Store(String),
    /// The destination (an S3 endpoint) refused or failed a request.
    #[error("{0}")]
    Remote(String),
}

/// This module's result type.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;

pub(crate) fn io_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> CacheError + 'p {
    move |source| CacheError::Io { what, path: path.to_owned(), source }
}
