//! `flotilla cache push`: publishes store paths with their closures to a binary cache, in the
//! layout `nix copy --to file://DIR?compression=zstd` writes and every Nix reads.
//!
//! Each path the cache lacks (no narinfo) is NAR-encoded from the host store, hashed on the
//! way (and checked against what the Nix database records), zstd-compressed once into a
//! staging file, and committed under `nar/<file hash>.nar.zst`; only then is its narinfo,
//! signed with the push key, written, and only after its references' narinfos are, so a
//! reader never sees a narinfo whose NAR or references are missing, and a push killed at any
//! moment leaves none either. Paths are encoded in parallel (threads); one big NAR is
//! compressed by zstd on the cores the other workers leave idle ([`super::nar`], shared with
//! `cache serve --store`, which writes the same narinfo for the same path). A narinfo
//! that is there already is left as it is, whoever signed it.
//!
//! Where the files go is a [`Destination`]: a directory ([`DirCache`]) or an S3 bucket
//! ([`super::s3::S3Cache`]).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flotilla_nix::PathInfo;
use flotilla_store::cache::{narinfo_url, CacheInfo, NarInfo, SecretKey};
use flotilla_store::StorePath;
use serde::Serialize;

use super::nar::{self, Provenance, ThreadBudget};
use super::{io_err, CacheError, Result};

/// The file Nix reads first from a cache.
pub const CACHE_INFO: &str = "nix-cache-info";

/// A compressed NAR being written, not yet visible under its final name. Dropped without
/// [`Destination::commit_nar`], its file is removed.
pub struct Staged {
    /// The open file the compressed NAR is written into.
    pub file: File,
    path: Option<PathBuf>,
}

impl Staged {
    /// A staging file at `path`, created by the caller (O_EXCL).
    pub fn new(file: File, path: PathBuf) -> Staged {
        Staged { file, path: Some(path) }
    }

    /// A staging file with no name in any directory: nothing to remove, ever.
    pub fn unnamed(file: File) -> Staged {
        Staged { file, path: None }
    }

    /// Its path; after this the file is the caller's to remove or rename.
    pub fn take_path(&mut self) -> PathBuf {
        self.path.take().expect("a staged file is committed once")
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = fs::remove_file(p);
        }
    }
}

/// Where a cache's files go. Small files are written whole and atomically; a NAR is staged
/// first and committed under its name once complete.
pub trait Destination: Sync {
    /// The cache, as the user named it (for messages).
    fn describe(&self) -> String;
    /// A small file's bytes (`nix-cache-info`, a narinfo), `None` when absent.
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Writes a small file, atomically: a reader sees the old state or all of the new file.
    fn put(&self, name: &str, bytes: &[u8], content_type: &str) -> Result<()>;
    /// A fresh staging file for a compressed NAR.
    fn stage(&self) -> Result<Staged>;
    /// Makes a staged NAR (flushed by the caller) durable and visible as `name`;
    /// `sha256` is its contents' digest.
    fn commit_nar(&self, staged: Staged, name: &str, sha256: &[u8; 32]) -> Result<()>;
}

/// A cache directory on this host (`file://` for Nix).
#[derive(Debug)]
pub struct DirCache {
    root: PathBuf,
    staged: AtomicUsize,
}

impl DirCache {
    /// Opens (creating it and its `nar/` when missing) the cache directory `root`.
    pub fn open(root: &Path) -> Result<DirCache> {
        let root = root.strip_prefix("file://").unwrap_or(root).to_owned();
        fs::create_dir_all(root.join("nar")).map_err(io_err("create the cache directory", &root))?;
        Ok(DirCache { root, staged: AtomicUsize::new(0) })
    }

    fn sync_dir(dir: &Path) -> Result<()> {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync", dir))
    }

    /// A name in the same directory as `name`, for a write that is renamed into place.
    fn temp_for(&self, name: &str) -> PathBuf {
        let n = self.staged.fetch_add(1, Ordering::Relaxed);
        let target = self.root.join(name);
        let dir = target.parent().unwrap_or(&self.root).to_owned();
        dir.join(format!(".tmp-{}-{n}", std::process::id()))
    }

    fn create_temp(&self, name: &str) -> Result<(File, PathBuf)> {
        let tmp = self.temp_for(name);
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        Ok((f, tmp))
    }
}

