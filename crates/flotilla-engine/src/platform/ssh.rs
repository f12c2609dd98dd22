//! The `ssh` platform: an existing Linux host reached with the real OpenSSH client (the
//! user's `~/.ssh/config`, known hosts and ssh-agent all apply). The host needs no Nix: the
//! deployer copies the static agent to it, and the agent receives closures itself.
//!
//! - **One connection per host.** The first step that needs the host opens a master
//!   connection (`ControlMaster`, socket `<runtime dir>/flotilla-ssh-<uid>/<pid>-%C`); every
//!   later step (probe, copy, activation, confirmation) is a session over it. The handle that
//!   opened it closes it when dropped; `ControlPersist` ends one left by a killed deployer.
//! - **Bootstrap.** The agent binary's store path is known without Nix (it is a content
//!   address, [`StorePath::for_source`]); when the host lacks it, it is streamed there and
//!   registered as the agent's own. `/nix/var/flotilla/bin/flotilla-agent` points at the
//!   agent the host should run. On a host with systemd it runs as `flotilla-agent.service`
//!   (enabled, so it and its services come back after a reboot); elsewhere it runs detached
//!   (`flotilla-agent init --detach`) and does not survive a reboot, which the deploy says.
//! - **Talking to it.** `ssh host [sudo -n] <agent> stdio` carries the same protocol as the
//!   local socket. A login user other than root needs passwordless sudo; a sudo that would
//!   ask for a password is reported as such, never answered.
//! - **Upgrades.** An agent that speaks an older protocol than this flotilla is replaced by
//!   this flotilla's (its services restart with it); a compatible one keeps running.
//! - **Shell on the host** lives in templates beside this file (`ssh/*.sh`, and the unit
//!   `ssh/flotilla-agent.service`), read with `include_str!` and filled by [`script`]: each
//!   `@name@` becomes its value quoted as one shell word, paths coming from
//!   [`flotilla_protocol::layout`]; no script is written with `format!`.
//! - The deployer keeps `machines/<deployment>/<machine>/ssh.json` (what it learnt of the
//!   host); `destroy` runs `flotilla-agent uninstall` on the host, which removes only what
//!   flotilla placed there, and forgets the host.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use flotilla_model::{MachineName, SshPlatform};
use flotilla_store::{HashingWriter, NarHash, StorePath};
use serde::{Deserialize, Serialize};

use flotilla_protocol::layout;

use super::{Context, Machine, MachineState, PlatformError, Transport};
use crate::facts::{Facts, PlanError};
use crate::remote::RemoteError;

/// The link to the agent the host runs (the systemd unit and `start` use it).
const AGENT_LINK: &str = layout::BOOTSTRAP_AGENT;
/// The systemd unit flotilla installs.
const UNIT_NAME: &str = "flotilla-agent.service";
/// Where the unit goes on the host.
pub const UNIT_PATH: &str = "/etc/systemd/system/flotilla-agent.service";

/// Master connections being opened, so two machines on one host do not race to open one.
static MASTERS: Mutex<()> = Mutex::new(());

/// A host reached over ssh.
pub struct SshMachine {
    name: String,
    ssh: Ssh,
    dir: PathBuf,
    agent_binary: PathBuf,
}

/// The deployer's agent as a store path.
#[derive(Debug, Clone)]
struct AgentFile {
    path: StorePath,
    nar_hash: NarHash,
    nar_size: u64,
}

/// What the deployer learnt of the host when it bootstrapped it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    /// `user@host:port` as connected to.
    destination: String,
    /// Whether commands go through `sudo -n`.
    sudo: bool,
    /// Whether the agent runs as a systemd service.
    systemd: bool,
}

/// What one probe of the host found.
#[derive(Debug, Default)]
struct Probe {
    uid: String,
    arch: String,
    sudo: Option<String>,
    systemd: bool,
    agent_present: bool,
    running: bool,
    nix: bool,
    /// The host's `nix-store`, by its absolute path (found in [`layout::NIX_STORE_PLACES`]).
    nix_store: Option<String>,
}

impl Probe {
    /// What `probe.sh` printed, `key=value` a line.
    fn parse(out: &str) -> Probe {
        let mut p = Probe::default();
        for line in out.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            match k {
                "uid" => p.uid = v.to_owned(),
                "arch" => p.arch = v.to_owned(),
                "sudo" => p.sudo = Some(v.to_owned()),
                "systemd" => p.systemd = true,
                "nix" => p.nix = true,
                "nix-store" => p.nix_store = Some(v.to_owned()),
                "agent" => p.agent_present = true,
                "agent-state" => p.running = v.starts_with("running"),
                _ => {}
            }
        }
        p
    }
}

/// Adds `ip` (the host, as the options name it, unless a fact says otherwise) to the facts
/// of the ssh machines `machines`.
pub fn plan_facts(machines: &BTreeMap<&MachineName, &SshPlatform>, facts: &mut BTreeMap<MachineName, Facts>) -> Vec<PlanError> {
    for (&name, ssh) in machines {
        let facts = facts.get_mut(name).expect("every machine of the file has facts");
        facts.entry("ip".into()).or_insert_with(|| serde_json::Value::from(ssh.host.clone()));
    }
    Vec::new()
}

