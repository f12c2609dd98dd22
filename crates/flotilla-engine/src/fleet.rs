//! The fleet commands on machines the state DB knows: start, stop, reboot, destroy, rollback,
//! upload-keys (under the deployment's lock), `exec` with its ledger entries, the keys sent
//! again after a start, `delete`, and the read-only `info` and `check`, which never wait on
//! the lock. The CLI parses and renders; what happens to the machines is decided here.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use flotilla_model::{MachineName, Selection};
use flotilla_protocol::ServiceState;
use flotilla_state::MachineRecord;
use serde::Serialize;

use crate::jobs::{done, fan_out};
use crate::platform::{self, Machine, MachineState, PlatformError};
use crate::{Engine, EngineError, EngineEvent, Listener, Phase, Result};

/// A machine the state DB knows, with its platform handle.
pub struct FleetMachine {
    /// Its name, checked.
    pub name: MachineName,
    /// What the state DB records of it.
    pub record: MachineRecord,
    /// Its platform's handle (an unusable one when this build cannot handle it).
    pub machine: Box<dyn Machine>,
}

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
    /// Whether the machines run again afterwards, with nothing in memory: their keys have to
    /// be sent again ([`Engine::resend_keys`]).
    pub fn restarts(self) -> bool {
        matches!(self, Operation::Start | Operation::Reboot | Operation::HardReboot)
    }

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
    pub machine: MachineName,
    /// Its state afterwards.
    pub state: MachineState,
    /// Why it failed.
    pub error: Option<String>,
}