impl Destination for DirCache {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let p = self.root.join(name);
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::Io { what: "read", path: p, source: e }),
        }
    }

    fn put(&self, name: &str, bytes: &[u8], _content_type: &str) -> Result<()> {
        let (mut f, tmp) = self.create_temp(name)?;
        let dst = self.root.join(name);
        let written = f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io_err("write", &tmp));
        let renamed = written.and_then(|()| fs::rename(&tmp, &dst).map_err(io_err("rename into place", &dst)));
        if renamed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        renamed?;
        Self::sync_dir(dst.parent().unwrap_or(&self.root))
    }

    fn stage(&self) -> Result<Staged> {
        let (f, tmp) = self.create_temp("nar/x")?;
        Ok(Staged::new(f, tmp))
    }

    fn commit_nar(&self, mut staged: Staged, name: &str, _sha256: &[u8; 32]) -> Result<()> {
        staged.file.sync_all().map_err(io_err("sync", &self.root.join(name)))?;
        let dst = self.root.join(name);
        let tmp = staged.take_path();
        if let Err(e) = fs::rename(&tmp, &dst) {
            let _ = fs::remove_file(&tmp);
            return Err(CacheError::Io { what: "rename into place", path: dst, source: e });
        }
        Self::sync_dir(dst.parent().unwrap_or(&self.root))
    }
}

/// How to push.
#[derive(Debug, Clone, Copy)]
pub struct PushOptions {
    /// Paths encoded and compressed at once.
    pub parallel: usize,
    /// zstd level (3 is zstd's and Nix's default).
    pub level: i32,
}

impl Default for PushOptions {
    fn default() -> PushOptions {
        PushOptions { parallel: std::thread::available_parallelism().map_or(2, |n| n.get()), level: 3 }
    }
}

/// What a push did.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// The cache.
    pub cache: String,
    /// The key that signed what was pushed.
    pub key: String,
    /// Paths in the closure.
    pub paths: usize,
    /// Paths written (NAR and narinfo).
    pub pushed: usize,
    /// Paths the cache had already.
    pub skipped: usize,
    /// Of those, narinfos that the push key did not sign: left as they are.
    pub kept_foreign: Vec<StorePath>,
    /// Uncompressed NAR bytes of the paths pushed.
    pub nar_bytes: u64,
    /// Compressed bytes written.
    pub file_bytes: u64,
    /// Wall time.
    #[serde(serialize_with = "crate::secs")]
    pub elapsed: Duration,
}

/// One path pushed: its signed narinfo, and the sizes for the report.
struct Pushed {
    info: NarInfo,
    file_size: u64,
}

