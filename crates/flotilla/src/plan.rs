//! `flotilla plan` and the plan `deploy --plan` shows: the engine's [`PlanReport`] as text
//! that fits a terminal (coloured only on one), or as JSON lines, one object per machine and
//! then the fleet's summary.

use std::io::IsTerminal as _;

use anyhow::{bail, Result};
use flotilla_engine::plan::{MachinePlan, PlanOptions, PlanReport, PlanStatus};
use flotilla_model::{escape_controls, human_bytes};
use flotilla_protocol::ServiceAction;

use crate::cli::{Global, Target};
use crate::progress::Progress;
use crate::{prepare_build, Outcome, Prepared};

/// `flotilla plan`.
pub fn plan(g: &Global, target: &Target, on: &str, builders: Option<&str>, no_build: bool, json: bool) -> Result<Outcome> {
    let report = make(g, target, on, builders, PlanOptions { no_build, ..Default::default() })?;
    print(&report, json);
    // A machine only not built yet (`--no-build`) is what was asked, not a failure.
    Ok(if report.all_ok() { Outcome::Ok } else { Outcome::SomeFailed })
}

/// Evaluates, builds (unless `opts.no_build`; with `builders` replacing `meta.builders`) and
/// plans the selected machines.
pub fn make(g: &Global, target: &Target, on: &str, builders: Option<&str>, opts: PlanOptions) -> Result<PlanReport> {
    let Prepared { mut engine, ev, instantiated, selected, agent } = prepare_build(g, target, on, builders)?;
    // Progress goes to stderr as lines even with --json: stdout holds the plan's objects only.
    let mut progress = Progress::new(false, g.verbose);
    let report = engine.plan_deploy(&ev, &selected, &agent, instantiated, opts, &mut |e| progress.event(e));
    progress.finish();
    report.map_err(Into::into)
}

/// Prints a plan: JSON lines, or text.
pub fn print(report: &PlanReport, json: bool) {
    print_as(report, json, false)
}

/// Prints a plan; with `json` and `as_event`, as one `{"event": "plan", ...}` line, so that it
/// does not mix with the event stream of the deploy that follows it.
fn print_as(report: &PlanReport, json: bool, as_event: bool) {
    if json && as_event {
        outln!("{}", serde_json::json!({ "event": "plan", "deployment": report.deployment, "machines": report.machines, "summary": report.summary }));
        return;
    }
    if json {
        for m in &report.machines {
            outln!("{}", serde_json::to_string(m).expect("a plan serialises"));
        }
        outln!("{}", serde_json::json!({ "deployment": report.deployment, "summary": report.summary }));
        return;
    }
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let paint = |code: &str, text: &str| if colour { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_owned() };
    for m in &report.machines {
        out!("{}", machine_text(m, &paint));
    }
    let s = &report.summary;
    let mut line = format!("plan: {} changing, {} unchanged, {} new", s.changing, s.unchanged, s.new);
    if s.unknown > 0 {
        line.push_str(&format!(", {} not planned", s.unknown));
    }
    line.push_str(&format!("; {} to send", human_bytes(s.bytes_to_send)));
    outln!("{}", paint("1", &line));
}

/// One machine's block.
fn machine_text(m: &MachinePlan, paint: &dyn Fn(&str, &str) -> String) -> String {
    let gen = |g: Option<u64>| g.map_or_else(|| "-".to_owned(), |g| g.to_string());
    let head = match m.status {
        PlanStatus::Change => format!("generation {} -> {}", gen(m.generation), gen(m.next_generation)),
        PlanStatus::Unchanged => format!("unchanged (generation {})", gen(m.generation)),
        PlanStatus::New => "new machine (planned against an empty one)".to_owned(),
        PlanStatus::NotBuilt => "not built yet".to_owned(),
        PlanStatus::Failed => "cannot be planned".to_owned(),
    };
    let mut t = format!("{}: {head}\n", paint("1", m.machine.as_str()));
    if let Some(e) = &m.error {
        t.push_str(&format!("  {}\n", paint("31", &escape_controls(e))));
        return t;
    }
    for n in &m.notes {
        t.push_str(&format!("  note: {}\n", escape_controls(n)));
    }
    let c = &m.closure;
    let mut pkgs: Vec<String> = c.changed.iter().map(|p| format!("{} {} -> {}", p.name, p.old, p.new)).collect();
    pkgs.extend(c.added.iter().map(|p| paint("32", &format!("+{}", versioned(&p.name, &p.version)))));
    pkgs.extend(c.removed.iter().map(|p| paint("31", &format!("-{}", versioned(&p.name, &p.version)))));
    if !pkgs.is_empty() {
        t.push_str(&format!("  packages: {}\n", pkgs.join(", ")));
    }
    let delta = c.size_after as i128 - c.size_before as i128;
    let sign = if delta < 0 { "-" } else { "+" };
    t.push_str(&format!(
        "  closure: {} -> {} ({sign}{}); to send: {} paths, {}\n",
        human_bytes(c.size_before),
        human_bytes(c.size_after),
        human_bytes(delta.unsigned_abs() as u64),
        m.paths_to_send,
        human_bytes(m.bytes_to_send)
    ));
    for s in &m.system.services {
        let verb = match s.action {
            ServiceAction::Start => paint("32", "start"),
            ServiceAction::Stop => paint("31", "stop"),
            ServiceAction::Restart => paint("33", "restart"),
        };
        t.push_str(&format!("  {verb} {}: {}\n", s.name, escape_controls(&s.reasons.join("; "))));
    }
    let list = |label: &str, groups: [(&str, &[String]); 3]| {
        let parts: Vec<String> = groups.iter().flat_map(|(mark, v)| v.iter().map(move |x| format!("{mark}{x}"))).collect();
        (!parts.is_empty()).then(|| format!("  {label}: {}\n", escape_controls(&parts.join(" "))))
    };
    let sys = &m.system;
    t.extend(list("/etc", [("+", &sys.etc_added), ("~", &sys.etc_changed), ("-", &sys.etc_removed)]));
    t.extend(list("users", [("+", &sys.users_added), ("~", &[]), ("-", &sys.users_removed)]));
    t.extend(list("keys", [("+", &m.keys_added), ("~", &m.keys_changed), ("-", &m.keys_removed)]));
    if !sys.health_checks.is_empty() && m.status != PlanStatus::Unchanged {
        t.push_str(&format!("  checks gating the switch: {}\n", escape_controls(&sys.health_checks.join(", "))));
    }
    t
}

fn versioned(name: &str, version: &str) -> String {
    if version.is_empty() {
        name.to_owned()
    } else {
        format!("{name} {version}")
    }
}

/// `deploy --plan`: refuses before any work when it cannot ask and `--yes` is not given;
/// prints the plan, asks on a terminal, and returns the plan to deploy.
pub fn confirmed(g: &Global, target: &Target, on: &str, builders: Option<&str>, opts: PlanOptions, yes: bool, json: bool) -> Result<PlanReport> {
    if !yes && !std::io::stdin().is_terminal() {
        bail!("deploy --plan: there is no terminal to ask whether to go on, so nothing was done; pass --yes to deploy the plan it prints, or run `flotilla plan` to only see it");
    }
    let report = make(g, target, on, builders, opts)?;
    print_as(&report, json, true);
    if !report.all_planned() {
        bail!("some machines could not be planned (see above), so nothing was deployed; fix them, or leave them out with --on");
    }
    if !yes {
        crate::fleet::confirm("deploy this plan?")?;
    }
    Ok(report)
}
