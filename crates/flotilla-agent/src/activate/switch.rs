//! Switching: making a toplevel the running system. [`Agent::switch_to`] reconciles the
//! machine with it: users and groups, `/etc`, `/bin/sh`, `/run/current-system`, and the
//! services (removed ones stop, changed ones restart, new ones start in `after` order, the
//! rest are left running). A service that needs a key not on the machine yet waits, and
//! starts when [`Agent::put_keys`] brings it. It neither adds generations nor decides whether
//! a switch is kept: that is [`super::generations`]'s and [`super::confirm`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_model::{start_order, KeySpec, ServiceSpec, SystemConfig};
use flotilla_protocol::{ActivationReport, KeyState, KeyUpload, ServiceState, ServiceStatus};
use flotilla_store::StorePath;

use super::Agent;
use crate::error::{io_err, AgentError};
use crate::machine::symlink_atomic;
use crate::supervisor::SupervisorError;
use crate::{etc, keys, users};

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

impl Agent {
    pub(super) fn start_current_system(&self) -> Vec<String> {
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

    /// Switches to the generation the `system` profile points at (nothing when there is none).
    pub(super) fn boot_current_generation(&self) -> Vec<String> {
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

    /// Starts a service, unless keys it needs are missing: then it waits, and the missing
    /// keys are returned.
    pub(super) fn start_service(&self, name: &str, spec: &ServiceSpec, key_specs: &BTreeMap<String, KeySpec>) -> Result<Option<Vec<String>>, SupervisorError> {
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

    /// Makes `toplevel` the running system: users, /etc, /bin/sh, services.
    pub(super) fn switch_to(&self, toplevel: &StorePath, new: &SystemConfig, dry: bool) -> Result<ActivationReport, AgentError> {
        let old_services: BTreeMap<String, ServiceSpec> = self
            .running_system()
            .and_then(|t| self.manifest(&t).ok())
            .map(|m| m.system.system.services)
            .unwrap_or_default();
        let running: BTreeSet<String> = self.supervisor.running().into_iter().collect();
        let new_services = &new.system.services;

        // The one comparison `flotilla plan` shows: this switch acts on exactly it.
        let changes = super::plan::services(&old_services, new_services, &running);
        let mut report = ActivationReport { dry_run: dry, ..Default::default() };
        report.services_stopped = changes.stopped;
        report.services_restarted = changes.restarted.into_iter().map(|(name, _)| name).collect();
        report.services_started = changes.started.into_iter().map(|(name, _)| name).collect();
        report.services_unchanged = changes.unchanged;
        let (to_stop, to_start) = (changes.to_stop, changes.to_start);

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

    /// The keys on the machine.
    pub fn list_keys(&self) -> Result<Vec<KeyState>, AgentError> {
        keys::list(&self.root)
    }

    /// Writes and deletes keys; restarts the running services that use a changed key and
    /// starts those whose keys are now all present. `switching_to` is the toplevel a switch
    /// activates right after: the services that switch stops or restarts anyway are left to
    /// it, so each starts once (the plan shows one restart).
    pub fn put_keys(&self, put: &[KeyUpload], remove: &[String], switching_to: Option<&StorePath>) -> Result<KeysApplied, AgentError> {
        let (written, removed) = keys::apply(&self.root, put, remove)?;
        let (mut restarted, mut started) = (Vec::new(), Vec::new());
        let Some(m) = self.running_system().and_then(|t| self.manifest(&t).ok()) else {
            return Ok(KeysApplied { written, removed, restarted, started });
        };
        let services = &m.system.system.services;
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let running: BTreeSet<String> = self.supervisor.running().into_iter().collect();
        let mut problems = Vec::new();
        // The one rule `flotilla plan` shows for keys: a running service that reads one restarts.
        let mut for_keys: BTreeSet<&String> = super::plan::restarted_for_keys(services, &running, &written).into_iter().collect();
        if let Some(next) = switching_to.filter(|t| self.root.is_valid(t)) {
            let next = self.manifest(next)?;
            // The same comparison the switch acts on: what it stops it restarts (or removes).
            let switch = super::plan::services(services, &next.system.system.services, &running);
            for_keys.retain(|name| !switch.to_stop.contains(name));
        }
        for name in start_order(services) {
            let spec = &services[&name];
            if waiting.contains_key(&name) {
                match self.start_service(&name, spec, &m.system.keys) {
                    Ok(None) => started.push(name),
                    Ok(Some(_)) => {}
                    Err(e) => problems.push(e.to_string()),
                }
            } else if for_keys.contains(&name) {
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
}
