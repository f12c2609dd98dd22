//! The comparison of a new system with the running one, and the plan made of it. It exists so
//! that what `flotilla plan` says is what a switch does: [`services`] decides which services
//! stop, restart and start, and [`super::switch`] acts on exactly that; [`restarted_for_keys`]
//! decides which services a new key restarts, and [`Agent::put_keys`] acts on exactly that.
//! A plan changes nothing: `/etc` and accounts are compared by their own `dry` runs.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_model::{start_order, ServiceSpec, SystemConfig};
use flotilla_protocol::{ActivationGoal, ServiceAction, ServicePlan, SystemPlan};
use flotilla_store::StorePath;

use super::Agent;
use crate::build_system::{Manifest, MANIFEST_VERSION};
use crate::error::AgentError;
use crate::machine::MachineRoot;
use crate::{etc, health, users};

/// What a switch does with the services, in the order it does it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ServiceChanges {
    /// Stopped first (removed or changed), dependents before what they are `after`.
    pub to_stop: Vec<String>,
    /// Then started (new, not running, or changed), in `after` order.
    pub to_start: Vec<String>,
    /// Removed services.
    pub stopped: Vec<String>,
    /// Changed services (by name), with what changed.
    pub restarted: Vec<(String, Vec<String>)>,
    /// New services, or ones the system had that are not running, with which.
    pub started: Vec<(String, Vec<String>)>,
    /// Left running as they are.
    pub unchanged: Vec<String>,
}

/// Compares the running system's services `old` with `new`; `running` are the services kept
/// up now. A service restarts when its definition differs in anything (and so when a store
/// path it uses changes).
pub(crate) fn services(old: &BTreeMap<String, ServiceSpec>, new: &BTreeMap<String, ServiceSpec>, running: &BTreeSet<String>) -> ServiceChanges {
    let mut c = ServiceChanges::default();
    for name in start_order(old).into_iter().rev() {
        match new.get(&name) {
            None => {
                c.stopped.push(name.clone());
                c.to_stop.push(name);
            }
            Some(spec) if spec != &old[&name] => {
                c.restarted.push((name.clone(), restart_reasons(&old[&name], spec)));
                c.to_stop.push(name);
            }
            Some(_) => {}
        }
    }
    for name in start_order(new) {
        if c.restarted.iter().any(|(n, _)| *n == name) {
            c.to_start.push(name);
        } else if !old.contains_key(&name) {
            c.started.push((name.clone(), vec!["new service".into()]));
            c.to_start.push(name);
        } else if !running.contains(&name) {
            c.started.push((name.clone(), vec!["not running now".into()]));
            c.to_start.push(name);
        } else {
            c.unchanged.push(name);
        }
    }
    c.restarted.sort();
    c
}

/// The running services of `services` that use a key in `written`: a new key restarts them.
pub(crate) fn restarted_for_keys<'a>(services: &'a BTreeMap<String, ServiceSpec>, running: &BTreeSet<String>, written: &[String]) -> Vec<&'a String> {
    services.iter().filter(|(name, spec)| running.contains(*name) && spec.keys.iter().any(|k| written.contains(k))).map(|(n, _)| n).collect()
}

/// What differs between two definitions of a service, in words: the fields, and the store
/// paths it uses (old → new).
pub(crate) fn restart_reasons(old: &ServiceSpec, new: &ServiceSpec) -> Vec<String> {
    let mut reasons = Vec::new();
    let plain = |s: &str| strip_hashes(s);
    let argv = |spec: &ServiceSpec| spec.command.iter().flatten().map(|a| plain(a)).collect::<Vec<_>>();
    if argv(old) != argv(new) {
        reasons.push("command changed".to_owned());
    }
    let vars: BTreeSet<&String> = old.environment.keys().chain(new.environment.keys()).collect();
    let changed: Vec<&str> = vars
        .into_iter()
        .filter(|k| old.environment.get(*k).map(|v| plain(v)) != new.environment.get(*k).map(|v| plain(v)))
        .map(String::as_str)
        .collect();
    if !changed.is_empty() {
        reasons.push(format!("environment changed: {}", changed.join(", ")));
    }
    if old.user != new.user || old.group != new.group {
        reasons.push("user or group changed".into());
    }
    if old.working_directory.as_deref().map(plain) != new.working_directory.as_deref().map(plain) {
        reasons.push("working directory changed".into());
    }
    if old.restart != new.restart {
        reasons.push("restart policy changed".into());
    }
    if old.after != new.after {
        reasons.push(format!("after order changed: [{}] -> [{}]", old.after.join(", "), new.after.join(", ")));
    }
    if old.keys != new.keys {
        reasons.push(format!("keys it reads changed: [{}] -> [{}]", old.keys.join(", "), new.keys.join(", ")));
    }
    if old.health_check != new.health_check {
        reasons.push("health check changed".into());
    }
    let (before, after) = (store_paths(old), store_paths(new));
    let gone: Vec<&StorePath> = before.difference(&after).collect();
    let came: Vec<&StorePath> = after.difference(&before).collect();
    for p in &came {
        match gone.iter().find(|g| g.name() == p.name()) {
            Some(g) => reasons.push(format!("store path {} changed ({} -> {})", p.name(), &g.hash_part()[..8], &p.hash_part()[..8])),
            None => reasons.push(format!("uses {}", p.name())),
        }
    }
    for g in gone.iter().filter(|g| !came.iter().any(|p| p.name() == g.name())) {
        reasons.push(format!("no longer uses {}", g.name()));
    }
    if reasons.is_empty() {
        reasons.push("definition changed".into());
    }
    reasons
}

