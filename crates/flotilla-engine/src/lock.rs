//! The deployment lock: one command that changes a deployment at a time, across processes
//! and hosts. It is a lease: a thread of the holder renews it every quarter of the lease's
//! length (`FLOTILLA_LEASE_SECONDS`, default 60), and a lease not renewed for that long is
//! taken over by the next command, which the ledger records. So a holder that died anywhere,
//! or lost the database, stops blocking the deployment after one lease; a holder that lost its
//! lease stops before its next step that changes a machine ([`LockGuard::check`]). The holder
//! gives its lease up after half a lease without a successful renewal ([`must_give_up`]), so
//! it has stopped before anyone may take the lease over. A holder
//! that died on this host is taken over at once (its pid is gone); `unlock --force` breaks a
//! live lease by hand. Read-only commands take no lock: they read the last committed state.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use flotilla_state::State;

/// The lease's length in seconds: `FLOTILLA_LEASE_SECONDS`, else 60.
pub fn lease_seconds() -> i64 {
    std::env::var("FLOTILLA_LEASE_SECONDS").ok().and_then(|v| v.parse().ok()).filter(|s: &i64| *s > 0).unwrap_or(60)
}

use crate::{procfs, Engine, EngineEvent, Listener, Result};

impl Engine {
    /// Takes the deployment's lock for `command`, taking over a stale one (said so through
    /// `listen`); released when the guard drops.
    pub fn lock(&mut self, deployment: &str, command: &str, listen: Listener<'_>) -> Result<LockGuard> {
        let pid = std::process::id() as i32;
        let me = flotilla_state::Lock {
            holder: self.actor.clone(),
            host: procfs::host(),
            pid: i64::from(pid),
            pid_start: procfs::start_time(pid).unwrap_or(0) as i64,
            command: command.to_owned(),
            since: flotilla_state::now(),
            renewed_at: 0,
        };
        let lease = lease_seconds();
        // A holder on this host that no longer runs (or whose pid now names another process)
        // is dead; `acquire_lock` asks only of holders on this host (same name and machine id).
        let dead = |l: &flotilla_state::Lock| procfs::start_time(l.pid as i32).is_none_or(|t| l.pid_start != 0 && t as i64 != l.pid_start);
        match self.state.acquire_lock(deployment, &me, lease, dead)? {
            flotilla_state::Acquired::Free => {}
            flotilla_state::Acquired::TookOver(old) => listen(&EngineEvent::Note {
                message: format!(
                    "took over the lock of deployment `{deployment}` left by pid {} ({}, `{}`), which is no longer running",
                    old.pid, old.holder, old.command
                ),
            }),
            flotilla_state::Acquired::Expired(old) => listen(&EngineEvent::Note {
                message: format!(
                    "took over the lock of deployment `{deployment}` held by pid {} on {} ({}, `{}`), whose lease was not renewed for {lease}s",
                    old.pid, old.host, old.holder, old.command
                ),
            }),
        }
        Ok(LockGuard::hold(self.state.path().to_owned(), deployment.to_owned(), me, lease))
    }

