//! The system calls the deployer makes itself: signalling a container's init process, and
//! asking whether its monitor holds the machine's lock. std has no safe `kill(2)` for a
//! process that is not our child, nor `flock(2)`.
#![allow(unsafe_code)]

/// Sends `signal` to `pid`; false when there is no such process.
pub(super) fn kill(pid: i32, signal: i32) -> bool {
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

pub(super) use libc::{SIGKILL, SIGTERM};
