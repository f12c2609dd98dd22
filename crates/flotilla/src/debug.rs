//! `flotilla debug`: developer commands that run a real agent on a plain directory standing
//! for a machine's root, so copying and activation can be exercised without a platform.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use flotilla_engine::remote::{AgentClient, CopyProgress};
use flotilla_engine::EngineEvent;
use flotilla_model::{MachineName, Selection};
use flotilla_protocol::{ActivationReport, Compression};
use flotilla_store::StorePath;

use crate::cli::{DebugCommand, Global, RootOp};
use crate::{agent_path, deployment_file, engine, nix, open_state, output, Outcome};

pub fn run(g: &Global, command: &DebugCommand) -> Result<Outcome> {
    match command {
        DebugCommand::PushToRoot { dir, target, machine, goal, compress, json } => {
            let machine = MachineName::new(machine)?;
            let state = open_state(g)?;
            let file = deployment_file(&state, target)?;
            let mut engine = engine(g, state)?;
            let ev = engine.evaluate(&file)?;
            let selected = ev.select(&Selection::parse(machine.as_str()))?;
            let agent = agent_path()?;
            let verbose = g.verbose;
            let mut listen = |e: &EngineEvent| output::progress(e, verbose);
            let report = engine.build(&ev, &selected, &agent, &mut listen)?;
            let built = &report.machines[0];
            let toplevel = built
                .toplevel
                .clone()
                .ok_or_else(|| anyhow!("machine {machine} did not build: {}", built.error.as_deref().unwrap_or("")))?;

            // An agent started here keeps running once it activated a system (it runs the
            // system's services); with nothing activated, it stops before this returns.
            let (mut client, started) = connect_or_start(dir, &agent)?;
            let nix = nix(g)?;
            let compression = if *compress { Compression::Zstd } else { Compression::None };
            let copy = client.copy_closure(&nix, std::slice::from_ref(&toplevel), compression, &mut progress_printer())?;
            let activation = match goal.activation() {
                Some(goal) => client.activate(&toplevel, goal, None, None).map(|a| Some((a.generation, a.report)))?,
                None => None,
            };
            // Nothing activated (a copy, a dry run): nothing for the agent to keep running.
            drop(client);
            if goal.activates() {
                started.keep();
            } else {
                started.stop()?;
            }
            if *json {
                output::json(&serde_json::json!({
                    "machine": machine,
                    "toplevel": toplevel,
                    "copy": copy,
                    "generation": activation.as_ref().map(|a| a.0),
                    "report": activation.as_ref().map(|a| &a.1),
                }));
            } else {
                outln!(
                    "{machine}: copied {} of {} paths ({} bytes) in {:.2}s",
                    copy.paths_sent, copy.closure_paths, copy.bytes_sent, copy.seconds
                );
                if let Some((generation, report)) = &activation {
                    print_report(*generation, report);
                }
            }
            Ok(Outcome::Ok)
        }
        DebugCommand::CopyToRoot { dir, paths, compress, json } => {
            let roots = paths
                .iter()
                .map(|p| StorePath::parse(p).map_err(|e| anyhow!("{e}: pass store paths, e.g. $(nix-build ...)")))
                .collect::<Result<Vec<_>>>()?;
            let (mut client, started) = connect_or_start(dir, &agent_path()?)?;
            let compression = if *compress { Compression::Zstd } else { Compression::None };
            let copy = client.copy_closure(&nix(g)?, &roots, compression, &mut progress_printer());
            drop(client);
            let stopped = started.stop();
            let copy = copy?;
            stopped?;
            if *json {
                output::json(&copy);
            } else {
                outln!("copied {} of {} paths ({} bytes) in {:.2}s", copy.paths_sent, copy.closure_paths, copy.bytes_sent, copy.seconds);
            }
            Ok(Outcome::Ok)
        }
        DebugCommand::Root { dir, op, json } => {
            let mut client = AgentClient::connect_unix(&socket(dir))?;
            match op {
                RootOp::Status => {
                    let status = client.status()?;
                    if *json {
                        output::json(&status);
                    } else {
                        let (generation, toplevel, services) = (status.generation, status.toplevel, status.services);
                        outln!("generation {}: {}", generation.map(|n| n.to_string()).unwrap_or("-".into()), toplevel.map(|t| t.to_string()).unwrap_or("-".into()));
                        for s in services {
                            outln!("  {:<16} {:?} pid {} restarts {}", s.name, s.state, s.pid.map(|p| p.to_string()).unwrap_or("-".into()), s.restarts);
                        }
                    }
                }
                RootOp::Generations => {
                    let gens = client.generations()?;
                    if *json {
                        output::json(&gens);
                    } else {
                        for gen in gens {
                            outln!("{:>4}{} {} {}", gen.number, if gen.current { "*" } else { " " }, gen.created_unix, gen.toplevel);
                        }
                    }
                }
                RootOp::Rollback { to } => {
                    let (generation, report) = client.rollback(*to, None)?;
                    if *json {
                        output::json(&serde_json::json!({ "generation": generation, "report": report }));
                    } else {
                        print_report(generation, &report);
                    }
                }
                RootOp::DeleteGenerations { keep_last } => {
                    let deleted = client.delete_generations(Some(*keep_last), None)?;
                    if *json {
                        output::json(&deleted);
                    } else {
                        outln!("deleted generations {deleted:?}");
                    }
                }
                RootOp::Gc => {
                    let (paths, bytes) = client.collect_garbage()?;
                    if *json {
                        output::json(&serde_json::json!({ "paths": paths, "bytes": bytes }));
                    } else {
                        outln!("removed {paths} store paths, {bytes} bytes");
                    }
                }
            }
            Ok(Outcome::Ok)
        }
    }
}

