//! Nix's binary-cache format: `nix-cache-info`, `.narinfo` files and their ed25519
//! signatures. Pure: the caller reads and writes the files and brings the randomness for new
//! keys. Used by `flotilla cache` (push and serve) and by the agent, which verifies what it
//! fetches from a cache before unpacking it.

mod narinfo;
mod signing;
mod url;

pub use narinfo::{fingerprint, CacheInfo, NarInfo, NarInfoError};
pub use signing::{trusted_signer, KeyError, PublicKey, SecretKey};
pub use url::{CacheUrl, UrlProblem};

/// The URL of a path's narinfo under a cache's root: `<hash part>.narinfo`.
pub fn narinfo_url(path: &crate::StorePath) -> String {
    format!("{}.narinfo", path.hash_part())
}

#[cfg(test)]
mod tests;
