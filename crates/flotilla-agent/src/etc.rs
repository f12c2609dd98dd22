//! `/etc` entries of the current system. An entry without a mode is a symlink into the
//! toplevel (so it is read-only and follows generations); one with a mode is copied with its
//! owner and mode. The agent records what it placed in `nix/var/flotilla/etc.json`, and only
//! that is its own: entries it placed and the new system no longer has are removed, and
//! anything else in `/etc` is never touched. It must never replace a file it did not place:
//! a declared entry whose path exists and is not the agent's, or that would go under
//! something that is not a directory, fails the activation before anything changes, naming
//! the path and what to do.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;

use flotilla_model::{etc_relative, FileSpec};
use serde::{Deserialize, Serialize};

use crate::error::AgentError;
use crate::machine::{symlink_atomic, MachineRoot};

const STATE: &str = flotilla_protocol::layout::records::ETC;

/// What the agent placed: entry path → a fingerprint of what it placed there.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Placed {
    entries: BTreeMap<String, String>,
}

/// Entries added, changed and removed.
#[derive(Debug, Default)]
pub struct Changes {
    /// New entries.
    pub added: Vec<String>,
    /// Entries whose content or mode changed.
    pub changed: Vec<String>,
    /// Entries removed.
    pub removed: Vec<String>,
    /// Notes for the user (an entry of the agent's replaced on the machine, left in place).
    pub messages: Vec<String>,
}

/// What an entry is: for a link, its content's fingerprint then its target (which moves with
/// every new toplevel, though the content may not have changed); for a copy, its content.
fn fingerprint(toplevel_etc: &str, rel: &str, f: &FileSpec) -> String {
    match &f.mode {
        None => format!("link {} {toplevel_etc}/{rel}", fnv(f.text.as_deref().unwrap_or(""), f.source.as_deref().unwrap_or(""))),
        Some(mode) => format!("copy {mode} {}:{} {}", f.user, f.group, fnv(f.text.as_deref().unwrap_or(""), f.source.as_deref().unwrap_or(""))),
    }
}

/// The part of a fingerprint that says what a user reads in the file.
fn content(fp: &str) -> &str {
    match fp.strip_prefix("link ") {
        Some(rest) => rest.split(' ').next().unwrap_or(rest),
        None => fp,
    }
}

