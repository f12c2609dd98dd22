//! Platforms: where machines run. Each platform provisions, starts, stops and destroys its
//! machines, and says how to reach a machine's agent and run a command in it. The deploy
//! pipeline and the fleet commands talk to machines only through [`Machine`].

mod bridge;
pub mod local;
pub mod qemu;
pub mod ssh;
mod sys;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;

use flotilla_model::{MachineName, Platform};
use flotilla_protocol::layout;
use flotilla_store::StorePath;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

use crate::facts::{Facts, PlanError};
use crate::remote::{AgentClient, RemoteError};

/// Why a platform operation failed: what kind of failure (so a table can say "unreachable"
/// or "refused" without reading the text), the machine, and a message that says what to do.
/// Shown as `machine NAME: MESSAGE`.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The machine or its host does not answer (no route, a timeout, a connection refused):
    /// trying again later, or fixing the network, may help.
    #[error("machine {machine}: {message}")]
    Unreachable {
        /// The machine.
        machine: String,
        /// What did not answer, and what to check.
        message: String,
    },
    /// It answered but said no, or flotilla refuses on its behalf: a login or host key
    /// refused, sudo asking for a password, an option that would break the machine, a
    /// missing privilege.
    #[error("machine {machine}: {message}")]
    Refused {
        /// The machine.
        machine: String,
        /// Who refused what, and the fix.
        message: String,
    },
    /// Its platform cannot do this at all (a default of [`Machine`] the platform keeps).
    #[error("machine {machine}: {message}")]
    Unsupported {
        /// The machine.
        machine: String,
        /// What its platform cannot do, and what to do instead.
        message: String,
    },
    /// The operation was tried and failed, for the reason given.
    #[error("machine {machine}: {message}")]
    Failed {
        /// The machine.
        machine: String,
        /// What went wrong and the fix.
        message: String,
    },
}

impl PlatformError {
    /// Machine `machine` does not answer.
    pub fn unreachable(machine: &str, message: impl Into<String>) -> PlatformError {
        PlatformError::Unreachable { machine: machine.to_owned(), message: message.into() }
    }

    /// Machine `machine` (or flotilla for it) refused.
    pub fn refused(machine: &str, message: impl Into<String>) -> PlatformError {
        PlatformError::Refused { machine: machine.to_owned(), message: message.into() }
    }

    /// Machine `machine`'s platform cannot do this.
    pub fn unsupported(machine: &str, message: impl Into<String>) -> PlatformError {
        PlatformError::Unsupported { machine: machine.to_owned(), message: message.into() }
    }

    /// An operation on machine `machine` failed.
    pub fn failed(machine: &str, message: impl Into<String>) -> PlatformError {
        PlatformError::Failed { machine: machine.to_owned(), message: message.into() }
    }

    /// The machine.
    pub fn machine(&self) -> &str {
        let (PlatformError::Unreachable { machine, .. }
        | PlatformError::Refused { machine, .. }
        | PlatformError::Unsupported { machine, .. }
        | PlatformError::Failed { machine, .. }) = self;
        machine
    }

    /// What went wrong and the fix, without the machine's name.
    pub fn message(&self) -> &str {
        let (PlatformError::Unreachable { message, .. }
        | PlatformError::Refused { message, .. }
        | PlatformError::Unsupported { message, .. }
        | PlatformError::Failed { message, .. }) = self;
        message
    }

    /// The message, owned.
    pub fn into_message(self) -> String {
        let (PlatformError::Unreachable { message, .. }
        | PlatformError::Refused { message, .. }
        | PlatformError::Unsupported { message, .. }
        | PlatformError::Failed { message, .. }) = self;
        message
    }

