//! The fleet commands: deploy, start/stop/reboot/destroy, info, check, exec, shell, logs.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use flotilla_engine::deploy::{DeployOptions, Goal};
use flotilla_engine::fleet::{MachineInfo, Operation};
use flotilla_engine::platform::Machine;
use flotilla_engine::Engine;
use flotilla_model::{escape_controls_block, Selection};

use crate::cli::{DeployGoal, Global, Target};
use crate::progress::Progress;
use crate::{agent_path, deployment_name, engine, open_state, output, prepare_build, Outcome, Prepared};

/// `deploy`'s flags.
pub struct DeployFlags {
    pub goal: DeployGoal,
    pub parallel: u16,
    pub check_timeout: u64,
    pub confirm_timeout: u64,
    pub rollback_all_on_failure: bool,
}

pub fn deploy(g: &Global, target: &Target, on: &str, flags: &DeployFlags, json: bool) -> Result<Outcome> {
    let Prepared { mut engine, ev, instantiated, selected, agent } = prepare_build(g, target, on)?;
    let goal = match flags.goal {
        DeployGoal::Switch => Goal::Switch,
        DeployGoal::Boot => Goal::Boot,
        DeployGoal::Test => Goal::Test,
        DeployGoal::DryActivate => Goal::DryActivate,
        DeployGoal::Build => Goal::Build,
        DeployGoal::Copy => Goal::Copy,
    };
    let opts = DeployOptions {
        goal,
        parallel: usize::from(flags.parallel),
        check_timeout: Duration::from_secs(flags.check_timeout),
        confirm_timeout: (flags.confirm_timeout > 0).then(|| Duration::from_secs(flags.confirm_timeout)),
        rollback_all_on_failure: flags.rollback_all_on_failure,
    };
    let mut progress = Progress::new(json, g.verbose);
    let report = engine.deploy_instantiated(&ev, &selected, &agent, instantiated, opts, &mut |e| progress.event(e));
    progress.finish();
    let report = report?;
    if json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        output::deploy_report(&report);
    }
    Ok(if report.all_ok() { Outcome::Ok } else { Outcome::SomeFailed })
}

pub fn rollback(g: &Global, target: &Target, on: &str, to: Option<u64>, json: bool) -> Result<Outcome> {
    let mut engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let mut progress = Progress::new(false, g.verbose);
    let results = engine.rollback(&name, &Selection::parse(on), to, &agent_path()?, 8, &mut |e| progress.event(e));
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
    let Prepared { mut engine, ev, selected, agent, .. } = prepare_build(g, target, on)?;
    send_keys(&mut engine, &ev, &selected, &agent, g.verbose)
}

/// Sends keys and prints what each machine did; the outcome says whether all went well.
fn send_keys(engine: &mut Engine, ev: &flotilla_engine::Evaluated, selected: &[flotilla_model::MachineName], agent: &std::path::Path, verbose: bool) -> Result<Outcome> {
    let mut progress = Progress::new(false, verbose);
    let results = engine.upload_keys(ev, selected, agent, 8, &mut |e| progress.event(e));
    progress.finish();
    let results = results?;
    output::keys_results(&results);
    Ok(if results.iter().all(|r| r.error.is_none()) { Outcome::Ok } else { Outcome::SomeFailed })
}

