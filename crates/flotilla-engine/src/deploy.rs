//! `deploy`: provision what is missing, build every selected toplevel in one Nix call, then
//! per machine in parallel copy, activate and check. One machine's failure never stops the
//! others; it becomes a row of the report. The whole run holds the deployment's lock.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flotilla_model::MachineName;
use flotilla_protocol::{ActivationGoal, ActivationReport, Compression, ServiceState};
use flotilla_store::StorePath;
use serde::Serialize;

use crate::platform::{self, Machine, PlatformError};
use crate::remote::{CopyStats, RemoteError};
use crate::{Engine, EngineEvent, Evaluated, Listener, Phase, Result};

/// How far a deploy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Goal {
    /// Build only; nothing is provisioned or copied.
    Build,
    /// Build and copy the closures; activate nothing.
    Copy,
    /// Activate now and make it the boot default.
    Switch,
    /// Make it the boot default only.
    Boot,
    /// Activate now, not as the boot default.
    Test,
    /// Report what activation would change.
    DryActivate,
}

impl Goal {
    /// As users write it (and as it serialises).
    pub fn as_str(self) -> &'static str {
        match self {
            Goal::Build => "build",
            Goal::Copy => "copy",
            Goal::Switch => "switch",
            Goal::Boot => "boot",
            Goal::Test => "test",
            Goal::DryActivate => "dry-activate",
        }
    }

    fn activation(self) -> Option<ActivationGoal> {
        match self {
            Goal::Build | Goal::Copy => None,
            Goal::Switch => Some(ActivationGoal::Switch),
            Goal::Boot => Some(ActivationGoal::Boot),
            Goal::Test => Some(ActivationGoal::Test),
            Goal::DryActivate => Some(ActivationGoal::DryActivate),
        }
    }
}

/// Options of a deploy.
#[derive(Debug, Clone, Copy)]
pub struct DeployOptions {
    /// How far to go.
    pub goal: Goal,
    /// Machines worked on at once.
    pub parallel: usize,
    /// How long services get to come up before the check calls them failed.
    pub settle: Duration,
}

/// How one machine's deploy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// A new system was copied or activated.
    Deployed,
    /// It already ran this system: nothing copied, nothing restarted.
    Unchanged,
    /// Something failed; see the error.
    Failed,
}

impl Outcome {
    /// As users read it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Deployed => "deployed",
            Outcome::Unchanged => "unchanged",
            Outcome::Failed => "failed",
        }
    }
}

/// One machine's row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct MachineDeploy {
    /// The machine.
    pub machine: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The phase it failed in.
    pub failed_phase: Option<Phase>,
    /// The generation it runs now.
    pub generation: Option<u64>,
    /// Its toplevel.
    pub toplevel: Option<StorePath>,
    /// What the copy did.
    pub copy: Option<CopyStats>,
    /// What activation changed.
    pub activation: Option<ActivationReport>,
    /// Seconds spent on this machine after the build.
    pub seconds: f64,
    /// Why it failed.
    pub error: Option<String>,
    /// A one-line summary.
    pub summary: String,
}

/// The outcome of `deploy`.
#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    /// The deployment.
    pub deployment: String,
    /// The goal.
    pub goal: Goal,
    /// Per machine.
    pub machines: Vec<MachineDeploy>,
    /// Wall time.
    #[serde(serialize_with = "crate::secs")]
    pub elapsed: Duration,
}

impl DeployReport {
    /// Whether every machine made it.
    pub fn all_ok(&self) -> bool {
        self.machines.iter().all(|m| m.outcome != Outcome::Failed)
    }
}

impl MachineDeploy {
    /// A row for `machine`, deployed until it says otherwise.
    fn new(machine: &str, toplevel: Option<StorePath>) -> MachineDeploy {
        MachineDeploy {
            machine: machine.to_owned(),
            outcome: Outcome::Deployed,
            failed_phase: None,
            generation: None,
            toplevel,
            copy: None,
            activation: None,
            seconds: 0.0,
            error: None,
            summary: String::new(),
        }
    }

