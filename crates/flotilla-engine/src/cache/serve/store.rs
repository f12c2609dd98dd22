//! Serving this host's store: a narinfo the cache directory lacks is made on its first
//! request from Nix's database (read in process), its NAR encoded from the store, checked
//! against the NAR hash Nix recorded, compressed with zstd once ([`super::super::nar::pack`],
//! as `cache push` does), and written into the cache
//! directory (NAR first, then the narinfo, each under a temporary name renamed into place, so
//! a server killed midway leaves no narinfo without its NAR). From then on it is served from
//! disk like any pushed cache. Nothing is spawned: no `nix` process per request. Requests for
//! a path being made wait for it instead of making it again: a path is compressed once however
//! many clients ask for it at once (with `--verbose`, one line says so per path made).

use std::collections::HashSet;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use flotilla_nix::{StoreDb, StoreRow};
use flotilla_store::cache::NarInfo;

use super::super::nar::{self, Provenance, ThreadBudget};

use super::index::CacheDir;
use super::sys;

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
    /// Threads for compressing big NARs, shared by the requests making paths at once.
    budget: ThreadBudget,
}

impl StoreSource {
    /// Checks that Nix's database can be read.
    pub(super) fn open(verbose: bool) -> Result<StoreSource, String> {
        let db = StoreDb::open()?;
        Ok(StoreSource { dbs: Mutex::new(vec![db]), busy: Mutex::new(HashSet::new()), done: Condvar::new(), counter: AtomicU64::new(0), verbose, budget: ThreadBudget::new(ThreadBudget::cores_count()) })
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
        let written = (|| -> Result<NarInfo, String> {
            let file = sys::create_beneath(&nar_dir, &tmp).map_err(|e| format!("{}/nar/{tmp}: {e}", cache.path().display()))?;
            let provenance = Provenance::from(row.clone());
            let packed = nar::pack(&row.info, &provenance, file, nar::ZSTD_LEVEL, &self.budget).map_err(|e| e.to_string())?;
            packed.out.sync_all().map_err(|e| e.to_string())?;
            Ok(packed.info)
        })();
        let info = match written {
            Ok(info) => info,
            Err(e) => {
                let _ = sys::unlink_beneath(&nar_dir, &tmp);
                return Err(e);
            }
        };
        let nar_name = info.url.strip_prefix("nar/").unwrap_or(&info.url).to_owned();
        sys::rename_beneath(&nar_dir, &tmp, &nar_name).map_err(|e| format!("{}/nar/{nar_name}: {e}", cache.path().display()))?;
        let file_size = info.file_size.unwrap_or(0);
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
