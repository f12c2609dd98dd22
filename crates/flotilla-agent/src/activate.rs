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
//! before any service starts, so an unchecked or unconfirmed system never runs again. Before an activation changes anything, it checks that it would
//! not take over an account or an `/etc` file of the machine's. On a machine with Nix of its
//! own, the agent keeps a Nix GC root for each generation, the running system and itself in
//! `/nix/var/nix/gcroots/flotilla/`, so that Nix's collector never deletes them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_model::{start_order, KeySpec, ServiceSpec, SystemConfig};
use flotilla_protocol::{ActivationGoal, ActivationReport, GenerationInfo, HealthResult, KeyState, KeyUpload, ServiceState, ServiceStatus};
use flotilla_store::StorePath;
use serde::{Deserialize, Serialize};

use crate::build_system::{Manifest, MANIFEST_VERSION};
use crate::machine::{agent_store_path, symlink_atomic, MachineRoot, NixRegistration, NIX_STORE_PLACES};
use crate::supervisor::{Supervisor, SupervisorError};
use crate::{etc, health, keys, users};

/// The agent's record of failed generations (number → why), in its state directory.
const FAILED: &str = flotilla_protocol::layout::records::FAILED;

/// The generation awaiting confirmation, as [`PendingRecord`], in the agent's state directory.
const PENDING: &str = flotilla_protocol::layout::records::PENDING;

/// How long services without a health check get to be running after an activation.
const SETTLE: Duration = Duration::from_secs(10);

/// How long a service without a health check that an activation started or restarted must
/// then stay up, the same process without exiting, to count as running: one that is up for a
/// moment and then dies is no running service (its first instant of `Running` says nothing).
const STAY_UP: Duration = Duration::from_secs(2);

/// Why an operation on the machine failed; the message is for the deployer's user.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request names something the machine does not have.
    #[error("{0}")]
    NotFound(String),
    /// Filesystem trouble.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: io::Error,
    },
    /// Activation could not complete, or its checks failed; the previous generation was
    /// restored.
    #[error("{0}")]
    Activation(String),
    /// The health checks failed and there was nothing to roll back to.
    #[error("{0}")]
    Unhealthy(String),
    /// The request is malformed or names something unusable.
    #[error("{0}")]
    BadRequest(String),
    /// The request conflicts with what the machine is doing.
    #[error("{0}")]
    Conflict(String),
}

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

/// What [`Agent::put_keys`] did.
#[derive(Debug, Default)]
pub struct KeysApplied {
    /// Keys written.
    pub written: Vec<String>,
    /// Keys deleted.
    pub removed: Vec<String>,
    /// Running services restarted because a key they use changed.
    pub restarted: Vec<String>,
    /// Services started because their keys are now all present.
    pub started: Vec<String>,
}

/// A generation activated and not yet confirmed, and what to return to without confirmation.
#[derive(Debug, Clone)]
struct Pending {
    generation: u64,
    /// The connection that activated it; its confirmation must come over another.
    connection: u64,
    deadline: Instant,
    window: Duration,
    previous: Previous,
}

/// What outlives the agent of an activation not yet kept: enough to restore what ran before.
/// It is written before the activation changes anything, so an agent that dies at any point
/// until the generation is checked and confirmed leaves it behind.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingRecord {
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
enum Stage {
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
struct Previous {
    generation: Option<u64>,
    running: Option<StorePath>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
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

    /// Runs the host's `nix-store` for [`MachineRoot::register_with_nix`] through the
    /// supervisor, which waits for every child of the agent.
    pub fn nix_runner(&self) -> impl Fn(&[String], &Path) -> Result<(bool, String), String> + '_ {
        |argv: &[String], input: &Path| {
            let out = self.supervisor.run_command_with_input(argv, flotilla_protocol::REGISTER_TIMEOUT, input).map_err(|e| e.to_string())?;
            let mut said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if !out.status.success() {
                said = format!("{} ({})", said, out.status);
            }
            Ok((out.status.success(), said))
        }
    }

