//! Users and groups of a machine whose root the agent owns: it writes `/etc/passwd` and
//! `/etc/group` itself (no NSS, no shadow tools), keeps every entry it did not create, and
//! records which entries are its own in `nix/var/flotilla/accounts.json` so that a user
//! dropped from the config is removed and a user kept keeps its uid.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use flotilla_model::{GroupSpec, UserSpec};
use serde::{Deserialize, Serialize};

use crate::machine::{write_atomic, MachineRoot};

const STATE: &str = "accounts.json";

/// The agent's own entries, with the ids they were given.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Owned {
    users: BTreeMap<String, u32>,
    groups: BTreeMap<String, u32>,
}

/// One line of passwd or group, split on `:`.
type Entry = Vec<String>;

fn parse(text: &str) -> Vec<Entry> {
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| l.split(':').map(str::to_owned).collect()).collect()
}

fn render(entries: &[Entry]) -> String {
    entries.iter().map(|e| e.join(":") + "\n").collect()
}

/// Users and groups added and removed.
#[derive(Debug, Default)]
pub struct Changes {
    /// New users and groups (`user x`, `group y`).
    pub added: Vec<String>,
    /// Removed ones.
    pub removed: Vec<String>,
}

/// Brings passwd and group in line with the declared users and groups; with `dry`, only says
/// what it would change.
pub fn apply(root: &MachineRoot, users: &BTreeMap<String, UserSpec>, groups: &BTreeMap<String, GroupSpec>, dry: bool) -> io::Result<Changes> {
    let passwd_path = root.path("/etc/passwd");
    let group_path = root.path("/etc/group");
    let mut passwd = parse(&std::fs::read_to_string(&passwd_path).unwrap_or_default());
    let mut group = parse(&std::fs::read_to_string(&group_path).unwrap_or_default());
    let mut owned: Owned = root.read_state(STATE)?;
    let mut changes = Changes::default();

    // The accounts every machine has.
    for (name, line) in [("root", "root:x:0:0:root:/root:/bin/sh"), ("nobody", "nobody:x:65534:65534:nobody:/var/empty:/bin/false")] {
        if !passwd.iter().any(|e| e[0] == name) {
            passwd.push(line.split(':').map(str::to_owned).collect());
        }
    }
    for (name, line) in [("root", "root:x:0:"), ("nogroup", "nogroup:x:65534:"), ("nobody", "nobody:x:65534:")] {
        if !group.iter().any(|e| e[0] == name) {
            group.push(line.split(':').map(str::to_owned).collect());
        }
    }

    // Groups: declared ones, plus one per user without a declared primary group.
    let mut want_groups: BTreeMap<String, Option<u32>> = groups.iter().map(|(n, g)| (n.clone(), g.gid)).collect();
    for (n, u) in users {
        if u.group.is_none() {
            want_groups.entry(n.clone()).or_insert(u.uid);
        }
    }
    // Drop what we own and no longer want.
    for name in owned.groups.keys().cloned().collect::<Vec<_>>() {
        if !want_groups.contains_key(&name) {
            group.retain(|e| e[0] != name);
            owned.groups.remove(&name);
            changes.removed.push(format!("group {name}"));
        }
    }
    for name in owned.users.keys().cloned().collect::<Vec<_>>() {
        if !users.contains_key(&name) {
            passwd.retain(|e| e[0] != name);
            owned.users.remove(&name);
            changes.removed.push(format!("user {name}"));
        }
    }

    let id_of = |entries: &[Entry], name: &str| entries.iter().find(|e| e[0] == name).and_then(|e| e.get(2)?.parse::<u32>().ok());
    let free_id = |entries: &[Entry], wanted: Option<u32>| -> u32 {
        let used: BTreeSet<u32> = entries.iter().filter_map(|e| e.get(2)?.parse().ok()).collect();
        match wanted {
            Some(id) if !used.contains(&id) => id,
            _ => (1000..60000).find(|i| !used.contains(i)).unwrap_or(60000),
        }
    };

    for (name, wanted) in &want_groups {
        let gid = match (id_of(&group, name), owned.groups.get(name)) {
            (Some(existing), _) if wanted.is_none_or(|w| w == existing) => existing,
            (Some(_), _) => {
                group.retain(|e| &e[0] != name);
                wanted.expect("checked above")
            }
            (None, prev) => free_id(&group, wanted.or(prev.copied())),
        };
        if id_of(&group, name).is_none() {
            group.push(vec![name.clone(), "x".into(), gid.to_string(), String::new()]);
            if !owned.groups.contains_key(name) {
                changes.added.push(format!("group {name}"));
            }
        }
        if !BUILTIN.contains(&name.as_str()) {
            owned.groups.insert(name.clone(), gid);
        }
    }

    for (name, u) in users {
        let primary = u.group.clone().unwrap_or_else(|| name.clone());
        let gid = id_of(&group, &primary).unwrap_or(65534);
        let uid = match (id_of(&passwd, name), u.uid) {
            (Some(existing), None) => existing,
            (Some(existing), Some(w)) if existing == w => existing,
            (_, wanted) => {
                passwd.retain(|e| &e[0] != name);
                free_id(&passwd, wanted.or(owned.users.get(name).copied()))
            }
        };
        let line = vec![name.clone(), "x".into(), uid.to_string(), gid.to_string(), u.description.clone(), u.home.clone(), u.shell.clone()];
        match passwd.iter_mut().find(|e| &e[0] == name) {
            Some(e) => *e = line,
            None => {
                passwd.push(line);
                if !owned.users.contains_key(name) {
                    changes.added.push(format!("user {name}"));
                }
            }
        }
        owned.users.insert(name.clone(), uid);
        // Supplementary groups list their members.
        for g in &u.extra_groups {
            if let Some(e) = group.iter_mut().find(|e| &e[0] == g) {
                while e.len() < 4 {
                    e.push(String::new());
                }
                let mut members: BTreeSet<String> = e[3].split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect();
                members.insert(name.clone());
                e[3] = members.into_iter().collect::<Vec<_>>().join(",");
            }
        }
    }

    if !dry {
        write_atomic(&passwd_path, render(&passwd).as_bytes())?;
        write_atomic(&group_path, render(&group).as_bytes())?;
        root.write_state(STATE, &owned)?;
    }
    Ok(changes)
}

const BUILTIN: &[&str] = &["root", "nogroup", "nobody"];

/// The uid (`user`) or gid of `name` in the machine's passwd or group file.
pub fn lookup_id(root: &MachineRoot, name: &str, user: bool) -> Option<u32> {
    let file = root.path(if user { "/etc/passwd" } else { "/etc/group" });
    parse(&std::fs::read_to_string(file).ok()?).into_iter().find(|e| e[0] == name).and_then(|e| e.get(2)?.parse().ok())
}