impl SshMachine {
    /// The machine `name` on the host its options name.
    pub fn new(ctx: &Context, name: &str, spec: &SshPlatform) -> Result<SshMachine, PlatformError> {
        if spec.host.is_empty() || spec.host.starts_with('-') {
            return Err(PlatformError::refused(name, format!("option `platform.host` is {:?}, which is not a host name or address", spec.host)));
        }
        Ok(SshMachine {
            name: name.to_owned(),
            ssh: Ssh::new(name, spec),
            dir: ctx.machines_dir().join(name),
            agent_binary: ctx.agent.clone(),
        })
    }

    fn err(&self, message: impl Into<String>) -> PlatformError {
        PlatformError::failed(&self.name, message)
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join("ssh.json")
    }

    fn record(&self) -> Option<Record> {
        serde_json::from_str(&fs::read_to_string(self.record_path()).ok()?).ok()
    }

    fn save_record(&self, r: &Record) -> Result<(), PlatformError> {
        fs::create_dir_all(&self.dir).map_err(|e| self.err(format!("cannot create {}: {e}", self.dir.display())))?;
        let tmp = self.dir.join(".ssh.json.tmp");
        fs::write(&tmp, serde_json::to_string_pretty(r).expect("serialises"))
            .and_then(|()| fs::rename(&tmp, self.record_path()))
            .map_err(|e| self.err(format!("cannot write {}: {e}", self.record_path().display())))
    }

    /// Whether commands need `sudo -n`: as recorded, else as the options say.
    fn sudo(&self) -> bool {
        match self.record() {
            Some(r) => r.sudo,
            None => self.ssh.user.as_deref().is_some_and(|u| u != "root"),
        }
    }

    /// The deployer's agent as a store path: hashed once per process, whatever the number
    /// of machines (every command makes a handle per machine).
    fn agent(&self) -> Result<AgentFile, PlatformError> {
        static HASHED: Mutex<BTreeMap<PathBuf, Result<AgentFile, String>>> = Mutex::new(BTreeMap::new());
        let mut hashed = HASHED.lock().unwrap_or_else(|p| p.into_inner());
        hashed.entry(self.agent_binary.clone()).or_insert_with(|| agent_file(&self.agent_binary)).clone().map_err(|e| self.err(e))
    }

    /// `argv` as one remote shell command, through sudo when the login user is not root.
    fn remote(&self, argv: &[&str]) -> String {
        let words = argv.iter().map(|w| shell_quote(w));
        if self.sudo() {
            ["sudo", "-n", "--"].into_iter().map(str::to_owned).chain(words).collect::<Vec<_>>().join(" ")
        } else {
            words.collect::<Vec<_>>().join(" ")
        }
    }

