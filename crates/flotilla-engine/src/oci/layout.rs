//! An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/<hex>`) written
//! blob by blob: each blob is streamed through its sha256 into a file created exclusively
//! under a temporary name in `blobs/sha256` (never through a link left there) and renamed to
//! its digest, so a crash leaves no blob whose name lies about its content. The index of
//! known layers (`flotilla-layers.json`, keyed by a layer's store paths, which never change
//! once built) lets a rebuild skip every layer whose blob is there already without reading
//! the store again.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Descriptor;

/// The file of the layout's index of known layers.
pub const LAYER_INDEX: &str = "flotilla-layers.json";

/// What a temporary file's name holds after its own name: `.flotilla-tmp-PID-START[-N]`, the
/// writing process and its start time, so that a file left by an interrupted build (a kill,
/// a crash, a power cut) is known for one once that process is gone, and removed.
const TMP_MARK: &str = ".flotilla-tmp-";

/// `.flotilla-tmp-PID-START` of this process.
fn tmp_suffix() -> String {
    format!("{TMP_MARK}{}-{}", std::process::id(), flotilla_proc::own_start_time().unwrap_or(0))
}

/// Whether `name` is a temporary file whose writer no longer runs: a name of this module's
/// (`...flotilla-tmp-PID-START[-N]`) or of before (`.flotilla-tmp-PID-N`, `.NAME.flotilla-PID`
/// with `old_mark`), whose process is gone (with its start time: a pid given to another
/// process since does not keep the file).
fn stale_tmp(name: &str, old_mark: Option<&str>) -> bool {
    let rest = match name.rsplit_once(TMP_MARK) {
        Some((before, rest)) if before.is_empty() || before.starts_with('.') => rest,
        _ => match old_mark.and_then(|m| name.strip_prefix('.')?.rsplit_once(m)) {
            Some((_, pid)) => return pid.parse().is_ok_and(|pid: u32| !flotilla_proc::alive(pid)),
            None => return false,
        },
    };
    let mut parts = rest.split('-').map(|p| p.parse::<u64>());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(pid)), Some(Ok(start)), Some(Ok(_)) | None) => !flotilla_proc::is_running(pid as u32, start),
        // `.flotilla-tmp-PID-N` (before the start time was in the name): the pid alone.
        (Some(Ok(pid)), _, _) => !flotilla_proc::alive(pid as u32),
        _ => false,
    }
}

/// Removes from `dir` the temporary files [`stale_tmp`] names (files and links only, never
/// followed); returns how many.
fn sweep(dir: &Path, old_mark: Option<&str>, only_for: Option<&str>) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if only_for.is_some_and(|f| !name.starts_with(&format!(".{f}."))) {
            continue;
        }
        let is_file = e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink());
        if is_file && stale_tmp(&name, old_mark) && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Counts and hashes what passes through.
pub struct HashWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashWriter<W> {
    /// Hashes what is written to `inner`.
    pub fn new(inner: W) -> HashWriter<W> {
        HashWriter { inner, hasher: Sha256::new(), size: 0 }
    }

