//! Users and groups of a machine. The agent writes `/etc/passwd` and `/etc/group` itself (no
//! NSS, no shadow tools) and records the accounts it created in
//! `nix/var/flotilla/accounts.json`: only those are its own. A user it created and the config
//! no longer has is removed; one kept keeps its uid.
//!
//! An account that exists and is not in that record is the machine's (a container's root
//! filesystem, or the accounts of a server flotilla deploys to over ssh). Declaring it means
//! "use this account": the agent takes its ids as they are, never rewrites its line, never
//! records it as its own and never deletes it. A declaration that contradicts it (another
//! uid, gid, primary group or home) is refused before anything changes, since the agent must
//! not change an account it did not create. It must never rewrite a line it does not own;
//! the one edit it makes to others' lines is a member list, when one of the declared users
//! joins an existing group, and it records that membership and undoes it when the user or
//! the declaration goes.
//!
//! When `/etc/shadow` (`/etc/gshadow`) exists, a user (group) the agent creates gets a locked
//! line there, removed with it; those files keep their owner and mode.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_model::{GroupSpec, UserSpec};
use serde::{Deserialize, Serialize};

use crate::accounts_file::{find, id_of, members_mut, parse, render, set_members, write_keeping_owner, Entry};
use crate::error::AgentError;
use crate::machine::MachineRoot;

const STATE: &str = flotilla_protocol::layout::records::ACCOUNTS;

/// `users.<name>.home` when the config does not set it (`nix/options.nix`).
const DEFAULT_HOME: &str = "/var/empty";

/// The agent's own entries, with the ids they were given, and the memberships it added.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Owned {
    users: BTreeMap<String, u32>,
    groups: BTreeMap<String, u32>,
    /// Group → the users the agent listed as its members (in any group, its own or not).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    members: BTreeMap<String, BTreeSet<String>>,
}

impl Owned {
    /// Everything in `self` or `other` (ids from `other`): what to record before the account
    /// files change, so a crash half-way never leaves an account of ours looking like the
    /// machine's.
    fn union(&self, other: &Owned) -> Owned {
        let mut out = self.clone();
        out.users.extend(other.users.iter().map(|(k, v)| (k.clone(), *v)));
        out.groups.extend(other.groups.iter().map(|(k, v)| (k.clone(), *v)));
        for (g, users) in &other.members {
            out.members.entry(g.clone()).or_default().extend(users.iter().cloned());
        }
        out
    }
}

/// Adds (`add`) or removes `user` from group `name`'s member list in `entries`.
fn edit_membership(entries: &mut [Entry], name: &str, user: &str, add: bool) {
    if let Some(e) = entries.iter_mut().find(|e| e[0] == name) {
        let mut members = members_mut(e);
        let changed = if add { members.insert(user.to_owned()) } else { members.remove(user) };
        if changed {
            set_members(e, &members);
        }
    }
}

/// The account files as read, and as they will be written.
struct Files {
    passwd: Vec<Entry>,
    group: Vec<Entry>,
    /// `None` when the machine has no `/etc/shadow`.
    shadow: Option<Vec<Entry>>,
    gshadow: Option<Vec<Entry>>,
}

