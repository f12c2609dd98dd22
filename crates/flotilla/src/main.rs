//! `flotilla`: the command-line front of the deployment engine. It parses arguments, wires
//! the Nix layer, state DB and engine together, renders progress, tables and `--json`, and
//! chooses the exit status: 0 all good, 1 some machines failed, 2 could not run.

#[macro_use]
mod output;
mod cache;
mod cli;
mod debug;
mod fleet;
mod plan;
mod progress;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser};
use flotilla_engine::fleet::Operation;
use flotilla_engine::{Engine, EngineEvent};
use flotilla_model::Selection;
use flotilla_nix::{Nix, NixOptions};
use flotilla_state::State;

use cli::{Cli, Command, Global, Target};

/// How a command ended, as an exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    SomeFailed,
    /// A command run in a machine ended with this status.
    Code(u8),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let state_path = cli.global.state.clone().unwrap_or_else(flotilla_state::default_path);
    match run(cli) {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::SomeFailed) => ExitCode::from(1),
        Ok(Outcome::Code(c)) => ExitCode::from(c),
        Err(e) => {
            // A write to the state that failed midway (a full disk) is said in words too, not
            // only one at opening. An error may carry a machine's words (an agent's reason, a
            // command's output): control characters are escaped.
            let sql = e.chain().find(|c| c.downcast_ref::<flotilla_state::StateError>().is_some() || c.is::<flotilla_engine::EngineError>());
            match sql.and_then(|c| flotilla_state::storage_problem(&state_path, c)) {
                Some(problem) => eprintln!("error: {problem}"),
                None => eprintln!("error: {}", flotilla_model::escape_controls_block(&chain_text(&e))),
            }
            ExitCode::from(2)
        }
    }
}

