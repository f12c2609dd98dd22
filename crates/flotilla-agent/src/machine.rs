//! A machine's root as the agent sees it: where its store, registry, profiles and runtime
//! links live, and the registry of valid store paths.
//!
//! The root is `/` on a real machine or inside a container, or any directory standing for a
//! machine's root (the test mode). A store path is valid when its registry entry exists under
//! `nix/var/flotilla/db/`; the entry is written only after the path was unpacked, checked
//! against its NAR hash and renamed into place, so a crash never leaves a path that looks
//! valid. Targets need no Nix: this registry is the agent's own.
//!
//! A machine may have Nix of its own (`/nix/var/nix/db` exists), with its own paths in
//! `/nix/store`. The agent must never replace or delete those: a path the deployer sends that
//! is already there with the announced NAR hash is kept and registered as `foreign`, and one
//! that differs is an integrity error. Since Nix's garbage collector deletes whatever its own
//! database does not hold valid, the agent also registers what it received with that Nix
//! (`nix-store --register-validity`), when it manages the root it runs in (`/`): with
//! `--root DIR` the Nix it would find is the host's, not the machine's, and it does not.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use flotilla_protocol::{layout, PathInfo};
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
    /// The path was on the machine already, in the store of the machine's own Nix, when the
    /// deployer sent it: it is Nix's, and the agent never deletes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub foreign: bool,
}

/// What became of one path received.
enum Received {
    /// Unpacked (or found at its final name with the announced hash) and registered.
    Added,
    /// Valid here already, with the announced hash; its bytes were skipped.
    AlreadyValid,
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
    /// The machine's store would not take a path: its disk is full, out of quota or
    /// read-only. Nothing of the path is left behind.
    #[error("{}", disk_problem(path, *nar_size, source))]
    Disk {
        /// The store path.
        path: StorePath,
        /// Its NAR size, about what it needs on disk.
        nar_size: u64,
        /// What the filesystem said.
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
    /// The paths were received, but the machine's Nix would not take them.
    #[error("the paths were received, but {0}")]
    Nix(NixError),
}

fn disk_problem(path: &StorePath, nar_size: u64, source: &io::Error) -> String {
    let mib = nar_size.div_ceil(1 << 20);
    match source.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => format!(
            "this machine's disk is full: {path} (about {mib} MiB) does not fit in its /nix/store ({source}); free space on the machine, or give it a bigger disk, and deploy again"
        ),
        io::ErrorKind::ReadOnlyFilesystem => {
            format!("this machine's /nix/store is on a read-only filesystem, so {path} cannot be written ({source}); make it writable and deploy again")
        }
        _ => format!("cannot write {path} to this machine's /nix/store: {source}"),
    }
}

/// Why registering paths with the machine's own Nix failed.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    /// `nix-store` could not be run.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It ran and failed.
    #[error("{program} --register-validity failed: {stderr}")]
    Failed {
        /// The program.
        program: PathBuf,
        /// What it said (and how it ended).
        stderr: String,
    },
}

/// What [`MachineRoot::receive`] unpacked: (paths, NAR bytes) added, the paths added, and the
/// first error.
type Unpacked = ((u64, u64), BTreeSet<StorePath>, Option<ReceiveError>);

/// Runs a program (argv) with stdin from a file; answers whether it exited 0, and its stderr.
pub type NixRunner<'a> = dyn Fn(&[String], &Path) -> io::Result<(bool, String)> + Sync + 'a;

/// What [`MachineRoot::register_with_nix`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum NixRegistration {
    /// The machine has no Nix of its own, or the agent manages another root than its own.
    NotNeeded,
    /// `nix-store` took the paths (it skips those already valid in its database).
    Registered(usize),
    /// The machine has Nix, but no `nix-store` where the agent looks: the paths are not valid
    /// in Nix's database, and its garbage collector would delete them.
    NoNixStore,
}

pub use flotilla_protocol::layout::NIX_STORE_PLACES;

fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ReceiveError {
    let path = path.to_owned();
    move |source| ReceiveError::Io { what, path, source }
}

