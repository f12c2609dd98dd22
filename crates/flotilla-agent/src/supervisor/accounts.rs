//! Looks services' users and groups up in the machine's own `etc/passwd` and `etc/group`.
//!
//! The agent is static (no NSS), and in the directory-as-root test mode the files that count
//! are the ones under that root, not the host's; so this reads the files itself, with the
//! agent's one parser of account files (`crate::accounts_file`). It must never call
//! `getpwnam` and friends, and never guess an id for a name it cannot find.

use std::path::{Path, PathBuf};

use super::{Result, SupervisorError};
use crate::accounts_file;

/// Who a service runs as, resolved from the account files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Identity {
    /// User name (for `USER`/`LOGNAME`).
    pub user: String,
    /// User id.
    pub uid: u32,
    /// Group id to run with.
    pub gid: u32,
    /// Supplementary groups: `gid` plus every group listing the user as a member.
    pub groups: Vec<u32>,
    /// Home directory (for `HOME`).
    pub home: String,
}

fn read(service: &str, path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| SupervisorError::AccountFile {
        service: service.to_owned(),
        path: path.to_owned(),
        source,
    })
}

/// Resolves `user` (and `group`, else the user's primary group) under `root`.
pub(super) fn resolve(service: &str, root: &Path, user: &str, group: Option<&str>) -> Result<Identity> {
    let passwd_path: PathBuf = root.join("etc/passwd");
    let group_path: PathBuf = root.join("etc/group");
    let passwd = accounts_file::users(&accounts_file::parse(&read(service, &passwd_path)?));
    let entry = passwd.iter().find(|e| e.name == user).ok_or_else(|| SupervisorError::UnknownUser {
        service: service.to_owned(),
        user: user.to_owned(),
        passwd: passwd_path.clone(),
    })?;
    // A missing group file only matters when a group must be looked up by name.
    let groups = match std::fs::metadata(&group_path) {
        Ok(_) => accounts_file::groups(&accounts_file::parse(&read(service, &group_path)?)),
        Err(_) if group.is_none() => Vec::new(),
        Err(source) => {
            return Err(SupervisorError::AccountFile { service: service.to_owned(), path: group_path, source })
        }
    };
    let gid = match group {
        None => entry.gid,
        Some(name) => groups.iter().find(|g| g.name == name).map(|g| g.gid).ok_or_else(|| {
            SupervisorError::UnknownGroup {
                service: service.to_owned(),
                group: name.to_owned(),
                group_file: group_path.clone(),
            }
        })?,
    };
    let mut supplementary = vec![gid];
    for g in &groups {
        if g.members.iter().any(|m| m == user) && !supplementary.contains(&g.gid) {
            supplementary.push(g.gid);
        }
    }
    Ok(Identity { user: entry.name.clone(), uid: entry.uid, gid, groups: supplementary, home: entry.home.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(passwd: &str, group: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), passwd).unwrap();
        if let Some(group) = group {
            std::fs::write(dir.path().join("etc/group"), group).unwrap();
        }
        dir
    }

    #[test]
    fn resolves_primary_and_member_groups() {
        let root = root_with(
            "root:x:0:0::/root:/bin/sh\n# comment\nweb:x:1001:1002:Web:/var/lib/web:/bin/sh\n",
            Some("root:x:0:\nweb:x:1002:\nwww:x:33:other,web\nother:x:44:other\n"),
        );
        let id = resolve("nginx", root.path(), "web", None).unwrap();
        assert_eq!(
            id,
            Identity {
                user: "web".into(),
                uid: 1001,
                gid: 1002,
                groups: vec![1002, 33],
                home: "/var/lib/web".into()
            }
        );
        let id = resolve("nginx", root.path(), "web", Some("www")).unwrap();
        assert_eq!((id.gid, id.groups), (33, vec![33]));
    }

    #[test]
    fn unknown_names_are_errors_naming_service_and_file() {
        let root = root_with("root:x:0:0::/root:/bin/sh\n", Some("root:x:0:\n"));
        let err = resolve("db", root.path(), "postgres", None).unwrap_err().to_string();
        assert!(err.contains("db") && err.contains("postgres") && err.contains("etc/passwd"), "{err}");
        let err = resolve("db", root.path(), "root", Some("wheel")).unwrap_err().to_string();
        assert!(err.contains("db") && err.contains("wheel") && err.contains("etc/group"), "{err}");
    }

    #[test]
    fn missing_group_file_is_fine_without_a_group_name() {
        let root = root_with("svc:x:5:6::/:/bin/sh\n", None);
        assert_eq!(resolve("s", root.path(), "svc", None).unwrap().groups, vec![6]);
        assert!(resolve("s", root.path(), "svc", Some("svc")).is_err());
    }
}