/// An error and its causes, each said once: most of the project's errors put their cause in
/// their own words already (`cannot read PATH: No such file`), and anyhow's `{:#}` would
/// append it again.
fn chain_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn run(cli: Cli) -> Result<Outcome> {
    let g = &cli.global;
    match &cli.command {
        Command::Completions { shell } => {
            let mut text = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "flotilla", &mut text);
            output::emit(&String::from_utf8_lossy(&text));
            Ok(Outcome::Ok)
        }
        Command::Man => {
            let mut text = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut text)?;
            output::emit(&String::from_utf8_lossy(&text));
            Ok(Outcome::Ok)
        }
        Command::Doctor { json } => {
            let report = flotilla_engine::doctor::examine(&nix(g)?, &agent_path()?, flotilla_engine::doctor::Options::default());
            output::doctor(&report, *json);
            Ok(if report.ready { Outcome::Ok } else { Outcome::SomeFailed })
        }
        Command::Options => {
            let nix = nix(g)?;
            let schema: flotilla_model::Schema = serde_json::from_value(nix.options_schema()?)?;
            out!("{}", output::options_markdown(&schema));
            Ok(Outcome::Ok)
        }
        Command::List { json } => {
            let state = open_state(g)?;
            output::deployments(&state.deployments()?, *json);
            Ok(Outcome::Ok)
        }
        Command::Log { deployment, limit, json } => {
            let state = open_state(g)?;
            output::events(&state.events(deployment.as_deref(), *limit)?, *json);
            Ok(Outcome::Ok)
        }
        Command::Export { deployment } => {
            let state = open_state(g)?;
            let export = state.export(deployment)?;
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &export)?;
            std::io::Write::write_all(&mut out, b"\n")?;
            Ok(Outcome::Ok)
        }
        Command::Import { replace } => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("cannot read the export from standard input")?;
            let export = flotilla_state::export::parse(&text)?;
            let mut state = open_state(g)?;
            state.import(&export, *replace, &actor())?;
            eprintln!(
                "imported deployment {} ({} machines, {} events) into {}",
                export.deployment.name,
                export.machines.len(),
                export.events.len(),
                state.path().display()
            );
            Ok(Outcome::Ok)
        }
        Command::Info { target, on, json } => fleet::info(g, target, &on.on, *json),
        Command::Plan { target, on, no_build, builders, json } => plan::plan(g, target, on, builders.as_deref(), *no_build, *json),
        Command::Deploy { target, on, goal, parallel, activate_parallel, check_timeout, confirm_timeout, rollback_all_on_failure, substitute_on_destination, builders, build_on, plan, yes, reactivate, summary, json } => {
            let opts = fleet::DeployFlags {
                goal: *goal,
                parallel: *parallel,
                activate_parallel: *activate_parallel,
                check_timeout: *check_timeout,
                confirm_timeout: *confirm_timeout,
                rollback_all_on_failure: *rollback_all_on_failure,
                substitute_on_destination: *substitute_on_destination,
                builders: builders.clone(),
                build_on_target: *build_on == Some(cli::BuildOn::Target),
                plan: *plan,
                yes: *yes,
                reactivate: *reactivate,
                summary: *summary,
            };
            fleet::deploy(g, target, on, &opts, *json)
        }
        Command::Rollback { target, on, to, json } => fleet::rollback(g, target, &on.on, *to, *json),
        Command::Generations { target, machine, json } => fleet::generations(g, target, machine, *json),
        Command::UploadKeys { target, on } => fleet::upload_keys(g, target, &on.on),
        Command::Start { target, on, generation: None } => fleet::operate(g, target, &on.on, Operation::Start, true),
        Command::Start { target, on, generation: Some(n) } => fleet::start_at(g, target, &on.on, *n),
        Command::Stop { target, on } => fleet::operate(g, target, &on.on, Operation::Stop, true),
        Command::Reboot { target, on, hard } => {
            fleet::operate(g, target, &on.on, if *hard { Operation::HardReboot } else { Operation::Reboot }, true)
        }
        Command::Destroy { target, on, yes, forget } => {
            fleet::operate(g, target, &on.on, if *forget { Operation::Forget } else { Operation::Destroy }, *yes)
        }
        Command::Check { target, on, json } => fleet::check(g, target, &on.on, *json),
        Command::Exec { target, machine, all, on, record_command, command } => {
            fleet::exec(g, target, machine.as_deref(), *all, on.as_deref(), command, *record_command)
        }
        Command::Shell { target, machine } => fleet::shell(g, target, machine),
        Command::AgentExec { target, machine, tty, command } => fleet::agent_exec(g, target, machine, *tty, command),
        Command::Logs { target, machine, service, follow, lines, console } => fleet::logs(g, target, machine, service.as_deref(), *follow, *lines, *console),
        Command::Unlock { target, force } => {
            let mut engine = engine(g, open_state(g)?)?;
            let name = deployment_name(&engine, target)?;
            match engine.unlock(&name, *force)? {
                flotilla_state::Broken::Broken(l) => eprintln!(
                    "broke the lock of deployment {name} held by {} (pid {} on {}, `{}`) since {}",
                    l.holder,
                    l.pid,
                    l.host,
                    l.command,
                    flotilla_model::format_time(l.since)
                ),
                flotilla_state::Broken::Refused(_, why) => bail!("{why}"),
                flotilla_state::Broken::NotLocked => eprintln!("deployment {name} was not locked"),
            }
            Ok(Outcome::Ok)
        }
        Command::Delete { target, force, yes } => {
            if *force && fleet::operate(g, target, "", Operation::Forget, *yes)? != Outcome::Ok {
                bail!("some machines could not be forgotten (above); destroy them, then delete again");
            }
            let mut engine = engine(g, open_state(g)?)?;
            let name = deployment_name(&engine, target)?;
            if !engine.delete(&name, &agent_path()?)? {
                bail!("no deployment named `{name}` in the state database; `flotilla list` shows the known ones");
            }
            eprintln!("deleted deployment {name}");
            Ok(Outcome::Ok)
        }
        Command::Eval { target, json } => {
            let state = open_state(g)?;
            let file = deployment_file(&state, target)?;
            let engine = engine(g, state)?;
            let ev = engine.evaluate(&file)?;
            if *json {
                output::json(&ev.to_json());
            } else {
                output::evaluated(&ev);
            }
            Ok(Outcome::Ok)
        }
        Command::Debug { command } => debug::run(g, command),
        Command::Cache { command } => cache::run(g, command),
        Command::Image { command: Some(cli::ImageCommand::Push { from, reference, registry, json }), .. } => {
            let reference = flotilla_engine::oci::registry::Reference::parse(reference)?;
            let source = flotilla_engine::oci::registry::OciLayoutDir::open(from)?;
            push_image(&source, &reference, registry, *json)
        }
        Command::Image { command: None, target, machine, format, output, push, registry, tag, labels, json } => {
            let (Some(machine), Some(format)) = (machine, format) else {
                bail!("flotilla image needs a MACHINE and --format (or the subcommand `push`)");
            };
            let kind = cli::ImageKind::from(*format);
            if let cli::ImageKind::Disk(disk) = kind {
                if tag.is_some() || !labels.is_empty() {
                    bail!("--tag and --label are for OCI images (--format oci or docker-archive); a disk image has neither");
                }
                if push.is_some() {
                    bail!("--push takes an OCI image (--format oci or docker-archive), and --format {} makes a disk image; build it without --push", disk.as_str());
                }
            }
            // Checked before anything is evaluated or built.
            let push = push.as_deref().map(flotilla_engine::oci::registry::Reference::parse).transpose()?;
            if let cli::ImageKind::Oci(_) = kind {
                flotilla_engine::oci::parse_labels(labels).map_err(|e| anyhow!(e))?;
            }
            let state_path = g.state.clone().unwrap_or_else(flotilla_state::default_path);
            let state = open_state(g)?;
            let file = deployment_file(&state, target)?;
            let engine = engine(g, state)?;
            let ev = engine.evaluate(&file)?;
            let machine = flotilla_model::MachineName::new(machine).map_err(|e| anyhow!("machine {machine}: {e}"))?;
            let verbose = g.verbose;
            let mut listen = |e: &EngineEvent| output::progress(e, verbose);
            match kind {
                cli::ImageKind::Disk(format) => {
                    let report = engine.image(&ev, &machine, format, &agent_path()?, output.as_deref(), &mut listen)?;
                    output::image_report(&report, *json);
                }
                cli::ImageKind::Oci(format) => {
                    // A docker archive is made from a layout kept beside the state, whose index
                    // of known layers makes the next build of the machine quick.
                    let cache = state_path.parent().map(std::path::Path::to_owned).unwrap_or_else(|| PathBuf::from("."));
                    let req = flotilla_engine::oci::OciRequest { tag: tag.clone(), labels: labels.clone(), output: output.clone(), cache };
                    let report = engine.oci_image(&ev, &machine, format, &req, &agent_path()?, &mut listen)?;
                    let Some(reference) = push else {
                        output::oci_report(&report, *json);
                        return Ok(Outcome::Ok);
                    };
                    let image = report.image.as_ref().expect("a built OCI image carries its blobs");
                    if *json {
                        let pushed = push_to_registry(image, &reference, registry)?;
                        output::json(&serde_json::json!({ "image": report, "push": pushed }));
                    } else {
                        output::oci_report(&report, false);
                        push_image(image, &reference, registry, false)?;
                    }
                }
            }
            Ok(Outcome::Ok)
        }
        Command::Build { target, on, builders, json } => {
            let Prepared { mut engine, ev, instantiated, selected, agent } = prepare_build(g, target, on, builders.as_deref())?;
            let verbose = g.verbose;
            let mut listen = |e: &EngineEvent| output::progress(e, verbose);
            let report = engine.build_instantiated(&ev, &selected, &agent, instantiated, &mut listen)?;
            output::build_report(&report, *json);
            Ok(if report.all_ok() { Outcome::Ok } else { Outcome::SomeFailed })
        }
    }
}

