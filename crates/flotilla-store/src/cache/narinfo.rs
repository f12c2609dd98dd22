//! `.narinfo` files: what a binary cache says about one store path (its NAR's hash and size,
//! its references, where the compressed NAR is, and the signatures over all of it).
//!
//! The text is `Key: value` lines. [`NarInfo::to_text`] writes the keys in the order Nix's own
//! `NarInfo::to_string` does, so a narinfo Nix wrote reads back and renders byte for byte (the
//! golden tests hold Nix's output). Parsing is strict about what a signature covers (store
//! path, NAR hash and size, references) and lenient about the rest: unknown keys are kept, in
//! order, so a newer Nix's fields survive a round trip.

use std::fmt::Write as _;

use crate::{NarHash, StorePath};

/// One narinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// The store path it describes.
    pub store_path: StorePath,
    /// Where the (compressed) NAR is, relative to the cache's root: `nar/<file hash>.nar.zst`.
    pub url: String,
    /// `none`, `zstd`, `xz`, `bzip2`, ...
    pub compression: String,
    /// The hash of the file at `url`, as written (`sha256:<nix-base32>`).
    pub file_hash: Option<String>,
    /// The size of the file at `url`.
    pub file_size: Option<u64>,
    /// The hash of the uncompressed NAR.
    pub nar_hash: NarHash,
    /// The size of the uncompressed NAR.
    pub nar_size: u64,
    /// The paths it references, by base name (`<hash>-<name>`), sorted as Nix sorts them.
    pub references: Vec<StorePath>,
    /// The derivation that built it, by base name.
    pub deriver: Option<String>,
    /// `Sig:` lines, `<key name>:<base64 signature>`.
    pub sigs: Vec<String>,
    /// `CA:` (content address), as written.
    pub ca: Option<String>,
    /// Keys this crate does not know, with their values, in the order read.
    pub other: Vec<(String, String)>,
}

/// Why a narinfo cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("narinfo line {line}: {reason}")]
pub struct NarInfoError {
    /// 1-based line number (0: the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl NarInfo {
    /// Parses a narinfo.
    pub fn parse(text: &str) -> Result<NarInfo, NarInfoError> {
        let err = |line: usize, reason: String| NarInfoError { line, reason };
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        let mut other = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.is_empty() {
                continue;
            }
            let (key, value) = line.split_once(": ").or_else(|| line.strip_suffix(':').map(|k| (k, ""))).ok_or_else(|| err(n, "is not `Key: value`".into()))?;
            let once = |slot_full: bool| if slot_full { Err(err(n, format!("`{key}` appears twice"))) } else { Ok(()) };
            match key {
                "StorePath" => {
                    once(store_path.is_some())?;
                    store_path = Some(StorePath::parse(value).map_err(|e| err(n, e.to_string()))?);
                }
                "URL" => {
                    once(url.is_some())?;
                    url = Some(value.to_owned());
                }
                "Compression" => {
                    once(compression.is_some())?;
                    compression = Some(value.to_owned());
                }
                "FileHash" => {
                    once(file_hash.is_some())?;
                    file_hash = Some(value.to_owned());
                }
                "FileSize" => {
                    once(file_size.is_some())?;
                    file_size = Some(value.parse::<u64>().map_err(|_| err(n, format!("FileSize `{value}` is not a number")))?);
                }
                "NarHash" => {
                    once(nar_hash.is_some())?;
                    nar_hash = Some(NarHash::parse(value).map_err(|e| err(n, e.to_string()))?);
                }
                "NarSize" => {
                    once(nar_size.is_some())?;
                    nar_size = Some(value.parse::<u64>().map_err(|_| err(n, format!("NarSize `{value}` is not a number")))?);
                }
                "References" => {
                    once(references.is_some())?;
                    references = Some(
                        value
                            .split(' ')
                            .filter(|r| !r.is_empty())
                            .map(|r| StorePath::from_base_name(r).map_err(|e| err(n, e.to_string())))
                            .collect::<Result<Vec<_>, _>>()?,
                    );
                }
                "Deriver" => {
                    once(deriver.is_some())?;
                    deriver = Some(value.to_owned());
                }
                "Sig" => sigs.push(value.to_owned()),
                "CA" => {
                    once(ca.is_some())?;
                    ca = Some(value.to_owned());
                }
                _ => other.push((key.to_owned(), value.to_owned())),
            }
        }
        let missing = |what: &str| err(0, format!("has no `{what}` line"));
        Ok(NarInfo {
            store_path: store_path.ok_or_else(|| missing("StorePath"))?,
            url: url.ok_or_else(|| missing("URL"))?,
            // Nix reads a narinfo without `Compression` as bzip2-compressed (its oldest format).
            compression: compression.unwrap_or_else(|| "bzip2".to_owned()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size: nar_size.ok_or_else(|| missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver,
            sigs,
            ca,
            other,
        })
    }

    /// The text, keys in Nix's order.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(512);
        let _ = writeln!(s, "StorePath: {}", self.store_path.to_absolute());
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {h}");
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash);
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        let refs: Vec<&str> = self.references.iter().map(|r| r.base_name()).collect();
        let _ = writeln!(s, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {d}");
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        for (k, v) in &self.other {
            let _ = writeln!(s, "{k}: {v}");
        }
        s
    }

