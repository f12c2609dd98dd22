//! The fleet commands on machines the state DB knows: start, stop, reboot, destroy (under the
//! deployment's lock), and the read-only `info` and `check`, which never wait on it.

use std::path::Path;

use flotilla_model::Selection;
use flotilla_protocol::ServiceState;
use flotilla_state::MachineRecord;
use serde::Serialize;

use crate::deploy::{done, fan_out};
use crate::platform::{self, Machine, MachineState, PlatformError};
use crate::{Engine, EngineEvent, Listener, Phase, Result};

/// A lifecycle operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Start stopped machines.
    Start,
    /// Stop running machines (services stop cleanly first).
    Stop,
    /// Stop, then start.
    Reboot,
    /// Remove machines entirely.
    Destroy,
}

impl Operation {
    fn phase(self) -> Phase {
        match self {
            Operation::Start => Phase::Start,
            Operation::Stop => Phase::Stop,
            Operation::Reboot => Phase::Reboot,
            Operation::Destroy => Phase::Destroy,
        }
    }

    /// As users write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Start => "start",
            Operation::Stop => "stop",
            Operation::Reboot => "reboot",
            Operation::Destroy => "destroy",
        }
    }
}

/// One machine's result of an operation.
#[derive(Debug, Clone, Serialize)]
pub struct OperationResult {
    /// The machine.
    pub machine: String,
    /// Its state afterwards.
    pub state: MachineState,
    /// Why it failed.
    pub error: Option<String>,
}

/// What `info` says of a machine, live.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    /// The machine.
    pub machine: String,
    /// `platform.type`.
    pub platform: String,
    /// Its address.
    pub ip: Option<String>,
    /// running, stopped or missing.
    pub state: MachineState,
    /// The generation it runs (from its agent), or the one recorded when it cannot be asked.
    pub generation: Option<u64>,
    /// The generation the state DB recorded active.
    pub recorded_generation: Option<i64>,
    /// Services running.
    pub services_up: usize,
    /// Services it has.
    pub services_total: usize,
    /// healthy, degraded, down or unknown.
    pub health: String,
    /// What is wrong, if anything.
    pub problems: Vec<String>,
    /// Its tags.
    pub tags: Vec<String>,
    /// What it is made of on this host.
    pub resources: std::collections::BTreeMap<String, String>,
    /// Its recorded facts.
    pub facts: std::collections::BTreeMap<String, serde_json::Value>,
    /// The newest build recorded for it.
    pub last_build: Option<flotilla_state::GenerationRecord>,
}

