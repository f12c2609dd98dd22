//! The container launcher's system calls: fork, namespaces (unshare, setns), the mounts and
//! `pivot_root` of the container's PID 1, waiting for it and forwarding SIGTERM to it. The
//! plain ones (fork, setsid, descriptors, locks, signals, umask) also serve `init --detach`
//! (`crate::daemon`), which launches an agent the same way without namespaces.
//!
//! Unsafe code is allowed here, and only here, because these are libc calls with no safe
//! wrapper in std: std can neither fork without exec nor touch namespaces or mounts.
//! Everything above this module stays safe. The container's set-up runs as a list of
//! [`Action`]s prepared before `fork`, so the child only makes system calls on data it
//! already has; it must never allocate, lock or touch Rust state between `fork` and `execve`,
//! and no descriptor this module creates may lack close-on-exec.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_ulong, CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use crate::supervisor::ExitStatus;

pub(super) use crate::supervisor::sys::{cvt, pipe};

/// Makes sure descriptors 0, 1 and 2 are open (on /dev/null when they were closed), so that
/// no file this process opens later lands on one of them, and closes every inherited
/// descriptor above 2: the monitor outlives the caller and must not hold its pipes open.
pub(crate) fn sanitize_descriptors() -> io::Result<()> {
    for fd in 0..3 {
        // SAFETY: fcntl and open with plain arguments; a descriptor opened here is the lowest
        // free one, i.e. `fd`, and is deliberately left open for the life of the process.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) < 0 {
                cvt(libc::open(c"/dev/null".as_ptr(), libc::O_RDWR))?;
            }
        }
    }
    // SAFETY: no Rust object owns a descriptor above 2 yet: the caller runs this first.
    match cvt(unsafe { libc::close_range(3, c_int::MAX as libc::c_uint, 0) }) {
        Ok(_) => Ok(()),
        // Before Linux 5.9: close what /proc lists (collected first: reading the directory
        // holds a descriptor of its own).
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            let open: Vec<c_int> = std::fs::read_dir("/proc/self/fd")?
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect();
            for fd in open {
                // SAFETY: as above, nothing owns these; a stale number (the directory's own
                // descriptor) just fails with EBADF.
                unsafe { libc::close(fd) };
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Takes an exclusive flock on `fd` without waiting; `false` when another holds it.
pub(crate) fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we borrow.
    match cvt(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether `fd` is a network namespace (an nsfs file of type CLONE_NEWNET).
pub(super) fn is_net_namespace(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: an ioctl without argument on a descriptor we borrow.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::NS_GET_NSTYPE) == libc::CLONE_NEWNET }
}

/// Which side of a fork this process is.
pub(crate) enum Forked {
    /// The parent, with the child's pid.
    Parent(i32),
    /// The child.
    Child,
}

/// Forks. The caller must be single-threaded: the child runs ordinary Rust code.
pub(crate) fn fork_single_threaded() -> io::Result<Forked> {
    // SAFETY: the caller is single-threaded (no thread exists yet), so the child inherits no
    // lock held by another thread and may run ordinary code.
    match unsafe { libc::fork() } {
        pid if pid < 0 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// Starts a new session: the monitor leaves the caller's process group and terminal.
pub(crate) fn setsid() -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    cvt(unsafe { libc::setsid() }).map(drop)
}

/// Points descriptors 0, 1 and 2 at `stdin` and `out`.
pub(crate) fn redirect_stdio(stdin: BorrowedFd<'_>, out: BorrowedFd<'_>) -> io::Result<()> {
    for (target, fd) in [(0, stdin), (1, out), (2, out)] {
        // SAFETY: dup2 on descriptors that are open (`stdin` and `out` are borrowed, and are
        // above 2 because `sanitize_descriptors` ran first).
        cvt(unsafe { libc::dup2(fd.as_raw_fd(), target) })?;
    }
    Ok(())
}

/// Moves children this process creates from now on into a new PID namespace.
pub(super) fn unshare_pid_namespace() -> io::Result<()> {
    // SAFETY: unshare with a flag.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWPID) }).map(drop)
}

/// Enters namespace `fd` of type `nstype`.
pub(super) fn setns(fd: BorrowedFd<'_>, nstype: c_int) -> io::Result<()> {
    // SAFETY: setns on a descriptor we borrow.
    cvt(unsafe { libc::setns(fd.as_raw_fd(), nstype) }).map(drop)
}

/// Sends `signal` to process `pid`.
pub(crate) fn kill(pid: i32, signal: c_int) -> io::Result<()> {
    if pid <= 1 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill with plain integers.
    cvt(unsafe { libc::kill(pid, signal) }).map(drop)
}

/// Waits for child `pid` to end, through EINTR.
pub(crate) fn wait_for(pid: i32) -> io::Result<ExitStatus> {
    let mut status: c_int = 0;
    loop {
        // SAFETY: `status` is a valid int to write to.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            return Ok(if libc::WIFSIGNALED(status) {
                ExitStatus::Signaled(libc::WTERMSIG(status))
            } else {
                ExitStatus::Exited(libc::WEXITSTATUS(status))
            });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Sets this process's file mode creation mask.
pub(crate) fn set_umask(mask: u32) {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) };
}

