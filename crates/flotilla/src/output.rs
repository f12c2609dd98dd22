//! Everything `flotilla` prints: tables for people, `--json` for programs, progress lines on
//! stderr. Results go to stdout; progress and errors to stderr, so `--json | jq` works.

use std::fmt::Write as _;

use flotilla_engine::deploy::{DeployReport, Outcome};
use flotilla_engine::fleet::{KeysResult, MachineInfo, Operation, OperationResult, RollbackResult};
use flotilla_engine::platform::MachineState;
use flotilla_engine::{BuildReport, EngineEvent, Evaluated};
use flotilla_model::{escape_controls, escape_controls_block};
use flotilla_state::{DeploymentRecord, Event};
use serde::Serialize;
use serde_json::Value;

/// Prints any value as pretty JSON on stdout.
/// Whether standard output went away (its reader closed it): what follows is dropped.
static STDOUT_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes `text` to stdout. A reader that went away (`flotilla log | head`) is not an error:
/// the rest of the output is dropped and the command runs to its end (a deploy is never cut
/// off halfway because its reader left), with the exit status its outcome gives. Any other
/// failure to write is said once on stderr. Everything flotilla prints for its user goes
/// through here (`out!`/`outln!`), never through `print!`, which panics on a closed pipe.
pub fn emit(text: &str) {
    use std::io::Write as _;
    use std::sync::atomic::Ordering;
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        if !STDOUT_GONE.swap(true, Ordering::Relaxed) && e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to standard output ({e}); the rest of the output is dropped");
        }
    }
}

/// `print!` through [`emit`].
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::emit(&format!($($arg)*)) };
}

/// `println!` through [`emit`].
macro_rules! outln {
    () => { $crate::output::emit("\n") };
    ($($arg:tt)*) => { $crate::output::emit(&format!("{}\n", format_args!($($arg)*))) };
}

pub fn json<T: Serialize + ?Sized>(v: &T) {
    outln!("{}", serde_json::to_string_pretty(v).expect("output serialises"));
}

