//! `/etc` entries of the current system. An entry without a mode is a symlink into the
//! toplevel (so it is read-only and follows generations); one with a mode is copied with its
//! owner and mode. The agent records what it placed in `nix/var/flotilla/etc.json`: entries
//! it placed and the new system no longer has are removed; anything else in `/etc` is left
//! alone, and a file in the way of a declared entry is kept as `<name>.flotilla-backup`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;

use flotilla_model::{etc_relative, FileSpec};
use serde::{Deserialize, Serialize};

use crate::machine::{symlink_atomic, MachineRoot};

const STATE: &str = "etc.json";

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
    /// Notes for the user (backups made).
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

/// Places the toplevel's `/etc` entries; with `dry`, only says what would change.
pub fn apply(root: &MachineRoot, toplevel: &str, files: &BTreeMap<String, FileSpec>, lookup_id: &dyn Fn(&str, bool) -> Option<u32>, dry: bool) -> io::Result<Changes> {
    let mut placed: Placed = root.read_state(STATE)?;
    let mut changes = Changes::default();
    let top_etc = format!("{toplevel}/etc");
    let mut next = BTreeMap::new();

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
        let dest = root.path(path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        if !placed.entries.contains_key(path) && fs::symlink_metadata(&dest).is_ok() {
            let backup = dest.with_file_name(format!("{}.flotilla-backup", dest.file_name().unwrap_or_default().to_string_lossy()));
            fs::rename(&dest, &backup)?;
            changes.messages.push(format!("{path} existed and was not flotilla's: kept as {}", backup.display()));
        }
        match &f.mode {
            None => symlink_atomic(Path::new(&format!("{top_etc}/{rel}")), &dest)?,
            Some(mode) => {
                let content = match (&f.text, &f.source) {
                    (Some(t), _) => t.clone().into_bytes(),
                    (None, Some(src)) => fs::read(root.path(src))?,
                    (None, None) => Vec::new(),
                };
                let tmp = dest.with_file_name(format!(".{}.flotilla-tmp", dest.file_name().unwrap_or_default().to_string_lossy()));
                fs::write(&tmp, &content)?;
                let mode = u32::from_str_radix(mode, 8).unwrap_or(0o644);
                fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
                chown(&tmp, lookup_id(&f.user, true), lookup_id(&f.group, false))?;
                fs::rename(&tmp, &dest)?;
            }
        }
    }

    for path in placed.entries.keys() {
        if !next.contains_key(path) {
            changes.removed.push(path.clone());
            if !dry {
                match fs::remove_file(root.path(path)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    if !dry {
        placed.entries = next;
        root.write_state(STATE, &placed)?;
    }
    Ok(changes)
}
