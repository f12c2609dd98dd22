//! The confirmation state machine and its persistence. A checked activation is recorded in
//! `nix/var/flotilla/pending.json` ([`PendingRecord`]) before it changes anything, at stage
//! `checking`; once its health checks pass the record either goes (the generation is kept) or
//! turns `confirming` while the deployer is awaited ([`Pending`] in memory). A confirmation
//! over a new connection ([`Agent::confirm`]) ends the wait and removes the record; a window
//! that passes ([`Agent::expire`]), a rejection ([`Agent::rollback`]) or an agent that starts
//! and finds the record ([`Agent::roll_back_unconfirmed`]) restores what ran before and marks
//! the generation failed. The record must never outlive a generation that was kept (a restarted
//! agent would undo it), nor go before what ran before runs again.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_store::StorePath;
use serde::{Deserialize, Serialize};

use super::Agent;
use crate::error::{io_err, AgentError};
use crate::machine::symlink_atomic;

/// The generation awaiting confirmation, as [`PendingRecord`], in the agent's state directory.
pub(super) const PENDING: &str = flotilla_protocol::layout::records::PENDING;

/// A generation activated and not yet confirmed, and what to return to without confirmation.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    generation: u64,
    /// The connection that activated it; its confirmation must come over another.
    connection: u64,
    deadline: Instant,
    window: Duration,
    pub(super) previous: Previous,
}

/// What outlives the agent of an activation not yet kept: enough to restore what ran before.
/// It is written before the activation changes anything, so an agent that dies at any point
/// until the generation is checked and confirmed leaves it behind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PendingRecord {
    generation: u64,
    previous_generation: Option<u64>,
    previous_toplevel: Option<StorePath>,
    /// Wall-clock seconds since the epoch (0 while checking).
    deadline_unix: u64,
    window_secs: u64,
    /// How far the activation got. Records written before this field existed were written
    /// once the checks had passed.
    #[serde(default = "Stage::confirming")]
    stage: Stage,
}

/// Where an activation not yet kept is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Stage {
    /// Switching to the generation or running its health checks.
    Checking,
    /// Checked, and waiting for the deployer's confirmation.
    Confirming,
}

impl Stage {
    fn confirming() -> Stage {
        Stage::Confirming
    }
}

/// What ran before an activation: the profile's generation and the running system.
#[derive(Debug, Clone)]
pub(super) struct Previous {
    pub(super) generation: Option<u64>,
    pub(super) running: Option<StorePath>,
}

impl Agent {
    /// Restores what ran before the unconfirmed generation of `record`, marking it failed.
    pub(super) fn roll_back_unconfirmed(&self, record: &PendingRecord) -> Vec<String> {
        let previous = Previous { generation: record.previous_generation, running: record.previous_toplevel.clone() };
        let problem = match record.stage {
            Stage::Checking => format!("the agent restarted before generation {} had passed its health checks", record.generation),
            Stage::Confirming => format!("the agent restarted before generation {} was confirmed", record.generation),
        };
        let mut messages = vec![match self.return_to(&previous, &problem) {
            Ok(done) => done,
            Err(e) => e.to_string(),
        }];
        messages.extend(self.forget_pending_record().err().map(|e| e.to_string()));
        messages
    }

    pub(super) fn pending(&self) -> Option<Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The generation awaiting confirmation, if any.
    pub fn pending_confirmation(&self) -> Option<u64> {
        self.pending().map(|p| p.generation)
    }

    /// When the generation awaiting confirmation runs out of time.
    pub fn confirmation_deadline(&self, generation: u64) -> Option<Instant> {
        self.pending().filter(|p| p.generation == generation).map(|p| p.deadline)
    }

    /// A generation awaiting confirmation needs the one before it: nothing may delete it.
    pub(super) fn refuse_while_pending(&self, what: &str) -> Result<(), AgentError> {
        match self.pending() {
            Some(p) => Err(AgentError::Conflict(format!("cannot {what} while generation {} awaits confirmation; try again once it is confirmed or rolled back", p.generation))),
            None => Ok(()),
        }
    }

