//! The agent's process on a machine, seen from outside: its pidfile and lock, starting it
//! detached (`init --detach`, for hosts without a service manager), stopping it (`stop`) and
//! asking whether it runs (`status-line`). These are what a deployer runs over ssh, so each
//! answer is one line and an exit status.
//!
//! `init` (in both modes) holds an exclusive lock on `run/flotilla/agent.lock` for its whole
//! life, so two agents never supervise one root, and writes `run/flotilla/agent.pid`
//! (`{"pid":N,"startTime":T}`, T being field 22 of `/proc/<pid>/stat`) once it listens,
//! removing it when it exits. A pid is only believed together with its start time: a pid
//! the kernel gave to another process since is never signalled.
//!
//! What this module must never do: signal a process it has not identified as the agent, or
//! report an agent started when it does not answer on its socket.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::container::sys;
use crate::machine::MachineRoot;

/// How long `init --detach` waits for the new agent to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `stop` waits after SIGKILL for the agent to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiting command looks again.
const POLL: Duration = Duration::from_millis(50);

/// The agent's pidfile, inside the machine.
pub fn pidfile_path(root: &MachineRoot) -> PathBuf {
    root.path(flotilla_protocol::layout::PIDFILE)
}

/// The file `init` holds locked while it runs.
pub fn lock_path(root: &MachineRoot) -> PathBuf {
    root.path(flotilla_protocol::layout::LOCKFILE)
}

/// Where `init --detach` appends the agent's output unless told otherwise: beside the
/// services' logs, not among them, so no service's name can clash with it.
pub fn default_log(root: &MachineRoot) -> PathBuf {
    root.path(flotilla_protocol::layout::AGENT_LOG)
}

/// Whether an agent answers on the machine's control socket.
pub fn answers(root: &MachineRoot) -> bool {
    UnixStream::connect(root.socket_path()).is_ok()
}

/// A process, identified by its pid and start time; the pidfile's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentPid {
    /// The process id.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks after boot): tells a reused pid apart.
    pub start_time: u64,
}

impl AgentPid {
    /// This process.
    pub fn current() -> io::Result<AgentPid> {
        Ok(AgentPid { pid: std::process::id(), start_time: flotilla_proc::own_start_time()? })
    }

    /// Reads a pidfile; `None` when there is none.
    pub fn read(path: &Path) -> io::Result<Option<AgentPid>> {
        match fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{} is not an agent pidfile ({e}); remove it", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Writes the pidfile whole (a temporary file renamed over it).
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let text = serde_json::to_string(self).expect("serialises") + "\n";
        crate::machine::write_atomic(path, text.as_bytes())
    }

    /// Whether this process still runs: the pid exists, is not a zombie and started when
    /// recorded (otherwise the pid was given to another process since).
    pub fn is_running(&self) -> bool {
        flotilla_proc::is_running(self.pid, self.start_time)
    }
}

/// `init`'s pidfile while it runs: written once it listens, removed when this is dropped
/// (unless something else was written there since).
#[derive(Debug)]
pub struct PidFileGuard {
    path: PathBuf,
    me: AgentPid,
}

impl PidFileGuard {
    /// Writes this process's pidfile.
    pub fn write(root: &MachineRoot) -> io::Result<PidFileGuard> {
        let guard = PidFileGuard { path: pidfile_path(root), me: AgentPid::current()? };
        guard.me.write(&guard.path)?;
        Ok(guard)
    }
}

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        if AgentPid::read(&self.path).ok().flatten() == Some(self.me) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The exclusive lock of `run/flotilla/agent.lock`, held by the one agent of a root (and
/// released by the kernel when it exits, however it exits).
#[derive(Debug)]
pub struct AgentLock {
    _file: File,
}

impl AgentLock {
    /// Takes the lock; `None` when another process holds it.
    pub fn acquire(root: &MachineRoot) -> io::Result<Option<AgentLock>> {
        let path = lock_path(root);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        // std opens with O_CLOEXEC: services never inherit the lock.
        let file = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path)?;
        Ok(sys::try_lock_exclusive(file.as_fd())?.then_some(AgentLock { _file: file }))
    }
}

/// Why the agent's lifecycle commands (`status-line`, `stop`, `init --detach`) failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The pidfile cannot be read.
    #[error("{0}")]
    Pidfile(io::Error),
    /// A system call failed: what was being done, and why.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: io::Error,
    },
    /// The agent cannot be stopped or started as asked; the sentence says why and what to do.
    #[error("{0}")]
    Refused(String),
}

