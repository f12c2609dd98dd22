//! One supervised service: its prepared launch, its state, and the monitor thread that waits
//! for it to exit and restarts it per its policy with back-off.
//!
//! The monitor is the only writer of a running service's pid, and it spawns only while
//! holding the service's lock after checking `stop_requested`; so `stop` either sees the pid
//! to signal or prevents the spawn. A stopped service must never be started again by its
//! monitor.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_model::RestartPolicy;

use super::log::{self, SharedLog};
use super::reaper::{Child, Reaper};
use super::sys::{self, Program, SpawnFailure, Stdio};
use super::{lock, ExitStatus, Result, ServiceState, ServiceStatus, SupervisorError};

/// First restart delay; doubles on every quick exit.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A service that ran this long before exiting restarts after `BACKOFF_MIN` again.
const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// How long after SIGKILL a process group may take to disappear before `stop` reports it.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long an exited service's output may keep flowing (from leftover writers) before the
/// monitor records the exit anyway.
const LOG_DRAIN: Duration = Duration::from_secs(1);

pub(super) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Everything needed to (re)start a service, checked once in `start`.
pub(super) struct Launch {
    /// The program, environment and identity.
    pub program: Program,
    /// `<root>/dev/null`, if the root has one.
    pub dev_null: Option<PathBuf>,
    /// The service's log.
    pub log: SharedLog,
}

struct Inner {
    state: ServiceState,
    pid: Option<i32>,
    restarts: u32,
    last_exit: Option<String>,
    since_unix: u64,
    stop_requested: bool,
    /// False while a monitor (or the first spawn) may still start or watch a process.
    settled: bool,
}

