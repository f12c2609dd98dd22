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
    /// Reboot what the machine runs on (an ssh host), then start it.
    HardReboot,
    /// Remove machines entirely.
    Destroy,
    /// Remove from the state machines whose host is gone for good, doing nothing on it.
    Forget,
}

impl Operation {
    fn phase(self) -> Phase {
        match self {
            Operation::Start => Phase::Start,
            Operation::Stop => Phase::Stop,
            Operation::Reboot | Operation::HardReboot => Phase::Reboot,
            Operation::Destroy | Operation::Forget => Phase::Destroy,
        }
    }

    /// As users write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Start => "start",
            Operation::Stop => "stop",
            Operation::Reboot => "reboot",
            Operation::HardReboot => "reboot --hard",
            Operation::Destroy => "destroy",
            Operation::Forget => "destroy --forget",
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

/// One machine's result of `rollback`.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackResult {
    /// The machine.
    pub machine: String,
    /// The generation it ran.
    pub from: Option<u64>,
    /// The generation it runs now.
    pub to: Option<u64>,
    /// The system it runs now.
    pub toplevel: Option<flotilla_store::StorePath>,
    /// It was stopped: its profile was switched from outside, and it boots `to` when it
    /// starts.
    pub stopped: bool,
    /// Why it failed.
    pub error: Option<String>,
}