/// One machine's result of `rollback`.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackResult {
    /// The machine.
    pub machine: MachineName,
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
    pub machine: MachineName,
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
    pub machine: MachineName,
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
    /// The deployer host holding it (local and qemu machines), as recorded.
    pub host: Option<String>,
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
    pub fn fleet(&self, deployment: &str, sel: &Selection, agent: &Path) -> Result<Vec<FleetMachine>> {
        let records = self.state.machines(deployment)?;
        let names: Vec<MachineName> = records
            .iter()
            .map(|r| MachineName::new(&r.name).map_err(|e| EngineError::Config(vec![format!("state DB machine {}: {e}", r.name)])))
            .collect::<Result<_>>()?;
        let picked = sel.apply(names.iter().zip(&records).map(|(n, r)| (n, r.tags.as_slice())))?;
        let ctx = self.context(deployment, agent);
        let mut out = Vec::new();
        for (name, r) in names.into_iter().zip(records).filter(|(n, _)| picked.contains(n)) {
            // A machine this build cannot handle is one failed row of whatever command runs,
            // never the end of the command for every other machine.
            if let Some(why) = platform::held_elsewhere(&r.platform, r.host.as_deref()) {
                out.push(FleetMachine { machine: Box::new(platform::Unusable::new(&r.name, why)), name, record: r });
                continue;
            }
            let machine = serde_json::from_value(r.platform_spec.clone())
                .map_err(|e| format!("its recorded platform options make no sense to this flotilla ({e}); `flotilla destroy --forget --on {}` removes it from the state", r.name))
                .and_then(|p| platform::machine(&ctx, &r.name, &p, &r.facts).map_err(PlatformError::into_message))
                .unwrap_or_else(|why| Box::new(platform::Unusable::new(&r.name, why)));
            out.push(FleetMachine { name, record: r, machine });
        }
        Ok(out)
    }

    /// Starts, stops, reboots or destroys the picked machines, in parallel, under the lock.
    pub fn operate(&mut self, deployment: &str, sel: &Selection, op: Operation, agent: &Path, listen: Listener<'_>) -> Result<Vec<OperationResult>> {
        let lock = self.lock(deployment, op.as_str(), listen)?;
        let fleet = self.fleet(deployment, sel, agent)?;
        lock.check()?;
        let results = fan_out(&fleet, self.limits.provision, listen, |FleetMachine { name, machine: m, .. }, send| {
            send(EngineEvent::MachinePhase { machine: name.clone(), phase: op.phase() });
            let r = match op {
                Operation::Start => m.start(),
                Operation::Stop => m.stop(),
                Operation::Reboot => m.reboot(false),
                Operation::HardReboot => m.reboot(true),
                Operation::Destroy => m.destroy(),
                Operation::Forget => forgettable(m.as_ref()),
            };
            let state = m.state();
            send(done(name, op.phase(), r.as_ref().map(|()| state.as_str()).map_err(PlatformError::message)));
            OperationResult { machine: name.clone(), state, error: r.err().map(PlatformError::into_message) }
        });
        for r in &results {
            match (&r.error, op) {
                (None, Operation::Destroy) => {
                    self.state.remove_machine(deployment, r.machine.as_str(), &self.actor)?;
                    crate::gcroots::Roots::new(self.state.path(), deployment).remove(r.machine.as_str());
                }
                (None, Operation::Forget) => {
                    self.state.forget_machine(deployment, r.machine.as_str(), &self.actor)?;
                    crate::gcroots::Roots::new(self.state.path(), deployment).remove(r.machine.as_str());
                }
                (None, _) => self.event(deployment, Some(r.machine.as_str()), op.as_str(), "ok", r.state.as_str())?,
                (Some(e), _) => self.event(deployment, Some(r.machine.as_str()), op.as_str(), "failed", e)?,
            }
        }
        Ok(results)
    }

    /// Each picked machine as it is now: asked of its platform and its agent.
    pub fn info(&self, deployment: &str, sel: &Selection, agent: &Path) -> Result<Vec<MachineInfo>> {
        let fleet = self.fleet(deployment, sel, agent)?;
        let mut out = Vec::new();
        for FleetMachine { name, record, machine: m } in &fleet {
            let recorded = self.state.active_generation(deployment, name.as_str())?;
            let mut info = MachineInfo {
                machine: name.clone(),
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
                host: record.host.clone(),
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
    pub fn rollback(&mut self, deployment: &str, sel: &Selection, to: Option<u64>, agent: &Path, listen: Listener<'_>) -> Result<Vec<RollbackResult>> {
        let lock = self.lock(deployment, "rollback", listen)?;
        let fleet = self.fleet(deployment, sel, agent)?;
        lock.check()?;
        listen(&EngineEvent::PhaseStarted { phase: Phase::Rollback, machines: fleet.iter().map(|f| f.name.clone()).collect() });
        let results = fan_out(&fleet, self.limits.activate, listen, |FleetMachine { name, machine: m, .. }, send| {
            send(EngineEvent::MachinePhase { machine: name.clone(), phase: Phase::Rollback });
            let mut r = RollbackResult { machine: name.clone(), from: None, to: None, toplevel: None, stopped: false, error: None };
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
                .and_then(|()| match &r.toplevel {
                    // It boots the generation it runs now (for a platform that boots it itself).
                    Some(t) => m.now_runs(t).map_err(|e| format!("rolled back, but {}", e.message())),
                    None => Ok(()),
                })
            };
            if let Err(e) = outcome {
                r.error = Some(e);
            }
            let detail = match (&r.error, r.stopped) {
                (Some(e), _) => Err(e.as_str()),
                (None, true) => Ok("rolled back; it boots that generation when it starts"),
                (None, false) => Ok("rolled back"),
            };
            send(done(name, Phase::Rollback, detail));
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
                (None, Some(n), Some(top)) => activations.push(flotilla_state::Activation { machine: r.machine.as_str(), toplevel: top, number: n as i64, message }),
                (Some(e), _, _) => events.push(self.ledger_entry(deployment, Some(r.machine.as_str()), "rollback", "failed", e)),
                _ => events.push(self.ledger_entry(deployment, Some(r.machine.as_str()), "rollback", "ok", message)),
            }
        }
        self.state.record_deploy(deployment, &self.actor, &activations, &events)?;
        Ok(results)
    }

    /// One machine's generations, as its agent lists them.
    pub fn generations(&self, deployment: &str, machine: &str, agent: &Path) -> Result<Vec<flotilla_protocol::GenerationInfo>> {
        let fleet = self.fleet(deployment, &Selection::parse(machine), agent)?;
        let Some(FleetMachine { machine: m, .. }) = fleet.into_iter().find(|f| f.name.as_str() == machine) else {
            return Err(EngineError::Config(vec![format!("deployment {deployment} has no machine {machine}; `flotilla info` lists them")]));
        };
        let generations = m.connect().and_then(|mut c| c.generations()).map_err(|e| EngineError::Config(vec![format!("machine {machine}: {e}")]))?;
        Ok(generations)
    }

    /// Sends the keys of the selected machines of `ev` that differ from what each machine
    /// has, and deletes the keys no longer declared; under the lock.
    pub fn upload_keys(&mut self, ev: &crate::Evaluated, selected: &[MachineName], agent: &Path, listen: Listener<'_>) -> Result<Vec<KeysResult>> {
        if selected.is_empty() {
            return Ok(Vec::new());
        }
        let _lock = self.lock(ev.name.as_str(), "upload-keys", listen)?;
        let names: Vec<String> = selected.iter().map(ToString::to_string).collect();
        let fleet = self.fleet(ev.name.as_str(), &Selection::parse(&names.join(",")), agent)?;
        let work: Vec<(&FleetMachine, &flotilla_model::MachineConfig)> = fleet.iter().filter_map(|f| Some((f, ev.machines.get(&f.name)?))).collect();
        listen(&EngineEvent::PhaseStarted { phase: Phase::Keys, machines: work.iter().map(|(f, _)| f.name.clone()).collect() });
        let results = fan_out(&work, self.limits.activate, listen, |(FleetMachine { name, machine: m, .. }, cfg), send| {
            send(EngineEvent::MachinePhase { machine: name.clone(), phase: Phase::Keys });
            let r = crate::keys::resolve(m.name(), &cfg.keys).and_then(|keys| {
                match m.state() {
                    MachineState::Running => {}
                    MachineState::Unusable => return Err(m.problems().join("; ")),
                    state => return Err(format!("machine {} is {}; its keys are sent when it starts", m.name(), state.as_str())),
                }
                let mut c = m.connect().map_err(|e| e.to_string())?;
                crate::keys::sync(&mut c, &keys, None, true, None).map_err(|e| e.to_string())
            });
            let summary: std::result::Result<String, String> =
                r.map(|p| crate::keys::summary(&p)).map(|s| if s.is_empty() { "keys unchanged".to_owned() } else { s });
            send(done(name, Phase::Keys, summary.as_ref().map(String::as_str).map_err(String::as_str)));
            KeysResult { machine: name.clone(), summary: summary.as_ref().ok().cloned(), error: summary.err() }
        });
        for r in &results {
            match &r.error {
                None => self.event(ev.name.as_str(), Some(r.machine.as_str()), "upload-keys", "ok", r.summary.as_deref().unwrap_or(""))?,
                Some(e) => self.event(ev.name.as_str(), Some(r.machine.as_str()), "upload-keys", "failed", e)?,
            }
        }
        Ok(results)
    }

    /// Records in the ledger what a check (`info`, plus what the caller knows) found of each machine: `ok`, or `drift` with the
    /// problems (which the caller may have added to, as the CLI does for orphans).
    pub fn record_check(&mut self, deployment: &str, infos: &[MachineInfo]) -> Result<()> {
        for i in infos {
            if i.problems.is_empty() {
                self.event(deployment, Some(i.machine.as_str()), "check", "ok", "as deployed")?;
            } else {
                self.event(deployment, Some(i.machine.as_str()), "check", "drift", &i.problems.join("; "))?;
            }
        }
        Ok(())
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
                .filter(|f| f.machine.state() != MachineState::Missing)
                .map(|f| f.name.to_string())
                .collect();
            if !existing.is_empty() {
                return Err(EngineError::Config(vec![format!(
                    "deployment {name} still has machines ({}); run `flotilla destroy -d {name} --yes` first",
                    existing.join(", ")
                )]));
            }
        }
        let existed = self.state.delete_deployment(name, &self.actor)?;
        crate::gcroots::Roots::new(self.state.path(), name).remove_all()?;
        Ok(existed)
    }

    /// After `started` machines run again ([`Operation::restarts`]): keys live in memory on a
    /// machine, so each of them that declares keys gets them again, read from the
    /// deployment's file (`file`, or the one its last evaluation recorded).
    pub fn resend_keys(&mut self, deployment: &str, file: Option<&Path>, started: &[MachineName], agent: &Path, listen: Listener<'_>) -> Result<Resent> {
        if started.is_empty() {
            return Ok(Resent::Sent(Vec::new()));
        }
        let file = match file {
            Some(f) => f.to_owned(),
            None => match self.state.deployment(deployment)?.and_then(|d| d.file) {
                Some(f) => f.into(),
                None => return Ok(Resent::NoFile),
            },
        };
        let ev = self.evaluate(&file)?;
        let selected: Vec<MachineName> = ev.machines.iter().filter(|(n, cfg)| started.contains(n) && !cfg.keys.is_empty()).map(|(n, _)| n.clone()).collect();
        Ok(Resent::Sent(self.upload_keys(&ev, &selected, agent, listen)?))
    }

    /// Runs `argv` on the one machine `machine` picks, its terminal and exit status passing
    /// straight through, and records it in the ledger (the command line only when `record`:
    /// arguments may hold passwords).
    pub fn exec(&mut self, deployment: &str, machine: &str, argv: &[String], record: bool, agent: &Path) -> Result<ExitStatus> {
        let m = self.one_machine(deployment, machine, agent)?;
        let mut cmd = m.machine.command(argv, false).map_err(|e| EngineError::Config(vec![e.to_string()]))?;
        let program = std::path::PathBuf::from(cmd.get_program());
        let status = cmd.status().map_err(|source| EngineError::Io { what: "cannot run", path: program, source })?;
        let ok = if status.success() { "ok" } else { "failed" };
        self.event(deployment, Some(m.name.as_str()), "exec", ok, &exec_entry(argv, record, &status.to_string()))?;
        Ok(status)
    }

    /// Runs `argv` on every picked machine at once, each line of its output handed to `line`
    /// as it arrives (a listing of many machines' lines, for the caller to label), and
    /// records each machine's end in the ledger.
    pub fn exec_all(&mut self, deployment: &str, sel: &Selection, argv: &[String], record: bool, agent: &Path, line: LineSink<'_>) -> Result<Vec<ExecResult>> {
        let fleet = self.fleet(deployment, sel, agent)?;
        // One worker per machine: a command that never ends (`tail -f`) must not keep the
        // machines after it from starting.
        let results = fan_out(&fleet, fleet.len(), &mut |_| {}, |f, _| ExecResult {
            machine: f.name.clone(),
            status: run_lines(f.machine.as_ref(), argv, &|stream, text| line(&f.name, stream, text)),
        });
        for r in &results {
            let (status, detail) = match &r.status {
                Ok(s) if s.success() => ("ok", s.to_string()),
                Ok(s) => ("failed", s.to_string()),
                Err(e) => ("failed", e.clone()),
            };
            self.event(deployment, Some(r.machine.as_str()), "exec", status, &exec_entry(argv, record, &detail))?;
        }
        Ok(results)
    }

    /// The one machine the selection `machine` picks.
    pub fn one_machine(&self, deployment: &str, machine: &str, agent: &Path) -> Result<FleetMachine> {
        let mut fleet = self.fleet(deployment, &Selection::parse(machine), agent)?;
        match fleet.len() {
            1 => Ok(fleet.remove(0)),
            n => Err(EngineError::Config(vec![format!("`{machine}` names {n} machines; name exactly one")])),
        }
    }
}