/// A left-aligned text table. Cells often hold text from a machine (a reason, a check's
/// output), so each is shown with its control characters escaped.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| escape_controls(c).into_owned()).collect()).collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 == widths.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// "12s ago", "5m ago", ...
fn ago(t: i64) -> String {
    let d = (flotilla_state::now() - t).max(0);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

pub fn deployments(deps: &[DeploymentRecord], as_json: bool) {
    if as_json {
        return json(deps);
    }
    if deps.is_empty() {
        eprintln!("no deployments yet; `flotilla build -f FILE` records one");
        return;
    }
    let rows: Vec<Vec<String>> = deps
        .iter()
        .map(|d| vec![d.name.clone(), d.machines.to_string(), ago(d.updated_at), d.file.clone().unwrap_or_default()])
        .collect();
    out!("{}", table(&["DEPLOYMENT", "MACHINES", "UPDATED", "FILE"], &rows));
}

pub fn machine_infos(dep: &DeploymentRecord, machines: &[MachineInfo], as_json: bool) {
    if as_json {
        return json(&serde_json::json!({ "deployment": dep, "machines": machines }));
    }
    let rows: Vec<Vec<String>> = machines
        .iter()
        .map(|m| {
            let services = if m.state == MachineState::Running { format!("{}/{}", m.services_up, m.services_total) } else { "-".into() };
            vec![
                m.machine.to_string(),
                m.platform.clone(),
                m.ip.clone().unwrap_or_else(|| "-".into()),
                // A machine held on another deployer host was not probed: the row says where it is.
                match (&m.host, flotilla_engine::platform::held_elsewhere(&m.platform, m.host.as_deref())) {
                    (Some(host), Some(_)) => format!("held on {host}"),
                    _ => m.state.as_str().to_owned(),
                },
                m.generation.map_or_else(|| "-".into(), |g| g.to_string()),
                services,
                m.health.clone(),
                m.tags.join(","),
            ]
        })
        .collect();
    outln!("deployment {} ({} machines){}", dep.name, dep.machines, if dep.description.is_empty() { String::new() } else { format!(": {}", dep.description) });
    out!("{}", table(&["MACHINE", "PLATFORM", "IP", "STATE", "GEN", "SERVICES", "HEALTH", "TAGS"], &rows));
    let checks: Vec<Vec<String>> = machines
        .iter()
        .flat_map(|m| {
            m.service_health.iter().map(|h| {
                let state = if h.healthy { "healthy" } else { "UNHEALTHY" };
                vec![m.machine.to_string(), h.service.clone(), state.to_owned(), h.check.clone(), first_line(&h.output)]
            })
        })
        .collect();
    if !checks.is_empty() {
        outln!();
        out!("{}", table(&["MACHINE", "SERVICE", "HEALTH", "CHECK", "LAST OUTPUT"], &checks));
    }
    let held = |m: &&MachineInfo| flotilla_engine::platform::held_elsewhere(&m.platform, m.host.as_deref()).is_some();
    for m in machines.iter().filter(|m| !m.problems.is_empty() && (m.state == MachineState::Running || held(m))) {
        eprintln!("{}: {}", m.machine, escape_controls(&m.problems.join("; ")));
    }
}

pub fn drift(machines: &[MachineInfo], as_json: bool) {
    if as_json {
        return json(machines);
    }
    let rows: Vec<Vec<String>> = machines
        .iter()
        .map(|m| {
            // A machine that cannot be checked at all is a failure, not drift.
            let result = match m.state {
                _ if m.problems.is_empty() => "ok",
                MachineState::Unusable | MachineState::Unreachable => "FAILED",
                _ => "DRIFT",
            };
            let detail = if m.problems.is_empty() { "as deployed".to_owned() } else { m.problems.join("; ") };
            vec![m.machine.to_string(), result.into(), detail]
        })
        .collect();
    out!("{}", table(&["MACHINE", "CHECK", "DETAIL"], &rows));
}

pub fn deploy_report(r: &DeployReport, summary: bool) {
    out!("{}", deploy_table(r, summary));
    let reverted: Vec<Vec<String>> = r
        .reverted()
        .map(|m| vec![m.machine.to_string(), m.generation.map_or_else(|| "-".into(), |g| g.to_string()), m.summary.clone()])
        .collect();
    if !reverted.is_empty() {
        outln!("\nreverted by --rollback-all-on-failure:");
        out!("{}", table(&["MACHINE", "FROM GEN", "DETAIL"], &reverted));
    }
    let failed = r.machines.iter().filter(|m| !matches!(m.outcome, Outcome::Deployed | Outcome::Unchanged)).count();
    eprintln!("{} of {} machines ok ({}) in {:.1}s", r.machines.len() - failed, r.machines.len(), r.goal.as_str(), r.elapsed.as_secs_f64());
    for m in r.machines.iter().filter(|m| m.error.as_deref().is_some_and(|e| e.contains('\n'))) {
        eprintln!("\n{}: {}", m.machine, escape_controls_block(m.error.as_deref().unwrap_or("")));
    }
}

/// A deploy's table, a row per machine; with `summary` only the machines that failed or
/// changed, then a line counting the unchanged ones (the table of a thousand machines that
/// mostly did nothing is those few rows).
fn deploy_table(r: &DeployReport, summary: bool) -> String {
    let unchanged = |m: &&flotilla_engine::deploy::MachineDeploy| m.outcome == Outcome::Unchanged;
    let rows: Vec<Vec<String>> = r
        .machines
        .iter()
        .filter(|m| !(summary && unchanged(m)))
        .map(|m| {
            let result = if m.outcome == Outcome::Failed { "FAILED".to_owned() } else { m.outcome.as_str().to_owned() };
            let detail = match &m.error {
                Some(e) => format!("{}: {}", m.failed_phase.map_or("deploy", |p| p.as_str()), first_line(e)),
                None => m.summary.clone(),
            };
            vec![m.machine.to_string(), result, m.generation.map_or_else(|| "-".into(), |g| g.to_string()), format!("{:.1}s", m.seconds), detail]
        })
        .collect();
    let left_out = if summary { r.machines.iter().filter(unchanged).count() } else { 0 };
    let plural = if left_out == 1 { "" } else { "s" };
    match (rows.is_empty(), left_out) {
        (true, n) if n > 0 => format!("no machine failed or changed; {n} unchanged machine{plural}\n"),
        (_, 0) => table(&["MACHINE", "RESULT", "GEN", "TIME", "DETAIL"], &rows),
        (_, n) => table(&["MACHINE", "RESULT", "GEN", "TIME", "DETAIL"], &rows) + &format!("... and {n} unchanged machine{plural}\n"),
    }
}

pub fn rollback_results(results: &[RollbackResult]) {
    let gen = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| match &r.error {
            None if r.stopped => vec![r.machine.to_string(), "rolled back".into(), gen(r.from), gen(r.to), "stopped: it boots this generation when it starts".into()],
            None => vec![r.machine.to_string(), "rolled back".into(), gen(r.from), gen(r.to), String::new()],
            Some(e) => vec![r.machine.to_string(), "FAILED".into(), gen(r.from), "-".into(), first_line(e)],
        })
        .collect();
    out!("{}", table(&["MACHINE", "RESULT", "FROM", "TO", "REASON"], &rows));
}

