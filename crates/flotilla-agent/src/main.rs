//! The `flotilla-agent` command. Every subcommand's options go through the agent's one parser,
//! [`flotilla_agent::cli`], written by hand to keep the agent's dependencies few: it is copied
//! to every machine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_agent::activate::Agent;
use flotilla_agent::cli::{Options, UsageError};
use flotilla_agent::container::{ContainerArgs, ContainerError};
use flotilla_agent::daemon::{self, AgentLock, Detached, PidFileGuard, State, Stopped};
use flotilla_agent::logs::Tail;
use flotilla_agent::machine::MachineRoot;
use flotilla_agent::supervisor::{install_termination_handler, Supervisor, SupervisorConfig, SupervisorError};

const USAGE: &str = "usage: flotilla-agent <command> [options]

Every DIR is the machine's root (default /). Exit status 2 means the command line was wrong or
the command could not run at all.

commands:
  init [--root DIR] [--detach [--log FILE]]
                       supervise the machine at DIR: run its current system's services and
                       answer deployers on DIR/run/flotilla/agent.sock; SIGTERM stops every
                       service cleanly, then the agent. While it runs it holds
                       DIR/run/flotilla/agent.lock and, before it listens, its pid and start
                       time are in DIR/run/flotilla/agent.pid as {\"pid\":N,\"startTime\":T}
                       (T: field 22 of /proc/N/stat). In the foreground (what systemd runs) it
                       returns when stopped; exit 2 if it cannot start (e.g. another agent
                       runs on DIR).
                       --detach starts it as a daemon instead (new session, stdin /dev/null,
                       stdout and stderr appended to FILE, default
                       DIR/var/log/flotilla-agent.log, working directory /, umask 022) and
                       returns once it answers on its socket, printing `started PID`; if an
                       agent answers already it starts nothing and prints `already running`
                       (exit 0 both). Exit 1 with the reason and the end of the log if the
                       agent died or did not answer within 15 s (it is then sent SIGTERM).
  stop [--root DIR] [--timeout SECS]
                       stop the agent that DIR/run/flotilla/agent.pid names, if that pid still
                       has the recorded start time (a reused pid is never signalled): SIGTERM
                       (it stops every service, then exits), SIGKILL after SECS (default 30).
                       Prints `stopped`, or `not running` (exit 0 both); prints `killed` and
                       exits 1 when SIGKILL was needed (services it had not stopped may still
                       run); exit 1 with the reason if it cannot stop it. For an agent that a
                       service manager runs, stop it there (`systemctl stop ...`).
  status-line [--root DIR]
                       print one line and exit 0: `running PID` (the pidfile names a live
                       agent), `running` (an agent answers on the socket but wrote no pidfile:
                       an older agent) or `stopped`; exit 1 if the pidfile cannot be read
  logs [--root DIR] [-n LINES] [-f] [SERVICE]
                       print the last LINES (default 50) lines of SERVICE's log,
                       DIR/var/log/flotilla/SERVICE.log, or of every log there, each line then
                       prefixed `SERVICE | `; -f goes on printing whole lines as they are
                       appended, across rotations, until interrupted. Exit 2 when SERVICE has
                       no log (the message names the services that have one; `logs` without
                       SERVICE shows them all).
  uninstall [--root DIR] --yes
                       remove everything the agent placed on the machine, by its records, and
                       nothing else: its /etc entries that are still what it placed, the users
                       and groups it created (their lines of /etc/passwd, group, shadow,
                       gshadow), its keys, /run/current-system, the store paths it registered
                       (not those registered as the host's own), DIR/nix/var/flotilla,
                       DIR/var/log/flotilla and DIR/run/flotilla; then /nix/store and /nix if
                       left empty while /nix/var/nix does not exist. Never /nix/var/nix or an
                       unregistered store path. Prints one line per thing: `removed WHAT`,
                       `restored WHAT`, `kept WHAT: WHY`, `failed WHAT: WHY`, then
                       `uninstalled: N removed, N kept, N failed`. Exit 0 when done, 1 when it
                       refused and changed nothing (an agent runs: `flotilla-agent stop` it
                       first; /bin/sh is the agent's link into a store path it would remove;
                       a record cannot be read) or something failed; 2 without --yes.
  adopt [--root DIR] TOPLEVEL
                       take TOPLEVEL's closure, built by the machine's own Nix, as the agent's
                       own: each path is hashed and registered as the host's (never deleted
                       by the agent) when it matches what Nix recorded; prints each path's
                       info as one JSON line, references first. Exit 1 when the machine has
                       no Nix, a path is not valid in Nix's database or its bytes differ.
  stdio [--root DIR]   carry the protocol between stdin/stdout and the running agent's
                       socket (what `ssh host flotilla-agent stdio` runs)
  container --root DIR --hostname NAME --netns PATH --pidfile FILE --console FILE
            [--forward HOSTPORT:IP:PORT]... [--adopt]
                       start the machine at DIR as a local container: the agent's `init`
                       as PID 1 of new PID, mount, UTS and IPC namespaces, in the network
                       namespace PATH (made by `ip netns add`), with DIR as / and fresh
                       /proc, /dev, /run and /tmp; each --forward relays 127.0.0.1:HOSTPORT
                       here to IP:PORT. Exits 0 once the agent runs, 1 with the reason if
                       it cannot; the pidfile then holds JSON with the pids of the monitor
                       and of init (SIGTERM to init stops the machine), all output is
                       appended to the console file. With --adopt, the container of the
                       pidfile runs but its monitor died: a new monitor takes over its
                       forwards and its pidfile instead
  forward --forward HOSTPORT:IP:PORT...
                       relay 127.0.0.1:HOSTPORT to IP:PORT (a VM's port forwards, started
                       by the deployer): says `ready` once every port is bound, or exits 1
                       with the reason; serves until killed
  plan --root DIR      read a Plan request (JSON) on stdin and print the plan (JSON) of a
                       machine that runs nothing yet, DIR an empty directory standing for it:
                       how the deployer plans a machine it has not provisioned
  build-system         build a toplevel (run by Nix as a derivation's builder)
  build-image          build a machine's disk image (run by Nix as a derivation's builder)
  build-oci-root       build the machine layer of a machine's OCI image (run by Nix as a
                       derivation's builder): the agent's registry, generation 1 and /etc
  build-initrd         build a VM's initramfs (run by Nix as a derivation's builder, with
                       kernel, kernelModules and out in the environment): writes $out/initrd,
                       a newc cpio archive of this binary as /init and the kernel's modules
                       a VM needs. Started as /init (by the kernel) the agent runs stage 1: it
                       mounts the root labelled flotilla-root (root=LABEL=... on the kernel
                       command line) and execs its system's agent as `init --root / --vm`,
                       the VM's init
  init --root / --vm   a VM's PID 1: mounts /dev/pts, /run, /tmp, /dev/shm, grows the root,
                       sets the hostname and network (flotilla.hostname, flotilla.ip,
                       flotilla.gateway on the kernel command line, else a NoCloud seed),
                       then runs as `init` and also serves every virtio-serial port named
                       flotilla.agent*; a PowerOff request, SIGTERM or a failure ends in
                       power off
  --version            print the agent's version";

