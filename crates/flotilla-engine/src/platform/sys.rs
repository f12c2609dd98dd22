//! The system calls the deployer makes itself: signalling a container's init process, and
//! asking whether its monitor holds the machine's lock. std has no safe `kill(2)` for a
//! process that is not our child, nor `flock(2)`.
#![allow(unsafe_code)]

/// Sends `signal` to `pid`; false when there is no such process.
pub(super) fn kill(pid: u32, signal: i32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    if pid <= 0 {
        return false; // never a process group or every process
    }
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Whether another process holds an flock on `file` (the container monitor holds its
/// machine's `pid.lock` for the container's life).
pub(super) fn locked_by_another(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock on a descriptor `file` owns; a lock we take is released right away.
    unsafe {
        if libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 {
            libc::flock(file.as_raw_fd(), libc::LOCK_UN);
            false
        } else {
            std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
        }
    }
}

/// Takes an exclusive flock on `file`, waiting for it when `block`; false when another holds
/// it and `block` is false. Released when the file is closed.
pub(super) fn flock(file: &std::fs::File, block: bool) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd as _;
    let how = if block { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
    loop {
        // SAFETY: flock on a descriptor `file` owns.
        if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !block => return Ok(false),
            _ => return Err(e),
        }
    }
}

pub(super) use libc::{SIGKILL, SIGTERM};

/// How [`open_beneath`] resolves the path below its base.
#[derive(Debug, Clone, Copy)]
pub(super) enum Resolve {
    /// No symbolic link at all, and never above the base.
    NoLinks,
    /// Links resolved as the machine sees them: the base is their `/`.
    InRoot,
}

/// `rel` below the directory `base`, opened with `flags`, never leaving `base`
/// (`openat2(2)`): a machine's files are the machine's, and a link one of its services
/// planted (`/run/flotilla` → the host's `/run`) is not the deployer's to follow.
pub(super) fn open_beneath(base: &std::path::Path, rel: &std::path::Path, flags: i32, resolve: Resolve) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(base)?;
    let rel = std::ffi::CString::new(rel.as_os_str().as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; all-zero is its documented "no options" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_MAGICLINKS
        | match resolve {
            Resolve::NoLinks => libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
            Resolve::InRoot => libc::RESOLVE_IN_ROOT,
        };
    // SAFETY: openat2 reads `rel` (a NUL-terminated string) and `how` (of the size passed),
    // both alive for the call; it returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, dir.as_raw_fd(), rel.as_ptr(), &how as *const libc::open_how, std::mem::size_of::<libc::open_how>())
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor openat2 just returned, owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}
