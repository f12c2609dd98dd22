//! The fleet commands: deploy, start/stop/reboot/destroy, info, check, exec, shell, logs.

use std::io::{IsTerminal as _, Write as _};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use flotilla_engine::deploy::DeployOptions;
use flotilla_engine::fleet::{for_each_line, MachineInfo, Operation, Resent, Stream};
use flotilla_engine::{Engine, Limits};
use flotilla_model::{escape_controls_block, MachineName, Selection};

use crate::cli::{DeployGoal, Global, Target};
use crate::progress::Progress;
use crate::{agent_path, deployment_name, engine, open_state, output, prepare_build, Outcome, Prepared};

/// `deploy`'s flags.
pub struct DeployFlags {
    pub goal: DeployGoal,
    /// `--parallel`: every phase's limit.
    pub parallel: Option<u16>,
    /// `--activate-parallel`: the activation's, over `--parallel`.
    pub activate_parallel: Option<u16>,
    pub check_timeout: u64,
    pub confirm_timeout: u64,
    pub rollback_all_on_failure: bool,
    pub substitute_on_destination: bool,
    /// `--builders`, replacing `meta.builders`.
    pub builders: Option<String>,
    /// `--build-on target`.
    pub build_on_target: bool,
    /// Show the plan and ask first (`--plan`).
    pub plan: bool,
    /// Deploy the plan without asking (`--yes`).
    pub yes: bool,
    /// Activate machines that run their system already (`--reactivate`).
    pub reactivate: bool,
    /// The table lists the failed and changed machines only (`--summary`).
    pub summary: bool,
}

pub fn deploy(g: &Global, target: &Target, on: &str, flags: &DeployFlags, json: bool) -> Result<Outcome> {
    // The plan the user confirmed is the one deployed: the deployment is evaluated again
    // after the answer, and a machine whose toplevel moved since stops the deploy.
    let plan_opts = flotilla_engine::plan::PlanOptions { no_build: false, goal: flags.goal.into(), build_on_target: flags.build_on_target };
    let planned = if flags.plan { Some(crate::plan::confirmed(g, target, on, flags.builders.as_deref(), plan_opts, flags.yes, json)?.toplevels()) } else { None };
    let Prepared { mut engine, ev, instantiated, selected, agent } = prepare_build(g, target, on, flags.builders.as_deref())?;
    let mut limits = flags.parallel.map_or_else(Limits::default, |n| Limits::all(usize::from(n)));
    if let Some(n) = flags.activate_parallel {
        limits.activate = usize::from(n);
    }
    engine.set_limits(limits);
    let opts = DeployOptions {
        goal: flags.goal.into(),
        check_timeout: Duration::from_secs(flags.check_timeout),
        confirm_timeout: (flags.confirm_timeout > 0).then(|| Duration::from_secs(flags.confirm_timeout)),
        rollback_all_on_failure: flags.rollback_all_on_failure,
        substitute_on_destination: flags.substitute_on_destination,
        build_on_target: flags.build_on_target,
        reactivate: flags.reactivate,
    };
    if flags.substitute_on_destination {
        let without: Vec<&str> = selected.iter().filter(|n| ev.machines.get(*n).is_some_and(|m| m.deploy.substituters.is_empty())).map(|n| n.as_str()).collect();
        if without.len() == selected.len() && !selected.is_empty() {
            bail!(
                "--substitute-on-destination: no selected machine names a cache to fetch from ({} set no `deploy.substituters`); add `deploy.substituters = [ \"http://HOST:PORT\" ];` and `deploy.trustedPublicKeys` to the machines, or leave the flag out",
                without.join(", ")
            );
        }
    }
    let mut progress = Progress::new(json, g.verbose);
    let report = engine.deploy_planned(&ev, &selected, &agent, instantiated, planned.as_ref(), opts, &mut |e| progress.event(e));
    progress.finish();
    let report = report?;
    if json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        output::deploy_report(&report, flags.summary);
    }
    Ok(if report.all_ok() { Outcome::Ok } else { Outcome::SomeFailed })
}

pub fn rollback(g: &Global, target: &Target, on: &str, to: Option<u64>, json: bool) -> Result<Outcome> {
    let mut engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let mut progress = Progress::new(false, g.verbose);
    let results = engine.rollback(&name, &Selection::parse(on), to, &agent_path()?, &mut |e| progress.event(e));
    progress.finish();
    let results = results?;
    if json {
        output::json(&results);
    } else {
        output::rollback_results(&results);
    }
    Ok(if results.iter().all(|r| r.error.is_none()) { Outcome::Ok } else { Outcome::SomeFailed })
}

