//! Generations and activation: the heart of the agent on a machine.
//!
//! A generation is a link `nix/var/flotilla/profiles/system-<N>-link` to a toplevel; the
//! profile `system` points at the current one, and `/run/current-system` at the running
//! system. Each is switched by one atomic rename. Activation reconciles users, `/etc` and
//! services against the running system: removed services stop, changed ones restart (a
//! service changes when its definition, and so any store path it uses, changes), new ones
//! start in `after` order, and the rest are left running.
//!
//! A checked activation ([`Agent::activate_checked`]) then runs the services' health checks;
//! when activation or a check fails it restores the generation that ran before by itself and
//! marks the new one failed. With a confirmation window it also waits for the deployer to
//! confirm over a new connection ([`Agent::confirm`]), and [`Agent::expire`] restores the
//! previous generation when none came. A service that needs a key not on the machine yet
//! waits, and starts when [`Agent::put_keys`] brings it.
//!
//! A checked activation is recorded in `nix/var/flotilla/pending.json` before it changes
//! anything, and the record goes only once the generation passed its checks and, with a
//! window, was confirmed: an agent that starts and finds that record (it crashed, or the
//! machine rebooted, while switching, checking or waiting) restores the previous generation
//! before any service starts, so an unchecked or unconfirmed system never runs again. Before
//! an activation changes anything, it checks that it would not take over an account or an
//! `/etc` file of the machine's. On a machine with Nix of its own, the agent keeps a Nix GC
//! root for each generation, the running system and itself in `/nix/var/nix/gcroots/flotilla/`,
//! so that Nix's collector never deletes them.
//!
//! [`Agent`] is the one face the server sees; its parts live in submodules along their seams:
//! activation and its health checks here, `generations` (the profile and its links),
//! `plan` (the comparison of the new system with the running one, which `switch` acts on and
//! `flotilla plan` shows), `switch` (what a switch reconciles), `confirm` (the confirmation state machine and its
//! record) and `gc` (garbage and Nix GC roots). Its errors are [`crate::error`]'s.

mod confirm;
mod current;
mod gc;
mod generations;
mod plan;
mod switch;

pub use plan::plan_empty;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_model::SystemConfig;
use flotilla_protocol::{ActivationGoal, ActivationReport, HealthResult, ServiceState};
use flotilla_store::StorePath;

use crate::build_system::{Manifest, MANIFEST_VERSION};
pub use crate::error::AgentError;
use crate::error::io_err;
use crate::machine::{agent_store_path, MachineRoot, NixRegistration, NIX_STORE_PLACES};
use crate::supervisor::Supervisor;
use crate::{etc, health, users};
use confirm::{Pending, PendingRecord, Previous, PENDING};
pub use switch::KeysApplied;

/// How long services without a health check get to be running after an activation.
const SETTLE: Duration = Duration::from_secs(10);

/// How long a service without a health check that an activation started or restarted must
/// then stay up, the same process without exiting, to count as running: one that is up for a
/// moment and then dies is no running service (its first instant of `Running` says nothing).
const STAY_UP: Duration = Duration::from_secs(2);

/// What a successful checked activation did.
#[derive(Debug)]
pub struct Activation {
    /// The generation now current.
    pub generation: u64,
    /// What changed.
    pub report: ActivationReport,
    /// The health checks run.
    pub health: Vec<HealthResult>,
    /// Whether a confirmation is awaited.
    pub awaiting_confirmation: bool,
}

/// The agent's view of one machine.
pub struct Agent {
    root: MachineRoot,
    supervisor: Arc<Supervisor>,
    /// Services not started because keys they need are missing: name → those keys.
    waiting: Mutex<BTreeMap<String, Vec<String>>>,
    pending: Mutex<Option<Pending>>,
}

impl Agent {
    /// An agent for `root`, running services through `supervisor`.
    pub fn new(root: MachineRoot, supervisor: Arc<Supervisor>) -> Agent {
        Agent { root, supervisor, waiting: Mutex::new(BTreeMap::new()), pending: Mutex::new(None) }
    }

    /// The machine's root layout.
    pub fn root(&self) -> &MachineRoot {
        &self.root
    }

    /// The supervisor.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The supervisor, to keep beyond the agent's lock (a command run for the deployer).
    pub fn shared_supervisor(&self) -> Arc<Supervisor> {
        Arc::clone(&self.supervisor)
    }

