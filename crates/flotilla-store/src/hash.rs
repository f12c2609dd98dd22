//! NAR hashes: the sha256 of a store path's NAR, which is what Nix signs, what narinfo files
//! carry and what a target checks before it accepts a path. This module reads the spellings
//! Nix prints and always writes `sha256:<nix-base32>`; it must never accept another algorithm
//! or a truncated digest, since a hash that checks less than it seems is worse than none.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::base32;
use crate::error::{clip, Error, Result};

/// Length of a sha256 digest in bytes.
pub const NAR_HASH_LEN: usize = 32;

/// The sha256 of a NAR, printed as `sha256:<nix-base32>` like `nix-store -q --hash`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NarHash([u8; NAR_HASH_LEN]);

impl NarHash {
    /// Wraps a raw sha256 digest.
    pub const fn from_bytes(bytes: [u8; NAR_HASH_LEN]) -> Self {
        NarHash(bytes)
    }

    /// The raw digest.
    pub const fn as_bytes(&self) -> &[u8; NAR_HASH_LEN] {
        &self.0
    }

    /// The sha256 of `data` (a whole NAR already in memory).
    pub fn digest(data: &[u8]) -> Self {
        NarHash(Sha256::digest(data).into())
    }

    /// Parses `sha256:<nix-base32>`, `sha256:<hex>` or the SRI form `sha256-<base64>`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason| Error::InvalidHash {
            input: clip(s.as_bytes()),
            reason,
        };
        let mut out = [0u8; NAR_HASH_LEN];
        if let Some(rest) = s.strip_prefix("sha256:") {
            if rest.len() == 2 * NAR_HASH_LEN {
                decode_hex(rest, &mut out).ok_or_else(|| bad("bad hex digit"))?;
            } else {
                base32::decode_into(rest, &mut out).map_err(|e| match e {
                    Error::InvalidBase32 { reason, .. } => bad(reason),
                    other => other,
                })?;
            }
        } else if let Some(rest) = s.strip_prefix("sha256-") {
            decode_base64(rest, &mut out).ok_or_else(|| bad("bad base64"))?;
        } else {
            return Err(bad("no `sha256:` or `sha256-` prefix"));
        }
        Ok(NarHash(out))
    }

    /// The SRI spelling, `sha256-<base64>`, as newer Nix prints it.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", encode_base64(&self.0))
    }

    /// The lowercase hex digest without prefix, as `sha256sum` prints it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", base32::encode(&self.0))
    }
}

impl fmt::Debug for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarHash({self})")
    }
}

impl FromStr for NarHash {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        NarHash::parse(s)
    }
}

impl Serialize for NarHash {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NarHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        NarHash::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A NAR's hash together with its size in bytes: the two facts a narinfo records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NarDigest {
    /// sha256 of the NAR.
    pub hash: NarHash,
    /// Length of the NAR in bytes.
    pub size: u64,
}

/// A writer that hashes (sha256) and counts everything written through it.
#[derive(Debug, Clone)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`; use `io::sink()` to only hash.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Returns the inner writer and the digest of everything written.
    pub fn finish(self) -> (W, NarDigest) {
        let digest = NarDigest {
            hash: NarHash(self.hasher.finalize().into()),
            size: self.bytes,
        };
        (self.inner, digest)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Hash only what the inner writer accepted, so a short write is not counted twice.
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes (sha256) and counts everything read through it.
#[derive(Debug, Clone)]
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Returns the inner reader and the digest of everything read.
    pub fn finish(self) -> (R, NarDigest) {
        let digest = NarDigest {
            hash: NarHash(self.hasher.finalize().into()),
            size: self.bytes,
        };
        (self.inner, digest)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn decode_hex(s: &str, out: &mut [u8; NAR_HASH_LEN]) -> Option<()> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

fn encode_base64(bytes: &[u8]) -> String {
    crate::base64::encode(bytes)
}

/// Strict, padded standard base64 of exactly 32 bytes; unused bits must be zero.
fn decode_base64(s: &str, out: &mut [u8; NAR_HASH_LEN]) -> Option<()> {
    let bytes = crate::base64::decode(s)?;
    (bytes.len() == NAR_HASH_LEN).then(|| out.copy_from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    // sha256("hello"), as `nix-hash --type sha256 --flat --base32` and `sha256sum` print it.
    const B32: &str = "sha256:094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic";
    const HEX: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    // `printf hello | openssl dgst -sha256 -binary | base64`
    const SRI: &str = "sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=";

    #[test]
    fn parses_every_spelling_to_the_same_hash() {
        let h = NarHash::digest(b"hello");
        assert_eq!(NarHash::parse(B32).unwrap(), h);
        assert_eq!(NarHash::parse(&format!("sha256:{HEX}")).unwrap(), h);
        assert_eq!(NarHash::parse(SRI).unwrap(), h);
        assert_eq!(h.to_string(), B32);
        assert_eq!(h.to_sri(), SRI);
        assert_eq!(h.to_hex(), HEX);
    }

    #[test]
    fn rejects_other_hashes() {
        for bad in [
            "",
            "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic",
            "sha1:9m1skbnr5i43n3yypvda5s65vhfwdx5a",
            "sha256:094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwi",
            "sha256:094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwie",
            "sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ",
            "sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCR=",
            "sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmC==",
        ] {
            assert!(
                matches!(NarHash::parse(bad), Err(Error::InvalidHash { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn serde_uses_the_nix_spelling() {
        let h = NarHash::digest(b"hello");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{B32}\""));
        assert_eq!(serde_json::from_str::<NarHash>(&json).unwrap(), h);
        assert_eq!(
            serde_json::from_str::<NarHash>(&format!("\"{SRI}\"")).unwrap(),
            h
        );
        assert!(serde_json::from_str::<NarHash>("\"md5:x\"").is_err());
    }

    #[test]
    fn hashing_writer_and_reader_agree() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        let (out, wd) = w.finish();
        assert_eq!(out, data);
        let mut r = HashingReader::new(&data[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        let (_, rd) = r.finish();
        assert_eq!(wd, rd);
        assert_eq!(wd.size, data.len() as u64);
        assert_eq!(wd.hash, NarHash::digest(&data));
    }

    #[test]
    fn base64_round_trips() {
        for n in 0..10u8 {
            let h = NarHash::from_bytes([n.wrapping_mul(53); 32]);
            assert_eq!(NarHash::parse(&h.to_sri()).unwrap(), h);
        }
    }
}
