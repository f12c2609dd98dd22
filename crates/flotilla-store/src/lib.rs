//! Nix store primitives shared by the deployer and the agent: store paths, and (with the agent
//! work) the NAR format and hashes. It spawns no process and holds no global state; anything
//! that runs a `nix-*` command belongs in `flotilla-nix`.

mod path;

pub use path::{StorePath, StorePathError, HASH_LEN, NIX_BASE32_CHARS, STORE_DIR};