pub fn generations(gens: &[flotilla_protocol::GenerationInfo]) {
    let rows: Vec<Vec<String>> = gens
        .iter()
        .map(|g| {
            let status = match &g.failed {
                Some(why) => format!("failed: {}", first_line(why)),
                None => "ok".into(),
            };
            vec![
                g.number.to_string(),
                flotilla_model::format_time(g.created_unix as i64),
                g.toplevel.to_absolute(),
                status,
                if g.current { "current".into() } else { String::new() },
            ]
        })
        .collect();
    out!("{}", table(&["GEN", "DATE", "TOPLEVEL", "STATUS", "CURRENT"], &rows));
}

pub fn keys_results(results: &[KeysResult]) {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| match &r.error {
            None => vec![r.machine.to_string(), "ok".into(), r.summary.clone().unwrap_or_default()],
            Some(e) => vec![r.machine.to_string(), "FAILED".into(), first_line(e)],
        })
        .collect();
    out!("{}", table(&["MACHINE", "KEYS", "DETAIL"], &rows));
}

pub fn operation_results(op: Operation, results: &[OperationResult]) {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| match &r.error {
            None if op == Operation::Forget => vec![r.machine.to_string(), "ok".into(), "forgotten (nothing on its host was cleaned up)".into()],
            None => vec![r.machine.to_string(), "ok".into(), r.state.as_str().into()],
            Some(e) => vec![r.machine.to_string(), "FAILED".into(), first_line(e)],
        })
        .collect();
    out!("{}", table(&["MACHINE", op.as_str().to_uppercase().as_str(), "STATE / REASON"], &rows));
}

pub fn events(events: &[Event], as_json: bool) {
    if as_json {
        return json(events);
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                ago(e.at),
                e.deployment.clone(),
                e.machine.clone().unwrap_or_else(|| "-".into()),
                e.kind.clone(),
                e.status.clone(),
                e.actor.clone(),
                e.message.lines().next().unwrap_or("").to_owned(),
            ]
        })
        .collect();
    out!("{}", table(&["WHEN", "DEPLOYMENT", "MACHINE", "WHAT", "RESULT", "WHO", "DETAIL"], &rows));
}

pub fn evaluated(ev: &Evaluated) {
    outln!("deployment {}: {} machines, all checked", ev.name, ev.machines.len());
    let rows: Vec<Vec<String>> = ev
        .machines
        .iter()
        .map(|(n, c)| {
            let ip = ev.facts.get(n).and_then(|f| f.get("ip")).and_then(Value::as_str).unwrap_or("-").to_owned();
            vec![
                n.to_string(),
                c.platform.kind().to_owned(),
                ip,
                c.tags.join(","),
                c.system.services.keys().cloned().collect::<Vec<_>>().join(","),
            ]
        })
        .collect();
    out!("{}", table(&["MACHINE", "PLATFORM", "IP", "TAGS", "SERVICES"], &rows));
}

/// `flotilla doctor`: a line per check, its fix indented below it, and a verdict.
pub fn doctor(r: &flotilla_engine::doctor::Report, as_json: bool) {
    if as_json {
        return json(r);
    }
    let width = r.findings.iter().map(|f| f.check.len()).max().unwrap_or(0);
    let mut out = String::new();
    for f in &r.findings {
        let _ = writeln!(out, "{:<4}  {:<width$}  {}", f.status.as_str(), f.check, f.detail);
        if let Some(fix) = &f.fix {
            let _ = writeln!(out, "{:<4}  {:<width$}  fix: {fix}", "", "");
        }
    }
    let failed = r.findings.iter().filter(|f| f.status == flotilla_engine::doctor::Status::Fail).count();
    if r.ready {
        out.push_str("this host can deploy local machines\n");
    } else {
        let _ = writeln!(out, "this host cannot deploy local machines yet: {failed} check{} failed", if failed == 1 { "" } else { "s" });
    }
    out!("{out}");
}