    /// What a signature signs: `1;<store path>;<nar hash>;<nar size>;<references>`, the NAR
    /// hash in nix-base32 and the references as full paths joined by commas, exactly as Nix's
    /// `ValidPathInfo::fingerprint`.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.store_path, &self.nar_hash, self.nar_size, &self.references)
    }
}

/// The signed fingerprint of a path (see [`NarInfo::fingerprint`]).
pub fn fingerprint(path: &StorePath, nar_hash: &NarHash, nar_size: u64, references: &[StorePath]) -> String {
    let refs: Vec<String> = references.iter().map(StorePath::to_absolute).collect();
    format!("1;{};{};{};{}", path.to_absolute(), nar_hash, nar_size, refs.join(","))
}

/// The cache's `nix-cache-info`: where its paths live, whether Nix may ask it about many paths
/// at once, and its priority among substituters (lower is preferred).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    /// `StoreDir`, always `/nix/store` for caches flotilla reads.
    pub store_dir: String,
    /// `WantMassQuery` (absent: Nix's default, no).
    pub want_mass_query: Option<bool>,
    /// `Priority`.
    pub priority: Option<u32>,
}

impl CacheInfo {
    /// The info flotilla writes: `/nix/store`, mass queries welcome, priority 40 (the
    /// priority Nix's public caches announce).
    pub fn flotilla() -> CacheInfo {
        CacheInfo { store_dir: crate::STORE_DIR.to_owned(), want_mass_query: Some(true), priority: Some(40) }
    }

    /// Parses `nix-cache-info`.
    pub fn parse(text: &str) -> Result<CacheInfo, NarInfoError> {
        let mut info = CacheInfo { store_dir: String::new(), want_mass_query: None, priority: None };
        for (i, line) in text.lines().enumerate() {
            let Some((key, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            match key {
                "StoreDir" => info.store_dir = value.to_owned(),
                "WantMassQuery" => info.want_mass_query = Some(value == "1"),
                "Priority" => info.priority = Some(value.parse().map_err(|_| NarInfoError { line: i + 1, reason: format!("Priority `{value}` is not a number") })?),
                _ => {}
            }
        }
        if info.store_dir.is_empty() {
            return Err(NarInfoError { line: 0, reason: "nix-cache-info has no `StoreDir`".into() });
        }
        Ok(info)
    }

    /// The text.
    pub fn to_text(&self) -> String {
        let mut s = format!("StoreDir: {}\n", self.store_dir);
        if let Some(w) = self.want_mass_query {
            let _ = writeln!(s, "WantMassQuery: {}", u8::from(w));
        }
        if let Some(p) = self.priority {
            let _ = writeln!(s, "Priority: {p}");
        }
        s
    }
}