impl Files {
    fn read(root: &MachineRoot) -> io::Result<Files> {
        let read = |p: &str| -> io::Result<Option<Vec<Entry>>> {
            match fs::read_to_string(root.path(p)) {
                Ok(text) => Ok(Some(parse(&text))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        };
        Ok(Files {
            passwd: read("/etc/passwd")?.unwrap_or_default(),
            group: read("/etc/group")?.unwrap_or_default(),
            shadow: read("/etc/shadow")?,
            gshadow: read("/etc/gshadow")?,
        })
    }

    /// Adds a user's passwd line, and its locked shadow line when the machine has shadow.
    fn add_user(&mut self, line: Entry) {
        if let Some(shadow) = &mut self.shadow {
            if find(shadow, &line[0]).is_none() {
                shadow.push(vec![line[0].clone(), "!".into(), days_since_epoch().to_string(), String::new(), String::new(), String::new(), String::new(), String::new(), String::new()]);
            }
        }
        self.passwd.push(line);
    }

    fn add_group(&mut self, name: &str, gid: u32) {
        if let Some(gshadow) = &mut self.gshadow {
            if find(gshadow, name).is_none() {
                gshadow.push(vec![name.to_owned(), "!".into(), String::new(), String::new()]);
            }
        }
        self.group.push(vec![name.to_owned(), "x".into(), gid.to_string(), String::new()]);
    }

    /// Removes a user the agent created: its lines, and its name from every member list (as
    /// `userdel` does, so that a later account of that name inherits nothing).
    fn remove_user(&mut self, name: &str) {
        self.passwd.retain(|e| e[0] != name);
        if let Some(shadow) = &mut self.shadow {
            shadow.retain(|e| e[0] != name);
        }
        for entries in [Some(&mut self.group), self.gshadow.as_mut()].into_iter().flatten() {
            for e in entries.iter_mut().filter(|e| e.len() >= 4 && !e[0].starts_with('#')) {
                let mut members = members_mut(e);
                if members.remove(name) {
                    set_members(e, &members);
                }
            }
        }
    }

    fn remove_group(&mut self, name: &str) {
        self.group.retain(|e| e[0] != name);
        if let Some(gshadow) = &mut self.gshadow {
            gshadow.retain(|e| e[0] != name);
        }
    }

    fn membership(&mut self, group: &str, user: &str, add: bool) {
        edit_membership(&mut self.group, group, user, add);
        if let Some(gshadow) = &mut self.gshadow {
            edit_membership(gshadow, group, user, add);
        }
    }

    fn write(&self, root: &MachineRoot) -> io::Result<()> {
        write_keeping_owner(&root.path("/etc/passwd"), render(&self.passwd).as_bytes(), 0o644)?;
        write_keeping_owner(&root.path("/etc/group"), render(&self.group).as_bytes(), 0o644)?;
        if let Some(shadow) = &self.shadow {
            write_keeping_owner(&root.path("/etc/shadow"), render(shadow).as_bytes(), 0o600)?;
        }
        if let Some(gshadow) = &self.gshadow {
            write_keeping_owner(&root.path("/etc/gshadow"), render(gshadow).as_bytes(), 0o600)?;
        }
        Ok(())
    }
}

fn days_since_epoch() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() / 86400).unwrap_or(0)
}

/// Users and groups added and removed.
#[derive(Debug, Default)]
pub struct Changes {
    /// New users and groups (`user x`, `group y`).
    pub added: Vec<String>,
    /// Removed ones.
    pub removed: Vec<String>,
}

