//! `plan`: what a deploy would change on each selected machine, before anything is
//! provisioned, copied or activated. What the machine would do (services, `/etc`, accounts,
//! health checks) is the agent's own comparison (`Request::Plan`, or for a machine not
//! provisioned yet `flotilla-agent plan` against an empty root on this host), so the plan is
//! what the switch does; the deployer adds what only it knows: the closure diff by package,
//! the bytes the machine lacks (its `QueryMissing`) and the keys [`crate::keys::sync`] would
//! send. It must never create, start, copy to or change a machine.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use flotilla_model::MachineName;
use flotilla_nix::PathInfo;
use flotilla_protocol::{ActivationGoal, Request, ServiceAction, SystemPlan};
use flotilla_store::StorePath;
use serde::Serialize;

use crate::deploy::Goal;
use crate::jobs::{done, fan_out};
use crate::platform::{self, MachineState};
use crate::{Engine, EngineEvent, Evaluated, Listener, Phase, Result};

/// Where a machine stands against its new system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanStatus {
    /// It runs another system: generation N becomes N+1.
    Change,
    /// It runs this toplevel already.
    Unchanged,
    /// It is not provisioned: everything is planned against an empty machine.
    New,
    /// `--no-build`: its toplevel is not built, so only that is known.
    NotBuilt,
    /// It could not be planned (see the error).
    Failed,
}

/// A package of a closure: a store path's name as Nix's `DrvName` splits it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Package {
    /// The name, e.g. `hello`.
    pub name: String,
    /// The version, e.g. `2.12`; empty when the name has none.
    pub version: String,
}

/// A package whose version changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageChange {
    /// The name.
    pub name: String,
    /// The versions before (comma-separated when several).
    pub old: String,
    /// The versions after.
    pub new: String,
}

/// How the closure changes, by package, as `nix store diff-closures` and nvd show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClosureDiff {
    /// Packages only in the new closure.
    pub added: Vec<Package>,
    /// Packages only in the old closure.
    pub removed: Vec<Package>,
    /// Packages in both, at other versions.
    pub changed: Vec<PackageChange>,
    /// NAR bytes of the running closure.
    pub size_before: u64,
    /// NAR bytes of the new closure.
    pub size_after: u64,
}

/// One machine's plan.
#[derive(Debug, Clone, Serialize)]
pub struct MachinePlan {
    /// The machine.
    pub machine: MachineName,
    /// Where it stands.
    pub status: PlanStatus,
    /// The generation it runs now.
    pub generation: Option<u64>,
    /// The generation the deploy would make.
    pub next_generation: Option<u64>,
    /// The system it runs now.
    pub current_toplevel: Option<StorePath>,
    /// The system it would run.
    pub toplevel: Option<StorePath>,
    /// The closure diff.
    pub closure: ClosureDiff,
    /// Store paths the machine lacks, which the deploy would send (or its caches give).
    pub paths_to_send: u64,
    /// Their NAR bytes.
    pub bytes_to_send: u64,
    /// What the agent would do.
    pub system: SystemPlan,
    /// Keys the machine does not have.
    pub keys_added: Vec<String>,
    /// Keys whose contents, place, owner or mode differ.
    pub keys_changed: Vec<String>,
    /// Keys no longer declared, which the deploy deletes.
    pub keys_removed: Vec<String>,
    /// What the plan cannot know or what the goal changes about it, in words (a machine
    /// built on its host, a host not provisioned yet, a goal that does not switch).
    pub notes: Vec<String>,
    /// Why it could not be planned.
    pub error: Option<String>,
}

/// How a plan is made: the deploy it stands for.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    /// Evaluate only: plan the machines whose systems are built already.
    pub no_build: bool,
    /// The goal the deploy would go to.
    pub goal: Goal,
    /// Every selected machine is built on its own host (`--build-on target`), as machines
    /// with `deploy.buildOnTarget` are anyway.
    pub build_on_target: bool,
}

impl Default for PlanOptions {
    fn default() -> PlanOptions {
        PlanOptions { no_build: false, goal: Goal::Switch, build_on_target: false }
    }
}

