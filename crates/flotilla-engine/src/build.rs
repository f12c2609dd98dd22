//! Building: every selected machine's toplevel instantiated and realised in one Nix call,
//! GC roots set first, and the run recorded (the evaluation, the builds, each failure) in one
//! state DB transaction. Also the check that the agent binary built into every toplevel is
//! usable at all.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_model::MachineName;
use flotilla_nix::{EvalArgs, NixError};
use flotilla_store::StorePath;
use serde::Serialize;

use crate::eval::with_upserts;
use crate::{gcroots, Engine, EngineError, EngineEvent, Evaluated, Listener, Phase, Result, Toplevels};

/// One machine's build result.
#[derive(Debug, Clone, Serialize)]
pub struct MachineBuild {
    /// The machine.
    pub machine: MachineName,
    /// Its toplevel, when built.
    pub toplevel: Option<StorePath>,
    /// Why not, when not.
    pub error: Option<String>,
}

/// The outcome of `build`.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    /// The deployment.
    pub deployment: String,
    /// Per machine.
    pub machines: Vec<MachineBuild>,
    /// Wall time.
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
    /// The built toplevels' closure, references first, when it was read while building.
    #[serde(skip)]
    pub closure: Option<Vec<flotilla_nix::PathInfo>>,
    /// The machines whose systems are left to their hosts to build, with their derivations.
    #[serde(skip)]
    pub on_target: Toplevels,
}

pub(crate) fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

impl BuildReport {
    /// Whether every machine built.
    pub fn all_ok(&self) -> bool {
        self.machines.iter().all(|m| m.error.is_none())
    }
}

impl Engine {
    /// Builds the selected machines' toplevels in one Nix call and records the deployment,
    /// its machines, facts and builds. Machines that fail to build are reported, not fatal.
    pub fn build(&mut self, ev: &Evaluated, selected: &[MachineName], agent: &Path, listen: Listener<'_>) -> Result<BuildReport> {
        self.build_instantiated(ev, selected, agent, None, listen)
    }

    /// [`Engine::build`], with the toplevels [`Engine::evaluate_for_build`] may already have
    /// instantiated.
    pub fn build_instantiated(&mut self, ev: &Evaluated, selected: &[MachineName], agent: &Path, instantiated: Option<Toplevels>, listen: Listener<'_>) -> Result<BuildReport> {
        check_agent(agent)?;
        self.build_checked(ev, selected, agent, instantiated, &BTreeSet::new(), listen)
    }

    /// [`Engine::build_instantiated`] with an agent binary the caller has checked already
    /// (a deploy checks it once, before anything else). The machines in `on_target` are only
    /// instantiated here: their hosts build them (`deploy.buildOnTarget`), so their `.drv`s are
    /// rooted instead of their outputs, and their rows name the toplevel to come.
    pub(crate) fn build_checked(
        &mut self,
        ev: &Evaluated,
        selected: &[MachineName],
        agent: &Path,
        instantiated: Option<Toplevels>,
        on_target: &BTreeSet<MachineName>,
        listen: Listener<'_>,
    ) -> Result<BuildReport> {
        let start = Instant::now();
        listen(&EngineEvent::PhaseStarted { phase: Phase::Build, machines: selected.to_vec() });
        let all = self.instantiate(ev, selected, agent, instantiated)?;
        let (remote, toplevels): (Toplevels, Toplevels) = all.into_iter().partition(|(m, _)| on_target.contains(m));

        // A host that cannot build at all says so once, with the fix, rather than as every
        // machine's build failure, and before anything is written (a toplevel not on disk
        // needs building; which ones do, the closure query below says exactly).
        let outs: Vec<StorePath> = toplevels.values().map(|t| t.out.clone()).collect();
        if !self.nix.invalid(&outs)?.is_empty() {
            self.nix.check_build_setup()?;
        }

        // Roots first: a GC running while we build must not take what we are building.
        let roots = gcroots::Roots::new(self.state.path(), ev.name.as_str());
        for (machine, t) in &toplevels {
            roots.set(machine.as_str(), &t.out)?;
        }
        // A system built elsewhere needs its derivation here until it is copied there.
        for (machine, t) in &remote {
            roots.set(machine.as_str(), &t.drv)?;
        }

        // When every toplevel is valid already, their closure's metadata is the proof, and
        // nothing needs realising; the copy needs that metadata anyway.
        let closure = self.nix.closure_info(&outs)?;
        let outcome = match closure {
            Some(_) => flotilla_nix::RealiseOutcome::default(),
            None => {
                let drvs: Vec<StorePath> = toplevels.values().map(|t| t.drv.clone()).collect();
                self.nix.realise(&drvs, &ev.builders, &mut |line| listen(&EngineEvent::NixLog { line: line.to_owned() }))?
            }
        };
        for note in &outcome.notes {
            listen(&EngineEvent::Note { message: note.clone() });
        }
        // The daemon built here what the builders should have: said once; a machine that
        // may build only on them fails with it as its reason (see `failure_reason`).
        if let Some(ignored) = outcome.builders_ignored.as_ref().filter(|_| ev.builders.local) {
            listen(&EngineEvent::Note { message: format!("{ignored}; built on this host instead") });
        }
        // A builder that could not be reached, while everything built: Nix built it here.
        if outcome.errors.is_empty() {
            for down in &outcome.unusable_builders {
                listen(&EngineEvent::Note { message: format!("{down}; built on this host instead (`meta.buildLocally = false` fails the build instead)") });
            }
        }

        // Built means valid: a failed build may leave its output's directory on disk.
        let unbuilt: BTreeSet<StorePath> = if closure.is_some() { BTreeSet::new() } else { self.nix.invalid(&outs)?.into_iter().collect() };
        let mut results = Vec::new();
        for machine in selected {
            if let Some(t) = remote.get(machine) {
                listen(&EngineEvent::MachineDone { machine: machine.clone(), phase: Phase::Build, ok: true, detail: format!("{} (to be built on the machine's host)", t.out) });
                results.push(MachineBuild { machine: machine.clone(), toplevel: Some(t.out.clone()), error: None });
                continue;
            }
            let Some(t) = toplevels.get(machine) else { continue };
            let built = !unbuilt.contains(&t.out);
            let error = if built {
                None
            } else {
                Some(self.failure_reason(&t.drv, &outcome))
            };
            listen(&EngineEvent::MachineDone {
                machine: machine.clone(),
                phase: Phase::Build,
                ok: built,
                detail: error.clone().unwrap_or_else(|| t.out.to_string()),
            });
            results.push(MachineBuild { machine: machine.clone(), toplevel: built.then(|| t.out.clone()), error });
        }

        let mut recorded = toplevels.clone();
        recorded.extend(remote.iter().map(|(m, t)| (m.clone(), t.clone())));
        self.record(ev, &recorded, &results)?;
        Ok(BuildReport { deployment: ev.name.to_string(), machines: results, elapsed: start.elapsed(), closure, on_target: remote })
    }