    /// Breaks the deployment's lock when its holder is dead: its lease expired, a process on
    /// this host that no longer runs, or, with `force`, one on another host (which cannot be checked from
    /// here; the ledger says it was forced). A holder alive on this host is never broken:
    /// [`flotilla_state::Broken::Refused`] says who it is.
    pub fn unlock(&mut self, deployment: &str, force: bool) -> Result<flotilla_state::Broken> {
        let here = procfs::host();
        let lease = lease_seconds();
        Ok(self.state.break_lock(deployment, &self.actor, |h, idle| {
            if idle > lease {
                Ok(("expired", format!("its lease was not renewed for {idle}s, longer than the lease of {lease}s")))
            } else if h.host == here {
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

/// A held deployment lock; dropping it releases it. A thread renews its lease meanwhile.
#[derive(Debug)]
pub struct LockGuard {
    state: PathBuf,
    deployment: String,
    me: flotilla_state::Lock,
    lease: Lease,
    stop: Arc<(Mutex<bool>, Condvar)>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

/// Whether a lock's lease is still held; cheap to clone into the jobs of a command.
#[derive(Debug, Clone, Default)]
pub struct Lease {
    lost: Arc<Mutex<Option<String>>>,
    flag: Arc<AtomicBool>,
    /// When a renewal last succeeded, the lease's length in seconds and the deployment; `None`
    /// for a lease that is never lost.
    renewed: Arc<Mutex<Option<(Instant, i64, String)>>>,
}

/// Whether a holder whose last successful renewal was `since` ago must give its lease of
/// `lease_secs` up: after half a lease. Others take it over after a whole lease without a
/// renewal, so the holder stops first, even when its renewing thread is slow (it renews every
/// quarter lease) or hangs on an unreachable database.
pub(crate) fn must_give_up(since: Duration, lease_secs: i64) -> bool {
    since >= Duration::from_millis(lease_secs.max(0) as u64 * 500)
}

impl Lease {
    /// A lease that is never lost (for work done under no lock).
    pub fn none() -> Lease {
        Lease::default()
    }

    /// Why the lease was lost, once it was: a step that changes a machine must not start.
    pub fn lost(&self) -> Option<String> {
        if !self.flag.load(Ordering::SeqCst) {
            // Checked here too, not only by the renewing thread, which may hang on the database.
            let late = self.renewed.lock().unwrap_or_else(|p| p.into_inner()).as_ref().filter(|(at, secs, _)| must_give_up(at.elapsed(), *secs)).map(|(_, secs, d)| (*secs, d.clone()));
            match late {
                Some((secs, deployment)) => self.lose(unrenewed(&deployment, secs)),
                None => return None,
            }
        }
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lose(&self, why: String) {
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.flag.store(true, Ordering::SeqCst);
    }
}

impl LockGuard {
    fn hold(state: PathBuf, deployment: String, me: flotilla_state::Lock, lease_secs: i64) -> LockGuard {
        let lease = Lease::default();
        *lease.renewed.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), lease_secs, deployment.clone()));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let renewer = {
            let (state, deployment, me, lease, stop) = (state.clone(), deployment.clone(), me.clone(), lease.clone(), stop.clone());
            std::thread::Builder::new().name("lease".into()).spawn(move || renew(&state, &deployment, &me, lease_secs, &lease, &stop)).ok()
        };
        LockGuard { state, deployment, me, lease, stop, renewer }
    }

    /// The lease, for jobs to check before each step that changes a machine.
    pub fn lease(&self) -> Lease {
        self.lease.clone()
    }

    /// `Err` once the lease was lost: the command must change nothing more.
    pub fn check(&self) -> crate::Result<()> {
        match self.lease.lost() {
            Some(why) => Err(crate::EngineError::LeaseLost(why)),
            None => Ok(()),
        }
    }
}

/// Why a lease not renewed for half of `lease_secs` is given up.
fn unrenewed(deployment: &str, lease_secs: i64) -> String {
    format!("the lease on deployment `{deployment}` could not be renewed for half of its {lease_secs}s (the state database is unreachable), so another command may take it over soon; stopped before changing anything more")
}

/// The renewing thread: renews every quarter lease until told to stop; the lease is lost when
/// another process took it over, or when no renewal succeeded for half a lease (the
/// database unreachable: others may take it over after a whole one, see [`must_give_up`]).
fn renew(path: &std::path::Path, deployment: &str, me: &flotilla_state::Lock, lease_secs: i64, lease: &Lease, stop: &(Mutex<bool>, Condvar)) {
    let every = Duration::from_millis((lease_secs as u64 * 1000 / 4).max(250));
    let mut state: Option<State> = None;
    let mut last_ok = Instant::now();
    loop {
        {
            let (stopped, wake) = stop;
            let guard = stopped.lock().unwrap_or_else(|p| p.into_inner());
            let (guard, _) = wake.wait_timeout_while(guard, every, |s| !*s).unwrap_or_else(|p| p.into_inner());
            if *guard {
                return;
            }
        }
        if state.is_none() {
            state = State::open(path).ok();
        }
        let renewed = state.as_mut().map(|s| s.renew_lock(deployment, me));
        match renewed {
            Some(Ok(true)) => {
                last_ok = Instant::now();
                if let Some(r) = lease.renewed.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    r.0 = last_ok;
                }
            }
            Some(Ok(false)) => {
                lease.lose(format!("the lock of deployment `{deployment}` was taken over or broken by another command (see `flotilla log -d {deployment}`); stopped before changing anything more"));
                return;
            }
            Some(Err(_)) | None => {
                // A broken connection is made anew on the next round.
                state = None;
                if must_give_up(last_ok.elapsed(), lease_secs) {
                    lease.lose(unrenewed(deployment, lease_secs));
                    return;
                }
            }
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        {
            let (stopped, wake) = &*self.stop;
            *stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
            wake.notify_all();
        }
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        // A second connection: the engine's may be mid-transaction or gone. If this fails the
        // lock stays, and the next run takes it over once its lease has expired.
        if let Ok(mut state) = State::open(&self.state) {
            let _ = state.release_lock(&self.deployment, &self.me);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_gives_its_lease_up_after_half_a_lease_without_renewal() {
        assert!(!must_give_up(Duration::from_secs(29), 60));
        assert!(must_give_up(Duration::from_secs(30), 60));
        // Before anyone may take it over (a whole lease), with a quarter lease to spare.
        assert!(must_give_up(Duration::from_secs(45), 60));
        assert!(!must_give_up(Duration::from_millis(1499), 3));
        assert!(must_give_up(Duration::from_millis(1500), 3));
    }

    #[test]
    fn a_lease_not_renewed_for_half_its_length_is_lost_even_if_the_renewer_hangs() {
        let lease = Lease::default();
        *lease.renewed.lock().unwrap() = Some((Instant::now() - Duration::from_millis(1400), 3, "web".into()));
        assert_eq!(lease.lost(), None);
        *lease.renewed.lock().unwrap() = Some((Instant::now() - Duration::from_millis(1600), 3, "web".into()));
        let why = lease.lost().expect("lost after half a lease");
        assert!(why.contains("`web`") && why.contains("stopped before changing anything more"), "{why}");
        assert_eq!(Lease::none().lost(), None);
    }
}