    /// The kind as users read it: `unreachable`, `refused`, `unsupported` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            PlatformError::Unreachable { .. } => "unreachable",
            PlatformError::Refused { .. } => "refused",
            PlatformError::Unsupported { .. } => "unsupported",
            PlatformError::Failed { .. } => "failed",
        }
    }

    /// The same failure with `more` appended to its message.
    pub fn and(mut self, more: &str) -> PlatformError {
        let (PlatformError::Unreachable { message, .. }
        | PlatformError::Refused { message, .. }
        | PlatformError::Unsupported { message, .. }
        | PlatformError::Failed { message, .. }) = &mut self;
        message.push_str(more);
        self
    }
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
///
/// A platform implements the lifecycle ([`state`](Machine::state), [`provision`](Machine::provision),
/// [`start`](Machine::start), [`stop`](Machine::stop), [`destroy`](Machine::destroy)) and one
/// transport ([`transport`](Machine::transport): a byte stream to the machine's agent).
/// Everything else has a default built on those: [`connect`](Machine::connect) shakes hands
/// over the transport, [`logs`](Machine::logs) runs the agent's `logs` through
/// [`command`](Machine::command), [`reboot`](Machine::reboot) stops and starts; abilities a
/// platform lacks ([`command`](Machine::command), [`set_boot_generation`](Machine::set_boot_generation))
/// say [`PlatformError::Unsupported`] in one sentence. docs/architecture.md says how to add one.
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
    /// Removes every trace of it.
    fn destroy(&self) -> Result<(), PlatformError>;
    /// Opens a byte stream to its agent (which speaks the protocol on it at once).
    fn transport(&self) -> Result<Transport, RemoteError>;

    /// Connects to its agent: the handshake over [`Machine::transport`].
    fn connect(&self) -> Result<AgentClient, RemoteError> {
        self.transport()?.handshake(self.name())
    }
    /// Stops and starts it; `hard` restarts what it runs on too (an ssh host reboots).
    fn reboot(&self, hard: bool) -> Result<(), PlatformError> {
        let _ = hard; // by default the machine is its own host
        self.stop()?;
        self.start()
    }
    /// The deployment the machine belongs to, for abilities built on the deployer itself.
    /// A platform that gives it gets [`Machine::command`] (and so `shell` and `logs`) over
    /// its agent connection; the default gives none.
    fn context(&self) -> Option<&Context> {
        None
    }
    /// A command that runs `argv` inside the machine (an interactive one with a terminal when
    /// `tty`). By default, with a [`Machine::context`], `flotilla agent-exec`, which runs it
    /// through the agent over [`Machine::transport`] (see [`agent_exec_command`]); a platform
    /// without one cannot, and says so.
    fn command(&self, argv: &[String], tty: bool) -> Result<Command, PlatformError> {
        match self.context() {
            Some(ctx) => agent_exec_command(ctx, self.name(), argv, tty),
            None => Err(PlatformError::unsupported(
                self.name(),
                "its platform cannot run commands in it; reach its services over the network instead",
            )),
        }
    }
    /// An interactive login shell on the machine: `sh -l` through [`Machine::command`].
    fn shell(&self) -> Result<Command, PlatformError> {
        self.command(&["sh".into(), "-l".into()], true)
    }
    /// A command printing the last `lines` lines of a service's log (every service's when
    /// `None`), following it with `follow`: the machine's agent's `logs` command, run through
    /// [`Machine::command`].
    fn logs(&self, service: Option<&str>, lines: usize, follow: bool) -> Result<Command, PlatformError> {
        let argv = [layout::BOOTSTRAP_AGENT.to_owned(), "logs".into()].into_iter().chain(logs_args(service, lines, follow));
        self.command(&argv.collect::<Vec<_>>(), false)
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
        Err(PlatformError::unsupported(
            self.name(),
            "it is not running, and its platform cannot change its generation from outside; start it, then `flotilla rollback`",
        ))
    }
    /// Builds the system `toplevel` (of derivation `drv`, valid in this host's store with its
    /// closure of derivations and sources) on the machine's host with that host's Nix, and
    /// has the machine's agent take the result as its own; returns the toplevel's closure as
    /// the host's Nix describes it (checked by the agent against the bytes), for the copy to
    /// find nothing missing. Only a platform whose machines' hosts may run Nix can (ssh).
    /// The host's Nix's output goes to `on_line` as it comes.
    fn build_on_host(&self, nix: &flotilla_nix::Nix, drv: &StorePath, toplevel: &StorePath, on_line: &dyn Fn(&str)) -> Result<Vec<flotilla_protocol::PathInfo>, PlatformError> {
        let _ = (nix, drv, toplevel, on_line);
        Err(PlatformError::unsupported(
            self.name(),
            "option `deploy.buildOnTarget` (or `deploy --build-on target`) builds on an ssh machine's host, and this machine's platform has no host of its own to build on; unset it",
        ))
    }
    /// Told before provisioning which system the deploy will run on the machine: a platform
    /// that boots machines itself (qemu) boots a new machine with that system's kernel.
    fn prepare(&self, toplevel: &StorePath) {
        let _ = toplevel;
    }
    /// Told after an activation was kept or a rollback which system the machine runs now: a
    /// platform that boots machines itself (qemu) boots that system's kernel next time.
    fn now_runs(&self, toplevel: &StorePath) -> Result<(), PlatformError> {
        let _ = toplevel;
        Ok(())
    }
    /// The file its console (boot messages) goes to, when the platform keeps one.
    fn console_log(&self) -> Option<PathBuf> {
        None
    }
    /// What the machine is made of on this host (root directory, network names, ...), for
    /// people looking for it and for cleaning up by hand.
    fn resources(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}