/// The whole fleet's totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlanSummary {
    /// Machines that would change.
    pub changing: usize,
    /// Machines that run their system already.
    pub unchanged: usize,
    /// Machines not provisioned yet.
    pub new: usize,
    /// Machines not built (`--no-build`) or that could not be planned.
    pub unknown: usize,
    /// NAR bytes to send in all.
    pub bytes_to_send: u64,
}

/// The outcome of `plan`.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    /// The deployment.
    pub deployment: String,
    /// Per machine.
    pub machines: Vec<MachinePlan>,
    /// Totals.
    pub summary: PlanSummary,
}

impl PlanReport {
    /// The toplevel each planned machine would run: what a confirmed deploy must build.
    pub fn toplevels(&self) -> BTreeMap<MachineName, StorePath> {
        self.machines.iter().filter_map(|m| Some((m.machine.clone(), m.toplevel.clone()?))).collect()
    }

    /// Whether every machine was planned, or (`--no-build`) is only not built yet.
    pub fn all_ok(&self) -> bool {
        self.machines.iter().all(|m| m.status != PlanStatus::Failed)
    }

    /// Whether every machine was planned in full: what a deploy of the plan needs.
    pub fn all_planned(&self) -> bool {
        self.machines.iter().all(|m| !matches!(m.status, PlanStatus::Failed | PlanStatus::NotBuilt))
    }
}

impl MachinePlan {
    fn new(machine: &MachineName, toplevel: Option<StorePath>) -> MachinePlan {
        MachinePlan {
            machine: machine.clone(),
            status: PlanStatus::Failed,
            generation: None,
            next_generation: None,
            current_toplevel: None,
            toplevel,
            closure: ClosureDiff::default(),
            paths_to_send: 0,
            bytes_to_send: 0,
            system: SystemPlan::default(),
            keys_added: Vec::new(),
            keys_changed: Vec::new(),
            keys_removed: Vec::new(),
            notes: Vec::new(),
            error: None,
        }
    }

    fn failed(mut self, error: String) -> MachinePlan {
        self.status = PlanStatus::Failed;
        self.error = Some(error);
        self
    }
}

