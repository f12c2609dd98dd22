//! The supervisor's system calls: fork and the child's set-up before exec, waiting for any
//! child, signalling process groups, the child-subreaper flag, and the SIGTERM/SIGINT handler.
//!
//! Unsafe code is allowed here, and only here, because these are libc calls with no safe
//! wrapper in std: std's `Command` cannot chroot, and it waits for its own children, which
//! races with a reaper that waits for every child. Everything above this module stays safe.
//! What this module must never do: allocate, lock or touch Rust state between `fork` and
//! `execve` (the child of a threaded process may only make async-signal-safe calls), or leave
//! a file descriptor without close-on-exec.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use super::ExitStatus;

/// A fully prepared program: every byte the child needs, converted before `fork`.
#[derive(Debug, Clone)]
pub(super) struct Program {
    /// Absolute path to execute (inside `chroot` when set).
    pub path: CString,
    /// Further paths to try, in order, when `path` cannot be executed because it is missing
    /// or not executable (a `PATH` search, done after the chroot so it sees the machine's
    /// files): the error reported is the last such one, `EACCES` over `ENOENT`, as execvp's.
    pub search: Vec<CString>,
    /// Make fd 0 (a terminal) the controlling terminal of the child's new session.
    pub controlling_tty: bool,
    /// argv, argv[0] included.
    pub argv: Vec<CString>,
    /// The whole environment as `KEY=value`.
    pub env: Vec<CString>,
    /// Directory to chroot into first, if any.
    pub chroot: Option<CString>,
    /// Working directory (inside the chroot).
    pub cwd: CString,
    /// Identity to switch to, or `None` to keep the agent's.
    pub creds: Option<Creds>,
}

/// The identity a child switches to before exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Creds {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the primary group included).
    pub groups: Vec<u32>,
}

/// The three standard descriptors of a child; none of them may be closed by the child's set-up.
pub(super) struct Stdio<'a> {
    /// Becomes fd 0.
    pub stdin: BorrowedFd<'a>,
    /// Becomes fd 1.
    pub stdout: BorrowedFd<'a>,
    /// Becomes fd 2.
    pub stderr: BorrowedFd<'a>,
}

/// Where the child's set-up failed, with errno.
#[derive(Debug)]
pub(super) struct SpawnFailure {
    /// What was being done, in words for an error message.
    pub stage: &'static str,
    /// The OS error.
    pub error: io::Error,
}

// Stage numbers the child writes to the error pipe, and their descriptions.
const STAGES: &[&str] = &[
    "starting a new session (setsid)",
    "redirecting stdin/stdout/stderr",
    "chroot into the machine root",
    "setting supplementary groups (setgroups)",
    "setting the group id (setgid)",
    "setting the user id (setuid)",
    "changing to the working directory",
    "executing the program (execve)",
    "making the terminal the controlling terminal (TIOCSCTTY)",
];
const STAGE_SETSID: u8 = 0;
const STAGE_FDS: u8 = 1;
const STAGE_CHROOT: u8 = 2;
const STAGE_SETGROUPS: u8 = 3;
const STAGE_SETGID: u8 = 4;
const STAGE_SETUID: u8 = 5;
const STAGE_CHDIR: u8 = 6;
const STAGE_EXEC: u8 = 7;
const STAGE_CTTY: u8 = 8;

/// The stage at which the program itself could not be executed (not found, not executable).
pub(super) const EXEC_STAGE: &str = STAGES[STAGE_EXEC as usize];

/// A libc return value as a `Result`: negative means `errno` says why.
pub(crate) fn cvt(r: c_int) -> io::Result<c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A pipe whose both ends are close-on-exec: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Forks a child that sets itself up as `program` says and execs it; returns the pid and the
/// read end of a pipe that `await_exec` reads to learn whether the exec happened.
///
/// The caller holds the reaper's table lock, so it can register the pid before the reaper can
/// possibly see it exit.
pub(super) fn fork_exec(program: &Program, stdio: &Stdio<'_>) -> Result<(i32, OwnedFd), SpawnFailure> {
    let fail = |stage, error| SpawnFailure { stage, error };
    // All pointers and buffers the child uses are built here, before fork.
    let search: Vec<*const c_char> = program.search.iter().map(|p| p.as_ptr()).collect();
    let argv: Vec<*const c_char> =
        program.argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(ptr::null())).collect();
    let envp: Vec<*const c_char> =
        program.env.iter().map(|e| e.as_ptr()).chain(std::iter::once(ptr::null())).collect();
    let groups: Vec<libc::gid_t> =
        program.creds.as_ref().map(|c| c.groups.clone()).unwrap_or_default();
    let (err_read, err_write) = pipe().map_err(|e| fail("creating a pipe", e))?;
    // SAFETY: sigset_t and sigaction are plain C structs for which all-zero is a valid value;
    // sigemptyset only writes to the set we own.
    let (empty_mask, default_action) = unsafe {
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut mask);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        (mask, action)
    };
    let child = ChildSetup {
        path: program.path.as_ptr(),
        search: &search,
        controlling_tty: program.controlling_tty,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        chroot: program.chroot.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
        cwd: program.cwd.as_ptr(),
        creds: program.creds.as_ref().map(|c| (c.uid, c.gid)),
        groups: &groups,
        stdin: stdio.stdin.as_raw_fd(),
        stdout: stdio.stdout.as_raw_fd(),
        stderr: stdio.stderr.as_raw_fd(),
        err_pipe: err_write.as_raw_fd(),
        empty_mask: &empty_mask,
        default_action: &default_action,
    };
    // SAFETY: fork has no memory-safety preconditions; the child branch only runs
    // `child.run`, which makes async-signal-safe calls on data prepared above and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(fail("forking", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; see `ChildSetup::run`.
        unsafe { child.run() }
    }
    drop(err_write);
    Ok((pid, err_read))
}

