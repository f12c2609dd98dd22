//! A machine's root as the agent sees it: where its store, registry, profiles and runtime
//! links live, and the registry of valid store paths.
//!
//! The root is `/` on a real machine or inside a container, or any directory standing for a
//! machine's root (the test mode). A store path is valid when its registry entry exists under
//! `nix/var/flotilla/db/`; the entry is written only after the path was unpacked, checked
//! against its NAR hash and renamed into place, so a crash never leaves a path that looks
//! valid. Targets need no Nix: this registry is the agent's own.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use flotilla_protocol::PathInfo;
use flotilla_store::{HashingReader, NarHash, StorePath};
use serde::{Deserialize, Serialize};

/// A machine's root directory and the agent's layout inside it.
#[derive(Debug, Clone)]
pub struct MachineRoot {
    root: PathBuf,
}

/// What the registry records of a valid path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// `sha256:<nix-base32>` of its NAR.
    pub nar_hash: NarHash,
    /// NAR size.
    pub nar_size: u64,
    /// Direct references.
    pub references: Vec<StorePath>,
    /// The path was already in the host's Nix store; not ours to delete.
    #[serde(default)]
    pub foreign: bool,
}

/// Why receiving paths failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Filesystem trouble on the machine.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The bytes were not what the deployer announced.
    #[error("{path}: {problem}")]
    Integrity {
        /// The store path.
        path: StorePath,
        /// What did not match.
        problem: String,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ReceiveError {
    let path = path.to_owned();
    move |source| ReceiveError::Io { what, path, source }
}

impl MachineRoot {
    /// The layout under `root`.
    pub fn new(root: &Path) -> MachineRoot {
        MachineRoot { root: root.to_owned() }
    }

    /// The root itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// An absolute machine path (`/etc/motd`) as a path on this host.
    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// `/nix/store` on the machine.
    pub fn store_dir(&self) -> PathBuf {
        self.path(flotilla_store::STORE_DIR)
    }

    /// A store path on the machine.
    pub fn store_path(&self, p: &StorePath) -> PathBuf {
        p.under_root(&self.root)
    }

    /// The agent's own state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.path("/nix/var/flotilla")
    }

    fn registry_dir(&self) -> PathBuf {
        self.state_dir().join("db")
    }

    /// Where system generations are linked.
    pub fn profiles_dir(&self) -> PathBuf {
        self.state_dir().join("profiles")
    }

    /// The control socket inside the machine.
    pub fn socket_path(&self) -> PathBuf {
        self.path("/run/flotilla/agent.sock")
    }

    /// Where service logs go.
    pub fn log_dir(&self) -> PathBuf {
        self.path("/var/log/flotilla")
    }

    /// Creates the directories the agent needs and removes leftovers of interrupted
    /// transfers (partial unpacks, and store entries that never got registered).
    pub fn prepare(&self) -> io::Result<()> {
        for d in [self.store_dir(), self.registry_dir(), self.profiles_dir(), self.path("/run/flotilla"), self.log_dir(), self.path("/etc")] {
            fs::create_dir_all(&d)?;
        }
        for entry in fs::read_dir(self.store_dir())?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".flotilla-partial-") {
                remove_tree(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Whether `p` is valid here: registered and present.
    pub fn is_valid(&self, p: &StorePath) -> bool {
        self.registry_dir().join(p.base_name()).exists() && fs::symlink_metadata(self.store_path(p)).is_ok()
    }

    /// The registration of a valid path.
    pub fn registration(&self, p: &StorePath) -> Option<Registration> {
        let text = fs::read_to_string(self.registry_dir().join(p.base_name())).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Every registered path.
    pub fn valid_paths(&self) -> io::Result<Vec<StorePath>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.registry_dir())?.flatten() {
            if let Ok(p) = StorePath::from_base_name(&e.file_name().to_string_lossy()) {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Which of `paths` are not valid here.
    pub fn missing(&self, paths: &[StorePath]) -> Vec<StorePath> {
        paths.iter().filter(|p| !self.is_valid(p)).cloned().collect()
    }

    /// The closure of `roots` according to the registry.
    pub fn closure(&self, roots: &[StorePath]) -> BTreeSet<StorePath> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<StorePath> = roots.to_vec();
        while let Some(p) = todo.pop() {
            if seen.insert(p.clone()) {
                if let Some(r) = self.registration(&p) {
                    todo.extend(r.references.into_iter().filter(|q| !seen.contains(q)));
                }
            }
        }
        seen
    }

    /// Receives `paths` from `stream` (their NARs back to back, in order): each is unpacked to
    /// a temporary name, checked against its announced hash and size, renamed into place and
    /// only then registered. The whole stream is read even after an error, so the protocol
    /// stays in step. Returns (paths, NAR bytes) added.
    pub fn receive(&self, paths: &[PathInfo], stream: &mut dyn Read) -> Result<(u64, u64), ReceiveError> {
        let mut first_error = None;
        let mut added = (0u64, 0u64);
        let mut batch: BTreeSet<StorePath> = BTreeSet::new();
        for info in paths {
            let mut limited = stream.take(info.nar_size);
            if first_error.is_none() {
                match self.receive_one(info, &mut limited, &batch) {
                    Ok(()) => {
                        added.0 += 1;
                        added.1 += info.nar_size;
                        batch.insert(info.path.clone());
                    }
                    Err(e) => first_error = Some(e),
                }
            }
            // Whatever the outcome, consume this path's bytes.
            io::copy(&mut limited, &mut io::sink()).map_err(io("cannot read the stream for", &self.store_path(&info.path)))?;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(added),
        }
    }

    fn receive_one(&self, info: &PathInfo, input: &mut dyn Read, batch: &BTreeSet<StorePath>) -> Result<(), ReceiveError> {
        let integrity = |problem: String| ReceiveError::Integrity { path: info.path.clone(), problem };
        let announced = info.nar_hash;
        for r in &info.references {
            if r != &info.path && !batch.contains(r) && !self.is_valid(r) {
                return Err(integrity(format!("refers to {r}, which the machine does not have and which was not sent before it")));
            }
        }
        let dest = self.store_path(&info.path);
        let tmp = self.store_dir().join(format!(".flotilla-partial-{}-{}", std::process::id(), info.path.base_name()));
        if fs::symlink_metadata(&tmp).is_ok() {
            remove_tree(&tmp).map_err(io("cannot remove", &tmp))?;
        }
        let mut hashing = HashingReader::new(input);
        let decoded = flotilla_store::decode_to_path(&mut hashing, &tmp, flotilla_store::DecodeOptions { canonicalise: true, exact_end: false });
        if let Err(e) = decoded {
            let _ = remove_tree(&tmp);
            return Err(integrity(format!("bad NAR: {e}")));
        }
        let (_, digest) = hashing.finish();
        if digest.size != info.nar_size || digest.hash != announced {
            let _ = remove_tree(&tmp);
            return Err(integrity(format!(
                "received {} bytes hashing to {}, expected {} bytes hashing to {}",
                digest.size, digest.hash, info.nar_size, announced
            )));
        }
        // A leftover at the final name was never registered (a crash between rename and
        // registration): it is replaced.
        if fs::symlink_metadata(&dest).is_ok() {
            remove_tree(&dest).map_err(io("cannot replace unregistered", &dest))?;
        }
        fs::rename(&tmp, &dest).map_err(io("cannot move into place", &dest))?;
        let reg = Registration { nar_hash: announced, nar_size: info.nar_size, references: info.references.clone(), foreign: false };
        write_atomic(&self.registry_dir().join(info.path.base_name()), serde_json::to_string(&reg).expect("serialises").as_bytes())
            .map_err(io("cannot register", &dest))?;
        Ok(())
    }

    /// Removes a path from the store and the registry (registry first: an interrupted removal
    /// leaves an unregistered path, which the next copy replaces).
    pub fn remove_path(&self, p: &StorePath) -> io::Result<u64> {
        let size = self.registration(p).map(|r| r.nar_size).unwrap_or(0);
        match fs::remove_file(self.registry_dir().join(p.base_name())) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        remove_tree(&self.store_path(p))?;
        Ok(size)
    }

    /// Reads a JSON file of the agent's state, or the default when it does not exist.
    pub fn read_state<T: for<'de> Deserialize<'de> + Default>(&self, name: &str) -> io::Result<T> {
        match fs::read_to_string(self.state_dir().join(name)) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes a JSON file of the agent's state atomically.
    pub fn write_state<T: Serialize>(&self, name: &str, value: &T) -> io::Result<()> {
        write_atomic(&self.state_dir().join(name), serde_json::to_string_pretty(value).expect("serialises").as_bytes())
    }
}

/// Bytes available to the agent on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    crate::supervisor::sys::free_bytes(path)
}

/// Writes `path` through a temporary file and a rename, so readers see old or new, never half.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    if fs::read(path).is_ok_and(|old| old == data) {
        return Ok(()); // a redeploy of the same system rewrites nothing
    }
    let tmp = path.with_file_name(format!(".{}.tmp-{}", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    fs::write(&tmp, data)?;
    fs::rename(&tmp, path)
}

/// Points symlink `link` at `target` atomically (a new link renamed over the old).
pub fn symlink_atomic(target: &Path, link: &Path) -> io::Result<()> {
    if fs::read_link(link).is_ok_and(|old| old == target) {
        return Ok(());
    }
    let tmp = link.with_file_name(format!(".{}.tmp-{}", link.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, link)
}

/// Removes a file, symlink or tree, making read-only store directories writable first.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        for e in fs::read_dir(path)? {
            remove_tree(&e?.path())?;
        }
        fs::remove_dir(path)
    } else {
        fs::remove_file(path)
    }
}