/// The store paths a service's definition names (command, environment, working directory).
fn store_paths(spec: &ServiceSpec) -> BTreeSet<StorePath> {
    let texts = spec.command.iter().flatten().chain(spec.environment.values()).chain(spec.working_directory.iter()).chain(spec.health_check.iter().flat_map(|h| h.command.iter().flatten()));
    texts.flat_map(|t| find_store_paths(t)).collect()
}

/// Every store path named in `text`.
fn find_store_paths(text: &str) -> Vec<StorePath> {
    let prefix = format!("{}/", flotilla_store::STORE_DIR);
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(&prefix) {
        let tail = &rest[at..];
        let end = tail[prefix.len()..].find(|c: char| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c))).map_or(tail.len(), |e| e + prefix.len());
        if let Ok(p) = StorePath::parse(&tail[..end]) {
            out.push(p);
        }
        rest = &tail[end.max(1)..];
    }
    out
}

/// `text` with each store path taken out, so that what differs only by store paths
/// is said as the store paths that changed.
fn strip_hashes(text: &str) -> String {
    let mut s = text.to_owned();
    for p in find_store_paths(text) {
        s = s.replace(&p.to_absolute(), "/nix/store/…");
    }
    s
}

/// Reads a manifest's text as this agent reads the ones in its store.
pub(crate) fn parse_manifest(toplevel: &StorePath, text: &str) -> Result<Manifest, AgentError> {
    let m: Manifest = serde_json::from_str(text).map_err(|e| AgentError::BadRequest(format!("{toplevel} is not a flotilla system (manifest.json: {e})")))?;
    if m.flotilla_manifest != MANIFEST_VERSION {
        return Err(AgentError::BadRequest(format!(
            "{toplevel} has manifest version {}, this agent reads version {MANIFEST_VERSION}; deploy with a matching flotilla",
            m.flotilla_manifest
        )));
    }
    Ok(m)
}

/// The plan of switching `root` from `current` (the running system's toplevel and config, or
/// none) to `new`, `running` being the services up now and `keys_written` the keys the deploy
/// writes. The same comparisons a switch makes; nothing changes.
pub(crate) fn plan(root: &MachineRoot, current: Option<(&StorePath, &SystemConfig)>, running: &BTreeSet<String>, toplevel: &StorePath, new: &SystemConfig, keys_written: &[String]) -> Result<SystemPlan, AgentError> {
    let empty = BTreeMap::new();
    let old_services = current.map_or(&empty, |(_, c)| &c.system.services);
    let changes = services(old_services, &new.system.services, running);
    let mut out = SystemPlan { toplevel: current.map(|(t, _)| t.clone()), ..Default::default() };
    for name in &changes.to_stop {
        if changes.stopped.contains(name) {
            out.services.push(ServicePlan { name: name.clone(), action: ServiceAction::Stop, reasons: vec!["not in the new system".into()] });
        }
    }
    let mut restarted: BTreeMap<String, Vec<String>> = changes.restarted.into_iter().collect();
    // Keys are written before the switch (and after it, for `post-activation` ones): the running
    // services that read one restart then, as `put_keys` does it.
    for name in restarted_for_keys(old_services, running, keys_written) {
        if !new.system.services.contains_key(name) {
            continue;
        }
        let keys: Vec<&str> = old_services[name].keys.iter().filter(|k| keys_written.contains(k)).map(String::as_str).collect();
        let reason = format!("key {} changed", keys.join(", "));
        restarted.entry(name.clone()).or_default().push(reason);
    }
    let started: BTreeMap<String, Vec<String>> = changes.started.into_iter().collect();
    for name in start_order(&new.system.services) {
        if let Some(reasons) = restarted.remove(&name) {
            out.services.push(ServicePlan { name, action: ServiceAction::Restart, reasons });
        } else if let Some(reasons) = started.get(&name) {
            out.services.push(ServicePlan { name, action: ServiceAction::Start, reasons: reasons.clone() });
        }
    }
    let lookup = |name: &str, user: bool| users::lookup_id(root, name, user);
    let u = users::apply(root, &new.system.users, &new.system.groups, true)?;
    let e = etc::apply(root, &toplevel.to_absolute(), &new.system.files, &lookup, true)?;
    (out.users_added, out.users_removed) = (u.added, u.removed);
    (out.etc_added, out.etc_changed, out.etc_removed) = (e.added, e.changed, e.removed);
    out.health_checks = new.system.services.iter().filter_map(|(n, s)| Some(format!("{n}: {}", health::describe(s.health_check.as_ref()?)))).collect();
    if let Some((t, _)) = current {
        out.closure = root.closure(std::slice::from_ref(t)).into_iter().map(|p| {
            let size = root.registration(&p).map_or(0, |r| r.nar_size);
            (p, size)
        }).collect();
    }
    Ok(out)
}

