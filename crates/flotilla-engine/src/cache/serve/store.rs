//! Serving this host's store: a narinfo the cache directory lacks is made on its first
//! request from Nix's database (read in process), its NAR encoded from the store, checked
//! against the NAR hash Nix recorded, compressed with zstd once, and written into the cache
//! directory (NAR first, then the narinfo, each under a temporary name renamed into place, so
//! a server killed midway leaves no narinfo without its NAR). From then on it is served from
//! disk like any pushed cache. Nothing is spawned: no `nix` process per request. Requests for
//! a path being made wait for it instead of making it again: a path is compressed once however
//! many clients ask for it at once (with `--verbose`, one line says so per path made).

use std::collections::HashSet;
use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use flotilla_nix::{StoreDb, StoreRow};
use flotilla_store::cache::NarInfo;
use flotilla_store::{HashingWriter, StorePath};

use super::index::CacheDir;
use super::sys;

/// zstd's level for NARs made here (Nix's default for `compression=zstd`).
const ZSTD_LEVEL: i32 = 3;

/// Temporary files in the cache directory start with this; any left by a killed server are
/// removed at start.
pub(super) const TMP_PREFIX: &str = ".tmp-";

/// The host store as a source of narinfos and NARs.
pub(super) struct StoreSource {
    dbs: Mutex<Vec<StoreDb>>,
    busy: Mutex<HashSet<String>>,
    done: Condvar,
    counter: AtomicU64,
    verbose: bool,
}

impl StoreSource {
    /// Checks that Nix's database can be read.
    pub(super) fn open(verbose: bool) -> Result<StoreSource, String> {
        let db = StoreDb::open()?;
        Ok(StoreSource { dbs: Mutex::new(vec![db]), busy: Mutex::new(HashSet::new()), done: Condvar::new(), counter: AtomicU64::new(0), verbose })
    }

    fn lookup(&self, hash: &str) -> Result<Option<StoreRow>, String> {
        let db = self.dbs.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let db = match db {
            Some(db) => db,
            None => StoreDb::open()?,
        };
        let found = db.by_hash_part(hash);
        self.dbs.lock().unwrap_or_else(|p| p.into_inner()).push(db);
        found
    }

    /// Writes `<hash>.narinfo` and its NAR into `cache` when the store has that path; false
    /// when it has not. One request at a time makes a given path; others wait for it.
    pub(super) fn fill(&self, cache: &CacheDir, hash: &str) -> Result<bool, String> {
        {
            let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
            if busy.contains(hash) {
                while busy.contains(hash) {
                    busy = self.done.wait(busy).unwrap_or_else(|p| p.into_inner());
                }
                return Ok(true); // made by the other request (or failed there: the caller looks)
            }
            busy.insert(hash.to_owned());
        }
        // A request that missed just as another finished making this path finds it made.
        let made = sys::stat_beneath(cache.dir(), &format!("{hash}.narinfo")).is_ok();
        let result = if made {
            Ok(true)
        } else {
            self.lookup(hash).and_then(|row| match row {
                Some(row) => self.make(cache, &row).map(|()| true),
                None => Ok(false),
            })
        };
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(hash);
        self.done.notify_all();
        result
    }

    fn tmp_name(&self, hash: &str) -> String {
        format!("{TMP_PREFIX}{hash}-{}-{}", std::process::id(), self.counter.fetch_add(1, Ordering::Relaxed))
    }

