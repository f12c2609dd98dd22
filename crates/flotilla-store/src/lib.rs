//! Nix store primitives shared by the deployer and the agent: store paths, nix-base32, NAR
//! hashes and the NAR format. It spawns no process and holds no global state; anything that
//! runs a `nix-*` command belongs in `flotilla-nix`. Its only I/O is reading and writing the
//! one filesystem tree a caller names, in the NAR encoder and decoder.

pub mod base32;
pub mod base64;
pub mod cache;
mod error;
mod hash;
pub mod nar;
mod path;

pub use error::{BadNameReason, Error, NarError, Result};
pub use hash::{HashingReader, HashingWriter, NarDigest, NarHash, NAR_HASH_LEN};
pub use nar::{
    decode_to_path, encode_path, hash_path, DecodeOptions, NarEvent, NarParser, NarStats,
};
pub use path::{StorePath, StorePathError, HASH_LEN, NIX_BASE32_CHARS, STORE_DIR};