/// What [`Engine::resend_keys`] did.
#[derive(Debug)]
pub enum Resent {
    /// Each machine's key upload (none when no started machine declares keys).
    Sent(Vec<KeysResult>),
    /// Nothing: the deployment has no recorded file to read its keys from.
    NoFile,
}

/// Which of a command's outputs a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Its standard output.
    Stdout,
    /// Its standard error.
    Stderr,
}

/// Where `exec --all` hands each line: the machine, the stream, the line without its
/// newline. An error (the reader went away) stops the reading of that stream.
pub type LineSink<'a> = &'a (dyn Fn(&MachineName, Stream, &str) -> std::io::Result<()> + Sync);

/// One machine's end of `exec --all`.
#[derive(Debug)]
pub struct ExecResult {
    /// The machine.
    pub machine: MachineName,
    /// How its command ended, or why it could not run.
    pub status: std::result::Result<ExitStatus, String>,
}

/// What the ledger says of an `exec` that ended with `how`: the command line only when asked
/// (`--record-command`), as arguments may hold passwords.
fn exec_entry(argv: &[String], record: bool, how: &str) -> String {
    if record {
        format!("{} ({how})", argv.join(" "))
    } else {
        format!("a command ran ({how}); its arguments are not recorded without --record-command")
    }
}

