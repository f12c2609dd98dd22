//! `flotilla-agent container`: starts a machine of the local-container platform, i.e. the
//! agent as PID 1 of new PID, mount, UTS and IPC namespaces, in a network namespace the
//! deployer made, with the machine's root directory as `/`.
//!
//! Three processes take part. The launcher (what the deployer runs and waits for) checks the
//! arguments, binds the port forwards and forks the monitor, then waits on a pipe until the
//! container runs or failed, and exits 0 or 1 with the reason. The monitor starts its own
//! session, stays in the caller's mount and network namespaces, forks the container's PID 1,
//! writes the pidfile, relays the forwarded ports and waits for PID 1; a SIGTERM to it is
//! passed on to PID 1. PID 1 joins the network namespace, sets up its mounts, pivots into
//! the root and executes the agent's `init`, which stops the machine on SIGTERM.
//!
//! What this module must never do: leave a process behind when the launcher reports a
//! failure, or leave a mount on the host (every mount happens in PID 1's own mount namespace).

pub(crate) mod sys;

use std::ffi::CString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use flotilla_protocol::layout::PidFile;

use sys::Action;

use crate::cli::{Arg, Parser, UsageError};

/// The agent of the activated system, tried first (as the container sees it).
pub const SYSTEM_AGENT: &str = flotilla_protocol::layout::SYSTEM_AGENT;
/// The bootstrap agent the deployer copies in, run when no system was activated yet.
pub const BOOTSTRAP_AGENT: &str = flotilla_protocol::layout::BOOTSTRAP_AGENT;
/// The environment of the container's PID 1, and nothing else.
pub const INIT_ENV: [&str; 3] = ["PATH=/run/current-system/sw/bin:/bin", "HOME=/root", "container=flotilla"];

/// How long a forwarded connection waits for the machine to accept it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP port forward from `127.0.0.1:host_port` on the caller's side to `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// The port listened on at 127.0.0.1 in the caller's network namespace.
    pub host_port: u16,
    /// Where connections go (the machine's address and port).
    pub target: SocketAddr,
}

impl Forward {
    /// Parses `HOSTPORT:IP:PORT` (an IPv6 address in brackets: `8080:[fd00::2]:80`).
    pub fn parse(spec: &str) -> Result<Forward, UsageError> {
        let shape = "expected HOSTPORT:IP:PORT, e.g. 8080:10.231.0.2:80";
        let (host, target) = spec.split_once(':').ok_or_else(|| UsageError::Invalid(shape.to_string()))?;
        let host_port = parse_port(host).ok_or_else(|| UsageError::Invalid(format!("{host:?} is not a port (1-65535); {shape}")))?;
        let target: SocketAddr = target.parse().map_err(|_| UsageError::Invalid(format!("{target:?} is not IP:PORT; {shape}")))?;
        if target.port() == 0 {
            return Err(UsageError::Invalid(format!("port 0 is not a port to forward to; {shape}")));
        }
        Ok(Forward { host_port, target })
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host_port, self.target)
    }
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|p| *p != 0)
}

/// The arguments of `flotilla-agent container`, checked as far as is possible without
/// touching the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerArgs {
    /// The machine's root directory on the host.
    pub root: PathBuf,
    /// The hostname inside.
    pub hostname: String,
    /// The named network namespace to join.
    pub netns: PathBuf,
    /// Where the container's identity is written.
    pub pidfile: PathBuf,
    /// The log that the monitor's and PID 1's output is appended to.
    pub console: PathBuf,
    /// TCP port forwards.
    pub forwards: Vec<Forward>,
    /// Take over the running container of `pidfile` whose monitor died, instead of starting
    /// one: a new monitor relays the forwards and waits for its PID 1.
    pub adopt: bool,
}

