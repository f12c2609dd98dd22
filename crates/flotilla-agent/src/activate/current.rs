//! Whether a deploy would leave the machine exactly as it is ([`Agent::differs`]): the
//! deployer's first question, so that a machine with nothing to do costs a deploy one round
//! trip and none of the work only a change needs (the copy's query, the activation's
//! comparison, health checks, a confirmation, the keys' listing).
//!
//! The answer is "nothing to do" only when every part of what a deploy would establish holds
//! already: the toplevel runs and is the current generation, nothing awaits confirmation or
//! is left of an unfinished activation, every declared service runs (a stopped, failed or
//! waiting one is the deploy's to start), and the keys are exactly the declared ones with
//! their contents, owners and modes. Anything else, and the deploy goes step by step as for a
//! change; what it finds unchanged it still reports unchanged.

use std::collections::BTreeMap;

use flotilla_protocol::{ActivationGoal, KeyState, ServiceState};
use flotilla_store::StorePath;

use super::confirm::PENDING;
use crate::activate::Agent;

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
        let states: BTreeMap<String, ServiceState> = self.service_status().into_iter().map(|s| (s.name, s.state)).collect();
        for name in manifest.system.system.services.keys() {
            match states.get(name) {
                Some(ServiceState::Running) => {}
                Some(state) => return Some(format!("service {name} is {state}")),
                None => return Some(format!("service {name} is not supervised")),
            }
        }
        if let Some(extra) = states.keys().find(|n| !manifest.system.system.services.contains_key(*n)) {
            return Some(format!("service {extra} runs and is not declared"));
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