impl Engine {
    /// Plans a deploy of the selected machines: builds their toplevels (or with `no_build`
    /// only instantiates them) and asks each what it would change. Nothing is provisioned,
    /// copied or activated, and no lock is taken (it reads only).
    pub fn plan_deploy(&mut self, ev: &Evaluated, selected: &[MachineName], agent: &Path, instantiated: Option<crate::Toplevels>, opts: PlanOptions, listen: Listener<'_>) -> Result<PlanReport> {
        crate::check_agent(agent)?;
        let mut rows: BTreeMap<MachineName, MachinePlan> = BTreeMap::new();
        let mut toplevels: BTreeMap<MachineName, StorePath> = BTreeMap::new();
        // Machines their hosts build, as the deploy would (`--goal build` builds here): the
        // deployer does not build them for their plan either.
        let on_target: BTreeSet<MachineName> = if opts.goal.provisions() {
            selected.iter().filter(|n| matches!(ev.machines[*n].platform, flotilla_model::Platform::Ssh(_)) && (opts.build_on_target || ev.machines[*n].deploy.build_on_target)).cloned().collect()
        } else {
            BTreeSet::new()
        };
        let mut remote: BTreeMap<MachineName, StorePath> = BTreeMap::new();
        if opts.no_build {
            let all = self.instantiate(ev, selected, agent, instantiated)?;
            let outs: Vec<StorePath> = all.iter().filter(|(name, _)| !on_target.contains(*name)).map(|(_, t)| t.out.clone()).collect();
            let unbuilt: BTreeSet<StorePath> = self.nix.invalid(&outs)?.into_iter().collect();
            for (name, t) in all {
                if on_target.contains(&name) {
                    remote.insert(name, t.out);
                } else if !unbuilt.contains(&t.out) {
                    toplevels.insert(name, t.out);
                } else {
                    let mut row = MachinePlan::new(&name, Some(t.out));
                    row.status = PlanStatus::NotBuilt;
                    row.error = Some("not built yet: run `flotilla plan` without --no-build (or `flotilla build`) to see its changes".into());
                    rows.insert(name, row);
                }
            }
        } else {
            for b in self.build_checked(ev, selected, agent, instantiated, &on_target, listen)?.machines {
                match b.toplevel {
                    Some(t) if on_target.contains(&b.machine) => {
                        remote.insert(b.machine, t);
                    }
                    Some(t) => {
                        toplevels.insert(b.machine, t);
                    }
                    None => {
                        let row = MachinePlan::new(&b.machine, None).failed(b.error.unwrap_or_else(|| "the build failed".into()));
                        rows.insert(b.machine, row);
                    }
                }
            }
        }
        let outs: Vec<StorePath> = toplevels.values().cloned().collect();
        let closure = self.nix.closure_info(&outs)?.unwrap_or_default();
        let ctx = self.context(ev.name.as_str(), agent);
        let work: Vec<(&MachineName, &StorePath)> = toplevels.iter().chain(remote.iter()).collect();
        listen(&EngineEvent::PhaseStarted { phase: Phase::Preflight, machines: work.iter().map(|(n, _)| (*n).clone()).collect() });
        let planned = fan_out(&work, self.limits.copy, listen, |(name, toplevel), send| {
            send(EngineEvent::MachinePhase { machine: (*name).clone(), phase: Phase::Preflight });
            let row = if on_target.contains(*name) {
                plan_on_target(&ctx, ev, name, toplevel)
            } else {
                let infos = flotilla_nix::closure_within(&closure, std::slice::from_ref(*toplevel));
                plan_machine(&ctx, ev, name, toplevel, &infos, agent, opts.goal)
            };
            let row = for_goal(row, opts.goal);
            let detail = match (&row.error, row.status) {
                (Some(e), _) => Err(e.as_str()),
                (None, PlanStatus::New) => Ok("new machine"),
                (None, PlanStatus::Unchanged) => Ok("unchanged"),
                (None, _) => Ok("changes"),
            };
            send(done(name, Phase::Preflight, detail));
            row
        });
        for row in planned {
            rows.insert(row.machine.clone(), row);
        }
        let machines: Vec<MachinePlan> = selected.iter().filter_map(|n| rows.remove(n)).collect();
        let mut summary = PlanSummary::default();
        for m in &machines {
            match m.status {
                PlanStatus::Change => summary.changing += 1,
                PlanStatus::Unchanged => summary.unchanged += 1,
                PlanStatus::New => summary.new += 1,
                PlanStatus::NotBuilt | PlanStatus::Failed => summary.unknown += 1,
            }
            summary.bytes_to_send += m.bytes_to_send;
        }
        Ok(PlanReport { deployment: ev.name.to_string(), machines, summary })
    }
}