    /// The supervisor.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    fn gen_link(&self, n: u64) -> PathBuf {
        self.root.profiles_dir().join(format!("system-{n}-link"))
    }

    /// Every generation, oldest first.
    pub fn generations(&self) -> Result<Vec<GenerationInfo>, AgentError> {
        let current = self.current_generation();
        let failed: BTreeMap<u64, String> = self.root.read_state(FAILED).unwrap_or_default();
        let mut out = Vec::new();
        let dir = self.root.profiles_dir();
        for e in fs::read_dir(&dir).map_err(io_err(format!("cannot list {}", dir.display())))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("system-").and_then(|r| r.strip_suffix("-link")).and_then(|n| n.parse::<u64>().ok()) else { continue };
            let Ok(target) = fs::read_link(e.path()) else { continue };
            let Ok(toplevel) = StorePath::parse(&target.to_string_lossy()) else { continue };
            let created = fs::symlink_metadata(e.path()).and_then(|m| m.modified()).ok();
            out.push(GenerationInfo {
                number: n,
                toplevel,
                created_unix: created.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()).unwrap_or(0),
                current: current == Some(n),
                failed: failed.get(&n).cloned(),
            });
        }
        out.sort_by_key(|g| g.number);
        Ok(out)
    }

    /// The generation the `system` profile points at.
    pub fn current_generation(&self) -> Option<u64> {
        let target = fs::read_link(self.root.profiles_dir().join("system")).ok()?;
        let name = target.file_name()?.to_string_lossy().into_owned();
        name.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok()
    }

    /// The system running now (`/run/current-system`).
    pub fn running_system(&self) -> Option<StorePath> {
        let target = fs::read_link(self.root.path("/run/current-system")).ok()?;
        StorePath::parse(&target.to_string_lossy()).ok()
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

    /// Restores what ran before the unconfirmed generation of `record`, marking it failed.
    fn roll_back_unconfirmed(&self, record: &PendingRecord) -> Vec<String> {
        let previous = Previous { generation: record.previous_generation, running: record.previous_toplevel.clone() };
        let problem = match record.stage {
            Stage::Checking => format!("the agent restarted before generation {} had passed its health checks", record.generation),
            Stage::Confirming => format!("the agent restarted before generation {} was confirmed", record.generation),
        };
        let mut messages = vec![match self.return_to(&previous, &problem) {
            Ok(done) => done,
            Err(e) => e.to_string(),
        }];
        messages.extend(self.forget_pending_record().err());
        messages
    }

    fn start_current_system(&self) -> Vec<String> {
        let Some(top) = self.running_system() else { return self.boot_current_generation() };
        let Ok(m) = self.manifest(&top) else { return vec![format!("cannot read the running system {top}")] };
        let mut errors = Vec::new();
        for name in start_order(&m.system.system.services) {
            match self.start_service(&name, &m.system.system.services[&name], &m.system.keys) {
                Ok(Some(missing)) => errors.push(format!("service {name} waits for keys {}", missing.join(", "))),
                Ok(None) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        errors
    }

    /// Starts a service, unless keys it needs are missing: then it waits, and the missing
    /// keys are returned.
    fn start_service(&self, name: &str, spec: &ServiceSpec, key_specs: &BTreeMap<String, KeySpec>) -> Result<Option<Vec<String>>, SupervisorError> {
        let missing: Vec<String> = spec
            .keys
            .iter()
            .filter(|k| key_specs.get(*k).is_none_or(|ks| !keys::key_path(&self.root, &ks.dest_dir, k).exists()))
            .cloned()
            .collect();
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if !missing.is_empty() {
            waiting.insert(name.to_owned(), missing.clone());
            return Ok(Some(missing));
        }
        waiting.remove(name);
        drop(waiting);
        self.supervisor.start(name, spec).map(|()| None)
    }

    /// The supervised services, and those waiting for keys.
    pub fn service_status(&self) -> Vec<ServiceStatus> {
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out: Vec<ServiceStatus> = self.supervisor.status().into_iter().filter(|s| !waiting.contains_key(&s.name)).collect();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        for (name, keys) in waiting {
            out.push(ServiceStatus { name, state: ServiceState::Waiting, pid: None, restarts: 0, last_exit: None, since_unix: now, waiting_for: keys });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Switches to the generation the `system` profile points at (nothing when there is none).
    fn boot_current_generation(&self) -> Vec<String> {
        let Some(n) = self.current_generation() else { return Vec::new() };
        let link = self.gen_link(n);
        let toplevel = match fs::read_link(&link) {
            Ok(target) => match StorePath::parse(&target.to_string_lossy()) {
                Ok(toplevel) => toplevel,
                Err(e) => return vec![format!("cannot boot generation {n}: {} points to {}: {e}", link.display(), target.display())],
            },
            Err(e) => return vec![format!("cannot boot generation {n}: {}: {e}", link.display())],
        };
        let booted = self.manifest(&toplevel).and_then(|m| self.switch_to(&toplevel, &m.system, false));
        match booted {
            // Messages (an /etc file kept aside, a service that would not stop) go to the log too.
            Ok(report) => report.messages,
            Err(e) => vec![format!("cannot boot generation {n} ({toplevel}): {e}")],
        }
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
        if goal == ActivationGoal::DryActivate {
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
        let dry = goal == ActivationGoal::DryActivate;
        let generation = match goal {
            ActivationGoal::Switch | ActivationGoal::Boot => self.add_generation(toplevel, dry)?,
            ActivationGoal::Test | ActivationGoal::DryActivate => self.current_generation().unwrap_or(0),
        };
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

    /// Switches back to generation `to` (default: the one before the current).
    ///
    /// While a generation awaits confirmation, `to: None` rejects it instead: what ran before
    /// it runs again and it is marked failed, for `reason`.
    pub fn rollback(&self, to: Option<u64>, reason: Option<&str>) -> Result<(u64, ActivationReport), AgentError> {
        let pending = self.take_pending();
        match (pending, to) {
            (Some(p), None) => {
                let done = self.return_to(&p.previous, reason.unwrap_or("rolled back before it was confirmed"))?;
                let report = ActivationReport { messages: vec![done], ..Default::default() };
                return Ok((self.current_generation().unwrap_or(0), report));
            }
            // The deployer rejects a generation it thinks is pending; the window already
            // closed and the agent rolled it back: going back one more would be wrong.
            (None, None) if reason.is_some() => {
                return Err(AgentError::NotFound("no generation awaits confirmation: it was rolled back already, when its confirmation window closed".into()));
            }
            _ => {}
        }
        let gens = self.generations()?;
        let current = self.current_generation();
        let target = match to {
            Some(n) => gens.iter().find(|g| g.number == n).ok_or_else(|| {
                AgentError::NotFound(format!("generation {n} does not exist; generations: {}", list(&gens)))
            })?,
            None => gens
                .iter()
                .rev()
                .find(|g| current.is_none_or(|c| g.number < c) && g.failed.is_none())
                .ok_or_else(|| AgentError::NotFound(format!("no good generation before the current one to roll back to; generations: {}", list(&gens))))?,
        };
        let m = self.manifest(&target.toplevel)?;
        symlink_atomic(Path::new(&format!("system-{}-link", target.number)), &self.root.profiles_dir().join("system"))
            .map_err(io_err("cannot switch the system profile"))?;
        let mut report = self.switch_to(&target.toplevel, &m.system, false)?;
        self.forget_stale_record();
        report.messages.extend(self.sync_gc_roots());
        Ok((target.number, report))
    }

    /// Links a new generation for `toplevel` and makes it current, unless the current one
    /// already is `toplevel`.
    fn add_generation(&self, toplevel: &StorePath, dry: bool) -> Result<u64, AgentError> {
        let n = self.generation_for(toplevel, ActivationGoal::Switch)?;
        if dry || Some(n) == self.current_generation() {
            return Ok(n);
        }
        symlink_atomic(Path::new(&toplevel.to_absolute()), &self.gen_link(n)).map_err(io_err("cannot link the new generation"))?;
        symlink_atomic(Path::new(&format!("system-{n}-link")), &self.root.profiles_dir().join("system"))
            .map_err(io_err("cannot switch the system profile"))?;
        Ok(n)
    }

    /// The generation an activation of `toplevel` for `goal` leaves current: for `switch`
    /// and `boot` the current one when it already is `toplevel`, else a new one.
    fn generation_for(&self, toplevel: &StorePath, goal: ActivationGoal) -> Result<u64, AgentError> {
        match goal {
            ActivationGoal::Switch | ActivationGoal::Boot => {
                let gens = self.generations()?;
                Ok(match gens.iter().find(|g| g.current) {
                    Some(cur) if &cur.toplevel == toplevel => cur.number,
                    _ => gens.last().map_or(1, |g| g.number + 1),
                })
            }
            ActivationGoal::Test | ActivationGoal::DryActivate => Ok(self.current_generation().unwrap_or(0)),
        }
    }

    /// Makes `toplevel` the running system: users, /etc, /bin/sh, services.
    fn switch_to(&self, toplevel: &StorePath, new: &SystemConfig, dry: bool) -> Result<ActivationReport, AgentError> {
        let old_services: BTreeMap<String, ServiceSpec> = self
            .running_system()
            .and_then(|t| self.manifest(&t).ok())
            .map(|m| m.system.system.services)
            .unwrap_or_default();
        let running: BTreeSet<String> = self.supervisor.running().into_iter().collect();
        let new_services = &new.system.services;

        let mut report = ActivationReport { dry_run: dry, ..Default::default() };
        let mut to_stop = Vec::new();
        let mut to_start = Vec::new();
        for name in start_order(&old_services).into_iter().rev() {
            match new_services.get(&name) {
                None => {
                    report.services_stopped.push(name.clone());
                    to_stop.push(name);
                }
                Some(spec) if spec != &old_services[&name] => {
                    report.services_restarted.push(name.clone());
                    to_stop.push(name);
                }
                Some(_) => {}
            }
        }
        for name in start_order(new_services) {
            let restarting = report.services_restarted.contains(&name);
            if restarting {
                to_start.push(name);
            } else if !old_services.contains_key(&name) || !running.contains(&name) {
                report.services_started.push(name.clone());
                to_start.push(name);
            } else {
                report.services_unchanged.push(name);
            }
        }
        report.services_restarted.sort();

        let lookup = |name: &str, user: bool| users::lookup_id(&self.root, name, user);
        if dry {
            let u = users::apply(&self.root, &new.system.users, &new.system.groups, true)?;
            let e = etc::apply(&self.root, &toplevel.to_absolute(), &new.system.files, &lookup, true)?;
            (report.users_added, report.users_removed) = (u.added, u.removed);
            (report.etc_added, report.etc_changed, report.etc_removed) = (e.added, e.changed, e.removed);
            return Ok(report);
        }

        for name in &to_stop {
            match self.supervisor.stop(name) {
                Ok(()) | Err(SupervisorError::UnknownService { .. }) => {}
                Err(e) => report.messages.push(format!("stopping {name}: {e}")),
            }
        }
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).retain(|name, _| new_services.contains_key(name));
        let u = users::apply(&self.root, &new.system.users, &new.system.groups, false)?;
        let e = etc::apply(&self.root, &toplevel.to_absolute(), &new.system.files, &lookup, false)?;
        (report.users_added, report.users_removed) = (u.added, u.removed);
        (report.etc_added, report.etc_changed, report.etc_removed) = (e.added, e.changed, e.removed);
        report.messages.extend(e.messages);
        // Keys sent before activation for accounts it just created now go to their owners.
        report.messages.extend(keys::fix_owners(&self.root)?);
        if let Some(sh) = &new.system.binsh {
            // /bin/sh is replaced only when missing or already a link into the store: on a
            // host of its own (ssh), it is the host's shell and not flotilla's to change.
            let bin = self.root.path("/bin");
            let link = bin.join("sh");
            let ours = match fs::symlink_metadata(&link) {
                Err(_) => true,
                Ok(m) => m.file_type().is_symlink() && fs::read_link(&link).is_ok_and(|t| t.starts_with(flotilla_store::STORE_DIR)),
            };
            if ours {
                if fs::symlink_metadata(&bin).is_err() {
                    fs::create_dir_all(&bin).map_err(io_err("cannot create /bin"))?;
                }
                symlink_atomic(Path::new(sh), &link).map_err(io_err("cannot link /bin/sh"))?;
            } else {
                report.messages.push("binsh: /bin/sh is this machine's own (not a link into /nix/store), so it was left as it is".into());
            }
        }
        fs::create_dir_all(self.root.path("/run")).map_err(io_err("cannot create /run"))?;
        symlink_atomic(Path::new(&toplevel.to_absolute()), &self.root.path("/run/current-system"))
            .map_err(io_err("cannot switch /run/current-system"))?;

        let mut failed = Vec::new();
        for name in &to_start {
            match self.start_service(name, &new_services[name], &new.keys) {
                Ok(None) => {}
                Ok(Some(missing)) => {
                    report.services_started.retain(|s| s != name);
                    report.services_restarted.retain(|s| s != name);
                    report.messages.push(format!("service {name} waits for keys {}", missing.join(", ")));
                }
                Err(e) => failed.push(format!("{name}: {e}")),
            }
        }
        if !failed.is_empty() {
            return Err(AgentError::Activation(format!("services failed to start: {}", failed.join("; "))));
        }
        Ok(report)
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
        if let Some(p) = self.pending() {
            return Err(AgentError::Conflict(format!(
                "generation {} awaits confirmation from the deployer that activated it (for {} s more); wait for it to be confirmed or rolled back",
                p.generation,
                p.deadline.saturating_duration_since(Instant::now()).as_secs() + 1
            )));
        }
        // Nothing has changed yet: what fails here needs no rollback.
        let new = self.manifest(toplevel)?;
        let notes = self.preflight(toplevel, &new.system, goal)?;
        let previous = Previous { generation: self.current_generation(), running: self.running_system() };
        let checked = matches!(goal, ActivationGoal::Switch | ActivationGoal::Test);
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
        let mut record = PendingRecord {
            generation: expected,
            previous_generation: previous.generation,
            previous_toplevel: previous.running.clone(),
            deadline_unix: 0,
            window_secs: 0,
            stage: Stage::Checking,
        };
        // Recorded before anything changes: an agent that dies while switching or checking
        // leaves a generation nobody checked, and the next agent must not keep it.
        if !unchanged {
            self.root.write_state(PENDING, &Some(&record)).map_err(|e| AgentError::Io {
                what: format!("cannot record that generation {expected} is being activated (nothing was changed)"),
                source: e,
            })?;
        }
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
        match confirm_within {
            Some(window) if awaiting_confirmation => {
                // Recorded before the answer, so that an agent restarting inside the window finds it.
                record.generation = generation;
                record.deadline_unix = (SystemTime::now() + window).duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                record.window_secs = window.as_secs();
                record.stage = Stage::Confirming;
                if let Err(e) = self.root.write_state(PENDING, &Some(&record)) {
                    let problem = format!("cannot record that generation {generation} awaits confirmation, so a restarted agent could not roll it back: {e}");
                    return Err(self.fail_back_pending(&previous, &problem));
                }
                *self.pending.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Pending { generation, connection, deadline: Instant::now() + window, window, previous });
            }
            // Checked, and no confirmation asked for: the generation is kept, and a restarted
            // agent must not undo it.
            _ if !unchanged => {
                if let Err(e) = self.forget_pending_record() {
                    return Err(self.fail_back_pending(&previous, &e));
                }
            }
            _ => self.forget_stale_record(),
        }
        Ok(Activation { generation, report, health, awaiting_confirmation })
    }

    /// Removes a record no activation is waiting on (one a failed restore left, kept so that
    /// a restarted agent would try again) once the profile was changed on purpose since.
    fn forget_stale_record(&self) {
        if let Err(e) = self.forget_pending_record() {
            eprintln!("flotilla-agent: {e}");
        }
    }

    /// [`Agent::fail_back`] for an activation whose record is on disk: once what ran before
    /// runs again, the record goes; when that failed, it stays, and a restarted agent tries again.
    fn fail_back_pending(&self, previous: &Previous, problem: &str) -> AgentError {
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
            let same = |s: &ServiceStatus, seen: &(Option<u32>, u32, Instant)| s.pid == seen.0 && s.restarts == seen.1;
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

    /// Returns to `previous` after a failed activation: the profile, the running system and
    /// its services. Marks the generation that failed. The error tells the whole story.
    fn fail_back(&self, previous: &Previous, problem: &str) -> AgentError {
        self.return_to(previous, problem).map_or_else(|e| e, AgentError::Activation)
    }

    /// Marks the generation that runs now failed for `problem` (unless it is `previous`'s
    /// own) and restores `previous`. Ok: what happened; Err: the restore failed, and why.
    fn return_to(&self, previous: &Previous, problem: &str) -> Result<String, AgentError> {
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
    fn restore(&self, previous: &Previous) -> Result<String, AgentError> {
        let restored = self.restore_system(previous);
        if let Some(problem) = self.sync_gc_roots() {
            eprintln!("flotilla-agent: {problem}");
        }
        restored
    }

    fn restore_system(&self, previous: &Previous) -> Result<String, AgentError> {
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

    fn mark_failed(&self, n: u64, why: &str) {
        let mut failed: BTreeMap<u64, String> = self.root.read_state(FAILED).unwrap_or_default();
        failed.insert(n, why.to_owned());
        if let Err(e) = self.root.write_state(FAILED, &failed) {
            eprintln!("flotilla-agent: cannot record generation {n} as failed: {e}");
        }
    }

    /// A generation awaiting confirmation needs the one before it: nothing may delete it.
    fn refuse_while_pending(&self, what: &str) -> Result<(), AgentError> {
        match self.pending() {
            Some(p) => Err(AgentError::Conflict(format!("cannot {what} while generation {} awaits confirmation; try again once it is confirmed or rolled back", p.generation))),
            None => Ok(()),
        }
    }

    fn pending(&self) -> Option<Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ends the wait for a confirmation, in memory and on disk.
    fn take_pending(&self) -> Option<Pending> {
        let taken = self.pending.lock().unwrap_or_else(|p| p.into_inner()).take();
        if taken.is_some() {
            if let Err(e) = self.forget_pending_record() {
                eprintln!("flotilla-agent: {e}");
            }
        }
        taken
    }

    fn forget_pending_record(&self) -> Result<(), String> {
        match fs::remove_file(self.root.state_dir().join(PENDING)) {
            // Gone for good only once the directory is on disk: a power cut must not bring
            // back a record that undoes a kept generation.
            Ok(()) => fs::File::open(self.root.state_dir())
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("removed {PENDING}, but cannot sync its directory, so a power cut could bring it back: {e}")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove {PENDING}; a restarted agent would roll back a generation no longer pending: {e}")),
        }
    }

    /// Keeps a Nix GC root for each generation (`system-<N>`), the running system (`running`)
    /// and the agent's own store path (`agent`) in `/nix/var/nix/gcroots/flotilla/` when the
    /// machine has Nix, and no other; says what went wrong, if anything did.
    fn sync_gc_roots(&self) -> Option<String> {
        if !self.root.has_nix() {
            return None;
        }
        let dir = self.root.nix_gcroots_dir();
        let synced = (|| -> Result<(), String> {
            let mut want: BTreeMap<String, StorePath> = BTreeMap::new();
            for g in self.generations().map_err(|e| e.to_string())? {
                want.insert(format!("system-{}", g.number), g.toplevel);
            }
            want.extend(self.running_system().map(|t| ("running".to_owned(), t)));
            want.extend(agent_store_path(&self.root).map(|a| ("agent".to_owned(), a)));
            fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            for e in fs::read_dir(&dir).map_err(|e| e.to_string())?.flatten() {
                if !want.contains_key(e.file_name().to_string_lossy().as_ref()) {
                    fs::remove_file(e.path()).map_err(|e| e.to_string())?;
                }
            }
            for (name, target) in &want {
                symlink_atomic(Path::new(&target.to_absolute()), &dir.join(name)).map_err(|e| e.to_string())?;
            }
            Ok(())
        })();
        synced.err().map(|e| format!("cannot keep the Nix GC roots in {}, so Nix's garbage collector may delete what a generation needs: {e}", dir.display()))
    }

    /// The generation awaiting confirmation, if any.
    pub fn pending_confirmation(&self) -> Option<u64> {
        self.pending().map(|p| p.generation)
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
                self.forget_pending_record().map_err(AgentError::Conflict)?;
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

    /// When the generation awaiting confirmation runs out of time.
    pub fn confirmation_deadline(&self, generation: u64) -> Option<Instant> {
        self.pending().filter(|p| p.generation == generation).map(|p| p.deadline)
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

    /// The keys on the machine.
    pub fn list_keys(&self) -> Result<Vec<KeyState>, AgentError> {
        keys::list(&self.root)
    }

    /// Writes and deletes keys; restarts the running services that use a changed key and
    /// starts those whose keys are now all present.
    pub fn put_keys(&self, put: &[KeyUpload], remove: &[String]) -> Result<KeysApplied, AgentError> {
        let (written, removed) = keys::apply(&self.root, put, remove)?;
        let (mut restarted, mut started) = (Vec::new(), Vec::new());
        let Some(m) = self.running_system().and_then(|t| self.manifest(&t).ok()) else {
            return Ok(KeysApplied { written, removed, restarted, started });
        };
        let services = &m.system.system.services;
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let running: BTreeSet<String> = self.supervisor.running().into_iter().collect();
        let mut problems = Vec::new();
        for name in start_order(services) {
            let spec = &services[&name];
            if waiting.contains_key(&name) {
                match self.start_service(&name, spec, &m.system.keys) {
                    Ok(None) => started.push(name),
                    Ok(Some(_)) => {}
                    Err(e) => problems.push(e.to_string()),
                }
            } else if running.contains(&name) && spec.keys.iter().any(|k| written.contains(k)) {
                match self.supervisor.restart(&name, spec) {
                    Ok(()) => restarted.push(name),
                    Err(e) => problems.push(e.to_string()),
                }
            }
        }
        if !problems.is_empty() {
            return Err(AgentError::Conflict(format!("keys were written, but {}", problems.join("; "))));
        }
        Ok(KeysApplied { written, removed, restarted, started })
    }

    /// Bytes free on the filesystem of the machine's store.
    pub fn store_free_bytes(&self) -> Option<u64> {
        crate::machine::free_bytes(&self.root.store_dir()).ok()
    }

    /// Deletes generations (never the current one): all but the newest `keep_last`, and/or
    /// those older than `older_than_secs`.
    pub fn delete_generations(&self, keep_last: Option<u32>, older_than_secs: Option<u64>) -> Result<Vec<u64>, AgentError> {
        self.refuse_while_pending("delete generations")?;
        let gens = self.generations()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let keep_from = keep_last.map(|k| gens.len().saturating_sub(k as usize)).unwrap_or(0);
        let mut deleted = Vec::new();
        for (i, g) in gens.iter().enumerate() {
            let by_count = keep_last.is_some() && i < keep_from;
            let by_age = older_than_secs.is_some_and(|a| now.saturating_sub(g.created_unix) > a);
            let chosen = (keep_last.is_some() || older_than_secs.is_some()) && (keep_last.is_none() || by_count) && (older_than_secs.is_none() || by_age);
            if chosen && !g.current {
                fs::remove_file(self.gen_link(g.number)).map_err(io_err(format!("cannot delete generation {}", g.number)))?;
                deleted.push(g.number);
            }
        }
        if let Some(problem) = self.sync_gc_roots() {
            eprintln!("flotilla-agent: {problem}");
        }
        Ok(deleted)
    }

    /// Removes every store path no generation, no running system and not the running agent
    /// needs (the last matters where a systemd unit starts the agent from its store path).
    /// Paths of the machine's Nix are only unregistered: see [`MachineRoot::collect_garbage`].
    /// Returns the paths deleted and their NAR bytes.
    pub fn collect_garbage(&self) -> Result<(u64, u64), AgentError> {
        self.refuse_while_pending("collect garbage")?;
        let mut roots: Vec<StorePath> = self.generations()?.into_iter().map(|g| g.toplevel).collect();
        roots.extend(self.running_system());
        roots.extend(agent_store_path(&self.root));
        let live = self.root.closure(&roots);
        let collected = self.root.collect_garbage(&live).map_err(io_err("cannot collect garbage"))?;
        if collected.released > 0 {
            eprintln!("flotilla-agent: garbage collection left {} paths on disk for the machine's Nix to collect", collected.released);
        }
        Ok((collected.deleted, collected.bytes))
    }
}

fn list(gens: &[GenerationInfo]) -> String {
    if gens.is_empty() {
        return "none".into();
    }
    gens.iter().map(|g| g.number.to_string()).collect::<Vec<_>>().join(", ")
}

/// The first failed check, as the user reads it.
fn first_problem(health: &[HealthResult]) -> Option<String> {
    let bad = health.iter().find(|h| !h.healthy)?;
    let probes = if bad.probes == 1 { "1 probe".to_owned() } else { format!("{} probes", bad.probes) };
    Some(format!("health check of service {} ({}) failed after {probes}: {}", bad.service, bad.check, bad.output))
}
