//! The `flotilla-agent` command. Subcommands are parsed by hand to keep the agent's
//! dependencies few: it is copied to every machine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_agent::activate::Agent;
use flotilla_agent::container::ContainerArgs;
use flotilla_agent::machine::MachineRoot;
use flotilla_agent::supervisor::{install_termination_handler, Supervisor, SupervisorConfig};

const USAGE: &str = "usage: flotilla-agent <command> [options]

commands:
  init [--root DIR]    supervise the machine at DIR (default /): run its current system's
                       services and answer deployers on DIR/run/flotilla/agent.sock;
                       SIGTERM stops every service cleanly, then the agent
  stdio [--root DIR]   carry the protocol between stdin/stdout and the running agent's
                       socket (what `ssh host flotilla-agent stdio` runs)
  container --root DIR --hostname NAME --netns PATH --pidfile FILE --console FILE
            [--forward HOSTPORT:IP:PORT]...
                       start the machine at DIR as a local container: the agent's `init`
                       as PID 1 of new PID, mount, UTS and IPC namespaces, in the network
                       namespace PATH (made by `ip netns add`), with DIR as / and fresh
                       /proc, /dev, /run and /tmp; each --forward relays 127.0.0.1:HOSTPORT
                       here to IP:PORT. Exits 0 once the agent runs, 1 with the reason if
                       it cannot; the pidfile then holds JSON with the pids of the monitor
                       and of init (SIGTERM to init stops the machine), all output is
                       appended to the console file
  build-system         build a toplevel (run by Nix as a derivation's builder)
  --version            print the agent's version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-system") => flotilla_agent::build_system::main_from_env().map_err(|e| e.to_string()),
        Some("init") => root_arg(&args[1..]).and_then(init),
        Some("stdio") => root_arg(&args[1..]).and_then(stdio),
        Some("container") => return container(&args[1..]),
        Some("--version") => {
            println!("flotilla-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("--help") | Some("-h") => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command {:?}\n{USAGE}", other.unwrap_or(""))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla-agent: {e}");
            ExitCode::from(2)
        }
    }
}

fn root_arg(args: &[String]) -> Result<PathBuf, String> {
    match args {
        [] => Ok(PathBuf::from("/")),
        [flag, dir] if flag == "--root" => {
            std::path::absolute(dir).map_err(|e| format!("--root {dir}: {e}"))
        }
        _ => Err(format!("unexpected arguments {args:?}\n{USAGE}")),
    }
}

/// `container` fails with exit status 1, whatever went wrong: the deployer reads the line.
fn container(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match ContainerArgs::parse(args).and_then(|a| flotilla_agent::container::launch(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla-agent: {e}");
            ExitCode::from(1)
        }
    }
}

fn init(root_dir: PathBuf) -> Result<(), String> {
    let root = MachineRoot::new(&root_dir);
    root.prepare().map_err(|e| format!("cannot prepare {}: {e}", root_dir.display()))?;
    let socket = root.socket_path();
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Err(format!("an agent already answers on {}; stop it first", socket.display()));
    }
    let _ = std::fs::remove_file(&socket);
    let term = install_termination_handler().map_err(|e| e.to_string())?;
    let supervisor = Arc::new(
        Supervisor::new(SupervisorConfig {
            root: root_dir.clone(),
            log_dir: root.log_dir(),
            stop_timeout: Duration::from_secs(10),
            log_max_bytes: 10 << 20,
            log_keep: 3,
        })
        .map_err(|e| e.to_string())?,
    );
    let agent = Agent::new(root.clone(), Arc::clone(&supervisor));
    for e in agent.start_running_system() {
        eprintln!("flotilla-agent: {e}");
    }
    let listener = std::os::unix::net::UnixListener::bind(&socket).map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    let agent = Arc::new(Mutex::new(agent));
    {
        let agent = Arc::clone(&agent);
        std::thread::spawn(move || flotilla_agent::server::serve(agent, listener));
    }
    eprintln!("flotilla-agent {}: managing {}, listening on {}", env!("CARGO_PKG_VERSION"), root_dir.display(), socket.display());
    term.wait();
    eprintln!("flotilla-agent: stopping services");
    // Hold the lock so no activation runs while everything stops.
    let _held = agent.lock().unwrap_or_else(|p| p.into_inner());
    supervisor.stop_all();
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn stdio(root_dir: PathBuf) -> Result<(), String> {
    let socket = MachineRoot::new(&root_dir).socket_path();
    let stream = std::os::unix::net::UnixStream::connect(&socket)
        .map_err(|e| format!("no agent answers on {} ({e}); start one with `flotilla-agent init`", socket.display()))?;
    let mut to_agent = stream.try_clone().map_err(|e| e.to_string())?;
    let mut from_agent = stream;
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_agent);
        let _ = to_agent.shutdown(std::net::Shutdown::Write);
    });
    std::io::copy(&mut from_agent, &mut std::io::stdout().lock()).map_err(|e| e.to_string())?;
    let _ = up.join();
    Ok(())
}