/// One machine's plan: asked of its agent when it runs, else of `flotilla-agent plan` against
/// nothing.
fn plan_machine(ctx: &platform::Context, ev: &Evaluated, name: &MachineName, toplevel: &StorePath, closure: &[PathInfo], agent: &Path, goal: Goal) -> MachinePlan {
    let mut row = MachinePlan::new(name, Some(toplevel.clone()));
    if closure.is_empty() {
        return row.failed(format!("the closure of {toplevel} is not in the local store"));
    }
    let cfg = &ev.machines[name];
    let keys = match crate::keys::resolve(name.as_str(), &cfg.keys) {
        Ok(k) => k,
        Err(e) => return row.failed(e),
    };
    let manifest = match std::fs::read_to_string(Path::new(&toplevel.to_absolute()).join("manifest.json")) {
        Ok(m) => m,
        Err(e) => return row.failed(format!("cannot read the manifest of {toplevel}: {e}")),
    };
    let m = match platform::machine(ctx, name.as_str(), &cfg.platform, &ev.facts.get(name).cloned().unwrap_or_default()) {
        Ok(m) => m,
        Err(e) => return row.failed(e.into_message()),
    };
    let new_size: u64 = closure.iter().map(|i| i.nar_size).sum();
    match m.state() {
        MachineState::Missing => {
            let (written, _) = crate::keys::changes(&[], &keys, None, true);
            row.keys_added = written.into_iter().map(|k| k.name).collect();
            match plan_new(agent, toplevel, &manifest, &row.keys_added) {
                Ok(system) => row.system = system,
                Err(e) => return row.failed(e),
            }
            row.status = PlanStatus::New;
            row.next_generation = row.system.next_generation;
            if matches!(cfg.platform, flotilla_model::Platform::Ssh(_)) {
                row.notes.push("against an empty machine: the host's existing files and accounts are not checked".into());
            }
            row.paths_to_send = closure.len() as u64;
            row.bytes_to_send = new_size;
            row.closure = closure_diff(&[], closure);
            row
        }
        MachineState::Running => {
            let asked = (|| {
                let mut client = m.connect()?;
                let status = client.status()?;
                let have = client.list_keys()?;
                let copy = client.plan_copy(closure)?;
                let (put, remove) = crate::keys::changes(&have, &keys, None, true);
                let on_machine = !copy.send.iter().any(|i| &i.path == toplevel);
                let written: Vec<String> = put.iter().map(|k| k.name.clone()).collect();
                let activation = goal.activation().unwrap_or(ActivationGoal::Switch);
                let system = client.plan(toplevel, (!on_machine).then(|| manifest.clone()), written, activation)?;
                Ok::<_, crate::remote::RemoteError>((status, have, copy, put, remove, system))
            })();
            let (status, have, copy, put, remove, mut system) = match asked {
                Ok(a) => a,
                Err(e) => return row.failed(e.to_string()),
            };
            let had: BTreeSet<&str> = have.iter().map(|k| k.name.as_str()).collect();
            for k in put {
                if had.contains(k.name.as_str()) { row.keys_changed.push(k.name) } else { row.keys_added.push(k.name) }
            }
            row.keys_removed = remove;
            row.generation = status.generation;
            row.current_toplevel = status.toplevel.clone();
            let unchanged = status.toplevel.as_ref() == Some(toplevel);
            row.status = if unchanged { PlanStatus::Unchanged } else { PlanStatus::Change };
            // The agent's own number: after a rollback, the last generation + 1.
            row.next_generation = system.next_generation;
            row.paths_to_send = copy.send.len() as u64;
            row.bytes_to_send = copy.bytes();
            // The running closure is for the diff only; the plan printed does not carry it.
            let old: Vec<(StorePath, u64)> = std::mem::take(&mut system.closure);
            row.closure = closure_diff(&old, closure);
            row.system = system;
            row
        }
        state => row.failed(format!("machine {name} is {}: start it (`flotilla start --on {name}`) to plan against what it runs", state.as_str())),
    }
}

/// The plan of a machine its host builds (`deploy.buildOnTarget`, `--build-on target`): its
/// new system is not built here, so its closure and manifest are unknown until the host
/// builds it; what the machine runs now is asked of it when it runs.
fn plan_on_target(ctx: &platform::Context, ev: &Evaluated, name: &MachineName, toplevel: &StorePath) -> MachinePlan {
    let mut row = MachinePlan::new(name, Some(toplevel.clone()));
    let cfg = &ev.machines[name];
    let m = match platform::machine(ctx, name.as_str(), &cfg.platform, &ev.facts.get(name).cloned().unwrap_or_default()) {
        Ok(m) => m,
        Err(e) => return row.failed(e.into_message()),
    };
    let unknown = "built on its host: the closure diff, services, /etc and keys are unknown until it is built there; nothing is sent from this host".to_owned();
    match m.state() {
        MachineState::Missing => {
            row.status = PlanStatus::New;
            row.next_generation = Some(1);
            row.notes.push(unknown);
            row.notes.push("against an empty machine: the host's existing files and accounts are not checked".into());
        }
        MachineState::Running => {
            let status = match m.connect().and_then(|mut c| c.status()) {
                Ok(s) => s,
                Err(e) => return row.failed(e.to_string()),
            };
            row.generation = status.generation;
            let unchanged = status.toplevel.as_ref() == Some(toplevel);
            row.current_toplevel = status.toplevel;
            row.status = if unchanged { PlanStatus::Unchanged } else { PlanStatus::Change };
            row.next_generation = if unchanged { row.generation } else { None };
            if !unchanged {
                row.notes.push(unknown);
            }
        }
        state => return row.failed(format!("machine {name} is {}: start it (`flotilla start --on {name}`) to plan against what it runs", state.as_str())),
    }
    row
}

