//! `flotilla-agent uninstall`: removes from a machine everything the agent placed there, by
//! its own records, and nothing else. On an ssh host the agent shares the machine with
//! whatever was there before, so every removal is checked against what the agent recorded:
//!
//! - `/etc` entries of `etc.json`, each only while it still is what the agent placed (a link
//!   into `/nix/store`, or a regular file for a copy);
//! - the users and groups of `accounts.json`: exactly their lines of `/etc/passwd`,
//!   `/etc/group`, `/etc/shadow` and `/etc/gshadow` (and their names in other groups' member
//!   lists), each file rewritten with its mode and owner; never `root`, `nobody`, `nogroup`;
//! - the keys of `keys.json` (and a key directory left empty with the `0711` the agent gives
//!   the ones it creates);
//! - `/run/current-system`, when it is a link to a store path the agent received;
//! - every store path of the agent's registry, except those registered as `foreign` (the
//!   host's own Nix had them), and leftovers of interrupted transfers;
//! - `nix/var/flotilla`, `var/log/flotilla`, `run/flotilla`, and on a host with Nix its own
//!   GC roots directory `nix/var/nix/gcroots/flotilla`; then `/nix/store` and `/nix` if
//!   that left them empty and the host has no Nix of its own (no `/nix/var/nix`).
//!
//! It never touches the rest of `/nix/var/nix`, an unregistered store path, or a file the records do not
//! name, and refuses to start while an agent runs (it would put everything back).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flotilla_protocol::layout::{self, records};
use flotilla_store::StorePath;
use serde::Deserialize;

use crate::accounts_file;
use crate::daemon::{self, AgentLock, DaemonError, State};
use crate::machine::{remove_tree, MachineRoot};

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Removed: what.
    Removed(String),
    /// Left in place: what, and why.
    Kept(String, String),
    /// Could not be removed: what, and why.
    Failed(String, String),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Removed(what) => write!(f, "removed {what}"),
            Step::Kept(what, why) => write!(f, "kept {what}: {why}"),
            Step::Failed(what, why) => write!(f, "failed {what}: {why}"),
        }
    }
}

/// Why uninstall refused, having changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    /// Whether an agent runs cannot be told, or its lock cannot be taken.
    #[error("{0}")]
    Daemon(#[from] DaemonError),
    /// A record of the agent's cannot be read, so what is its own is unknown.
    #[error("cannot read the agent's record {}: {source}; nothing was removed", path.display())]
    Record {
        /// The record.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It must not run now (an agent runs, `/bin/sh` needs a path it would remove); the
    /// sentence says what to do first.
    #[error("{0}")]
    Refused(String),
}

/// How many steps of each kind there were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Things removed (restored host files count here).
    pub removed: usize,
    /// Things left in place.
    pub kept: usize,
    /// Things that could not be removed.
    pub failed: usize,
}

/// `etc.json`, as `etc.rs` writes it: entry path → fingerprint (`link …` or `copy …`).
#[derive(Debug, Default, Deserialize)]
struct EtcRecord {
    #[serde(default)]
    entries: BTreeMap<String, String>,
}

/// `accounts.json`, as `users.rs` writes it: the agent's users and groups with their ids.
#[derive(Debug, Default, Deserialize)]
struct AccountsRecord {
    #[serde(default)]
    users: BTreeMap<String, u32>,
    #[serde(default)]
    groups: BTreeMap<String, u32>,
}

/// An entry of `keys.json`, as `keys.rs` writes it (name → where it lives).
#[derive(Debug, Deserialize)]
struct KeyRecord {
    dest_dir: String,
}

/// Accounts every machine has: never removed, whatever a record says.
const PROTECTED: &[&str] = &["root", "nobody", "nogroup"];

struct Run<'a> {
    root: &'a MachineRoot,
    report: &'a mut dyn FnMut(&Step),
    summary: Summary,
}

