//! The deployment lock: one command that changes a deployment at a time, across processes
//! and hosts. A holder that died on this host is taken over; one on another host is broken
//! only by hand (`unlock --force`), which the ledger records.

use std::path::PathBuf;

use flotilla_state::State;

use crate::{procfs, Engine, EngineEvent, Listener, Result};

impl Engine {
    /// Takes the deployment's lock for `command`, taking over a stale one (said so through
    /// `listen`); released when the guard drops.
    pub fn lock(&mut self, deployment: &str, command: &str, listen: Listener<'_>) -> Result<LockGuard> {
        let pid = std::process::id() as i32;
        let me = flotilla_state::Lock {
            holder: self.actor.clone(),
            host: procfs::hostname(),
            pid: i64::from(pid),
            pid_start: procfs::start_time(pid).unwrap_or(0) as i64,
            command: command.to_owned(),
            since: flotilla_state::now(),
        };
        let here = me.host.clone();
        // A holder on this host that no longer runs (or whose pid now names another process)
        // is dead; one on another host cannot be checked from here.
        let dead = |l: &flotilla_state::Lock| {
            l.host == here && procfs::start_time(l.pid as i32).is_none_or(|t| l.pid_start != 0 && t as i64 != l.pid_start)
        };
        if let flotilla_state::Acquired::TookOver(old) = self.state.acquire_lock(deployment, &me, dead)? {
            listen(&EngineEvent::Note {
                message: format!(
                    "took over the lock of deployment `{deployment}` left by pid {} ({}, `{}`), which is no longer running",
                    old.pid, old.holder, old.command
                ),
            });
        }
        Ok(LockGuard { state: self.state.path().to_owned(), deployment: deployment.to_owned(), me })
    }

    /// Breaks the deployment's lock when its holder is dead: a process on this host that no
    /// longer runs, or, with `force`, one on another host (which cannot be checked from
    /// here; the ledger says it was forced). A holder alive on this host is never broken:
    /// [`flotilla_state::Broken::Refused`] says who it is.
    pub fn unlock(&mut self, deployment: &str, force: bool) -> Result<flotilla_state::Broken> {
        let here = procfs::hostname();
        Ok(self.state.break_lock(deployment, &self.actor, |h| {
            if h.host == here {
                // A pid whose start time differs is another process now: the holder is gone.
                match procfs::start_time(h.pid as i32) {
                    Some(t) if h.pid_start == 0 || t as i64 == h.pid_start => Err(format!(
                        "deployment `{deployment}` is locked by pid {} on this host ({}: {}), which is still running `{}` since {}; wait for it to finish, or stop that process (its lock is then released, or taken over by the next command)",
                        h.pid,
                        h.holder,
                        procfs::command_line(h.pid as i32).unwrap_or_else(|| "its command line cannot be read".into()),
                        h.command,
                        flotilla_model::format_time(h.since),
                    )),
                    _ => Ok(("broken", "its process no longer runs".into())),
                }
            } else if force {
                Ok(("forced", format!("forced with --force: host {} cannot be checked from {here}", h.host)))
            } else {
                Err(format!(
                    "deployment `{deployment}` is locked by pid {} on host {} ({}, `{}`) since {}, which cannot be checked from here; if you are sure that process is gone, break the lock with `flotilla unlock -d {deployment} --force` (the ledger records that it was forced)",
                    h.pid,
                    h.host,
                    h.holder,
                    h.command,
                    flotilla_model::format_time(h.since),
                ))
            }
        })?)
    }
}

/// A held deployment lock; dropping it releases it.
#[derive(Debug)]
pub struct LockGuard {
    state: PathBuf,
    deployment: String,
    me: flotilla_state::Lock,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // A second connection: the engine's may be mid-transaction or gone. If this fails the
        // lock stays, and the next run takes it over as stale (this process will be gone).
        if let Ok(mut state) = State::open(&self.state) {
            let _ = state.release_lock(&self.deployment, &self.me);
        }
    }
}