/// Reads the error pipe of a forked child until it closes: empty means the exec succeeded
/// (close-on-exec closed it); otherwise the child reports where it failed and exits 127.
pub(super) fn await_exec(err_read: OwnedFd) -> Result<(), SpawnFailure> {
    let mut buf = Vec::with_capacity(5);
    File::from(err_read)
        .read_to_end(&mut buf)
        .map_err(|error| SpawnFailure { stage: "reading the child's start-up report", error })?;
    if buf.len() < 5 {
        return Ok(());
    }
    let stage = STAGES.get(buf[0] as usize).copied().unwrap_or("setting up the child");
    let errno = i32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
    Err(SpawnFailure { stage, error: io::Error::from_raw_os_error(errno) })
}

/// Raw pointers into buffers that outlive the fork: what the child reads.
struct ChildSetup<'a> {
    path: *const c_char,
    search: &'a [*const c_char],
    controlling_tty: bool,
    argv: *const *const c_char,
    envp: *const *const c_char,
    chroot: *const c_char,
    cwd: *const c_char,
    creds: Option<(u32, u32)>,
    groups: &'a [libc::gid_t],
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    err_pipe: RawFd,
    empty_mask: &'a libc::sigset_t,
    default_action: &'a libc::sigaction,
}

impl ChildSetup<'_> {
    /// Runs in the child between fork and exec.
    ///
    /// # Safety
    /// Call only in a freshly forked child. Only async-signal-safe libc calls follow.
    unsafe fn run(&self) -> ! {
        let mut err_pipe = self.err_pipe;
        let fail = |pipe: RawFd, stage: u8| -> ! {
            let errno = *libc::__errno_location();
            let e = errno.to_le_bytes();
            let msg = [stage, e[0], e[1], e[2], e[3]];
            libc::write(pipe, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        };
        // The agent may block or ignore signals (Rust ignores SIGPIPE); a service starts clean.
        libc::sigprocmask(libc::SIG_SETMASK, self.empty_mask, ptr::null_mut());
        // 1..=64: every signal number Linux has; invalid ones just fail with EINVAL.
        for sig in 1..65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, self.default_action, ptr::null_mut());
            }
        }
        // Its own session, hence its own process group: stop signals the whole group.
        if libc::setsid() < 0 {
            fail(err_pipe, STAGE_SETSID);
        }
        // Move every descriptor above 2 first, so that dup2 onto 0..2 cannot overwrite a
        // source (the agent may run with 0..2 closed, e.g. as PID 1).
        let moved = libc::fcntl(err_pipe, libc::F_DUPFD_CLOEXEC, 3);
        if moved < 0 {
            libc::_exit(127);
        }
        err_pipe = moved;
        let sources = [self.stdin, self.stdout, self.stderr];
        let mut high = [-1 as c_int; 3];
        for (i, fd) in sources.iter().enumerate() {
            high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3);
            if high[i] < 0 {
                fail(err_pipe, STAGE_FDS);
            }
        }
        for (target, fd) in high.iter().enumerate() {
            if libc::dup2(*fd, target as c_int) < 0 {
                fail(err_pipe, STAGE_FDS);
            }
        }
        if self.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            fail(err_pipe, STAGE_CTTY);
        }
        if !self.chroot.is_null() {
            if libc::chroot(self.chroot) < 0 {
                fail(err_pipe, STAGE_CHROOT);
            }
            if libc::chdir(c"/".as_ptr()) < 0 {
                fail(err_pipe, STAGE_CHROOT);
            }
        }
        if let Some((uid, gid)) = self.creds {
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) < 0 {
                fail(err_pipe, STAGE_SETGROUPS);
            }
            if libc::setgid(gid) < 0 {
                fail(err_pipe, STAGE_SETGID);
            }
            if libc::setuid(uid) < 0 {
                fail(err_pipe, STAGE_SETUID);
            }
        }
        // After dropping privileges, so the service cannot start in a directory it may not enter.
        if libc::chdir(self.cwd) < 0 {
            fail(err_pipe, STAGE_CHDIR);
        }
        libc::execve(self.path, self.argv, self.envp);
        let mut errno = *libc::__errno_location();
        for path in self.search {
            if !matches!(errno, libc::ENOENT | libc::ENOTDIR | libc::EACCES) {
                break;
            }
            let before = errno;
            libc::execve(*path, self.argv, self.envp);
            // A program that is there but may not run says more than one that is not there.
            if before == libc::EACCES && *libc::__errno_location() != libc::EACCES {
                *libc::__errno_location() = libc::EACCES;
            }
            errno = *libc::__errno_location();
        }
        fail(err_pipe, STAGE_EXEC)
    }
}

