//! The one system call the deployer makes itself: signalling a container's init process.
//! std has no safe `kill(2)` for a process that is not our child.
#![allow(unsafe_code)]

/// Sends `signal` to `pid`; false when there is no such process.
pub(super) fn kill(pid: i32, signal: i32) -> bool {
    if pid <= 0 {
        return false; // never a process group or every process
    }
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    unsafe { libc::kill(pid, signal) == 0 }
}

pub(super) use libc::{SIGKILL, SIGTERM};
