//! The deployment engine: the pipeline of DESIGN.md, machine by machine.
//!
//! Evaluate (phase 1: platforms), plan facts, evaluate again with facts, check every machine
//! against the option schema, instantiate and realise the selected toplevels in one Nix call,
//! and record it all. A per-machine failure is a row in the report, never an early return;
//! an `Err` means the deployment as a whole could not run (bad input, Nix missing, ...), and
//! then nothing was built and nothing written to the state DB.

pub mod checks;
mod deadline;
pub mod deploy;
pub mod doctor;
pub mod facts;
pub mod fleet;
pub mod keys;
mod gcroots;
pub mod platform;
pub mod procfs;
pub mod remote;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_model::{
    check_against_schema, ConfigError, DeploymentName, MachineConfig, MachineName, Schema, Selection,
    SelectionError,
};
use flotilla_nix::{EvalArgs, Nix, NixError};
use flotilla_state::{DeploymentUpsert, MachineUpsert, State, StateError};
use flotilla_store::StorePath;
use serde::Serialize;
use serde_json::Value;

/// Why a command could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Nix failed (evaluation error, Nix missing).
    #[error(transparent)]
    Nix(#[from] NixError),
    /// The state DB failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Machines' configs are wrong; every problem found.
    #[error("{}", join_lines(.0))]
    Config(Vec<String>),
    /// `--on` matched nothing.
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// The agent binary is missing or unusable.
    #[error("{0}")]
    Agent(String),
    /// This host lacks what the selected machines' platforms need (`flotilla doctor` says
    /// all of it).
    #[error("{0}")]
    Host(String),
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn join_lines(v: &[String]) -> String {
    v.join("\n")
}

/// This crate's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// A step of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Creating or starting machines.
    Provision,
    /// Building toplevels.
    Build,
    /// Checking a machine can take the deploy: reachable, protocol, free disk.
    Preflight,
    /// Copying closures.
    Copy,
    /// Uploading keys.
    Keys,
    /// Activating generations (the agent checks their health).
    Activate,
    /// The deployer's own checks.
    Check,
    /// Confirming the new generation over a new connection.
    Confirm,
    /// Returning to an earlier generation.
    Rollback,
    /// Starting a machine.
    Start,
    /// Stopping a machine.
    Stop,
    /// Rebooting a machine.
    Reboot,
    /// Destroying a machine.
    Destroy,
}

impl Phase {
    /// The phase's name as users see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Provision => "provision",
            Phase::Build => "build",
            Phase::Preflight => "preflight",
            Phase::Copy => "copy",
            Phase::Keys => "keys",
            Phase::Activate => "activate",
            Phase::Check => "check",
            Phase::Confirm => "confirm",
            Phase::Rollback => "rollback",
            Phase::Start => "start",
            Phase::Stop => "stop",
            Phase::Reboot => "reboot",
            Phase::Destroy => "destroy",
        }
    }
}

/// Something the engine reports while it works; renderers, JSON printers and the ledger all
/// consume the same stream.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EngineEvent {
    /// A phase started, for some machines (all when empty).
    PhaseStarted {
        /// Which.
        phase: Phase,
        /// For which machines.
        machines: Vec<String>,
    },
    /// One machine entered a phase.
    MachinePhase {
        /// The machine.
        machine: String,
        /// The phase.
        phase: Phase,
    },
    /// How far a machine's copy is.
    CopyProgress {
        /// The machine.
        machine: String,
        /// NAR bytes sent.
        bytes: u64,
        /// NAR bytes to send.
        total_bytes: u64,
        /// Paths sent.
        paths: u64,
        /// Paths to send.
        total_paths: u64,
    },
    /// A machine activated a generation and rolls it back unless the deployer confirms it,
    /// over a new connection, in time.
    AwaitingConfirmation {
        /// The machine.
        machine: String,
        /// The generation.
        generation: u64,
        /// Seconds the agent waits.
        within_secs: u64,
    },
    /// Something the user should know that is not a failure.
    Note {
        /// What.
        message: String,
    },
    /// A line of Nix's build output.
    NixLog {
        /// The line.
        line: String,
    },
    /// One machine finished a phase.
    MachineDone {
        /// The machine.
        machine: String,
        /// The phase.
        phase: Phase,
        /// Whether it worked.
        ok: bool,
        /// The toplevel or the reason.
        detail: String,
    },
}

/// Where events go.
pub type Listener<'a> = &'a mut dyn FnMut(&EngineEvent);