    /// This row, failed in `phase` for `error`.
    fn fail(mut self, phase: Phase, error: String) -> MachineDeploy {
        self.outcome = Outcome::Failed;
        self.failed_phase = Some(phase);
        self.summary = format!("{} failed", phase.as_str());
        self.error = Some(error);
        self
    }
}

fn failed(machine: &str, phase: Phase, error: String) -> MachineDeploy {
    MachineDeploy::new(machine, None).fail(phase, error)
}

/// Runs `work` on every item with at most `parallel` at once, sending what it reports to the
/// caller's thread, where `listen` sees each event in order; returns the results in the
/// order of `items`.
pub(crate) fn fan_out<T: Sync, R: Send>(
    items: &[T],
    parallel: usize,
    listen: Listener<'_>,
    work: impl Fn(&T, &dyn Fn(EngineEvent)) -> R + Sync,
) -> Vec<R> {
    let (tx, rx) = mpsc::channel::<EngineEvent>();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> = items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..parallel.clamp(1, items.len().max(1)) {
            let tx = tx.clone();
            let (next, results, work) = (&next, &results, &work);
            s.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let send = |e: EngineEvent| {
                    let _ = tx.send(e);
                };
                let r = work(item, &send);
                *results[i].lock().expect("result slot") = Some(r);
            });
        }
        drop(tx);
        for event in rx {
            listen(&event);
        }
    });
    results.into_iter().map(|r| r.into_inner().expect("result slot").expect("every item worked on")).collect()
}

impl Engine {
    /// Deploys the selected machines of an evaluated deployment.
    pub fn deploy(&mut self, ev: &Evaluated, selected: &[MachineName], agent: &std::path::Path, opts: DeployOptions, listen: Listener<'_>) -> Result<DeployReport> {
        self.deploy_instantiated(ev, selected, agent, None, opts, listen)
    }

