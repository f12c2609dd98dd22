//! Keys (secrets) on the machine. They arrive over the protocol, never through the store, and
//! are written to a temporary file that already has the key's owner and mode before a byte of
//! the secret goes in, then renamed into place: a reader sees the old key or the new, and
//! nobody else ever sees either.
//!
//! The agent remembers which keys it wrote (name, directory, owner, mode; never contents) in
//! its state directory, so that it deletes only files it placed; and it never writes a key
//! over a file it did not place there. Digests for the deployer are
//! computed from the files themselves at every `ListKeys`, so a key lost with `/run` at a
//! restart reads as missing and is sent again.
//!
//! The agent is root and a key's owner may not be: a key directory that someone else could
//! change (a link on its way, a directory another user owns or may write) is refused before
//! anything is written, and a key file is only ever opened without following a link, its
//! owner changed through that descriptor. So a service user that replaces its key with a link
//! to `/etc/passwd` gets nothing from the next activation but a refusal.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use flotilla_protocol::{KeyState, KeyUpload};
use flotilla_store::NarHash;
use serde::{Deserialize, Serialize};

use crate::error::AgentError;
use crate::machine::MachineRoot;
use crate::users;

/// The agent's record of the keys it placed, in its state directory.
const STATE: &str = flotilla_protocol::layout::records::KEYS;

/// Where a key lives and whose it is; no contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Placed {
    dest_dir: String,
    user: String,
    group: String,
    mode: u32,
}

/// The `sha256:<hex>` digest the deployer compares with.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", NarHash::digest(data).to_hex())
}

/// The file of key `name` in `dest_dir`, inside the machine root.
pub fn key_path(root: &MachineRoot, dest_dir: &str, name: &str) -> PathBuf {
    root.path(dest_dir).join(name)
}

fn placed(root: &MachineRoot) -> Result<BTreeMap<String, Placed>, AgentError> {
    root.read_state(STATE).map_err(|source| AgentError::Io { what: format!("cannot read the agent's {STATE}"), source })
}

/// The keys this agent placed that are still on disk, with digests of their contents.
pub fn list(root: &MachineRoot) -> Result<Vec<KeyState>, AgentError> {
    let mut out = Vec::new();
    for (name, p) in placed(root)? {
        let Ok(mut f) = open_key(&key_path(root, &p.dest_dir, &name)) else { continue };
        let mut data = Vec::new();
        if io::Read::read_to_end(&mut f, &mut data).is_err() {
            continue;
        }
        out.push(KeyState { name, dest_dir: p.dest_dir, user: p.user, group: p.group, mode: p.mode, digest: digest(&data) });
    }
    Ok(out)
}

/// Writes `put` and deletes `remove`; returns the names written and removed.
pub fn apply(root: &MachineRoot, put: &[KeyUpload], remove: &[String]) -> Result<(Vec<String>, Vec<String>), AgentError> {
    let mut state = placed(root)?;
    // Check everything before changing anything.
    let mut owners = Vec::new();
    for k in put {
        check_name(&k.name)?;
        check_dir(&k.name, &k.dest_dir)?;
        check_private(root, &k.name, &k.dest_dir)?;
        if k.mode > 0o7777 {
            return Err(AgentError::BadRequest(format!("key {}: mode {:o} is not a permission mode", k.name, k.mode)));
        }
        let ours = state.get(&k.name).is_some_and(|p| p.dest_dir == k.dest_dir);
        let file = format!("{}/{}", k.dest_dir.trim_end_matches('/'), k.name);
        if !ours && fs::symlink_metadata(root.path(&file)).is_ok() {
            return Err(AgentError::Conflict(format!(
                "key {}: {file} exists on this machine and was not placed by flotilla; flotilla never replaces files it does not own: remove or move it on the machine, or give keys.{} another destDir",
                k.name, k.name
            )));
        }
        // An owner the new system creates does not exist yet before activation: the key is
        // root's until then, and `fix_owners` hands it over once the accounts exist.
        let uid = owner_id(root, &k.user, true).unwrap_or(0);
        let gid = owner_id(root, &k.group, false).unwrap_or(0);
        owners.push((uid, gid));
    }
    for name in remove {
        check_name(name)?;
    }

    let mut written = Vec::new();
    for (k, (uid, gid)) in put.iter().zip(owners) {
        if let Some(old) = state.get(&k.name) {
            if old.dest_dir != k.dest_dir {
                remove_file(&key_path(root, &old.dest_dir, &k.name))?;
            }
        }
        write_key(root, k, uid, gid)?;
        state.insert(k.name.clone(), Placed { dest_dir: k.dest_dir.clone(), user: k.user.clone(), group: k.group.clone(), mode: k.mode });
        root.write_state(STATE, &state).map_err(|source| AgentError::Io { what: format!("cannot record key {}", k.name), source })?;
        written.push(k.name.clone());
    }
    let mut removed = Vec::new();
    for name in remove {
        let Some(p) = state.remove(name) else { continue };
        remove_file(&key_path(root, &p.dest_dir, name))?;
        root.write_state(STATE, &state).map_err(|source| AgentError::Io { what: format!("cannot record the removal of key {name}"), source })?;
        removed.push(name.clone());
    }
    Ok((written, removed))
}