pub fn generations(g: &Global, target: &Target, machine: &str, json: bool) -> Result<Outcome> {
    let engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let generations = engine.generations(&name, machine, &agent_path()?)?;
    if json {
        output::json(&generations);
    } else {
        output::generations(&generations);
    }
    Ok(Outcome::Ok)
}

pub fn upload_keys(g: &Global, target: &Target, on: &str) -> Result<Outcome> {
    let Prepared { mut engine, ev, selected, agent, .. } = prepare_build(g, target, on, None)?;
    send_keys(&mut engine, &ev, &selected, &agent, g.verbose)
}

/// Sends keys and prints what each machine did; the outcome says whether all went well.
fn send_keys(engine: &mut Engine, ev: &flotilla_engine::Evaluated, selected: &[flotilla_model::MachineName], agent: &std::path::Path, verbose: bool) -> Result<Outcome> {
    let mut progress = Progress::new(false, verbose);
    let results = engine.upload_keys(ev, selected, agent, &mut |e| progress.event(e));
    progress.finish();
    keys_outcome(&results?)
}

/// Prints what each machine's key upload did; the outcome says whether all went well.
fn keys_outcome(results: &[flotilla_engine::fleet::KeysResult]) -> Result<Outcome> {
    output::keys_results(results);
    Ok(if results.iter().all(|r| r.error.is_none()) { Outcome::Ok } else { Outcome::SomeFailed })
}

/// `start --generation N`: every selected machine runs generation N afterwards. A stopped
/// one has its profile switched from outside (its agent is not asked: a bad release may be
/// why it was stopped), then starts; a running one is rolled back through its agent.
pub fn start_at(g: &Global, target: &Target, on: &str, generation: u64) -> Result<Outcome> {
    let mut engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let mut progress = Progress::new(false, g.verbose);
    let results = engine.rollback(&name, &Selection::parse(on), Some(generation), &agent_path()?, &mut |e| progress.event(e));
    progress.finish();
    let results = results?;
    output::rollback_results(&results);
    let switched: Vec<String> = results.iter().filter(|r| r.error.is_none() && r.stopped).map(|r| r.machine.to_string()).collect();
    let mut outcome = if results.iter().all(|r| r.error.is_none()) { Outcome::Ok } else { Outcome::SomeFailed };
    if !switched.is_empty() && operate(g, target, &switched.join(","), Operation::Start, true)? == Outcome::SomeFailed {
        outcome = Outcome::SomeFailed;
    }
    Ok(outcome)
}

pub fn operate(g: &Global, target: &Target, on: &str, op: Operation, yes: bool) -> Result<Outcome> {
    let mut engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let sel = Selection::parse(on);
    let agent = agent_path()?;
    if matches!(op, Operation::Destroy | Operation::Forget) && !yes {
        let machines: Vec<String> = engine.fleet(&name, &sel, &agent)?.into_iter().map(|f| f.name.to_string()).collect();
        if machines.is_empty() {
            if op == Operation::Forget {
                return Ok(Outcome::Ok); // `delete --force` of a deployment with none left
            }
            bail!("deployment `{name}` has no machines to destroy");
        }
        let (verb, what) = match op {
            Operation::Forget => ("Forget", "They leave the state; nothing on their hosts is cleaned up."),
            _ => ("Destroy", "Their processes, network and disks are deleted."),
        };
        confirm(&format!("{verb} {} machine(s) of {name} ({})? {what}", machines.len(), machines.join(", ")))?;
    }
    let mut progress = Progress::new(false, g.verbose);
    let results = engine.operate(&name, &sel, op, &agent, &mut |e| progress.event(e));
    progress.finish();
    let results = results?;
    output::operation_results(op, &results);
    let mut outcome = if results.iter().all(|r| r.error.is_none()) { Outcome::Ok } else { Outcome::SomeFailed };
    if op.restarts() {
        let started: Vec<MachineName> = results.iter().filter(|r| r.error.is_none()).map(|r| r.machine.clone()).collect();
        let mut progress = Progress::new(false, g.verbose);
        let resent = engine.resend_keys(&name, target.file.as_deref(), &started, &agent, &mut |e| progress.event(e));
        progress.finish();
        let keys = match resent? {
            Resent::Sent(results) if results.is_empty() => Outcome::Ok,
            Resent::Sent(results) => keys_outcome(&results)?,
            Resent::NoFile => {
                eprintln!("note: deployment {name} has no recorded file, so no keys were sent; run `flotilla upload-keys -f FILE`");
                Outcome::SomeFailed
            }
        };
        if keys == Outcome::SomeFailed {
            outcome = Outcome::SomeFailed;
        }
    }
    Ok(outcome)
}