/// A deployment file evaluated and checked.
#[derive(Debug, Clone)]
pub struct Evaluated {
    /// `meta.name`.
    pub name: DeploymentName,
    /// `meta.description`.
    pub description: String,
    /// The deployment file (absolute).
    pub file: PathBuf,
    /// The option schema it was checked against.
    pub schema: Schema,
    /// Each machine's checked config.
    pub machines: BTreeMap<MachineName, MachineConfig>,
    /// The facts it was evaluated with.
    pub facts: BTreeMap<MachineName, BTreeMap<String, Value>>,
}

impl Evaluated {
    /// The machines `sel` picks.
    pub fn select(&self, sel: &Selection) -> Result<Vec<MachineName>> {
        let it = self.machines.iter().map(|(n, c)| (n, c.tags.as_slice()));
        Ok(sel.apply(it)?.into_iter().collect())
    }

    /// The checked configs as JSON, with key material redacted: what `flotilla eval` prints.
    pub fn to_json(&self) -> Value {
        let machines: serde_json::Map<String, Value> = self
            .machines
            .iter()
            .map(|(n, c)| {
                let mut c = c.clone();
                for k in c.keys.values_mut() {
                    *k = k.redacted();
                }
                (n.to_string(), serde_json::to_value(&c).expect("config serialises"))
            })
            .collect();
        serde_json::json!({
            "name": self.name,
            "description": self.description,
            "machines": machines,
            "facts": self.facts,
        })
    }
}

/// One machine's build result.
#[derive(Debug, Clone, Serialize)]
pub struct MachineBuild {
    /// The machine.
    pub machine: String,
    /// Its toplevel, when built.
    pub toplevel: Option<StorePath>,
    /// Why not, when not.
    pub error: Option<String>,
}

/// The outcome of `build`.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    /// The deployment.
    pub deployment: String,
    /// Per machine.
    pub machines: Vec<MachineBuild>,
    /// Wall time.
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
    /// The built toplevels' closure, references first, when it was read while building.
    #[serde(skip)]
    pub closure: Option<Vec<flotilla_nix::PathInfo>>,
}

pub(crate) fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

impl BuildReport {
    /// Whether every machine built.
    pub fn all_ok(&self) -> bool {
        self.machines.iter().all(|m| m.error.is_none())
    }
}

/// The engine: Nix, the state DB and who is acting.
pub struct Engine {
    nix: Nix,
    state: State,
    actor: String,
}

impl Engine {
    /// An engine over a Nix handle and an open state DB; `actor` is recorded in the ledger.
    pub fn new(nix: Nix, state: State, actor: String) -> Engine {
        Engine { nix, state, actor }
    }

    /// The state DB.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Evaluates and checks a deployment file. Nothing is written anywhere.
    pub fn evaluate(&self, file: &Path) -> Result<Evaluated> {
        let file = resolve_file(file)?;
        let mut args = EvalArgs { deployment: &file, facts_json: "{}".into(), agent: None, only: vec![] };
        // Phase 1: names and platforms, without facts.
        let phase1 = self.nix.eval_json("phase1", &args, false)?;
        let planned = self.plan(&file, &phase1)?;
        // Phase 2: full configs with facts.
        args.facts_json = serde_json::to_string(&planned.facts).expect("facts serialise");
        let configs = self.nix.eval_json("configs", &args, false)?;
        planned.check(file, &configs)
    }

    /// Evaluates and checks a deployment file and, when its facts are already known (it was
    /// evaluated before and nothing moved), instantiates every machine's toplevel in the same
    /// single Nix call. Otherwise, or if that call fails, it is [`Engine::evaluate`], and the
    /// toplevels are left to [`Engine::build`].
    pub fn evaluate_for_build(&self, file: &Path, agent: &Path) -> Result<(Evaluated, Option<Toplevels>)> {
        let abs = resolve_file(file)?;
        let known = self.state.deployments()?.into_iter().find(|d| d.file.as_deref() == Some(&*abs.to_string_lossy()));
        if let Some(dep) = known {
            let stored = self.state.facts(&dep.name)?;
            let args = EvalArgs {
                deployment: &abs,
                facts_json: serde_json::to_string(&stored).expect("facts serialise"),
                agent: Some(agent),
                only: vec![],
            };
            if let Ok(all) = self.nix.eval_json("everything", &args, true) {
                let planned = self.plan(&abs, &all["phase1"])?;
                let same = planned.facts.iter().all(|(m, f)| stored.get(m.as_str()) == Some(f));
                if same {
                    let toplevels: Option<Toplevels> = serde_json::from_value(all["toplevels"].clone()).ok();
                    let ev = planned.check(abs, &all["configs"])?;
                    return Ok((ev, toplevels));
                }
            }
        }
        Ok((self.evaluate(&abs)?, None))
    }