impl ContainerArgs {
    /// Parses the options after `container`; each error is one line naming the option.
    pub fn parse(args: &[String]) -> Result<ContainerArgs, UsageError> {
        let (mut root, mut hostname, mut netns, mut pidfile, mut console) = (None, None, None, None, None);
        let mut forwards: Vec<Forward> = Vec::new();
        let mut adopt = false;
        let valued = ["--root", "--hostname", "--netns", "--pidfile", "--console", "--forward"];
        let mut parser = Parser::new(args, &valued, &["--adopt"], "flotilla-agent container --help");
        while let Some(arg) = parser.next() {
            let (flag, value) = match arg? {
                Arg::Flag(_) => {
                    adopt = true;
                    continue;
                }
                // `container` takes no positional argument.
                Arg::Positional(other) => return Err(parser.unknown(other)),
                Arg::Value(flag, value) => (flag, value),
            };
            let slot = match flag {
                "--root" => &mut root,
                "--hostname" => &mut hostname,
                "--netns" => &mut netns,
                "--pidfile" => &mut pidfile,
                "--console" => &mut console,
                "--forward" => {
                    let forward = Forward::parse(value).map_err(|e| UsageError::Invalid(format!("--forward {value}: {e}")))?;
                    if let Some(other) = forwards.iter().find(|f| f.host_port == forward.host_port) {
                        return Err(UsageError::Invalid(format!("--forward {forward}: port {} is already forwarded by --forward {other}", forward.host_port)));
                    }
                    forwards.push(forward);
                    continue;
                }
                _ => unreachable!("the parser knows only these"),
            };
            if slot.is_some() {
                return Err(UsageError::Twice(flag));
            }
            *slot = Some(value.to_owned());
        }
        let required = |v: Option<String>, flag: &'static str| v.ok_or_else(|| parser.required(flag));
        let path = |v: Option<String>, flag: &'static str| -> Result<PathBuf, UsageError> {
            let v = required(v, flag)?;
            if v.is_empty() {
                return Err(UsageError::Invalid(format!("{flag} needs a non-empty path")));
            }
            std::path::absolute(&v).map_err(|e| UsageError::Invalid(format!("{flag} {v}: {}", errno_text(&e))))
        };
        let root = path(root, "--root")?;
        let hostname = required(hostname, "--hostname")?;
        if !valid_hostname(&hostname) {
            return Err(UsageError::Invalid(format!(
                "--hostname {hostname:?}: not a valid hostname: use dot-separated labels of 1 to 63 letters, digits and `-` (not first or last), at most 64 characters"
            )));
        }
        Ok(ContainerArgs {
            root,
            hostname,
            netns: path(netns, "--netns")?,
            pidfile: path(pidfile, "--pidfile")?,
            console: path(console, "--console")?,
            forwards,
            adopt,
        })
    }
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// Reads and parses the pidfile (its format is the contract's: [`PidFile`]).
pub fn read_pidfile(path: &Path) -> io::Result<PidFile> {
    let text = fs::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes the pidfile by renaming a complete temporary file over it.
pub fn write_pidfile(pidfile: &PidFile, path: &Path) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let written = fs::write(&tmp, pidfile.to_json()).and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Whether the pidfile's PID 1 still runs (the same process, not a reuse of its pid).
pub fn init_running(pidfile: &PidFile) -> bool {
    flotilla_proc::is_running(pidfile.init, pidfile.init_start_time)
}

/// An OS error's text without Rust's " (os error N)" suffix.
fn errno_text(e: &io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(code) => text.strip_suffix(&format!(" (os error {code})")).unwrap_or(&text).to_string(),
        None => text,
    }
}

/// Why `flotilla-agent container` cannot start (or adopt) the machine; its exit status is 1.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The command line is wrong.
    #[error("{0}")]
    Usage(#[from] UsageError),
    /// A system call failed: what was being done, and the system's words for why.
    #[error("{what}: {}", errno_text(source))]
    Os {
        /// What was being done (naming the option it came from, if any).
        what: String,
        /// Why.
        source: io::Error,
    },
    /// A path or value cannot be handed to the system: it holds a NUL byte.
    #[error("{0} contains a NUL byte")]
    Nul(String),
    /// The machine cannot be started as asked (a check refused, or the monitor said why).
    #[error("{0}")]
    Refused(String),
}

/// `ContainerError::Os` for `what`, as a `map_err` argument.
fn os(what: impl Into<String>) -> impl FnOnce(io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Os { what, source }
}

fn cstring(path: &Path) -> Result<CString, ContainerError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ContainerError::Nul(path.display().to_string()))
}