/// Pushes an OCI image to a registry, layer by layer on stderr, and prints what was pushed.
pub(crate) fn push_image(source: &dyn flotilla_engine::oci::PushSource, reference: &flotilla_engine::oci::registry::Reference, registry: &cli::RegistryArgs, json: bool) -> Result<Outcome> {
    let report = push_to_registry(source, reference, registry)?;
    output::push_report(&report, json);
    Ok(Outcome::Ok)
}

/// Pushes `source`, its progress on stderr.
fn push_to_registry(source: &dyn flotilla_engine::oci::PushSource, reference: &flotilla_engine::oci::registry::Reference, registry: &cli::RegistryArgs) -> Result<flotilla_engine::oci::registry::PushReport> {
    let options = flotilla_engine::oci::registry::PushOptions { plain_http: registry.plain_http, credentials: None };
    eprintln!("push: {reference}");
    Ok(flotilla_engine::oci::registry::push(source, reference, &options, &mut output::push_progress)?)
}

/// What `build` and `deploy` start from: the deployment evaluated (and instantiated when it
/// could be in the same Nix call), the machines `--on` picks, and the agent to build with.
pub(crate) struct Prepared {
    pub engine: Engine,
    pub ev: flotilla_engine::Evaluated,
    pub instantiated: Option<flotilla_engine::Toplevels>,
    pub selected: Vec<flotilla_model::MachineName>,
    pub agent: PathBuf,
}