    /// [`Engine::deploy`], with the toplevels [`Engine::evaluate_for_build`] may already
    /// have instantiated.
    pub fn deploy_instantiated(
        &mut self,
        ev: &Evaluated,
        selected: &[MachineName],
        agent: &std::path::Path,
        instantiated: Option<crate::Toplevels>,
        opts: DeployOptions,
        listen: Listener<'_>,
    ) -> Result<DeployReport> {
        let _lock = self.lock(ev.name.as_str(), "deploy", listen)?;
        let start = Instant::now();
        crate::check_agent(agent)?;
        let ctx = self.context(ev.name.as_str(), agent);

        // Facts first: a machine keeps its address even when its build fails later.
        self.record_evaluation(ev)?;

        // Provision.
        let mut failures: BTreeMap<String, MachineDeploy> = BTreeMap::new();
        let mut machines: BTreeMap<String, Box<dyn Machine>> = BTreeMap::new();
        if opts.goal != Goal::Build {
            listen(&EngineEvent::PhaseStarted { phase: Phase::Provision, machines: names(selected) });
            let mut handles = Vec::new();
            for name in selected {
                let cfg = &ev.machines[name];
                let facts = ev.facts.get(name).cloned().unwrap_or_default();
                match platform::machine(&ctx, name.as_str(), &cfg.platform, &facts) {
                    Ok(m) => handles.push(m),
                    Err(e) => {
                        listen(&done(name.as_str(), Phase::Provision, Err(&e.message)));
                        failures.insert(name.to_string(), failed(name.as_str(), Phase::Provision, e.message));
                    }
                }
            }
            let provisioned = fan_out(&handles, opts.parallel, listen, |m, send| {
                send(EngineEvent::MachinePhase { machine: m.name().to_owned(), phase: Phase::Provision });
                let r = m.provision();
                let detail = match &r {
                    Ok(true) => Ok("started"),
                    Ok(false) => Ok("running"),
                    Err(e) => Err(e.message.as_str()),
                };
                send(done(m.name(), Phase::Provision, detail));
                r
            });
            for (m, r) in handles.into_iter().zip(provisioned) {
                match r {
                    Ok(acted) => {
                        if acted {
                            self.event(ev.name.as_str(), Some(m.name()), "provision", "ok", "started")?;
                        }
                        machines.insert(m.name().to_owned(), m);
                    }
                    Err(PlatformError { machine, message }) => {
                        self.event(ev.name.as_str(), Some(&machine), "provision", "failed", &message)?;
                        failures.insert(machine.clone(), failed(&machine, Phase::Provision, message));
                    }
                }
            }
        }

        // Build everything selected in one Nix call, provisioned or not: a build failure is
        // worth knowing even on a machine that is down.
        let build = self.build_instantiated(ev, selected, agent, instantiated, listen)?;
        let mut toplevels: BTreeMap<String, StorePath> = BTreeMap::new();
        for b in &build.machines {
            match (&b.toplevel, &b.error) {
                (Some(t), _) => {
                    toplevels.insert(b.machine.clone(), t.clone());
                }
                (None, error) => {
                    failures.entry(b.machine.clone()).or_insert_with(|| {
                        failed(&b.machine, Phase::Build, error.clone().unwrap_or_else(|| "the build failed".into()))
                    });
                }
            }
        }

        // Copy, activate, check: per machine, in parallel, each machine's closure cut from the
        // one closure of every toplevel (one Nix call for the whole fleet).
        let work: Vec<(&dyn Machine, StorePath)> = machines
            .values()
            .filter(|m| !failures.contains_key(m.name()))
            .filter_map(|m| Some((m.as_ref(), toplevels.get(m.name())?.clone())))
            .collect();
        let closure = match build.closure {
            Some(c) => c,
            None if work.is_empty() => Vec::new(),
            None => {
                let outs: Vec<StorePath> = work.iter().map(|(_, t)| t.clone()).collect();
                self.nix.closure_info(&outs)?.unwrap_or_default()
            }
        };
        let results = fan_out(&work, opts.parallel, listen, |(m, toplevel), send| {
            let infos = flotilla_nix::closure_within(&closure, std::slice::from_ref(toplevel));
            roll_out(*m, toplevel, &infos, opts, send)
        });

        let mut rows: BTreeMap<String, MachineDeploy> = failures;
        let mut events = Vec::new();
        let mut activated = Vec::new();
        let event = |machine: &str, kind: &str, status: &str, message: &str| self.ledger_entry(ev.name.as_str(), Some(machine), kind, status, message);
        for mut r in results {
            r.toplevel = r.toplevel.or_else(|| toplevels.get(&r.machine).cloned());
            match (&r.outcome, r.generation) {
                (Outcome::Failed, generation) => {
                    let phase = r.failed_phase.map_or("deploy", Phase::as_str);
                    events.push(event(&r.machine, phase, "failed", r.error.as_deref().unwrap_or("")));
                    // Activated, then failed its check: it runs the new generation all the same.
                    if let (Some(generation), Some(top)) = (generation, &r.toplevel) {
                        if opts.goal.activation().is_some_and(|g| g != ActivationGoal::DryActivate) {
                            activated.push((r.machine.clone(), top.to_absolute(), generation as i64, "activated; its check failed".to_owned()));
                        }
                    }
                }
                (_, Some(generation)) if opts.goal.activation() != Some(ActivationGoal::DryActivate) => {
                    let toplevel = r.toplevel.as_ref().expect("an activated machine has a toplevel").to_absolute();
                    activated.push((r.machine.clone(), toplevel, generation as i64, r.summary.clone()));
                }
                _ => events.push(event(&r.machine, opts.goal.as_str(), "ok", &r.summary)),
            }
            rows.insert(r.machine.clone(), r);
        }
        let activations: Vec<flotilla_state::Activation<'_>> = activated
            .iter()
            .map(|(machine, toplevel, number, message)| flotilla_state::Activation { machine, toplevel, number: *number, message })
            .collect();
        self.state.record_deploy(ev.name.as_str(), &self.actor, &activations, &events)?;
        if opts.goal == Goal::Build {
            for (machine, t) in &toplevels {
                rows.entry(machine.clone())
                    .or_insert_with(|| MachineDeploy { summary: "built".into(), ..MachineDeploy::new(machine, Some(t.clone())) });
            }
        }
        let report = DeployReport {
            deployment: ev.name.to_string(),
            goal: opts.goal,
            machines: selected.iter().filter_map(|n| rows.remove(n.as_str())).collect(),
            elapsed: start.elapsed(),
        };
        let failed_count = report.machines.iter().filter(|m| m.outcome == Outcome::Failed).count();
        let status = if failed_count == 0 { "ok" } else { "failed" };
        let message = format!("{} of {} machines deployed ({})", report.machines.len() - failed_count, report.machines.len(), opts.goal.as_str());
        self.event(ev.name.as_str(), None, "deploy", status, &message)?;
        Ok(report)
    }
}