    /// Runs `argv` on the host (as root), failing with its stderr.
    fn run_root(&self, argv: &[&str], what: &str) -> Result<String, PlatformError> {
        let out = self.ssh.run(&self.remote(argv), None)?;
        if !out.status.success() {
            return Err(self.remote_error(format!("{what} failed on {}", self.ssh.destination()), &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `what` with what a failed remote command said, sudo's password question explained
    /// (which is a refusal, not a failure).
    fn remote_error(&self, what: String, out: &Output) -> PlatformError {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.contains("sudo:") && (stderr.contains("password") || stderr.contains("terminal is required")) {
            return PlatformError::refused(&self.name, format!("{what}: {}", self.sudo_advice(&stderr)));
        }
        if stderr.is_empty() {
            self.err(format!("{what}: exit status {}", out.status.code().unwrap_or(-1)))
        } else {
            self.err(format!("{what}: {stderr}"))
        }
    }

    fn sudo_advice(&self, said: &str) -> String {
        sudo_advice(self.ssh.user.as_deref(), &self.ssh.host, said)
    }

    /// Learns what the deployer needs of the host in one round trip, as the login user.
    fn probe(&self) -> Result<Probe, PlatformError> {
        let agent = self.agent()?.path.to_absolute();
        let script = probe_script(&agent, layout::NIX_STORE_PLACES);
        let out = self.ssh.run("sh -s", Some(script.as_bytes()))?;
        if !out.status.success() {
            return Err(self.remote_error(format!("cannot probe {}", self.ssh.destination()), &out));
        }
        Ok(Probe::parse(&String::from_utf8_lossy(&out.stdout)))
    }


    /// Streams the agent binary to its store path on the host and registers it as the
    /// agent's own (a temporary name first, so an interrupted copy never looks complete).
    fn copy_agent(&self) -> Result<(), PlatformError> {
        let a = self.agent()?;
        let base = a.path.base_name();
        let registration = serde_json::json!({ "narHash": a.nar_hash.to_string(), "narSize": a.nar_size, "references": [] }).to_string();
        let script = script(
            include_str!("ssh/copy_agent.sh"),
            &[("store", flotilla_store::STORE_DIR), ("registry", layout::REGISTRY), ("base", base), ("registration", &registration)],
        );
        let binary = fs::read(&self.agent_binary).map_err(|e| self.err(format!("cannot read the agent {}: {e}", self.agent_binary.display())))?;
        // The script goes in the command line (it is short); the binary on stdin.
        let out = self.ssh.run(&self.remote(&["sh", "-c", &script]), Some(&binary))?;
        if !out.status.success() {
            return Err(self.remote_error(format!("cannot copy the agent to {}", self.ssh.destination()), &out));
        }
        Ok(())
    }

    /// Points the host's agent link at this flotilla's agent and (re)starts it: as a systemd
    /// service where systemd runs, detached elsewhere. Returns what it did, for the user.
    fn start_agent(&self, systemd: bool, restart: bool) -> Result<String, PlatformError> {
        let script = start_script(&self.agent()?.path.to_absolute(), systemd, restart);
        self.run_root(&["sh", "-c", &script], "starting the agent")?;
        Ok(if systemd {
            format!("agent {} as systemd service {UNIT_NAME}", if restart { "restarted" } else { "started" })
        } else {
            format!(
                "agent {} detached: the host has no systemd, so it and its services will not come back after a reboot of the host until `flotilla start {}`",
                if restart { "restarted" } else { "started" },
                self.name
            )
        })
    }

    /// Opens the master connection and checks the host is one flotilla can use.
    fn reach(&self) -> Result<Probe, PlatformError> {
        self.ssh.ensure_master()?;
        let p = self.probe()?;
        if p.arch != "x86_64" {
            return Err(PlatformError::refused(&self.name, format!("{} is a {} host; this flotilla's agent is built for x86_64 Linux", self.ssh.host, p.arch)));
        }
        if let Some(said) = p.sudo.as_deref().filter(|s| *s != "ok") {
            return Err(PlatformError::refused(&self.name, self.sudo_advice(said)));
        }
        Ok(p)
    }

    /// Whether a connection fails because the agent speaks an older protocol.
    fn agent_is_older(e: &RemoteError) -> bool {
        use flotilla_protocol::ProtocolError;
        match e {
            RemoteError::Protocol(ProtocolError::AgentRefused { agent_max, our_min, .. }) => agent_max < our_min,
            RemoteError::Protocol(ProtocolError::BadWelcome { version, our_min, .. }) => version < our_min,
            _ => false,
        }
    }
}

impl Drop for SshMachine {
    fn drop(&mut self) {
        self.ssh.close();
    }
}

impl Machine for SshMachine {
    fn name(&self) -> &str {
        &self.name
    }

    fn state(&self) -> MachineState {
        if self.record().is_none() {
            return MachineState::Missing;
        }
        // Through the host's agent link, not this deployer's own store path: after an upgrade
        // of flotilla the host has the old agent, which answers all the same. Only ssh itself
        // failing (exit 255: no connection, refused login) makes the host unreachable; a host
        // that answers without a working agent has it stopped (a deploy installs it again).
        match self.ssh.run(&self.remote(&[AGENT_LINK, "status-line"]), None) {
            Ok(out) if out.status.success() && out.stdout.starts_with(b"running") => MachineState::Running,
            Ok(out) if out.status.code() == Some(255) => MachineState::Unreachable,
            Ok(_) => MachineState::Stopped,
            Err(_) => MachineState::Unreachable,
        }
    }

    fn provision(&self) -> Result<Option<String>, PlatformError> {
        let p = self.reach()?;
        let mut did = Vec::new();
        // Recorded first: whether to use sudo comes from it.
        self.save_record(&Record { destination: self.ssh.destination(), sudo: p.uid != "0", systemd: p.systemd })?;
        if !p.agent_present {
            self.copy_agent()?;
            did.push("agent copied".to_owned());
        }
        if !p.running {
            did.push(self.start_agent(p.systemd, false)?);
        } else if let Err(e) = self.connect() {
            if !Self::agent_is_older(&e) {
                return Err(self.err(e.to_string()));
            }
            did.push(format!("{} (it spoke an older protocol: {e})", self.start_agent(p.systemd, true)?));
        }
        if p.nix && !did.is_empty() {
            did.push("the host has Nix: flotilla's paths are registered with it".to_owned());
        }
        Ok(if did.is_empty() { None } else { Some(did.join("; ")) })
    }

    fn start(&self) -> Result<(), PlatformError> {
        let p = self.reach()?;
        if !p.agent_present {
            self.copy_agent()?;
        }
        if !p.running {
            self.start_agent(p.systemd, false)?;
        }
        Ok(())
    }

    fn stop(&self) -> Result<(), PlatformError> {
        let p = self.reach()?;
        if !p.running {
            return Ok(());
        }
        let script = script(include_str!("ssh/stop.sh"), &[("unit_name", UNIT_NAME), ("link", AGENT_LINK)]);
        self.run_root(&["sh", "-c", &script], "stopping the agent").map(drop)
    }

    fn reboot(&self, hard: bool) -> Result<(), PlatformError> {
        if !hard {
            self.stop()?;
            return self.start();
        }
        let p = self.reach()?;
        let cmd = if p.systemd { "systemctl reboot" } else { "reboot" };
        // The connection drops as the host goes down: that is success, not an error.
        let _ = self.ssh.run(&self.remote(&["sh", "-c", cmd]), None);
        self.ssh.close();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_secs(2));
            if self.ssh.ensure_master().is_ok() {
                return self.start();
            }
        }
        Err(PlatformError::unreachable(&self.name, format!("{} did not answer ssh within 5 minutes of the reboot", self.ssh.host)))
    }

    fn destroy(&self) -> Result<(), PlatformError> {
        if self.record().is_none() && !self.dir.exists() {
            return Ok(());
        }
        let p = self.reach()?;
        if !p.agent_present {
            self.copy_agent()?;
        }
        let agent = self.agent()?.path.to_absolute();
        let script = script(include_str!("ssh/uninstall.sh"), &[("unit_path", UNIT_PATH), ("unit_name", UNIT_NAME), ("agent", &agent)]);
        self.run_root(&["sh", "-c", &script], "removing flotilla from the host")?;
        fs::remove_dir_all(&self.dir).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }).map_err(|e| self.err(format!("cannot remove {}: {e}", self.dir.display())))?;
        if let Some(parent) = self.dir.parent() {
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }

    /// `ssh host [sudo -n] <agent> stdio` over the master connection; when it ends before the
    /// agent answers, ssh's stderr says why.
    fn transport(&self) -> Result<Transport, RemoteError> {
        let transport = |message: String| RemoteError::Transport { destination: self.ssh.destination(), message };
        self.ssh.ensure_master().map_err(|e| transport(e.into_message()))?;
        let agent = self.agent().map_err(|e| transport(e.into_message()))?.path.to_absolute();
        let mut child = self
            .ssh
            .command(false)
            .arg(self.remote(&[&agent, "stdio"]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| transport(format!("cannot run ssh: {e}")))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let said = Arc::new(Mutex::new(String::new()));
        {
            let said = Arc::clone(&said);
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                *said.lock().unwrap_or_else(|p| p.into_inner()) = text;
            });
        }
        let (name, host, user) = (self.name.clone(), self.ssh.host.clone(), self.ssh.user.clone());
        let why = move || {
            // ssh ended before the agent answered; its stderr says why.
            std::thread::sleep(std::time::Duration::from_millis(100));
            let said = said.lock().unwrap_or_else(|p| p.into_inner()).trim().to_owned();
            if said.contains("sudo:") && said.contains("password") {
                sudo_advice(user.as_deref(), &host, &said)
            } else if said.contains("no agent answers") {
                format!("no agent runs on {host}; start it with `flotilla start {name}`")
            } else if said.is_empty() {
                format!(
                    "the connection closed before the agent answered; the agent's log on the host says why ({}, or `journalctl -u {UNIT_NAME}` with systemd)",
                    layout::AGENT_LOG
                )
            } else {
                said
            }
        };
        Ok(Transport::new(ChildReader { stdout, child }, stdin).explained(self.ssh.destination(), why))
    }