impl Run<'_> {
    fn step(&mut self, step: Step) {
        match &step {
            Step::Removed(_) => self.summary.removed += 1,
            Step::Kept(..) => self.summary.kept += 1,
            Step::Failed(..) => self.summary.failed += 1,
        }
        (self.report)(&step);
    }

    fn show(&self, abs: &str) -> String {
        self.root.path(abs).display().to_string()
    }

    /// Removes `path` (a file, link or tree) and reports it under `what`.
    fn remove(&mut self, path: &Path, what: String) {
        match remove_tree(path) {
            Ok(()) => self.step(Step::Removed(what)),
            Err(e) => self.step(Step::Failed(what, e.to_string())),
        }
    }
}

/// Removes what the agent placed on `root`, reporting each thing removed or kept. Refuses,
/// changing nothing, while an agent runs there, while `/bin/sh` is the agent's link into a
/// store path it would remove, or when one of its records cannot be read.
pub fn uninstall(root: &MachineRoot, report: &mut dyn FnMut(&Step)) -> Result<Summary, UninstallError> {
    let stop_first = "stop it first with `flotilla-agent stop` (or, when a service manager runs it, e.g. `systemctl stop flotilla-agent`)";
    match daemon::state(root)? {
        State::Running(Some(pid)) => return Err(UninstallError::Refused(format!("an agent runs on {} (pid {pid}); {stop_first}", root.root().display()))),
        State::Running(None) => return Err(UninstallError::Refused(format!("an agent answers on {}; {stop_first}", root.socket_path().display()))),
        State::Stopped => {}
    }
    // Held to the end, so no agent starts meanwhile (the file goes with run/flotilla).
    let _lock = if daemon::lock_path(root).exists() {
        match AgentLock::acquire(root).map_err(|source| DaemonError::Io { what: format!("cannot lock {}", daemon::lock_path(root).display()), source })? {
            Some(lock) => Some(lock),
            None => return Err(UninstallError::Refused(format!("an agent holds {} (it is starting, or does not answer); {stop_first}", daemon::lock_path(root).display()))),
        }
    } else {
        None
    };

    let read = |name: &'static str| move |source| UninstallError::Record { path: root.state_dir().join(name), source };
    let etc: EtcRecord = root.read_state(records::ETC).map_err(read(records::ETC))?;
    let accounts: AccountsRecord = root.read_state(records::ACCOUNTS).map_err(read(records::ACCOUNTS))?;
    let keys: BTreeMap<String, KeyRecord> = root.read_state(records::KEYS).map_err(read(records::KEYS))?;
    let registered = registry(root);
    check_bin_sh(root, &registered)?;

    let mut run = Run { root, report, summary: Summary::default() };
    remove_keys(&mut run, &keys);
    remove_etc(&mut run, &etc);
    // The running system, when it is one the agent received (on NixOS it may be NixOS's).
    let current = root.path("/run/current-system");
    if fs::read_link(&current).ok().and_then(|t| store_path_of(&t)).is_some_and(|p| ours(&registered, &p)) {
        run.remove(&current, current.display().to_string());
    }
    remove_accounts(&mut run, &accounts);
    let last = remove_store_paths(&mut run, &registered);
    // The GC roots directory holds only the agent's links: left behind, they would dangle into
    // the paths removed above.
    let gcroots = root.nix_gcroots_dir();
    for path in [layout::STATE_DIR, layout::LOG_DIR, layout::AGENT_LOG, layout::RUN_DIR].map(|d| root.path(d)).into_iter().chain([gcroots]) {
        if fs::symlink_metadata(&path).is_ok() {
            run.remove(&path, path.display().to_string());
        }
    }
    // The store path of the binary running this, if it is one: Linux keeps running it.
    if let Some(p) = last {
        let path = root.store_path(&p);
        run.remove(&path, path.display().to_string());
    }
    remove_empty_nix(&mut run);
    Ok(run.summary)
}

/// The registry: each registered path with whether it is foreign (`None`: unreadable).
fn registry(root: &MachineRoot) -> Vec<(StorePath, Option<bool>)> {
    root.valid_paths().unwrap_or_default().into_iter().map(|p| {
        let foreign = root.registration(&p).map(|r| r.foreign);
        (p, foreign)
    }).collect()
}

