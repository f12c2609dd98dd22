//! `deploy`: build every selected toplevel in one Nix call, provision the machines that
//! built, then per machine in parallel: pre-flight checks, copy, keys, activate (the agent checks health
//! and rolls back by itself on failure), the deployer's own checks, and a confirmation over a
//! new connection. One machine's failure never stops the others; it becomes a row of the
//! report, and with `rollback_all_on_failure` the machines that made it are reverted. The
//! whole run holds the deployment's lock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_model::{human_bytes, DeployerCheck, DeploySettings, MachineName, UploadAt};
use flotilla_protocol::{ActivationGoal, ActivationReport, Compression, ErrorKind, HealthResult};
use flotilla_store::StorePath;
use serde::Serialize;

use crate::checks::CheckResult;
use crate::jobs::{done, fan_out, Slots};
use crate::keys::ResolvedKey;
use crate::platform::{self, Machine};
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

    /// What the agent is asked to do, when it is asked anything: the goals past the copy are
    /// the wire's [`ActivationGoal`]s, one for one.
    pub fn activation(self) -> Option<ActivationGoal> {
        match self {
            Goal::Build | Goal::Copy => None,
            Goal::Switch => Some(ActivationGoal::Switch),
            Goal::Boot => Some(ActivationGoal::Boot),
            Goal::Test => Some(ActivationGoal::Test),
            Goal::DryActivate => Some(ActivationGoal::DryActivate),
        }
    }

    /// Whether machines are touched at all (created, started, copied to): every goal but
    /// `build`.
    pub fn provisions(self) -> bool {
        self != Goal::Build
    }

    /// Whether the machines change what they run or boot: `switch`, `boot`, `test`.
    pub fn activates(self) -> bool {
        self.activation().is_some_and(ActivationGoal::activates)
    }

    /// Whether the new system is health-checked, confirmed and rolled back on failure.
    pub fn is_checked(self) -> bool {
        self.activation().is_some_and(ActivationGoal::is_checked)
    }

    /// Whether the machines get their keys.
    pub fn sends_keys(self) -> bool {
        self.activation().is_some_and(ActivationGoal::sends_keys)
    }
}

/// Options of a deploy.
#[derive(Debug, Clone, Copy)]
pub struct DeployOptions {
    /// How far to go.
    pub goal: Goal,
    /// How long a machine's health checks may take in all before it rolls back.
    pub check_timeout: Duration,
    /// How long the agent waits for the deployer's confirmation of a `switch` or `test`
    /// before it rolls back by itself; `None` asks for no confirmation.
    pub confirm_timeout: Option<Duration>,
    /// When any machine fails, revert the machines that were deployed.
    pub rollback_all_on_failure: bool,
    /// Machines with `deploy.substituters` fetch from them before the deployer pushes the
    /// rest (as each machine's `deploy.substituteOnDestination` asks on its own).
    pub substitute_on_destination: bool,
    /// Every selected machine is built on its host (as each machine's
    /// `deploy.buildOnTarget` asks on its own): `deploy --build-on target`.
    pub build_on_target: bool,
    /// Activate every machine, also one that runs its toplevel already as the deploy would
    /// leave it (its `/etc`, accounts and services reconciled again, its health checks run):
    /// `deploy --reactivate`. Without it such a machine costs the deploy one question.
    pub reactivate: bool,
}

/// Free space a machine's store keeps beyond the closure it receives.
const FREE_MARGIN: u64 = 64 << 20;

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
    /// Activation or a check failed and the machine returned to its previous generation.
    #[serde(rename = "rolled-back")]
    RolledBack,
    /// It was deployed, then reverted because another machine failed.
    Reverted,
}

impl Outcome {
    /// As users read it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Deployed => "deployed",
            Outcome::Unchanged => "unchanged",
            Outcome::Failed => "failed",
            Outcome::RolledBack => "rolled back",
            Outcome::Reverted => "reverted",
        }
    }
}

/// One machine's row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct MachineDeploy {
    /// The machine.
    pub machine: MachineName,
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
    /// The agent's health checks.
    pub health: Vec<HealthResult>,
    /// The deployer's checks.
    pub checks: Vec<CheckResult>,
    /// What the key upload did, e.g. "keys written: token".
    pub keys: Option<String>,
    /// Whether the machine runs this deploy's generation now.
    pub activated: bool,
    /// The generation it ran before.
    pub previous_generation: Option<u64>,
    /// The system it ran before.
    pub previous_toplevel: Option<StorePath>,
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
        self.machines.iter().all(|m| matches!(m.outcome, Outcome::Deployed | Outcome::Unchanged))
    }

    /// The machines reverted by `--rollback-all-on-failure`.
    pub fn reverted(&self) -> impl Iterator<Item = &MachineDeploy> {
        self.machines.iter().filter(|m| m.outcome == Outcome::Reverted)
    }
}