/// What the deploy's goal makes of a machine's plan: `build` and `copy` activate nothing,
/// `boot` changes what the machine runs at its next start only, `dry-activate` changes
/// nothing; none of them restarts anything now.
fn for_goal(mut row: MachinePlan, goal: Goal) -> MachinePlan {
    if row.error.is_some() || row.status == PlanStatus::Unchanged {
        return row;
    }
    let later = |row: &MachinePlan| -> String {
        let s: Vec<String> = row.system.services.iter().map(|s| format!("{} {}", action_word(s.action), s.name)).collect();
        if s.is_empty() { String::new() } else { format!(": {}", s.join(", ")) }
    };
    match goal {
        Goal::Switch | Goal::Test => {
            if goal == Goal::Test {
                row.next_generation = row.generation;
                row.notes.push("test: it runs the new system now, adds no generation, and boots the current one next time".into());
            }
            return row;
        }
        Goal::Build => {
            row.notes.push("build only: nothing is copied to the machine or activated".into());
            (row.paths_to_send, row.bytes_to_send) = (0, 0);
            row.next_generation = row.generation;
        }
        Goal::Copy => {
            row.notes.push("copy only: the closure is sent, nothing is activated".into());
            row.next_generation = row.generation;
        }
        Goal::Boot => {
            row.notes.push(format!("boot: generation {} becomes current at the next start, nothing restarts now{}", row.next_generation.map_or("-".into(), |g| g.to_string()), later(&row)));
        }
        Goal::DryActivate => {
            row.notes.push(format!("dry-activate: nothing changes; the agent reports what a switch would do{}", later(&row)));
            row.next_generation = row.generation;
        }
    }
    row.system.services.clear();
    let sys = &mut row.system;
    (sys.etc_added, sys.etc_changed, sys.etc_removed, sys.users_added, sys.users_removed) = Default::default();
    if goal != Goal::Boot {
        (row.keys_added, row.keys_changed, row.keys_removed) = Default::default();
    }
    row
}

fn action_word(a: ServiceAction) -> &'static str {
    match a {
        ServiceAction::Start => "start",
        ServiceAction::Stop => "stop",
        ServiceAction::Restart => "restart",
    }
}

