//! Store paths: `/nix/store/<hash>-<name>`, checked once when parsed and carried as a type.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The store directory flotilla works with. Nix allows others; flotilla targets share this one
/// so that closures built here run unchanged there.
pub const STORE_DIR: &str = "/nix/store";

/// Length of the hash part of a store path's base name, in nix-base32 characters.
pub const HASH_LEN: usize = 32;

/// The characters Nix's base-32 alphabet uses (no e, o, u, t).
pub const NIX_BASE32_CHARS: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    /// The path does not start with the store directory.
    #[error("`{0}` is not in {STORE_DIR}")]
    NotInStore(String),
    /// The hash part is too short or uses characters outside nix-base32.
    #[error("`{0}` has no valid hash part (32 nix-base32 characters)")]
    BadHash(String),
    /// The name part is empty, too long or has a character Nix does not allow.
    #[error("`{0}` has an invalid name (letters, digits and +-._?= only, 1 to 211 characters)")]
    BadName(String),
}

/// A path directly inside the Nix store, `/nix/store/<hash>-<name>`; never a path below one.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath {
    /// The base name, `<hash>-<name>`.
    base: String,
}

impl StorePath {
    /// Parses an absolute store path. Sub-paths (`/nix/store/x-y/bin/z`) are rejected: use
    /// [`StorePath::parse_prefix`] for those.
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        let base = s
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_owned()))?;
        Self::from_base_name(base).map_err(|e| match e {
            StorePathError::NotInStore(_) => StorePathError::NotInStore(s.to_owned()),
            other => other,
        })
    }

    /// Parses the store path that `s` is, or lies inside of, returning it and the rest.
    pub fn parse_prefix(s: &str) -> Result<(Self, &str), StorePathError> {
        let rest = s
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_owned()))?;
        let end = rest.find('/').unwrap_or(rest.len());
        Ok((Self::from_base_name(&rest[..end])?, &rest[end..]))
    }

    /// Parses a base name, `<hash>-<name>`, as found in a store directory listing.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        let bytes = base.as_bytes();
        if bytes.len() < HASH_LEN + 2
            || bytes[HASH_LEN] != b'-'
            || !bytes[..HASH_LEN].iter().all(|c| NIX_BASE32_CHARS.contains(c))
        {
            return Err(StorePathError::BadHash(base.to_owned()));
        }
        let name = &base[HASH_LEN + 1..];
        if !valid_name(name) {
            return Err(StorePathError::BadName(base.to_owned()));
        }
        Ok(StorePath {
            base: base.to_owned(),
        })
    }

    /// The path Nix gives a file or tree added to the store by content, with no references
    /// (`builtins.path`, `nix-store --add`): the "source" type, from its NAR's sha256. The
    /// deployer names the agent binary's store path this way without asking Nix.
    pub fn for_source(name: &str, nar_hash: &crate::NarHash) -> Result<Self, StorePathError> {
        use sha2::{Digest, Sha256};
        let fingerprint = format!("source:sha256:{}:{STORE_DIR}:{name}", nar_hash.to_hex());
        let digest = Sha256::digest(fingerprint.as_bytes());
        // Nix folds the digest to 20 bytes by xor before printing it in base 32.
        let mut folded = [0u8; 20];
        for (i, b) in digest.iter().enumerate() {
            folded[i % 20] ^= b;
        }
        Self::from_base_name(&format!("{}-{name}", crate::base32::encode(&folded)))
    }

    /// The base name, `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// The hash part, 32 nix-base32 characters.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_LEN]
    }

    /// The name part after the hash.
    pub fn name(&self) -> &str {
        &self.base[HASH_LEN + 1..]
    }

    /// The absolute path as a string.
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}", self.base)
    }

    /// This store path placed under another root directory, as on a target machine whose
    /// filesystem is mounted at `root`.
    pub fn under_root(&self, root: &Path) -> std::path::PathBuf {
        root.join(&STORE_DIR[1..]).join(&self.base)
    }
}

/// Nix's rule for the name part of a store path.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 211
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl std::str::FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StorePath::parse(s)
    }
}

impl Serialize for StorePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StorePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StorePath::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/lyklk3c3m7576knld0dg2rpspz1x9apk-busybox-static";

    #[test]
    fn parses_and_prints() {
        let p = StorePath::parse(P).unwrap();
        assert_eq!(p.name(), "busybox-static");
        assert_eq!(p.hash_part(), "lyklk3c3m7576knld0dg2rpspz1x9apk");
        assert_eq!(p.to_string(), P);
    }

    #[test]
    fn prefix_splits_sub_path() {
        let sub = format!("{P}/bin/sh");
        let (p, rest) = StorePath::parse_prefix(&sub).unwrap();
        assert_eq!(p.to_string(), P);
        assert_eq!(rest, "/bin/sh");
        assert!(StorePath::parse(&format!("{P}/bin/sh")).is_err());
    }

    #[test]
    fn rejects_bad_paths() {
        for bad in [
            "/usr/bin/x",
            "/nix/store/short-x",
            "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x",
            "/nix/store/lyklk3c3m7576knld0dg2rpspz1x9apk-",
            "/nix/store/lyklk3c3m7576knld0dg2rpspz1x9apk-a b",
            "/nix/store/lyklk3c3m7576knld0dg2rpspz1x9apk-.hidden",
            "/nix/store/lyklk3c3m7576knld0dg2rpspz1x9apk-../x",
        ] {
            assert!(StorePath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn under_root_joins() {
        let p = StorePath::parse(P).unwrap();
        assert_eq!(
            p.under_root(Path::new("/tmp/m")),
            Path::new("/tmp/m/nix/store/lyklk3c3m7576knld0dg2rpspz1x9apk-busybox-static")
        );
    }
}