    /// The selected machines' toplevels, instantiated (their `.drv`s written) but not built:
    /// those `evaluate_for_build` instantiated already, or from one Nix evaluation.
    pub(crate) fn instantiate(&self, ev: &Evaluated, selected: &[MachineName], agent: &Path, instantiated: Option<Toplevels>) -> Result<Toplevels> {
        Ok(match instantiated {
            Some(all) => all.into_iter().filter(|(m, _)| selected.contains(m)).collect(),
            None => {
                let args = EvalArgs {
                    deployment: &ev.file,
                    facts_json: serde_json::to_string(&ev.facts).expect("facts serialise"),
                    agent: Some(agent),
                    only: selected.iter().map(ToString::to_string).collect(),
                };
                serde_json::from_value(self.nix.eval_json("toplevels", &args, true)?)
                    .map_err(|e| NixError::Output { command: "eval.nix toplevels".into(), detail: e.to_string() })?
            }
        })
    }

    /// Why `drv` did not build: Nix's errors about its closure (all of them when none names
    /// it), and the builders Nix could not reach, named, since a build that could not start
    /// anywhere says nothing of its own about them.
    fn failure_reason(&self, drv: &StorePath, outcome: &flotilla_nix::RealiseOutcome) -> String {
        let errors = &outcome.errors;
        let closure = self.nix.drv_closure(drv).unwrap_or_default();
        let mine: Vec<&str> = errors
            .iter()
            .filter(|e| closure.iter().any(|d| e.contains(&d.to_absolute())))
            .map(String::as_str)
            .collect();
        let text = if mine.is_empty() { errors.join("\n") } else { mine.join("\n") };
        let text = text.trim();
        let text = text.strip_prefix("error: ").unwrap_or(text).to_owned();
        let mut reason = text;
        for why in outcome.builders_ignored.iter().chain(&outcome.unusable_builders) {
            reason.push('\n');
            reason.push_str(why);
        }
        reason
    }

    fn record(&mut self, ev: &Evaluated, toplevels: &Toplevels, results: &[MachineBuild]) -> Result<()> {
        let paths: Vec<(&str, String, String)> = results
            .iter()
            .filter_map(|r| Some((r.machine.as_str(), r.toplevel.as_ref()?.to_string(), toplevels.get(&r.machine)?.drv.to_string())))
            .collect();
        let builds: Vec<(&str, &str, &str)> = paths.iter().map(|(m, o, d)| (*m, o.as_str(), d.as_str())).collect();
        let failures: Vec<(&str, &str)> = results.iter().filter_map(|r| Some((r.machine.as_str(), r.error.as_deref()?))).collect();
        let (state, actor) = (&mut self.state, &self.actor);
        with_upserts(ev, |dep, machines| state.record_build_run(dep, machines, actor, &builds, &failures))?;
        Ok(())
    }
}

/// Refuses an agent that is missing or dynamically linked: it runs inside Nix builds and on
/// targets that have no libc of ours.
pub fn check_agent(agent: &Path) -> Result<()> {
    use std::io::Read as _;
    // The ELF header and program headers sit at the start of the file; 64 KiB covers them.
    let mut bytes = Vec::with_capacity(64 << 10);
    let read = std::fs::File::open(agent).and_then(|f| f.take(64 << 10).read_to_end(&mut bytes));
    read.map_err(|e| {
        EngineError::Agent(format!(
            "cannot read the agent binary {}: {e}; build it with `cargo build -p flotilla-agent` or point FLOTILLA_AGENT at it",
            agent.display()
        ))
    })?;
    if has_interpreter(&bytes) {
        return Err(EngineError::Agent(format!(
            "the agent binary {} is dynamically linked; build it statically (this repository's .cargo/config.toml does)",
            agent.display()
        )));
    }
    Ok(())
}

/// Whether an ELF64 little-endian file asks for a program interpreter (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return true; // not a 64-bit ELF: treat as unusable
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return true;
    };
    (0..phnum).any(|i| u32_at(phoff + i * phentsize) == Some(3))
}