    /// The derivations go over this machine's own ssh connection (`nix-store --export` here,
    /// `--import` there: what the host lacks of them), the host's Nix realises the toplevel
    /// (as root, through sudo as every command here), and the host's agent takes the result as
    /// its own (`flotilla-agent adopt`): on a host with Nix the agent's store is the host's
    /// store, so nothing needs copying, only registering with the agent, which hashes every
    /// path against what Nix recorded rather than trust the database.
    fn build_on_host(&self, nix: &flotilla_nix::Nix, drv: &StorePath, toplevel: &StorePath, on_line: &dyn Fn(&str)) -> Result<Vec<flotilla_protocol::PathInfo>, PlatformError> {
        let p = self.reach()?;
        if !p.nix {
            return Err(PlatformError::refused(&self.name, format!(
                "option `deploy.buildOnTarget` (or `deploy --build-on target`) builds on the host with its own Nix, and {} has none (no /nix/var/nix/db); install Nix there, or build on the deployer: unset the option (or `--build-on local`)",
                self.ssh.host
            )));
        }
        let run = |argv: Vec<String>, stdin: Option<&[u8]>, what: &str| -> Result<String, PlatformError> {
            let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
            let out = self.ssh.run(&self.remote(&refs), stdin)?;
            if !out.status.success() {
                let said = flotilla_nix::clean_error(&out.stderr);
                return Err(self.err(format!("{what} on {} failed: {said}", self.ssh.destination())));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let Some(nix_store) = p.nix_store.as_deref() else {
            return Err(PlatformError::refused(&self.name, format!(
                "option `deploy.buildOnTarget` (or `deploy --build-on target`) builds with the host's nix-store, and {} has Nix but no nix-store in {}; link it into one of them, or build on the deployer: unset the option (or `--build-on local`)",
                self.ssh.host,
                layout::NIX_STORE_PLACES.join(", ")
            )));
        };
        let drvs = nix.drv_closure(drv).map_err(|e| self.err(format!("cannot list the derivations of {toplevel}: {e}")))?;
        let listed = flotilla_nix::Nix::remote_invalid_input(&drvs);
        let invalid = run(flotilla_nix::Nix::remote_invalid_argv(nix_store), Some(&listed), "asking the host's Nix which derivations it lacks")?;
        let send: Vec<StorePath> = invalid.lines().filter_map(|l| StorePath::parse(l).ok()).collect();
        if !send.is_empty() {
            let export = nix.export(&send).map_err(|e| self.err(format!("cannot export the derivations of {toplevel}: {e}")))?;
            run(flotilla_nix::Nix::remote_import_argv(nix_store), Some(&export), "copying the derivations to the host's Nix")?;
        }
        // The build's log comes as it is written, not all at the end (a system takes minutes).
        let argv = nix.remote_realise_argv(nix_store, drv, &layout::built_root(&self.name));
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let (status, said) = self.ssh.run_streaming(&self.remote(&refs), on_line)?;
        if !status.success() {
            let said = flotilla_nix::clean_error(said.as_bytes());
            return Err(self.err(format!("building {toplevel} with the host's Nix on {} failed: {said}", self.ssh.destination())));
        }
        let agent = self.agent()?.path.to_absolute();
        let adopted = run(vec![agent, "adopt".into(), toplevel.to_absolute()], None, "registering the built system with the host's agent")?;
        let infos = adopted
            .lines()
            .filter(|l| !l.is_empty())
            .map(serde_json::from_str::<flotilla_protocol::PathInfo>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(format!("the host's agent answered `adopt` with something unexpected: {e}")))?;
        Ok(flotilla_nix::references_first(infos))
    }

    fn command(&self, argv: &[String], tty: bool) -> Result<Command, PlatformError> {
        let words: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut cmd = self.ssh.command(tty);
        cmd.arg(self.remote(&words));
        Ok(cmd)
    }

    fn shell(&self) -> Result<Command, PlatformError> {
        Ok(self.ssh.interactive())
    }

    fn resources(&self) -> BTreeMap<String, String> {
        let mut r = BTreeMap::new();
        r.insert("host".into(), self.ssh.destination());
        if let Some(rec) = self.record() {
            r.insert("agent".into(), if rec.systemd { format!("systemd service {UNIT_NAME}") } else { "detached (no systemd)".into() });
            r.insert("sudo".into(), rec.sudo.to_string());
        }
        r
    }
}

/// Reads an ssh child's stdout and ends the child with the conversation.
struct ChildReader {
    stdout: std::process::ChildStdout,
    child: std::process::Child,
}

impl Read for ChildReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stdout.read(buf)
    }
}