impl Engine {
    /// The recorded machines of a deployment that `sel` picks, with their platform handles.
    pub fn fleet(&self, deployment: &str, sel: &Selection, agent: &Path) -> Result<Vec<(MachineRecord, Box<dyn Machine>)>> {
        let records = self.state.machines(deployment)?;
        let names: Vec<flotilla_model::MachineName> = records
            .iter()
            .map(|r| flotilla_model::MachineName::new(&r.name).map_err(|e| crate::EngineError::Config(vec![format!("state DB machine {}: {e}", r.name)])))
            .collect::<Result<_>>()?;
        let picked = sel.apply(names.iter().zip(&records).map(|(n, r)| (n, r.tags.as_slice())))?;
        let ctx = self.context(deployment, agent);
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for r in records.into_iter().filter(|r| picked.iter().any(|p| p.as_str() == r.name)) {
            let platform = serde_json::from_value(r.platform_spec.clone());
            match platform.map_err(|e| format!("machine {}: {e}", r.name)).and_then(|p| platform::machine(&ctx, &r.name, &p, &r.facts).map_err(|e| e.to_string())) {
                Ok(m) => out.push((r, m)),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(crate::EngineError::Config(errors));
        }
        Ok(out)
    }

    /// Starts, stops, reboots or destroys the picked machines, in parallel, under the lock.
    pub fn operate(&mut self, deployment: &str, sel: &Selection, op: Operation, agent: &Path, parallel: usize, listen: Listener<'_>) -> Result<Vec<OperationResult>> {
        let _lock = self.lock(deployment, op.as_str(), listen)?;
        let fleet = self.fleet(deployment, sel, agent)?;
        let machines: Vec<&dyn Machine> = fleet.iter().map(|(_, m)| m.as_ref()).collect();
        let results = fan_out(&machines, parallel, listen, |m, send| {
            send(EngineEvent::MachinePhase { machine: m.name().to_owned(), phase: op.phase() });
            let r = match op {
                Operation::Start => m.start(),
                Operation::Stop => m.stop(),
                Operation::Reboot => m.stop().and_then(|()| m.start()),
                Operation::Destroy => m.destroy(),
            };
            let state = m.state();
            send(done(m.name(), op.phase(), r.as_ref().map(|()| state.as_str()).map_err(|e| e.message.as_str())));
            OperationResult { machine: m.name().to_owned(), state, error: r.err().map(|PlatformError { message, .. }| message) }
        });
        for r in &results {
            match (&r.error, op) {
                (None, Operation::Destroy) => {
                    self.state.remove_machine(deployment, &r.machine, &self.actor)?;
                    crate::gcroots::Roots::new(self.state.path(), deployment).remove(&r.machine);
                }
                (None, _) => self.event(deployment, Some(&r.machine), op.as_str(), "ok", r.state.as_str())?,
                (Some(e), _) => self.event(deployment, Some(&r.machine), op.as_str(), "failed", e)?,
            }
        }
        Ok(results)
    }

    /// Each picked machine as it is now: asked of its platform and its agent.
    pub fn info(&self, deployment: &str, sel: &Selection, agent: &Path) -> Result<Vec<MachineInfo>> {
        let fleet = self.fleet(deployment, sel, agent)?;
        let mut out = Vec::new();
        for (record, m) in &fleet {
            let recorded = self.state.active_generation(deployment, &record.name)?;
            let mut info = MachineInfo {
                machine: record.name.clone(),
                platform: record.platform.clone(),
                ip: record.facts.get("ip").and_then(|v| v.as_str()).map(str::to_owned),
                state: m.state(),
                generation: None,
                recorded_generation: recorded.as_ref().and_then(|g| g.number),
                services_up: 0,
                services_total: 0,
                health: "down".into(),
                problems: Vec::new(),
                tags: record.tags.clone(),
                resources: m.resources(),
                facts: record.facts.clone(),
                last_build: record.last_build.clone(),
            };
            if info.state != MachineState::Running {
                info.problems.push(format!("machine is {}", info.state.as_str()));
                out.push(info);
                continue;
            }
            match m.connect().and_then(|mut c| c.status()) {
                Ok(status) => {
                    info.generation = status.generation;
                    info.services_total = status.services.len();
                    info.services_up = status.services.iter().filter(|s| s.state == ServiceState::Running).count();
                    for s in status.services.iter().filter(|s| s.state != ServiceState::Running) {
                        info.problems.push(format!("service {} is {}", s.name, s.state));
                    }
                    if let (Some(live), Some(rec)) = (info.generation, info.recorded_generation) {
                        if live as i64 != rec {
                            info.problems.push(format!("runs generation {live}, but generation {rec} was deployed"));
                        }
                    }
                    if status.generation.is_none() {
                        info.problems.push("no system deployed yet".into());
                    }
                    info.health = if info.problems.is_empty() { "healthy" } else { "degraded" }.into();
                }
                Err(e) => {
                    info.health = "unknown".into();
                    info.problems.push(format!("agent unreachable: {e}"));
                }
            }
            out.push(info);
        }
        Ok(out)
    }

    /// Compares each picked machine's live state with what was deployed, and records every
    /// difference (drift) in the ledger.
    pub fn check(&mut self, deployment: &str, sel: &Selection, agent: &Path) -> Result<Vec<MachineInfo>> {
        let infos = self.info(deployment, sel, agent)?;
        for i in &infos {
            if i.problems.is_empty() {
                self.event(deployment, Some(&i.machine), "check", "ok", "as deployed")?;
            } else {
                self.event(deployment, Some(&i.machine), "check", "drift", &i.problems.join("; "))?;
            }
        }
        Ok(infos)
    }
}