/// Replaces `dest` with a file of `content` whose owner and mode are set, through its
/// descriptor, before a byte goes in: written to `.NAME.flotilla-tmp` beside it (created with
/// `O_EXCL|O_NOFOLLOW`, so a link left at that name is never followed; a leftover of an
/// interrupted write is unlinked first), synced, and renamed over `dest`. A reader sees the
/// old file or the new. The caller checked `dest`'s directory with
/// [`MachineRoot::not_private`], so nobody else can swap anything in it meanwhile.
pub fn replace_private(dest: &Path, content: &[u8], mode: u32, owner: (Option<u32>, Option<u32>)) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = dest.with_file_name(format!(".{}.flotilla-tmp", dest.file_name().unwrap_or_default().to_string_lossy()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&tmp)?;
        std::os::unix::fs::fchown(&f, owner.0, owner.1)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
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

    /// Why the machine's directory `dir` is not private to root, or `None` when it is: on
    /// the way from the root to it (the root itself excluded, the agent's own) there is a
    /// symbolic link, something not a directory, a directory of another user, or one that
    /// its group or others may write. A directory that is private so cannot be swapped by
    /// anyone else after this check, so what the agent (root) then writes, chowns or
    /// renames inside it lands where it was checked. Parts that do not exist yet are fine:
    /// the agent makes them, root's.
    pub fn not_private(&self, dir: &str) -> io::Result<Option<String>> {
        use std::os::unix::fs::MetadataExt;
        let trusted = fs::symlink_metadata(&self.root)?.uid();
        let mut at = self.root.clone();
        let mut shown = String::new();
        for part in Path::new(dir).components() {
            let std::path::Component::Normal(part) = part else { continue };
            at.push(part);
            shown.push('/');
            shown.push_str(&part.to_string_lossy());
            let meta = match fs::symlink_metadata(&at) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let problem = if meta.file_type().is_symlink() {
                "is a symbolic link".to_owned()
            } else if !meta.is_dir() {
                "is not a directory".to_owned()
            } else if meta.uid() != trusted && meta.uid() != 0 {
                format!("belongs to uid {}, not root", meta.uid())
            } else if meta.mode() & 0o022 != 0 {
                format!("may be written by {} (mode {:o})", if meta.mode() & 0o002 != 0 { "every user" } else { "its group" }, meta.mode() & 0o7777)
            } else {
                continue;
            };
            return Ok(Some(format!("{shown} {problem}")));
        }
        Ok(None)
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
        self.path(layout::STATE_DIR)
    }

    fn registry_dir(&self) -> PathBuf {
        self.path(layout::REGISTRY)
    }

    /// Whether the machine has Nix of its own (its database directory exists).
    pub fn has_nix(&self) -> bool {
        self.path("/nix/var/nix/db").is_dir()
    }

    /// Whether paths the agent receives go into the machine's Nix database too: the machine
    /// has Nix and the agent manages the root it runs in. With `--root DIR`, the `nix-store`
    /// the agent could run is the host's, whose database describes the host's store, not
    /// `DIR/nix/store`.
    pub fn registers_with_nix(&self) -> bool {
        self.root == Path::new("/") && self.has_nix()
    }

    /// Where the machine's Nix roots are that keep the agent's paths from Nix's collector.
    pub fn nix_gcroots_dir(&self) -> PathBuf {
        self.path(layout::NIX_GCROOTS)
    }

    /// Where system generations are linked.
    pub fn profiles_dir(&self) -> PathBuf {
        self.path(layout::PROFILES)
    }

    /// The control socket inside the machine.
    pub fn socket_path(&self) -> PathBuf {
        self.path(layout::SOCKET)
    }

    /// Where service logs go.
    pub fn log_dir(&self) -> PathBuf {
        self.path(layout::LOG_DIR)
    }

    /// Creates the directories the agent needs and removes leftovers of interrupted
    /// transfers (partial unpacks, and store entries that never got registered).
    pub fn prepare(&self) -> io::Result<()> {
        for d in [self.store_dir(), self.registry_dir(), self.profiles_dir(), self.path("/etc")] {
            fs::create_dir_all(&d)?;
        }
        // The agent's socket and services' output are root's: their directories are root's
        // alone (only root may connect to the agent; a service user reads no other's logs).
        for d in [self.path(layout::RUN_DIR), self.log_dir()] {
            make_private_dir(&d)?;
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
    /// only then registered. A path already at its final name with the announced hash is kept
    /// as it is (its bytes in the stream are skipped). The whole stream is read even after an
    /// error, so the protocol stays in step. On a machine whose Nix takes them, the received
    /// paths are registered with it too. Returns (paths, NAR bytes) added.
    pub fn receive(&self, paths: &[PathInfo], stream: &mut dyn Read, run: &NixRunner<'_>) -> Result<(u64, u64), ReceiveError> {
        let (added, batch, mut first_error) = self.unpack(paths, stream)?;
        if !batch.is_empty() {
            // Their closure: a reference received earlier may not be in Nix's database yet
            // (the machine had no nix-store then); Nix skips what it holds already.
            if let Err(e) = self.register_with_nix(&self.closure(&batch.into_iter().collect::<Vec<_>>()), run) {
                first_error.get_or_insert(ReceiveError::Nix(e));
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(added),
        }
    }

    /// [`MachineRoot::receive`] without the registration with the machine's Nix, which the
    /// caller does afterwards ([`MachineRoot::register_with_nix`] of their closure): for
    /// receives running side by side (one `nix-store` call for all of them, not one each).
    pub fn receive_unregistered(&self, paths: &[PathInfo], stream: &mut dyn Read) -> Result<(u64, u64), ReceiveError> {
        let (added, _, first_error) = self.unpack(paths, stream)?;
        first_error.map_or(Ok(added), Err)
    }

    /// Unpacks and registers (with the agent) what `receive` receives: (paths, NAR bytes)
    /// added, the paths added, and the first error; `Err` only when the stream cannot be read.
    fn unpack(&self, paths: &[PathInfo], stream: &mut dyn Read) -> Result<Unpacked, ReceiveError> {
        let mut first_error = None;
        let mut added = (0u64, 0u64);
        let mut batch: BTreeSet<StorePath> = BTreeSet::new();
        for info in paths {
            let mut limited = stream.take(info.nar_size);
            if first_error.is_none() {
                match self.receive_one(info, &mut limited, &batch) {
                    Ok(Received::Added) => {
                        added.0 += 1;
                        added.1 += info.nar_size;
                        batch.insert(info.path.clone());
                    }
                    Ok(Received::AlreadyValid) => {}
                    Err(e) => first_error = Some(e),
                }
            }
            // Whatever the outcome, consume this path's bytes.
            io::copy(&mut limited, &mut io::sink()).map_err(io("cannot read the stream for", &self.store_path(&info.path)))?;
        }
        Ok((added, batch, first_error))
    }

    fn receive_one(&self, info: &PathInfo, input: &mut dyn Read, batch: &BTreeSet<StorePath>) -> Result<Received, ReceiveError> {
        let integrity = |problem: String| ReceiveError::Integrity { path: info.path.clone(), problem };
        let announced = info.nar_hash;
        for r in &info.references {
            if r != &info.path && !batch.contains(r) && !self.is_valid(r) {
                return Err(integrity(format!("refers to {r}, which the machine does not have and which was not sent before it")));
            }
        }
        // A valid path is never written again: services may run from it. Another deployer
        // sent it meanwhile (the same bytes: nothing to do), or the two disagree about it.
        if let Some(reg) = self.registration(&info.path).filter(|_| self.is_valid(&info.path)) {
            if reg.nar_hash == announced && reg.nar_size == info.nar_size {
                return Ok(Received::AlreadyValid);
            }
            return Err(integrity(format!(
                "is on this machine already with NAR hash {} ({} bytes), not the announced {announced} ({} bytes), and a valid path is never written again; one of the two copies is corrupt: check the deployer's with `nix-store --verify-path {}`",
                reg.nar_hash, reg.nar_size, info.nar_size, info.path
            )));
        }
        let dest = self.store_path(&info.path);
        // At its final name but not registered: on a machine with Nix, a path of Nix's; else a
        // leftover of the agent's own (a crash between rename and registration). Either way,
        // the same bytes are kept rather than replaced (hashing it is the price, paid only for
        // a path that is there). Different bytes of Nix's are not the agent's to replace.
        if fs::symlink_metadata(&dest).is_ok() {
            let nix = self.has_nix();
            match flotilla_store::hash_path(&dest) {
                Ok(found) if found.hash == announced && found.size == info.nar_size => return self.register(info, nix).map(|()| Received::Added),
                found if nix => {
                    let found = match found {
                        Ok(d) => format!("with NAR hash {} ({} bytes)", d.hash, d.size),
                        Err(e) => format!("but cannot be read ({e})"),
                    };
                    return Err(integrity(format!(
                        "is in this machine's Nix store {found}, not the announced {announced} ({} bytes); flotilla never replaces paths of the machine's Nix: check it on the machine with `nix-store --verify-path {}` and repair it with `nix-store --repair-path {}`",
                        info.nar_size, info.path, info.path
                    )));
                }
                _ => {}
            }
        }
        let tmp = self.store_dir().join(format!(".flotilla-partial-{}-{}", std::process::id(), info.path.base_name()));
        if fs::symlink_metadata(&tmp).is_ok() {
            remove_tree(&tmp).map_err(io("cannot remove", &tmp))?;
        }
        let mut hashing = HashingReader::new(input);
        let decoded = flotilla_store::decode_to_path(&mut hashing, &tmp, flotilla_store::DecodeOptions { canonicalise: true, exact_end: false });
        if let Err(e) = decoded {
            let _ = remove_tree(&tmp);
            return Err(match e {
                // Writing failed: the machine's disk, not the deployer's bytes.
                flotilla_store::Error::Fs { source, .. } => ReceiveError::Disk { path: info.path.clone(), nar_size: info.nar_size, source },
                flotilla_store::Error::NarRead { source, .. } => ReceiveError::Io { what: "cannot read the stream for", path: dest, source },
                e => integrity(format!("bad NAR: {e}")),
            });
        }
        let (_, digest) = hashing.finish();
        if digest.size != info.nar_size || digest.hash != announced {
            let _ = remove_tree(&tmp);
            return Err(integrity(format!(
                "received {} bytes hashing to {}, expected {} bytes hashing to {}",
                digest.size, digest.hash, info.nar_size, announced
            )));
        }
        // Only the agent's own incomplete leftover gets here (see above): it is replaced.
        if fs::symlink_metadata(&dest).is_ok() {
            remove_tree(&dest).map_err(io("cannot replace unregistered", &dest))?;
        }
        fs::rename(&tmp, &dest).map_err(io("cannot move into place", &dest))?;
        self.register(info, false).map(|()| Received::Added)
    }

    /// Registers `info` as valid (its bytes are in place, checked by the caller).
    pub(crate) fn register(&self, info: &PathInfo, foreign: bool) -> Result<(), ReceiveError> {
        let reg = Registration { nar_hash: info.nar_hash, nar_size: info.nar_size, references: info.references.clone(), foreign };
        write_atomic(&self.registry_dir().join(info.path.base_name()), serde_json::to_string(&reg).expect("serialises").as_bytes())
            .map_err(io("cannot register", &self.store_path(&info.path)))
    }

    /// The machine's `nix-store`, looked for in [`NIX_STORE_PLACES`].
    pub fn nix_store(&self) -> Option<PathBuf> {
        NIX_STORE_PLACES.iter().map(|d| self.path(d).join("nix-store")).find(|p| p.is_file())
    }

    /// Makes `paths` (and nothing else: pass a closure) valid in the machine's own Nix
    /// database, when [`MachineRoot::registers_with_nix`]; Nix skips those it holds already.
    ///
    /// `run` runs the host's `nix-store` with its stdin read from a file and returns whether
    /// it succeeded and its stderr: the supervisor's `run_command_with_input`, since the agent's
    /// reaper waits for every child and a `std::process` wait would lose the race.
    pub fn register_with_nix(&self, paths: &BTreeSet<StorePath>, run: &NixRunner<'_>) -> Result<NixRegistration, NixError> {
        if !self.registers_with_nix() {
            return Ok(NixRegistration::NotNeeded);
        }
        let Some(program) = self.nix_store() else { return Ok(NixRegistration::NoNixStore) };
        let infos: Vec<(StorePath, Registration)> =
            paths.iter().filter(|p| self.is_valid(p)).filter_map(|p| Some((p.clone(), self.registration(p)?))).collect();
        if infos.is_empty() {
            return Ok(NixRegistration::Registered(0));
        }
        let spawn = |source| NixError::Spawn { program: program.clone(), source };
        let input = self.state_dir().join(format!(".nix-validity-{}", std::process::id()));
        fs::write(&input, nix_validity_input(&infos)).map_err(spawn)?;
        let argv = [program.display().to_string(), "--register-validity".into(), "--hash-given".into()];
        let result = run(&argv, &input);
        let _ = fs::remove_file(&input);
        let (ok, stderr) = result.map_err(spawn)?;
        if !ok {
            return Err(NixError::Failed { program, stderr: stderr.trim().to_owned() });
        }
        Ok(NixRegistration::Registered(infos.len()))
    }

    /// Takes the closure of `root`, built on this machine by its own Nix (a deploy with
    /// `deploy.buildOnTarget`), as the agent's own: each path Nix's database holds valid is
    /// hashed and registered `foreign` (Nix's, never deleted by the agent) when its bytes
    /// hash to what Nix recorded. Nothing is copied or changed in the store. Returns the
    /// closure, references first, as the deployer's copy plan reads it. Only where the agent
    /// manages the root it runs in and that root has Nix ([`MachineRoot::registers_with_nix`]).
    pub fn adopt_from_nix(&self, root: &StorePath) -> Result<Vec<PathInfo>, ReceiveError> {
        let nix_error = |problem: String| ReceiveError::Integrity { path: root.clone(), problem };
        if !self.registers_with_nix() {
            return Err(nix_error("cannot be taken from this machine's Nix: the agent manages no root with Nix of its own here (no /nix/var/nix/db, or --root is not /)".into()));
        }
        let Some(nix_store) = self.nix_store() else {
            return Err(nix_error(format!("cannot be taken from this machine's Nix: no nix-store in {}", NIX_STORE_PLACES.join(", "))));
        };
        let run = |args: &[String]| -> Result<String, ReceiveError> {
            let out = std::process::Command::new(&nix_store).args(args).stdin(std::process::Stdio::null()).output().map_err(io("cannot run", &nix_store))?;
            if !out.status.success() {
                return Err(nix_error(format!("{} {} failed: {}", nix_store.display(), args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let requisites = run(&["--query".into(), "--requisites".into(), root.to_absolute()])?;
        let mut args = vec!["--dump-db".to_owned()];
        args.extend(requisites.lines().filter(|l| !l.is_empty()).map(str::to_owned));
        let infos = parse_dump_db(&run(&args)?).map_err(nix_error)?;
        let mut out = Vec::with_capacity(infos.len());
        for info in infos {
            let integrity = |problem: String| ReceiveError::Integrity { path: info.path.clone(), problem };
            if let Some(reg) = self.registration(&info.path).filter(|_| self.is_valid(&info.path)) {
                if reg.nar_hash != info.nar_hash || reg.nar_size != info.nar_size {
                    return Err(integrity(format!("is registered with the agent with NAR hash {}, and this machine's Nix says {}; check it with `nix-store --verify-path {}`", reg.nar_hash, info.nar_hash, info.path)));
                }
            } else {
                let found = flotilla_store::hash_path(&self.store_path(&info.path)).map_err(|e| integrity(format!("cannot be read: {e}")))?;
                if found.hash != info.nar_hash || found.size != info.nar_size {
                    return Err(integrity(format!(
                        "hashes to {} ({} bytes), not the {} ({} bytes) this machine's Nix recorded; check it with `nix-store --verify-path {}`",
                        found.hash, found.size, info.nar_hash, info.nar_size, info.path
                    )));
                }
                self.register(&info, true)?;
            }
            out.push(info);
        }
        Ok(out)
    }

    /// Removes a path from the store and the registry (registry first: an interrupted removal
    /// leaves an unregistered path, which the next copy replaces).
    pub fn remove_path(&self, p: &StorePath) -> io::Result<u64> {
        let size = self.registration(p).map(|r| r.nar_size).unwrap_or(0);
        self.unregister(p)?;
        remove_tree(&self.store_path(p))?;
        Ok(size)
    }

    /// Forgets a path without deleting it.
    pub fn unregister(&self, p: &StorePath) -> io::Result<()> {
        match fs::remove_file(self.registry_dir().join(p.base_name())) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes every registered path outside `live`. A foreign path is only unregistered: it
    /// is Nix's. So is every path on a machine whose Nix database the agent registers its
    /// paths in, since deleting a path Nix holds valid would corrupt that database; Nix's
    /// collector frees them once no root of the agent's holds them.
    pub fn collect_garbage(&self, live: &BTreeSet<StorePath>) -> io::Result<Collected> {
        let mut out = Collected::default();
        let nix_holds = self.registers_with_nix();
        for p in self.valid_paths()? {
            if live.contains(&p) {
                continue;
            }
            if nix_holds || self.registration(&p).is_some_and(|r| r.foreign) {
                self.unregister(&p)?;
                out.released += 1;
            } else {
                out.bytes += self.remove_path(&p)?;
                out.deleted += 1;
            }
        }
        Ok(out)
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
        write_durable(&self.state_dir().join(name), serde_json::to_string_pretty(value).expect("serialises").as_bytes())
    }
}

/// What [`MachineRoot::collect_garbage`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Paths deleted.
    pub deleted: u64,
    /// Their NAR bytes.
    pub bytes: u64,
    /// Paths unregistered but left on disk, for the machine's Nix.
    pub released: u64,
}

/// The input of `nix-store --register-validity --hash-given`: for each path, its absolute
/// name, NAR hash (`sha256:<nix-base32>`), NAR size, deriver (none: an empty line), number
/// of references and the references, one per line.
pub fn nix_validity_input(infos: &[(StorePath, Registration)]) -> String {
    let mut out = String::new();
    for (p, r) in infos {
        out.push_str(&format!("{}\n{}\n{}\n\n{}\n", p.to_absolute(), r.nar_hash, r.nar_size, r.references.len()));
        for q in &r.references {
            out.push_str(&q.to_absolute());
            out.push('\n');
        }
    }
    out
}

/// The store path of the running agent binary on the machine at `root`, if it runs from
/// that machine's store (on a real machine it does: a systemd unit or the system profile
/// points at it).
pub fn agent_store_path(root: &MachineRoot) -> Option<StorePath> {
    let exe = std::env::current_exe().ok()?;
    store_path_of(root, &exe)
}

/// The store path that `file` (a path on this host) lies in, on the machine at `root`.
fn store_path_of(root: &MachineRoot, file: &Path) -> Option<StorePath> {
    let rel = file.strip_prefix(root.root()).ok()?;
    let abs = format!("/{}", rel.to_str()?);
    StorePath::parse_prefix(&abs).ok().map(|(p, _)| p)
}

/// Bytes available to the agent on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    crate::supervisor::sys::free_bytes(path)
}

/// Makes `dir` (and what is missing above it) a directory only its owner may enter, or makes
/// it so again (older agents left 0755), through the directory itself: a link in its place
/// is refused, never followed.
fn make_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}; it must be a directory of root's, not a link", dir.display())))?;
    if opened.metadata()?.permissions().mode() & 0o077 != 0 {
        opened.set_permissions(fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes `path` through a temporary file and a rename, so readers see old or new, never half.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    replace_file(path, data, false)
}

/// [`write_atomic`], and on disk before it returns: for the agent's own state (a generation
/// awaiting its checks, above all), which must survive a power cut as well as a crash.
pub fn write_durable(path: &Path, data: &[u8]) -> io::Result<()> {
    replace_file(path, data, true)
}

fn replace_file(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    if fs::read(path).is_ok_and(|old| old == data) {
        return Ok(()); // a redeploy of the same system rewrites nothing
    }
    let tmp = path.with_file_name(format!(".{}.tmp-{}", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let mut file = fs::File::create(&tmp)?;
    io::Write::write_all(&mut file, data)?;
    if durable {
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let (true, Some(dir)) = (durable, path.parent()) {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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

/// Reads `nix-store --dump-db PATHS`: per path its name, base-16 NAR hash, NAR size, deriver
/// and its references (count, then one per line), in references-first order.
fn parse_dump_db(text: &str) -> Result<Vec<PathInfo>, String> {
    let mut lines = text.lines();
    let mut out = Vec::new();
    let bad = |what: &str| format!("nix-store --dump-db printed something unexpected: {what}");
    while let Some(path) = lines.next() {
        if path.is_empty() {
            continue;
        }
        let path = StorePath::parse(path).map_err(|e| bad(&e.to_string()))?;
        let hash = lines.next().ok_or_else(|| bad("no hash"))?;
        let nar_hash = NarHash::parse(&format!("sha256:{hash}")).map_err(|e| bad(&e.to_string()))?;
        let nar_size = lines.next().and_then(|l| l.parse().ok()).ok_or_else(|| bad("no NAR size"))?;
        let _deriver = lines.next().ok_or_else(|| bad("no deriver line"))?;
        let count: usize = lines.next().and_then(|l| l.parse().ok()).ok_or_else(|| bad("no reference count"))?;
        let references = (0..count)
            .map(|_| lines.next().ok_or_else(|| bad("too few references")).and_then(|l| StorePath::parse(l).map_err(|e| bad(&e.to_string()))))
            .collect::<Result<_, _>>()?;
        out.push(PathInfo { path, references, nar_hash, nar_size });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// Test roots are never `/`, so the host's Nix is never asked.
    fn no_nix(_: &[String], _: &Path) -> io::Result<(bool, String)> {
        unreachable!("a test root never registers with the host's Nix")
    }
    use super::*;

    fn machine(with_nix: bool) -> (tempfile::TempDir, MachineRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = MachineRoot::new(&dir.path().join("m"));
        root.prepare().unwrap();
        if with_nix {
            fs::create_dir_all(root.path("/nix/var/nix/db")).unwrap();
        }
        (dir, root)
    }

    fn sp(name: &str, n: u8) -> StorePath {
        let hash: String = (0..32).map(|i| NIX_BASE32[(i + n as usize) % 32] as char).collect();
        StorePath::from_base_name(&format!("{hash}-{name}")).unwrap()
    }
    const NIX_BASE32: &[u8; 32] = flotilla_store::NIX_BASE32_CHARS;

    /// A store path holding one file, as its NAR and what the deployer would announce.
    fn nar(dir: &Path, path: &StorePath, text: &str) -> (Vec<u8>, PathInfo) {
        let src = dir.join(format!("src-{}", path.base_name()));
        fs::write(&src, text).unwrap();
        let mut bytes = Vec::new();
        flotilla_store::encode_path(&src, &mut bytes).unwrap();
        let digest = flotilla_store::hash_path(&src).unwrap();
        (bytes, PathInfo { path: path.clone(), references: Vec::new(), nar_hash: digest.hash, nar_size: digest.size })
    }

    /// `text` at `p`'s final name, unregistered, as Nix (or a crash) would leave it.
    fn put(root: &MachineRoot, p: &StorePath, text: &str) {
        fs::write(root.store_path(p), text).unwrap();
    }

    #[test]
    fn a_path_already_there_with_the_announced_hash_is_kept_and_registered() {
        for with_nix in [false, true] {
            let (dir, root) = machine(with_nix);
            let p = sp("hello", 0);
            let (bytes, info) = nar(dir.path(), &p, "hello\n");
            put(&root, &p, "hello\n");
            let inode = || std::os::unix::fs::MetadataExt::ino(&fs::metadata(root.store_path(&p)).unwrap());
            let before = inode();
            assert_eq!(root.receive(std::slice::from_ref(&info), &mut &bytes[..], &no_nix).unwrap(), (1, info.nar_size));
            assert_eq!(inode(), before, "kept, not replaced");
            let reg = root.registration(&p).unwrap();
            assert_eq!(reg.foreign, with_nix, "a path of the machine's Nix is foreign");
            assert!(root.is_valid(&p));
            let leftovers = fs::read_dir(root.store_dir()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).count();
            assert_eq!(leftovers, 0);
        }
    }

    #[test]
    fn a_different_path_of_the_machines_nix_is_refused_and_left_alone() {
        let (dir, root) = machine(true);
        let p = sp("hello", 1);
        let (bytes, info) = nar(dir.path(), &p, "hello\n");
        put(&root, &p, "Nix's own\n");
        let err = root.receive(&[info], &mut &bytes[..], &no_nix).unwrap_err().to_string();
        assert!(err.contains("is in this machine's Nix store with NAR hash sha256:"), "{err}");
        assert!(err.contains("flotilla never replaces paths of the machine's Nix: check it on the machine with `nix-store --verify-path"), "{err}");
        assert_eq!(fs::read_to_string(root.store_path(&p)).unwrap(), "Nix's own\n");
        assert!(root.registration(&p).is_none());
    }

    #[test]
    fn without_nix_a_different_leftover_is_the_agents_and_replaced() {
        let (dir, root) = machine(false);
        let p = sp("hello", 2);
        let (bytes, info) = nar(dir.path(), &p, "hello\n");
        put(&root, &p, "half of a crash\n");
        root.receive(&[info], &mut &bytes[..], &no_nix).unwrap();
        assert_eq!(fs::read_to_string(root.store_path(&p)).unwrap(), "hello\n");
        assert!(!root.registration(&p).unwrap().foreign);
    }

    #[test]
    fn the_logs_directory_is_roots_alone_and_never_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let root = MachineRoot::new(dir.path());
        root.prepare().unwrap();
        assert_eq!(mode(&root.log_dir()), 0o700);
        assert_eq!(mode(&root.path("/run/flotilla")), 0o700, "only root may reach the agent's socket");
        // An older agent's 0755 directory is made private again.
        fs::set_permissions(root.log_dir(), fs::Permissions::from_mode(0o755)).unwrap();
        root.prepare().unwrap();
        assert_eq!(mode(&root.log_dir()), 0o700);
        // A link in its place is refused, and what it points to is left as it was.
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o755)).unwrap();
        fs::remove_dir(root.log_dir()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.log_dir()).unwrap();
        assert!(root.prepare().is_err());
        assert_eq!(mode(&elsewhere), 0o755);
    }

    #[test]
    fn a_valid_path_sent_again_is_never_written_again() {
        let (dir, root) = machine(false);
        let p = sp("hello", 7);
        let (bytes, info) = nar(dir.path(), &p, "hello\n");
        assert_eq!(root.receive(std::slice::from_ref(&info), &mut &bytes[..], &no_nix).unwrap(), (1, info.nar_size));
        let inode = || std::os::unix::fs::MetadataExt::ino(&fs::metadata(root.store_path(&p)).unwrap());
        let before = inode();
        // A second deployer sends the same path: its bytes are skipped, the copy stays.
        assert_eq!(root.receive(std::slice::from_ref(&info), &mut &bytes[..], &no_nix).unwrap(), (0, 0));
        assert_eq!(inode(), before, "the valid path was replaced");
        // A sender whose idea of the path differs is an integrity error, and changes nothing.
        let (other, other_info) = nar(dir.path(), &sp("other", 8), "another content\n");
        let claimed = PathInfo { path: p.clone(), ..other_info };
        let err = root.receive(std::slice::from_ref(&claimed), &mut &other[..], &no_nix).unwrap_err();
        assert!(matches!(err, ReceiveError::Integrity { .. }), "{err}");
        assert!(err.to_string().contains("is on this machine already with NAR hash"), "{err}");
        assert_eq!(fs::read_to_string(root.store_path(&p)).unwrap(), "hello\n");
        assert_eq!(inode(), before);
        assert_eq!(root.registration(&p).unwrap().nar_hash, info.nar_hash);
    }

    #[test]
    fn garbage_collection_unregisters_foreign_paths_and_deletes_the_agents() {
        let (dir, root) = machine(true);
        let (foreign, ours, live) = (sp("foreign", 3), sp("ours", 4), sp("live", 5));
        put(&root, &foreign, "Nix's\n");
        let infos: Vec<(Vec<u8>, PathInfo)> = [(&foreign, "Nix's\n"), (&ours, "ours\n"), (&live, "live\n")].iter().map(|(p, t)| nar(dir.path(), p, t)).collect();
        for (bytes, info) in &infos {
            root.receive(std::slice::from_ref(info), &mut &bytes[..], &no_nix).unwrap();
        }
        let c = root.collect_garbage(&BTreeSet::from([live.clone()])).unwrap();
        assert_eq!(c, Collected { deleted: 1, bytes: infos[1].1.nar_size, released: 1 });
        assert!(root.store_path(&foreign).exists() && root.registration(&foreign).is_none(), "foreign: unregistered, not deleted");
        assert!(!root.store_path(&ours).exists());
        assert!(root.is_valid(&live));
    }

    #[test]
    fn the_running_agents_store_path_is_found_under_the_root() {
        let (_dir, root) = machine(false);
        let p = sp("flotilla-agent", 6);
        let exe = root.store_path(&p).join("bin/flotilla-agent");
        assert_eq!(store_path_of(&root, &exe), Some(p.clone()));
        assert_eq!(store_path_of(&MachineRoot::new(Path::new("/")), Path::new(&format!("{}/bin/flotilla-agent", p.to_absolute()))), Some(p));
        assert_eq!(store_path_of(&root, Path::new("/usr/local/bin/flotilla-agent")), None);
    }

    #[test]
    fn nix_validity_input_is_what_nix_store_register_validity_hash_given_reads() {
        let (a, b) = (sp("a", 7), sp("b", 8));
        let hash = NarHash::digest(b"x");
        let reg = |references: Vec<StorePath>| Registration { nar_hash: hash, nar_size: 120, references, foreign: false };
        let input = nix_validity_input(&[(b.clone(), reg(Vec::new())), (a.clone(), reg(vec![a.clone(), b.clone()]))]);
        let h = hash.to_string();
        assert!(h.starts_with("sha256:") && h.len() == 7 + 52, "{h}");
        assert_eq!(input, format!("{b}\n{h}\n120\n\n0\n{a}\n{h}\n120\n\n2\n{a}\n{b}\n", a = a.to_absolute(), b = b.to_absolute()));
    }

    #[test]
    fn registrations_without_foreign_read_as_the_agents_own_and_are_written_without_it() {
        let hash = NarHash::digest(b"x");
        let reg: Registration = serde_json::from_str(&format!(r#"{{"narHash":"{hash}","narSize":1,"references":[]}}"#)).unwrap();
        assert!(!reg.foreign);
        assert!(!serde_json::to_string(&reg).unwrap().contains("foreign"));
        let foreign = Registration { foreign: true, ..reg };
        assert!(serde_json::to_string(&foreign).unwrap().contains(r#""foreign":true"#));
    }
}