/// `DaemonError::Io` for `what`, as a `map_err` argument.
fn failed(what: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// Whether an agent runs on a root, as `status-line` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The pidfile names a live agent (`Some`), or an agent answers on the socket but wrote
    /// no pidfile (`None`: an older agent, or one in another PID namespace).
    Running(Option<u32>),
    /// Neither.
    Stopped,
}

/// Whether an agent runs on `root`.
pub fn state(root: &MachineRoot) -> Result<State, DaemonError> {
    match AgentPid::read(&pidfile_path(root)).map_err(DaemonError::Pidfile)? {
        Some(p) if p.is_running() => Ok(State::Running(Some(p.pid))),
        _ if answers(root) => Ok(State::Running(None)),
        _ => Ok(State::Stopped),
    }
}

/// What `stop` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// No agent ran (no pidfile, or one naming a process that is gone).
    NotRunning,
    /// The agent stopped its services and exited after SIGTERM.
    Stopped(u32),
    /// The agent did not exit within the timeout and was killed; services it had not
    /// stopped yet may still run.
    Killed(u32),
}

fn wait_gone(agent: &AgentPid, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while agent.is_running() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
    true
}

/// Stops the agent of `root`: SIGTERM (it stops every service, then exits), then after
/// `timeout` SIGKILL.
pub fn stop(root: &MachineRoot, timeout: Duration) -> Result<Stopped, DaemonError> {
    let path = pidfile_path(root);
    let recorded = AgentPid::read(&path).map_err(DaemonError::Pidfile)?;
    let Some(agent) = recorded.filter(AgentPid::is_running) else {
        if answers(root) {
            return Err(DaemonError::Refused(format!(
                "an agent answers on {} but {} names no running process: it was started by an older agent, or runs in another PID namespace; stop it the way it was started",
                root.socket_path().display(),
                path.display()
            )));
        }
        return Ok(Stopped::NotRunning);
    };
    if agent.pid == 1 {
        return Err(DaemonError::Refused("the agent is PID 1 here (a container's init): stop the machine instead".into()));
    }
    let pid = agent.pid as i32;
    sys::kill(pid, libc::SIGTERM).map_err(failed(format!("cannot send SIGTERM to the agent (pid {pid})")))?;
    if wait_gone(&agent, timeout) {
        return Ok(Stopped::Stopped(agent.pid));
    }
    sys::kill(pid, libc::SIGKILL).map_err(failed(format!("the agent (pid {pid}) did not stop within {} s and cannot be killed", timeout.as_secs())))?;
    if !wait_gone(&agent, KILL_TIMEOUT) {
        return Err(DaemonError::Refused(format!("the agent (pid {pid}) did not stop within {} s and is still there after SIGKILL", timeout.as_secs())));
    }
    // A killed agent cleaned up nothing.
    if AgentPid::read(&path).ok().flatten() == Some(agent) {
        let _ = fs::remove_file(&path);
    }
    let _ = fs::remove_file(root.socket_path());
    Ok(Stopped::Killed(agent.pid))
}

/// What `init --detach` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detached {
    /// A new agent runs with this pid and answers.
    Started(u32),
    /// An agent answered already; nothing was started.
    AlreadyRunning,
}