pub(crate) fn confirm(question: &str) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("{question}\nrefusing without a terminal to ask on; pass --yes to confirm");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("not confirmed; nothing was changed");
    }
    Ok(())
}

pub fn info(g: &Global, target: &Target, on: &str, json: bool) -> Result<Outcome> {
    let engine = engine(g, open_state(g)?)?;
    let (name, declared) = deployment_and_machines(&engine, target)?;
    let dep = engine
        .state()
        .deployment(&name)?
        .ok_or_else(|| anyhow!("no deployment named `{name}` in the state database; `flotilla list` shows the known ones"))?;
    let mut infos = engine.info(&name, &Selection::parse(on), &agent_path()?)?;
    mark_orphans(&mut infos, &name, target, declared.as_deref());
    output::machine_infos(&dep, &infos, json);
    Ok(Outcome::Ok)
}

pub fn check(g: &Global, target: &Target, on: &str, json: bool) -> Result<Outcome> {
    let mut engine = engine(g, open_state(g)?)?;
    let (name, declared) = deployment_and_machines(&engine, target)?;
    let mut infos = engine.info(&name, &Selection::parse(on), &agent_path()?)?;
    mark_orphans(&mut infos, &name, target, declared.as_deref());
    engine.record_check(&name, &infos)?;
    output::drift(&infos, json);
    Ok(if infos.iter().all(|i| i.problems.is_empty()) { Outcome::Ok } else { Outcome::SomeFailed })
}

/// The deployment's name and, when it was named by its file, the machines the file declares.
fn deployment_and_machines(engine: &Engine, target: &Target) -> Result<(String, Option<Vec<String>>)> {
    match (&target.deployment, &target.file) {
        (None, Some(file)) => {
            let ev = engine.evaluate(file)?;
            Ok((ev.name.to_string(), Some(ev.machines.keys().map(ToString::to_string).collect())))
        }
        _ => Ok((deployment_name(engine, target)?, None)),
    }
}

/// A machine in the state that its deployment's file no longer declares is orphaned: said,
/// with how to remove it (from the state alone: the file has no definition of it any more).
fn mark_orphans(infos: &mut [MachineInfo], deployment: &str, target: &Target, declared: Option<&[String]>) {
    let (Some(declared), Some(file)) = (declared, &target.file) else { return };
    for i in infos.iter_mut().filter(|i| !declared.iter().any(|d| *d == i.machine.as_str())) {
        i.health = "orphaned".into();
        i.problems.push(format!(
            "orphaned: {} no longer declares it; `flotilla destroy -d {deployment} --on {} --yes` removes it (with --forget when its host is gone for good)",
            file.display(),
            i.machine
        ));
    }
}

pub fn exec(g: &Global, target: &Target, machine: Option<&str>, all: bool, on: Option<&str>, argv: &[String], record: bool) -> Result<Outcome> {
    let mut engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let agent = agent_path()?;
    if let (Some(machine), false, None) = (machine, all, on) {
        // One machine: its output and exit status pass straight through.
        let status = engine.exec(&name, machine, argv, record, &agent)?;
        return Ok(Outcome::Code(status.code().map_or(1, |c| c.clamp(0, 255) as u8)));
    }
    let sel = Selection::parse(on.unwrap_or(""));
    let width = engine.fleet(&name, &sel, &agent)?.iter().map(|f| f.name.as_str().len()).max().unwrap_or(0);
    // Interleaved with other machines' lines the output is a listing, not the command's own
    // bytes: each line whole, labelled, its control characters escaped.
    let out = std::sync::Mutex::new(());
    let print = |machine: &MachineName, stream: Stream, line: &str| {
        let _held = out.lock();
        let line = format!("{:<width$} | {}", machine.as_str(), escape_controls_block(line));
        match stream {
            Stream::Stdout => writeln!(std::io::stdout(), "{line}"),
            Stream::Stderr => writeln!(std::io::stderr(), "{line}"),
        }
    };
    let results = engine.exec_all(&name, &sel, argv, record, &agent, &print)?;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| match &r.status {
            Ok(s) if s.success() => None,
            Ok(s) => Some(format!("{}: {s}", r.machine)),
            Err(e) => Some(format!("{}: {e}", r.machine)),
        })
        .collect();
    if failed.is_empty() {
        Ok(Outcome::Ok)
    } else {
        eprintln!("failed on {} of {} machines:\n  {}", failed.len(), results.len(), escape_controls_block(&failed.join("\n  ")));
        Ok(Outcome::SomeFailed)
    }
}