/// Why a command failed, and so its exit status.
enum Failure {
    /// The command line was wrong, or the command could not run at all: exit 2.
    Usage(String),
    /// The command ran and failed (or refused): exit 1.
    Failed(String),
}

impl From<UsageError> for Failure {
    fn from(e: UsageError) -> Failure {
        Failure::Usage(e.to_string())
    }
}

/// Why `init` or `stdio` could not run (exit status 2).
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// Something on the machine failed: what was being done, and why.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The connection to the agent broke.
    #[error("{0}")]
    Stream(#[from] std::io::Error),
    /// The supervisor could not start.
    #[error("{0}")]
    Supervisor(#[from] SupervisorError),
    /// Another agent runs, or none does; the sentence says what to do.
    #[error("{0}")]
    Refused(String),
}

impl From<RunError> for Failure {
    fn from(e: RunError) -> Failure {
        Failure::Usage(e.to_string())
    }
}

/// `plan --root DIR`: the plan of a machine not provisioned yet, against the empty `DIR`.
fn plan(args: &[String]) -> Result<ExitCode, Failure> {
    let o = Options::parse(args, &[], &[], 0)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|e| Failure::Usage(format!("cannot read the plan request on stdin: {e}")))?;
    let request: flotilla_protocol::Request = serde_json::from_str(&text).map_err(|e| Failure::Usage(format!("stdin holds no plan request: {e}")))?;
    let flotilla_protocol::Request::Plan { toplevel, manifest: Some(manifest), keys_written, .. } = request else {
        return Err(Failure::Usage("stdin must hold a `plan` request with its manifest".into()));
    };
    let plan = flotilla_agent::activate::plan_empty(&o.root, &toplevel, &manifest, &keys_written).map_err(|e| Failure::Failed(e.to_string()))?;
    println!("{}", serde_json::to_string(&plan).map_err(|e| Failure::Failed(e.to_string()))?);
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // The kernel runs the initramfs's /init, this binary, with no arguments: stage 1.
    if std::env::args().next().is_some_and(|argv0| flotilla_agent::vm::stage1::is_stage1(&argv0)) {
        flotilla_agent::vm::stage1::run();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    // udhcpc, started by a VM's init for a seed that asks for DHCP, runs this agent as its script.
    let udhcpc_event = args.first().is_some_and(|a| ["deconfig", "bound", "renew", "leasefail", "nak"].contains(&a.as_str()));
    if udhcpc_event && args.len() == 1 && std::env::var_os(flotilla_agent::vm::net::DHCP_SCRIPT_ENV).is_some() {
        return match flotilla_agent::vm::net::dhcp_script(args.first().map(String::as_str).unwrap_or("")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("flotilla-agent: DHCP: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let rest = args.get(1..).unwrap_or_default();
    if args.len() > 1 && rest.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let result: Result<ExitCode, Failure> = match args.first().map(String::as_str) {
        Some("build-system") => flotilla_agent::build_system::main_from_env().map(|()| ExitCode::SUCCESS).map_err(|e| Failure::Usage(e.to_string())),
        Some("build-initrd") => flotilla_agent::vm::initrd::main_from_env().map(|()| ExitCode::SUCCESS).map_err(|e| Failure::Usage(e.to_string())),
        Some("build-image") => flotilla_agent::build_image::main_from_env().map(|()| ExitCode::SUCCESS).map_err(|e| Failure::Usage(e.to_string())),
        Some("build-oci-root") => flotilla_agent::build_image::oci_root::main_from_env().map(|()| ExitCode::SUCCESS).map_err(|e| Failure::Usage(e.to_string())),
        Some("init") => init_command(rest),
        Some("stop") => stop(rest),
        Some("status-line") => status_line(rest),
        Some("logs") => logs(rest),
        Some("uninstall") => uninstall(rest),
        Some("adopt") => adopt(rest),
        Some("plan") => plan(rest),
        Some("stdio") => Options::parse(rest, &[], &[], 0).map_err(Failure::from).and_then(|o| stdio(o.root).map(|()| ExitCode::SUCCESS).map_err(Failure::from)),
        Some("container") => return container(rest),
        Some("forward") => flotilla_agent::forward::parse(rest).map_err(|e| Failure::Usage(e.to_string())).and_then(|f| {
            flotilla_agent::forward::run(&f).map(|()| ExitCode::SUCCESS).map_err(|e| Failure::Failed(e.to_string()))
        }),
        Some("--version") => {
            println!("flotilla-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Some("--help") | Some("-h") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(Failure::Usage(format!("unknown command {:?}\n{USAGE}", other.unwrap_or("")))),
    };
    match result {
        Ok(code) => code,
        Err(Failure::Usage(e)) => {
            eprintln!("flotilla-agent: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(e)) => {
            eprintln!("flotilla-agent: {e}");
            ExitCode::from(1)
        }
    }
}

/// The machine a command's `--root` names.
fn machine(opts: &Options) -> MachineRoot {
    MachineRoot::new(&opts.root)
}

fn init_command(args: &[String]) -> Result<ExitCode, Failure> {
    let opts = Options::parse(args, &["--log"], &["--detach", "--vm"], 0)?;
    if opts.flags.contains("--vm") {
        if opts.flags.contains("--detach") || opts.values.contains_key("--log") {
            return Err(Failure::Usage("--vm is a VM's init, in the foreground: it takes neither --detach nor --log".into()));
        }
        if std::process::id() != 1 {
            return Err(Failure::Usage("init --vm runs only as a VM's PID 1 (stage 1 of flotilla's initramfs starts it)".into()));
        }
        if let Err(e) = flotilla_agent::vm::prepare(&opts.root) {
            flotilla_agent::vm::fail("flotilla-agent", &format!("cannot prepare the machine: {e}"));
        }
        match init(opts.root.clone(), None) {
            Ok(()) => flotilla_agent::vm::power_off(&opts.root),
            Err(e) => flotilla_agent::vm::fail("flotilla-agent", &e.to_string()),
        }
    }
    if !opts.flags.contains("--detach") {
        if opts.values.contains_key("--log") {
            return Err(Failure::Usage("--log goes with --detach (in the foreground the agent writes to its stdout and stderr)".into()));
        }
        return init(opts.root, None).map(|()| ExitCode::SUCCESS).map_err(Failure::from);
    }
    let root = machine(&opts);
    let log = match opts.values.get("--log") {
        Some(f) => std::path::absolute(f).map_err(|e| Failure::Usage(format!("--log {f}: {e}")))?,
        None => daemon::default_log(&root),
    };
    let root_dir = opts.root.clone();
    let started = daemon::detach(&root, &log, move |lock| match init(root_dir, Some(lock)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("flotilla-agent: {e}");
            2
        }
    });
    match started.map_err(|e| Failure::Failed(e.to_string()))? {
        Detached::Started(pid) => println!("started {pid}"),
        Detached::AlreadyRunning => println!("already running"),
    }
    Ok(ExitCode::SUCCESS)
}

fn stop(args: &[String]) -> Result<ExitCode, Failure> {
    let opts = Options::parse(args, &["--timeout"], &[], 0)?;
    let timeout = match opts.values.get("--timeout") {
        Some(t) => Duration::from_secs(t.parse().map_err(|_| Failure::Usage(format!("--timeout {t}: not a number of seconds")))?),
        None => Duration::from_secs(30),
    };
    match daemon::stop(&machine(&opts), timeout).map_err(|e| Failure::Failed(e.to_string()))? {
        Stopped::NotRunning => println!("not running"),
        Stopped::Stopped(_) => println!("stopped"),
        Stopped::Killed(pid) => {
            println!("killed");
            return Err(Failure::Failed(format!(
                "the agent (pid {pid}) did not stop within {} s and was killed; services it had not stopped yet may still run",
                timeout.as_secs()
            )));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status_line(args: &[String]) -> Result<ExitCode, Failure> {
    let opts = Options::parse(args, &[], &[], 0)?;
    match daemon::state(&machine(&opts)).map_err(|e| Failure::Failed(e.to_string()))? {
        State::Running(Some(pid)) => println!("running {pid}"),
        State::Running(None) => println!("running"),
        State::Stopped => println!("stopped"),
    }
    Ok(ExitCode::SUCCESS)
}

fn logs(args: &[String]) -> Result<ExitCode, Failure> {
    let opts = Options::parse(args, &["-n"], &["-f"], 1)?;
    let lines: usize = match opts.values.get("-n") {
        Some(n) => n.parse().map_err(|_| Failure::Usage(format!("-n {n}: not a number of lines")))?,
        None => 50,
    };
    // An unknown service is a wrong command line (exit 2), as for the deployer's other checks.
    let selected = flotilla_agent::logs::select(&machine(&opts).log_dir(), opts.positional.first().map(String::as_str))
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let follow = opts.flags.contains("-f");
    let mut tail = Tail::new(selected);
    let mut out = std::io::stdout().lock();
    let shown = tail.print_last(lines, follow, &mut out).and_then(|()| {
        if follow {
            tail.follow(&mut out, Duration::from_millis(250), &mut || false)
        } else {
            Ok(())
        }
    });
    match shown {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // The reader went away (`| head`): nothing more to show.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(Failure::Failed(format!("cannot show the logs: {e}"))),
    }
}

fn uninstall(args: &[String]) -> Result<ExitCode, Failure> {
    let opts = Options::parse(args, &[], &["--yes"], 0)?;
    if !opts.flags.contains("--yes") {
        return Err(Failure::Usage(format!(
            "uninstall removes everything flotilla's agent placed on {}: its store paths, users, /etc entries, keys and state; run it again with --yes to do it",
            opts.root.display()
        )));
    }
    let summary = flotilla_agent::uninstall::uninstall(&machine(&opts), &mut |step| println!("{step}")).map_err(|e| Failure::Failed(e.to_string()))?;
    println!("uninstalled: {} removed, {} kept, {} failed", summary.removed, summary.kept, summary.failed);
    if summary.failed > 0 {
        return Err(Failure::Failed(format!("{} thing(s) could not be removed; see the `failed` lines above", summary.failed)));
    }
    Ok(ExitCode::SUCCESS)
}

fn adopt(args: &[String]) -> Result<ExitCode, Failure> {
    let opts = Options::parse(args, &[], &[], 1)?;
    let Some(toplevel) = opts.positional.first() else { return Err(Failure::Usage("adopt needs the toplevel's store path".into())) };
    let toplevel = flotilla_store::StorePath::parse(toplevel).map_err(|e| Failure::Usage(format!("{toplevel:?} is not a store path: {e}")))?;
    let infos = machine(&opts).adopt_from_nix(&toplevel).map_err(|e| Failure::Failed(e.to_string()))?;
    for info in infos {
        println!("{}", serde_json::to_string(&info).expect("serialises"));
    }
    Ok(ExitCode::SUCCESS)
}

/// `container` fails with exit status 1, whatever went wrong: the deployer reads the line.
fn container(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match ContainerArgs::parse(args).map_err(ContainerError::from).and_then(|a| flotilla_agent::container::launch(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla-agent: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs the agent in this process until SIGTERM. `lock` is the agent's lock when the caller
/// (`init --detach`) took it already.
fn init(root_dir: PathBuf, lock: Option<AgentLock>) -> Result<(), RunError> {
    let root = MachineRoot::new(&root_dir);
    root.prepare().map_err(|source| RunError::Io { what: format!("cannot prepare {}", root_dir.display()), source })?;
    let socket = root.socket_path();
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Err(RunError::Refused(format!("an agent already answers on {}; stop it first", socket.display())));
    }
    let lock_path = daemon::lock_path(&root);
    let _lock = match lock {
        Some(lock) => lock,
        None => AgentLock::acquire(&root)
            .map_err(|source| RunError::Io { what: format!("cannot lock {}", lock_path.display()), source })?
            .ok_or_else(|| RunError::Refused(format!("another agent runs on {}: it holds {}; stop it first", root_dir.display(), lock_path.display())))?,
    };
    let _ = std::fs::remove_file(&socket);
    let term = install_termination_handler()?;
    let supervisor = Arc::new(
        Supervisor::new(SupervisorConfig {
            root: root_dir.clone(),
            log_dir: root.log_dir(),
            stop_timeout: Duration::from_secs(10),
            log_max_bytes: 10 << 20,
            log_keep: 3,
        })?,
    );
    let agent = Agent::new(root.clone(), Arc::clone(&supervisor));
    for e in agent.start_running_system() {
        eprintln!("flotilla-agent: {e}");
    }
    // Written before the socket answers, so whoever sees the agent answer finds its pid (a
    // launcher returns at the first answer); removed when this returns, after every service
    // stopped.
    let _pidfile = PidFileGuard::write(&root).map_err(|source| RunError::Io { what: format!("cannot write {}", daemon::pidfile_path(&root).display()), source })?;
    let agent = Arc::new(Mutex::new(agent));
    let keeper = flotilla_agent::server::listen(Arc::clone(&agent), &socket).map_err(|source| RunError::Io { what: format!("cannot listen on {}", socket.display()), source })?;
    eprintln!("flotilla-agent {}: managing {}, listening on {}", env!("CARGO_PKG_VERSION"), root_dir.display(), socket.display());
    if flotilla_agent::vm::is_vm_init() {
        let ports = flotilla_agent::vm::virtio::serve_ports(&agent);
        eprintln!("flotilla-agent: serving the virtio-serial ports {}", if ports.is_empty() { "(none found)".to_owned() } else { ports.join(", ") });
    }
    term.wait();
    eprintln!("flotilla-agent: stopping services");
    // Hold the lock so no activation runs while everything stops.
    let _held = agent.lock().unwrap_or_else(|p| p.into_inner());
    supervisor.stop_all();
    keeper.stop();
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn stdio(root_dir: PathBuf) -> Result<(), RunError> {
    let socket = MachineRoot::new(&root_dir).socket_path();
    let stream = std::os::unix::net::UnixStream::connect(&socket)
        .map_err(|e| RunError::Refused(format!("no agent answers on {} ({e}); start one with `flotilla-agent init`", socket.display())))?;
    let mut to_agent = stream.try_clone()?;
    let mut from_agent = stream;
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_agent);
        let _ = to_agent.shutdown(std::net::Shutdown::Write);
    });
    relay(&mut from_agent, &mut std::io::stdout().lock())?;
    let _ = up.join();
    Ok(())
}

/// Copies until end of file, flushing after every read: stdout is line-buffered, and the
/// protocol's frames have no newlines, so `io::copy` would sit on the agent's answers.
fn relay(from: &mut impl std::io::Read, to: &mut impl std::io::Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return to.flush(),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