    /// Reads phase 1 and plans facts: everything about a deployment but its configs.
    fn plan(&self, file: &Path, phase1: &Value) -> Result<Planned> {
        let raw_name = phase1.get("name").and_then(Value::as_str).ok_or_else(|| {
            EngineError::Config(vec![format!(
                "{}: the deployment sets no `meta.name`; add `meta.name = \"my-fleet\";` (it names the deployment in the state DB)",
                file.display()
            )])
        })?;
        let name = DeploymentName::new(raw_name).map_err(|e| EngineError::Config(vec![format!("option `meta.name`: {e}")]))?;
        let description = phase1.get("description").and_then(Value::as_str).unwrap_or("").to_owned();
        let schema: Schema = serde_json::from_value(phase1["options"].clone())
            .map_err(|e| EngineError::Nix(NixError::Output { command: "eval.nix phase1".into(), detail: format!("option schema: {e}") }))?;

        let mut errors = Vec::new();
        let mut platforms = BTreeMap::new();
        let empty = serde_json::Map::new();
        let machines1 = phase1.get("machines").and_then(Value::as_object).unwrap_or(&empty);
        if machines1.is_empty() {
            errors.push(format!("deployment {name}: `machines` is empty; declare at least one machine"));
        }
        for (raw, m) in machines1 {
            let machine = match MachineName::new(raw) {
                Ok(n) => n,
                Err(e) => {
                    errors.push(format!("machine {raw}: {e}"));
                    continue;
                }
            };
            // A platform that does not parse is reported, with its option path, by the full
            // check after phase 2; until then the machine simply gets no planned facts.
            let platform_value = m.get("platform").cloned().unwrap_or(Value::Null);
            if let Ok(p) = serde_json::from_value(platform_value) {
                platforms.insert(machine, p);
            }
        }

        let stored = self.state.facts(name.as_str())?;
        let facts = match facts::plan(&platforms, &stored) {
            Ok(f) => f,
            Err(e) => {
                errors.extend(e);
                BTreeMap::new()
            }
        };
        if !errors.is_empty() {
            return Err(EngineError::Config(errors));
        }
        Ok(Planned { name, description, schema, facts })
    }

    /// Builds the selected machines' toplevels in one Nix call and records the deployment,
    /// its machines, facts and builds. Machines that fail to build are reported, not fatal.
    pub fn build(&mut self, ev: &Evaluated, selected: &[MachineName], agent: &Path, listen: Listener<'_>) -> Result<BuildReport> {
        self.build_instantiated(ev, selected, agent, None, listen)
    }