/// Brings passwd and group (and shadow, gshadow) in line with the declared users and groups;
/// with `dry`, only says what it would change. A declaration that contradicts an account the
/// agent did not create is refused (`Conflict`) before anything is written, dry or not.
pub fn apply(root: &MachineRoot, users: &BTreeMap<String, UserSpec>, groups: &BTreeMap<String, GroupSpec>, dry: bool) -> Result<Changes, AgentError> {
    let io_err = |what: &str| {
        let what = what.to_owned();
        move |source| AgentError::Io { what, source }
    };
    let mut files = Files::read(root).map_err(io_err("cannot read the machine's account files"))?;
    let before: Owned = root.read_state(STATE).map_err(io_err("cannot read the agent's accounts.json"))?;
    let mut owned = before.clone();
    let mut changes = Changes::default();

    // The accounts every machine has; the machine's own when it has them.
    for (name, line) in [("root", "root:x:0:0:root:/root:/bin/sh"), ("nobody", "nobody:x:65534:65534:nobody:/var/empty:/bin/false")] {
        if find(&files.passwd, name).is_none() {
            files.add_user(line.split(':').map(str::to_owned).collect());
        }
    }
    for (name, gid) in [("root", 0), ("nogroup", 65534), ("nobody", 65534)] {
        if find(&files.group, name).is_none() {
            files.add_group(name, gid);
        }
    }

    // Accounts that exist and the agent did not create are the machine's.
    let names = |entries: &[Entry], ours: &BTreeMap<String, u32>| -> BTreeSet<String> {
        entries.iter().map(|e| e[0].clone()).filter(|n| !n.is_empty() && !n.starts_with('#') && !ours.contains_key(n)).collect()
    };
    let machines_users = names(&files.passwd, &owned.users);
    let machines_groups = names(&files.group, &owned.groups);

    // Groups: declared ones, plus one per user without a declared primary group (a user of the
    // machine's keeps the primary group it has). Only a declared gid must match the machine's.
    let mut want_groups: BTreeMap<String, Option<u32>> = groups.iter().map(|(n, g)| (n.clone(), g.gid)).collect();
    for (n, u) in users {
        if u.group.is_none() && !machines_users.contains(n) {
            want_groups.entry(n.clone()).or_insert(u.uid);
        }
    }

    // Refuse what would change an account of the machine's, before anything changes.
    let mut refused = Vec::new();
    let not_ours = "and was not created by flotilla; flotilla does not change accounts it did not create";
    for (name, g) in groups {
        if let (true, Some(existing), Some(declared)) = (machines_groups.contains(name), id_of(&files.group, name), g.gid) {
            if existing != declared {
                refused.push(format!("group {name}: exists on this machine with gid {existing}, not the declared {declared}, {not_ours}: drop groups.{name}.gid or use another name"));
            }
        }
    }
    for (name, u) in users {
        if !machines_users.contains(name) {
            continue;
        }
        let entry = find(&files.passwd, name).expect("exists").clone();
        let field = |i: usize| entry.get(i).cloned().unwrap_or_default();
        if let (Ok(existing), Some(declared)) = (field(2).parse::<u32>(), u.uid) {
            if existing != declared {
                refused.push(format!("user {name}: exists on this machine with uid {existing}, not the declared {declared}, {not_ours}: drop users.{name}.uid or use another name"));
            }
        }
        // The primary group is checked against the group as it exists or will be made.
        if let Some(primary) = &u.group {
            let host_gid = field(3);
            let declared_gid = id_of(&files.group, primary);
            if declared_gid.map(|g| g.to_string()).as_deref() != Some(host_gid.as_str()) {
                let host_group = files.group.iter().find(|e| e.get(2) == Some(&host_gid)).map(|e| e[0].clone());
                let has = host_group.map_or(format!("gid {host_gid}"), |g| format!("{g} (gid {host_gid})"));
                refused.push(format!(
                    "user {name}: exists on this machine with primary group {has}, not the declared {primary}, {not_ours}: drop users.{name}.group or use another name"
                ));
            }
        }
        // Home is what the user's services get as HOME: another one would surprise them. Its
        // default stands for "not set" (the config cannot tell the two apart). Shell and
        // description are not checked: the option defaults fill them in, so a difference
        // usually means the config did not say, and neither changes what services run as or
        // may touch; the machine's values stay.
        let home = field(5);
        if u.home != home && u.home != DEFAULT_HOME {
            refused.push(format!("user {name}: exists on this machine with home {home}, not the declared {}, {not_ours}: drop users.{name}.home or use another name", u.home));
        }
    }
    if !refused.is_empty() {
        return Err(AgentError::Conflict(refused.join("; ")));
    }

    // Drop what we own and no longer want.
    for name in owned.groups.keys().cloned().collect::<Vec<_>>() {
        if !want_groups.contains_key(&name) {
            files.remove_group(&name);
            owned.groups.remove(&name);
            owned.members.remove(&name);
            changes.removed.push(format!("group {name}"));
        }
    }
    for name in owned.users.keys().cloned().collect::<Vec<_>>() {
        if !users.contains_key(&name) {
            files.remove_user(&name);
            owned.users.remove(&name);
            for m in owned.members.values_mut() {
                m.remove(&name);
            }
            changes.removed.push(format!("user {name}"));
        }
    }

    let free_id = |entries: &[Entry], wanted: Option<u32>| -> u32 {
        let used: BTreeSet<u32> = entries.iter().filter(|e| !e[0].starts_with('#')).filter_map(|e| e.get(2)?.parse().ok()).collect();
        match wanted {
            Some(id) if !used.contains(&id) => id,
            _ => (1000..60000).find(|i| !used.contains(i)).unwrap_or(60000),
        }
    };

    for (name, wanted) in &want_groups {
        if machines_groups.contains(name) {
            continue; // used as it is (a declared gid that differs was refused above)
        }
        let gid = match id_of(&files.group, name) {
            Some(existing) => match *wanted {
                // Ours, with another gid than the config wants now: change it in place.
                Some(w) if w != existing => {
                    if let Some(e) = files.group.iter_mut().find(|e| &e[0] == name) {
                        e[2] = w.to_string();
                    }
                    w
                }
                _ => existing,
            },
            None => {
                let gid = free_id(&files.group, wanted.or(owned.groups.get(name).copied()));
                files.add_group(name, gid);
                if !owned.groups.contains_key(name) {
                    changes.added.push(format!("group {name}"));
                }
                gid
            }
        };
        owned.groups.insert(name.clone(), gid);
    }

    for (name, u) in users {
        if !machines_users.contains(name) {
            let primary = u.group.clone().unwrap_or_else(|| name.clone());
            let gid = id_of(&files.group, &primary).unwrap_or(65534);
            let uid = match (id_of(&files.passwd, name), u.uid) {
                (Some(existing), None) => existing,
                (Some(existing), Some(w)) if existing == w => existing,
                (_, wanted) => {
                    files.passwd.retain(|e| &e[0] != name);
                    free_id(&files.passwd, wanted.or(owned.users.get(name).copied()))
                }
            };
            let line = vec![name.clone(), "x".into(), uid.to_string(), gid.to_string(), u.description.clone(), u.home.clone(), u.shell.clone()];
            match files.passwd.iter_mut().find(|e| &e[0] == name) {
                Some(e) => *e = line,
                None => {
                    files.add_user(line);
                    if !owned.users.contains_key(name) {
                        changes.added.push(format!("user {name}"));
                    }
                }
            }
            owned.users.insert(name.clone(), uid);
        }
    }

    // Supplementary groups list their members. A membership the agent added is recorded and
    // undone when it is no longer declared; one that was there before is not the agent's.
    let want_members: BTreeSet<(String, String)> = users.iter().flat_map(|(n, u)| u.extra_groups.iter().map(move |g| (g.clone(), n.clone()))).collect();
    for (g, members) in owned.members.clone() {
        for user in members {
            if !want_members.contains(&(g.clone(), user.clone())) {
                files.membership(&g, &user, false);
                if let Some(m) = owned.members.get_mut(&g) {
                    m.remove(&user);
                }
            }
        }
    }
    owned.members.retain(|_, m| !m.is_empty());
    for (g, user) in &want_members {
        let Some(mut e) = find(&files.group, g).cloned() else { continue };
        if members_mut(&mut e).contains(user) {
            continue;
        }
        files.membership(g, user, true);
        owned.members.entry(g.clone()).or_default().insert(user.clone());
    }

    if !dry {
        // Record first what will be ours, so a crash between these writes never leaves an
        // account of ours looking like the machine's (it would never be removed).
        root.write_state(STATE, &before.union(&owned)).map_err(io_err("cannot write the agent's accounts.json"))?;
        files.write(root).map_err(io_err("cannot write /etc/passwd, /etc/group, /etc/shadow or /etc/gshadow"))?;
        root.write_state(STATE, &owned).map_err(io_err("cannot write the agent's accounts.json"))?;
    }
    Ok(changes)
}