/// A new pseudo-terminal of `rows` by `cols`: (its master, its slave), both close-on-exec.
/// The slave becomes a command's stdin, stdout, stderr and controlling terminal.
pub(crate) fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: open on a literal path; the result is a new descriptor or -1.
    let master = cvt(unsafe { libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: a descriptor open just returned, owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let unlock: c_int = 0;
    // SAFETY: TIOCSPTLCK (unlockpt) reads an int that lives on this frame for the call.
    cvt(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    // The slave is opened through the master itself (TIOCGPTPEER), not by the name TIOCGPTN
    // gives under /dev/pts: a /dev/pts of the machine's (its root is the machine's to change)
    // cannot hand over another terminal, and no name is looked up between two calls.
    // SAFETY: ioctl on the master we own; returns a new descriptor or -1.
    let slave = cvt(unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
    })?;
    // SAFETY: a descriptor the ioctl just returned, owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize that lives on this frame for the call.
    cvt(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) })?;
    Ok((master, slave))
}

/// Waits for any child (including re-parented orphans); `Ok(None)` when there is none.
pub(super) fn wait_any() -> io::Result<Option<(i32, ExitStatus)>> {
    let mut status: c_int = 0;
    loop {
        // SAFETY: `status` is a valid int to write to.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
        if pid > 0 {
            let exit = if libc::WIFSIGNALED(status) {
                ExitStatus::Signaled(libc::WTERMSIG(status))
            } else {
                ExitStatus::Exited(libc::WEXITSTATUS(status))
            };
            return Ok(Some((pid, exit)));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// Makes this process the reaper of its orphaned descendants, as PID 1 is.
pub(super) fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) }).map(drop)
}

/// Sends `signal` to every process in process group `pgid`.
pub(super) fn kill_group(pgid: i32, signal: c_int) -> io::Result<()> {
    if pgid <= 1 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill with plain integers.
    cvt(unsafe { libc::kill(-pgid, signal) }).map(drop)
}

/// Whether process group `pgid` still has a member (a zombie counts until it is reaped).
pub(super) fn group_alive(pgid: i32) -> bool {
    match kill_group(pgid, 0) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() != Some(libc::ESRCH),
    }
}

/// The agent's effective user id.
pub(super) fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// For each descriptor, whether it is readable (or hung up) within `timeout`.
pub(crate) fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.as_millis().min(c_int::MAX as u128) as c_int;
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            return Ok(vec![false; fds.len()]);
        }
        return Err(err);
    }
    Ok(pfds.iter().map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0).collect())
}

/// The write end of the termination pipe, for the signal handler (-1 until installed).
static TERMINATION_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_termination(signal: c_int) {
    let fd = TERMINATION_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write and errno access are async-signal-safe; errno is restored so the
        // interrupted code does not see ours.
        unsafe {
            let saved = *libc::__errno_location();
            let byte = signal as u8;
            libc::write(fd, (&byte as *const u8).cast(), 1);
            *libc::__errno_location() = saved;
        }
    }
}

/// Routes SIGTERM and SIGINT to a byte (the signal number) written to `write_end`, which
/// becomes non-blocking and stays open for the life of the process.
pub(super) fn install_termination_handler(write_end: OwnedFd) -> io::Result<()> {
    let fd = write_end.into_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    TERMINATION_PIPE.store(fd, Ordering::Relaxed);
    on_termination_signals(on_termination)
}

/// Installs `handler` for SIGTERM and SIGINT (restarting interrupted calls) and unblocks
/// both. `handler` must only make async-signal-safe calls.
pub(crate) fn on_termination_signals(handler: extern "C" fn(c_int)) -> io::Result<()> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the caller's handler only calls async-signal-safe functions; the struct is
        // zeroed (a valid sigaction) before its fields are set.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            cvt(libc::sigaction(signal, &action, ptr::null_mut()))?;
            // A signal blocked since the process started would never reach the handler.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, ptr::null_mut());
        }
    }
    Ok(())
}

/// Bytes available to an unprivileged writer on the filesystem holding `path` (`statvfs`).
pub(crate) fn free_bytes(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer for the call's duration.
    cvt(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Wakes every `accept` waiting on the listening socket `fd` (it fails with `EINVAL`), so the
/// thread blocked there can end and close it.
pub(crate) fn shut_down_listener(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown(2) on a descriptor the caller keeps open; it touches no memory of ours.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) }).map(drop)
}