impl std::os::fd::AsFd for ChildReader {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stdout.as_fd()
    }
}

impl Drop for ChildReader {
    fn drop(&mut self) {
        // The session over the master ends with its client; the remote `stdio` sees EOF.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to run ssh to one host.
struct Ssh {
    machine: String,
    host: String,
    port: Option<u16>,
    user: Option<String>,
    identity: Option<String>,
    options: Vec<String>,
    control: Option<PathBuf>,
    opened: AtomicBool,
}

impl Ssh {
    fn new(machine: &str, spec: &SshPlatform) -> Ssh {
        Ssh {
            machine: machine.to_owned(),
            host: spec.host.clone(),
            port: spec.port,
            user: spec.user.clone(),
            identity: spec.identity_file.clone(),
            options: spec.ssh_options.clone(),
            control: control_dir().ok().map(|d| d.join(format!("{}-%C", std::process::id()))),
            opened: AtomicBool::new(false),
        }
    }

    /// `user@host:port`, for messages.
    fn destination(&self) -> String {
        let mut d = match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        };
        if let Some(p) = self.port {
            d.push_str(&format!(":{p}"));
        }
        d
    }

    /// ssh with the user's options first (ssh keeps the first value it sees of an option, so
    /// theirs win), then flotilla's defaults, then the host's port, key and user.
    fn base(&self, mux: bool) -> Command {
        let mut c = Command::new("ssh");
        c.args(&self.options);
        c.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]);
        if let (true, Some(control)) = (mux, &self.control) {
            c.arg("-o").arg(format!("ControlPath={}", control.display()));
        }
        self.login_args(&mut c);
        c
    }

    /// `-p`, `-i` and `-l` as the platform options give them.
    fn login_args(&self, c: &mut Command) {
        if let Some(p) = self.port {
            c.args(["-p", &p.to_string()]);
        }
        if let Some(i) = &self.identity {
            c.args(["-i", i]);
        }
        if let Some(u) = &self.user {
            c.args(["-l", u]);
        }
    }

    /// A session over the master (or a connection of its own when there is none).
    fn command(&self, tty: bool) -> Command {
        let mut c = self.base(true);
        c.args(["-o", "ControlMaster=no"]).arg(if tty { "-t" } else { "-T" }).arg("--").arg(&self.host);
        c
    }

    /// An interactive login, as `ssh host` by hand would be (no batch mode: it may ask).
    fn interactive(&self) -> Command {
        let mut c = Command::new("ssh");
        c.args(&self.options);
        self.login_args(&mut c);
        c.arg("--").arg(&self.host);
        c
    }

    /// Runs `remote` (a shell command line) over the master, with `stdin` bytes.
    fn run(&self, remote: &str, stdin: Option<&[u8]>) -> Result<Output, PlatformError> {
        let mut child = self
            .command(false)
            .arg(remote)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| PlatformError::failed(&self.machine, format!("cannot run ssh: {e}")))?;
        let feeder = stdin.map(|bytes| {
            let mut pipe = child.stdin.take().expect("piped");
            let bytes = bytes.to_vec();
            std::thread::spawn(move || pipe.write_all(&bytes))
        });
        let out = child.wait_with_output().map_err(|e| PlatformError::failed(&self.machine, format!("ssh: {e}")))?;
        if let Some(f) = feeder {
            let _ = f.join();
        }
        if out.status.code() == Some(255) {
            return Err(explain_ssh_failure(&self.machine, &self.destination(), &String::from_utf8_lossy(&out.stderr)));
        }
        Ok(out)
    }

    /// Runs `remote` over the master, each line of its stderr to `on_line` as it comes;
    /// returns its status and the last lines of its stderr (for the error: a build's log has
    /// no bound), its stdout dropped.
    fn run_streaming(&self, remote: &str, on_line: &dyn Fn(&str)) -> Result<(std::process::ExitStatus, String), PlatformError> {
        let mut child = self
            .command(false)
            .arg(remote)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| PlatformError::failed(&self.machine, format!("cannot run ssh: {e}")))?;
        const KEPT: usize = 200;
        let mut last = std::collections::VecDeque::with_capacity(KEPT);
        for line in std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().expect("piped"))) {
            let Ok(line) = line else { break };
            on_line(&line);
            if last.len() == KEPT {
                last.pop_front();
            }
            last.push_back(line);
        }
        let said = last.into_iter().map(|l| l + "\n").collect::<String>();
        let status = child.wait().map_err(|e| PlatformError::failed(&self.machine, format!("ssh: {e}")))?;
        if status.code() == Some(255) {
            return Err(explain_ssh_failure(&self.machine, &self.destination(), &said));
        }
        Ok((status, said))
    }

    /// Opens the master connection unless one answers already.
    fn ensure_master(&self) -> Result<(), PlatformError> {
        let Some(control) = &self.control else {
            return Ok(()); // no private directory for sockets: every step connects anew
        };
        let _one_at_a_time = MASTERS.lock().unwrap_or_else(|p| p.into_inner());
        let check = self.base(true).args(["-O", "check", "--", &self.host]).stdin(Stdio::null()).output();
        if check.is_ok_and(|o| o.status.success()) {
            return Ok(());
        }
        // The master's stderr goes to a file, not a pipe: the master lives on in the
        // background holding it, and a pipe would never reach EOF.
        let log = control.with_file_name(format!("{}-{}.log", std::process::id(), self.machine));
        let file = fs::File::create(&log).map_err(|e| PlatformError::failed(&self.machine, format!("cannot create {}: {e}", log.display())))?;
        let status = self
            .base(true)
            .args(["-o", "ControlMaster=yes", "-o", "ControlPersist=60", "-N", "-f", "--", &self.host])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .status()
            .map_err(|e| PlatformError::failed(&self.machine, format!("cannot run ssh (Debian: openssh-client): {e}")))?;
        let said = fs::read_to_string(&log).unwrap_or_default();
        let _ = fs::remove_file(&log);
        if !status.success() {
            return Err(explain_ssh_failure(&self.machine, &self.destination(), &said));
        }
        self.opened.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Closes the master this handle opened.
    fn close(&self) {
        if self.opened.swap(false, Ordering::SeqCst) {
            let _ = self.base(true).args(["-O", "exit", "--", &self.host]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
}

/// A private directory for master sockets: `$XDG_RUNTIME_DIR/flotilla-ssh`, else
/// `/tmp/flotilla-ssh-<uid>`; refused unless it is ours and closed to others. (Socket paths
/// are limited to 108 bytes, so not under the state directory.)
fn control_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let uid = current_uid();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("flotilla-ssh"),
        None => std::env::temp_dir().join(format!("flotilla-ssh-{uid}")),
    };
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let meta = fs::symlink_metadata(&dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(format!("{} is not a private directory of this user", dir.display()));
    }
    Ok(dir)
}

/// This process's uid, from /proc (no libc call needed).
fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0)
}