pub fn build_report(r: &BuildReport, as_json: bool) {
    if as_json {
        return json(r);
    }
    let rows: Vec<Vec<String>> = r
        .machines
        .iter()
        .map(|m| match (&m.toplevel, &m.error) {
            (Some(t), _) => vec![m.machine.to_string(), "built".into(), t.to_string()],
            (None, e) => vec![m.machine.to_string(), "FAILED".into(), first_line(e.as_deref().unwrap_or("unknown error"))],
        })
        .collect();
    out!("{}", table(&["MACHINE", "RESULT", "TOPLEVEL / REASON"], &rows));
    let failed = r.machines.iter().filter(|m| m.error.is_some()).count();
    eprintln!("{} built, {failed} failed in {:.1}s", r.machines.len() - failed, r.elapsed.as_secs_f64());
    for m in r.machines.iter().filter(|m| m.error.is_some()) {
        eprintln!("\n{}: {}", m.machine, escape_controls_block(m.error.as_deref().unwrap_or("")));
    }
}

pub fn image_report(r: &flotilla_engine::image::ImageReport, as_json: bool) {
    if as_json {
        return json(r);
    }
    out!(
        "image:    {}\nformat:   {}\nmachine:  {}\ntoplevel: {}\nboot:     {}\n",
        r.path.display(),
        r.format.as_str(),
        r.machine,
        r.toplevel,
        r.qemu_command
    );
}

/// A push's progress on stderr, a line per blob.
pub fn push_progress(e: &flotilla_engine::oci::registry::PushEvent) {
    use flotilla_engine::oci::registry::PushEvent;
    match e {
        PushEvent::Present(b) => eprintln!("  {} ({}): in the registry already", short_digest(&b.digest), flotilla_model::human_bytes(b.size)),
        PushEvent::Uploading(b) => eprintln!("  {} ({}): uploading", short_digest(&b.digest), flotilla_model::human_bytes(b.size)),
        PushEvent::Progress { blob, sent } => eprintln!("  {}: {} of {}", short_digest(&blob.digest), flotilla_model::human_bytes(*sent), flotilla_model::human_bytes(blob.size)),
        PushEvent::Uploaded { blob, secs } => eprintln!("  {}: uploaded in {secs:.1} s", short_digest(&blob.digest)),
        PushEvent::Manifest { digest } => eprintln!("  manifest {digest}: put"),
    }
}

/// What a push did.
pub fn push_report(r: &flotilla_engine::oci::registry::PushReport, as_json: bool) {
    if as_json {
        return json(r);
    }
    out!(
        "pushed:   {}
digest:   {}
uploaded: {} blobs, {}
present:  {} blobs
",
        r.reference,
        r.digest,
        r.uploaded.len(),
        flotilla_model::human_bytes(r.bytes_uploaded),
        r.present.len()
    );
}

fn short_digest(d: &str) -> &str {
    &d[..d.len().min("sha256:".len() + 12)]
}

/// A built OCI image.
pub fn oci_report(r: &flotilla_engine::oci::OciReport, as_json: bool) {
    if as_json {
        return json(r);
    }
    out!(
        "image:    {}\nformat:   {}\nmachine:  {}\ntag:      {}\ndigest:   {}\nlayers:   {} ({} written)\ntoplevel: {}\nrun:      {}\n",
        r.path.display(),
        r.format.as_str(),
        r.machine,
        r.tag,
        r.manifest_digest,
        r.layers,
        r.layers_written,
        r.toplevel,
        match r.format {
            // podman runs images of its storage only: skopeo puts the layout's image there.
            flotilla_engine::oci::OciFormat::Oci => {
                let name = format!("localhost/{}:{}", r.machine.as_str().to_ascii_lowercase(), r.tag);
                format!("skopeo copy oci:{}:{} containers-storage:{name} && podman run --rm {name}", r.path.display(), r.tag)
            }
            flotilla_engine::oci::OciFormat::DockerArchive => format!("docker load -i {} && docker run --rm {}:{}", r.path.display(), r.machine.as_str().to_ascii_lowercase(), r.tag),
        }
    );
}