/// Whether `p` is a store path the agent received (registered, and not the host's own).
fn ours(registered: &[(StorePath, Option<bool>)], p: &StorePath) -> bool {
    registered.iter().any(|(q, foreign)| q == p && *foreign == Some(false))
}

/// The store path a link target lies in, if any.
fn store_path_of(target: &Path) -> Option<StorePath> {
    let rest = target.strip_prefix(flotilla_store::STORE_DIR).ok()?;
    StorePath::from_base_name(&rest.components().next()?.as_os_str().to_string_lossy()).ok()
}

/// Removing the store path `/bin/sh` points into would leave the host without a shell.
fn check_bin_sh(root: &MachineRoot, registered: &[(StorePath, Option<bool>)]) -> Result<(), UninstallError> {
    let sh = root.path("/bin/sh");
    let Ok(target) = fs::read_link(&sh) else { return Ok(()) };
    let Some(p) = store_path_of(&target) else { return Ok(()) };
    if ours(registered, &p) {
        return Err(UninstallError::Refused(format!(
            "{} links to {} (the system's `binsh`), a store path uninstall removes: point it at the host's own shell first (Debian: `ln -sfn dash {}`); nothing was removed",
            sh.display(),
            target.display(),
            sh.display()
        )));
    }
    Ok(())
}

fn remove_keys(run: &mut Run<'_>, keys: &BTreeMap<String, KeyRecord>) {
    let mut dirs = BTreeSet::new();
    for (name, k) in keys {
        let dir = run.root.path(&k.dest_dir);
        let path = dir.join(name);
        let what = format!("key {name} ({})", path.display());
        match fs::symlink_metadata(&path) {
            Err(_) => {} // gone already (keys under /run go with a reboot)
            Ok(m) if m.is_file() => run.remove(&path, what),
            Ok(_) => run.step(Step::Kept(what, "not a regular file, so not the key the agent wrote".into())),
        }
        // A temporary file of an interrupted write.
        let _ = fs::remove_file(dir.join(format!(".{name}.flotilla-tmp")));
        dirs.insert(dir);
    }
    for dir in dirs {
        let agents = fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir() && m.mode() & 0o7777 == 0o711);
        let empty = fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_none());
        if agents && empty {
            run.remove(&dir, format!("{} (the empty key directory)", dir.display()));
        }
    }
}

fn remove_etc(run: &mut Run<'_>, etc: &EtcRecord) {
    for (entry, fingerprint) in &etc.entries {
        let path = run.root.path(entry);
        let shown = path.display().to_string();
        let meta = fs::symlink_metadata(&path);
        let link = fingerprint.starts_with("link ");
        match &meta {
            Err(_) => {}
            Ok(m) if link && m.file_type().is_symlink() && fs::read_link(&path).is_ok_and(|t| t.starts_with(flotilla_store::STORE_DIR)) => {
                run.remove(&path, shown.clone());
            }
            Ok(m) if !link && m.is_file() => run.remove(&path, shown.clone()),
            Ok(_) => {
                let placed = if link { "a link into /nix/store" } else { "a regular file" };
                run.step(Step::Kept(shown.clone(), format!("the agent placed {placed} there and it is something else now")));
            }
        }
    }
}