/// Runs `argv` in `m`, handing each line of its output to `line` (stdout and stderr read at
/// once, whole lines at a time).
fn run_lines(m: &dyn Machine, argv: &[String], line: &(dyn Fn(Stream, &str) -> std::io::Result<()> + Sync)) -> std::result::Result<ExitStatus, String> {
    let mut child = m
        .command(argv, false)
        .map_err(PlatformError::into_message)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the machine's command: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    std::thread::scope(|s| {
        s.spawn(|| for_each_line(stderr, |l| line(Stream::Stderr, l)));
        // A reader that went away (`| head`) ends the reading; the command then gets its
        // SIGPIPE at its next write.
        let _ = for_each_line(stdout, |l| line(Stream::Stdout, l));
    });
    child.wait().map_err(|e| e.to_string())
}

/// Calls `f` with each line of `r` (without its newline; bytes that are not UTF-8 shown as
/// U+FFFD), as each line arrives.
/// Stops at the end of `r`, or at the first line `f` could not write (returning that error).
pub fn for_each_line(r: impl std::io::Read, mut f: impl FnMut(&str) -> std::io::Result<()>) -> std::io::Result<()> {
    let mut r = std::io::BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                f(line.strip_suffix('\n').unwrap_or(&line))?;
            }
        }
    }
}