/// `builders` (`--builders`) replaces `meta.builders`.
pub(crate) fn prepare_build(g: &Global, target: &Target, on: &str, builders: Option<&str>) -> Result<Prepared> {
    let state = open_state(g)?;
    let file = deployment_file(&state, target)?;
    let engine = engine(g, state)?;
    let agent = agent_path()?;
    let (mut ev, instantiated) = engine.evaluate_for_build(&file, &agent)?;
    if let Some(spec) = builders {
        ev.set_builders(spec)?;
    }
    let selected = ev.select(&Selection::parse(on))?;
    Ok(Prepared { engine, ev, instantiated, selected, agent })
}

pub(crate) fn open_state(g: &Global) -> Result<State> {
    let path = g.state.clone().unwrap_or_else(flotilla_state::default_path);
    Ok(State::open(&path)?)
}

pub(crate) fn nix(g: &Global) -> Result<Nix> {
    Ok(Nix::new(NixOptions {
        include: g.include.clone(),
        substituters: g.substituters.clone(),
        show_trace: g.show_trace,
        library: std::env::var_os("FLOTILLA_NIX_LIB").map(PathBuf::from),
    })?)
}

pub(crate) fn engine(g: &Global, state: State) -> Result<Engine> {
    Ok(Engine::new(nix(g)?, state, actor()))
}

/// The deployment file: `-f`, or the file `-d NAME` was last evaluated from.
pub(crate) fn deployment_file(state: &State, t: &Target) -> Result<PathBuf> {
    match (&t.file, &t.deployment) {
        (Some(f), _) => Ok(f.clone()),
        (None, Some(name)) => {
            let dep = state.deployment(name)?.ok_or_else(|| anyhow!("no deployment named `{name}` in the state database; pass its file with -f"))?;
            dep.file.map(PathBuf::from).ok_or_else(|| anyhow!("deployment `{name}` has no recorded file; pass it with -f"))
        }
        (None, None) => bail!("say which deployment: -f FILE (a deployment file) or -d NAME (a deployment in the state database)"),
    }
}

/// The deployment's name: `-d`, the `meta.name` of `-f FILE` (evaluated), or the only
/// deployment in the state DB.
pub(crate) fn deployment_name(engine: &Engine, t: &Target) -> Result<String> {
    match (&t.deployment, &t.file) {
        (Some(name), _) => Ok(name.clone()),
        (None, Some(file)) => Ok(engine.evaluate(file)?.name.to_string()),
        (None, None) => match engine.state().deployments()?.as_slice() {
            [only] => Ok(only.name.clone()),
            [] => bail!("no deployments yet; deploy one with `flotilla deploy -f FILE`"),
            many => bail!(
                "say which deployment with -d NAME or -f FILE; the state database has {}",
                many.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        },
    }
}

/// The static agent binary: `$FLOTILLA_AGENT`, else `flotilla-agent` beside this program.
pub(crate) fn agent_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLOTILLA_AGENT").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the flotilla executable")?;
    Ok(exe.parent().unwrap_or(Path::new(".")).join("flotilla-agent"))
}

/// Who is acting, for the ledger: `user@host`.
fn actor() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "root".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{user}@{}", host.trim())
}


#[cfg(test)]
mod tests {
    use super::chain_text;

    #[test]
    fn a_cause_the_message_already_says_is_not_said_twice() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(flotilla_engine::EngineError::Io { what: "cannot read", path: "/x".into(), source }).context("image vm1");
        assert_eq!(chain_text(&e), "image vm1: cannot read /x: No such file or directory");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(chain_text(&e), "outer: inner");
    }
}
