//! Generations and activation: the heart of the agent on a machine.
//!
//! A generation is a link `nix/var/flotilla/profiles/system-<N>-link` to a toplevel; the
//! profile `system` points at the current one, and `/run/current-system` at the running
//! system. Each is switched by one atomic rename. Activation reconciles users, `/etc` and
//! services against the running system: removed services stop, changed ones restart (a
//! service changes when its definition, and so any store path it uses, changes), new ones
//! start in `after` order, and the rest are left running.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_model::{start_order, ServiceSpec, SystemConfig};
use flotilla_protocol::{ActivationGoal, ActivationReport, GenerationInfo};
use flotilla_store::StorePath;

use crate::build_system::{Manifest, MANIFEST_VERSION};
use crate::machine::{symlink_atomic, MachineRoot};
use crate::supervisor::Supervisor;
use crate::{etc, users};

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
    /// Activation could not complete.
    #[error("{0}")]
    Activation(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// The agent's view of one machine.
pub struct Agent {
    root: MachineRoot,
    supervisor: Arc<Supervisor>,
}

impl Agent {
    /// An agent for `root`, running services through `supervisor`.
    pub fn new(root: MachineRoot, supervisor: Arc<Supervisor>) -> Agent {
        Agent { root, supervisor }
    }

    /// The machine's root layout.
    pub fn root(&self) -> &MachineRoot {
        &self.root
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
    pub fn start_running_system(&self) -> Vec<String> {
        let Some(top) = self.running_system() else { return self.boot_current_generation() };
        let Ok(m) = self.manifest(&top) else { return vec![format!("cannot read the running system {top}")] };
        let mut errors = Vec::new();
        for name in start_order(&m.system.system.services) {
            if let Err(e) = self.supervisor.start(&name, &m.system.system.services[&name]) {
                errors.push(e.to_string());
            }
        }
        errors
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
        let dry = goal == ActivationGoal::DryActivate;
        let generation = match goal {
            ActivationGoal::Switch | ActivationGoal::Boot => self.add_generation(toplevel, dry)?,
            ActivationGoal::Test | ActivationGoal::DryActivate => self.current_generation().unwrap_or(0),
        };
        let report = match goal {
            ActivationGoal::Boot => ActivationReport { messages: vec![format!("generation {generation} becomes current at the next start")], ..Default::default() },
            _ => self.switch_to(toplevel, &new.system, dry)?,
        };
        Ok((generation, report))
    }

    /// Switches back to generation `to` (default: the one before the current).
    pub fn rollback(&self, to: Option<u64>) -> Result<(u64, ActivationReport), AgentError> {
        let gens = self.generations()?;
        let current = self.current_generation();
        let target = match to {
            Some(n) => gens.iter().find(|g| g.number == n).ok_or_else(|| {
                AgentError::NotFound(format!("generation {n} does not exist; generations: {}", list(&gens)))
            })?,
            None => gens
                .iter()
                .rev()
                .find(|g| current.is_none_or(|c| g.number < c))
                .ok_or_else(|| AgentError::NotFound(format!("no generation before the current one to roll back to; generations: {}", list(&gens))))?,
        };
        let m = self.manifest(&target.toplevel)?;
        symlink_atomic(Path::new(&format!("system-{}-link", target.number)), &self.root.profiles_dir().join("system"))
            .map_err(io_err("cannot switch the system profile"))?;
        let report = self.switch_to(&target.toplevel, &m.system, false)?;
        Ok((target.number, report))
    }

    /// Links a new generation for `toplevel` and makes it current, unless the current one
    /// already is `toplevel`.
    fn add_generation(&self, toplevel: &StorePath, dry: bool) -> Result<u64, AgentError> {
        let gens = self.generations()?;
        if let Some(cur) = gens.iter().find(|g| g.current) {
            if &cur.toplevel == toplevel {
                return Ok(cur.number);
            }
        }
        let n = gens.last().map(|g| g.number + 1).unwrap_or(1);
        if dry {
            return Ok(n);
        }
        symlink_atomic(Path::new(&toplevel.to_absolute()), &self.gen_link(n)).map_err(io_err("cannot link the new generation"))?;
        symlink_atomic(Path::new(&format!("system-{n}-link")), &self.root.profiles_dir().join("system"))
            .map_err(io_err("cannot switch the system profile"))?;
        Ok(n)
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
            let u = users::apply(&self.root, &new.system.users, &new.system.groups, true).map_err(io_err("cannot read users"))?;
            let e = etc::apply(&self.root, &toplevel.to_absolute(), &new.system.files, &lookup, true).map_err(io_err("cannot read /etc"))?;
            (report.users_added, report.users_removed) = (u.added, u.removed);
            (report.etc_added, report.etc_changed, report.etc_removed) = (e.added, e.changed, e.removed);
            return Ok(report);
        }

        for name in &to_stop {
            if let Err(e) = self.supervisor.stop(name) {
                report.messages.push(format!("stopping {name}: {e}"));
            }
        }
        let u = users::apply(&self.root, &new.system.users, &new.system.groups, false).map_err(io_err("cannot write /etc/passwd or /etc/group"))?;
        let e = etc::apply(&self.root, &toplevel.to_absolute(), &new.system.files, &lookup, false).map_err(io_err("cannot place /etc entries"))?;
        (report.users_added, report.users_removed) = (u.added, u.removed);
        (report.etc_added, report.etc_changed, report.etc_removed) = (e.added, e.changed, e.removed);
        report.messages.extend(e.messages);
        if let Some(sh) = &new.system.binsh {
            let bin = self.root.path("/bin");
            if fs::symlink_metadata(&bin).is_err() {
                fs::create_dir_all(&bin).map_err(io_err("cannot create /bin"))?;
            }
            symlink_atomic(Path::new(sh), &bin.join("sh")).map_err(io_err("cannot link /bin/sh"))?;
        }
        fs::create_dir_all(self.root.path("/run")).map_err(io_err("cannot create /run"))?;
        symlink_atomic(Path::new(&toplevel.to_absolute()), &self.root.path("/run/current-system"))
            .map_err(io_err("cannot switch /run/current-system"))?;

        let mut failed = Vec::new();
        for name in &to_start {
            if let Err(e) = self.supervisor.start(name, &new_services[name]) {
                failed.push(format!("{name}: {e}"));
            }
        }
        if !failed.is_empty() {
            return Err(AgentError::Activation(format!("services failed to start: {}", failed.join("; "))));
        }
        Ok(report)
    }

    /// Deletes generations (never the current one): all but the newest `keep_last`, and/or
    /// those older than `older_than_secs`.
    pub fn delete_generations(&self, keep_last: Option<u32>, older_than_secs: Option<u64>) -> Result<Vec<u64>, AgentError> {
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
        Ok(deleted)
    }

    /// Removes every store path no generation and no running system needs.
    pub fn collect_garbage(&self) -> Result<(u64, u64), AgentError> {
        let mut roots: Vec<StorePath> = self.generations()?.into_iter().map(|g| g.toplevel).collect();
        roots.extend(self.running_system());
        let live = self.root.closure(&roots);
        let mut removed = (0, 0);
        for p in self.root.valid_paths().map_err(io_err("cannot list the store registry"))? {
            if !live.contains(&p) {
                removed.1 += self.root.remove_path(&p).map_err(io_err(format!("cannot remove {p}")))?;
                removed.0 += 1;
            }
        }
        Ok(removed)
    }
}

fn list(gens: &[GenerationInfo]) -> String {
    if gens.is_empty() {
        return "none".into();
    }
    gens.iter().map(|g| g.number.to_string()).collect::<Vec<_>>().join(", ")
}
