//! Platforms: where machines run. Each platform provisions, starts, stops and destroys its
//! machines, and says how to reach a machine's agent and run a command in it. The deploy
//! pipeline and the fleet commands talk to machines only through [`Machine`].

pub mod local;
pub mod ssh;
mod sys;

use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_model::Platform;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

use crate::remote::{AgentClient, RemoteError};

/// Why a platform operation failed; the message names the machine and what to do.
#[derive(Debug, thiserror::Error)]
#[error("machine {machine}: {message}")]
pub struct PlatformError {
    /// The machine.
    pub machine: String,
    /// What went wrong and the fix.
    pub message: String,
}

/// What [`Machine::set_boot_generation`] did.
#[derive(Debug, Clone)]
pub struct BootGeneration {
    /// The generation the profile pointed at before.
    pub from: Option<u64>,
    /// The generation it points at now.
    pub to: u64,
    /// That generation's toplevel.
    pub toplevel: flotilla_store::StorePath,
}

/// A machine's lifecycle state as its platform sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// Never created, or destroyed.
    Missing,
    /// Created but not running.
    Stopped,
    /// Running.
    Running,
    /// Its host does not answer, so its state is unknown.
    Unreachable,
    /// This flotilla cannot handle it: its platform is unknown to this build, or its
    /// recorded options make no sense. Nothing can be done to it but forget it.
    Unusable,
}

impl MachineState {
    /// As users read it.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Missing => "missing",
            MachineState::Stopped => "stopped",
            MachineState::Running => "running",
            MachineState::Unreachable => "unreachable",
            MachineState::Unusable => "unusable",
        }
    }
}

/// One machine of a deployment, on its platform.
pub trait Machine: Send + Sync {
    /// The machine's name.
    fn name(&self) -> &str;
    /// Whether it exists and runs.
    fn state(&self) -> MachineState;
    /// Creates it if missing and starts it if stopped; returns what was done, if anything,
    /// as the user should read it.
    fn provision(&self) -> Result<Option<String>, PlatformError>;
    /// Starts it (it must exist).
    fn start(&self) -> Result<(), PlatformError>;
    /// Stops it: the agent stops services cleanly first.
    fn stop(&self) -> Result<(), PlatformError>;
    /// Stops and starts it; `hard` restarts what it runs on too (an ssh host reboots).
    fn reboot(&self, hard: bool) -> Result<(), PlatformError> {
        let _ = hard; // a container is its own host
        self.stop()?;
        self.start()
    }
    /// Puts back what a running machine lost of the platform's own plumbing (its network
    /// links, address, route, port forwards), whoever changed it; returns what was restored,
    /// as the user should read it. Platforms with no plumbing of their own have nothing to do.
    fn restore(&self) -> Result<Option<String>, PlatformError> {
        Ok(None)
    }
    /// What is wrong with the platform's own plumbing of a running machine, each with the fix.
    fn problems(&self) -> Vec<String> {
        Vec::new()
    }
    /// Proves that the machine is reachable the way its users reach it, from this host. The
    /// default has nothing to add: where the agent's own connection travels the machine's
    /// network (ssh), a new connection to it already proves it.
    fn check_reachable(&self) -> Result<(), String> {
        Ok(())
    }
    /// Makes generation `to` (by default the newest good one before the current) the one a
    /// stopped machine boots, by switching its `system` profile from outside: a bad release
    /// whose agent no longer answers is undone without it. Only platforms whose machines'
    /// disks this host holds can; the default says what to do instead.
    fn set_boot_generation(&self, to: Option<u64>) -> Result<BootGeneration, PlatformError> {
        let _ = to;
        Err(PlatformError {
            machine: self.name().to_owned(),
            message: "it is not running, and its platform cannot change its generation from outside; start it, then `flotilla rollback`".into(),
        })
    }
    /// Removes every trace of it.
    fn destroy(&self) -> Result<(), PlatformError>;
    /// Connects to its agent.
    fn connect(&self) -> Result<AgentClient, RemoteError>;
    /// A command that runs `argv` inside the machine (an interactive one with a terminal when
    /// `tty`).
    fn command(&self, argv: &[String], tty: bool) -> Result<Command, PlatformError>;
    /// An interactive login shell on the machine.
    fn shell(&self) -> Result<Command, PlatformError> {
        self.command(&["sh".into(), "-l".into()], true)
    }
    /// A command printing the last `lines` lines of a service's log (every service's when
    /// `None`), following it with `follow`: the agent's `logs` command, run where the logs are.
    fn logs(&self, service: Option<&str>, lines: usize, follow: bool) -> Result<Command, PlatformError>;
    /// What the machine is made of on this host (root directory, network names, ...), for
    /// people looking for it and for cleaning up by hand.
    fn resources(&self) -> BTreeMap<String, String>;
}