/// One supervised service.
pub(super) struct Service {
    pub name: String,
    pub after: Vec<String>,
    policy: RestartPolicy,
    launch: Launch,
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// A live incarnation: the child and the end of its log pump.
struct Running {
    child: Child,
    pump: Receiver<()>,
    started: Instant,
}

impl Service {
    pub fn new(name: &str, after: Vec<String>, policy: RestartPolicy, launch: Launch) -> Service {
        Service {
            name: name.to_owned(),
            after,
            policy,
            launch,
            inner: Mutex::new(Inner {
                state: ServiceState::Starting,
                pid: None,
                restarts: 0,
                last_exit: None,
                since_unix: now_unix(),
                stop_requested: false,
                settled: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn set_state(&self, inner: &mut Inner, state: ServiceState) {
        inner.state = state;
        inner.since_unix = now_unix();
        self.changed.notify_all();
    }

    /// Whether the supervisor still keeps this service up (or is bringing it down).
    pub fn active(&self) -> bool {
        !lock(&self.inner).settled
    }

    pub fn status(&self) -> ServiceStatus {
        let inner = lock(&self.inner);
        ServiceStatus {
            name: self.name.clone(),
            state: inner.state,
            pid: inner.pid.map(|p| p as u32),
            restarts: inner.restarts,
            last_exit: inner.last_exit.clone(),
            since_unix: inner.since_unix,
            waiting_for: Vec::new(),
        }
    }

    /// Spawns one incarnation; the caller holds the service's lock.
    fn spawn(&self, reaper: &Reaper) -> std::result::Result<Running, SpawnFailure> {
        let io = |stage: &'static str| move |error| SpawnFailure { stage, error };
        // No /dev/null in the root: an empty pipe reads as end-of-file just the same, and
        // keeps fd 0 from being handed to the next file the service opens.
        let stdin: OwnedFd = match &self.launch.dev_null {
            Some(path) => File::open(path).map_err(io("opening /dev/null"))?.into(),
            None => sys::pipe().map_err(io("creating the stdin pipe"))?.0,
        };
        let (out_read, out_write) = sys::pipe().map_err(io("creating the log pipe"))?;
        let stdio = Stdio { stdin: stdin.as_fd(), stdout: out_write.as_fd(), stderr: out_write.as_fd() };
        let child = reaper.spawn(&self.launch.program, &stdio)?;
        drop(out_write);
        lock(&self.launch.log).note(&format!("started (pid {})", child.pid));
        let pump = log::pump(&self.name, File::from(out_read), self.launch.log.clone()).map_err(|error| {
            // Without a reader the service would block on its first full pipe: give up on it.
            let _ = sys::kill_group(child.pid, libc::SIGKILL);
            child.wait();
            SpawnFailure { stage: "starting the log thread", error }
        })?;
        Ok(Running { child, pump, started: Instant::now() })
    }

    /// Starts the first incarnation and hands it to a monitor thread.
    pub fn start(self: &Arc<Self>, reaper: &'static Reaper, stop_timeout: Duration) -> Result<()> {
        let mut inner = lock(&self.inner);
        let running = match self.spawn(reaper) {
            Ok(running) => running,
            Err(failure) => {
                inner.last_exit = Some(format!("failed to start: {}: {}", failure.stage, failure.error));
                inner.settled = true;
                self.set_state(&mut inner, ServiceState::Failed);
                lock(&self.launch.log).note(inner.last_exit.as_deref().unwrap_or_default());
                return Err(self.spawn_error(failure));
            }
        };
        let pid = running.child.pid;
        inner.pid = Some(pid);
        self.set_state(&mut inner, ServiceState::Running);
        let me = Arc::clone(self);
        let monitor = std::thread::Builder::new()
            .name(format!("svc-{}", self.name))
            .spawn(move || me.monitor(reaper, running, stop_timeout));
        if let Err(error) = monitor {
            drop(inner);
            let _ = terminate_group(pid, Duration::ZERO);
            let mut inner = lock(&self.inner);
            inner.pid = None;
            inner.settled = true;
            self.set_state(&mut inner, ServiceState::Failed);
            return Err(SupervisorError::System { what: "starting a service's monitor thread", source: error });
        }
        Ok(())
    }

    fn spawn_error(&self, failure: SpawnFailure) -> SupervisorError {
        SupervisorError::Spawn {
            service: self.name.clone(),
            program: self.launch.program.path.to_string_lossy().into_owned(),
            stage: failure.stage,
            source: failure.error,
        }
    }

    fn restarts_after(&self, outcome: Option<ExitStatus>) -> bool {
        match self.policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !outcome.is_some_and(|s| s.success()),
            RestartPolicy::Never => false,
        }
    }

    /// Waits for each incarnation to exit and restarts it until told to stop or the policy
    /// says no.
    fn monitor(self: Arc<Self>, reaper: &'static Reaper, first: Running, stop_timeout: Duration) {
        let mut running = Some(first);
        let mut delay = BACKOFF_MIN;
        loop {
            // `None` outcome: the restart itself failed before exec.
            let (outcome, ran) = match running.take() {
                Some(r) => {
                    let status = r.child.wait();
                    let ran = r.started.elapsed();
                    // Whatever the leader left in its group (a daemonised child, a worker)
                    // goes with it: a restarted service must not find its old self on its port.
                    if sys::group_alive(r.child.pid) {
                        let _ = terminate_group(r.child.pid, stop_timeout);
                    }
                    let _ = r.pump.recv_timeout(LOG_DRAIN);
                    lock(&self.launch.log).note(&format!("exited ({status})"));
                    (Some(status), ran)
                }
                None => (None, Duration::ZERO),
            };
            let mut inner = lock(&self.inner);
            inner.pid = None;
            if let Some(status) = outcome {
                inner.last_exit = Some(status.to_string());
            }
            if inner.stop_requested {
                self.set_state(&mut inner, ServiceState::Stopped);
                break;
            }
            if !self.restarts_after(outcome) {
                let state = if outcome.is_some_and(|s| s.success()) {
                    ServiceState::Stopped
                } else {
                    ServiceState::Failed
                };
                self.set_state(&mut inner, state);
                break;
            }
            if ran >= BACKOFF_RESET {
                delay = BACKOFF_MIN;
            }
            self.set_state(&mut inner, ServiceState::Backoff);
            lock(&self.launch.log).note(&format!("restarting in {} ms", delay.as_millis()));
            let deadline = Instant::now() + delay;
            inner = self.wait_while(inner, deadline, |i| !i.stop_requested);
            if inner.stop_requested {
                self.set_state(&mut inner, ServiceState::Stopped);
                break;
            }
            delay = (delay * 2).min(BACKOFF_MAX);
            inner.restarts += 1;
            self.set_state(&mut inner, ServiceState::Starting);
            match self.spawn(reaper) {
                Ok(r) => {
                    inner.pid = Some(r.child.pid);
                    self.set_state(&mut inner, ServiceState::Running);
                    running = Some(r);
                }
                Err(failure) => {
                    let message = format!("failed to start: {}: {}", failure.stage, failure.error);
                    lock(&self.launch.log).note(&message);
                    inner.last_exit = Some(message);
                }
            }
        }
        let mut inner = lock(&self.inner);
        inner.settled = true;
        self.changed.notify_all();
    }

    /// Waits on the condition variable while `keep_waiting` holds, until `deadline`.
    fn wait_while<'a>(
        &self,
        mut inner: MutexGuard<'a, Inner>,
        deadline: Instant,
        keep_waiting: impl Fn(&Inner) -> bool,
    ) -> MutexGuard<'a, Inner> {
        while keep_waiting(&inner) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            inner = self.changed.wait_timeout(inner, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        inner
    }

    /// Stops the service: SIGTERM to its process group, SIGKILL after `timeout`; returns once
    /// the group is empty and the monitor has settled. Stopping a settled service is a no-op.
    pub fn stop(&self, timeout: Duration) -> Result<()> {
        let pid = {
            let mut inner = lock(&self.inner);
            if inner.settled {
                return Ok(());
            }
            inner.stop_requested = true;
            self.changed.notify_all();
            inner.pid
        };
        if let Some(pid) = pid {
            lock(&self.launch.log).note("stopping (SIGTERM)");
            terminate_group(pid, timeout).map_err(|()| SupervisorError::StopFailed {
                service: self.name.clone(),
                pgid: pid as u32,
                waited: timeout + KILL_GRACE,
            })?;
        }
        // The monitor settles as soon as it has seen the exit; it does no more waiting then.
        let inner = lock(&self.inner);
        let inner = self.wait_while(inner, Instant::now() + KILL_GRACE, |i| !i.settled);
        if inner.settled {
            Ok(())
        } else {
            Err(SupervisorError::StopFailed { service: self.name.clone(), pgid: pid.unwrap_or(0) as u32, waited: timeout + KILL_GRACE })
        }
    }

    /// Writes a line of the agent's own to the service's log.
    pub fn note(&self, message: &str) {
        lock(&self.launch.log).note(message);
    }
}

/// SIGTERM to the group, SIGKILL to what is left after `timeout`; `Err` if something
/// survives even that (a process stuck in the kernel).
pub(super) fn terminate_group(pgid: i32, timeout: Duration) -> std::result::Result<(), ()> {
    let _ = sys::kill_group(pgid, libc::SIGTERM);
    // A stopped process cannot act on SIGTERM until continued.
    let _ = sys::kill_group(pgid, libc::SIGCONT);
    if wait_group_gone(pgid, Instant::now() + timeout) {
        return Ok(());
    }
    let _ = sys::kill_group(pgid, libc::SIGKILL);
    if wait_group_gone(pgid, Instant::now() + KILL_GRACE) {
        Ok(())
    } else {
        Err(())
    }
}

fn wait_group_gone(pgid: i32, deadline: Instant) -> bool {
    let mut pause = Duration::from_millis(1);
    loop {
        if !sys::group_alive(pgid) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