/// The id of `name`: from the machine's account files, else the accounts every machine has.
fn owner_id(root: &MachineRoot, name: &str, user: bool) -> Option<u32> {
    users::lookup_id(root, name, user).or(match name {
        "root" => Some(0),
        "nobody" | "nogroup" => Some(65534),
        _ => None,
    })
}

/// Gives each placed key the owner and group it was declared with, where they exist now
/// (after activation created the accounts). Returns what it could not do and why: an owner
/// still missing, a key that is no longer the file it placed, a directory no longer private.
pub fn fix_owners(root: &MachineRoot) -> Result<Vec<String>, AgentError> {
    use std::os::unix::fs::MetadataExt;
    let mut missing = Vec::new();
    for (name, p) in placed(root)? {
        // Whatever the key's owner did to its file since, the agent changes only the file it
        // placed: in a directory nobody else can change, opened without following a link,
        // a plain file with one name.
        if let Err(refused) = check_private(root, &name, &p.dest_dir) {
            missing.push(format!("{refused}; it stays as it is"));
            continue;
        }
        let path = key_path(root, &p.dest_dir, &name);
        let f = match open_key(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                missing.push(format!("key {name}: {}/{name} is no longer the file flotilla placed ({e}); left as it is, the next deploy writes it again", p.dest_dir));
                continue;
            }
        };
        let meta = f.metadata().map_err(|source| AgentError::Io { what: format!("key {name}: cannot read {}/{name}", p.dest_dir), source })?;
        if !meta.is_file() || meta.nlink() != 1 {
            missing.push(format!("key {name}: {}/{name} is no longer the file flotilla placed (not a plain file with one name); left as it is", p.dest_dir));
            continue;
        }
        match (owner_id(root, &p.user, true), owner_id(root, &p.group, false)) {
            (Some(uid), Some(gid)) if (meta.uid(), meta.gid()) != (uid, gid) => {
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                    .map_err(|source| AgentError::Io { what: format!("key {name}: cannot give it to {}:{}", p.user, p.group), source })?;
            }
            (Some(_), Some(_)) => {}
            _ => missing.push(format!("key {name}: owner {}:{} does not exist on the machine; it stays root's", p.user, p.group)),
        }
    }
    Ok(missing)
}

fn write_key(root: &MachineRoot, k: &KeyUpload, uid: u32, gid: u32) -> Result<(), AgentError> {
    let io = |what: String| move |source| AgentError::Io { what, source };
    let dir = root.path(&k.dest_dir);
    if !dir.is_dir() {
        fs::create_dir_all(&dir).map_err(io(format!("key {}: cannot create {}", k.name, k.dest_dir)))?;
        // Traversable, not listable: each key's own mode decides who reads it.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).map_err(io(format!("key {}: cannot set the mode of {}", k.name, k.dest_dir)))?;
    }
    crate::machine::replace_private(&dir.join(&k.name), &k.data, k.mode, (Some(uid), Some(gid)))
        .map_err(|source| AgentError::Io { what: format!("key {}: cannot write {}/{}", k.name, k.dest_dir, k.name), source })
}

/// Opens a key file for reading without following a link at its name (`ELOOP` then) and
/// without blocking on a FIFO someone put there.
fn open_key(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)
}

/// Refuses key directory `dest_dir` when anyone but root could change what is in it or on
/// the way to it ([`MachineRoot::not_private`]).
fn check_private(root: &MachineRoot, name: &str, dest_dir: &str) -> Result<(), AgentError> {
    match root.not_private(dest_dir) {
        Ok(None) => Ok(()),
        Ok(Some(problem)) => Err(AgentError::BadRequest(format!(
            "key {name}: destDir {dest_dir} is not private to root: {problem}, so another user could swap the key for a link to any file; give keys.{name}.destDir a directory only root can change, e.g. /run/keys"
        ))),
        Err(source) => Err(AgentError::Io { what: format!("key {name}: cannot check {dest_dir}"), source }),
    }
}

fn remove_file(path: &Path) -> Result<(), AgentError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(AgentError::Io { what: format!("cannot delete key {}", path.display()), source }),
    }
}

fn check_name(name: &str) -> Result<(), AgentError> {
    let ok = !name.is_empty() && !name.starts_with('.') && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.@".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(AgentError::BadRequest(format!("{name:?} cannot name a key: it becomes a file name; use letters, digits and `-_.@`")))
    }
}