    fn make(&self, cache: &CacheDir, row: &StoreRow) -> Result<(), String> {
        let path = &row.info.path;
        let started = std::time::Instant::now();
        let hash = path.hash_part();
        let nar_dir = sys::open_dir_beneath(cache.dir(), "nar").map_err(|e| format!("{}/nar: {e}", cache.path().display()))?;
        let tmp = self.tmp_name(hash);
        let written = (|| -> Result<(String, u64), String> {
            let file = sys::create_beneath(&nar_dir, &tmp).map_err(|e| format!("{}/nar/{tmp}: {e}", cache.path().display()))?;
            let compressed = HashingWriter::new(file);
            let zstd = zstd::Encoder::new(compressed, ZSTD_LEVEL).map_err(|e| e.to_string())?;
            let mut nar = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, zstd));
            flotilla_store::encode_path(&path.under_root(std::path::Path::new("/")), &mut nar).map_err(|e| format!("{path}: {e}"))?;
            nar.flush().map_err(|e| e.to_string())?;
            let (buffered, digest) = nar.finish();
            if digest.hash != row.info.nar_hash || digest.size != row.info.nar_size {
                return Err(format!("{path} differs from what Nix recorded of it (NAR hash {} size {}, recorded {} size {}): run `nix-store --verify-path {path}`", digest.hash, digest.size, row.info.nar_hash, row.info.nar_size));
            }
            let zstd = buffered.into_inner().map_err(|e| e.to_string())?;
            let compressed = zstd.finish().map_err(|e| e.to_string())?;
            let (file, file_digest): (File, _) = compressed.finish();
            file.sync_all().map_err(|e| e.to_string())?;
            Ok((flotilla_store::base32::encode(file_digest.hash.as_bytes()), file_digest.size))
        })();
        let (file_hash, file_size) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = sys::unlink_beneath(&nar_dir, &tmp);
                return Err(e);
            }
        };
        let nar_name = format!("{file_hash}.nar.zst");
        sys::rename_beneath(&nar_dir, &tmp, &nar_name).map_err(|e| format!("{}/nar/{nar_name}: {e}", cache.path().display()))?;
        let mut references = row.info.references.clone();
        references.sort_by(|a, b| a.base_name().cmp(b.base_name()));
        let info = NarInfo {
            store_path: path.clone(),
            url: format!("nar/{nar_name}"),
            compression: "zstd".into(),
            file_hash: Some(format!("sha256:{file_hash}")),
            file_size: Some(file_size),
            nar_hash: row.info.nar_hash,
            nar_size: row.info.nar_size,
            references,
            deriver: row.deriver.as_deref().and_then(|d| StorePath::parse(d).ok()).map(|d| d.base_name().to_owned()),
            sigs: row.sigs.clone(),
            ca: row.ca.clone(),
            other: Vec::new(),
        };
        let tmp = self.tmp_name(hash);
        let name = format!("{hash}.narinfo");
        let write = || -> std::io::Result<()> {
            let mut f = sys::create_beneath(cache.dir(), &tmp)?;
            f.write_all(info.to_text().as_bytes())?;
            f.sync_all()?;
            sys::rename_beneath(cache.dir(), &tmp, &name)
        };
        write().map_err(|e| {
            let _ = sys::unlink_beneath(cache.dir(), &tmp);
            format!("{}/{name}: {e}", cache.path().display())
        })?;
        if self.verbose {
            eprintln!("made {name} and nar/{nar_name} of {path} ({} NAR bytes, {file_size} compressed) in {:.2} s", row.info.nar_size, started.elapsed().as_secs_f64());
        }
        Ok(())
    }
}

/// Removes the temporary files a killed server left in `cache` and its `nar/`.
pub(super) fn remove_leftovers(cache: &CacheDir) {
    use std::os::fd::AsRawFd as _;
    let mut dirs = vec![(None, format!("/proc/self/fd/{}", cache.dir().as_raw_fd()))];
    let nar = sys::open_dir_beneath(cache.dir(), "nar").ok();
    if let Some(nar) = &nar {
        dirs.push((Some(nar), format!("/proc/self/fd/{}", nar.as_raw_fd())));
    }
    for (dir, listing) in dirs {
        let Ok(entries) = std::fs::read_dir(listing) else { continue };
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str().filter(|n| n.starts_with(TMP_PREFIX)) {
                let _ = sys::unlink_beneath(dir.unwrap_or(cache.dir()), name);
            }
        }
    }
}
