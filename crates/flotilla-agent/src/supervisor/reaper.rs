//! The one place in the process that waits for children. A single thread calls
//! `waitpid(-1)` for the life of the process and hands each exit status to whoever spawned
//! that pid (a service's monitor, a `run_command` call); statuses of re-parented orphans are
//! discarded, which is what keeps the machine free of zombies when the agent is PID 1 or a
//! child subreaper.
//!
//! It is process-wide (every `Supervisor` shares it) because `waitpid(-1)` is: two reapers
//! would steal each other's statuses. It must never hold its table lock while waiting, and
//! nothing else in the process may call `waitpid` or `std::process::Child::wait`.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use super::sys::{self, Program, SpawnFailure, Stdio};
use super::{lock, ExitStatus};

/// The process-wide reaper.
pub(super) struct Reaper {
    table: Mutex<Table>,
    spawned: Condvar,
}

struct Table {
    /// Who gets the exit status of each pid we spawned and have not reaped yet.
    owners: BTreeMap<i32, Sender<ExitStatus>>,
    /// Bumped on every fork, so the reaper thread can sleep while there are no children
    /// without missing one forked just after `waitpid` said there were none.
    forks: u64,
}

/// A spawned child whose exit status the reaper will deliver.
pub(super) struct Child {
    /// Its pid, which is also its process group id (it starts a session).
    pub pid: i32,
    exit: Receiver<ExitStatus>,
}

impl Child {
    /// Blocks until the child has exited and been reaped.
    pub fn wait(&self) -> ExitStatus {
        // The reaper never drops a sender without sending on it; 255 would only show a bug.
        self.exit.recv().unwrap_or(ExitStatus::Exited(255))
    }

    /// Like `wait`, giving up after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        match self.exit.recv_timeout(timeout) {
            Ok(status) => Some(status),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(ExitStatus::Exited(255)),
        }
    }
}

static REAPER: Reaper = Reaper {
    table: Mutex::new(Table { owners: BTreeMap::new(), forks: 0 }),
    spawned: Condvar::new(),
};
static STARTED: OnceLock<Result<(), (&'static str, i32)>> = OnceLock::new();

impl Reaper {
    /// The reaper, started (and this process made a child subreaper) on first use.
    pub fn global() -> Result<&'static Reaper, (&'static str, std::io::Error)> {
        let started = STARTED.get_or_init(|| {
            sys::become_subreaper()
                .map_err(|e| ("prctl(PR_SET_CHILD_SUBREAPER)", e.raw_os_error().unwrap_or(0)))?;
            std::thread::Builder::new()
                .name("flotilla-reaper".into())
                .spawn(|| REAPER.run())
                .map(drop)
                .map_err(|e| ("starting the reaper thread", e.raw_os_error().unwrap_or(0)))
        });
        match started {
            Ok(()) => Ok(&REAPER),
            Err((what, errno)) => Err((*what, std::io::Error::from_raw_os_error(*errno))),
        }
    }

    fn run(&self) {
        loop {
            let forks = lock(&self.table).forks;
            match sys::wait_any() {
                Ok(Some((pid, status))) => {
                    if let Some(owner) = lock(&self.table).owners.remove(&pid) {
                        // The owner may have given up (a timed-out command): nothing to do.
                        let _ = owner.send(status);
                    }
                }
                Ok(None) => {
                    let mut table = lock(&self.table);
                    while table.forks == forks {
                        table = self.spawned.wait(table).unwrap_or_else(|e| e.into_inner());
                    }
                }
                // waitpid(-1) fails otherwise only on EINVAL; do not spin if it ever does.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Forks and execs `program`, registering the pid before the reaper can see it exit.
    /// Returns once the program has been exec'd (or failed to be, then after reaping it).
    pub fn spawn(&self, program: &Program, stdio: &Stdio<'_>) -> Result<Child, SpawnFailure> {
        let (tx, rx) = mpsc::channel();
        let (pid, report): (i32, OwnedFd) = {
            let mut table = lock(&self.table);
            let (pid, report) = sys::fork_exec(program, stdio)?;
            table.owners.insert(pid, tx);
            table.forks += 1;
            self.spawned.notify_all();
            (pid, report)
        };
        let child = Child { pid, exit: rx };
        match sys::await_exec(report) {
            Ok(()) => Ok(child),
            Err(failure) => {
                child.wait();
                Err(failure)
            }
        }
    }
}