/// The uid (`user`) or gid of `name` in the machine's passwd or group file.
pub fn lookup_id(root: &MachineRoot, name: &str, user: bool) -> Option<u32> {
    let file = root.path(if user { "/etc/passwd" } else { "/etc/group" });
    id_of(&parse(&fs::read_to_string(file).ok()?), name)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    struct Machine {
        _dir: tempfile::TempDir,
        root: MachineRoot,
    }

    impl Machine {
        fn new(passwd: &str, group: &str) -> Machine {
            let dir = tempfile::tempdir().unwrap();
            let root = MachineRoot::new(dir.path());
            fs::create_dir_all(root.path("/etc")).unwrap();
            fs::create_dir_all(root.state_dir()).unwrap();
            fs::write(root.path("/etc/passwd"), passwd).unwrap();
            fs::write(root.path("/etc/group"), group).unwrap();
            Machine { _dir: dir, root }
        }
        fn read(&self, file: &str) -> String {
            fs::read_to_string(self.root.path(file)).unwrap()
        }
        fn owned(&self) -> Owned {
            self.root.read_state(STATE).unwrap()
        }
    }

    /// A Debian-like machine: root, nobody, a web server account and a certificate group.
    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nwww-data:x:33:\nssl-cert:x:110:postgres\nnogroup:x:65534:\nnobody:x:65534:\n";

    fn user() -> UserSpec {
        UserSpec { uid: None, group: None, extra_groups: Vec::new(), home: DEFAULT_HOME.into(), shell: "/bin/sh".into(), description: String::new() }
    }

    fn users(list: &[(&str, UserSpec)]) -> BTreeMap<String, UserSpec> {
        list.iter().map(|(n, u)| ((*n).to_owned(), u.clone())).collect()
    }

    fn groups(list: &[(&str, Option<u32>)]) -> BTreeMap<String, GroupSpec> {
        list.iter().map(|(n, gid)| ((*n).to_owned(), GroupSpec { gid: *gid })).collect()
    }

    fn refusal(r: Result<Changes, AgentError>) -> String {
        match r {
            Err(AgentError::Conflict(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_user_of_the_machines_is_used_as_it_is_never_recorded_and_never_removed() {
        let m = Machine::new(PASSWD, GROUP);
        // Declared with the option defaults for home and shell, which differ from the machine's.
        let c = apply(&m.root, &users(&[("www-data", user())]), &BTreeMap::new(), false).unwrap();
        assert!(c.added.is_empty() && c.removed.is_empty(), "{c:?}");
        assert_eq!(m.read("/etc/passwd"), PASSWD, "its line is not rewritten");
        assert_eq!(m.read("/etc/group"), GROUP);
        assert!(m.owned().users.is_empty() && m.owned().groups.is_empty(), "{:?}", m.owned());
        assert_eq!(lookup_id(&m.root, "www-data", true), Some(33));

        let c = apply(&m.root, &BTreeMap::new(), &BTreeMap::new(), false).unwrap();
        assert!(c.removed.is_empty(), "{c:?}");
        assert_eq!(m.read("/etc/passwd"), PASSWD, "not removed when it leaves the config");
    }

    #[test]
    fn a_declared_uid_that_differs_from_the_machines_is_refused_before_anything_changes() {
        let m = Machine::new(PASSWD, GROUP);
        let www = UserSpec { uid: Some(1005), ..user() };
        let err = refusal(apply(&m.root, &users(&[("www-data", www), ("app", user())]), &BTreeMap::new(), false));
        assert_eq!(
            err,
            "user www-data: exists on this machine with uid 33, not the declared 1005, and was not created by flotilla; flotilla does not change accounts it did not create: drop users.www-data.uid or use another name"
        );
        assert_eq!(m.read("/etc/passwd"), PASSWD, "app was not added either");
        assert!(!m.root.state_dir().join(STATE).exists());
    }

    #[test]
    fn a_group_gid_primary_group_or_home_that_differs_is_refused_shell_and_description_are_not() {
        let m = Machine::new(PASSWD, GROUP);
        let err = refusal(apply(&m.root, &BTreeMap::new(), &groups(&[("ssl-cert", Some(120))]), true));
        assert_eq!(err, "group ssl-cert: exists on this machine with gid 110, not the declared 120, and was not created by flotilla; flotilla does not change accounts it did not create: drop groups.ssl-cert.gid or use another name");

        let www = UserSpec { group: Some("ssl-cert".into()), home: "/srv/www".into(), ..user() };
        let err = refusal(apply(&m.root, &users(&[("www-data", www)]), &groups(&[("ssl-cert", None)]), false));
        assert!(err.contains("user www-data: exists on this machine with primary group www-data (gid 33), not the declared ssl-cert, and was not created by flotilla"), "{err}");
        assert!(err.contains("drop users.www-data.group or use another name"), "{err}");
        assert!(err.contains("user www-data: exists on this machine with home /var/www, not the declared /srv/www"), "{err}");

        // A matching gid and another shell and description: accepted, the machine's values stay.
        let www = UserSpec { uid: Some(33), shell: "/bin/zsh".into(), description: "web".into(), home: "/var/www".into(), group: Some("www-data".into()), ..user() };
        apply(&m.root, &users(&[("www-data", www)]), &groups(&[("www-data", Some(33)), ("ssl-cert", Some(110))]), false).unwrap();
        assert_eq!(m.read("/etc/passwd"), PASSWD);
        assert_eq!(m.read("/etc/group"), GROUP);
    }

    #[test]
    fn accounts_the_agent_created_are_its_own_to_change_and_remove() {
        let m = Machine::new(PASSWD, GROUP);
        let c = apply(&m.root, &users(&[("app", UserSpec { uid: Some(1005), ..user() })]), &BTreeMap::new(), false).unwrap();
        assert_eq!(c.added, ["group app", "user app"]);
        assert!(m.read("/etc/passwd").ends_with("app:x:1005:1005::/var/empty:/bin/sh\n"), "{}", m.read("/etc/passwd"));
        assert!(m.read("/etc/passwd").starts_with(PASSWD), "the machine's lines stay as they were");
        assert_eq!(m.owned().users["app"], 1005);

        // Its uid may change (it is the agent's; its own group follows), and it goes when it
        // leaves the config.
        apply(&m.root, &users(&[("app", UserSpec { uid: Some(1006), home: "/srv/app".into(), ..user() })]), &BTreeMap::new(), false).unwrap();
        assert!(m.read("/etc/passwd").contains("app:x:1006:1006::/srv/app:/bin/sh\n"), "{}", m.read("/etc/passwd"));
        assert!(m.read("/etc/group").ends_with("app:x:1006:\n"), "{}", m.read("/etc/group"));
        let c = apply(&m.root, &BTreeMap::new(), &BTreeMap::new(), false).unwrap();
        assert_eq!(c.removed, ["group app", "user app"]);
        assert_eq!(m.read("/etc/passwd"), PASSWD);
        assert_eq!(m.read("/etc/group"), GROUP);
    }

    #[test]
    fn a_users_own_group_that_exists_on_the_machine_is_used_with_its_gid() {
        let m = Machine::new(PASSWD, &format!("{GROUP}app:x:2000:\n"));
        apply(&m.root, &users(&[("app", UserSpec { uid: Some(1005), ..user() })]), &BTreeMap::new(), false).unwrap();
        assert!(m.read("/etc/passwd").ends_with("app:x:1005:2000::/var/empty:/bin/sh\n"));
        assert!(m.read("/etc/group").contains("app:x:2000:\n"), "not recreated with gid 1005");
        assert!(!m.owned().groups.contains_key("app"));
        apply(&m.root, &BTreeMap::new(), &BTreeMap::new(), false).unwrap();
        assert!(m.read("/etc/group").contains("app:x:2000:\n"), "the machine's group stays");
    }

    #[test]
    fn memberships_added_to_the_machines_groups_are_recorded_and_undone() {
        let m = Machine::new(&format!("{PASSWD}postgres:x:105:105::/var/lib/postgresql:/bin/sh\n"), GROUP);
        let app = UserSpec { extra_groups: vec!["ssl-cert".into()], ..user() };
        // postgres was a member before: that membership is the machine's.
        let pg = UserSpec { extra_groups: vec!["ssl-cert".into()], home: "/var/lib/postgresql".into(), ..user() };
        let declared = groups(&[("ssl-cert", None)]);
        apply(&m.root, &users(&[("app", app.clone()), ("postgres", pg)]), &declared, false).unwrap();
        assert!(m.read("/etc/group").contains("ssl-cert:x:110:app,postgres\n"), "{}", m.read("/etc/group"));
        assert_eq!(m.owned().members["ssl-cert"], BTreeSet::from(["app".to_owned()]));

        // postgres no longer declared: still a member. app's membership dropped: undone.
        apply(&m.root, &users(&[("app", UserSpec { extra_groups: Vec::new(), ..app })]), &declared, false).unwrap();
        assert!(m.read("/etc/group").contains("ssl-cert:x:110:postgres\n"), "{}", m.read("/etc/group"));
        assert!(m.owned().members.is_empty());

        // A user the agent created and removes leaves no membership behind.
        let app = UserSpec { extra_groups: vec!["ssl-cert".into()], ..user() };
        apply(&m.root, &users(&[("app", app)]), &declared, false).unwrap();
        assert!(m.read("/etc/group").contains("ssl-cert:x:110:app,postgres\n"));
        apply(&m.root, &BTreeMap::new(), &BTreeMap::new(), false).unwrap();
        assert_eq!(m.read("/etc/group"), GROUP);
    }

    #[test]
    fn shadow_and_gshadow_get_locked_lines_for_what_the_agent_creates_and_keep_owner_and_mode() {
        let m = Machine::new(PASSWD, GROUP);
        let shadow = "root:$y$hash:19000:0:99999:7:::\nwww-data:*:19000:0:99999:7:::\n";
        let gshadow = "root:*::\nssl-cert:!::postgres\n";
        for (file, text) in [("/etc/shadow", shadow), ("/etc/gshadow", gshadow)] {
            let p = m.root.path(file);
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
            std::os::unix::fs::chown(&p, Some(0), Some(42)).unwrap();
        }
        let app = UserSpec { extra_groups: vec!["ssl-cert".into()], ..user() };
        apply(&m.root, &users(&[("app", app)]), &groups(&[("ssl-cert", None)]), false).unwrap();
        let days = days_since_epoch();
        assert_eq!(m.read("/etc/shadow"), format!("{shadow}app:!:{days}::::::\n"));
        assert_eq!(m.read("/etc/gshadow"), format!("root:*::\nssl-cert:!::app,postgres\napp:!::\n"));
        for file in ["/etc/shadow", "/etc/gshadow"] {
            let meta = fs::metadata(m.root.path(file)).unwrap();
            assert_eq!((meta.mode() & 0o7777, meta.uid(), meta.gid()), (0o640, 0, 42), "{file}");
        }
        apply(&m.root, &BTreeMap::new(), &BTreeMap::new(), false).unwrap();
        assert_eq!(m.read("/etc/shadow"), shadow);
        assert_eq!(m.read("/etc/gshadow"), gshadow);
        assert_eq!(fs::metadata(m.root.path("/etc/shadow")).unwrap().mode() & 0o7777, 0o640);
    }

    #[test]
    fn a_dry_run_writes_nothing_and_a_machine_without_shadow_gets_none() {
        let m = Machine::new(PASSWD, GROUP);
        let c = apply(&m.root, &users(&[("app", user())]), &BTreeMap::new(), true).unwrap();
        assert_eq!(c.added, ["group app", "user app"]);
        assert_eq!(m.read("/etc/passwd"), PASSWD);
        assert!(!m.root.state_dir().join(STATE).exists());
        apply(&m.root, &users(&[("app", user())]), &BTreeMap::new(), false).unwrap();
        assert!(!m.root.path("/etc/shadow").exists() && !m.root.path("/etc/gshadow").exists());
    }

    #[test]
    fn an_empty_root_gets_the_builtin_accounts() {
        let m = Machine::new("", "");
        apply(&m.root, &users(&[("app", user())]), &BTreeMap::new(), false).unwrap();
        assert_eq!(m.read("/etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/var/empty:/bin/false\napp:x:1000:1000::/var/empty:/bin/sh\n");
        assert_eq!(m.read("/etc/group"), "root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\napp:x:1000:\n");
        assert_eq!(m.owned().users.keys().collect::<Vec<_>>(), ["app"]);
    }
}