/// A cheap content fingerprint (FNV-1a): it only tells whether a copied file changed.
fn fnv(a: &str, b: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for byte in a.bytes().chain([0]).chain(b.bytes()) {
        h = (h ^ u64::from(byte)).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Why `path` cannot be placed, if something of the machine's is in the way: the path itself
/// when the agent did not place it, or a parent below `/etc` that is not a directory.
/// `leaving` are the agent's entries that go before anything is placed.
fn in_the_way(root: &MachineRoot, path: &str, files: &BTreeMap<String, FileSpec>, placed: &Placed, leaving: &BTreeSet<&str>) -> Option<String> {
    let rel = etc_relative(path)?;
    let never = "flotilla never replaces files it does not own";
    let mut parent = String::from("/etc");
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        parent = format!("{parent}/{part}");
        if files.contains_key(&parent) {
            return Some(format!("files.\"{parent}\" and files.\"{path}\" are both declared, but {parent} cannot be a file and a directory: drop one of them"));
        }
        match fs::symlink_metadata(root.path(&parent)) {
            Err(_) => break, // made as a directory, and nothing is under it yet
            Ok(m) if m.is_dir() => {}
            Ok(_) if leaving.contains(parent.as_str()) => break, // the agent's, removed first
            Ok(m) => {
                let what = if m.file_type().is_symlink() { "a symbolic link" } else { "a file" };
                return Some(format!(
                    "{parent} exists on this machine and is {what}, not a directory, so {path} cannot be placed in it; {never}: remove or move {parent} on the machine, or stop declaring files.\"{path}\""
                ));
            }
        }
    }
    if !placed.entries.contains_key(path) && fs::symlink_metadata(root.path(path)).is_ok() {
        return Some(format!(
            "{path} exists on this machine and was not placed by flotilla; {never}: remove or move it on the machine, or stop declaring files.\"{path}\""
        ));
    }
    None
}

/// Removes an entry the agent placed, unless something else took its place since (a link
/// entry that is no longer a link, a copy that is no longer a file): that stays, with a note.
fn remove_placed(root: &MachineRoot, path: &str, fingerprint: &str, messages: &mut Vec<String>) -> io::Result<()> {
    let dest = root.path(path);
    let meta = match fs::symlink_metadata(&dest) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let still_ours = if fingerprint.starts_with("link ") { meta.file_type().is_symlink() } else { meta.is_file() };
    if !still_ours {
        messages.push(format!("{path} was placed by flotilla, but something on the machine replaced it since: left in place"));
        return Ok(());
    }
    fs::remove_file(&dest)
}

/// Places the toplevel's `/etc` entries; with `dry`, only says what would change. Anything of
/// the machine's in the way of a declared entry is refused (`Conflict`) before anything
/// changes, dry or not.
pub fn apply(root: &MachineRoot, toplevel: &str, files: &BTreeMap<String, FileSpec>, lookup_id: &dyn Fn(&str, bool) -> Option<u32>, dry: bool) -> Result<Changes, AgentError> {
    let io_err = |what: String| move |source| AgentError::Io { what, source };
    let mut placed: Placed = root.read_state(STATE).map_err(io_err("cannot read the agent's etc.json".into()))?;
    let mut changes = Changes::default();
    let top_etc = format!("{toplevel}/etc");
    let mut next = BTreeMap::new();

    let leaving: BTreeSet<&str> = placed.entries.keys().filter(|p| !files.contains_key(*p)).map(String::as_str).collect();
    let refused: Vec<String> = files.keys().filter_map(|p| in_the_way(root, p, files, &placed, &leaving)).collect();
    if !refused.is_empty() {
        return Err(AgentError::Conflict(refused.join("; ")));
    }

    // What the new system no longer has goes first: it may be where a new entry's directory goes.
    for path in &leaving {
        changes.removed.push((*path).to_owned());
        if !dry {
            remove_placed(root, path, &placed.entries[*path], &mut changes.messages).map_err(io_err(format!("cannot remove {path}")))?;
        }
    }

    for (path, f) in files {
        let Some(rel) = etc_relative(path) else { continue };
        let fp = fingerprint(&top_etc, rel, f);
        match placed.entries.get(path) {
            None => changes.added.push(path.clone()),
            Some(old) if content(old) != content(&fp) => changes.changed.push(path.clone()),
            _ => {}
        }
        next.insert(path.clone(), fp.clone());
        if dry || placed.entries.get(path) == Some(&fp) && fs::symlink_metadata(root.path(path)).is_ok() {
            continue;
        }
        place(root, &top_etc, rel, path, f, lookup_id).map_err(io_err(format!("cannot place {path}")))?;
        // Recorded as each is placed: an activation that fails half-way knows what is its own.
        placed.entries.insert(path.clone(), fp);
        root.write_state(STATE, &placed).map_err(io_err("cannot write the agent's etc.json".into()))?;
    }

    if !dry {
        placed.entries = next;
        root.write_state(STATE, &placed).map_err(io_err("cannot write the agent's etc.json".into()))?;
    }
    Ok(changes)
}

fn place(root: &MachineRoot, top_etc: &str, rel: &str, path: &str, f: &FileSpec, lookup_id: &dyn Fn(&str, bool) -> Option<u32>) -> io::Result<()> {
    // The agent (root) makes, writes and renames inside this directory: nobody else may
    // change it or the way to it, checked before anything is made there.
    let dir = Path::new(path).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(problem) = root.not_private(&dir)? {
        return Err(io::Error::other(format!(
            "{dir} is not private to root ({problem}), so another user could swap {path} for a link to any file; make it root's and not writable by others on the machine"
        )));
    }
    let dest = root.path(path);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    match &f.mode {
        None => symlink_atomic(Path::new(&format!("{top_etc}/{rel}")), &dest),
        Some(mode) => {
            let content = match (&f.text, &f.source) {
                (Some(t), _) => t.clone().into_bytes(),
                (None, Some(src)) => fs::read(root.path(src))?,
                (None, None) => Vec::new(),
            };
            let mode = u32::from_str_radix(mode, 8).unwrap_or(0o644);
            crate::machine::replace_private(&dest, &content, mode, (lookup_id(&f.user, true), lookup_id(&f.group, false)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const TOP: &str = "/nix/store/00000000000000000000000000000000-system";

    fn machine() -> (tempfile::TempDir, MachineRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = MachineRoot::new(dir.path());
        fs::create_dir_all(root.path("/etc")).unwrap();
        fs::create_dir_all(root.state_dir()).unwrap();
        (dir, root)
    }

    fn link(text: &str) -> FileSpec {
        FileSpec { text: Some(text.into()), source: None, mode: None, user: "root".into(), group: "root".into(), allow_setuid: false }
    }

    fn files(list: &[(&str, FileSpec)]) -> BTreeMap<String, FileSpec> {
        list.iter().map(|(p, f)| ((*p).to_owned(), f.clone())).collect()
    }

    fn run(root: &MachineRoot, declared: &BTreeMap<String, FileSpec>, dry: bool) -> Result<Changes, AgentError> {
        apply(root, TOP, declared, &|_, _| Some(0), dry)
    }

    fn refusal(r: Result<Changes, AgentError>) -> String {
        match r {
            Err(AgentError::Conflict(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_file_of_the_machines_in_the_way_is_refused_before_anything_is_placed() {
        let (_d, root) = machine();
        fs::write(root.path("/etc/motd"), "the machine's\n").unwrap();
        let declared = files(&[("/etc/hosts.extra", link("a")), ("/etc/motd", link("b"))]);
        for dry in [true, false] {
            let err = refusal(run(&root, &declared, dry));
            assert_eq!(
                err,
                "/etc/motd exists on this machine and was not placed by flotilla; flotilla never replaces files it does not own: remove or move it on the machine, or stop declaring files.\"/etc/motd\""
            );
        }
        assert_eq!(fs::read_to_string(root.path("/etc/motd")).unwrap(), "the machine's\n");
        assert!(fs::symlink_metadata(root.path("/etc/hosts.extra")).is_err(), "nothing placed");
        assert!(!root.path("/etc/motd.flotilla-backup").exists());
        assert!(!root.state_dir().join(STATE).exists());
    }

    #[test]
    fn a_file_or_link_where_a_directory_goes_is_refused() {
        let (_d, root) = machine();
        fs::write(root.path("/etc/foo"), "a file").unwrap();
        let err = refusal(run(&root, &files(&[("/etc/foo/bar", link("x"))]), false));
        assert_eq!(
            err,
            "/etc/foo exists on this machine and is a file, not a directory, so /etc/foo/bar cannot be placed in it; flotilla never replaces files it does not own: remove or move /etc/foo on the machine, or stop declaring files.\"/etc/foo/bar\""
        );
        fs::create_dir_all(root.path("/srv/conf")).unwrap();
        std::os::unix::fs::symlink("/srv/conf", root.path("/etc/conf")).unwrap();
        let err = refusal(run(&root, &files(&[("/etc/conf/app.ini", link("x"))]), false));
        assert!(err.starts_with("/etc/conf exists on this machine and is a symbolic link, not a directory"), "{err}");
        assert!(fs::read_dir(root.path("/srv/conf")).unwrap().next().is_none(), "nothing written through the link");
    }

    #[test]
    fn the_agents_own_entries_are_placed_changed_and_removed_and_others_never_touched() {
        let (_d, root) = machine();
        fs::create_dir_all(root.path("/etc/app")).unwrap();
        fs::write(root.path("/etc/app/machine.conf"), "mine").unwrap();
        let c = run(&root, &files(&[("/etc/app/flotilla.conf", link("1")), ("/etc/motd", link("hi"))]), false).unwrap();
        assert_eq!(c.added, ["/etc/app/flotilla.conf", "/etc/motd"]);
        assert_eq!(fs::read_link(root.path("/etc/motd")).unwrap(), Path::new(&format!("{TOP}/etc/motd")));

        // Placed by the agent before: replaced without complaint.
        let c = run(&root, &files(&[("/etc/app/flotilla.conf", link("2")), ("/etc/motd", link("hi"))]), false).unwrap();
        assert_eq!(c.changed, ["/etc/app/flotilla.conf"]);

        // Removed when no longer declared; one the machine replaced since stays, with a note.
        fs::remove_file(root.path("/etc/motd")).unwrap();
        fs::write(root.path("/etc/motd"), "an admin's").unwrap();
        let c = run(&root, &BTreeMap::new(), false).unwrap();
        assert_eq!(c.removed, ["/etc/app/flotilla.conf", "/etc/motd"]);
        assert!(fs::symlink_metadata(root.path("/etc/app/flotilla.conf")).is_err());
        assert_eq!(fs::read_to_string(root.path("/etc/motd")).unwrap(), "an admin's");
        assert_eq!(c.messages, ["/etc/motd was placed by flotilla, but something on the machine replaced it since: left in place"]);
        assert_eq!(fs::read_to_string(root.path("/etc/app/machine.conf")).unwrap(), "mine");
        // And it is no longer the agent's: declaring it again is refused.
        refusal(run(&root, &files(&[("/etc/motd", link("hi"))]), false));
    }

    /// Issue 13, item 1: a directory under /etc that another user may write could hold a
    /// link where the agent (root) writes its temporary copy; that directory is refused and
    /// the link's target never written.
    #[test]
    fn an_etc_directory_others_may_write_is_refused_and_no_link_followed() {
        let (_d, root) = machine();
        let victim = root.path("/victim");
        fs::write(&victim, "untouched").unwrap();
        fs::create_dir_all(root.path("/etc/app")).unwrap();
        fs::set_permissions(root.path("/etc/app"), fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(&victim, root.path("/etc/app/.conf.flotilla-tmp")).unwrap();
        let copy = FileSpec { mode: Some("0644".into()), ..link("written by root") };
        let err = run(&root, &files(&[("/etc/app/conf", copy.clone())]), false).unwrap_err().to_string();
        assert!(err.contains("/etc/app is not private to root (/etc/app may be written by every user (mode 777))"), "{err}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        // Made private again, the leftover link is removed, never followed.
        fs::set_permissions(root.path("/etc/app"), fs::Permissions::from_mode(0o755)).unwrap();
        run(&root, &files(&[("/etc/app/conf", copy)]), false).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(fs::read_to_string(root.path("/etc/app/conf")).unwrap(), "written by root");
    }

    #[test]
    fn an_entry_of_the_agents_that_goes_may_become_a_directory() {
        let (_d, root) = machine();
        run(&root, &files(&[("/etc/foo", link("file"))]), false).unwrap();
        let c = run(&root, &files(&[("/etc/foo/bar", link("nested"))]), false).unwrap();
        assert_eq!((c.added, c.removed), (vec!["/etc/foo/bar".to_owned()], vec!["/etc/foo".to_owned()]));
        assert!(root.path("/etc/foo").is_dir());
    }
}