fn names(selected: &[MachineName]) -> Vec<String> {
    selected.iter().map(ToString::to_string).collect()
}

pub(crate) fn done(machine: &str, phase: Phase, r: std::result::Result<&str, &str>) -> EngineEvent {
    EngineEvent::MachineDone {
        machine: machine.to_owned(),
        phase,
        ok: r.is_ok(),
        detail: match r {
            Ok(s) | Err(s) => s.to_owned(),
        },
    }
}

/// Copy, activate and check one machine.
fn roll_out(m: &dyn Machine, toplevel: &StorePath, closure: &[flotilla_nix::PathInfo], opts: DeployOptions, send: &dyn Fn(EngineEvent)) -> MachineDeploy {
    let start = Instant::now();
    let name = m.name();
    let mut row = MachineDeploy::new(name, Some(toplevel.clone()));
    let fail = |row: MachineDeploy, phase: Phase, e: String| {
        send(done(name, phase, Err(&e)));
        MachineDeploy { seconds: start.elapsed().as_secs_f64(), ..row.fail(phase, e) }
    };

    send(EngineEvent::MachinePhase { machine: name.to_owned(), phase: Phase::Copy });
    let mut client = match m.connect() {
        Ok(c) => c,
        Err(e) => return fail(row, Phase::Copy, e.to_string()),
    };
    let mut progress = |p: &crate::remote::CopyProgress| {
        send(EngineEvent::CopyProgress { machine: name.to_owned(), bytes: p.bytes, total_bytes: p.total_bytes, paths: p.paths, total_paths: p.total_paths });
    };
    if closure.is_empty() {
        return fail(row, Phase::Copy, format!("the closure of {toplevel} is not in the local store"));
    }
    let copy = match client.copy_paths(closure, Compression::None, &mut progress) {
        Ok(c) => c,
        Err(e) => return fail(row, Phase::Copy, e.to_string()),
    };
    let copied = copy.paths_sent;
    send(done(name, Phase::Copy, Ok(&copy_summary(&copy))));
    row.copy = Some(copy);

    let Some(goal) = opts.goal.activation() else {
        row.outcome = if copied == 0 { Outcome::Unchanged } else { Outcome::Deployed };
        row.summary = copy_summary(row.copy.as_ref().expect("set above"));
        row.seconds = start.elapsed().as_secs_f64();
        return row;
    };

    send(EngineEvent::MachinePhase { machine: name.to_owned(), phase: Phase::Activate });
    let before = client.status().ok().and_then(|s| s.generation);
    let (generation, report) = match client.activate(toplevel, goal) {
        Ok(r) => r,
        Err(e) => return fail(row, Phase::Activate, e.to_string()),
    };
    let changes = activation_summary(&report);
    send(done(name, Phase::Activate, Ok(&changes)));
    row.generation = Some(generation);
    let unchanged = copied == 0 && before == Some(generation) && nothing_changed(&report);
    row.activation = Some(report);

    if matches!(goal, ActivationGoal::Switch | ActivationGoal::Test) {
        send(EngineEvent::MachinePhase { machine: name.to_owned(), phase: Phase::Check });
        if let Err(e) = check_services(&mut client, name, opts.settle) {
            return fail(row, Phase::Check, e);
        }
        send(done(name, Phase::Check, Ok("services up")));
    }
    row.outcome = if unchanged { Outcome::Unchanged } else { Outcome::Deployed };
    row.summary = if unchanged {
        "unchanged: nothing copied, nothing restarted".to_owned()
    } else {
        format!("{}; {changes}", copy_summary(row.copy.as_ref().expect("set above")))
    };
    row.seconds = start.elapsed().as_secs_f64();
    row
}