pub fn progress(e: &EngineEvent, verbose: bool) {
    match e {
        EngineEvent::PhaseStarted { phase, machines } => {
            eprintln!("{}: {}", phase.as_str(), names(machines))
        }
        EngineEvent::NixLog { line } if verbose => eprintln!("  nix: {}", escape_controls(line)),
        EngineEvent::NixLog { .. } => {}
        // What the user should know though nothing failed (a builder Nix fell back from).
        EngineEvent::Note { message } => eprintln!("note: {}", escape_controls(message)),
        _ => {}
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_owned()
}

/// The option reference, generated from the schema in `nix/options.nix`.
pub fn options_markdown(schema: &flotilla_model::Schema) -> String {
    use flotilla_model::{OptionDecl, OptionType};
    fn walk(out: &mut String, prefix: &str, options: &std::collections::BTreeMap<String, OptionDecl>) {
        for (name, decl) in options {
            let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            let _ = writeln!(out, "### `{path}`\n");
            let _ = writeln!(out, "{}\n", decl.description);
            let _ = writeln!(out, "- type: {}", decl.ty);
            if decl.secret {
                out.push_str("- secret: flotilla never prints its values, not even in errors\n");
            }
            if decl.required {
                out.push_str("- required\n");
            } else {
                let _ = writeln!(out, "- default: `{}`", decl.default);
            }
            out.push('\n');
            let mut ty = &decl.ty;
            loop {
                match ty {
                    OptionType::NullOr { elem } | OptionType::ListOf { elem } => ty = elem,
                    OptionType::AttrsOf { elem } => {
                        if let OptionType::Submodule { options } = elem.as_ref() {
                            walk(out, &format!("{path}.<name>"), options);
                        }
                        break;
                    }
                    OptionType::Submodule { options } => {
                        walk(out, &path, options);
                        break;
                    }
                    OptionType::Tagged { tag, variants, .. } => {
                        for (variant, options) in variants {
                            let _ = writeln!(out, "#### `{path}` when `{tag} = \"{variant}\"`\n");
                            let rest: std::collections::BTreeMap<String, OptionDecl> =
                                options.iter().filter(|(k, _)| *k != tag).map(|(k, v)| (k.clone(), v.clone())).collect();
                            walk(out, &path, &rest);
                        }
                        break;
                    }
                    _ => break,
                }
            }
        }
    }
    let mut out = String::from(
        "# Machine options\n\n\
         Generated by `flotilla options` from `nix/options.nix`; a test keeps this file equal to that output.\n\n\
         A machine is an attribute set of these options, or a function `{ name, nodes, pkgs, lib, ... }:` returning one.\n\
         `defaults` has the same shape; a machine is merged over it (attribute sets merge recursively, lists concatenate,\n\
         other values: the machine's win). `nodes.<other>` holds the other machines' facts: `name`, `ip`, `platform`.\n\n",
    );
    walk(&mut out, "", schema);
    out.trim_end().to_owned() + "\n"
}

/// Machine names as a list users read: `web1, web2`.
pub fn names(machines: &[flotilla_model::MachineName]) -> String {
    machines.iter().map(flotilla_model::MachineName::as_str).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_engine::deploy::{Goal, MachineDeploy};

    fn report(outcomes: &[Outcome]) -> DeployReport {
        let machines = outcomes
            .iter()
            .enumerate()
            .map(|(i, outcome)| MachineDeploy {
                machine: flotilla_model::MachineName::new(&format!("web{i:02}")).unwrap(),
                outcome: *outcome,
                failed_phase: None,
                generation: Some(1),
                toplevel: None,
                copy: None,
                activation: None,
                health: Vec::new(),
                checks: Vec::new(),
                keys: None,
                activated: false,
                previous_generation: None,
                previous_toplevel: None,
                seconds: 0.5,
                error: None,
                summary: outcome.as_str().to_owned(),
            })
            .collect();
        DeployReport { deployment: "d".into(), goal: Goal::Switch, machines, elapsed: std::time::Duration::from_secs(1) }
    }

    #[test]
    fn deploy_summary_lists_the_failed_and_changed_machines_and_counts_the_rest() {
        let r = report(&[Outcome::Unchanged, Outcome::Deployed, Outcome::Unchanged, Outcome::Failed, Outcome::Unchanged]);
        let full = deploy_table(&r, false);
        assert_eq!(full.lines().count(), 6, "{full}");
        let short = deploy_table(&r, true);
        let lines: Vec<&str> = short.lines().collect();
        assert_eq!(lines.len(), 4, "{short}");
        assert!(lines[1].starts_with("web01") && lines[2].starts_with("web03"), "{short}");
        assert_eq!(lines[3], "... and 3 unchanged machines");
        assert_eq!(deploy_table(&report(&[Outcome::Unchanged; 3]), true), "no machine failed or changed; 3 unchanged machines\n");
        assert_eq!(deploy_table(&report(&[Outcome::Unchanged]), true), "no machine failed or changed; 1 unchanged machine\n");
        assert_eq!(deploy_table(&report(&[Outcome::Deployed, Outcome::Unchanged]), true).lines().last(), Some("... and 1 unchanged machine"));
        assert_eq!(deploy_table(&report(&[Outcome::Deployed]), true), deploy_table(&report(&[Outcome::Deployed]), false));
    }
}