    /// [`Engine::build`], with the toplevels [`Engine::evaluate_for_build`] may already have
    /// instantiated.
    pub fn build_instantiated(&mut self, ev: &Evaluated, selected: &[MachineName], agent: &Path, instantiated: Option<Toplevels>, listen: Listener<'_>) -> Result<BuildReport> {
        let start = Instant::now();
        check_agent(agent)?;
        let only: Vec<String> = selected.iter().map(ToString::to_string).collect();
        listen(&EngineEvent::PhaseStarted { phase: Phase::Build, machines: only.clone() });
        let toplevels: Toplevels = match instantiated {
            Some(all) => all.into_iter().filter(|(m, _)| only.contains(m)).collect(),
            None => {
                let args = EvalArgs {
                    deployment: &ev.file,
                    facts_json: serde_json::to_string(&ev.facts).expect("facts serialise"),
                    agent: Some(agent),
                    only,
                };
                serde_json::from_value(self.nix.eval_json("toplevels", &args, true)?)
                    .map_err(|e| NixError::Output { command: "eval.nix toplevels".into(), detail: e.to_string() })?
            }
        };

        // A host that cannot build at all says so once, with the fix, rather than as every
        // machine's build failure, and before anything is written (a toplevel not on disk
        // needs building; which ones do, the closure query below says exactly).
        if toplevels.values().any(|t| !Path::new(&t.out.to_absolute()).exists()) {
            self.nix.check_build_setup()?;
        }

        // Roots first: a GC running while we build must not take what we are building.
        let roots = gcroots::Roots::new(self.state.path(), ev.name.as_str());
        for (machine, t) in &toplevels {
            roots.set(machine, &t.out)?;
        }

        // When every toplevel is valid already, their closure's metadata is the proof, and
        // nothing needs realising; the copy needs that metadata anyway.
        let outs: Vec<StorePath> = toplevels.values().map(|t| t.out.clone()).collect();
        let closure = self.nix.closure_info(&outs)?;
        let outcome = match closure {
            Some(_) => flotilla_nix::RealiseOutcome::default(),
            None => {
                let drvs: Vec<StorePath> = toplevels.values().map(|t| t.drv.clone()).collect();
                self.nix.realise(&drvs, &mut |line| listen(&EngineEvent::NixLog { line: line.to_owned() }))?
            }
        };
        for note in &outcome.notes {
            listen(&EngineEvent::Note { message: note.clone() });
        }

        let mut results = Vec::new();
        for machine in selected {
            let Some(t) = toplevels.get(machine.as_str()) else { continue };
            let built = Path::new(&t.out.to_absolute()).exists();
            let error = if built {
                None
            } else {
                Some(self.failure_reason(&t.drv, &outcome.errors))
            };
            listen(&EngineEvent::MachineDone {
                machine: machine.to_string(),
                phase: Phase::Build,
                ok: built,
                detail: error.clone().unwrap_or_else(|| t.out.to_string()),
            });
            results.push(MachineBuild { machine: machine.to_string(), toplevel: built.then(|| t.out.clone()), error });
        }

        self.record(ev, &toplevels, &results)?;
        Ok(BuildReport { deployment: ev.name.to_string(), machines: results, elapsed: start.elapsed(), closure })
    }

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
                        flotilla_state::format_time(h.since),
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
                    flotilla_state::format_time(h.since),
                ))
            }
        })?)
    }

    /// What platforms need to know to act for `deployment`.
    pub fn context(&self, deployment: &str, agent: &Path) -> platform::Context {
        platform::Context { state_path: self.state.path().to_owned(), deployment: deployment.to_owned(), agent: agent.to_owned() }
    }

    /// Appends a ledger event.
    pub fn event(&mut self, deployment: &str, machine: Option<&str>, kind: &str, status: &str, message: &str) -> Result<()> {
        let e = self.ledger_entry(deployment, machine, kind, status, message);
        self.state.add_event(&e)?;
        Ok(())
    }

    /// A ledger event by this engine's actor, now.
    pub(crate) fn ledger_entry(&self, deployment: &str, machine: Option<&str>, kind: &str, status: &str, message: &str) -> flotilla_state::Event {
        flotilla_state::Event {
            deployment: deployment.to_owned(),
            machine: machine.map(str::to_owned),
            at: flotilla_state::now(),
            actor: self.actor.clone(),
            kind: kind.to_owned(),
            status: status.to_owned(),
            message: message.to_owned(),
            details: None,
        }
    }

    /// Forgets a deployment: its state DB records (the ledger keeps its events) and the GC
    /// roots of its builds. Returns whether the state DB knew it. Refused while any of its
    /// machines exists: forgetting them would leave them running with nothing to reach them.
    pub fn delete(&mut self, name: &str, agent: &Path) -> Result<bool> {
        let _lock = self.lock(name, "delete", &mut |_| {})?;
        if self.state.deployment(name)?.is_some() {
            let existing: Vec<String> = self
                .fleet(name, &Selection::parse(""), agent)?
                .iter()
                .filter(|(_, m)| m.state() != platform::MachineState::Missing)
                .map(|(r, _)| r.name.clone())
                .collect();
            if !existing.is_empty() {
                return Err(EngineError::Config(vec![format!(
                    "deployment {name} still has machines ({}); run `flotilla destroy -d {name} --yes` first",
                    existing.join(", ")
                )]));
            }
        }
        let existed = self.state.delete_deployment(name, &self.actor)?;
        gcroots::Roots::new(self.state.path(), name).remove_all()?;
        Ok(existed)
    }

    fn failure_reason(&self, drv: &StorePath, errors: &[String]) -> String {
        let closure = self.nix.drv_closure(drv).unwrap_or_default();
        let mine: Vec<&str> = errors
            .iter()
            .filter(|e| closure.iter().any(|d| e.contains(&d.to_absolute())))
            .map(String::as_str)
            .collect();
        let text = if mine.is_empty() { errors.join("\n") } else { mine.join("\n") };
        let text = text.trim();
        text.strip_prefix("error: ").unwrap_or(text).to_owned()
    }

    fn record(&mut self, ev: &Evaluated, toplevels: &BTreeMap<String, flotilla_nix::Toplevel>, results: &[MachineBuild]) -> Result<()> {
        let paths: Vec<(&str, String, String)> = results
            .iter()
            .filter_map(|r| Some((r.machine.as_str(), r.toplevel.as_ref()?.to_string(), toplevels.get(&r.machine)?.drv.to_string())))
            .collect();
        let builds: Vec<(&str, &str, &str)> = paths.iter().map(|(m, o, d)| (*m, o.as_str(), d.as_str())).collect();
        let failures: Vec<(&str, &str)> = results.iter().filter_map(|r| Some((r.machine.as_str(), r.error.as_deref()?))).collect();
        let (state, actor) = (&mut self.state, &self.actor);
        with_upserts(ev, |dep, machines| state.record_build_run(dep, machines, actor, &builds, &failures))?;
        Ok(())
    }
}