fn check_dir(name: &str, dir: &str) -> Result<(), AgentError> {
    let path = Path::new(dir);
    let ok = path.is_absolute() && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))) && path != Path::new("/");
    if ok {
        Ok(())
    } else {
        Err(AgentError::BadRequest(format!("key {name}: destDir {dir:?} must be an absolute directory without `..`, not /")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn root_with_accounts() -> (tempfile::TempDir, MachineRoot) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        let meta = fs::metadata(dir.path()).unwrap();
        let (uid, gid) = (meta.uid(), meta.gid());
        fs::write(dir.path().join("etc/passwd"), format!("me:x:{uid}:{gid}::/:/bin/sh\n")).unwrap();
        fs::write(dir.path().join("etc/group"), format!("me:x:{gid}:\n")).unwrap();
        let root = MachineRoot::new(dir.path());
        root.prepare().unwrap();
        (dir, root)
    }

    fn key(name: &str, data: &[u8]) -> KeyUpload {
        KeyUpload { name: name.into(), dest_dir: "/run/keys".into(), user: "me".into(), group: "me".into(), mode: 0o640, data: data.to_vec() }
    }

    #[test]
    fn a_key_lands_with_its_mode_and_is_listed_by_digest_then_removed() {
        let (dir, root) = root_with_accounts();
        let (written, removed) = apply(&root, &[key("token", b"secret-1")], &[]).unwrap();
        assert_eq!((written, removed), (vec!["token".to_owned()], vec![]));
        let file = dir.path().join("run/keys/token");
        assert_eq!(fs::read(&file).unwrap(), b"secret-1");
        assert_eq!(fs::metadata(&file).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(fs::metadata(dir.path().join("run/keys")).unwrap().mode() & 0o777, 0o711);
        let listed = list(&root).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].digest, digest(b"secret-1"));
        let state = fs::read_to_string(root.state_dir().join(STATE)).unwrap();
        assert!(!state.contains("secret-1"), "{state}");

        let (_, removed) = apply(&root, &[], &["token".into()]).unwrap();
        assert_eq!(removed, vec!["token".to_owned()]);
        assert!(!file.exists());
        assert!(list(&root).unwrap().is_empty());
        assert!(fs::read_dir(dir.path().join("run/keys")).unwrap().next().is_none(), "no temporary file is left");
    }

    #[test]
    fn an_owner_made_by_activation_gets_the_key_once_it_exists() {
        let (dir, root) = root_with_accounts();
        let later = KeyUpload { user: "later".into(), group: "later".into(), ..key("b", b"x") };
        apply(&root, &[later], &[]).unwrap();
        let file = dir.path().join("run/keys/b");
        assert_eq!(fs::metadata(&file).unwrap().uid(), 0, "root's until the account exists");
        assert_eq!(fix_owners(&root).unwrap().len(), 1);
        let me = fs::metadata(dir.path()).unwrap();
        let passwd = format!("later:x:{}:{}::/:/bin/sh\n", me.uid(), me.gid());
        fs::write(dir.path().join("etc/passwd"), passwd).unwrap();
        fs::write(dir.path().join("etc/group"), format!("later:x:{}:\n", me.gid())).unwrap();
        assert!(fix_owners(&root).unwrap().is_empty());
        assert_eq!(fs::metadata(&file).unwrap().uid(), me.uid());
    }

    #[test]
    fn a_file_of_the_machines_is_never_replaced_by_a_key() {
        let (dir, root) = root_with_accounts();
        fs::create_dir_all(dir.path().join("run/keys")).unwrap();
        fs::write(dir.path().join("run/keys/token"), "the machine's").unwrap();
        let err = apply(&root, &[key("other", b"x"), key("token", b"x")], &[]).unwrap_err().to_string();
        assert_eq!(
            err,
            "key token: /run/keys/token exists on this machine and was not placed by flotilla; flotilla never replaces files it does not own: remove or move it on the machine, or give keys.token another destDir"
        );
        assert_eq!(fs::read_to_string(dir.path().join("run/keys/token")).unwrap(), "the machine's");
        assert!(!dir.path().join("run/keys/other").exists(), "checked before anything is written");
        // A key the agent placed is replaced as before.
        apply(&root, &[key("mine", b"1")], &[]).unwrap();
        apply(&root, &[key("mine", b"2")], &[]).unwrap();
        assert_eq!(fs::read(dir.path().join("run/keys/mine")).unwrap(), b"2");
    }

    /// Issue 13, item 1: a service user that owns its key in a directory it may write swaps
    /// the key for a link to another file; activation must not hand that file over.
    #[test]
    fn a_key_swapped_for_a_link_never_hands_over_the_linked_file() {
        let (dir, root) = root_with_accounts();
        let later = KeyUpload { user: "later".into(), group: "later".into(), ..key("tok", b"x") };
        apply(&root, &[later], &[]).unwrap();
        // The "victim": a root-owned file elsewhere on the machine.
        let victim = dir.path().join("etc/shadow");
        fs::write(&victim, "root:!:::::::\n").unwrap();
        std::os::unix::fs::chown(&victim, Some(0), Some(0)).unwrap();
        let file = dir.path().join("run/keys/tok");
        fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&victim, &file).unwrap();
        // The owner now exists, with another uid: a chown through the link would show.
        fs::write(dir.path().join("etc/passwd"), "later:x:4242:4242::/:/bin/sh\n").unwrap();
        fs::write(dir.path().join("etc/group"), "later:x:4242:\n").unwrap();
        let said = fix_owners(&root).unwrap();
        assert_eq!(fs::metadata(&victim).unwrap().uid(), 0, "the linked file was handed over");
        assert!(said.iter().any(|m| m.contains("no longer the file flotilla placed")), "{said:?}");
        // Nor is its content listed as the key's.
        assert!(list(&root).unwrap().is_empty());
    }

    #[test]
    fn a_key_directory_another_user_may_change_is_refused() {
        let (dir, root) = root_with_accounts();
        fs::create_dir_all(dir.path().join("shared")).unwrap();
        fs::set_permissions(dir.path().join("shared"), fs::Permissions::from_mode(0o1777)).unwrap();
        let k = KeyUpload { dest_dir: "/shared/app".into(), ..key("tok", b"x") };
        let err = apply(&root, &[k], &[]).unwrap_err().to_string();
        assert!(err.contains("destDir /shared/app is not private to root: /shared may be written by every user"), "{err}");
        assert!(!dir.path().join("shared/app").exists(), "nothing written");
        // A link on the way is refused too.
        std::os::unix::fs::symlink(dir.path().join("etc"), dir.path().join("linked")).unwrap();
        let k = KeyUpload { dest_dir: "/linked".into(), ..key("tok", b"x") };
        let err = apply(&root, &[k], &[]).unwrap_err().to_string();
        assert!(err.contains("/linked is a symbolic link"), "{err}");
        assert!(!dir.path().join("etc/tok").exists());
    }

    /// Every entry under `dir`: its path, and a file's contents or a link's target.
    fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let path = e.path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let what = if meta.is_dir() {
                    todo.push(path.clone());
                    format!("dir {:o}", meta.mode())
                } else if meta.file_type().is_symlink() {
                    format!("link to {}", fs::read_link(&path).unwrap().display())
                } else {
                    format!("file {:o}: {}", meta.mode(), String::from_utf8_lossy(&fs::read(&path).unwrap()))
                };
                out.insert(path.strip_prefix(dir).unwrap().to_owned(), what);
            }
        }
        out
    }

    /// A key whose name or directory climbs out is refused, and nothing is written: not in
    /// the machine, not beside it (the machine root sits one level down in the test's
    /// directory, so a key that escaped it would show up there).
    #[test]
    fn names_and_directories_cannot_escape() {
        let (outer, _) = root_with_accounts();
        let machine = outer.path().join("machine");
        fs::create_dir_all(machine.join("etc")).unwrap();
        fs::copy(outer.path().join("etc/passwd"), machine.join("etc/passwd")).unwrap();
        fs::copy(outer.path().join("etc/group"), machine.join("etc/group")).unwrap();
        let root = MachineRoot::new(&machine);
        root.prepare().unwrap();
        let before = tree(outer.path());
        let bad_names = ["../x", "../../../x", "a/../../x", "..", "x/y"];
        for name in bad_names {
            let err = apply(&root, &[key(name, b"escaped")], &[]).unwrap_err().to_string();
            assert!(err.contains("cannot name a key"), "{name}: {err}");
            assert_eq!(tree(outer.path()), before, "key {name:?} wrote something");
        }
        for dir in ["/run/../etc", "/../..", "/run/keys/../../..", "run/keys", "/"] {
            let bad = KeyUpload { dest_dir: dir.into(), ..key("a", b"escaped") };
            let err = apply(&root, &[bad], &[]).unwrap_err().to_string();
            assert!(err.contains("must be an absolute directory without `..`"), "{dir}: {err}");
            assert_eq!(tree(outer.path()), before, "destDir {dir:?} wrote something");
        }
        // Nor does a good key beside a bad one get written: all are checked first.
        let err = apply(&root, &[key("good", b"x"), key("../bad", b"x")], &[]);
        assert!(err.is_err());
        assert_eq!(tree(outer.path()), before, "a good key was written before a bad one was refused");
    }
}