fn remove_accounts(run: &mut Run<'_>, accounts: &AccountsRecord) {
    let protected = |name: &str, id: u32| PROTECTED.contains(&name) || id == 0;
    let mut users = BTreeSet::new();
    for (name, uid) in &accounts.users {
        if protected(name, *uid) {
            run.step(Step::Kept(format!("user {name}"), "every machine has it; uninstall never removes it".into()));
        } else {
            users.insert(name.as_str());
        }
    }
    let mut groups = BTreeSet::new();
    for (name, gid) in &accounts.groups {
        if protected(name, *gid) {
            run.step(Step::Kept(format!("group {name}"), "every machine has it; uninstall never removes it".into()));
        } else {
            groups.insert(name.as_str());
        }
    }
    if users.is_empty() && groups.is_empty() {
        return;
    }
    // name → the files it was removed from
    let mut removed: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
    let without = |list: &str| list.split(',').filter(|m| !m.is_empty() && !users.contains(m)).collect::<Vec<_>>().join(",");
    let files: [(&str, &str, &BTreeSet<&str>, &[usize]); 4] = [
        ("/etc/passwd", "user", &users, &[]),
        ("/etc/shadow", "user", &users, &[]),
        ("/etc/group", "group", &groups, &[3]),
        ("/etc/gshadow", "group", &groups, &[2, 3]),
    ];
    for (file, kind, names, member_fields) in files {
        let path = run.root.path(file);
        if !path.exists() {
            continue;
        }
        let mut gone = Vec::new();
        let edited = accounts_file::rewrite(&path, |fields| {
            if names.contains(fields[0].as_str()) {
                gone.push(fields[0].clone());
                return false;
            }
            for &i in member_fields {
                if let Some(list) = fields.get_mut(i) {
                    *list = without(list);
                }
            }
            true
        });
        match edited {
            Ok(()) => {
                for name in gone {
                    let name = names.get(name.as_str()).copied().unwrap_or_default();
                    removed.entry((kind, name)).or_default().push(path.display().to_string());
                }
            }
            Err(e) => run.step(Step::Failed(path.display().to_string(), e.to_string())),
        }
    }
    for ((kind, name), files) in removed {
        run.step(Step::Removed(format!("{kind} {name} (from {})", files.join(", "))));
    }
}

/// Removes the registered store paths that are the agent's, except the one holding the
/// running binary, which it returns to be removed last.
fn remove_store_paths(run: &mut Run<'_>, registered: &[(StorePath, Option<bool>)]) -> Option<StorePath> {
    let exe = std::env::current_exe().ok();
    let mut last = None;
    for (p, foreign) in registered {
        let path = run.root.store_path(p);
        let shown = path.display().to_string();
        match foreign {
            Some(true) => run.step(Step::Kept(shown, "it was in the host's Nix store before flotilla".into())),
            None => run.step(Step::Kept(shown, "its registration cannot be read, so whether the host's Nix had it is unknown".into())),
            Some(false) => {
                let holds_exe = fs::canonicalize(&path).ok().zip(exe.as_ref()).is_some_and(|(dir, exe)| exe.starts_with(dir));
                if holds_exe {
                    last = Some(p.clone());
                } else if fs::symlink_metadata(&path).is_ok() {
                    run.remove(&path, shown);
                }
            }
        }
    }
    // Leftovers of interrupted transfers (the agent's by their name).
    if let Ok(entries) = fs::read_dir(run.root.store_dir()) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".flotilla-partial-") {
                run.remove(&e.path(), e.path().display().to_string());
            }
        }
    }
    last
}

/// Removes `/nix/store`, `/nix/var` and `/nix` when they are empty and the host has no Nix.
fn remove_empty_nix(run: &mut Run<'_>) {
    if fs::symlink_metadata(run.root.path("/nix/var/nix")).is_ok() {
        return;
    }
    let empty = |p: &PathBuf| fs::read_dir(p).is_ok_and(|mut d| d.next().is_none());
    let store = run.root.store_dir();
    if !empty(&store) {
        return;
    }
    let store_shown = run.show("/nix/store");
    match fs::remove_dir(&store) {
        Ok(()) => run.step(Step::Removed(format!("{store_shown} (empty, and the host has no Nix of its own)"))),
        Err(e) => return run.step(Step::Failed(store_shown, e.to_string())),
    }
    for dir in ["/nix/var", "/nix"] {
        let path = run.root.path(dir);
        if empty(&path) && fs::remove_dir(&path).is_ok() {
            run.step(Step::Removed(format!("{} (empty)", path.display())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_path_of_a_link_target() {
        let p = store_path_of(Path::new("/nix/store/00000000000000000000000000000000-busybox/bin/sh")).unwrap();
        assert_eq!(p.base_name(), "00000000000000000000000000000000-busybox");
        assert!(store_path_of(Path::new("/usr/bin/dash")).is_none());
    }
}