/// `flotilla agent-exec` (this very program) running `argv` on machine `machine` of `ctx`'s
/// deployment through its agent: the command of a platform whose machines are reached only
/// over the agent protocol. Its exit status is the command's (128 + N for signal N).
pub fn agent_exec_command(ctx: &Context, machine: &str, argv: &[String], tty: bool) -> Result<Command, PlatformError> {
    let exe = std::env::current_exe()
        .map_err(|e| PlatformError::failed(machine, format!("cannot find the flotilla executable to run the command through ({e})")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--state").arg(&ctx.state_path).args(["agent-exec", "-d", &ctx.deployment, machine]);
    if tty {
        cmd.arg("--tty");
    }
    cmd.arg("--").args(argv);
    Ok(cmd)
}

/// The arguments of the agent's `logs` command: the last `lines` lines of `service`'s log
/// (every service's when `None`), followed with `follow`.
pub fn logs_args(service: Option<&str>, lines: usize, follow: bool) -> Vec<String> {
    let mut argv = vec!["-n".into(), lines.to_string()];
    if follow {
        argv.push("-f".into());
    }
    argv.extend(service.map(str::to_owned));
    argv
}

/// The reading half of a [`Transport`]: a descriptor the client can wait on.
pub trait TransportRead: Read + AsFd + Send {}
impl<T: Read + AsFd + Send> TransportRead for T {}
/// The writing half of a [`Transport`].
pub trait TransportWrite: Write + AsFd + Send {}
impl<T: Write + AsFd + Send> TransportWrite for T {}

/// A byte stream to a machine's agent, as [`Machine::transport`] opens it: a unix socket, an
/// ssh session's pipes, a serial port.
pub struct Transport {
    reader: Box<dyn TransportRead>,
    writer: Box<dyn TransportWrite>,
    /// Where the stream goes, and why it closed before the agent answered, when the platform
    /// can tell more than "closed" (ssh's stderr).
    closed: Option<(String, Box<dyn FnOnce() -> String + Send>)>,
}

impl Transport {
    /// A stream of two halves.
    pub fn new(reader: impl TransportRead + 'static, writer: impl TransportWrite + 'static) -> Transport {
        Transport { reader: Box::new(reader), writer: Box::new(writer), closed: None }
    }

    /// With `why`, which says (as a sentence with the fix) why the stream to `destination`
    /// closed before the agent answered.
    pub fn explained(mut self, destination: String, why: impl FnOnce() -> String + Send + 'static) -> Transport {
        self.closed = Some((destination, Box::new(why)));
        self
    }

    /// Shakes hands with machine `machine`'s agent over it.
    pub fn handshake(self, machine: &str) -> Result<AgentClient, RemoteError> {
        match (AgentClient::over(machine, self.reader, self.writer), self.closed) {
            (Err(RemoteError::Protocol(flotilla_protocol::ProtocolError::HandshakeClosed)), Some((destination, why))) => {
                Err(RemoteError::Transport { destination, message: why() })
            }
            (r, _) => r,
        }
    }
}

/// What a platform needs to know of the deployer.
#[derive(Debug, Clone)]
pub struct Context {
    /// The state DB's file or URL; machines' local data lives in its data directory
    /// ([`flotilla_state::data_dir`]).
    pub state_path: PathBuf,
    /// The deployment.
    pub deployment: String,
    /// The static agent binary to bootstrap machines with.
    pub agent: PathBuf,
}

impl Context {
    /// Where a deployment's local machine data lives.
    pub fn machines_dir(&self) -> PathBuf {
        flotilla_state::data_dir(&self.state_path).join("machines").join(&self.deployment)
    }
}

/// Whether `platform` keeps its machines on the deployer host that provisioned them: a local
/// or qemu machine's root (and its GC roots) live there, not in the state.
pub fn held_by_host(platform: &str) -> bool {
    matches!(platform, "local" | "qemu")
}

/// Why a machine recorded as held on `host` cannot be handled from this host, if it cannot:
/// its root is on that host, so nothing here may probe, start, stop or deploy it.
pub fn held_elsewhere(platform: &str, host: Option<&str>) -> Option<String> {
    let here = crate::procfs::host();
    // A bare hostname was recorded before hosts had a machine id: taken as this host's.
    let host = host.filter(|h| held_by_host(platform) && *h != here && *h != crate::procfs::hostname())?;
    Some(format!("held on {host}: its {platform} root lives on the deployer host {host}, not on this one ({here}); run this flotilla command on {host}"))
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
        PlatformError::failed(&self.name, self.why.clone())
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
    fn transport(&self) -> Result<Transport, RemoteError> {
        Err(RemoteError::Transport { destination: format!("machine {}", self.name), message: self.why.clone() })
    }
    fn command(&self, _argv: &[String], _tty: bool) -> Result<Command, PlatformError> {
        Err(self.err())
    }
}

/// Plans the facts every machine of the file has before provisioning (`facts` holds them
/// with what was stored; `stored` is every recorded machine, gone from the file or not): each
/// platform plans its own machines. Returns every problem found, each naming the machine and
/// the option. A new platform adds its arm here and in [`machine`].
pub fn plan_facts(platforms: &BTreeMap<MachineName, Platform>, stored: &BTreeMap<String, Facts>, facts: &mut BTreeMap<MachineName, Facts>) -> Vec<PlanError> {
    // VMs sit on the local machines' bridge: their addresses are planned together.
    let on_bridge: BTreeMap<&MachineName, flotilla_model::LocalPlatform> = platforms
        .iter()
        .filter_map(|(name, platform)| match platform {
            Platform::Qemu(q) => Some((name, flotilla_model::LocalPlatform { address: q.address.clone(), subnet: q.subnet.clone(), forward_ports: q.forward_ports.clone() })),
            _ => None,
        })
        .collect();
    let (mut local_machines, mut ssh_machines) = (BTreeMap::new(), BTreeMap::new());
    for (name, platform) in platforms {
        match platform {
            Platform::Local(spec) => {
                local_machines.insert(name, spec);
            }
            Platform::Ssh(spec) => {
                ssh_machines.insert(name, spec);
            }
            Platform::Qemu(_) => {
                local_machines.insert(name, &on_bridge[name]);
            }
        }
    }
    let mut errors = local::plan_facts(&local_machines, stored, facts);

    errors.extend(ssh::plan_facts(&ssh_machines, facts));
    errors
}

/// The machine `name` on `platform`, with its recorded facts.
pub fn machine(ctx: &Context, name: &str, platform: &Platform, facts: &BTreeMap<String, Value>) -> Result<Box<dyn Machine>, PlatformError> {
    match platform {
        Platform::Local(spec) => Ok(Box::new(local::LocalMachine::new(ctx, name, spec, facts)?)),
        Platform::Ssh(spec) => Ok(Box::new(ssh::SshMachine::new(ctx, name, spec)?)),
        Platform::Qemu(spec) => Ok(Box::new(qemu::QemuMachine::new(ctx, name, spec, facts)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A platform with the required methods only: what a new platform starts from; given a
    /// deployment's context (`Machine::context`), one that runs commands through its agent.
    struct Bare(Option<Context>);

    impl Machine for Bare {
        fn name(&self) -> &str {
            "bare1"
        }
        fn state(&self) -> MachineState {
            MachineState::Running
        }
        fn provision(&self) -> Result<Option<String>, PlatformError> {
            Ok(None)
        }
        fn start(&self) -> Result<(), PlatformError> {
            Ok(())
        }
        fn stop(&self) -> Result<(), PlatformError> {
            Ok(())
        }
        fn destroy(&self) -> Result<(), PlatformError> {
            Ok(())
        }
        /// A stream whose far end reads the greeting and hangs up, as an agent that is not
        /// there would.
        fn transport(&self) -> Result<Transport, RemoteError> {
            let (near, far) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            std::thread::spawn(move || {
                let mut far = far;
                let mut hello = [0u8; 16];
                let _ = std::io::Read::read(&mut far, &mut hello);
            });
            let reader = near.try_clone().expect("dup");
            Ok(Transport::new(reader, near).explained("bare host".into(), || "the bare host hung up; start its agent".into()))
        }
        fn context(&self) -> Option<&Context> {
            self.0.as_ref()
        }
    }

    #[test]
    fn abilities_a_platform_lacks_are_one_unsupported_sentence() {
        let m = Bare(None);
        for e in [m.command(&["true".into()], false).unwrap_err(), m.shell().unwrap_err(), m.logs(None, 10, false).unwrap_err()] {
            assert!(matches!(e, PlatformError::Unsupported { .. }), "{e:?}");
            assert_eq!(e.kind(), "unsupported");
            assert_eq!(e.to_string(), "machine bare1: its platform cannot run commands in it; reach its services over the network instead");
        }
        let e = m.set_boot_generation(None).unwrap_err();
        assert!(matches!(e, PlatformError::Unsupported { .. }) && !e.to_string().contains('\n'), "{e:?}");
        assert!(m.reboot(true).is_ok() && m.resources().is_empty() && m.problems().is_empty());
    }

    #[test]
    fn a_platform_with_its_context_runs_commands_through_flotilla_agent_exec() {
        let m = Bare(Some(Context { state_path: "/var/lib/fl/state.db".into(), deployment: "lab".into(), agent: "/bin/flotilla-agent".into() }));
        let words = |c: &Command| c.get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        let cmd = m.command(&["cat".into(), "/etc/hosts".into()], false).unwrap();
        assert_eq!(cmd.get_program(), std::env::current_exe().unwrap().as_os_str());
        assert_eq!(words(&cmd), "--state /var/lib/fl/state.db agent-exec -d lab bare1 -- cat /etc/hosts");
        assert_eq!(words(&m.shell().unwrap()), "--state /var/lib/fl/state.db agent-exec -d lab bare1 --tty -- sh -l");
        assert_eq!(
            words(&m.logs(Some("web"), 5, true).unwrap()),
            format!("--state /var/lib/fl/state.db agent-exec -d lab bare1 -- {} logs -n 5 -f web", layout::BOOTSTRAP_AGENT)
        );
    }

    #[test]
    fn connect_shakes_hands_over_the_transport_and_says_why_it_closed() {
        match Bare(None).connect() {
            Err(RemoteError::Transport { destination, message }) => {
                assert_eq!((destination.as_str(), message.as_str()), ("bare host", "the bare host hung up; start its agent"));
            }
            Err(e) => panic!("not the transport's explanation: {e}"),
            Ok(_) => panic!("nobody answered, yet it connected"),
        }
    }

    #[test]
    fn a_platform_error_keeps_its_kind_machine_and_message() {
        let e = PlatformError::unreachable("web1", "cannot reach h (No route to host)").and("; check the cable");
        assert_eq!((e.kind(), e.machine(), e.message()), ("unreachable", "web1", "cannot reach h (No route to host); check the cable"));
        assert_eq!(e.to_string(), "machine web1: cannot reach h (No route to host); check the cable");
        assert_eq!(PlatformError::refused("web1", "no").kind(), "refused");
        assert_eq!(PlatformError::failed("web1", "boom").into_message(), "boom");
    }
}