impl MachineDeploy {
    /// A row for `machine`, deployed until it says otherwise.
    fn new(machine: &MachineName, toplevel: Option<StorePath>) -> MachineDeploy {
        MachineDeploy {
            machine: machine.clone(),
            outcome: Outcome::Deployed,
            failed_phase: None,
            generation: None,
            toplevel,
            copy: None,
            activation: None,
            health: Vec::new(),
            checks: Vec::new(),
            keys: None,
            activated: false,
            previous_generation: None,
            previous_toplevel: None,
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

    /// This row, rolled back by the agent in `phase` for `error`.
    fn rolled_back(mut self, phase: Phase, error: String) -> MachineDeploy {
        self.outcome = Outcome::RolledBack;
        self.failed_phase = Some(phase);
        self.summary = format!("rolled back ({} failed)", phase.as_str());
        self.error = Some(error);
        self.activated = false;
        self
    }
}

fn failed(machine: &MachineName, phase: Phase, error: String) -> MachineDeploy {
    MachineDeploy::new(machine, None).fail(phase, error)
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
        self.deploy_planned(ev, selected, agent, instantiated, None, opts, listen)
    }

    /// [`Engine::deploy_instantiated`] of the plan the user confirmed: when a machine's
    /// toplevel is not the one `planned` names (the file was edited, or facts moved it since),
    /// the deploy stops after the build, before any machine is touched, and says which.
    #[allow(clippy::too_many_arguments)] // the deploy's inputs, each its own; a struct would only rename them
    pub fn deploy_planned(
        &mut self,
        ev: &Evaluated,
        selected: &[MachineName],
        agent: &std::path::Path,
        instantiated: Option<crate::Toplevels>,
        planned: Option<&BTreeMap<MachineName, StorePath>>,
        opts: DeployOptions,
        listen: Listener<'_>,
    ) -> Result<DeployReport> {
        let lock = self.lock(ev.name.as_str(), "deploy", listen)?;
        let start = Instant::now();
        // The one check of the agent binary for this deploy (the build below trusts it).
        crate::check_agent(agent)?;
        let ctx = self.context(ev.name.as_str(), agent);
        let limits = self.limits;

        // A platform this build cannot use (or options it cannot make sense of) is the
        // configuration's error, said before anything is built, recorded or created; a machine
        // that is only unreachable now fails alone, later.
        // The handles made here are the ones provisioned below.
        let mut made: BTreeMap<MachineName, Box<dyn Machine>> = BTreeMap::new();
        if opts.goal.provisions() {
            let mut unusable = Vec::new();
            // A local or qemu machine another deployer host provisioned is deployed there.
            let recorded = match self.state.machines(ev.name.as_str()) {
                Err(flotilla_state::StateError::NoDeployment(_)) => Vec::new(),
                r => r?,
            };
            for r in &recorded {
                if let Some(why) = selected.iter().find(|n| n.as_str() == r.name).and(platform::held_elsewhere(&r.platform, r.host.as_deref())) {
                    unusable.push(format!("machine {}: {why}", r.name));
                }
            }
            if !unusable.is_empty() {
                return Err(crate::EngineError::Config(unusable));
            }
            for n in selected {
                match platform::machine(&ctx, n.as_str(), &ev.machines[n].platform, &ev.facts.get(n).cloned().unwrap_or_default()) {
                    Ok(m) => {
                        made.insert(n.clone(), m);
                    }
                    Err(e) => unusable.push(e.to_string()),
                }
            }
            if !unusable.is_empty() {
                return Err(crate::EngineError::Config(unusable));
            }
            // The host tools the platforms need, before anything is built, recorded or created.
            crate::doctor::require_tools(selected.iter().map(|n| (n, &ev.machines[n].platform))).map_err(crate::EngineError::Host)?;
        }

        // Machines built on their hosts: only when machines are provisioned (a `--goal build`
        // builds here), and only ssh machines (the options' check refuses the rest; the flag
        // is checked here, before anything is built).
        let on_target: std::collections::BTreeSet<MachineName> = if opts.goal.provisions() {
            selected.iter().filter(|n| opts.build_on_target || ev.machines[*n].deploy.build_on_target).cloned().collect()
        } else {
            Default::default()
        };
        let not_ssh: Vec<String> = on_target
            .iter()
            .filter(|n| !matches!(ev.machines[*n].platform, flotilla_model::Platform::Ssh(_)))
            .map(|n| format!(
                "machine {n}: `--build-on target` builds on an ssh machine's host with its Nix, and {n} is a {} machine; select ssh machines only (--on), or drop the option",
                ev.machines[n].platform.kind()
            ))
            .collect();
        if !not_ssh.is_empty() {
            return Err(crate::EngineError::Config(not_ssh));
        }

        let mut failures: BTreeMap<MachineName, MachineDeploy> = BTreeMap::new();

        // Keys are read before any machine is touched: a missing key file stops its machine
        // before anything changes on it.
        let mut keys: BTreeMap<MachineName, Vec<ResolvedKey>> = BTreeMap::new();
        if opts.goal.sends_keys() {
            for name in selected {
                match crate::keys::resolve(name.as_str(), &ev.machines[name].keys) {
                    Ok(k) => {
                        keys.insert(name.clone(), k);
                    }
                    Err(e) => {
                        listen(&done(name, Phase::Keys, Err(&e)));
                        failures.insert(name.clone(), failed(name, Phase::Keys, e));
                    }
                }
            }
        }
        let selected_all = selected;

        // Build before provisioning: facts were planned before, so nothing here waits on a
        // machine, and a machine whose system does not build is never created or started
        // (a first deploy whose build fails leaves nothing behind). Everything selected is
        // built in one Nix call, keys or not: a build failure is worth knowing regardless.
        // The build records the deployment, its machines and their facts.
        let build = self.build_checked(ev, selected_all, agent, instantiated, &on_target, listen)?;
        let mut toplevels: BTreeMap<MachineName, StorePath> = BTreeMap::new();
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
        if let Some(planned) = planned {
            let moved: Vec<String> = selected_all
                .iter()
                .filter(|n| toplevels.get(*n) != planned.get(*n))
                .map(|n| match (planned.get(n), toplevels.get(n)) {
                    (Some(p), Some(t)) => format!("machine {n}: the plan showed {p}, the deployment now builds {t}"),
                    (None, _) => format!("machine {n}: it was not in the plan"),
                    (Some(p), None) => format!("machine {n}: the plan showed {p}, and it no longer builds"),
                })
                .collect();
            if !moved.is_empty() {
                return Err(crate::EngineError::Config(vec![format!(
                    "the deployment changed between the plan and the deploy, so nothing was deployed: {}; run `flotilla deploy --plan` again to see and confirm the new plan",
                    moved.join("; ")
                )]));
            }
        }
        let selected: Vec<MachineName> = selected_all.iter().filter(|n| !failures.contains_key(*n)).cloned().collect();

        // Provision the machines that built.
        let mut machines: BTreeMap<MachineName, Box<dyn Machine>> = BTreeMap::new();
        if opts.goal.provisions() && !selected.is_empty() {
            lock.check()?;
            listen(&EngineEvent::PhaseStarted { phase: Phase::Provision, machines: selected.clone() });
            let handles: Vec<(MachineName, Box<dyn Machine>)> = selected.iter().filter_map(|n| Some((n.clone(), made.remove(n)?))).collect();
            for (name, m) in &handles {
                m.prepare(&toplevels[name]);
            }
            let provisioned = fan_out(&handles, limits.provision, listen, |(name, m), send| {
                send(EngineEvent::MachinePhase { machine: name.clone(), phase: Phase::Provision });
                let r = m.provision();
                let detail = match &r {
                    Ok(Some(did)) => Ok(did.as_str()),
                    Ok(None) => Ok("running"),
                    Err(e) => Err(e.message()),
                };
                send(done(name, Phase::Provision, detail));
                r
            });
            // What provisioning did is written once for the whole fleet: one transaction.
            let mut held_here: Vec<String> = Vec::new();
            let mut events = Vec::new();
            for ((name, m), r) in handles.into_iter().zip(provisioned) {
                match r {
                    Ok(did) => {
                        if let Some(did) = did {
                            events.push(self.ledger_entry(ev.name.as_str(), Some(name.as_str()), "provision", "ok", &did));
                        }
                        // Its root is on this host: said in its record, for `info` and for
                        // every other deployer host sharing the state.
                        if platform::held_by_host(ev.machines[&name].platform.kind()) {
                            held_here.push(name.to_string());
                        }
                        machines.insert(name, m);
                    }
                    Err(e) => {
                        let message = e.into_message();
                        events.push(self.ledger_entry(ev.name.as_str(), Some(name.as_str()), "provision", "failed", &message));
                        failures.insert(name.clone(), failed(&name, Phase::Provision, message));
                    }
                }
            }
            let held_here: Vec<&str> = held_here.iter().map(String::as_str).collect();
            self.state.record_provisioned(ev.name.as_str(), &events, &held_here, Some(&crate::procfs::host()))?;
        }

        // Copy, activate, check: per machine, in parallel, each machine's closure cut from the
        // one closure of every toplevel (one Nix call for the whole fleet). Each phase keeps
        // its own limit: a machine waits for a place in the copy, then in the activation.
        let work: Vec<Target<'_>> = machines
            .iter()
            .filter(|(n, _)| !failures.contains_key(*n))
            .filter_map(|(n, m)| {
                Some(Target {
                    name: n,
                    machine: m.as_ref(),
                    toplevel: toplevels.get(n)?.clone(),
                    keys: keys.get(n).map_or(&[][..], Vec::as_slice),
                    checks: &ev.machines[n].checks,
                    substitute: Some(&ev.machines[n].deploy)
                        .filter(|d| !d.substituters.is_empty() && (opts.substitute_on_destination || d.substitute_on_destination)),
                    build_on_host: build.on_target.get(n).map(|t| t.drv.clone()),
                })
            })
            .collect();
        let closure = match build.closure {
            Some(c) => c,
            None if work.is_empty() => Vec::new(),
            None => {
                let outs: Vec<StorePath> = work.iter().filter(|t| t.build_on_host.is_none()).map(|t| t.toplevel.clone()).collect();
                self.nix.closure_info(&outs)?.unwrap_or_default()
            }
        };
        let nix = &self.nix;
        let slots = PhaseSlots { copy: Slots::new(limits.copy), activate: Slots::new(limits.activate), lease: lock.lease() };
        let mut results = fan_out(&work, limits.copy.max(limits.activate), listen, |t, send| {
            let infos = match &t.build_on_host {
                None => flotilla_nix::closure_within(&closure, std::slice::from_ref(&t.toplevel)),
                // Built there, by the host's Nix, into the store the agent uses: its closure is
                // the host's to describe, and nothing of it is sent.
                Some(drv) => {
                    send(EngineEvent::MachinePhase { machine: t.name.clone(), phase: Phase::Build });
                    let log = |line: &str| send(EngineEvent::NixLog { line: line.to_owned() });
                    match t.machine.build_on_host(nix, drv, &t.toplevel, &log) {
                        Ok(infos) => {
                            send(done(t.name, Phase::Build, Ok(&format!("built on the machine's host: {} paths", infos.len()))));
                            infos
                        }
                        Err(e) => {
                            let e = e.into_message();
                            send(done(t.name, Phase::Build, Err(&e)));
                            return failed(t.name, Phase::Build, e);
                        }
                    }
                }
            };
            roll_out(t, &infos, &slots, opts, send)
        });

        // Fleet policy: one machine down reverts the others.
        let any_failed = !failures.is_empty() || results.iter().any(|r| !matches!(r.outcome, Outcome::Deployed | Outcome::Unchanged));
        if opts.rollback_all_on_failure && any_failed {
            let revert: Vec<(usize, &Target<'_>)> = results
                .iter()
                .zip(&work)
                .enumerate()
                .filter(|(_, (r, _))| r.activated && r.previous_generation != r.generation)
                .map(|(i, (_, t))| (i, t))
                .collect();
            if !revert.is_empty() {
                listen(&EngineEvent::PhaseStarted { phase: Phase::Rollback, machines: revert.iter().map(|(_, t)| t.name.clone()).collect() });
            }
            let reverted = fan_out(&revert, limits.activate, listen, |(i, t), send| {
                send(EngineEvent::MachinePhase { machine: t.name.clone(), phase: Phase::Rollback });
                let r = revert_machine(t.machine, results[*i].previous_generation);
                send(done(t.name, Phase::Rollback, r.as_deref().map(|_| "reverted").map_err(String::as_str)));
                r
            });
            for ((i, _), r) in revert.iter().zip(reverted) {
                let row = &mut results[*i];
                match r {
                    Ok(summary) => {
                        row.outcome = Outcome::Reverted;
                        row.activated = false;
                        row.summary = summary;
                    }
                    Err(e) => row.summary = format!("{}; reverting it failed: {e}", row.summary),
                }
            }
        }

        // Each machine's end is an event; the ledger is one of its listeners, and records
        // what all of them said in one transaction.
        let mut rows: BTreeMap<MachineName, MachineDeploy> = failures;
        let mut ledger = crate::ledger::Ledger::default();
        for mut r in results {
            r.toplevel = r.toplevel.or_else(|| toplevels.get(&r.machine).cloned());
            let runs = match (r.outcome, r.activated) {
                (Outcome::Reverted, _) => r.previous_generation.zip(r.previous_toplevel.clone()),
                // A machine that runs the new generation is recorded so, even when a later
                // step (its post-activation keys) failed.
                (_, true) => r.generation.zip(r.toplevel.clone()),
                _ => None,
            };
            let finished = EngineEvent::MachineFinished {
                machine: r.machine.clone(),
                goal: opts.goal,
                outcome: r.outcome,
                failed_phase: r.failed_phase,
                error: r.error.clone(),
                summary: r.summary.clone(),
                runs,
            };
            ledger.observe(&finished);
            listen(&finished);
            rows.insert(r.machine.clone(), r);
        }
        ledger.record(self, ev.name.as_str())?;
        if !opts.goal.provisions() {
            for (machine, t) in &toplevels {
                rows.entry(machine.clone())
                    .or_insert_with(|| MachineDeploy { summary: "built".into(), ..MachineDeploy::new(machine, Some(t.clone())) });
            }
        }
        let report = DeployReport {
            deployment: ev.name.to_string(),
            goal: opts.goal,
            machines: selected_all.iter().filter_map(|n| rows.remove(n)).collect(),
            elapsed: start.elapsed(),
        };
        let failed_count = report.machines.iter().filter(|m| !matches!(m.outcome, Outcome::Deployed | Outcome::Unchanged)).count();
        let status = if failed_count == 0 { "ok" } else { "failed" };
        let message = format!("{} of {} machines deployed ({})", report.machines.len() - failed_count, report.machines.len(), opts.goal.as_str());
        self.event(ev.name.as_str(), None, "deploy", status, &message)?;
        Ok(report)
    }
}

/// One machine a deploy rolls out to, with everything its job needs.
struct Target<'a> {
    name: &'a MachineName,
    machine: &'a dyn Machine,
    toplevel: StorePath,
    keys: &'a [ResolvedKey],
    checks: &'a BTreeMap<String, DeployerCheck>,
    /// The caches it fetches from and the keys it trusts, when it substitutes.
    substitute: Option<&'a DeploySettings>,
    /// Its toplevel's derivation, when its host builds it.
    build_on_host: Option<StorePath>,
}

/// The places in the phases of a roll-out that have their own limits.
struct PhaseSlots {
    copy: Slots,
    activate: Slots,
    /// The deployment's lease: lost, no machine is changed any more.
    lease: crate::lock::Lease,
}

/// Pre-flight, copy, keys, activate, check and confirm one machine.
fn roll_out(t: &Target<'_>, closure: &[flotilla_nix::PathInfo], slots: &PhaseSlots, opts: DeployOptions, send: &dyn Fn(EngineEvent)) -> MachineDeploy {
    let start = Instant::now();
    let (name, m, toplevel, keys, checks) = (t.name, t.machine, &t.toplevel, t.keys, t.checks);
    let mut row = MachineDeploy::new(name, Some(toplevel.clone()));
    let fail = |row: MachineDeploy, phase: Phase, e: String| {
        send(done(name, phase, Err(&e)));
        MachineDeploy { seconds: start.elapsed().as_secs_f64(), ..row.fail(phase, e) }
    };
    let rolled_back = |row: MachineDeploy, phase: Phase, mut e: String| {
        // What ran before runs again, but the platform's plumbing stays as the failed
        // generation left it (a downed link outlives the rollback): put it back.
        match m.restore() {
            Ok(Some(restored)) => e.push_str(&format!("; {restored}")),
            Ok(None) => {}
            Err(r) => e.push_str(&format!("; restoring its plumbing failed too: {}", r.message())),
        }
        send(done(name, phase, Err(&e)));
        MachineDeploy { seconds: start.elapsed().as_secs_f64(), ..row.rolled_back(phase, e) }
    };

    // Pre-flight: reachable, a protocol this deployer speaks, not busy, room for the closure.
    // It and the copy take a place in the copy phase.
    let copying = slots.copy.take();
    if let Some(why) = slots.lease.lost() {
        return fail(row, Phase::Preflight, why);
    }
    send(EngineEvent::MachinePhase { machine: name.clone(), phase: Phase::Preflight });
    let mut client = match m.connect() {
        Ok(c) => c,
        Err(e) => return fail(row, Phase::Preflight, e.to_string()),
    };
    if closure.is_empty() {
        return fail(row, Phase::Preflight, format!("the closure of {toplevel} is not in the local store"));
    }
    // The first question says whether there is anything to do at all: a machine that runs
    // this toplevel as the deploy would leave it (its keys included) is done here.
    let asks = opts.goal.activation().filter(|g| *g == ActivationGoal::Switch && !opts.reactivate && t.build_on_host.is_none());
    let (status, differs) = match asks {
        Some(goal) => match client.current(toplevel, goal, crate::keys::expected(keys)) {
            Ok(answer) => answer,
            Err(e) => return fail(row, Phase::Preflight, e.to_string()),
        },
        None => match client.status() {
            Ok(s) => (s, Some(String::new())),
            Err(e) => return fail(row, Phase::Preflight, e.to_string()),
        },
    };
    if differs.is_none() {
        drop(copying);
        row.previous_generation = status.generation;
        row.previous_toplevel = status.toplevel.clone();
        row.generation = status.generation;
        row.activated = true;
        if let Err(e) = m.now_runs(toplevel) {
            return fail(row, Phase::Preflight, format!("it runs {toplevel}, but {}", e.message()));
        }
        send(done(name, Phase::Preflight, Ok("unchanged: it runs this system")));
        // The deployer's own checks: what users outside the machine see, unchanged or not.
        if !checks.is_empty() {
            send(EngineEvent::MachinePhase { machine: name.clone(), phase: Phase::Check });
            row.checks = checks.iter().map(|(n, c)| crate::checks::run(n, c)).collect();
            if let Some(bad) = row.checks.iter().find(|c| !c.ok) {
                let problem = format!("deployer check {} ({}) failed after {} probes: {}", bad.name, bad.url, bad.probes, bad.output);
                return fail(row, Phase::Check, problem);
            }
            send(done(name, Phase::Check, Ok(&format!("{} checks passed", row.checks.len()))));
        }
        row.outcome = Outcome::Unchanged;
        row.summary = "unchanged: nothing copied, nothing restarted".to_owned();
        row.seconds = start.elapsed().as_secs_f64();
        return row;
    }
    if let Some(g) = status.pending_confirmation {
        return fail(row, Phase::Preflight, format!("generation {g} still awaits confirmation from an earlier deploy; wait until it is confirmed or rolled back (at most its --confirm-timeout), then deploy again"));
    }
    row.previous_generation = status.generation;
    row.previous_toplevel = status.toplevel.clone();
    let mut plan = match client.plan_copy(closure) {
        Ok(p) => p,
        Err(e) => return fail(row, Phase::Preflight, e.to_string()),
    };
    if let Some(free) = status.store_free_bytes {
        let need = plan.bytes();
        if need.saturating_add(FREE_MARGIN) > free {
            return fail(row, Phase::Preflight, format!(
                "the machine's store needs {} for {} new paths (and keeps {} spare) but has {} free; free space on the machine (delete old generations) or give it a bigger disk",
                human_bytes(need), plan.send.len(), human_bytes(FREE_MARGIN), human_bytes(free)
            ));
        }
    }
    let why = differs.filter(|d| !d.is_empty()).map(|d| format!(" ({d})")).unwrap_or_default();
    send(done(name, Phase::Preflight, Ok(&format!("protocol {}, {} paths to send{why}", client.welcome().version, plan.send.len()))));

    send(EngineEvent::MachinePhase { machine: name.clone(), phase: Phase::Copy });
    // The machine fetches what its caches have; the deployer pushes only the rest.
    let substituted = match t.substitute {
        Some(d) => match client.substitute(&mut plan, &d.substituters, &d.trusted_public_keys, &mut |_| {}) {
            Ok(s) => Some(s),
            // The agent refused the request itself (a bad URL or key): the user's to fix.
            Err(e @ RemoteError::Agent { .. }) => return fail(row, Phase::Copy, format!("fetching from its caches failed: {e}")),
            // The conversation broke (the agent went silent or away while fetching): a cache
            // that is down never fails a deploy, so talk to the agent afresh and push what it
            // still lacks.
            Err(e) => {
                drop(client);
                client = match m.connect() {
                    Ok(c) => c,
                    Err(c) => return fail(row, Phase::Copy, format!("fetching from its caches failed: {e}; reconnecting to push instead failed too: {c}")),
                };
                plan = match client.plan_copy(closure) {
                    Ok(p) => p,
                    Err(c) => return fail(row, Phase::Copy, format!("fetching from its caches failed: {e}; asking what to push instead failed too: {c}")),
                };
                let detail = format!("fetching from its caches failed ({e}), pushed instead");
                let missed: Vec<_> = plan.send.iter().map(|i| flotilla_protocol::SubstituteMiss { path: i.path.clone(), reason: flotilla_protocol::MissReason::Other, detail: detail.clone() }).collect();
                let pushed_because = [("substitution failed".to_owned(), missed.len() as u64)].into();
                Some(crate::remote::SubstituteStats { missed, pushed_because, ..Default::default() })
            }
        },
        None => None,
    };
    let mut progress = |p: &crate::remote::CopyProgress| {
        send(EngineEvent::CopyProgress { machine: name.clone(), bytes: p.bytes, total_bytes: p.total_bytes, paths: p.paths, total_paths: p.total_paths });
    };
    let copy = match client.copy_planned(plan, Compression::None, &mut progress) {
        Ok(c) => CopyStats { substituted, ..c },
        Err(e) => return fail(row, Phase::Copy, e.to_string()),
    };
    let copied = copy.paths_sent + copy.substituted.as_ref().map_or(0, |s| s.paths);
    send(done(name, Phase::Copy, Ok(&copy_summary(&copy))));
    row.copy = Some(copy);
    drop(copying);

    let Some(goal) = opts.goal.activation() else {
        row.outcome = if copied == 0 { Outcome::Unchanged } else { Outcome::Deployed };
        row.summary = copy_summary(row.copy.as_ref().expect("set above"));
        row.seconds = start.elapsed().as_secs_f64();
        return row;
    };

    // Keys, activation, checks and confirmation take a place in the activation phase.
    let _activating = slots.activate.take();
    if let Some(why) = slots.lease.lost() {
        return fail(row, Phase::Activate, why);
    }
    let mut key_notes = Vec::new();
    if goal.sends_keys() && keys.iter().any(|k| k.upload_at == UploadAt::PreActivation) {
        send(EngineEvent::MachinePhase { machine: name.clone(), phase: Phase::Keys });
        match crate::keys::sync(&mut client, keys, Some(UploadAt::PreActivation), false, goal.is_checked().then_some(toplevel)) {
            Ok(put) => key_notes.push(crate::keys::summary(&put)),
            Err(e) => return fail(row, Phase::Keys, e.to_string()),
        }
    }

    send(EngineEvent::MachinePhase { machine: name.clone(), phase: Phase::Activate });
    let checked = goal.is_checked();
    let confirm = opts.confirm_timeout.filter(|_| checked).map(|t| t.as_secs().max(1));
    let activated = match client.activate(toplevel, goal, Some(opts.check_timeout.as_secs().max(1)), confirm) {
        Ok(a) => a,
        // Only a checked activation is rolled back by the agent; for `boot` and `dry-activate`
        // the error is a plain failure.
        Err(RemoteError::Agent { kind: ErrorKind::Activation, message }) if checked => return rolled_back(row, Phase::Activate, message),
        Err(RemoteError::Agent { kind: ErrorKind::Unhealthy, message }) => return fail(row, Phase::Activate, message),
        Err(e) => return fail(row, Phase::Activate, e.to_string()),
    };
    let generation = activated.generation;
    let changes = activation_summary(&activated.report);
    send(done(name, Phase::Activate, Ok(&changes)));
    row.generation = Some(generation);
    row.activated = goal.activates();
    row.health = activated.health;
    let mut unchanged = copied == 0 && row.previous_generation == Some(generation) && nothing_changed(&activated.report);
    row.activation = Some(activated.report);
    if activated.awaiting_confirmation {
        send(EngineEvent::AwaitingConfirmation { machine: name.clone(), generation, within_secs: confirm.unwrap_or(0) });
    }

    // The deployer's own checks: what users outside the machine see.
    if checked && !checks.is_empty() {
        send(EngineEvent::MachinePhase { machine: name.clone(), phase: Phase::Check });
        row.checks = checks.iter().map(|(n, c)| crate::checks::run(n, c)).collect();
        if let Some(bad) = row.checks.iter().find(|c| !c.ok) {
            let problem = format!("deployer check {} ({}) failed after {} probes: {}", bad.name, bad.url, bad.probes, bad.output);
            // Pending: the agent rejects it. Not pending (no confirmation asked): back to the
            // generation it ran before, if that is another one.
            let back = if activated.awaiting_confirmation {
                client.rollback(None, Some(&problem))
            } else {
                match row.previous_generation.filter(|p| *p != generation) {
                    Some(previous) => client.rollback(Some(previous), None),
                    None => return fail(row, Phase::Check, problem),
                }
            };
            return match back {
                Ok((now, report)) if report.messages.is_empty() => rolled_back(row, Phase::Check, format!("{problem}; generation {now} runs again")),
                Ok((_, report)) => rolled_back(row, Phase::Check, report.messages.join("; ")),
                Err(RemoteError::Agent { kind: ErrorKind::NotFound, .. }) => {
                    rolled_back(row, Phase::Check, format!("{problem}; the agent had already rolled back: its confirmation window closed first (raise --confirm-timeout above the checks' time)"))
                }
                Err(e) => fail(row, Phase::Check, format!("{problem}; asking the agent to roll back failed: {e}")),
            };
        }
        send(done(name, Phase::Check, Ok(&format!("{} checks passed", row.checks.len()))));
    }

    // Confirm over a new connection: proof that the new system still lets the deployer in,
    // once the machine proved it is reachable the way its users reach it (for a local
    // machine the agent's connection goes through its root directory, not its network).
    if activated.awaiting_confirmation {
        send(EngineEvent::MachinePhase { machine: name.clone(), phase: Phase::Confirm });
        if let Err(why) = m.check_reachable() {
            let problem = format!("the machine is not reachable after activating generation {generation}: {why}");
            return match client.rollback(None, Some(&problem)) {
                Ok((now, _)) => rolled_back(row, Phase::Confirm, format!("{problem}; generation {generation} was not confirmed, generation {now} runs again")),
                Err(e) => rolled_back(row, Phase::Confirm, format!("{problem}; generation {generation} was not confirmed (asking the agent to roll back now failed: {e}), so the agent rolls it back by itself when its confirmation window closes")),
            };
        }
        match m.connect().and_then(|mut c| c.confirm(generation)) {
            Ok(()) => send(done(name, Phase::Confirm, Ok(&format!("generation {generation} kept")))),
            Err(RemoteError::Agent { kind: ErrorKind::NotFound, .. }) => {
                return rolled_back(row, Phase::Confirm, format!("generation {generation} was rolled back by the agent before the confirmation arrived (its --confirm-timeout passed)"))
            }
            Err(e) => return rolled_back(row, Phase::Confirm, format!("the confirmation did not reach the agent ({e}); it rolls generation {generation} back by itself")),
        }
    }

    // The generation is kept: the machine boots it from now on (for a platform that boots
    // machines itself). Should that fail, the running generation still gets its keys below,
    // and the row fails after them.
    let boot_failed = (goal.activates() && goal != ActivationGoal::Test).then(|| m.now_runs(toplevel).err()).flatten();

    if goal.sends_keys() {
        let post = keys.iter().any(|k| k.upload_at == UploadAt::PostActivation);
        if post {
            send(EngineEvent::MachinePhase { machine: name.clone(), phase: Phase::Keys });
        }
        match crate::keys::sync(&mut client, keys, Some(UploadAt::PostActivation), true, None) {
            Ok(put) => key_notes.push(crate::keys::summary(&put)),
            Err(e) => return fail(row, Phase::Keys, e.to_string()),
        }
    }
    if let Some(e) = boot_failed {
        return fail(row, Phase::Activate, format!("generation {generation} runs, but {}", e.message()));
    }
    key_notes.retain(|n| !n.is_empty());
    if !key_notes.is_empty() {
        unchanged = false;
        row.keys = Some(key_notes.join(", "));
    }

    row.outcome = if unchanged { Outcome::Unchanged } else { Outcome::Deployed };
    row.summary = if unchanged {
        "unchanged: nothing copied, nothing restarted".to_owned()
    } else {
        let mut s = format!("{}; {changes}", copy_summary(row.copy.as_ref().expect("set above")));
        if let Some(k) = &row.keys {
            s.push_str("; ");
            s.push_str(k);
        }
        s
    };
    row.seconds = start.elapsed().as_secs_f64();
    row
}

/// Returns a machine to the generation it ran before this deploy.
fn revert_machine(m: &dyn Machine, previous: Option<u64>) -> std::result::Result<String, String> {
    let Some(previous) = previous else {
        return Err("it ran no generation before this deploy, so there is nothing to revert to".into());
    };
    let mut client = m.connect().map_err(|e| e.to_string())?;
    client.rollback(Some(previous), None).map_err(|e| e.to_string())?;
    if let Some(toplevel) = client.status().map_err(|e| e.to_string())?.toplevel {
        m.now_runs(&toplevel).map_err(|e| format!("reverted to generation {previous}, but {}", e.message()))?;
    }
    Ok(format!("reverted to generation {previous}"))
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
    let pushed = if c.paths_sent == 0 { "nothing copied".into() } else { format!("copied {} paths ({})", c.paths_sent, human_bytes(c.bytes_sent)) };
    match &c.substituted {
        Some(s) if s.paths > 0 || !s.missed.is_empty() => format!("{}; {pushed}", s.summary()),
        _ => pushed,
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
        parts.push("nothing restarted".into());
    }
    // What the agent wants the user to know (a file it left alone, a host's Nix it used).
    parts.join(", ") + &r.messages.iter().map(|m| format!("; {m}")).collect::<String>()
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
    fn goals_say_how_far_they_go() {
        let row = |g: Goal| (g.provisions(), g.activates(), g.is_checked(), g.sends_keys());
        assert_eq!(row(Goal::Build), (false, false, false, false));
        assert_eq!(row(Goal::Copy), (true, false, false, false));
        assert_eq!(row(Goal::Switch), (true, true, true, true));
        assert_eq!(row(Goal::Boot), (true, true, false, true));
        assert_eq!(row(Goal::Test), (true, true, true, true));
        assert_eq!(row(Goal::DryActivate), (true, false, false, false));
    }
}