/// Prints copy progress on stderr at most once a second, so large copies show they move.
fn progress_printer() -> impl FnMut(&CopyProgress) {
    let mut last = Instant::now();
    move |p: &CopyProgress| {
        if last.elapsed() >= Duration::from_secs(1) || (p.paths == p.total_paths && p.total_bytes > 64 << 20) {
            last = Instant::now();
            eprintln!(
                "copy: {}/{} paths, {:.1}/{:.1} MiB",
                p.paths,
                p.total_paths,
                p.bytes as f64 / 1048576.0,
                p.total_bytes as f64 / 1048576.0
            );
        }
    }
}

fn socket(dir: &Path) -> std::path::PathBuf {
    flotilla_protocol::layout::under(dir, flotilla_protocol::layout::SOCKET)
}

/// An agent a debug command started for its own use: stopped when dropped (a command that
/// failed half-way stops it too), unless [`Started::keep`] says it now runs a system.
struct Started(Option<std::process::Child>);

impl Started {
    /// Stops it (SIGTERM: it stops whatever it runs first) and waits for it, when this command
    /// started it; one that was running already is left running.
    fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.0.take() else { return Ok(()) };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let status = child.wait().context("cannot wait for the agent it started")?;
        if !status.success() {
            bail!("the agent it started for its own use ended with {status}");
        }
        Ok(())
    }

    /// Leaves it running: it runs the system just activated.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }
}

/// Connects to the agent of `dir`, starting one (logging beside its services) when none
/// answers; says whether it started one.
fn connect_or_start(dir: &Path, agent: &Path) -> Result<(AgentClient, Started)> {
    let sock = socket(dir);
    if let Ok(c) = AgentClient::connect_unix(&sock) {
        return Ok((c, Started(None)));
    }
    let log_dir = flotilla_protocol::layout::under(dir, flotilla_protocol::layout::LOG_DIR);
    std::fs::create_dir_all(&log_dir).with_context(|| format!("cannot create {}", log_dir.display()))?;
    let log = std::fs::File::create(log_dir.join("agent.log"))?;
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(agent)
        .arg("init")
        .arg("--root")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start the agent {}", agent.display()))?;
    let start = Instant::now();
    loop {
        match AgentClient::connect_unix(&sock) {
            Ok(c) => return Ok((c, Started(Some(child)))),
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the agent started for {} does not answer: {e}", dir.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn print_report(generation: u64, r: &ActivationReport) {
    let mut parts = Vec::new();
    for (what, list) in [
        ("started", &r.services_started),
        ("restarted", &r.services_restarted),
        ("stopped", &r.services_stopped),
        ("unchanged", &r.services_unchanged),
        ("etc added", &r.etc_added),
        ("etc changed", &r.etc_changed),
        ("etc removed", &r.etc_removed),
        ("users added", &r.users_added),
        ("users removed", &r.users_removed),
    ] {
        if !list.is_empty() {
            parts.push(format!("{what} {}", list.join(",")));
        }
    }
    outln!("{}generation {generation}: {}", if r.dry_run { "would activate " } else { "" }, if parts.is_empty() { "nothing changed".into() } else { parts.join("; ") });
    for m in &r.messages {
        outln!("  {}", flotilla_model::escape_controls(m));
    }
}