/// `start --generation N`: every selected machine runs generation N afterwards. A stopped
/// one has its profile switched from outside (its agent is not asked: a bad release may be
/// why it was stopped), then starts; a running one is rolled back through its agent.
pub fn start_at(g: &Global, target: &Target, on: &str, generation: u64) -> Result<Outcome> {
    let mut engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let mut progress = Progress::new(false, g.verbose);
    let results = engine.rollback(&name, &Selection::parse(on), Some(generation), &agent_path()?, 8, &mut |e| progress.event(e));
    progress.finish();
    let results = results?;
    output::rollback_results(&results);
    let switched: Vec<String> = results.iter().filter(|r| r.error.is_none() && r.stopped).map(|r| r.machine.clone()).collect();
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
        let machines: Vec<String> = engine.fleet(&name, &sel, &agent)?.into_iter().map(|(r, _)| r.name).collect();
        if machines.is_empty() {
            bail!("deployment `{name}` has no machines to destroy");
        }
        let (verb, what) = match op {
            Operation::Forget => ("Forget", "They leave the state; nothing on their hosts is cleaned up."),
            _ => ("Destroy", "Their processes, network and disks are deleted."),
        };
        confirm(&format!("{verb} {} machine(s) of {name} ({})? {what}", machines.len(), machines.join(", ")))?;
    }
    let mut progress = Progress::new(false, g.verbose);
    let results = engine.operate(&name, &sel, op, &agent, 8, &mut |e| progress.event(e));
    progress.finish();
    let results = results?;
    output::operation_results(op, &results);
    let mut outcome = if results.iter().all(|r| r.error.is_none()) { Outcome::Ok } else { Outcome::SomeFailed };
    // Keys live in memory on the machine: a machine that started again gets them again.
    if matches!(op, Operation::Start | Operation::Reboot | Operation::HardReboot) {
        let started: Vec<String> = results.iter().filter(|r| r.error.is_none()).map(|r| r.machine.clone()).collect();
        if !started.is_empty() && resend_keys(g, &mut engine, target, &name, &started, &agent)? == Outcome::SomeFailed {
            outcome = Outcome::SomeFailed;
        }
    }
    Ok(outcome)
}

/// After a start: evaluates the deployment (from -f, or its recorded file) and sends the
/// started machines their keys, when they declare any.
fn resend_keys(g: &Global, engine: &mut Engine, target: &Target, name: &str, started: &[String], agent: &std::path::Path) -> Result<Outcome> {
    let file = match &target.file {
        Some(f) => Some(f.clone()),
        None => engine.state().deployment(name)?.and_then(|d| d.file).map(std::path::PathBuf::from),
    };
    let Some(file) = file else {
        eprintln!("note: deployment {name} has no recorded file, so no keys were sent; run `flotilla upload-keys -f FILE`");
        return Ok(Outcome::SomeFailed);
    };
    let ev = engine.evaluate(&file)?;
    let selected: Vec<flotilla_model::MachineName> =
        ev.machines.iter().filter(|(n, cfg)| started.iter().any(|s| s == n.as_str()) && !cfg.keys.is_empty()).map(|(n, _)| n.clone()).collect();
    if selected.is_empty() {
        return Ok(Outcome::Ok);
    }
    send_keys(engine, &ev, &selected, agent, g.verbose)
}

fn confirm(question: &str) -> Result<()> {
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
    let mut infos = engine.check(&name, &Selection::parse(on), &agent_path()?)?;
    mark_orphans(&mut infos, &name, target, declared.as_deref());
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
    for i in infos.iter_mut().filter(|i| !declared.contains(&i.machine)) {
        i.health = "orphaned".into();
        i.problems.push(format!(
            "orphaned: {} no longer declares it; `flotilla destroy -d {deployment} --on {} --yes` removes it (with --forget when its host is gone for good)",
            file.display(),
            i.machine
        ));
    }
}