/// Everything the monitor needs, opened by the launcher.
struct Prepared {
    /// `<pidfile>.lock`, flocked: held by the monitor for the container's life, so a second
    /// launcher for the same machine is refused even before a pidfile exists.
    lock: File,
    root: PathBuf,
    netns: File,
    console: File,
    dev_null: File,
    listeners: Vec<(TcpListener, Forward)>,
}

/// Runs the launcher: checks, forks the monitor and returns once the container runs
/// (the agent was executed as its PID 1 and every forward listens), or with why it does not.
///
/// Call it only from a single-threaded process, as `flotilla-agent`'s `main` is: it forks,
/// and the monitor goes on running ordinary code in the child; it returns only in the launcher.
pub fn launch(args: &ContainerArgs) -> Result<(), ContainerError> {
    sys::sanitize_descriptors().map_err(os("cannot set up descriptors"))?;
    let prepared = prepare(args)?;
    let (ready_read, ready_write) = sys::pipe().map_err(os("cannot create a pipe"))?;
    match sys::fork_single_threaded().map_err(os("cannot fork the monitor"))? {
        sys::Forked::Child if args.adopt => {
            drop(ready_read);
            adoptive_monitor(args, prepared, ready_write)
        }
        sys::Forked::Child => {
            drop(ready_read);
            monitor(args, prepared, ready_write)
        }
        sys::Forked::Parent(monitor_pid) => {
            drop(ready_write);
            drop(prepared);
            let mut report = Vec::new();
            let read = File::from(ready_read).read_to_end(&mut report);
            if read.is_ok() && report == b"ok" {
                return Ok(());
            }
            // The monitor exits right after reporting a failure; once it is reaped nothing
            // of the container is left.
            let _ = sys::wait_for(monitor_pid);
            let report = String::from_utf8_lossy(&report).trim().to_string();
            Err(ContainerError::Refused(if report.is_empty() {
                format!("the container monitor ended before the container started; see {}", args.console.display())
            } else {
                report
            }))
        }
    }
}

/// The launcher's checks, in the order of the options.
fn prepare(args: &ContainerArgs) -> Result<Prepared, ContainerError> {
    let root = fs::canonicalize(&args.root).map_err(os(format!("--root {}", args.root.display())))?;
    if !root.is_dir() {
        return Err(ContainerError::Refused(format!("--root {}: not a directory", args.root.display())));
    }
    if root == Path::new("/") {
        return Err(ContainerError::Refused("--root /: the container's root must be a machine directory, not the host's /".into()));
    }
    let netns = File::open(&args.netns).map_err(os(format!("--netns {}", args.netns.display())))?;
    if !sys::is_net_namespace(netns.as_fd()) {
        return Err(ContainerError::Refused(format!("--netns {}: not a network namespace (create one with `ip netns add`)", args.netns.display())));
    }
    let pid_dir = args.pidfile.parent().unwrap_or(Path::new("/"));
    if !pid_dir.is_dir() {
        return Err(ContainerError::Refused(format!("--pidfile {}: directory {} does not exist", args.pidfile.display(), pid_dir.display())));
    }
    let lock_path = args.pidfile.with_extension("lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(os(format!("--pidfile {}: cannot open {}", args.pidfile.display(), lock_path.display())))?;
    if !sys::try_lock_exclusive(lock.as_fd()).map_err(os(format!("cannot lock {}", lock_path.display())))? {
        return Err(ContainerError::Refused(format!(
            "--pidfile {}: another launcher or monitor holds {}: the machine is starting or running; stop it first",
            args.pidfile.display(),
            lock_path.display()
        )));
    }
    if args.adopt {
        match read_pidfile(&args.pidfile) {
            Ok(old) if init_running(&old) => {}
            _ => return Err(ContainerError::Refused(format!("--adopt: no container runs with --pidfile {}; start it instead", args.pidfile.display()))),
        }
    } else if let Ok(old) = read_pidfile(&args.pidfile) {
        if init_running(&old) {
            return Err(ContainerError::Refused(format!(
                "--pidfile {}: a container already runs with it (init {}); stop it first",
                args.pidfile.display(),
                old.init
            )));
        }
    }
    let console = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(&args.console)
        .map_err(os(format!("--console {}", args.console.display())))?;
    let dev_null = File::open("/dev/null").map_err(os("cannot open /dev/null"))?;
    let mut listeners = Vec::new();
    for forward in &args.forwards {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, forward.host_port)).map_err(os(format!("cannot bind 127.0.0.1:{} for forward {forward}", forward.host_port)))?;
        listeners.push((listener, *forward));
    }
    Ok(Prepared { lock, root, netns, console, dev_null, listeners })
}

