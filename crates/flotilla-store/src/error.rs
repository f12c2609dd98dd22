//! The crate's one error type. It exists so every failure names what went wrong and where (the
//! path on disk, or the byte offset in a NAR stream); it must never carry a whole untrusted
//! input, so strings from peers are clipped before they are stored.

use std::io;
use std::path::PathBuf;

use crate::path::StorePathError;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `flotilla-store`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A string is not a store path.
    #[error(transparent)]
    StorePath(#[from] StorePathError),
    /// A string is not valid nix-base32 of the expected length.
    #[error("`{input}` is not valid nix-base32: {reason}")]
    InvalidBase32 {
        /// The offending input, clipped.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A string is not a NAR hash in a form flotilla reads.
    #[error("`{input}` is not a sha256 NAR hash (`sha256:<nix-base32>`, `sha256:<hex>` or `sha256-<base64>`): {reason}")]
    InvalidHash {
        /// The offending input, clipped.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The NAR stream is malformed; nothing of the offending item was written.
    #[error("invalid NAR at byte {offset}: {problem}")]
    InvalidNar {
        /// Offset of the offending token from the start of the NAR.
        offset: u64,
        /// What is wrong.
        problem: NarError,
    },
    /// Reading the NAR stream failed (the peer or the disk, not the format).
    #[error("reading NAR at byte {offset}: {source}")]
    NarRead {
        /// Bytes of the NAR consumed before the failure.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// Writing the NAR stream failed.
    #[error("writing NAR: {source}")]
    NarWrite {
        /// The underlying error.
        source: io::Error,
    },
    /// A filesystem operation on a path failed.
    #[error("cannot {op} `{}`: {source}", path.display())]
    Fs {
        /// What was being done (`create`, `read`, ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file is neither a regular file, a directory nor a symlink, so a NAR cannot hold it.
    #[error("`{}` is a socket, fifo or device; a NAR holds only files, directories and symlinks", path.display())]
    UnsupportedFileType {
        /// The offending path.
        path: PathBuf,
    },
    /// A file shrank while it was being archived.
    #[error("`{}` changed while it was being archived", path.display())]
    FileChanged {
        /// The offending path.
        path: PathBuf,
    },
    /// The destination of an unpack already exists; unpacking never overwrites.
    #[error("`{}` already exists; a NAR is only unpacked to a new path", path.display())]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },
}

/// What is wrong with a malformed NAR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarError {
    /// The stream ended before the archive did.
    #[error("unexpected end of input")]
    Truncated,
    /// A token is not the one the grammar allows here (also a wrong magic or unknown type).
    #[error("expected {expected}, found `{found}`")]
    UnexpectedTag {
        /// What the grammar allows here.
        expected: &'static str,
        /// What came instead, clipped.
        found: String,
    },
    /// A string or length is larger than its limit.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// What was too long (`name`, `symlink target`, `tag`, `file`).
        what: &'static str,
        /// The length announced.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A directory entry name could let a write leave its directory or cannot exist on disk.
    #[error("entry name `{name}` is {reason}")]
    BadName {
        /// The name, clipped and lossily decoded.
        name: String,
        /// Why it is rejected.
        reason: BadNameReason,
    },
    /// Directory entries are not in strictly increasing byte order (this includes duplicates).
    #[error("entry `{name}` does not sort after `{previous}`")]
    Unsorted {
        /// The previous entry's name.
        previous: String,
        /// The offending name.
        name: String,
    },
    /// A symlink target cannot be created.
    #[error("symlink target is {0}")]
    BadSymlinkTarget(&'static str),
    /// Padding after a string is not all zero bytes.
    #[error("non-zero padding")]
    BadPadding,
    /// Directories are nested deeper than any path Nix could create.
    #[error("directories nested deeper than {max}")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// Bytes follow the end of the archive and the caller asked for an exact end.
    #[error("trailing data after the archive")]
    TrailingData,
}

/// Why a directory entry name is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadNameReason {
    /// The name is empty.
    #[error("empty")]
    Empty,
    /// The name is `.` or `..`.
    #[error("`.` or `..`")]
    Dot,
    /// The name contains `/`.
    #[error("containing `/`")]
    Slash,
    /// The name contains a NUL byte.
    #[error("containing NUL")]
    Nul,
}

/// Clips untrusted bytes to a short, printable string for an error message.
pub(crate) fn clip(bytes: &[u8]) -> String {
    const MAX: usize = 80;
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    if bytes.len() > MAX {
        format!("{s}...")
    } else {
        s.into_owned()
    }
}