    /// `sha256:<hex>`, the size, and the writer.
    pub fn finish(self) -> (String, u64, W) {
        (super::digest_of(self.hasher), self.size, self.inner)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A known layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Known {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
}

/// An image layout being written.
pub struct Layout {
    dir: PathBuf,
    known: BTreeMap<String, Known>,
    serial: u32,
}

fn creating(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new().write(true).create_new(true).mode(0o644).custom_flags(libc::O_NOFOLLOW).open(path)
}

impl Layout {
    /// Opens (making it) the layout at `dir`, with its index of known layers, and removes the
    /// temporary files of builds of it that were interrupted.
    pub fn open(dir: &Path) -> io::Result<Layout> {
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        for d in [dir.to_owned(), dir.join("blobs"), dir.join("blobs/sha256")] {
            if fs::symlink_metadata(&d)?.file_type().is_symlink() {
                return Err(io::Error::other(format!("{} is a symbolic link; an image layout is written only into real directories", d.display())));
            }
        }
        sweep(&dir.join("blobs/sha256"), None, None);
        sweep(dir, None, None);
        let known = match fs::read(dir.join(LAYER_INDEX)) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        Ok(Layout { dir: dir.to_owned(), known, serial: 0 })
    }

    /// The layout's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob of `digest` is.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
    }

    /// The layer known under `key` whose blob is in the layout, if any.
    pub fn known(&self, key: &str) -> Option<Known> {
        let k = self.known.get(key)?;
        let meta = fs::symlink_metadata(self.blob_path(&k.digest)).ok()?;
        (meta.is_file() && meta.len() == k.size).then(|| k.clone())
    }

    /// Writes a blob produced by `produce` and returns its descriptor; with `key`, records it
    /// as a known layer.
    pub fn write_blob(&mut self, media_type: &str, key: Option<&str>, produce: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>) -> io::Result<Descriptor> {
        self.serial += 1;
        let tmp = self.dir.join("blobs/sha256").join(format!("{}-{}", tmp_suffix(), self.serial));
        let written = (|| -> io::Result<Descriptor> {
            let mut w = HashWriter::new(BufWriter::new(creating(&tmp)?));
            produce(&mut w)?;
            let (digest, size, file) = w.finish();
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            fs::rename(&tmp, self.blob_path(&digest))?;
            Ok(Descriptor { media_type: media_type.to_owned(), digest, size })
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        let d = written?;
        if let Some(key) = key {
            self.known.insert(key.to_owned(), Known { digest: d.digest.clone(), size: d.size });
        }
        Ok(d)
    }

    /// Writes `bytes` as a blob.
    pub fn write_bytes(&mut self, media_type: &str, bytes: &[u8]) -> io::Result<Descriptor> {
        self.write_blob(media_type, None, &mut |w| w.write_all(bytes))
    }

    /// Replaces the file `name` of the layout by `bytes`, through a temporary file.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!(".{name}{}", tmp_suffix()));
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut f = creating(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, self.dir.join(name))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    /// Writes the index of known layers.
    pub fn save_known(&self) -> io::Result<()> {
        self.write_file(LAYER_INDEX, &serde_json::to_vec_pretty(&self.known).expect("serialises"))
    }
}

/// Writes the `docker load` archive of the image in `layout` to `dest` (through a temporary
/// file beside it): `manifest.json`, the config as `<hex>.json`, each layer as `<hex>.tar`.
pub fn write_docker_archive(layout: &Layout, config: &Descriptor, layers: &[Descriptor], repo_tag: &str, dest: &Path) -> io::Result<()> {
    use super::tar::{Kind, TarWriter};
    let hex = |d: &Descriptor| d.digest.trim_start_matches("sha256:").to_owned();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": format!("{}.json", hex(config)),
        "RepoTags": [repo_tag],
        "Layers": layers.iter().map(|l| format!("{}.tar", hex(l))).collect::<Vec<_>>(),
    }]))
    .expect("serialises");
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // An interrupted write of this archive left its temporary file beside it.
    sweep(dir, Some(".flotilla-"), Some(&name));
    let tmp = dir.join(format!(".{name}{}", tmp_suffix()));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut t = TarWriter::new(BufWriter::new(creating(&tmp)?));
        t.entry(b"manifest.json", 0o644, 0, 0, Kind::File { size: manifest.len() as u64, reader: &mut &manifest[..] })?;
        let mut seen = std::collections::BTreeSet::new();
        for (d, ext) in std::iter::once((config, "json")).chain(layers.iter().map(|l| (l, "tar"))) {
            if !seen.insert(d.digest.clone()) {
                continue;
            }
            let mut f = super::open_blob(&layout.dir, &layout.blob_path(&d.digest), d.size)?;
            t.entry(format!("{}.{ext}", hex(d)).as_bytes(), 0o644, 0, 0, Kind::File { size: d.size, reader: &mut f })?;
        }
        let f = t.finish()?.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, dest)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid that no process has: one of a process that ran and was reaped.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        assert!(!flotilla_proc::alive(pid));
        pid
    }

    /// An interrupted build leaves temporary files; the next open of the layout (and the next
    /// archive written beside one) removes those whose writer is gone, and only those.
    #[test]
    fn temporary_files_of_dead_builds_are_removed_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        let me = format!("{}-{}", std::process::id(), flotilla_proc::own_start_time().unwrap());
        let blobs = d.path().join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let stale = [
            blobs.join(format!(".flotilla-tmp-{dead}-3")),
            blobs.join(format!(".flotilla-tmp-{dead}-12345-1")),
            // Our own pid with another start time: a process of before that had this pid.
            blobs.join(format!(".flotilla-tmp-{}-1-1", std::process::id())),
            d.path().join(format!(".index.json.flotilla-tmp-{dead}")),
            d.path().join(format!(".flotilla-layers.json.flotilla-tmp-{dead}-99")),
        ];
        let kept = [blobs.join(format!(".flotilla-tmp-{me}-999")), d.path().join(format!(".index.json.flotilla-tmp-{me}")), blobs.join("abc"), d.path().join("notes.flotilla-tmp-x")];
        for f in stale.iter().chain(&kept) {
            fs::write(f, "x").unwrap();
        }
        let mut layout = Layout::open(d.path()).unwrap();
        for f in &stale {
            assert!(!f.exists(), "{} is left", f.display());
        }
        for f in &kept {
            assert!(f.exists(), "{} was removed", f.display());
        }

        let out = tempfile::tempdir().unwrap();
        let old = out.path().join(format!(".web.tar.flotilla-{dead}"));
        let new = out.path().join(format!(".web.tar.flotilla-tmp-{dead}-7"));
        let other = out.path().join(format!(".db.tar.flotilla-{dead}"));
        for f in [&old, &new, &other] {
            fs::write(f, "x").unwrap();
        }
        let config = layout.write_bytes("c", b"{}").unwrap();
        write_docker_archive(&layout, &config, &[], "web:v1", &out.path().join("web.tar")).unwrap();
        assert!(!old.exists() && !new.exists(), "the archive's stale temporary files are left");
        assert!(other.exists(), "another archive's file was removed");
        let names: Vec<_> = fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