/// This process's id.
pub(crate) fn getpid() -> i32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// The container's PID 1 as the host sees it; 0 until it is forked.
static INIT_PID: AtomicI32 = AtomicI32::new(0);
/// A SIGTERM arrived before PID 1 existed.
static TERM_PENDING: AtomicBool = AtomicBool::new(false);
/// A SIGTERM arrived at all (PID 1 may have discarded a forwarded one before its agent
/// installed a handler: a PID 1 ignores signals it has no handler for).
static TERM_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn forward_termination(_signal: c_int) {
    // SAFETY: kill and errno access are async-signal-safe; errno is restored so the
    // interrupted code does not see ours.
    unsafe {
        let saved = *libc::__errno_location();
        TERM_SEEN.store(true, Ordering::SeqCst);
        let pid = INIT_PID.load(Ordering::SeqCst);
        if pid > 0 {
            libc::kill(pid, libc::SIGTERM);
        } else {
            TERM_PENDING.store(true, Ordering::SeqCst);
        }
        *libc::__errno_location() = saved;
    }
}

/// Makes SIGTERM and SIGINT to this process a SIGTERM to the container's PID 1 (sent as soon
/// as it exists). The child must undo this with [`Action::DefaultSignals`].
pub(super) fn forward_termination_signals() -> io::Result<()> {
    crate::supervisor::sys::on_termination_signals(forward_termination)
}

/// Records PID 1 for the signal handler and delivers a SIGTERM that arrived before it existed.
pub(super) fn set_init_pid(pid: i32) {
    INIT_PID.store(pid, Ordering::SeqCst);
    if TERM_PENDING.swap(false, Ordering::SeqCst) {
        let _ = kill(pid, libc::SIGTERM);
    }
}

/// Whether this process was asked to terminate since it installed its handler.
pub(super) fn termination_requested() -> bool {
    TERM_SEEN.load(Ordering::SeqCst)
}

/// Forgets PID 1 once it was reaped, so that a late SIGTERM cannot hit a process that
/// reused its pid.
pub(super) fn clear_init_pid() {
    INIT_PID.store(0, Ordering::SeqCst);
}

/// One step of the container's set-up in its PID 1, prepared before `fork`.
#[derive(Debug)]
pub(super) enum Action {
    /// Restore default dispositions of the signals the monitor handles, and an empty mask.
    DefaultSignals,
    /// Start a new session.
    SetSid,
    /// Enter the namespace open on `fd`.
    SetNs {
        /// An open namespace file.
        fd: RawFd,
        /// Its `CLONE_NEW*` type.
        nstype: c_int,
    },
    /// Unshare these `CLONE_NEW*` namespaces.
    Unshare(c_int),
    /// Set the hostname.
    SetHostname(CString),
    /// mount(2).
    Mount {
        /// Source (a path for bind mounts, a name for virtual file systems).
        source: Option<CString>,
        /// Mount point.
        target: CString,
        /// File system type, none for bind mounts and propagation changes.
        fstype: Option<CString>,
        /// `MS_*` flags.
        flags: c_ulong,
        /// File system options.
        data: Option<CString>,
    },
    /// Create a directory unless it exists.
    Mkdir(CString),
    /// Create an empty file unless it exists (a mount point for a bind-mounted file).
    CreateFile(CString),
    /// Create symbolic link `link` pointing to `target`.
    Symlink {
        /// What the link points to.
        target: CString,
        /// Where the link is created.
        link: CString,
    },
    /// Write bytes to an existing file (a sysctl).
    WriteFile {
        /// The file.
        path: CString,
        /// What to write.
        contents: &'static [u8],
    },
    /// Change directory.
    Chdir(CString),
    /// `pivot_root(".", ".")`: the current directory becomes `/`, the old root is stacked on it.
    PivotRoot,
    /// Detach the old root stacked on `.` by [`Action::PivotRoot`].
    DetachOldRoot,
    /// Set the file mode creation mask.
    Umask(libc::mode_t),
    /// Execute `path` with the plan's argv and environment; when it does not exist, go on.
    ExecIfPresent(CString),
    /// Fail with this errno (nothing was left to try).
    Fail(c_int),
}

/// What the child reports through its pipe when a step fails: the step's index and errno.
pub(super) const FAILURE_LEN: usize = 8;

