//! The state's files on this host. The state DB holds the fleet's history, facts and who
//! deployed what: it is private to its owner (directory 0700, file 0600; SQLite gives the
//! `-wal` and `-shm` files the database's own mode), made so when created, never opened
//! through a symbolic link. When SQLite fails because of the filesystem under it (read-only,
//! full, not writable by this user), the error says that in words, found by trying to write
//! in the directory, instead of SQLite's "disk I/O error" or "xShmMap".

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Makes the state's directory (and missing parents) with mode 0700.
pub(crate) fn make_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Opens the database file, creating it with mode 0600 before SQLite sees it, without
/// following a link at its name. A file left readable to others by an older flotilla is made
/// 0600 through its descriptor when it is ours (not ours: left alone).
pub(crate) fn make_db_file(path: &Path) -> io::Result<()> {
    let file: File = OpenOptions::new().read(true).write(true).create(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        let _ = file.set_permissions(std::fs::Permissions::from_mode(mode & 0o600));
    }
    Ok(())
}

/// What is wrong with the filesystem under the state DB at `path`, as a sentence with what to
/// do, when `error` (an SQLite or I/O error, or one that has one as its source) is one that
/// comes from the filesystem; `None` otherwise, or when the directory takes writes fine.
pub fn storage_problem(path: &Path, error: &(dyn std::error::Error + 'static)) -> Option<String> {
    if path.to_str().is_some_and(crate::is_url) {
        return None;
    }
    let mut cause = Some(error);
    let mut from_storage = false;
    while let Some(e) = cause {
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = e.downcast_ref::<rusqlite::Error>() {
            use rusqlite::ErrorCode as C;
            from_storage |= matches!(f.code, C::ReadOnly | C::DiskFull | C::SystemIoFailure | C::CannotOpen | C::PermissionDenied);
        }
        if e.downcast_ref::<io::Error>().is_some() {
            from_storage = true;
        }
        cause = e.source();
    }
    if !from_storage {
        return None;
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let elsewhere = "or point FLOTILLA_STATE (or --state) at a state database elsewhere";
    match try_writing(dir) {
        Ok(()) => None,
        Err(e) => Some(match e.raw_os_error() {
            Some(libc::EROFS) => format!("the state directory {} is on a read-only filesystem, so flotilla cannot record anything there; remount it read-write, {elsewhere}", dir.display()),
            Some(libc::ENOSPC | libc::EDQUOT) => format!("the filesystem of the state directory {} is full (or your quota is used up), so flotilla cannot record anything there; free space on it, {elsewhere}", dir.display()),
            Some(libc::EACCES | libc::EPERM) => format!("the state directory {} is not writable by you, so flotilla cannot record anything there; run flotilla as the user who owns it, {elsewhere}", dir.display()),
            Some(libc::ENOENT) => format!("the state directory {} does not exist and cannot be made; create it, {elsewhere}", dir.display()),
            _ => format!("the state directory {} cannot be written ({e}); fix it, {elsewhere}", dir.display()),
        }),
    }
}

/// Creates, fills and removes a scratch file in `dir`: what fails says why the state cannot
/// be written.
fn try_writing(dir: &Path) -> io::Result<()> {
    let probe = dir.join(format!(".flotilla-write-test-{}", std::process::id()));
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&probe)
        .and_then(|mut f| f.write_all(&[0; 64 << 10]).and_then(|()| f.sync_all()));
    let _ = std::fs::remove_file(&probe);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_state_is_private_whatever_the_umask_allows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/state.db");
        let _state = crate::State::open(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&path), 0o600);
        for side in ["state.db-wal", "state.db-shm"] {
            assert_eq!(mode(&dir.path().join("a/b").join(side)), 0o600, "{side}");
        }
    }

    #[test]
    fn a_link_at_the_database_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("state.db")).unwrap();
        assert!(crate::State::open(&dir.path().join("state.db")).is_err());
    }

    #[test]
    fn errors_that_are_not_the_filesystem_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let e = rusqlite::Error::QueryReturnedNoRows;
        assert_eq!(storage_problem(&dir.path().join("state.db"), &e), None);
        // A filesystem error in a directory that takes writes is not explained away.
        let io = io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(storage_problem(&dir.path().join("state.db"), &io), None);
    }
}
