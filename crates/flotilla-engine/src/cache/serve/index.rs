//! A cache directory as the server sees it: its narinfos in memory (each kept as the whole
//! HTTP response, so a hit is one write), its NARs opened on demand. The directory may be
//! written by someone else (a `flotilla cache push` into it while serving, or a user less
//! privileged than the server): every name is opened beneath the directory's descriptor with
//! `O_NOFOLLOW`, only regular files are served, and a narinfo must describe the path its name
//! says. A narinfo missing from memory is looked for on disk before a 404, so what a push adds
//! while serving is served at its first request (one failed `openat` per miss). A narinfo in
//! memory is checked against its file at most once a second (one `fstatat` beneath the
//! directory: device, inode, size, mtime, ctime): one replaced on disk (a later push re-signing
//! it, renamed into place, or rewritten in place) is read again, one deleted is forgotten and
//! answered 404, within a second.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use flotilla_store::cache::{CacheInfo, NarInfo, SecretKey};

use super::sys;
use super::ServeError;

/// The largest narinfo read (a path with tens of thousands of references stays well below).
const MAX_NARINFO: u64 = 1 << 20;

/// A prepared response: status line, headers, body.
pub(super) struct Prepared {
    /// The whole response to a GET.
    pub bytes: Vec<u8>,
    /// How much of it a HEAD gets (the head).
    pub head_len: usize,
}

impl Prepared {
    fn new(content_type: &str, body: &[u8]) -> Prepared {
        let mut bytes = format!("HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        let head_len = bytes.len();
        bytes.extend_from_slice(body);
        Prepared { bytes, head_len }
    }
}

/// How long a narinfo is served from memory before its file is looked at again.
const RECHECK_MS: u64 = 1000;

/// What identifies a version of a file: a rename over it changes the inode, a write in place
/// the ctime (which no one can set back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    regular: bool,
}

impl Stamp {
    fn of_metadata(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt as _;
        Stamp { dev: m.dev(), ino: m.ino(), size: m.size(), mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()), regular: m.is_file() }
    }

    #[allow(clippy::unnecessary_cast)] // the stat fields' types differ between targets
    fn of_stat(st: &libc::stat) -> Stamp {
        Stamp {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            size: st.st_size as u64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as i64),
            regular: st.st_mode & libc::S_IFMT == libc::S_IFREG,
        }
    }
}

/// A narinfo in memory: its response, the file it was read from, when that was last checked.
struct Entry {
    prepared: Arc<Prepared>,
    stamp: Stamp,
    /// Milliseconds since the directory was opened.
    checked: AtomicU64,
}

/// An open cache directory.
pub(super) struct CacheDir {
    dir: File,
    path: PathBuf,
    nar: Mutex<Option<Arc<File>>>,
    narinfos: RwLock<HashMap<String, Arc<Entry>>>,
    key: Option<SecretKey>,
    cache_info: Prepared,
    opened: Instant,
}

