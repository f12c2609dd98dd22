//! The system calls the cache server makes that std has no safe form of: opening a name
//! beneath a directory descriptor without following a link (`openat` with `O_NOFOLLOW`),
//! renaming within one (`renameat`), and taking SIGINT/SIGTERM as a message instead of a death
//! (`pthread_sigmask` + `sigwait`), so the server stops cleanly.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _};

fn c_name(name: &str) -> io::Result<CString> {
    // Only a single component: the descriptor is the whole path, so nothing above it is walked.
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a single file name"));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a file name"))
}

fn open_at(dir: &File, name: &str, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    let name = c_name(name)?;
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY;
    // SAFETY: openat reads a NUL-terminated string we own; the descriptor it returns is new
    // and owned by nothing else, so File may take it.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, libc::c_uint::from(mode)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Opens `name` in `dir` for reading; a symbolic link fails (ELOOP), a FIFO does not block.
pub(super) fn open_file_beneath(dir: &File, name: &str) -> io::Result<File> {
    open_at(dir, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
}

/// Opens the directory `name` in `dir`; a symbolic link fails.
pub(super) fn open_dir_beneath(dir: &File, name: &str) -> io::Result<File> {
    open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Creates `name` in `dir` for writing, failing if anything (a link included) has that name.
pub(super) fn create_beneath(dir: &File, name: &str) -> io::Result<File> {
    open_at(dir, name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o644)
}

/// Renames `from` to `to`, both in `dir`, replacing `to`.
pub(super) fn rename_beneath(dir: &File, from: &str, to: &str) -> io::Result<()> {
    let (from, to) = (c_name(from)?, c_name(to)?);
    // SAFETY: renameat reads two NUL-terminated strings we own.
    if unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes the file `name` in `dir` (a link itself, never what it points to).
pub(super) fn unlink_beneath(dir: &File, name: &str) -> io::Result<()> {
    let name = c_name(name)?;
    // SAFETY: unlinkat reads a NUL-terminated string we own.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset fill a sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in this thread and every thread it starts afterwards, so that
/// only [`wait_stop_signal`] receives them. Call before starting any thread.
pub(super) fn block_stop_signals() {
    let set = stop_signals();
    // SAFETY: pthread_sigmask reads a sigset_t we own.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits for SIGINT or SIGTERM (blocked by [`block_stop_signals`]) and returns its name.
pub(super) fn wait_stop_signal() -> &'static str {
    let set = stop_signals();
    let mut sig: libc::c_int = 0;
    // SAFETY: sigwait reads a sigset_t and writes an int, both ours.
    while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
    if sig == libc::SIGINT { "SIGINT" } else { "SIGTERM" }
}
