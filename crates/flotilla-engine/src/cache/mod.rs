//! Nix binary caches: publishing closures in Nix's own format and serving them.

pub mod serve;
