//! One store path into a cache: its NAR encoded from the store, hashed on the way and checked
//! against the hash Nix recorded, zstd-compressed once, and the narinfo naming the result.
//! `cache push` and `cache serve --store` both make their files here, so the two write the
//! same narinfo for the same path (deriver, CA and the signatures Nix holds kept alike).
//!
//! A big NAR is compressed by zstd on several threads, taken from a [`ThreadBudget`] shared by
//! everything compressing at once: `push`'s parallel workers split the cores between them
//! (a worker alone on a big NAR gets the idle ones) instead of each starting one thread per
//! core.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use flotilla_nix::PathInfo;
use flotilla_store::cache::NarInfo;
use flotilla_store::{base32, HashingWriter, StorePath};

use super::{CacheError, Result};

/// zstd's level for NARs (3 is zstd's and Nix's default for `compression=zstd`).
pub const ZSTD_LEVEL: i32 = 3;

/// NARs larger than this are compressed on several threads when the budget has them.
const MULTITHREAD_ABOVE: u64 = 32 << 20;

/// What Nix's database says of a path beyond [`PathInfo`]; kept in its narinfo.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    /// The derivation that built it (a full path).
    pub deriver: Option<String>,
    /// Its content address.
    pub ca: Option<String>,
    /// Signatures Nix holds for it.
    pub sigs: Vec<String>,
}

impl From<flotilla_nix::StoreRow> for Provenance {
    fn from(row: flotilla_nix::StoreRow) -> Provenance {
        Provenance {
            deriver: row.deriver,
            ca: row.ca,
            sigs: row.sigs,
        }
    }
}

/// Threads for compression, shared by everyone compressing at once.
#[derive(Debug)]
pub struct ThreadBudget {
    free: Mutex<usize>,
}

/// Threads taken from a [`ThreadBudget`], given back when dropped.
pub struct Lease<'a> {
    budget: &'a ThreadBudget,
    /// How many.
    pub threads: usize,
}

impl ThreadBudget {
    /// A budget of `total` threads.
    pub fn new(total: usize) -> ThreadBudget {
        ThreadBudget {
            free: Mutex::new(total),
        }
    }

    /// This host's cores.
    pub fn cores_count() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }

    /// Up to `want` threads (none when all are taken).
    pub fn take(&self, want: usize) -> Lease<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let threads = want.min(*free);
        *free -= threads;
        Lease {
            budget: self,
            threads,
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        *self.budget.free.lock().unwrap_or_else(|p| p.into_inner()) += self.threads;
    }
}

/// A path's compressed NAR, written, and its narinfo (not signed, not written).
pub struct Packed<W> {
    /// The writer given, flushed.
    pub out: W,
    /// The narinfo; its URL is `nar/<file hash>.nar.zst`.
    pub info: NarInfo,
    /// The compressed file's sha256.
    pub file_sha256: [u8; 32],
}

/// Writes `p`'s NAR, zstd-compressed, into `out`, and checks it against the NAR hash and size
/// Nix recorded (a mismatch is a corrupt store, said with the repair). The caller makes `out`
/// durable and visible before the narinfo.
pub fn pack<W: Write>(
    p: &PathInfo,
    provenance: &Provenance,
    out: W,
    level: i32,
    budget: &ThreadBudget,
) -> Result<Packed<W>> {
    let abs = p.path.to_absolute();
    let zerr =
        |e: std::io::Error| CacheError::Store(format!("cannot compress the NAR of {abs}: {e}"));
    let file_out = HashingWriter::new(BufWriter::with_capacity(1 << 20, out));
    let mut z = zstd::Encoder::new(file_out, level).map_err(zerr)?;
    // Small NARs are many and compressed side by side already; a big one uses idle cores.
    let lease = (p.nar_size > MULTITHREAD_ABOVE).then(|| budget.take(ThreadBudget::cores_count()));
    if let Some(lease) = lease.as_ref().filter(|l| l.threads > 0) {
        z.multithread(u32::try_from(lease.threads).unwrap_or(1))
            .map_err(zerr)?;
    }
    let mut nar_out = HashingWriter::new(z);
    flotilla_store::encode_path(Path::new(&abs), &mut nar_out)
        .map_err(|e| CacheError::Store(format!("cannot read {abs} from the store: {e}")))?;
    let (z, nar) = nar_out.finish();
    let (mut buffered, file) = z.finish().map_err(zerr)?.finish();
    drop(lease);
    buffered.flush().map_err(zerr)?;
    let out = buffered.into_inner().map_err(|e| zerr(e.into_error()))?;
    if nar.hash != p.nar_hash || nar.size != p.nar_size {
        return Err(CacheError::Store(format!(
            "{abs} does not match what the Nix database records for it (NAR hash {} and {} bytes there, {} and {} bytes on disk): the store is corrupt; repair it with `nix-store --verify --check-contents --repair`",
            p.nar_hash, p.nar_size, nar.hash, nar.size
        )));
    }
    let file_b32 = base32::encode(file.hash.as_bytes());
    let mut references = p.references.clone();
    references.sort_by(|a, b| a.base_name().cmp(b.base_name()));
    let info = NarInfo {
        store_path: p.path.clone(),
        url: format!("nar/{file_b32}.nar.zst"),
        compression: "zstd".to_owned(),
        file_hash: Some(format!("sha256:{file_b32}")),
        file_size: Some(file.size),
        nar_hash: p.nar_hash,
        nar_size: p.nar_size,
        references,
        deriver: provenance
            .deriver
            .as_deref()
            .and_then(|d| StorePath::parse(d).ok())
            .map(|d| d.base_name().to_owned()),
        sigs: provenance.sigs.clone(),
        ca: provenance.ca.clone(),
        other: Vec::new(),
    };
    let mut file_sha256 = [0u8; 32];
    file_sha256.copy_from_slice(file.hash.as_bytes());
    Ok(Packed {
        out,
        info,
        file_sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_shares_its_threads_and_gets_them_back() {
        let budget = ThreadBudget::new(4);
        let a = budget.take(3);
        let b = budget.take(3);
        assert_eq!((a.threads, b.threads), (3, 1));
        assert_eq!(budget.take(1).threads, 0);
        drop(a);
        assert_eq!(budget.take(8).threads, 3);
    }
}