/// The monitor: starts PID 1, reports to the launcher through `ready`, relays the forwards
/// and waits for PID 1 to end.
fn monitor(args: &ContainerArgs, prepared: Prepared, ready: OwnedFd) -> ! {
    let mut ready = File::from(ready);
    let mut fail = |init: Option<i32>, message: String| -> ! {
        if let Some(pid) = init {
            let _ = sys::kill(pid, libc::SIGKILL);
            let _ = sys::wait_for(pid);
        }
        eprintln!("flotilla-agent container: {message}");
        let _ = ready.write_all(message.as_bytes());
        std::process::exit(1)
    };
    let Prepared { lock, root, netns, console, dev_null, listeners } = prepared;
    // Held until this process exits (`exit` does not run destructors of live locals).
    let _lock = lock;
    if let Err(e) = sys::setsid().and_then(|()| sys::redirect_stdio(dev_null.as_fd(), console.as_fd())) {
        fail(None, format!("cannot detach the monitor: {}", errno_text(&e)));
    }
    drop((dev_null, console));
    let _ = std::env::set_current_dir("/");

    // Children forked after unshare(CLONE_NEWPID) go to the new namespace, and the kernel
    // refuses new threads until this process points its children back at its own namespace.
    let own_pid_ns = File::open("/proc/self/ns/pid").unwrap_or_else(|e| fail(None, format!("cannot open /proc/self/ns/pid: {}", errno_text(&e))));
    if let Err(e) = sys::forward_termination_signals() {
        fail(None, format!("cannot install the SIGTERM handler: {}", errno_text(&e)));
    }
    let plan = init_plan(args, &root, netns.as_raw_fd()).unwrap_or_else(|e| fail(None, e.to_string()));
    let (actions, descriptions): (Vec<Action>, Vec<String>) = plan.into_iter().unzip();
    let argv = [c"flotilla-agent".to_owned(), c"init".to_owned()];
    let env: Vec<CString> = INIT_ENV.iter().filter_map(|e| CString::new(*e).ok()).collect();
    let (report_read, report_write) = sys::pipe().unwrap_or_else(|e| fail(None, format!("cannot create a pipe: {}", errno_text(&e))));
    if let Err(e) = sys::unshare_pid_namespace() {
        fail(None, format!("cannot create a PID namespace: {}", errno_text(&e)));
    }
    let init = sys::fork_init(&actions, &argv, &env, report_write.as_fd())
        .unwrap_or_else(|e| fail(None, format!("cannot fork the container's PID 1: {}", errno_text(&e))));
    sys::set_init_pid(init);
    drop(report_write);
    if let Err(e) = sys::setns(own_pid_ns.as_fd(), libc::CLONE_NEWPID) {
        fail(Some(init), format!("cannot return to the monitor's PID namespace: {}", errno_text(&e)));
    }
    drop(own_pid_ns);

    let mut report = Vec::new();
    if let Err(e) = File::from(report_read).read_to_end(&mut report) {
        fail(Some(init), format!("cannot read the start-up report of the container's PID 1: {}", errno_text(&e)));
    }
    if let Some((step, error)) = sys::decode_failure(&report) {
        let what = descriptions.get(step).map_or("setting up the container", String::as_str);
        // A `Fail` step's description is the whole story; the others lack the OS's reason.
        let message = match actions.get(step) {
            Some(Action::Fail(_)) => what.to_string(),
            _ => format!("{what}: {}", errno_text(&error)),
        };
        fail(Some(init), message);
    }
    // PID 1 holds the network namespace now; the deployer may delete its name at will.
    drop(netns);

    let start_time = flotilla_proc::Stat::read(&init.to_string()).map(|s| s.start_time).unwrap_or_else(|e| fail(Some(init), format!("cannot read /proc/{init}/stat: {}", errno_text(&e))));
    let pidfile = PidFile { monitor: sys::getpid() as u32, init: init as u32, init_start_time: start_time };
    if let Err(e) = write_pidfile(&pidfile, &args.pidfile) {
        fail(Some(init), format!("--pidfile {}: cannot write: {}", args.pidfile.display(), errno_text(&e)));
    }
    for (listener, forward) in listeners {
        let spawned = std::thread::Builder::new().name(format!("forward {}", forward.host_port)).spawn(move || serve_forward(listener, forward));
        if let Err(e) = spawned {
            let _ = fs::remove_file(&args.pidfile);
            fail(Some(init), format!("cannot start forward {forward}: {}", errno_text(&e)));
        }
    }
    // Asked to stop while starting: the SIGTERM may have reached PID 1 before its agent could
    // act on it, so end the start here rather than report a container nobody wants.
    if sys::termination_requested() {
        let _ = fs::remove_file(&args.pidfile);
        fail(Some(init), "terminated while starting".into());
    }
    eprintln!("flotilla-agent container: {} started: monitor {}, init {}", args.hostname, pidfile.monitor, pidfile.init);
    let _ = ready.write_all(b"ok");
    drop(ready);

    let status = loop {
        match sys::wait_for(init) {
            Ok(status) => {
                sys::clear_init_pid();
                break status.to_string();
            }
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => break "lost track of it".to_string(),
            Err(e) => {
                eprintln!("flotilla-agent container: waiting for init {init}: {}", errno_text(&e));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    eprintln!("container stopped: {status}");
    if read_pidfile(&args.pidfile).is_ok_and(|p| p == pidfile) {
        let _ = fs::remove_file(&args.pidfile);
    }
    std::process::exit(0)
}

/// How often an adoptive monitor looks whether the container's PID 1 still runs.
const ADOPTED_POLL: Duration = Duration::from_millis(200);

/// The monitor of a running container whose first monitor died (killed, or out of memory):
/// its port forwards died with it, and nothing would remove the pidfile when the container
/// stops. This one takes the machine's lock, names itself in the pidfile, relays the
/// forwards, passes SIGTERM on to PID 1 and, PID 1 not being its child, polls for its end.
fn adoptive_monitor(args: &ContainerArgs, prepared: Prepared, ready: OwnedFd) -> ! {
    let mut ready = File::from(ready);
    let mut fail = |message: String| -> ! {
        eprintln!("flotilla-agent container: {message}");
        let _ = ready.write_all(message.as_bytes());
        std::process::exit(1)
    };
    let Prepared { lock, console, dev_null, listeners, .. } = prepared;
    // Held until this process exits (`exit` does not run destructors of live locals).
    let _lock = lock;
    if let Err(e) = sys::setsid().and_then(|()| sys::redirect_stdio(dev_null.as_fd(), console.as_fd())) {
        fail(format!("cannot detach the monitor: {}", errno_text(&e)));
    }
    drop((dev_null, console));
    let _ = std::env::set_current_dir("/");
    let old = match read_pidfile(&args.pidfile) {
        Ok(old) if init_running(&old) => old,
        _ => fail(format!("--adopt: the container of --pidfile {} stopped meanwhile", args.pidfile.display())),
    };
    if let Err(e) = sys::forward_termination_signals() {
        fail(format!("cannot install the SIGTERM handler: {}", errno_text(&e)));
    }
    // PID 1 is no child of ours: between its end and the next poll its pid could be reused,
    // a window of one poll, which the first monitor (that reaps it) does not have.
    sys::set_init_pid(old.init as i32);
    let pidfile = PidFile { monitor: sys::getpid() as u32, ..old };
    if let Err(e) = write_pidfile(&pidfile, &args.pidfile) {
        fail(format!("--pidfile {}: cannot write: {}", args.pidfile.display(), errno_text(&e)));
    }
    for (listener, forward) in listeners {
        let spawned = std::thread::Builder::new().name(format!("forward {}", forward.host_port)).spawn(move || serve_forward(listener, forward));
        if let Err(e) = spawned {
            let _ = write_pidfile(&old, &args.pidfile);
            fail(format!("cannot start forward {forward}: {}", errno_text(&e)));
        }
    }
    eprintln!("flotilla-agent container: {} adopted: monitor {}, init {}", args.hostname, pidfile.monitor, pidfile.init);
    let _ = ready.write_all(b"ok");
    drop(ready);
    while init_running(&pidfile) {
        std::thread::sleep(ADOPTED_POLL);
    }
    sys::clear_init_pid();
    eprintln!("container stopped");
    if read_pidfile(&args.pidfile).is_ok_and(|p| p == pidfile) {
        let _ = fs::remove_file(&args.pidfile);
    }
    std::process::exit(0)
}

/// PID 1's steps from fork to exec, each with what it does in words for an error message.
fn init_plan(args: &ContainerArgs, root: &Path, netns_fd: i32) -> Result<Vec<(Action, String)>, ContainerError> {
    let at = |rel: &str| cstring(&root.join(rel));
    let c = |s: &str| CString::new(s).map_err(|_| ContainerError::Nul(format!("{s:?}")));
    let r = root.display();
    let mount = |source: Option<&str>, target: CString, fstype: Option<&str>, flags: libc::c_ulong, data: Option<&str>| -> Result<Action, ContainerError> {
        Ok(Action::Mount { source: source.map(c).transpose()?, target, fstype: fstype.map(c).transpose()?, flags, data: data.map(c).transpose()? })
    };
    let tmpfs = |rel: &str, flags: libc::c_ulong, data: &str| -> Result<Vec<(Action, String)>, ContainerError> {
        Ok(vec![
            (Action::Mkdir(at(rel)?), format!("creating {r}/{rel}")),
            (mount(Some("tmpfs"), at(rel)?, Some("tmpfs"), flags, Some(data))?, format!("mounting a tmpfs on {r}/{rel}")),
        ])
    };
    let (nosuid, nodev, noexec) = (libc::MS_NOSUID, libc::MS_NODEV, libc::MS_NOEXEC);

    let mut plan = vec![
        (Action::DefaultSignals, "resetting signal handlers".to_string()),
        (Action::SetSid, "starting a new session".to_string()),
        (Action::SetNs { fd: netns_fd, nstype: libc::CLONE_NEWNET }, format!("joining the network namespace {}", args.netns.display())),
        (Action::Unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC), "creating mount, UTS and IPC namespaces".to_string()),
        (Action::SetHostname(c(&args.hostname)?), format!("setting the hostname to {}", args.hostname)),
        (mount(None, c("/")?, None, libc::MS_REC | libc::MS_PRIVATE, None)?, "making every mount private".to_string()),
        (mount(Some(&root.to_string_lossy()), cstring(root)?, None, libc::MS_BIND | libc::MS_REC, None)?, format!("bind-mounting {r} onto itself")),
        (Action::Mkdir(at("proc")?), format!("creating {r}/proc")),
        (mount(Some("proc"), at("proc")?, Some("proc"), nosuid | nodev | noexec, None)?, format!("mounting proc on {r}/proc")),
    ];
    plan.extend(tmpfs("dev", nosuid | libc::MS_STRICTATIME, "mode=755,size=65536k")?);
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = format!("dev/{node}");
        plan.push((Action::CreateFile(at(&target)?), format!("creating {r}/{target}")));
        plan.push((mount(Some(&format!("/dev/{node}")), at(&target)?, None, libc::MS_BIND, None)?, format!("bind-mounting /dev/{node} on {r}/{target}")));
    }
    for (link, target) in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")] {
        plan.push((Action::Symlink { target: c(target)?, link: at(&format!("dev/{link}"))? }, format!("linking {r}/dev/{link} to {target}")));
    }
    // Terminals of the machine's own (a devpts instance of its own, as containers have):
    // a command the deployer runs with a terminal over the agent protocol gets one here.
    plan.extend([
        (Action::Mkdir(at("dev/pts")?), format!("creating {r}/dev/pts")),
        (
            mount(Some("devpts"), at("dev/pts")?, Some("devpts"), nosuid | noexec, Some("newinstance,ptmxmode=0666,mode=0620"))?,
            format!("mounting a devpts instance on {r}/dev/pts"),
        ),
        (Action::Symlink { target: c("pts/ptmx")?, link: at("dev/ptmx")? }, format!("linking {r}/dev/ptmx to pts/ptmx")),
    ]);
    plan.extend(tmpfs("dev/shm", nosuid | nodev, "mode=1777")?);
    plan.extend(tmpfs("run", nosuid | nodev, "mode=755")?);
    plan.extend(tmpfs("tmp", nosuid | nodev, "mode=1777")?);
    plan.extend([
        // The namespace's own sysctl: unprivileged services may bind port 80, as under Docker.
        (
            Action::WriteFile { path: at("proc/sys/net/ipv4/ip_unprivileged_port_start")?, contents: b"0" },
            "setting net.ipv4.ip_unprivileged_port_start to 0".to_string(),
        ),
        (Action::Chdir(cstring(root)?), format!("entering {r}")),
        (Action::PivotRoot, format!("making {r} the root (pivot_root)")),
        (Action::DetachOldRoot, "detaching the host's root".to_string()),
        (Action::Chdir(c("/")?), "entering /".to_string()),
        (Action::Umask(0o022), "setting the umask".to_string()),
        (Action::ExecIfPresent(c(SYSTEM_AGENT)?), format!("executing {SYSTEM_AGENT}")),
        (Action::ExecIfPresent(c(BOOTSTRAP_AGENT)?), format!("executing {BOOTSTRAP_AGENT}")),
        (Action::Fail(libc::ENOENT), format!("no agent to run: neither {SYSTEM_AGENT} nor {BOOTSTRAP_AGENT} exists under {r}")),
    ]);
    Ok(plan)
}