fn one_machine(engine: &Engine, deployment: &str, machine: &str) -> Result<Box<dyn Machine>> {
    let sel = Selection::parse(machine);
    let mut fleet = engine.fleet(deployment, &sel, &agent_path()?)?;
    match fleet.len() {
        1 => Ok(fleet.remove(0).1),
        _ => bail!("`{machine}` names {} machines; name exactly one", fleet.len()),
    }
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

pub fn exec(g: &Global, target: &Target, machine: Option<&str>, all: bool, on: Option<&str>, argv: &[String], record: bool) -> Result<Outcome> {
    let mut engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    if let (Some(machine), false, None) = (machine, all, on) {
        // One machine: its output and exit status pass straight through.
        let m = one_machine(&engine, &name, machine)?;
        let mut cmd = m.command(argv, false)?;
        let status = cmd.status().with_context(|| format!("cannot run {}", cmd.get_program().to_string_lossy()))?;
        engine.event(&name, Some(machine), "exec", if status.success() { "ok" } else { "failed" }, &exec_entry(argv, record, &status.to_string()))?;
        return Ok(Outcome::Code(status.code().map_or(1, |c| c.clamp(0, 255) as u8)));
    }
    let sel = Selection::parse(on.unwrap_or(""));
    let fleet = engine.fleet(&name, &sel, &agent_path()?)?;
    let width = fleet.iter().map(|(r, _)| r.name.len()).max().unwrap_or(0);
    let out = std::sync::Mutex::new(());
    let results: Vec<(String, Result<std::process::ExitStatus, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = fleet
            .iter()
            .map(|(r, m)| {
                let out = &out;
                s.spawn(move || (r.name.clone(), run_prefixed(m.as_ref(), argv, &format!("{:<width$} | ", r.name), out)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("exec thread")).collect()
    });
    let mut failed = Vec::new();
    for (machine, r) in &results {
        let (status, detail) = match r {
            Ok(s) if s.success() => ("ok", s.to_string()),
            Ok(s) => ("failed", s.to_string()),
            Err(e) => ("failed", e.clone()),
        };
        if status == "failed" {
            failed.push(format!("{machine}: {detail}"));
        }
        engine.event(&name, Some(machine), "exec", status, &exec_entry(argv, record, &detail))?;
    }
    if failed.is_empty() {
        Ok(Outcome::Ok)
    } else {
        eprintln!("failed on {} of {} machines:\n  {}", failed.len(), results.len(), escape_controls_block(&failed.join("\n  ")));
        Ok(Outcome::SomeFailed)
    }
}

/// Runs `argv` in `m`, printing each line of its output with `prefix` (stdout to stdout,
/// stderr to stderr), whole lines at a time. Interleaved with other machines' lines it is a
/// listing, not the command's own bytes, so control characters are escaped.
fn run_prefixed(m: &dyn Machine, argv: &[String], prefix: &str, lock: &std::sync::Mutex<()>) -> Result<std::process::ExitStatus, String> {
    let mut child = m
        .command(argv, false)
        .map_err(flotilla_engine::platform::PlatformError::into_message)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the machine's command: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    std::thread::scope(|s| {
        s.spawn(|| {
            for_each_line(stderr, |line| {
                let _held = lock.lock();
                writeln!(std::io::stderr(), "{prefix}{}", escape_controls_block(line))
            })
        });
        // A reader that went away (`| head`) ends the reading; the command then gets its
        // SIGPIPE at its next write.
        let _ = for_each_line(stdout, |line| {
            let _held = lock.lock();
            writeln!(std::io::stdout(), "{prefix}{}", escape_controls_block(line))
        });
    });
    child.wait().map_err(|e| e.to_string())
}

/// Calls `f` with each line of `r` (without its newline; bytes that are not UTF-8 shown as
/// U+FFFD), as each line arrives.
/// Stops at the end of `r`, or at the first line `f` could not write (returning that error).
fn for_each_line(r: impl std::io::Read, mut f: impl FnMut(&str) -> std::io::Result<()>) -> std::io::Result<()> {
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

pub fn shell(g: &Global, target: &Target, machine: &str) -> Result<Outcome> {
    let mut engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let m = one_machine(&engine, &name, machine)?;
    let mut shell = m.shell()?;
    let status = shell.status().with_context(|| format!("cannot run {}", shell.get_program().to_string_lossy()))?;
    engine.event(&name, Some(machine), "shell", "ok", &status.to_string())?;
    Ok(Outcome::Code(status.code().map_or(1, |c| c.clamp(0, 255) as u8)))
}

pub fn logs(g: &Global, target: &Target, machine: &str, service: Option<&str>, follow: bool, lines: usize) -> Result<Outcome> {
    let engine = engine(g, open_state(g)?)?;
    let name = deployment_name(&engine, target)?;
    let m = one_machine(&engine, &name, machine)?;
    // The lines go to stdout as they come (so `-F` streams), with the control characters a
    // service may print escaped; what the agent says on failure is shown as the machine's.
    let mut cmd = m.logs(service, lines, follow)?;
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