/// What a platform needs to know of the deployer.
#[derive(Debug, Clone)]
pub struct Context {
    /// The state DB's file; machines' local data lives beside it.
    pub state_path: PathBuf,
    /// The deployment.
    pub deployment: String,
    /// The static agent binary to bootstrap machines with.
    pub agent: PathBuf,
}

impl Context {
    /// Where a deployment's local machine data lives.
    pub fn machines_dir(&self) -> PathBuf {
        self.state_path.parent().unwrap_or(Path::new(".")).join("machines").join(&self.deployment)
    }
}

/// A machine this flotilla cannot handle (see [`MachineState::Unusable`]): every operation
/// fails with why, so that a fleet command makes it one failed row and goes on with the rest.
pub struct Unusable {
    name: String,
    why: String,
}

impl Unusable {
    /// Machine `name`, unusable for `why` (a sentence with the fix).
    pub fn new(name: &str, why: impl Into<String>) -> Unusable {
        Unusable { name: name.to_owned(), why: why.into() }
    }

    fn err(&self) -> PlatformError {
        PlatformError { machine: self.name.clone(), message: self.why.clone() }
    }
}

impl Machine for Unusable {
    fn name(&self) -> &str {
        &self.name
    }
    fn state(&self) -> MachineState {
        MachineState::Unusable
    }
    fn provision(&self) -> Result<Option<String>, PlatformError> {
        Err(self.err())
    }
    fn start(&self) -> Result<(), PlatformError> {
        Err(self.err())
    }
    fn stop(&self) -> Result<(), PlatformError> {
        Err(self.err())
    }
    fn problems(&self) -> Vec<String> {
        vec![self.why.clone()]
    }
    fn set_boot_generation(&self, _to: Option<u64>) -> Result<BootGeneration, PlatformError> {
        Err(self.err())
    }
    fn destroy(&self) -> Result<(), PlatformError> {
        Err(self.err())
    }
    fn connect(&self) -> Result<AgentClient, RemoteError> {
        Err(RemoteError::Transport { destination: format!("machine {}", self.name), message: self.why.clone() })
    }
    fn command(&self, _argv: &[String], _tty: bool) -> Result<Command, PlatformError> {
        Err(self.err())
    }
    fn logs(&self, _service: Option<&str>, _lines: usize, _follow: bool) -> Result<Command, PlatformError> {
        Err(self.err())
    }
    fn resources(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}

/// The machine `name` on `platform`, with its recorded facts.
pub fn machine(ctx: &Context, name: &str, platform: &Platform, facts: &BTreeMap<String, Value>) -> Result<Box<dyn Machine>, PlatformError> {
    match platform {
        Platform::Local(spec) => Ok(Box::new(local::LocalMachine::new(ctx, name, spec, facts)?)),
        Platform::Ssh(spec) => Ok(Box::new(ssh::SshMachine::new(ctx, name, spec)?)),
        other => Err(PlatformError {
            machine: name.to_owned(),
            message: format!(
                "option `platform.type` is \"{}\", which this flotilla cannot deploy to yet; use \"local\" or \"ssh\"",
                other.kind()
            ),
        }),
    }
}