/// Pushes `closure` (every path's references in it too; [`flotilla_nix::Nix::closure_info`]
/// gives it) to `dest`, signed with `key`. `progress` hears one line per path written.
pub fn push(dest: &dyn Destination, key: &SecretKey, closure: &[PathInfo], opts: PushOptions, progress: &(dyn Fn(&str) + Sync)) -> Result<PushReport> {
    let start = Instant::now();
    let parallel = opts.parallel.max(1);
    ensure_cache_info(dest)?;

    // Which paths the cache has: a narinfo there means the path is there (that is Nix's rule).
    let present: Vec<Option<Vec<u8>>> = par_map(closure, parallel, |p| dest.get(&narinfo_url(&p.path)))?;
    let public = key.public();
    let mut kept_foreign = Vec::new();
    let mut published: HashSet<StorePath> = HashSet::new();
    let mut todo = Vec::new();
    for (p, got) in closure.iter().zip(present) {
        match got {
            Some(text) => {
                let ours = std::str::from_utf8(&text).ok().and_then(|t| NarInfo::parse(t).ok()).is_some_and(|i| {
                    let fp = i.fingerprint();
                    i.sigs.iter().any(|s| public.verifies(&fp, s))
                });
                if !ours {
                    kept_foreign.push(p.path.clone());
                }
                published.insert(p.path.clone());
            }
            None => todo.push(p),
        }
    }
    let skipped = closure.len() - todo.len();

    // Workers encode and compress; this thread publishes each narinfo once its references'
    // are out, so the cache is a closed set at every moment.
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Result<Pushed>>();
    // Each worker holds one core while it works; a big NAR borrows the idle ones.
    let budget = ThreadBudget::new(parallel.max(ThreadBudget::cores_count()));
    let provenance = provenances(&todo);
    let mut pending: HashMap<StorePath, NarInfo> = HashMap::new();
    let (mut pushed, mut nar_bytes, mut file_bytes) = (0usize, 0u64, 0u64);
    let mut first_error: Option<CacheError> = None;
    std::thread::scope(|s| {
        for _ in 0..parallel.min(todo.len()) {
            let tx = tx.clone();
            let (todo, next, stop, budget, provenance) = (&todo, &next, &stop, &budget, &provenance);
            s.spawn(move || {
                let _core = budget.take(1);
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = todo.get(i) else { return };
                    let r = push_nar(dest, key, p, &provenance[i], opts.level, budget);
                    if tx.send(r).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        for r in rx {
            match r {
                Ok(done) => {
                    nar_bytes += done.info.nar_size;
                    file_bytes += done.file_size;
                    pending.insert(done.info.store_path.clone(), done.info);
                    if let Err(e) = publish_ready(dest, &mut pending, &mut published, &mut pushed, progress) {
                        stop.store(true, Ordering::Relaxed);
                        first_error.get_or_insert(e);
                    }
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = first_error {
        return Err(stopped(dest, e, pushed));
    }
    if !pending.is_empty() {
        // Only when a reference is outside the closure given: a caller's bug, said plainly.
        let left: Vec<String> = pending.keys().map(StorePath::to_absolute).collect();
        return Err(CacheError::Store(format!("these paths' references are neither in the cache nor in the closure pushed, so their narinfos were not written: {}", left.join(", "))));
    }
    Ok(PushReport {
        cache: dest.describe(),
        key: key.name().to_owned(),
        paths: closure.len(),
        pushed,
        skipped,
        kept_foreign,
        nar_bytes,
        file_bytes,
        elapsed: start.elapsed(),
    })
}

fn stopped(dest: &dyn Destination, e: CacheError, pushed: usize) -> CacheError {
    let tail = format!("; the push to {} stopped after {pushed} complete paths (the cache is consistent: run it again to push the rest)", dest.describe());
    match e {
        CacheError::Io { what, path, source } => CacheError::Remote(format!("cannot {what} {}: {source}{tail}", path.display())),
        CacheError::Input(m) => CacheError::Input(m + &tail),
        CacheError::Store(m) => CacheError::Store(m + &tail),
        CacheError::Remote(m) => CacheError::Remote(m + &tail),
    }
}

/// Writes every pending narinfo whose references are all published, until none is left
/// that can be.
fn publish_ready(
    dest: &dyn Destination,
    pending: &mut HashMap<StorePath, NarInfo>,
    published: &mut HashSet<StorePath>,
    pushed: &mut usize,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<()> {
    loop {
        let ready: Vec<StorePath> = pending
            .iter()
            .filter(|(p, i)| i.references.iter().all(|r| r == *p || published.contains(r)))
            .map(|(p, _)| p.clone())
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        for p in ready {
            let info = pending.remove(&p).expect("listed above");
            dest.put(&narinfo_url(&p), info.to_text().as_bytes(), "text/x-nix-narinfo")?;
            published.insert(p);
            *pushed += 1;
            progress(&format!("pushed {} ({} NAR bytes)", info.store_path, info.nar_size));
        }
    }
}

/// Writes `nix-cache-info` when the cache has none; refuses a cache for another store.
fn ensure_cache_info(dest: &dyn Destination) -> Result<()> {
    match dest.get(CACHE_INFO)? {
        Some(text) => {
            let info = CacheInfo::parse(&String::from_utf8_lossy(&text))
                .map_err(|e| CacheError::Input(format!("{}'s {CACHE_INFO} cannot be read ({e}); is it a Nix binary cache?", dest.describe())))?;
            if info.store_dir != flotilla_store::STORE_DIR {
                return Err(CacheError::Input(format!(
                    "{} is a cache for the store {}, not {}; push to another cache",
                    dest.describe(),
                    info.store_dir,
                    flotilla_store::STORE_DIR
                )));
            }
            Ok(())
        }
        None => dest.put(CACHE_INFO, CacheInfo::flotilla().to_text().as_bytes(), "text/x-nix-cache-info"),
    }
}

/// Packs one path into a staged file ([`nar::pack`]: encoded, checked against the Nix
/// database's record, compressed), commits it, and returns its signed narinfo (not yet written).
fn push_nar(dest: &dyn Destination, key: &SecretKey, p: &PathInfo, provenance: &Provenance, level: i32, budget: &ThreadBudget) -> Result<Pushed> {
    let mut staged = dest.stage()?;
    let packed = nar::pack(p, provenance, &mut staged.file, level, budget)?;
    let (mut info, sha256) = (packed.info, packed.file_sha256);
    dest.commit_nar(staged, &info.url, &sha256)?;
    key.sign_narinfo(&mut info);
    let file_size = info.file_size.unwrap_or(0);
    Ok(Pushed { info, file_size })
}

/// What Nix's database holds of each path beyond [`PathInfo`] (deriver, CA, signatures), as
/// `cache serve --store` puts it in its narinfos; nothing when the database cannot be read
/// here (then the closure came from `nix path-info`, which flotilla does not ask for them).
fn provenances(todo: &[&PathInfo]) -> Vec<Provenance> {
    let db = flotilla_nix::StoreDb::open().ok();
    todo.iter()
        .map(|p| db.as_ref().and_then(|db| db.by_hash_part(p.path.hash_part()).ok().flatten()).map(Provenance::from).unwrap_or_default())
        .collect()
}

/// `f` over `items` on up to `n` threads, results in order; the first error wins.
fn par_map<T: Sync, R: Send>(items: &[T], n: usize, f: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let mut out: Vec<Option<Result<R>>> = (0..items.len()).map(|_| None).collect();
    let results = std::sync::Mutex::new(&mut out);
    std::thread::scope(|s| {
        for _ in 0..n.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                let r = f(item);
                results.lock().expect("no panics hold it")[i] = Some(r);
            });
        }
    });
    out.into_iter().map(|r| r.expect("every item was taken")).collect()
}
