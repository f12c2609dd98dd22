//! Whether a deploy would leave the machine exactly as it is ([`Agent::differs`]): the
//! deployer's first question, so that a machine with nothing to do costs a deploy one round
//! trip and none of the work only a change needs (the copy's query, the activation's
//! comparison, health checks, a confirmation, the keys' listing).
//!
//! The answer is "nothing to do" only when every part of what a deploy would establish holds
//! already: the toplevel runs and is the current generation, nothing awaits confirmation or
//! is left of an unfinished activation, every declared service runs (a stopped, failed or
//! waiting one is the deploy's to start) and passes its health check probed once now, the
//! accounts and `/etc` are as the system declares them (the switch's own dry run), and the
//! keys are exactly the declared ones with their contents, owners and modes. The deployer's
//! own checks still run on the deployer. Anything else, and the deploy goes step by step as for a
//! change; what it finds unchanged it still reports unchanged.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_protocol::{ActivationGoal, KeyState};
use flotilla_store::StorePath;

use super::confirm::PENDING;
use crate::activate::Agent;
use crate::{etc, users};

impl Agent {
    /// Why a deploy activating `toplevel` with `goal`, leaving `keys` on the machine, still
    /// has work to do here; `None` when it has none. Changes nothing.
    pub fn differs(&self, toplevel: &StorePath, goal: ActivationGoal, keys: &[KeyState]) -> Option<String> {
        if goal != ActivationGoal::Switch {
            return Some(format!("a {goal} deploy activates in any case"));
        }
        if let Some(g) = self.pending_confirmation() {
            return Some(format!("generation {g} awaits confirmation"));
        }
        match self.running_system() {
            Some(running) if &running == toplevel => {}
            Some(running) => return Some(format!("it runs {running}")),
            None => return Some("it runs no system".into()),
        }
        match self.generation_for(toplevel, goal) {
            Ok(n) if Some(n) == self.current_generation() => {}
            Ok(_) | Err(_) => return Some("its boot default is another generation".into()),
        }
        if self.root.state_dir().join(PENDING).symlink_metadata().is_ok() {
            return Some("a record of an unfinished activation is left".into());
        }
        let manifest = match self.manifest(toplevel) {
            Ok(m) => m,
            Err(e) => return Some(e.to_string()),
        };
        // Services, by the switch's own rule: a declared service not running (stopped,
        // failed, waiting, or never started) is the deploy's to start; one starting or backing
        // off is left to its supervisor, as the switch leaves it, and is no difference.
        let running: BTreeSet<String> = self.supervisor.running().into_iter().collect();
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let declared = &manifest.system.system.services;
        if let Some(name) = declared.keys().find(|n| !running.contains(*n) || waiting.contains_key(*n)) {
            let state = self.service_status().into_iter().find(|s| &s.name == name).map_or("not started".to_owned(), |s| s.state.to_string());
            return Some(format!("service {name} is {state}"));
        }
        if let Some(extra) = running.iter().find(|n| !declared.contains_key(*n)) {
            return Some(format!("service {extra} runs and is not declared"));
        }
        // What else the switch reconciles: accounts and /etc, looked at without a change.
        let lookup = |name: &str, user: bool| users::lookup_id(&self.root, name, user);
        match users::apply(&self.root, &manifest.system.system.users, &manifest.system.system.groups, true) {
            Ok(u) if u.added.is_empty() && u.removed.is_empty() => {}
            Ok(_) => return Some("its accounts differ from the system's".into()),
            Err(e) => return Some(e.to_string()),
        }
        match etc::apply(&self.root, &toplevel.to_absolute(), &manifest.system.system.files, &lookup, true) {
            Ok(e) if e.added.is_empty() && e.changed.is_empty() && e.removed.is_empty() => {}
            Ok(_) => return Some("its /etc differs from the system's".into()),
            Err(e) => return Some(e.to_string()),
        }
        // The services pass their health checks, probed once now: a deploy of an unchanged
        // machine whose service is unhealthy fails, as it always has.
        if let Some(bad) = self.check_health().into_iter().find(|h| !h.healthy) {
            return Some(format!("service {} fails its health check ({})", bad.service, bad.output));
        }
        let have = match self.list_keys() {
            Ok(k) => k,
            Err(e) => return Some(e.to_string()),
        };
        let by_name = |v: &[KeyState]| -> BTreeMap<String, KeyState> { v.iter().map(|k| (k.name.clone(), k.clone())).collect() };
        let (have, want) = (by_name(&have), by_name(keys));
        if have != want {
            let name = want.keys().chain(have.keys()).find(|n| have.get(*n) != want.get(*n)).cloned().unwrap_or_default();
            return Some(format!("key {name} differs"));
        }
        None
    }
}