/// Every machine's instantiated toplevel, by machine name.
pub type Toplevels = BTreeMap<String, flotilla_nix::Toplevel>;

/// A deployment read as far as its facts.
struct Planned {
    name: DeploymentName,
    description: String,
    schema: Schema,
    facts: BTreeMap<MachineName, BTreeMap<String, Value>>,
}

impl Planned {
    /// Checks phase 2's configs against the schema and each other.
    fn check(self, file: PathBuf, configs: &Value) -> Result<Evaluated> {
        let mut errors = Vec::new();
        let mut machines = BTreeMap::new();
        let empty = serde_json::Map::new();
        for (raw, value) in configs.as_object().unwrap_or(&empty) {
            let Ok(machine) = MachineName::new(raw) else { continue };
            let found = check_against_schema(raw, &self.schema, value);
            if !found.is_empty() {
                errors.extend(found.iter().map(ConfigError::to_string));
                continue;
            }
            match serde_json::from_value::<MachineConfig>(value.clone()) {
                Ok(cfg) => {
                    errors.extend(cfg.check(raw).iter().map(ConfigError::to_string));
                    machines.insert(machine, cfg);
                }
                Err(e) => errors.push(format!("machine {raw}: {e} (the option schema and flotilla disagree: please report this)")),
            }
        }
        if !errors.is_empty() {
            return Err(EngineError::Config(errors));
        }
        Ok(Evaluated { name: self.name, description: self.description, file, schema: self.schema, machines, facts: self.facts })
    }
}

fn resolve_file(file: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(file).map_err(|source| EngineError::Io { what: "cannot resolve", path: file.to_owned(), source })?;
    if !abs.is_file() {
        return Err(EngineError::Config(vec![format!(
            "deployment file {} does not exist; pass the file that defines your machines with -f",
            abs.display()
        )]));
    }
    Ok(abs)
}

/// Calls `f` with the state DB's view of an evaluation: the deployment and its machines with
/// their platforms, tags and facts.
fn with_upserts<R>(ev: &Evaluated, f: impl FnOnce(&DeploymentUpsert<'_>, &[MachineUpsert<'_>]) -> R) -> R {
    let file = ev.file.to_string_lossy();
    let specs: Vec<Value> = ev.machines.values().map(|c| serde_json::to_value(&c.platform).expect("serialises")).collect();
    let no_facts = BTreeMap::new();
    let upserts: Vec<MachineUpsert<'_>> = ev
        .machines
        .iter()
        .zip(&specs)
        .map(|((name, c), spec)| MachineUpsert {
            name: name.as_str(),
            platform: c.platform.kind(),
            platform_spec: spec,
            tags: &c.tags,
            facts: ev.facts.get(name).unwrap_or(&no_facts),
        })
        .collect();
    let dep = DeploymentUpsert { name: ev.name.as_str(), file: Some(&file), description: &ev.description };
    f(&dep, &upserts)
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

/// Refuses an agent that is missing or dynamically linked: it runs inside Nix builds and on
/// targets that have no libc of ours.
pub fn check_agent(agent: &Path) -> Result<()> {
    use std::io::Read as _;
    // The ELF header and program headers sit at the start of the file; 64 KiB covers them.
    let mut bytes = Vec::with_capacity(64 << 10);
    let read = std::fs::File::open(agent).and_then(|f| f.take(64 << 10).read_to_end(&mut bytes));
    read.map_err(|e| {
        EngineError::Agent(format!(
            "cannot read the agent binary {}: {e}; build it with `cargo build -p flotilla-agent` or point FLOTILLA_AGENT at it",
            agent.display()
        ))
    })?;
    if has_interpreter(&bytes) {
        return Err(EngineError::Agent(format!(
            "the agent binary {} is dynamically linked; build it statically (this repository's .cargo/config.toml does)",
            agent.display()
        )));
    }
    Ok(())
}

/// Whether an ELF64 little-endian file asks for a program interpreter (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return true; // not a 64-bit ELF: treat as unusable
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return true;
    };
    (0..phnum).any(|i| u32_at(phoff + i * phentsize) == Some(3))
}