/// Waits until an agent answers on `root`'s socket or `deadline` passes.
fn wait_answer(root: &MachineRoot, deadline: Instant) -> bool {
    loop {
        if answers(root) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Starts an agent detached: `run` is called, with the agent's lock, in a grandchild in a
/// new session, with stdin on /dev/null, stdout and stderr appended to `log`, `/` as working
/// directory and umask 022; its return value is that process's exit status. Returns once the
/// agent answers on its socket, or with why it does not (its death or silence, with the end
/// of its log). An agent that answers already is left alone.
///
/// Call it only from a single-threaded process, as `flotilla-agent`'s `main` is: it forks and
/// the child goes on running ordinary code.
pub fn detach(root: &MachineRoot, log: &Path, run: impl FnOnce(AgentLock) -> i32) -> Result<Detached, DaemonError> {
    sys::sanitize_descriptors().map_err(failed("cannot set up descriptors"))?;
    if answers(root) {
        return Ok(Detached::AlreadyRunning);
    }
    let lock_file = lock_path(root);
    let Some(lock) = AgentLock::acquire(root).map_err(failed(format!("cannot lock {}", lock_file.display())))? else {
        // Another agent holds the lock: it is starting (or answers no more).
        if wait_answer(root, Instant::now() + START_TIMEOUT) {
            return Ok(Detached::AlreadyRunning);
        }
        let who = AgentPid::read(&pidfile_path(root)).ok().flatten().map_or(String::new(), |p| format!(" (pid {})", p.pid));
        return Err(DaemonError::Refused(format!(
            "another agent{who} holds {} but has not answered on {} for {} s; see its log, or stop it with `flotilla-agent stop`",
            lock_file.display(),
            root.socket_path().display(),
            START_TIMEOUT.as_secs()
        )));
    };
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).map_err(failed(format!("--log {}: cannot create {}", log.display(), dir.display())))?;
    }
    let log_file = OpenOptions::new().append(true).create(true).mode(0o640).open(log).map_err(failed(format!("--log {}", log.display())))?;
    let log_start = log_file.metadata().map(|m| m.len()).unwrap_or(0);
    let dev_null = File::open("/dev/null").map_err(failed("cannot open /dev/null"))?;
    // The daemon holds the write end (close-on-exec, so services do not) for its life: the
    // end of file tells the launcher that it died.
    let (alive_read, alive_write) = crate::supervisor::sys::pipe().map_err(failed("cannot create a pipe"))?;
    match sys::fork_single_threaded().map_err(failed("cannot fork"))? {
        sys::Forked::Child => {
            drop(alive_read);
            daemonise(log_file, dev_null, alive_write, lock, run)
        }
        sys::Forked::Parent(child) => {
            drop((alive_write, lock, log_file, dev_null));
            // The intermediate process exits at once; its child, the daemon, is adopted.
            let _ = sys::wait_for(child);
            watch_start(root, log, log_start, alive_read)
        }
    }
}

/// The child side of [`detach`]: a new session, a second fork so the daemon can never get a
/// controlling terminal again, then `run` in the grandchild.
fn daemonise(log: File, dev_null: File, alive: OwnedFd, lock: AgentLock, run: impl FnOnce(AgentLock) -> i32) -> ! {
    use std::io::Write;
    let mut alive = File::from(alive);
    if let Err(e) = sys::setsid() {
        let _ = writeln!(alive, "error cannot start a session: {e}");
        std::process::exit(1);
    }
    match sys::fork_single_threaded() {
        Err(e) => {
            let _ = writeln!(alive, "error cannot fork the daemon: {e}");
            std::process::exit(1)
        }
        Ok(sys::Forked::Parent(_)) => std::process::exit(0),
        Ok(sys::Forked::Child) => {}
    }
    if let Err(e) = sys::redirect_stdio(dev_null.as_fd(), log.as_fd()) {
        let _ = writeln!(alive, "error cannot redirect output to the log: {e}");
        std::process::exit(1);
    }
    drop((dev_null, log));
    sys::set_umask(0o022);
    let _ = std::env::set_current_dir("/");
    let _ = writeln!(alive, "pid {}", std::process::id());
    eprintln!("flotilla-agent: started detached, pid {}", std::process::id());
    let code = run(lock);
    drop(alive);
    std::process::exit(code)
}

