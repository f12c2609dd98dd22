//! The `flotilla-agent` command. Subcommands are parsed by hand to keep the agent's
//! dependencies few: it is copied to every machine.

use std::process::ExitCode;

const USAGE: &str = "usage: flotilla-agent <command>

commands:
  build-system   build a toplevel (run by Nix as a derivation's builder)
  --version      print the agent's version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-system") => flotilla_agent::build_system::main_from_env().map_err(|e| e.to_string()),
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