/// A new machine's plan: `flotilla-agent plan` run on this host against an empty directory.
fn plan_new(agent: &Path, toplevel: &StorePath, manifest: &str, keys_written: &[String]) -> std::result::Result<SystemPlan, String> {
    let empty = EmptyDir::new().map_err(|e| format!("cannot make an empty directory to plan against in {}: {e}", std::env::temp_dir().display()))?;
    let request = Request::Plan { toplevel: toplevel.clone(), manifest: Some(manifest.to_owned()), keys_written: keys_written.to_vec(), goal: None };
    let mut child = Command::new(agent)
        .args(["plan", "--root"])
        .arg(&empty.0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {} plan: {e}", agent.display()))?;
    let text = serde_json::to_vec(&request).expect("a request serialises");
    let wrote = child.stdin.take().map(|mut s| s.write_all(&text));
    let out = child.wait_with_output().map_err(|e| format!("{} plan: {e}", agent.display()))?;
    if !out.status.success() || wrote.is_some_and(|w| w.is_err()) {
        return Err(format!("{} plan failed ({}): {}", agent.display(), out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{} plan printed no plan: {e}", agent.display()))
}

/// A new private directory of this process, removed when dropped. Made with `mkdir` (which
/// fails on anything already there, a link included), so nobody else's directory is used.
struct EmptyDir(std::path::PathBuf);

impl EmptyDir {
    fn new() -> std::io::Result<EmptyDir> {
        use std::os::unix::fs::DirBuilderExt;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        loop {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("flotilla-plan-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(EmptyDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for EmptyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Splits a store path's name as Nix's `DrvName` does: the version starts at the first dash
/// that is followed by something other than a letter.
pub fn parse_name(name: &str) -> Package {
    let b = name.as_bytes();
    for i in 0..b.len() {
        if b[i] == b'-' && i + 1 < b.len() && !b[i + 1].is_ascii_alphabetic() {
            return Package { name: name[..i].to_owned(), version: name[i + 1..].to_owned() };
        }
    }
    Package { name: name.to_owned(), version: String::new() }
}

/// The closure diff from `old` (paths and NAR sizes, as the machine has them) to `new`.
pub fn closure_diff(old: &[(StorePath, u64)], new: &[PathInfo]) -> ClosureDiff {
    let versions = |paths: &mut dyn Iterator<Item = &StorePath>| {
        let mut by: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for p in paths {
            let pkg = parse_name(p.name());
            by.entry(pkg.name).or_default().insert(pkg.version);
        }
        by
    };
    let before = versions(&mut old.iter().map(|(p, _)| p));
    let after = versions(&mut new.iter().map(|i| &i.path));
    let mut d = ClosureDiff { size_before: old.iter().map(|(_, s)| s).sum(), size_after: new.iter().map(|i| i.nar_size).sum(), ..Default::default() };
    let join = |v: &BTreeSet<String>| v.iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>().join(", ");
    for (name, vs) in &after {
        match before.get(name) {
            None => d.added.push(Package { name: name.clone(), version: join(vs) }),
            Some(old) if old != vs => d.changed.push(PackageChange { name: name.clone(), old: join(old), new: join(vs) }),
            Some(_) => {}
        }
    }
    for (name, vs) in &before {
        if !after.contains_key(name) {
            d.removed.push(Package { name: name.clone(), version: join(vs) });
        }
    }
    // Same versions, another build (a changed dependency, a changed config): not a version
    // change a user reads, and nvd leaves it out too.
    d.changed.retain(|c| c.old != c.new);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_as_nix_drvname_does() {
        let p = |n: &str| {
            let p = parse_name(n);
            (p.name, p.version)
        };
        assert_eq!(p("hello-2.12.1"), ("hello".into(), "2.12.1".into()));
        assert_eq!(p("busybox"), ("busybox".into(), String::new()));
        assert_eq!(p("flotilla-system-web"), ("flotilla-system-web".into(), String::new()));
        assert_eq!(p("python3-3.11.4-env"), ("python3".into(), "3.11.4-env".into()));
        assert_eq!(p("demo-tool-2"), ("demo-tool".into(), "2".into()));
    }

    #[test]
    fn a_closure_diff_names_packages_added_removed_and_upgraded() {
        let sp = |n: &str| StorePath::parse(&format!("/nix/store/{}-{n}", "a".repeat(32))).unwrap();
        let info = |n: &str, size: u64| PathInfo { path: sp(n), references: vec![], nar_hash: flotilla_store::NarHash::digest(b""), nar_size: size };
        let old = vec![(sp("tool-1.0"), 100), (sp("gone-3"), 10), (sp("busybox"), 1000)];
        let new = vec![info("tool-2.0", 120), info("fresh-0.1", 5), info("busybox", 1000)];
        let d = closure_diff(&old, &new);
        assert_eq!(d.changed, vec![PackageChange { name: "tool".into(), old: "1.0".into(), new: "2.0".into() }]);
        assert_eq!(d.added, vec![Package { name: "fresh".into(), version: "0.1".into() }]);
        assert_eq!(d.removed, vec![Package { name: "gone".into(), version: "3".into() }]);
        assert_eq!((d.size_before, d.size_after), (1110, 1125));
    }
}