/// Forks the container's PID 1 (the caller has unshared its PID namespace, so the child is
/// PID 1 of the new one). The child runs `steps` in order and never returns; a failing step
/// writes its index and errno to `report` and exits 1. A successful exec closes `report`
/// (it is close-on-exec), which the parent reads as success.
pub(super) fn fork_init(steps: &[Action], argv: &[CString], env: &[CString], report: BorrowedFd<'_>) -> io::Result<i32> {
    let argv: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(ptr::null())).collect();
    let envp: Vec<*const c_char> = env.iter().map(|e| e.as_ptr()).chain(std::iter::once(ptr::null())).collect();
    // SAFETY: sigset_t and sigaction are plain C structs for which all-zero is a valid value;
    // sigemptyset only writes to the set we own.
    let (empty_mask, default_action) = unsafe {
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut mask);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        (mask, action)
    };
    let child = InitChild {
        steps,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        report: report.as_raw_fd(),
        empty_mask: &empty_mask,
        default_action: &default_action,
    };
    // SAFETY: fork has no memory-safety preconditions; the child branch only runs
    // `child.run`, which makes async-signal-safe calls on data prepared above and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; see `InitChild::run`.
        unsafe { child.run() }
    }
    Ok(pid)
}

/// Decodes what [`fork_init`]'s child wrote: `None` for nothing (it exec'd), else the index of
/// the failed step and its error.
pub(super) fn decode_failure(buf: &[u8]) -> Option<(usize, io::Error)> {
    if buf.len() < FAILURE_LEN {
        return None;
    }
    let step = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let errno = i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Some((step, io::Error::from_raw_os_error(errno)))
}

/// Raw pointers into buffers that outlive the fork: what the child reads.
struct InitChild<'a> {
    steps: &'a [Action],
    argv: *const *const c_char,
    envp: *const *const c_char,
    report: RawFd,
    empty_mask: &'a libc::sigset_t,
    default_action: &'a libc::sigaction,
}

fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(ptr::null(), |s| s.as_ptr())
}

impl InitChild<'_> {
    /// Runs in the child between fork and exec.
    ///
    /// # Safety
    /// Call only in a freshly forked child. Only async-signal-safe libc calls follow.
    unsafe fn run(&self) -> ! {
        for (index, action) in self.steps.iter().enumerate() {
            if let Err(errno) = self.step(action) {
                let mut msg = [0u8; FAILURE_LEN];
                msg[..4].copy_from_slice(&(index as u32).to_le_bytes());
                msg[4..].copy_from_slice(&errno.to_le_bytes());
                libc::write(self.report, msg.as_ptr().cast(), msg.len());
                libc::_exit(1);
            }
        }
        libc::_exit(1)
    }

    /// One action; `Err(errno)` when it failed.
    unsafe fn step(&self, action: &Action) -> Result<(), c_int> {
        let errno = || *libc::__errno_location();
        let check = |r: c_int| if r < 0 { Err(errno()) } else { Ok(()) };
        match action {
            Action::DefaultSignals => {
                libc::sigprocmask(libc::SIG_SETMASK, self.empty_mask, ptr::null_mut());
                for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGPIPE] {
                    libc::sigaction(signal, self.default_action, ptr::null_mut());
                }
                Ok(())
            }
            Action::SetSid => check(libc::setsid()),
            Action::SetNs { fd, nstype } => check(libc::setns(*fd, *nstype)),
            Action::Unshare(flags) => check(libc::unshare(*flags)),
            Action::SetHostname(name) => check(libc::sethostname(name.as_ptr(), name.as_bytes().len())),
            Action::Mount { source, target, fstype, flags, data } => check(libc::mount(
                opt_ptr(source),
                target.as_ptr(),
                opt_ptr(fstype),
                *flags,
                opt_ptr(data).cast(),
            )),
            Action::Mkdir(path) => match check(libc::mkdir(path.as_ptr(), 0o755)) {
                Err(libc::EEXIST) => Ok(()),
                r => r,
            },
            Action::CreateFile(path) => {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOCTTY, 0o644);
                check(fd)?;
                libc::close(fd);
                Ok(())
            }
            Action::Symlink { target, link } => check(libc::symlink(target.as_ptr(), link.as_ptr())),
            Action::WriteFile { path, contents } => {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOCTTY);
                check(fd)?;
                let written = libc::write(fd, contents.as_ptr().cast(), contents.len());
                let e = errno();
                libc::close(fd);
                match written {
                    n if n < 0 => Err(e),
                    n if n as usize != contents.len() => Err(libc::EIO),
                    _ => Ok(()),
                }
            }
            Action::Chdir(path) => check(libc::chdir(path.as_ptr())),
            Action::PivotRoot => {
                let dot: &CStr = c".";
                check(libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as c_int)
            }
            Action::DetachOldRoot => check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH)),
            Action::Umask(mask) => {
                libc::umask(*mask);
                Ok(())
            }
            Action::ExecIfPresent(path) => {
                libc::execve(path.as_ptr(), self.argv, self.envp);
                match errno() {
                    libc::ENOENT | libc::ENOTDIR => Ok(()),
                    e => Err(e),
                }
            }
            Action::Fail(e) => Err(*e),
        }
    }
}