/// One clear sentence for the ways ssh fails to connect, of the kind it is: a host key or
/// login refused, a host that does not answer, or another failure.
fn explain_ssh_failure(machine: &str, destination: &str, stderr: &str) -> PlatformError {
    let said = stderr
        .lines()
        .rfind(|l| !l.starts_with("@@@") && !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned();
    let host = destination.split('@').next_back().unwrap_or(destination).split(':').next().unwrap_or(destination);
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") || stderr.contains("Host key verification failed") {
        if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
            return PlatformError::refused(machine, format!(
                "refused to connect to {destination}: its host key does not match the one in known_hosts (the host was reinstalled, or someone is in the middle); if the change is expected, remove the old key with `ssh-keygen -R {host}` and check the new one by connecting once by hand"
            ));
        }
        return PlatformError::refused(machine, format!(
            "refused to connect to {destination}: its host key is not in known_hosts; connect once by hand (`ssh {destination}`) to check and accept it, or add it with ssh-keyscan after checking its fingerprint"
        ));
    }
    if stderr.contains("Permission denied") {
        return PlatformError::refused(machine, format!("{destination} refused the login ({said}); check `platform.user` and `platform.identityFile`, or the keys your ssh-agent offers"));
    }
    if ["Connection timed out", "No route to host", "Connection refused", "Could not resolve hostname", "Network is unreachable", "Operation timed out"]
        .iter()
        .any(|s| stderr.contains(s))
    {
        return PlatformError::unreachable(machine, format!("cannot reach {destination} ({said}); check `platform.host` and `platform.port` and that the host is up"));
    }
    PlatformError::failed(machine, if said.is_empty() { format!("ssh to {destination} failed") } else { format!("ssh to {destination} failed: {said}") })
}

