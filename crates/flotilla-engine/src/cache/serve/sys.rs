//! The system calls the cache server makes that std has no safe form of: opening a name
//! beneath a directory descriptor without following a link (`openat` with `O_NOFOLLOW`),
//! renaming within one (`renameat`), sending a file range to a socket inside the kernel
//! (`sendfile`), and taking SIGINT/SIGTERM as a message instead of a death
//! (`pthread_sigmask` + `sigwait`), so the server stops cleanly.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::TcpStream;
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

/// `fstatat` of `name` in `dir`, not following a link (a link is described as itself).
pub(super) fn stat_beneath(dir: &File, name: &str) -> io::Result<libc::stat> {
    let name = c_name(name)?;
    // SAFETY: fstatat reads a NUL-terminated string we own and fills a stat we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
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

/// The most one `sendfile` call is asked for (Linux sends at most about 2 GiB per call anyway).
const SENDFILE_CHUNK: u64 = 1 << 30;

/// Sends `count` bytes of `file` from `offset` to `sock` and returns how many were sent: fewer
/// only when the file ended first. The bytes go from the page cache to the socket in the
/// kernel (`sendfile`, looping over partial sends); where the kernel cannot do that for this
/// file (EINVAL, ENOSYS) the rest is copied through a buffer. The file's own offset is not used
/// or moved.
pub(super) fn send_file(sock: &TcpStream, file: &File, offset: u64, count: u64) -> io::Result<u64> {
    let mut sent = 0;
    while sent < count {
        let Ok(mut off) = libc::off_t::try_from(offset + sent) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"));
        };
        let want = (count - sent).min(SENDFILE_CHUNK) as usize;
        // SAFETY: sendfile reads from and writes to descriptors we hold open for the call and
        // updates an off_t we own.
        let n = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut off, want) };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL | libc::ENOSYS) => return Ok(sent + copy_range(sock, file, offset + sent, count - sent)?),
                _ => return Err(err),
            }
        }
        if n == 0 {
            break; // the file ended
        }
        sent += n as u64;
    }
    Ok(sent)
}

/// `send_file` without `sendfile`: `pread` into a buffer, then write.
pub(super) fn copy_range(mut sock: &TcpStream, file: &File, offset: u64, count: u64) -> io::Result<u64> {
    use std::io::Write as _;
    use std::os::unix::fs::FileExt as _;
    let mut buf = vec![0u8; (count.min(1 << 20)) as usize];
    let mut sent = 0;
    while sent < count {
        let want = (count - sent).min(buf.len() as u64) as usize;
        let n = match file.read_at(&mut buf[..want], offset + sent) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sock.write_all(&buf[..n])?;
        sent += n as u64;
    }
    Ok(sent)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;
    use std::net::TcpListener;

    /// Sends ranges of a file with `f` over a loopback connection and checks the bytes read.
    fn check_ranges(f: fn(&TcpStream, &File, u64, u64) -> io::Result<u64>) {
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &content).unwrap();
        for (offset, count, expect) in [(0, content.len() as u64, content.len()), (4, 8, 8), (2_999_990, 10, 10), (2_999_990, 100, 10), (1_234_567, 1_500_000, 1_500_000)] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let sock = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (mut peer, _) = listener.accept().unwrap();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                peer.read_to_end(&mut got).unwrap();
                got
            });
            let sent = f(&sock, &file, offset, count).unwrap();
            drop(sock);
            let got = reader.join().unwrap();
            assert_eq!(sent as usize, expect, "bytes said sent of {offset}+{count}");
            assert_eq!(got, &content[offset as usize..offset as usize + expect], "bytes received of {offset}+{count}");
        }
    }

    #[test]
    fn send_file_sends_exactly_the_range_and_stops_at_the_end_of_the_file() {
        check_ranges(send_file);
    }

    #[test]
    fn the_buffered_fallback_sends_the_same_bytes() {
        check_ranges(copy_range);
    }
}