/// One machine's result of `upload-keys`.
#[derive(Debug, Clone, Serialize)]
pub struct KeysResult {
    /// The machine.
    pub machine: String,
    /// What was done.
    pub summary: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

fn gen(n: Option<u64>) -> String {
    n.map_or_else(|| "none".to_owned(), |n| n.to_string())
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
    /// Its services' health checks, probed once now.
    pub service_health: Vec<flotilla_protocol::HealthResult>,
    /// The newest build recorded for it.
    pub last_build: Option<flotilla_state::GenerationRecord>,
}

/// Whether `m` may be forgotten: only a machine its platform cannot reach or handle (or that
/// is gone already); one that still exists would be left running with nothing to reach it.
fn forgettable(m: &dyn Machine) -> std::result::Result<(), PlatformError> {
    match m.state() {
        MachineState::Unreachable | MachineState::Unusable | MachineState::Missing => Ok(()),
        state @ (MachineState::Running | MachineState::Stopped) => Err(PlatformError::refused(
            m.name(),
            format!("it is {} on its platform, so forgetting it would leave it behind; `flotilla destroy` without --forget removes it", state.as_str()),
        )),
    }
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
        for r in records.into_iter().filter(|r| picked.iter().any(|p| p.as_str() == r.name)) {
            // A machine this build cannot handle is one failed row of whatever command runs,
            // never the end of the command for every other machine.
            let machine = serde_json::from_value(r.platform_spec.clone())
                .map_err(|e| format!("its recorded platform options make no sense to this flotilla ({e}); `flotilla destroy --forget --on {}` removes it from the state", r.name))
                .and_then(|p| platform::machine(&ctx, &r.name, &p, &r.facts).map_err(PlatformError::into_message))
                .unwrap_or_else(|why| Box::new(platform::Unusable::new(&r.name, why)));
            out.push((r, machine));
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
                Operation::Reboot => m.reboot(false),
                Operation::HardReboot => m.reboot(true),
                Operation::Destroy => m.destroy(),
                Operation::Forget => forgettable(*m),
            };
            let state = m.state();
            send(done(m.name(), op.phase(), r.as_ref().map(|()| state.as_str()).map_err(PlatformError::message)));
            OperationResult { machine: m.name().to_owned(), state, error: r.err().map(PlatformError::into_message) }
        });
        for r in &results {
            match (&r.error, op) {
                (None, Operation::Destroy) => {
                    self.state.remove_machine(deployment, &r.machine, &self.actor)?;
                    crate::gcroots::Roots::new(self.state.path(), deployment).remove(&r.machine);
                }
                (None, Operation::Forget) => {
                    self.state.forget_machine(deployment, &r.machine, &self.actor)?;
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
                service_health: Vec::new(),
                last_build: record.last_build.clone(),
            };
            if info.state != MachineState::Running {
                info.problems.push(format!("machine is {}", info.state.as_str()));
                if info.state == MachineState::Unusable {
                    info.problems.extend(m.problems());
                }
                out.push(info);
                continue;
            }
            info.problems.extend(m.problems());
            match m.connect().and_then(|mut c| Ok((c.status()?, c.check_health()?))) {
                Ok((status, health)) => {
                    info.generation = status.generation;
                    info.services_total = status.services.len();
                    info.services_up = status.services.iter().filter(|s| s.state == ServiceState::Running).count();
                    for s in status.services.iter().filter(|s| s.state != ServiceState::Running) {
                        match s.state {
                            ServiceState::Waiting => info.problems.push(format!("service {} waits for keys {}; `flotilla upload-keys` sends them", s.name, s.waiting_for.join(", "))),
                            _ => info.problems.push(format!("service {} is {}", s.name, s.state)),
                        }
                    }
                    for h in health.iter().filter(|h| !h.healthy) {
                        info.problems.push(format!("service {} fails its health check ({}): {}", h.service, h.check, h.output));
                    }
                    info.service_health = health;
                    if let Some(g) = status.pending_confirmation {
                        info.problems.push(format!("generation {g} awaits confirmation"));
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

    /// Rolls the picked machines back, in parallel, under the lock: to generation `to`, or
    /// each to the generation before its current one. Records what each runs now.
    pub fn rollback(&mut self, deployment: &str, sel: &Selection, to: Option<u64>, agent: &Path, parallel: usize, listen: Listener<'_>) -> Result<Vec<RollbackResult>> {
        let _lock = self.lock(deployment, "rollback", listen)?;
        let fleet = self.fleet(deployment, sel, agent)?;
        let machines: Vec<&dyn Machine> = fleet.iter().map(|(_, m)| m.as_ref()).collect();
        listen(&EngineEvent::PhaseStarted { phase: Phase::Rollback, machines: machines.iter().map(|m| m.name().to_owned()).collect() });
        let results = fan_out(&machines, parallel, listen, |m, send| {
            send(EngineEvent::MachinePhase { machine: m.name().to_owned(), phase: Phase::Rollback });
            let mut r = RollbackResult { machine: m.name().to_owned(), from: None, to: None, toplevel: None, stopped: false, error: None };
            let outcome = if m.state() == MachineState::Stopped {
                // Its agent is not there to ask (a bad release may be why it was stopped).
                m.set_boot_generation(to).map(|b| (r.from, r.to, r.toplevel, r.stopped) = (b.from, Some(b.to), Some(b.toplevel), true)).map_err(PlatformError::into_message)
            } else {
                (|| -> std::result::Result<(), crate::remote::RemoteError> {
                    let mut c = m.connect()?;
                    r.from = c.status()?.generation;
                    let (generation, _) = c.rollback(to, None)?;
                    r.to = Some(generation);
                    r.toplevel = c.status()?.toplevel;
                    Ok(())
                })()
                .map_err(|e| e.to_string())
            };
            if let Err(e) = outcome {
                r.error = Some(e);
            }
            let detail = match (&r.error, r.stopped) {
                (Some(e), _) => Err(e.as_str()),
                (None, true) => Ok("rolled back; it boots that generation when it starts"),
                (None, false) => Ok("rolled back"),
            };
            send(done(m.name(), Phase::Rollback, detail));
            r
        });
        let mut activations = Vec::new();
        let mut events = Vec::new();
        let messages: Vec<String> = results
            .iter()
            .map(|r| match r.stopped {
                true => format!("rolled back from generation {} to {} while stopped (its profile, from outside)", gen(r.from), gen(r.to)),
                false => format!("rolled back from generation {} to {}", gen(r.from), gen(r.to)),
            })
            .collect();
        let toplevels: Vec<Option<String>> = results.iter().map(|r| r.toplevel.as_ref().map(|t| t.to_absolute())).collect();
        for ((r, message), top) in results.iter().zip(&messages).zip(&toplevels) {
            match (&r.error, r.to, top) {
                (None, Some(n), Some(top)) => activations.push(flotilla_state::Activation { machine: &r.machine, toplevel: top, number: n as i64, message }),
                (Some(e), _, _) => events.push(self.ledger_entry(deployment, Some(&r.machine), "rollback", "failed", e)),
                _ => events.push(self.ledger_entry(deployment, Some(&r.machine), "rollback", "ok", message)),
            }
        }
        self.state.record_deploy(deployment, &self.actor, &activations, &events)?;
        Ok(results)
    }

    /// One machine's generations, as its agent lists them.
    pub fn generations(&self, deployment: &str, machine: &str, agent: &Path) -> Result<Vec<flotilla_protocol::GenerationInfo>> {
        let fleet = self.fleet(deployment, &Selection::parse(machine), agent)?;
        let Some((_, m)) = fleet.into_iter().find(|(r, _)| r.name == machine) else {
            return Err(crate::EngineError::Config(vec![format!("deployment {deployment} has no machine {machine}; `flotilla info` lists them")]));
        };
        let generations = m.connect().and_then(|mut c| c.generations()).map_err(|e| crate::EngineError::Config(vec![format!("machine {machine}: {e}")]))?;
        Ok(generations)
    }

    /// Sends the keys of the selected machines of `ev` that differ from what each machine
    /// has, and deletes the keys no longer declared; under the lock.
    pub fn upload_keys(&mut self, ev: &crate::Evaluated, selected: &[flotilla_model::MachineName], agent: &Path, parallel: usize, listen: Listener<'_>) -> Result<Vec<KeysResult>> {
        if selected.is_empty() {
            return Ok(Vec::new());
        }
        let _lock = self.lock(ev.name.as_str(), "upload-keys", listen)?;
        let names: Vec<String> = selected.iter().map(ToString::to_string).collect();
        let fleet = self.fleet(ev.name.as_str(), &Selection::parse(&names.join(",")), agent)?;
        let work: Vec<(&dyn Machine, &flotilla_model::MachineConfig)> = fleet
            .iter()
            .filter_map(|(r, m)| Some((m.as_ref(), ev.machines.iter().find(|(n, _)| n.as_str() == r.name)?.1)))
            .collect();
        listen(&EngineEvent::PhaseStarted { phase: Phase::Keys, machines: work.iter().map(|(m, _)| m.name().to_owned()).collect() });
        let results = fan_out(&work, parallel, listen, |(m, cfg), send| {
            send(EngineEvent::MachinePhase { machine: m.name().to_owned(), phase: Phase::Keys });
            let r = crate::keys::resolve(m.name(), &cfg.keys).and_then(|keys| {
                match m.state() {
                    MachineState::Running => {}
                    MachineState::Unusable => return Err(m.problems().join("; ")),
                    state => return Err(format!("machine {} is {}; its keys are sent when it starts", m.name(), state.as_str())),
                }
                let mut c = m.connect().map_err(|e| e.to_string())?;
                crate::keys::sync(&mut c, &keys, None, true).map_err(|e| e.to_string())
            });
            let summary: std::result::Result<String, String> =
                r.map(|p| crate::keys::summary(&p)).map(|s| if s.is_empty() { "keys unchanged".to_owned() } else { s });
            send(done(m.name(), Phase::Keys, summary.as_ref().map(String::as_str).map_err(String::as_str)));
            KeysResult { machine: m.name().to_owned(), summary: summary.as_ref().ok().cloned(), error: summary.err() }
        });
        for r in &results {
            match &r.error {
                None => self.event(ev.name.as_str(), Some(&r.machine), "upload-keys", "ok", r.summary.as_deref().unwrap_or(""))?,
                Some(e) => self.event(ev.name.as_str(), Some(&r.machine), "upload-keys", "failed", e)?,
            }
        }
        Ok(results)
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