    /// Ends the wait for a confirmation, in memory and on disk.
    pub(super) fn take_pending(&self) -> Option<Pending> {
        let taken = self.pending.lock().unwrap_or_else(|p| p.into_inner()).take();
        if taken.is_some() {
            if let Err(e) = self.forget_pending_record() {
                eprintln!("flotilla-agent: {e}");
            }
        }
        taken
    }

    /// Keeps `generation`: the confirmation must come over another connection than the one
    /// that activated it, which proves the deployer can still reach the machine.
    pub fn confirm(&self, generation: u64, connection: u64) -> Result<(), AgentError> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match &*pending {
            Some(p) if p.generation == generation && p.connection == connection => Err(AgentError::BadRequest(format!(
                "generation {generation} must be confirmed over a new connection, not the one that activated it"
            ))),
            Some(p) if p.generation == generation => {
                // A conflict, as before the record had a type: the generation still awaits confirmation.
                self.forget_pending_record().map_err(|e| AgentError::Conflict(e.to_string()))?;
                *pending = None;
                Ok(())
            }
            _ => Err(AgentError::NotFound(format!(
                "generation {generation} is not awaiting confirmation; it may have been rolled back already (`flotilla generations` shows it)"
            ))),
        }
    }

    /// When the confirmation window of `generation` has passed without a confirmation,
    /// restores what ran before it; returns what happened, for the agent's log.
    pub fn expire(&self, generation: u64) -> Option<String> {
        let p = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match &*pending {
                Some(p) if p.generation == generation && Instant::now() >= p.deadline => pending.take()?,
                _ => return None,
            }
        };
        if let Err(e) = self.forget_pending_record() {
            eprintln!("flotilla-agent: {e}");
        }
        let problem = format!("not confirmed within {} s (the deployer lost contact with the machine, or died)", p.window.as_secs());
        Some(self.fail_back(&p.previous, &problem).to_string())
    }

    /// Returns to `previous` after a failed activation: the profile, the running system and
    /// its services. Marks the generation that failed. The error tells the whole story.
    pub(super) fn fail_back(&self, previous: &Previous, problem: &str) -> AgentError {
        self.return_to(previous, problem).map_or_else(|e| e, AgentError::Activation)
    }

    /// [`Agent::fail_back`] for an activation whose record is on disk: once what ran before
    /// runs again, the record goes; when that failed, it stays, and a restarted agent tries again.
    pub(super) fn fail_back_pending(&self, previous: &Previous, problem: &str) -> AgentError {
        match self.return_to(previous, problem) {
            Ok(done) => {
                if let Err(e) = self.forget_pending_record() {
                    eprintln!("flotilla-agent: {e}");
                }
                AgentError::Activation(done)
            }
            Err(e) => e,
        }
    }

    /// Marks the generation that runs now failed for `problem` (unless it is `previous`'s
    /// own) and restores `previous`. Ok: what happened; Err: the restore failed, and why.
    pub(super) fn return_to(&self, previous: &Previous, problem: &str) -> Result<String, AgentError> {
        let failed = self.current_generation().filter(|n| Some(*n) != previous.generation);
        if let Some(n) = failed {
            self.mark_failed(n, problem);
        }
        let what = match failed {
            Some(n) => format!("generation {n}"),
            None => "the activation".to_owned(),
        };
        match self.restore(previous) {
            Ok(to) => Ok(format!("{problem}; {what} was rolled back, {to}")),
            Err(e) => Err(AgentError::Activation(format!("{problem}; rolling {what} back failed too: {e}"))),
        }
    }

    /// Makes `previous` current and running again; says what runs now.
    pub(super) fn restore(&self, previous: &Previous) -> Result<String, AgentError> {
        let restored = self.restore_system(previous);
        if let Some(problem) = self.sync_gc_roots() {
            eprintln!("flotilla-agent: {problem}");
        }
        restored
    }

    pub(super) fn restore_system(&self, previous: &Previous) -> Result<String, AgentError> {
        let profile = self.root.profiles_dir().join("system");
        match previous.generation {
            Some(n) => symlink_atomic(Path::new(&format!("system-{n}-link")), &profile).map_err(io_err("cannot switch the system profile back"))?,
            None => match fs::remove_file(&profile) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot remove the system profile")(e)),
            },
        }
        match &previous.running {
            Some(top) => {
                let m = self.manifest(top)?;
                self.switch_to(top, &m.system, false)?;
                Ok(match previous.generation {
                    Some(n) => format!("generation {n} runs again"),
                    None => format!("{top} runs again"),
                })
            }
            None => {
                // Nothing ran before: stop what the failed system started.
                self.supervisor.stop_all();
                self.waiting.lock().unwrap_or_else(|p| p.into_inner()).clear();
                match fs::remove_file(self.root.path("/run/current-system")) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("cannot remove /run/current-system")(e)),
                }
                Ok("no system runs (this was the first)".to_owned())
            }
        }
    }

    pub(super) fn forget_pending_record(&self) -> Result<(), AgentError> {
        match fs::remove_file(self.root.state_dir().join(PENDING)) {
            // Gone for good only once the directory is on disk: a power cut must not bring
            // back a record that undoes a kept generation.
            Ok(()) => fs::File::open(self.root.state_dir())
                .and_then(|d| d.sync_all())
                .map_err(io_err(format!("removed {PENDING}, but cannot sync its directory, so a power cut could bring it back"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("cannot remove {PENDING}; a restarted agent would roll back a generation no longer pending"))(e)),
        }
    }

    /// Removes a record no activation is waiting on (one a failed restore left, kept so that
    /// a restarted agent would try again) once the profile was changed on purpose since.
    pub(super) fn forget_stale_record(&self) {
        if let Err(e) = self.forget_pending_record() {
            eprintln!("flotilla-agent: {e}");
        }
    }

    /// An activation waits while a generation awaits confirmation: it needs the generation
    /// before it to return to.
    pub(super) fn refuse_activation_while_pending(&self) -> Result<(), AgentError> {
        if let Some(p) = self.pending() {
            return Err(AgentError::Conflict(format!(
                "generation {} awaits confirmation from the deployer that activated it (for {} s more); wait for it to be confirmed or rolled back",
                p.generation,
                p.deadline.saturating_duration_since(Instant::now()).as_secs() + 1
            )));
        }
        Ok(())
    }

    /// Records, before a checked activation changes anything, that `expected` is being
    /// switched to and checked, and what ran before it.
    pub(super) fn record_checking(&self, expected: u64, previous: &Previous) -> Result<PendingRecord, AgentError> {
        let record = PendingRecord {
            generation: expected,
            previous_generation: previous.generation,
            previous_toplevel: previous.running.clone(),
            deadline_unix: 0,
            window_secs: 0,
            stage: Stage::Checking,
        };
        self.root.write_state(PENDING, &Some(&record)).map_err(|e| AgentError::Io {
            what: format!("cannot record that generation {expected} is being activated, so nothing was changed; free space on the machine or make /nix/var/flotilla writable, and deploy again"),
            source: e,
        })?;
        Ok(record)
    }

    /// `generation` passed its checks and now waits for a confirmation within `window` over
    /// another connection than `connection`. When that cannot be recorded, `previous` is
    /// restored and the error says why.
    pub(super) fn await_confirmation(&self, mut record: PendingRecord, generation: u64, window: Duration, connection: u64, previous: Previous) -> Result<(), AgentError> {
        // Recorded before the answer, so that an agent restarting inside the window finds it.
        record.generation = generation;
        record.deadline_unix = (SystemTime::now() + window).duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        record.window_secs = window.as_secs();
        record.stage = Stage::Confirming;
        if let Err(e) = self.root.write_state(PENDING, &Some(&record)) {
            let problem = format!("cannot record that generation {generation} awaits confirmation, so a restarted agent could not roll it back: {e}");
            return Err(self.fail_back_pending(&previous, &problem));
        }
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(Pending { generation, connection, deadline: Instant::now() + window, window, previous });
        Ok(())
    }

    /// Checked, and no confirmation asked for: the generation is kept, and a restarted agent
    /// must not undo it. When its record cannot go, `previous` is restored instead.
    pub(super) fn keep_checked(&self, previous: &Previous) -> Result<(), AgentError> {
        if let Err(e) = self.forget_pending_record() {
            return Err(self.fail_back_pending(previous, &e.to_string()));
        }
        Ok(())
    }
}