/// Waits up to `settle` for every service to be running; a service that failed, or is still
/// not running when the time is up, fails the check.
fn check_services(client: &mut crate::remote::AgentClient, machine: &str, settle: Duration) -> std::result::Result<(), String> {
    let deadline = Instant::now() + settle;
    loop {
        let status = client.status().map_err(|e: RemoteError| e.to_string())?;
        let bad: Vec<String> = status
            .services
            .iter()
            .filter(|s| s.state != ServiceState::Running)
            .map(|s| match &s.last_exit {
                Some(exit) => format!("service {} is {} (last exit: {exit})", s.name, s.state),
                None => format!("service {} is {}", s.name, s.state),
            })
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        let hopeless = status.services.iter().any(|s| s.state == ServiceState::Failed);
        if hopeless || Instant::now() >= deadline {
            let first = status.services.iter().find(|s| s.state != ServiceState::Running).map_or("", |s| s.name.as_str());
            return Err(format!("{}; `flotilla logs {machine} {first}` shows why", bad.join(", ")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn nothing_changed(r: &ActivationReport) -> bool {
    r.etc_added.is_empty()
        && r.etc_changed.is_empty()
        && r.etc_removed.is_empty()
        && r.users_added.is_empty()
        && r.users_removed.is_empty()
        && r.services_started.is_empty()
        && r.services_stopped.is_empty()
        && r.services_restarted.is_empty()
}

fn copy_summary(c: &CopyStats) -> String {
    if c.paths_sent == 0 {
        "nothing copied".into()
    } else {
        format!("copied {} paths ({})", c.paths_sent, human_bytes(c.bytes_sent))
    }
}

fn activation_summary(r: &ActivationReport) -> String {
    let mut parts = Vec::new();
    let list = |verb: &str, v: &[String]| (!v.is_empty()).then(|| format!("{verb} {}", v.join(" ")));
    parts.extend(list("started", &r.services_started));
    parts.extend(list("restarted", &r.services_restarted));
    parts.extend(list("stopped", &r.services_stopped));
    let etc = r.etc_added.len() + r.etc_changed.len() + r.etc_removed.len();
    if etc > 0 {
        parts.push(format!("{etc} /etc entries changed"));
    }
    if parts.is_empty() {
        "nothing restarted".into()
    } else {
        parts.join(", ")
    }
}

/// `1.2 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_read_as_they_serialise() {
        for g in [Goal::Build, Goal::Copy, Goal::Switch, Goal::Boot, Goal::Test, Goal::DryActivate] {
            assert_eq!(serde_json::to_value(g).unwrap(), g.as_str());
        }
    }

    #[test]
    fn fan_out_keeps_order_and_delivers_every_event() {
        let items: Vec<u32> = (0..20).collect();
        let mut seen = 0;
        let out = fan_out(&items, 4, &mut |_| seen += 1, |i, send| {
            send(EngineEvent::NixLog { line: i.to_string() });
            i * 2
        });
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(seen, 20);
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