impl CacheDir {
    /// Opens `path` (not through a link) and loads every narinfo in it.
    pub(super) fn open(path: &Path, key: Option<SecretKey>, priority: Option<u32>) -> Result<CacheDir, ServeError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| ServeError::Dir { path: path.to_owned(), reason: e.to_string() })?;
        if key.is_some() {
            // What is signed here is whatever the directory holds: only this user may put it
            // there. Checked on the descriptors served from, so nothing can be swapped in between.
            let mut dirs = vec![(path.to_owned(), dir.try_clone().map_err(|e| ServeError::Dir { path: path.to_owned(), reason: e.to_string() })?)];
            if let Ok(nar) = sys::open_dir_beneath(&dir, "nar") {
                dirs.push((path.join("nar"), nar));
            }
            for (p, d) in dirs {
                let meta = d.metadata().map_err(|e| ServeError::Dir { path: p.clone(), reason: e.to_string() })?;
                if !private(&meta) {
                    return Err(ServeError::Dir {
                        path: p,
                        reason: "is writable by other users than the server's (or owned by another), and --key would sign whatever they put there; make it yours and not group- or world-writable (chown, chmod go-w), or sign when pushing (`flotilla cache push --key`) and serve without --key".into(),
                    });
                }
            }
        }
        let mut info = match sys::open_file_beneath(&dir, "nix-cache-info") {
            Ok(mut f) => {
                let mut text = String::new();
                (&mut f).take(MAX_NARINFO).read_to_string(&mut text).map_err(|e| ServeError::Dir { path: path.join("nix-cache-info"), reason: e.to_string() })?;
                CacheInfo::parse(&text).map_err(|e| ServeError::Dir { path: path.join("nix-cache-info"), reason: e.to_string() })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CacheInfo::flotilla(),
            Err(e) => return Err(ServeError::Dir { path: path.join("nix-cache-info"), reason: e.to_string() }),
        };
        if info.store_dir != flotilla_store::STORE_DIR {
            return Err(ServeError::Dir {
                path: path.join("nix-cache-info"),
                reason: format!("holds paths of the store {}, not {}; serve a cache of {} paths", info.store_dir, flotilla_store::STORE_DIR, flotilla_store::STORE_DIR),
            });
        }
        if priority.is_some() {
            info.priority = priority;
        }
        let cache_info = Prepared::new("text/x-nix-cache-info", info.to_text().as_bytes());
        let cache = CacheDir { dir, path: path.to_owned(), nar: Mutex::new(None), narinfos: RwLock::new(HashMap::new()), key, cache_info, opened: Instant::now() };
        cache.load_all();
        Ok(cache)
    }

    /// The directory's descriptor (the store source writes beneath it).
    pub(super) fn dir(&self) -> &File {
        &self.dir
    }

    /// The directory, for messages.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// How many narinfos are in memory.
    pub(super) fn len(&self) -> usize {
        self.narinfos.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// `nix-cache-info`.
    pub(super) fn cache_info(&self) -> &Prepared {
        &self.cache_info
    }

    fn load_all(&self) {
        use std::os::fd::AsRawFd as _;
        // Listing through our descriptor reads the directory we opened, whatever its path is now.
        let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", self.dir.as_raw_fd())) else { return };
        for entry in entries.flatten() {
            if let Some(hash) = entry.file_name().to_str().and_then(|n| n.strip_suffix(".narinfo")) {
                if valid_hash_part(hash) {
                    self.load(hash);
                }
            }
        }
    }

    /// The narinfo of the path with this hash part: from memory (its file checked at most once
    /// a second), else from disk.
    pub(super) fn narinfo(&self, hash: &str) -> Option<Arc<Prepared>> {
        let entry = self.narinfos.read().unwrap_or_else(|p| p.into_inner()).get(hash).map(Arc::clone);
        let Some(entry) = entry else { return self.load(hash) };
        let now = self.opened.elapsed().as_millis() as u64;
        let checked = entry.checked.load(Ordering::Relaxed);
        if now.saturating_sub(checked) < RECHECK_MS
            // One request checks; those arriving meanwhile are answered from memory.
            || entry.checked.compare_exchange(checked, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return Some(Arc::clone(&entry.prepared));
        }
        match sys::stat_beneath(&self.dir, &format!("{hash}.narinfo")) {
            Ok(st) if Stamp::of_stat(&st) == entry.stamp => Some(Arc::clone(&entry.prepared)),
            _ => {
                // Replaced or deleted: forget this version (unless another request already
                // did and loaded a newer one), then read what is there now.
                let mut map = self.narinfos.write().unwrap_or_else(|p| p.into_inner());
                if map.get(hash).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                    map.remove(hash);
                }
                drop(map);
                self.load(hash)
            }
        }
    }

    /// Reads `<hash>.narinfo` from disk into memory; `None` when it is missing or not a
    /// narinfo of that path (said on stderr: the cache holds something it should not).
    pub(super) fn load(&self, hash: &str) -> Option<Arc<Prepared>> {
        let name = format!("{hash}.narinfo");
        let file = sys::open_file_beneath(&self.dir, &name).ok()?;
        if self.key.is_some() && !file.metadata().is_ok_and(|m| private(&m)) {
            eprintln!("warning: {} not served: --key signs it, but it is another user's or others may write it", self.path.join(&name).display());
            return None;
        }
        let (text, stamp) = match read_regular(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("warning: {} not served: {e}", self.path.join(&name).display());
                return None;
            }
        };
        let mut info = match NarInfo::parse(&text) {
            Ok(i) if i.store_path.hash_part() == hash => i,
            Ok(i) => {
                eprintln!("warning: {} not served: it describes {}, another path", self.path.join(&name).display(), i.store_path);
                return None;
            }
            Err(e) => {
                eprintln!("warning: {} not served: {e}", self.path.join(&name).display());
                return None;
            }
        };
        let body = match &self.key {
            Some(key) => {
                key.sign_narinfo(&mut info);
                info.to_text()
            }
            None => text,
        };
        let prepared = Arc::new(Prepared::new("text/x-nix-narinfo", body.as_bytes()));
        let checked = AtomicU64::new(self.opened.elapsed().as_millis() as u64);
        let entry = Arc::new(Entry { prepared: Arc::clone(&prepared), stamp, checked });
        self.narinfos.write().unwrap_or_else(|p| p.into_inner()).insert(hash.to_owned(), entry);
        Some(prepared)
    }

    /// Opens `nar/<name>`: a regular file, reached without following a link.
    pub(super) fn open_nar(&self, name: &str) -> Option<File> {
        let nar = {
            let mut slot = self.nar.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = sys::open_dir_beneath(&self.dir, "nar").ok().map(Arc::new);
            }
            Arc::clone(slot.as_ref()?)
        };
        let file = sys::open_file_beneath(&nar, name).ok()?;
        file.metadata().ok()?.is_file().then_some(file)
    }
}

/// Whether what `meta` describes is this process's user's and not group- or world-writable:
/// the only files and directories `--key` signs from.
pub(super) fn private(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    Some(meta.uid()) == me && meta.mode() & 0o022 == 0
}

/// The text of a regular file and the stamp of the version read.
fn read_regular(file: File) -> std::io::Result<(String, Stamp)> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_NARINFO).read_to_string(&mut text)?;
    Ok((text, Stamp::of_metadata(&meta)))
}

/// Whether `s` is a store path's hash part: 32 nix-base32 characters.
pub(super) fn valid_hash_part(s: &str) -> bool {
    s.len() == flotilla_store::HASH_LEN && s.bytes().all(|b| flotilla_store::NIX_BASE32_CHARS.contains(&b))
}