/// The launcher side of [`detach`]: reads the daemon's pid, then waits for its answer on the
/// socket or its death (end of file on `alive`).
fn watch_start(root: &MachineRoot, log: &Path, log_start: u64, alive: OwnedFd) -> Result<Detached, DaemonError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let socket = root.socket_path();
    let mut alive = File::from(alive);
    let mut report = Vec::new();
    let mut pid: Option<u32> = None;
    let mut ended = false;
    loop {
        if !ended {
            let ready = crate::supervisor::sys::poll_readable(&[alive.as_fd()], POLL).map_err(failed("cannot wait for the agent"))?;
            if ready[0] {
                let mut buf = [0u8; 256];
                match alive.read(&mut buf) {
                    Ok(0) | Err(_) => ended = true,
                    Ok(n) => report.extend_from_slice(&buf[..n]),
                }
                let text = String::from_utf8_lossy(&report);
                pid = pid.or_else(|| text.lines().find_map(|l| l.strip_prefix("pid ")?.trim().parse().ok()));
                if let Some(e) = text.lines().find_map(|l| l.strip_prefix("error ")) {
                    return Err(DaemonError::Refused(format!("{e}; the agent was not started")));
                }
            }
        } else {
            std::thread::sleep(POLL);
        }
        if let Some(pid) = pid.filter(|_| answers(root)) {
            return Ok(Detached::Started(pid));
        }
        if ended {
            // Maybe another agent, started at the same moment, answers now.
            if answers(root) {
                return Ok(Detached::AlreadyRunning);
            }
            return Err(DaemonError::Refused(format!("the agent exited before it answered on {}; {}", socket.display(), log_tail(log, log_start))));
        }
        if Instant::now() >= deadline {
            let what = match pid {
                Some(p) => {
                    let _ = sys::kill(p as i32, libc::SIGTERM);
                    format!("the agent (pid {p}) did not answer on {} within {} s and was sent SIGTERM", socket.display(), START_TIMEOUT.as_secs())
                }
                None => format!("the agent did not start within {} s", START_TIMEOUT.as_secs()),
            };
            return Err(DaemonError::Refused(format!("{what}; {}", log_tail(log, log_start))));
        }
    }
}

/// The last lines the agent wrote to its log since `start`, for an error message.
fn log_tail(log: &Path, start: u64) -> String {
    let mut text = Vec::new();
    let read = File::open(log).and_then(|mut f| {
        f.seek(SeekFrom::Start(start))?;
        f.read_to_end(&mut text)
    });
    let lines = crate::logs::last_lines(&text, 20);
    match read {
        Err(e) => format!("its log {} cannot be read: {e}", log.display()),
        Ok(_) if lines.is_empty() => format!("it wrote nothing to {}", log.display()),
        Ok(_) => {
            let body: Vec<String> = lines.iter().map(|l| format!("  {}", String::from_utf8_lossy(l))).collect();
            format!("the end of {}:\n{}", log.display(), body.join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_running_and_a_changed_start_time_is_not() {
        let me = AgentPid::current().unwrap();
        assert!(me.is_running());
        assert!(!AgentPid { start_time: me.start_time + 1, ..me }.is_running(), "a reused pid is not ours");
        assert!(!AgentPid { pid: u32::MAX - 1, ..me }.is_running());
    }

    #[test]
    fn the_pidfile_is_json_with_pid_and_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.pid");
        assert_eq!(AgentPid::read(&path).unwrap(), None);
        AgentPid { pid: 42, start_time: 7 }.write(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"pid\":42,\"startTime\":7}\n");
        assert_eq!(AgentPid::read(&path).unwrap(), Some(AgentPid { pid: 42, start_time: 7 }));
        fs::write(&path, "garbage").unwrap();
        assert!(AgentPid::read(&path).unwrap_err().to_string().contains("is not an agent pidfile"));
    }

    #[test]
    fn the_guard_removes_only_its_own_pidfile() {
        let dir = tempfile::tempdir().unwrap();
        let root = MachineRoot::new(dir.path());
        fs::create_dir_all(root.path("/run/flotilla")).unwrap();
        let guard = PidFileGuard::write(&root).unwrap();
        assert_eq!(AgentPid::read(&pidfile_path(&root)).unwrap(), Some(AgentPid::current().unwrap()));
        drop(guard);
        assert!(!pidfile_path(&root).exists());
        let guard = PidFileGuard::write(&root).unwrap();
        let other = AgentPid { pid: 1, start_time: 1 };
        other.write(&pidfile_path(&root)).unwrap();
        drop(guard);
        assert_eq!(AgentPid::read(&pidfile_path(&root)).unwrap(), Some(other));
    }

    #[test]
    fn a_stale_pidfile_reads_as_stopped_and_stop_signals_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let root = MachineRoot::new(dir.path());
        assert_eq!(state(&root).unwrap(), State::Stopped);
        fs::create_dir_all(root.path("/run/flotilla")).unwrap();
        let me = AgentPid::current().unwrap();
        AgentPid { start_time: me.start_time + 1, ..me }.write(&pidfile_path(&root)).unwrap();
        assert_eq!(state(&root).unwrap(), State::Stopped);
        assert_eq!(stop(&root, Duration::from_secs(1)).unwrap(), Stopped::NotRunning);
    }
}