/// Why a login user's sudo would not do, and the fix.
fn sudo_advice(user: Option<&str>, host: &str, said: &str) -> String {
    let user = user.unwrap_or("the login user");
    format!(
        "{user} is not root on {host} and sudo would ask for a password (sudo -n said: {}); allow it without one, e.g. `{user} ALL=(ALL) NOPASSWD: ALL` in /etc/sudoers.d/flotilla, or set `platform.user = \"root\"`",
        said.trim().trim_start_matches("sudo: ")
    )
}

/// A word quoted for a POSIX shell.
fn shell_quote(w: &str) -> String {
    if !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b)) {
        w.to_owned()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// The agent binary as Nix would add it (`builtins.path { name = "flotilla-agent"; }`).
fn agent_file(binary: &Path) -> Result<AgentFile, String> {
    let mut hashing = HashingWriter::new(std::io::sink());
    flotilla_store::encode_path(binary, &mut hashing).map_err(|e| format!("cannot read the agent {}: {e}", binary.display()))?;
    let (_, digest) = hashing.finish();
    let path = StorePath::for_source("flotilla-agent", &digest.hash).map_err(|e| e.to_string())?;
    Ok(AgentFile { path, nar_hash: digest.hash, nar_size: digest.size })
}

/// The script (run as root with `sh -c`) that points the host's agent link at `agent` and
/// starts it, or restarts it with `restart`: through `flotilla-agent.service` (written to
/// [`UNIT_PATH`] when it differs from [`unit_text`]) with `systemd`, detached without.
pub fn start_script(agent: &str, systemd: bool, restart: bool) -> String {
    let bin_dir = AGENT_LINK.rsplit_once('/').map_or("/", |(dir, _)| dir);
    if systemd {
        let verb = if restart { "restart" } else { "start" };
        script(
            include_str!("ssh/start_systemd.sh"),
            &[
                ("bin_dir", bin_dir),
                ("agent", agent),
                ("link", AGENT_LINK),
                ("unit_text", &unit_text()),
                ("unit_path", UNIT_PATH),
                ("unit_name", UNIT_NAME),
                ("verb", verb),
            ],
        )
    } else {
        let restart = if restart { "yes" } else { "no" };
        script(include_str!("ssh/start_detached.sh"), &[("bin_dir", bin_dir), ("agent", agent), ("link", AGENT_LINK), ("restart", restart)])
    }
}

/// The systemd unit that runs the agent, as [`start_script`] writes it to [`UNIT_PATH`]
/// (followed by a newline).
pub fn unit_text() -> String {
    let unit = fill(include_str!("ssh/flotilla-agent.service"), &[("link", AGENT_LINK)], str::to_owned);
    unit.strip_suffix('\n').unwrap_or(&unit).to_owned()
}

/// The probe for an agent at `agent`, looking for `nix-store` in `places` (the layout's, but
/// for tests).
fn probe_script(agent: &str, places: &[&str]) -> String {
    script(include_str!("ssh/probe.sh"), &[("agent", agent), ("nix_store_places", &places.join(" "))])
}

/// A shell script from its template in `ssh/`, each `@name@` replaced by its value quoted
/// as one word for the shell, so no value can become code.
fn script(template: &str, vars: &[(&str, &str)]) -> String {
    fill(template, vars, shell_quote)
}

/// `template` with each `@name@` replaced by `quote(value)`, in one pass (a value is never
/// read again for placeholders). A placeholder without a value is a bug in flotilla: it
/// panics, and the tests fill every template.
fn fill(template: &str, vars: &[(&str, &str)], quote: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find('@') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        match after.find('@').map(|end| (&after[..end], end)) {
            Some((name, end)) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') => {
                let value = vars.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("template placeholder @{name}@ has no value"));
                out.push_str(&quote(value.1));
                rest = &after[end + 1..];
            }
            _ => {
                out.push('@');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Findings on issue 18, item 5: the probe finds the host's nix-store where a multi-user
    /// install puts it, though no PATH leads there, and the build's commands run it by that
    /// absolute path (a bare `sudo -n -- nix-store` finds none there).
    #[test]
    fn build_on_target_runs_the_nix_store_the_probe_found_off_the_path() {
        assert_eq!(layout::NIX_STORE_PLACES[0], "/nix/var/nix/profiles/default/bin", "the multi-user install's place comes first");
        let dir = tempfile::tempdir().unwrap();
        let places: Vec<String> = ["none/bin", "profile/bin", "usr/bin"].iter().map(|p| dir.path().join(p).display().to_string()).collect();
        for p in &places[1..] {
            fs::create_dir_all(p).unwrap();
            let tool = Path::new(p).join("nix-store");
            fs::write(&tool, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let refs: Vec<&str> = places.iter().map(String::as_str).collect();
        let mut child = Command::new("sh")
            .arg("-s")
            .env_clear()
            // The probe's tools; this host's own nix-store is on it too, and must not be found.
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("prerequisite missing: sh");
        child.stdin.take().unwrap().write_all(probe_script("/nonexistent/agent", &refs).as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let p = Probe::parse(&String::from_utf8_lossy(&out.stdout));
        let found = format!("{}/nix-store", places[1]);
        assert_eq!(p.nix_store.as_deref(), Some(found.as_str()), "probe said:\n{}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(flotilla_nix::Nix::remote_import_argv(&found)[0], found);
        assert_eq!(flotilla_nix::Nix::remote_invalid_argv(&found)[1], found, "xargs runs it by its path");
    }

    /// A value filled into a script template is one word for the shell, whatever it holds.
    #[test]
    fn template_values_cannot_become_code() {
        let hostile = "$(echo pwned); `id` 'q' \"d\" @x@";
        let text = script("printf '%s\\n' @v@ @w@\n", &[("v", hostile), ("w", "plain")]);
        let out = Command::new("sh").arg("-c").arg(&text).output().expect("prerequisite missing: sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{hostile}\nplain\n"), "{text}");
        assert_eq!(fill("a@@b mail@host", &[], str::to_owned), "a@@b mail@host", "only @name@ is a placeholder");
    }

    #[test]
    #[should_panic(expected = "@agent@ has no value")]
    fn a_placeholder_without_a_value_is_a_bug_caught_at_once() {
        script(include_str!("ssh/probe.sh"), &[]);
    }

    /// The systemd start script writes exactly `unit_text()`, whose `ExecStart` is the agent
    /// link of the layout.
    #[test]
    fn the_start_script_carries_the_unit_and_the_layouts_paths() {
        let unit = unit_text();
        assert!(unit.contains(&format!("ExecStart={} init\n", layout::BOOTSTRAP_AGENT)) && !unit.ends_with('\n'), "{unit}");
        let s = start_script("/nix/store/abc-flotilla-agent", true, true);
        assert!(s.contains(&format!("unit={}\n", shell_quote(&unit))) && s.contains("systemctl restart flotilla-agent.service\n"), "{s}");
        assert!(s.contains(&format!("ln -sfn /nix/store/abc-flotilla-agent {}\n", layout::BOOTSTRAP_AGENT)), "{s}");
        let d = start_script("/nix/store/abc-flotilla-agent", false, false);
        assert!(d.contains("if [ no = yes ]") && d.contains("init --detach"), "{d}");
    }

    #[test]
    fn words_are_quoted_for_the_remote_shell() {
        assert_eq!(shell_quote("/nix/store/abc-flotilla-agent"), "/nix/store/abc-flotilla-agent");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b;rm -rf /"), "'a b;rm -rf /'");
    }

    #[test]
    fn ssh_failures_read_as_advice() {
        let changed = "@@@@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n@@@@@@@@@@@\nHost key verification failed.\n";
        let e = explain_ssh_failure("m", "root@10.0.0.2", changed);
        assert!(matches!(e, PlatformError::Refused { .. }), "{e:?}");
        let m = e.message();
        assert!(m.contains("host key does not match") && m.contains("ssh-keygen -R 10.0.0.2"), "{m}");
        let e = explain_ssh_failure("m", "root@10.0.0.9", "ssh: connect to host 10.0.0.9 port 22: No route to host\n");
        assert!(matches!(e, PlatformError::Unreachable { .. }), "{e:?}");
        assert!(e.message().starts_with("cannot reach root@10.0.0.9 (ssh: connect to host 10.0.0.9 port 22: No route to host)"), "{e}");
        let e = explain_ssh_failure("m", "deploy@h", "deploy@h: Permission denied (publickey).\n");
        assert!(matches!(e, PlatformError::Refused { .. }), "{e:?}");
        assert!(e.message().contains("refused the login") && e.message().contains("platform.identityFile"), "{e}");
        assert_eq!(e.to_string(), format!("machine m: {}", e.message()));
    }

    #[test]
    fn user_options_come_before_flotillas_so_they_win() {
        let spec = SshPlatform {
            host: "h".into(),
            port: Some(2222),
            user: Some("deploy".into()),
            identity_file: Some("/k".into()),
            ssh_options: vec!["-o".into(), "ConnectTimeout=3".into()],
        };
        let ssh = Ssh::new("m", &spec);
        let c = ssh.command(false);
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let mine = args.iter().position(|a| a == "ConnectTimeout=3").unwrap();
        let ours = args.iter().position(|a| a == "ConnectTimeout=10").unwrap();
        assert!(mine < ours, "{args:?}");
        assert_eq!(&args[args.len() - 2..], ["--", "h"]);
        assert!(args.windows(2).any(|w| w == ["-l", "deploy"]) && args.windows(2).any(|w| w == ["-p", "2222"]), "{args:?}");
        assert_eq!(ssh.destination(), "deploy@h:2222");
    }

    /// The agent's store path computed here is the one Nix gives it (real `nix-store --add`).
    #[test]
    fn the_agents_store_path_is_the_one_nix_computes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("flotilla-agent");
        fs::write(&file, b"#!/bin/sh\necho not really an agent\n").unwrap();
        let mut perms = fs::metadata(&file).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        fs::set_permissions(&file, perms).unwrap();
        let ours = agent_file(&file).unwrap();
        let out = Command::new("nix-store").arg("--add").arg(&file).output().expect("prerequisite missing: nix-store (Debian: nix-bin)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ours.path.to_absolute());
        let hash = Command::new("nix-store").args(["-q", "--hash"]).arg(ours.path.to_absolute()).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&hash.stdout).trim(), ours.nar_hash.to_string());
    }
}