    /// Runs the host's `nix-store` for [`MachineRoot::register_with_nix`] through the
    /// supervisor, which waits for every child of the agent.
    pub fn nix_runner(&self) -> impl Fn(&[String], &Path) -> io::Result<(bool, String)> + '_ {
        |argv: &[String], input: &Path| {
            let out = self.supervisor.run_command_with_input(argv, flotilla_protocol::REGISTER_TIMEOUT, input).map_err(io::Error::other)?;
            let mut said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if !out.status.success() {
                said = format!("{} ({})", said, out.status);
            }
            Ok((out.status.success(), said))
        }
    }

    fn manifest(&self, toplevel: &StorePath) -> Result<Manifest, AgentError> {
        if !self.root.is_valid(toplevel) {
            return Err(AgentError::NotFound(format!("{toplevel} is not in the machine's store; copy it first")));
        }
        let path = self.root.store_path(toplevel).join("manifest.json");
        let text = fs::read_to_string(&path).map_err(io_err(format!("cannot read {}", path.display())))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| AgentError::Activation(format!("{toplevel} is not a flotilla system (manifest.json: {e})")))?;
        if m.flotilla_manifest != MANIFEST_VERSION {
            return Err(AgentError::Activation(format!(
                "{toplevel} has manifest version {}, this agent reads version {MANIFEST_VERSION}; deploy with a matching flotilla",
                m.flotilla_manifest
            )));
        }
        Ok(m)
    }

    /// Starts the services of the running system (the agent just started: nothing runs).
    ///
    /// With no `/run/current-system` (a container's `/run` is a fresh tmpfs at every start)
    /// it boots the `system` profile instead: the full switch to it, as `switch` does, without
    /// adding a generation. That is what makes a `boot` activation current at the next start.
    ///
    /// A generation that awaited confirmation when the agent stopped was not confirmed: what
    /// ran before it is restored instead, and it is marked failed.
    pub fn start_running_system(&self) -> Vec<String> {
        let mut messages = match self.root.read_state::<Option<PendingRecord>>(PENDING) {
            Ok(Some(record)) => return self.roll_back_unconfirmed(&record),
            Ok(None) => Vec::new(),
            Err(e) => vec![format!("cannot read {PENDING}, so a generation awaiting confirmation may run unconfirmed: {e}")],
        };
        messages.extend(self.start_current_system());
        messages.extend(self.sync_gc_roots());
        messages
    }

    /// Activates `toplevel` for `goal`; returns the generation and what changed.
    pub fn activate(&self, toplevel: &StorePath, goal: ActivationGoal) -> Result<(u64, ActivationReport), AgentError> {
        let new = self.manifest(toplevel)?;
        let notes = self.preflight(toplevel, &new.system, goal)?;
        self.activate_prepared(toplevel, &new.system, goal, notes)
    }

    /// What must hold before an activation changes anything: it takes over no account and
    /// no `/etc` file of the machine's (`Conflict` otherwise, naming each and the fix), and
    /// on a machine with Nix the system's paths are valid in Nix's database. Returns notes
    /// for the report.
    fn preflight(&self, toplevel: &StorePath, new: &SystemConfig, goal: ActivationGoal) -> Result<Vec<String>, AgentError> {
        let lookup = |name: &str, user: bool| users::lookup_id(&self.root, name, user);
        // Every refusal at once: one deploy tells the user all there is to fix.
        let mut refused = Vec::new();
        for checked in [
            users::apply(&self.root, &new.system.users, &new.system.groups, true).map(drop),
            etc::apply(&self.root, &toplevel.to_absolute(), &new.system.files, &lookup, true).map(drop),
        ] {
            match checked {
                Ok(()) => {}
                Err(AgentError::Conflict(problem)) => refused.push(problem),
                Err(e) => return Err(e),
            }
        }
        if !refused.is_empty() {
            return Err(AgentError::Conflict(refused.join("; ")));
        }
        if !goal.activates() {
            return Ok(Vec::new());
        }
        let roots: Vec<StorePath> = std::iter::once(toplevel.clone()).chain(agent_store_path(&self.root)).collect();
        match self.root.register_with_nix(&self.root.closure(&roots), &self.nix_runner()) {
            Ok(NixRegistration::NotNeeded | NixRegistration::Registered(_)) => Ok(Vec::new()),
            Ok(NixRegistration::NoNixStore) => {
                let note = format!(
                    "this machine has Nix (/nix/var/nix/db), but flotilla-agent finds no nix-store in {}: the paths it received are not valid in Nix's database, and Nix's garbage collector would delete them, this system included; install Nix's tools in one of those places and deploy again",
                    NIX_STORE_PLACES.join(", ")
                );
                // The deployer may not show the report's messages: the agent's log has it too.
                eprintln!("flotilla-agent: {note}");
                Ok(vec![note])
            }
            Err(e) => Err(AgentError::Io { what: format!("cannot make {toplevel} valid in this machine's Nix database"), source: io::Error::other(e) }),
        }
    }

    /// [`Agent::activate`] once the manifest is read and the preflight passed.
    fn activate_prepared(&self, toplevel: &StorePath, new: &SystemConfig, goal: ActivationGoal, notes: Vec<String>) -> Result<(u64, ActivationReport), AgentError> {
        let dry = !goal.activates();
        let generation = if goal.adds_generation() { self.add_generation(toplevel, dry)? } else { self.current_generation().unwrap_or(0) };
        let mut report = match goal {
            ActivationGoal::Boot => ActivationReport { messages: vec![format!("generation {generation} becomes current at the next start")], ..Default::default() },
            _ => self.switch_to(toplevel, new, dry)?,
        };
        report.messages.extend(notes);
        if !dry {
            report.messages.extend(self.sync_gc_roots());
        }
        Ok((generation, report))
    }

    /// Activates `toplevel` for `goal`, then (for `switch` and `test`) checks that its
    /// services run and pass their health checks within `check_timeout`. When activation or
    /// a check fails, the generation that ran before is restored and the new one marked
    /// failed; the error says which check failed and its last output. With `confirm_within`
    /// the new generation then waits for a [`Agent::confirm`] from another connection than
    /// `connection`; the caller arranges for [`Agent::expire`] to run at the deadline.
    pub fn activate_checked(
        &self,
        toplevel: &StorePath,
        goal: ActivationGoal,
        check_timeout: Option<Duration>,
        confirm_within: Option<Duration>,
        connection: u64,
    ) -> Result<Activation, AgentError> {
        self.refuse_activation_while_pending()?;
        // Nothing has changed yet: what fails here needs no rollback.
        let new = self.manifest(toplevel)?;
        let notes = self.preflight(toplevel, &new.system, goal)?;
        let previous = Previous { generation: self.current_generation(), running: self.running_system() };
        let checked = goal.is_checked();
        if !checked {
            let (generation, report) = self.activate_prepared(toplevel, &new.system, goal, notes)?;
            if goal == ActivationGoal::Boot {
                // A record left by a restore that failed would undo this boot default.
                self.forget_stale_record();
            }
            return Ok(Activation { generation, report, health: Vec::new(), awaiting_confirmation: false });
        }
        let expected = self.generation_for(toplevel, goal)?;
        let unchanged = previous.generation == Some(expected) && previous.running.as_ref() == Some(toplevel);
        // Recorded before anything changes: an agent that dies while switching or checking
        // leaves a generation nobody checked, and the next agent must not keep it.
        let record = if unchanged { None } else { Some(self.record_checking(expected, &previous)?) };
        let (generation, report) = match self.activate_prepared(toplevel, &new.system, goal, notes) {
            Ok(r) => r,
            Err(e) => return Err(self.fail_back_pending(&previous, &format!("activation of {toplevel} failed: {e}"))),
        };
        let deadline = check_timeout.map(|t| Instant::now() + t);
        let health = self.check(&report, deadline);
        if let Some(problem) = first_problem(&health) {
            if unchanged {
                return Err(AgentError::Unhealthy(format!("{problem}; generation {generation} already ran, so there is nothing to roll back to")));
            }
            return Err(self.fail_back_pending(&previous, &problem));
        }
        let awaiting_confirmation = confirm_within.is_some() && !unchanged;
        match (confirm_within, record) {
            (Some(window), Some(record)) => self.await_confirmation(record, generation, window, connection, previous)?,
            (None, Some(_)) => self.keep_checked(&previous)?,
            (_, None) => self.forget_stale_record(),
        }
        Ok(Activation { generation, report, health, awaiting_confirmation })
    }

    /// The health of the services just activated: services without a check must be running
    /// (up to [`SETTLE`]); services with one must pass it. Services waiting for keys are left
    /// out. Checks run in parallel.
    fn check(&self, report: &ActivationReport, deadline: Option<Instant>) -> Vec<HealthResult> {
        let Some(m) = self.running_system().and_then(|t| self.manifest(&t).ok()) else { return Vec::new() };
        let services = &m.system.system.services;
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let fresh: BTreeSet<&String> = report.services_started.iter().chain(&report.services_restarted).collect();
        let settle_until = deadline.map_or(Instant::now() + SETTLE, |d| d.min(Instant::now() + SETTLE));
        std::thread::scope(|scope| {
            let handles: Vec<_> = services
                .iter()
                .filter(|(name, _)| !waiting.contains_key(*name))
                .filter(|(name, spec)| spec.health_check.is_some() || fresh.contains(name))
                .map(|(name, spec)| {
                    // Without a health check, being up is all there is to check: a service that
                    // exits right after it started has failed, unless it is restarted whenever
                    // it exits (`restart = "always"`: declared to exit). With one, the check decides.
                    let stay = (fresh.contains(name) && spec.health_check.is_none() && spec.restart != flotilla_model::RestartPolicy::Always)
                        .then_some(STAY_UP);
                    scope.spawn(move || {
                        if let Some(bad) = self.wait_running(name, settle_until, stay) {
                            return bad;
                        }
                        match &spec.health_check {
                            Some(hc) => health::run(&self.root, &self.supervisor, name, hc, deadline, false),
                            None => HealthResult { service: name.clone(), check: "running".into(), healthy: true, probes: 1, output: "running".into() },
                        }
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    }

    /// Waits for `name` to be running, and with `stay`, to stay up that long (the same
    /// process, not restarted; bounded by `until`); `Some` with why when it failed, exited or
    /// did not come up.
    fn wait_running(&self, name: &str, until: Instant, stay: Option<Duration>) -> Option<HealthResult> {
        // The process seen running, and since when.
        let mut up: Option<(Option<u32>, u32, Instant)> = None;
        loop {
            let status = self.supervisor.status().into_iter().find(|s| s.name == name);
            let state = status.as_ref().map(|s| s.state);
            let now = Instant::now();
            // A one-shot service (a migration, a set-up script) that finished cleanly and is
            // not restarted for it has done its work: that is no failure to stay up.
            let clean = crate::supervisor::ExitStatus::Exited(0).to_string();
            let finished = status.as_ref().is_some_and(|s| s.state == ServiceState::Stopped && s.last_exit.as_deref() == Some(clean.as_str()));
            if finished {
                return None;
            }
            let same = |s: &flotilla_protocol::ServiceStatus, seen: &(Option<u32>, u32, Instant)| s.pid == seen.0 && s.restarts == seen.1;
            match (&status, stay, &up) {
                (Some(s), _, _) if s.state != ServiceState::Running => {}
                (Some(_), None, _) => return None,
                (Some(s), Some(_), None) => up = Some((s.pid, s.restarts, now)),
                (Some(s), Some(stay), Some(seen)) if same(s, seen) => {
                    if now.duration_since(seen.2) >= stay || now >= until {
                        return None;
                    }
                }
                // Running again, as another process: the one seen running exited.
                (Some(_), Some(_), Some(_)) => {}
                (None, _, _) => {}
            }
            let exited = up.as_ref().is_some_and(|seen| status.as_ref().is_none_or(|s| !same(s, seen) || s.state != ServiceState::Running));
            if exited || state == Some(ServiceState::Failed) || now >= until {
                let last = status.as_ref().and_then(|s| s.last_exit.clone());
                let tail = self.log_tail(name);
                let output = match (last, state) {
                    (Some(exit), Some(_)) if exited => {
                        let after = up.as_ref().map_or(0.0, |seen| now.duration_since(seen.2).as_secs_f64());
                        format!("did not stay up: exited within {after:.1} s of starting ({exit}){tail}")
                    }
                    (Some(exit), Some(state)) => format!("{state}, last exit: {exit}{tail}"),
                    (None, Some(state)) => format!("still {state}{tail}"),
                    (_, None) => "not supervised".into(),
                };
                return Some(HealthResult { service: name.to_owned(), check: "running".into(), healthy: false, probes: 1, output });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of a service's log, for a failure message.
    fn log_tail(&self, name: &str) -> String {
        let Ok(text) = fs::read_to_string(self.supervisor.config().log_dir.join(format!("{name}.log"))) else { return String::new() };
        let lines: Vec<&str> = text.lines().rev().take(3).collect();
        if lines.is_empty() {
            return String::new();
        }
        format!("; its log ends: {}", lines.into_iter().rev().collect::<Vec<_>>().join(" | "))
    }

    /// Probes every health check of the running system once.
    pub fn check_health(&self) -> Vec<HealthResult> {
        let Some(m) = self.running_system().and_then(|t| self.manifest(&t).ok()) else { return Vec::new() };
        let services = &m.system.system.services;
        std::thread::scope(|scope| {
            let handles: Vec<_> = services
                .iter()
                .filter_map(|(name, spec)| Some((name, spec.health_check.as_ref()?)))
                .map(|(name, hc)| scope.spawn(move || health::run(&self.root, &self.supervisor, name, hc, None, true)))
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    }

    /// Bytes free on the filesystem of the machine's store.
    pub fn store_free_bytes(&self) -> Option<u64> {
        crate::machine::free_bytes(&self.root.store_dir()).ok()
    }
}

/// The first failed check, as the user reads it.
fn first_problem(health: &[HealthResult]) -> Option<String> {
    let bad = health.iter().find(|h| !h.healthy)?;
    let probes = if bad.probes == 1 { "1 probe".to_owned() } else { format!("{} probes", bad.probes) };
    Some(format!("health check of service {} ({}) failed after {probes}: {}", bad.service, bad.check, bad.output))
}