/// The plan of a machine that runs nothing yet (it is not provisioned): `root` is an empty
/// directory standing for it, so everything is planned against nothing. `flotilla-agent plan`
/// runs this on the deployer, so a new machine's plan is made by the same code as any other's.
pub fn plan_empty(root: &std::path::Path, toplevel: &StorePath, manifest: &str, keys_written: &[String]) -> Result<SystemPlan, AgentError> {
    let new = parse_manifest(toplevel, manifest)?;
    let mut p = plan(&MachineRoot::new(root), None, &BTreeSet::new(), toplevel, &new.system, keys_written)?;
    p.next_generation = Some(1);
    Ok(p)
}

impl Agent {
    /// What activating `toplevel` for `goal` would change: its manifest is read from the
    /// store, or from `manifest` when the machine does not have it yet. Changes nothing.
    pub fn plan(&self, toplevel: &StorePath, manifest: Option<&str>, keys_written: &[String], goal: ActivationGoal) -> Result<SystemPlan, AgentError> {
        let new = match (self.root.is_valid(toplevel), manifest) {
            (true, _) => self.manifest(toplevel)?,
            (false, Some(text)) => parse_manifest(toplevel, text)?,
            (false, None) => return Err(AgentError::NotFound(format!("{toplevel} is not in the machine's store and the plan request carried no manifest of it"))),
        };
        let current = self.running_system().and_then(|t| Some((self.manifest(&t).ok()?, t)));
        let running: BTreeSet<String> = self.supervisor.running().into_iter().collect();
        let mut p = plan(&self.root, current.as_ref().map(|(m, t)| (t, &m.system)), &running, toplevel, &new.system, keys_written)?;
        p.generation = self.current_generation();
        // The number activation will give it, by the one rule activation uses.
        p.next_generation = Some(self.generation_for(toplevel, goal)?);
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cmd: &[&str]) -> ServiceSpec {
        serde_json::from_value(serde_json::json!({
            "command": cmd, "environment": {}, "user": "root", "group": null, "workingDirectory": null,
            "restart": "always", "after": [], "keys": [], "healthCheck": null
        }))
        .unwrap()
    }

    const OLD: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello-1.0/bin/hello";
    const NEW: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-hello-1.1/bin/hello";

    #[test]
    fn a_changed_store_path_is_the_reason_not_the_command() {
        let r = restart_reasons(&spec(&[OLD, "-p", "80"]), &spec(&[NEW, "-p", "80"]));
        assert_eq!(r, vec!["uses hello-1.1".to_owned(), "no longer uses hello-1.0".to_owned()]);
        let same_name = restart_reasons(&spec(&[OLD]), &spec(&["/nix/store/cccccccccccccccccccccccccccccccc-hello-1.0/bin/hello"]));
        assert_eq!(same_name, vec!["store path hello-1.0 changed (aaaaaaaa -> cccccccc)".to_owned()]);
        let cmd = restart_reasons(&spec(&[OLD, "-p", "80"]), &spec(&[OLD, "-p", "81"]));
        assert_eq!(cmd, vec!["command changed".to_owned()]);
    }

    #[test]
    fn services_stop_restart_start_and_stay_as_a_switch_does() {
        let old: BTreeMap<String, ServiceSpec> = [("a".into(), spec(&[OLD])), ("b".into(), spec(&[OLD])), ("c".into(), spec(&[OLD]))].into();
        let new: BTreeMap<String, ServiceSpec> = [("a".into(), spec(&[NEW])), ("b".into(), spec(&[OLD])), ("d".into(), spec(&[OLD]))].into();
        let running: BTreeSet<String> = ["a".into(), "b".into(), "c".into()].into();
        let c = services(&old, &new, &running);
        assert_eq!(c.stopped, vec!["c".to_owned()]);
        assert_eq!(c.restarted.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(c.started, vec![("d".to_owned(), vec!["new service".to_owned()])]);
        assert_eq!(c.unchanged, vec!["b".to_owned()]);
        let c = services(&old, &new, &["a".to_owned()].into());
        assert_eq!(c.started.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["b", "d"], "b is not running: it starts");
    }
}