/// Accepts connections on a forward's listener for the life of the monitor (or of
/// `flotilla-agent forward`).
pub(crate) fn serve_forward(listener: TcpListener, forward: Forward) {
    loop {
        match listener.accept() {
            Ok((client, _)) => {
                let spawned = std::thread::Builder::new().name(format!("forward {}", forward.host_port)).spawn(move || relay(client, forward));
                if let Err(e) = spawned {
                    eprintln!("flotilla-agent container: forward {forward}: cannot start a relay: {}", errno_text(&e));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors or memory: wait for connections to close rather than spin.
                eprintln!("flotilla-agent container: forward {forward}: accept: {}", errno_text(&e));
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Carries one connection both ways; each direction's end of stream becomes a half-close.
fn relay(client: TcpStream, forward: Forward) {
    let server = match TcpStream::connect_timeout(&forward.target, CONNECT_TIMEOUT) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("flotilla-agent container: forward {forward}: cannot connect to {}: {}", forward.target, errno_text(&e));
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    std::thread::scope(|s| {
        s.spawn(|| pump(&client, &server));
        pump(&server, &client);
    });
}

fn pump(from: &TcpStream, to: &TcpStream) {
    match io::copy(&mut &*from, &mut &*to) {
        Ok(_) => {
            let _ = to.shutdown(Shutdown::Write);
        }
        Err(_) => {
            // A reset on either side ends the whole connection, also the other direction.
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    const FULL: &str = "--root /srv/m/web1 --hostname web1 --netns /run/netns/fl-web1 --pidfile /srv/m/web1.pid --console /srv/m/web1.log";

    #[test]
    fn parses_every_option() {
        let a = ContainerArgs::parse(&args(&format!("{FULL} --forward 8080:10.231.0.2:80 --forward 8443:[fd00::2]:443"))).unwrap();
        assert_eq!(a.root, Path::new("/srv/m/web1"));
        assert_eq!(a.hostname, "web1");
        assert_eq!(a.netns, Path::new("/run/netns/fl-web1"));
        assert_eq!(a.pidfile, Path::new("/srv/m/web1.pid"));
        assert_eq!(a.console, Path::new("/srv/m/web1.log"));
        assert_eq!(a.forwards.len(), 2);
        assert_eq!(a.forwards[0], Forward { host_port: 8080, target: "10.231.0.2:80".parse().unwrap() });
        assert_eq!(a.forwards[1].to_string(), "8443:[fd00::2]:443");
    }

    #[test]
    fn relative_paths_become_absolute() {
        let a = ContainerArgs::parse(&args("--root m --hostname a --netns n --pidfile p --console c")).unwrap();
        assert!(a.root.is_absolute() && a.root.ends_with("m"));
        assert!(a.console.is_absolute());
    }

    #[test]
    fn errors_name_the_option() {
        let err = |s: &str| ContainerArgs::parse(&args(s)).unwrap_err().to_string();
        assert!(err("--hostname a --netns n --pidfile p --console c").starts_with("--root is required"));
        assert!(err(&format!("{FULL} --root")).starts_with("--root needs a value"));
        assert!(err(&format!("{FULL} --root /x")).starts_with("--root is given twice"));
        assert!(err(&format!("{FULL} --bogus 1")).starts_with("unknown option \"--bogus\""));
        assert!(err(&format!("{FULL} --bogus")).starts_with("unknown option \"--bogus\""));
        assert!(err("--root /r --hostname -bad --netns n --pidfile p --console c").starts_with("--hostname \"-bad\""));
        assert!(err(&format!("{FULL} --forward 80")).starts_with("--forward 80: expected HOSTPORT:IP:PORT"));
        let dup = err(&format!("{FULL} --forward 80:10.0.0.1:80 --forward 80:10.0.0.2:81"));
        assert!(dup.contains("port 80 is already forwarded by --forward 80:10.0.0.1:80"), "{dup}");
    }

    #[test]
    fn forward_specs() {
        let f = Forward::parse("8080:10.231.0.2:80").unwrap();
        assert_eq!((f.host_port, f.target), (8080, "10.231.0.2:80".parse().unwrap()));
        assert_eq!(f.to_string(), "8080:10.231.0.2:80");
        for bad in ["", "8080", "8080:10.231.0.2", "0:10.0.0.1:80", "70000:10.0.0.1:80", "+80:10.0.0.1:80", "80:10.0.0.1:0", "80:host:80", "80:fd00::2:80"] {
            assert!(Forward::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn hostnames() {
        for good in ["web1", "a", "web-1.example.org", &"a".repeat(63)] {
            assert!(valid_hostname(good), "{good}");
        }
        for bad in ["", "-a", "a-", "a..b", "a_b", "a b", &"a".repeat(64), &["a"; 33].join(".")] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn the_pidfile_is_written_whole_and_names_a_running_init() {
        let p = PidFile { monitor: 4100, init: 4101, init_start_time: 123456 };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web1.pid");
        write_pidfile(&p, &path).unwrap();
        assert_eq!(read_pidfile(&path).unwrap(), p);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "the temporary file is gone");
        let own = flotilla_proc::own_start_time().unwrap();
        assert!(init_running(&PidFile { monitor: 1, init: std::process::id(), init_start_time: own }));
        assert!(!init_running(&PidFile { monitor: 1, init: std::process::id(), init_start_time: own + 1 }));
    }

    #[test]
    fn plan_mounts_before_pivoting_and_tries_the_system_agent_first() {
        let a = ContainerArgs::parse(&args(FULL)).unwrap();
        let plan = init_plan(&a, Path::new("/srv/m/web1"), 7).unwrap();
        let pos = |text: &str| plan.iter().position(|(_, what)| what == text).unwrap_or_else(|| panic!("no step {text:?}"));
        assert!(pos("joining the network namespace /run/netns/fl-web1") < pos("creating mount, UTS and IPC namespaces"));
        assert!(pos("mounting proc on /srv/m/web1/proc") < pos("setting net.ipv4.ip_unprivileged_port_start to 0"));
        assert!(pos("mounting a tmpfs on /srv/m/web1/dev") < pos("bind-mounting /dev/null on /srv/m/web1/dev/null"));
        assert!(pos("mounting a tmpfs on /srv/m/web1/dev") < pos("mounting a devpts instance on /srv/m/web1/dev/pts"));
        assert!(pos("mounting a devpts instance on /srv/m/web1/dev/pts") < pos("linking /srv/m/web1/dev/ptmx to pts/ptmx"));
        assert!(pos("mounting a tmpfs on /srv/m/web1/run") < pos("making /srv/m/web1 the root (pivot_root)"));
        assert!(pos(&format!("executing {SYSTEM_AGENT}")) < pos(&format!("executing {BOOTSTRAP_AGENT}")));
        assert!(matches!(plan.last(), Some((Action::Fail(libc::ENOENT), _))));
    }

    #[test]
    fn os_errors_read_plainly() {
        assert_eq!(errno_text(&io::Error::from_raw_os_error(libc::EADDRINUSE)), "Address already in use");
        assert_eq!(errno_text(&io::Error::other("plain")), "plain");
    }
}
