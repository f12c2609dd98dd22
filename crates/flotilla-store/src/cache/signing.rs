//! Nix's signing keys and narinfo signatures: ed25519 over a path's fingerprint
//! ([`super::fingerprint`]), keys and signatures spelled `<name>:<base64>` as
//! `nix-store --generate-binary-cache-key` writes them. A secret key's base64 holds libsodium's
//! 64 bytes (the 32-byte seed, then the public key); a public key's the 32 bytes of the point.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use zeroize::Zeroizing;

use super::NarInfo;

/// Why a key or signature cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not `<name>:<base64>`.
    #[error("a {what} is `<name>:<base64>`, as `nix-store --generate-binary-cache-key` writes it; this one {reason}")]
    Malformed {
        /// `secret key`, `public key`, `signature`.
        what: &'static str,
        /// What is wrong with it (never its material).
        reason: &'static str,
    },
    /// The secret key's public half does not match its seed.
    #[error("secret key `{name}` is corrupt: its public half is not the one its seed gives")]
    Inconsistent {
        /// The key's name.
        name: String,
    },
}

fn split<'a>(text: &'a str, what: &'static str, len: usize) -> Result<(&'a str, Zeroizing<Vec<u8>>), KeyError> {
    let text = text.trim();
    let (name, b64) = text.split_once(':').ok_or(KeyError::Malformed { what, reason: "has no `:`" })?;
    if name.is_empty() {
        return Err(KeyError::Malformed { what, reason: "has an empty name" });
    }
    if name.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(KeyError::Malformed { what, reason: "has a name with white space" });
    }
    let bytes = Zeroizing::new(crate::base64::decode(b64).ok_or(KeyError::Malformed { what, reason: "is not base64 after the `:`" })?);
    if bytes.len() != len {
        return Err(KeyError::Malformed { what, reason: "has the wrong length for an ed25519 key" });
    }
    Ok((name, bytes))
}

/// A secret key: signs narinfos.
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({}:…)", self.name)
    }
}

impl SecretKey {
    /// The key whose seed is `seed` (32 random bytes: the caller's randomness, as this crate
    /// does no I/O of its own).
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<SecretKey, KeyError> {
        let probe = format!("{name}:{}", crate::base64::encode(&[0u8; 32]));
        split(&probe, "secret key", 32)?;
        Ok(SecretKey { name: name.to_owned(), key: SigningKey::from_bytes(seed) })
    }

    /// Parses `<name>:<base64 of 64 bytes>`.
    pub fn parse(text: &str) -> Result<SecretKey, KeyError> {
        let (name, bytes) = split(text, "secret key", 64)?;
        let seed: [u8; 32] = bytes[..32].try_into().expect("64 bytes");
        let key = SigningKey::from_bytes(&seed);
        if key.verifying_key().as_bytes()[..] != bytes[32..] {
            return Err(KeyError::Inconsistent { name: name.to_owned() });
        }
        Ok(SecretKey { name: name.to_owned(), key })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The text of the secret key, for its file.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(64));
        bytes.extend_from_slice(self.key.as_bytes());
        bytes.extend_from_slice(self.key.verifying_key().as_bytes());
        Zeroizing::new(format!("{}:{}", self.name, crate::base64::encode(&bytes)))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.key.verifying_key() }
    }

    /// `<name>:<base64 signature>` of `fingerprint`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, crate::base64::encode(&sig.to_bytes()))
    }

    /// Signs `info` (replacing an earlier signature of this key's name).
    pub fn sign_narinfo(&self, info: &mut NarInfo) {
        let sig = self.sign(&info.fingerprint());
        let prefix = format!("{}:", self.name);
        info.sigs.retain(|s| !s.starts_with(&prefix));
        info.sigs.push(sig);
    }
}

/// A public key: verifies signatures made by its secret key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses `<name>:<base64 of 32 bytes>` (a `trusted-public-keys` entry).
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let (name, bytes) = split(text, "public key", 32)?;
        let point: [u8; 32] = bytes[..].try_into().expect("32 bytes");
        let key = VerifyingKey::from_bytes(&point).map_err(|_| KeyError::Malformed { what: "public key", reason: "is not a point of ed25519" })?;
        Ok(PublicKey { name: name.to_owned(), key })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<name>:<base64>`.
    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, crate::base64::encode(self.key.as_bytes()))
    }

    /// Whether `sig` (`<name>:<base64>`) is this key's signature of `fingerprint`. A signature
    /// under another name is not this key's, whatever its bytes.
    pub fn verifies(&self, fingerprint: &str, sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else { return false };
        if name != self.name {
            return false;
        }
        let Some(bytes) = crate::base64::decode(b64) else { return false };
        let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else { return false };
        self.key.verify(fingerprint.as_bytes(), &ed25519_dalek::Signature::from_bytes(&bytes)).is_ok()
    }
}

/// Whether any of `info`'s signatures is valid under any of `trusted`, Nix's rule for
/// substituting a path (`require-sigs`). Returns the name of the key that verified it.
pub fn trusted_signer<'k>(info: &NarInfo, trusted: &'k [PublicKey]) -> Option<&'k str> {
    let fp = info.fingerprint();
    trusted.iter().find(|k| info.sigs.iter().any(|s| k.verifies(&fp, s))).map(PublicKey::name)
}
