//! The machine's account files, `/etc/passwd`, `/etc/group`, `/etc/shadow` and `/etc/gshadow`,
//! parsed and written in one place. The agent is static (no NSS, no shadow tools), and in the
//! directory-as-root mode the files that count are the ones under that root, so it reads them
//! itself: `users` to create and remove its accounts, the supervisor to resolve who a service
//! runs as, `uninstall` to take out exactly the agent's lines. What this module must never do:
//! drop or reorder a line it was not asked to, or leave a file readable by anyone it was not
//! readable by before.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// One line of passwd, group, shadow or gshadow, split on `:`. Blank and comment lines are
/// kept as they are (their first field is never an account name).
pub(crate) type Entry = Vec<String>;

/// Every line of an account file, split into fields.
pub(crate) fn parse(text: &str) -> Vec<Entry> {
    text.lines().map(|l| l.split(':').map(str::to_owned).collect()).collect()
}

/// The file text of `entries`, one line each.
pub(crate) fn render(entries: &[Entry]) -> String {
    entries.iter().map(|e| e.join(":") + "\n").collect()
}

/// The line of account `name`.
pub(crate) fn find<'a>(entries: &'a [Entry], name: &str) -> Option<&'a Entry> {
    entries.iter().find(|e| e[0] == name)
}

/// The uid (passwd) or gid (group) of account `name`.
pub(crate) fn id_of(entries: &[Entry], name: &str) -> Option<u32> {
    find(entries, name).and_then(|e| e.get(2)?.parse().ok())
}

/// The member list of a group or gshadow line (its 4th field), which it gets if it lacks it.
pub(crate) fn members_mut(e: &mut Entry) -> BTreeSet<String> {
    while e.len() < 4 {
        e.push(String::new());
    }
    e[3].split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect()
}

/// Replaces the member list of a group or gshadow line that [`members_mut`] read.
pub(crate) fn set_members(e: &mut Entry, members: &BTreeSet<String>) {
    e[3] = members.iter().cloned().collect::<Vec<_>>().join(",");
}

/// A user of `/etc/passwd`, as a service runs as it.
pub(crate) struct User {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary group's gid.
    pub gid: u32,
    /// Its home directory.
    pub home: String,
}

/// A group of `/etc/group`.
pub(crate) struct Group {
    /// Its name.
    pub name: String,
    /// Its gid.
    pub gid: u32,
    /// The users listed as its members.
    pub members: Vec<String>,
}

/// The well-formed user lines of a passwd file (seven fields, numeric ids, no comment).
pub(crate) fn users(entries: &[Entry]) -> Vec<User> {
    entries
        .iter()
        .filter(|f| f.len() >= 7 && !f[0].starts_with('#'))
        .filter_map(|f| Some(User { name: f[0].clone(), uid: f[2].parse().ok()?, gid: f[3].parse().ok()?, home: f[5].clone() }))
        .collect()
}

/// The well-formed group lines of a group file (four fields, a numeric gid, no comment).
pub(crate) fn groups(entries: &[Entry]) -> Vec<Group> {
    entries
        .iter()
        .filter(|f| f.len() >= 4 && !f[0].starts_with('#'))
        .filter_map(|f| {
            Some(Group { name: f[0].clone(), gid: f[2].parse().ok()?, members: f[3].split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect() })
        })
        .collect()
}

/// Rewrites the account lines of `path` through `edit` (which may change the fields, and
/// returns false to drop the line); blank and comment lines and every line end stay as they
/// are. The file keeps its mode and owner ([`write_keeping_owner`]); an unchanged file is not
/// written.
pub(crate) fn rewrite(path: &Path, mut edit: impl FnMut(&mut Entry) -> bool) -> io::Result<()> {
    let text = fs::read_to_string(path)?;
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, end) = line.strip_suffix('\n').map_or((line, ""), |b| (b, "\n"));
        if body.trim().is_empty() || body.starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut fields: Entry = body.split(':').map(str::to_owned).collect();
        if edit(&mut fields) {
            out.push_str(&fields.join(":"));
            out.push_str(end);
        }
    }
    if out == text {
        return Ok(());
    }
    write_keeping_owner(path, out.as_bytes(), 0o600)
}

/// Replaces `path` by `data` through a temporary file that gets the old file's owner and mode
/// (`new_mode` for a new file) before a byte is written, then a rename: `/etc/shadow` is never
/// readable by anyone it was not readable by, and readers see the old file or the new.
pub(crate) fn write_keeping_owner(path: &Path, data: &[u8], new_mode: u32) -> io::Result<()> {
    if fs::read(path).is_ok_and(|old| old == data) {
        return Ok(()); // a redeploy of the same accounts rewrites nothing
    }
    let (mode, owner) = match fs::metadata(path) {
        Ok(m) => (m.mode() & 0o7777, Some((m.uid(), m.gid()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (new_mode, None),
        Err(e) => return Err(e),
    };
    let tmp = path.with_file_name(format!(".{}.flotilla-tmp", path.file_name().unwrap_or_default().to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    let written = (|| {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(data)?;
        file.sync_all()
    })();
    drop(file);
    match written.and_then(|()| fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_files_keep_their_mode_owner_and_other_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shadow");
        fs::write(&path, "root:*:1::::::\n# comment\nalice:!:1::::::\nbob:!:1::::::").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        rewrite(&path, |f| f[0] != "alice").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "root:*:1::::::\n# comment\nbob:!:1::::::");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
        let before = fs::metadata(&path).unwrap().ino();
        rewrite(&path, |_| true).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().ino(), before, "an unchanged file is not rewritten");
    }

    #[test]
    fn users_and_groups_skip_comments_and_malformed_lines() {
        let passwd = parse("root:x:0:0::/root:/bin/sh\n# c:x:1:1::/:/bin/sh\nshort:x:1:1\nbad:x:u:1::/:/bin/sh\nweb:x:1001:1002:Web:/var/lib/web:/bin/sh\n");
        let names: Vec<_> = users(&passwd).into_iter().map(|u| (u.name, u.uid, u.gid, u.home)).collect();
        assert_eq!(names, [("root".into(), 0, 0, "/root".into()), ("web".to_string(), 1001, 1002, "/var/lib/web".to_string())]);
        let group = parse("root:x:0:\n#x:x:1:\nwww:x:33:other,web\nbad:x:g:\n");
        let got: Vec<_> = groups(&group).into_iter().map(|g| (g.name, g.gid, g.members)).collect();
        assert_eq!(got, [("root".to_string(), 0, vec![]), ("www".to_string(), 33, vec!["other".to_string(), "web".to_string()])]);
    }
}