/// `agent-exec`: `argv` on `machine` through its agent, this process's stdio relayed; the
/// command's status is the exit status (128+N for signal N). A program the machine does not
/// have is one error line and status 127, as a shell says it.
pub fn agent_exec(g: &Global, target: &Target, machine: &str, tty: bool, argv: &[String]) -> Result<Outcome> {
    use flotilla_engine::terminal;
    use std::os::fd::AsFd as _;
    let engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let m = engine.one_machine(&name, machine, &agent_path()?)?.machine;
    let stdin = std::io::stdin();
    let terminal = if tty {
        let (rows, cols) = terminal::size(stdin.as_fd()).or_else(|| terminal::size(std::io::stdout().as_fd())).unwrap_or((24, 80));
        Some(flotilla_protocol::Terminal { rows, cols, term: std::env::var("TERM").ok().filter(|t| !t.is_empty()).unwrap_or_else(|| "xterm".into()) })
    } else {
        None
    };
    let client = m.connect().map_err(|e| anyhow::anyhow!("machine {machine}: {e}"))?;
    // Raw only while the command runs; the guard restores the terminal on every way out.
    let _raw = match tty && stdin.is_terminal() {
        true => Some(terminal::RawMode::enable(stdin.as_fd()).context("cannot put this terminal in raw mode")?),
        false => None,
    };
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    match client.exec(argv, terminal, Box::new(stdin), &mut out, &mut err) {
        Ok(status) => Ok(Outcome::Code(status.shell_status())),
        Err(flotilla_engine::remote::RemoteError::Agent { kind: flotilla_protocol::ErrorKind::NotFound, message }) => {
            drop(_raw);
            eprintln!("error: machine {machine}: {}", escape_controls_block(&message));
            Ok(Outcome::Code(127))
        }
        Err(e) => Err(anyhow::anyhow!("machine {machine}: {e}")),
    }
}

pub fn shell(g: &Global, target: &Target, machine: &str) -> Result<Outcome> {
    let mut engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let m = engine.one_machine(&name, machine, &agent_path()?)?.machine;
    let mut shell = m.shell()?;
    let status = shell.status().with_context(|| format!("cannot run {}", shell.get_program().to_string_lossy()))?;
    engine.event(&name, Some(machine), "shell", "ok", &status.to_string())?;
    Ok(Outcome::Code(status.code().map_or(1, |c| c.clamp(0, 255) as u8)))
}

pub fn logs(g: &Global, target: &Target, machine: &str, service: Option<&str>, follow: bool, lines: usize, console: bool) -> Result<Outcome> {
    let engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let m = engine.one_machine(&name, machine, &agent_path()?)?.machine;
    // The lines go to stdout as they come (so `-F` streams), with the control characters a
    // service may print escaped; what the agent says on failure is shown as the machine's.
    let mut cmd = if console {
        let Some(file) = m.console_log() else {
            bail!("machine {machine}: its platform keeps no console on this host; use `flotilla logs {machine}` for its services");
        };
        if !file.exists() {
            bail!("machine {machine}: it has no console log yet ({} is missing); it has not booted on this host", file.display());
        }
        let mut tail = std::process::Command::new("tail");
        tail.args(["-n", &lines.to_string()]);
        if follow {
            tail.arg("-F");
        }
        tail.arg(file);
        tail
    } else {
        m.logs(service, lines, follow)?
    };
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("cannot run {program}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let said = std::thread::scope(|s| {
        let said = s.spawn(move || {
            let mut said = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stderr, &mut said);
            said
        });
        let mut out = std::io::stdout().lock();
        let written = for_each_line(stdout, |line| {
            writeln!(out, "{}", escape_controls_block(line))?;
            out.flush()
        });
        if written.is_err() {
            // Whoever read the lines went away (`logs -F | head`): so does the reading.
            let _ = child.kill();
        }
        (said.join().expect("stderr reader"), written.is_err())
    });
    let (said, reader_gone) = said;
    let status = child.wait().with_context(|| format!("cannot run {program}"))?;
    if reader_gone {
        return Ok(Outcome::Ok);
    }
    if status.success() {
        return Ok(Outcome::Ok);
    }
    let said = String::from_utf8_lossy(&said);
    eprintln!("machine {machine}: {}", escape_controls_block(said.trim().trim_start_matches("flotilla-agent: ")));
    Ok(Outcome::Code(status.code().map_or(1, |c| c.clamp(1, 255) as u8)))
}
