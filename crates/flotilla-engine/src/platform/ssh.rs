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

use flotilla_model::SshPlatform;
use flotilla_store::{HashingWriter, NarHash, StorePath};
use serde::{Deserialize, Serialize};

use super::{Context, Machine, MachineState, PlatformError};
use crate::remote::{AgentClient, RemoteError};

/// The link to the agent the host runs (the systemd unit and `start` use it).
const AGENT_LINK: &str = flotilla_protocol::layout::BOOTSTRAP_AGENT;
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
}

impl SshMachine {
    /// The machine `name` on the host its options name.
    pub fn new(ctx: &Context, name: &str, spec: &SshPlatform) -> Result<SshMachine, PlatformError> {
        if spec.host.is_empty() || spec.host.starts_with('-') {
            return Err(PlatformError {
                machine: name.to_owned(),
                message: format!("option `platform.host` is {:?}, which is not a host name or address", spec.host),
            });
        }
        Ok(SshMachine {
            name: name.to_owned(),
            ssh: Ssh::new(name, spec),
            dir: ctx.machines_dir().join(name),
            agent_binary: ctx.agent.clone(),
        })
    }

    fn err(&self, message: impl Into<String>) -> PlatformError {
        PlatformError { machine: self.name.clone(), message: message.into() }
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
        let out = self.ssh.run(&self.remote(argv), None).map_err(|m| self.err(m))?;
        if !out.status.success() {
            return Err(self.err(format!("{what} failed on {}: {}", self.ssh.destination(), self.remote_failure(&out))));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What a failed remote command said, with sudo's password question explained.
    fn remote_failure(&self, out: &Output) -> String {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.contains("sudo:") && (stderr.contains("password") || stderr.contains("terminal is required")) {
            return self.sudo_advice(&stderr);
        }
        if stderr.is_empty() {
            format!("exit status {}", out.status.code().unwrap_or(-1))
        } else {
            stderr
        }
    }

    fn sudo_advice(&self, said: &str) -> String {
        let user = self.ssh.user.clone().unwrap_or_else(|| "the login user".into());
        format!(
            "{user} is not root on {} and sudo would ask for a password (sudo -n said: {}); allow it without one, e.g. `{user} ALL=(ALL) NOPASSWD: ALL` in /etc/sudoers.d/flotilla, or set `platform.user = \"root\"`",
            self.ssh.host,
            said.trim().trim_start_matches("sudo: ")
        )
    }

    /// Learns what the deployer needs of the host in one round trip, as the login user.
    fn probe(&self) -> Result<Probe, PlatformError> {
        let agent = self.agent()?.path.to_absolute();
        let script = format!(
            r#"agent={agent}
echo "uid=$(id -u)"
echo "arch=$(uname -m)"
if [ "$(id -u)" = 0 ]; then s=; elif err=$(sudo -n true 2>&1 </dev/null); then s="sudo -n --"; echo sudo=ok; else echo "sudo=$(printf %s "$err" | head -n 1)"; exit 0; fi
if [ -d /run/systemd/system ]; then echo systemd=yes; fi
if [ -d /nix/var/nix/db ]; then echo nix=yes; fi
if [ -x "$agent" ]; then echo agent=present; $s "$agent" status-line 2>/dev/null </dev/null | sed 's/^/agent-state=/'; fi
"#
        );
        let out = self.ssh.run("sh -s", Some(script.as_bytes())).map_err(|m| self.err(m))?;
        if !out.status.success() {
            return Err(self.err(format!("cannot probe {}: {}", self.ssh.destination(), self.remote_failure(&out))));
        }
        let mut p = Probe::default();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            match k {
                "uid" => p.uid = v.to_owned(),
                "arch" => p.arch = v.to_owned(),
                "sudo" => p.sudo = Some(v.to_owned()),
                "systemd" => p.systemd = true,
                "nix" => p.nix = true,
                "agent" => p.agent_present = true,
                "agent-state" => p.running = v.starts_with("running"),
                _ => {}
            }
        }
        Ok(p)
    }

    /// Streams the agent binary to its store path on the host and registers it as the
    /// agent's own (a temporary name first, so an interrupted copy never looks complete).
    fn copy_agent(&self) -> Result<(), PlatformError> {
        let a = self.agent()?;
        let base = a.path.base_name();
        let registration = serde_json::json!({ "narHash": a.nar_hash.to_string(), "narSize": a.nar_size, "references": [] }).to_string();
        let script = format!(
            r#"set -e
umask 022
p=/nix/store/{base}
mkdir -p /nix/store /nix/var/flotilla/db
if [ ! -e "$p" ]; then
  t=/nix/store/.flotilla-partial-bootstrap-{base}
  cat > "$t"
  chmod 0555 "$t"
  mv -f "$t" "$p"
  printf '%s\n' {reg} > /nix/var/flotilla/db/.{base}.tmp
  mv -f /nix/var/flotilla/db/.{base}.tmp /nix/var/flotilla/db/{base}
fi
"#,
            reg = shell_quote(&registration)
        );
        let binary = fs::read(&self.agent_binary).map_err(|e| self.err(format!("cannot read the agent {}: {e}", self.agent_binary.display())))?;
        // The script goes in the command line (it is short); the binary on stdin.
        let out = self.ssh.run(&self.remote(&["sh", "-c", &script]), Some(&binary)).map_err(|m| self.err(m))?;
        if !out.status.success() {
            return Err(self.err(format!("cannot copy the agent to {}: {}", self.ssh.destination(), self.remote_failure(&out))));
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
        self.ssh.ensure_master().map_err(|m| self.err(m))?;
        let p = self.probe()?;
        if p.arch != "x86_64" {
            return Err(self.err(format!("{} is a {} host; this flotilla's agent is built for x86_64 Linux", self.ssh.host, p.arch)));
        }
        if let Some(said) = p.sudo.as_deref().filter(|s| *s != "ok") {
            return Err(self.err(self.sudo_advice(said)));
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
        let Ok(agent) = self.agent().map(|a| a.path.to_absolute()) else { return MachineState::Unreachable };
        match self.ssh.run(&self.remote(&[&agent, "status-line"]), None) {
            Ok(out) if out.status.success() && out.stdout.starts_with(b"running") => MachineState::Running,
            Ok(out) if out.status.success() => MachineState::Stopped,
            _ => MachineState::Unreachable,
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
        let script = format!("if [ -d /run/systemd/system ] && systemctl is-active --quiet {UNIT_NAME}; then systemctl stop {UNIT_NAME}; else {AGENT_LINK} stop >/dev/null; fi");
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
        Err(self.err(format!("{} did not answer ssh within 5 minutes of the reboot", self.ssh.host)))
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
        let script = format!(
            r#"set -e
if [ -f {UNIT_PATH} ]; then
  systemctl disable --now --quiet {UNIT_NAME} 2>/dev/null || true
  rm -f {UNIT_PATH}
  systemctl daemon-reload 2>/dev/null || true
fi
{agent} stop >/dev/null
{agent} uninstall --yes
"#
        );
        self.run_root(&["sh", "-c", &script], "removing flotilla from the host")?;
        fs::remove_dir_all(&self.dir).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }).map_err(|e| self.err(format!("cannot remove {}: {e}", self.dir.display())))?;
        if let Some(parent) = self.dir.parent() {
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }

    fn connect(&self) -> Result<AgentClient, RemoteError> {
        let transport = |message: String| RemoteError::Transport { destination: self.ssh.destination(), message };
        self.ssh.ensure_master().map_err(transport)?;
        let agent = self.agent().map_err(|e| transport(e.message))?.path.to_absolute();
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
        let reader = ChildReader { stdout, child };
        match AgentClient::over(&self.name, reader, stdin) {
            Ok(c) => Ok(c),
            Err(RemoteError::Protocol(flotilla_protocol::ProtocolError::HandshakeClosed)) => {
                // ssh ended before the agent answered; its stderr says why.
                std::thread::sleep(std::time::Duration::from_millis(100));
                let said = said.lock().unwrap_or_else(|p| p.into_inner()).trim().to_owned();
                let message = if said.contains("sudo:") && said.contains("password") {
                    self.sudo_advice(&said)
                } else if said.contains("no agent answers") {
                    format!("no agent runs on {}; start it with `flotilla start {}`", self.ssh.host, self.name)
                } else if said.is_empty() {
                    format!(
                        "the connection closed before the agent answered; the agent's log on the host says why (/var/log/flotilla-agent.log, or `journalctl -u {UNIT_NAME}` with systemd)"
                    )
                } else {
                    said
                };
                Err(transport(message))
            }
            Err(e) => Err(e),
        }
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

    fn logs(&self, service: Option<&str>, lines: usize, follow: bool) -> Result<Command, PlatformError> {
        let agent = self.agent()?.path.to_absolute();
        let lines = lines.to_string();
        let mut argv = vec![agent.as_str(), "logs", "-n", &lines];
        if follow {
            argv.push("-f");
        }
        argv.extend(service);
        let mut cmd = self.ssh.command(false);
        cmd.arg(self.remote(&argv));
        Ok(cmd)
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
    fn run(&self, remote: &str, stdin: Option<&[u8]>) -> Result<Output, String> {
        let mut child = self
            .command(false)
            .arg(remote)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        let feeder = stdin.map(|bytes| {
            let mut pipe = child.stdin.take().expect("piped");
            let bytes = bytes.to_vec();
            std::thread::spawn(move || pipe.write_all(&bytes))
        });
        let out = child.wait_with_output().map_err(|e| format!("ssh: {e}"))?;
        if let Some(f) = feeder {
            let _ = f.join();
        }
        if out.status.code() == Some(255) {
            return Err(explain_ssh_failure(&self.destination(), &String::from_utf8_lossy(&out.stderr)));
        }
        Ok(out)
    }

    /// Opens the master connection unless one answers already.
    fn ensure_master(&self) -> Result<(), String> {
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
        let file = fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let status = self
            .base(true)
            .args(["-o", "ControlMaster=yes", "-o", "ControlPersist=60", "-N", "-f", "--", &self.host])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .status()
            .map_err(|e| format!("cannot run ssh (Debian: openssh-client): {e}"))?;
        let said = fs::read_to_string(&log).unwrap_or_default();
        let _ = fs::remove_file(&log);
        if !status.success() {
            return Err(explain_ssh_failure(&self.destination(), &said));
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

/// One clear sentence for the ways ssh fails to connect.
fn explain_ssh_failure(destination: &str, stderr: &str) -> String {
    let said = stderr
        .lines()
        .rfind(|l| !l.starts_with("@@@") && !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned();
    let host = destination.split('@').next_back().unwrap_or(destination).split(':').next().unwrap_or(destination);
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") || stderr.contains("Host key verification failed") {
        if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
            return format!(
                "refused to connect to {destination}: its host key does not match the one in known_hosts (the host was reinstalled, or someone is in the middle); if the change is expected, remove the old key with `ssh-keygen -R {host}` and check the new one by connecting once by hand"
            );
        }
        return format!(
            "refused to connect to {destination}: its host key is not in known_hosts; connect once by hand (`ssh {destination}`) to check and accept it, or add it with ssh-keyscan after checking its fingerprint"
        );
    }
    if stderr.contains("Permission denied") {
        return format!("{destination} refused the login ({said}); check `platform.user` and `platform.identityFile`, or the keys your ssh-agent offers");
    }
    if ["Connection timed out", "No route to host", "Connection refused", "Could not resolve hostname", "Network is unreachable", "Operation timed out"]
        .iter()
        .any(|s| stderr.contains(s))
    {
        return format!("cannot reach {destination} ({said}); check `platform.host` and `platform.port` and that the host is up");
    }
    if said.is_empty() {
        format!("ssh to {destination} failed")
    } else {
        format!("ssh to {destination} failed: {said}")
    }
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
    let link = AGENT_LINK;
    if systemd {
        let verb = if restart { "restart" } else { "start" };
        format!(
            r#"set -e
mkdir -p /nix/var/flotilla/bin
ln -sfn {agent} {link}
unit={unit_text}
if [ ! -f {UNIT_PATH} ] || [ "$(cat {UNIT_PATH})" != "$unit" ]; then
  printf '%s\n' "$unit" > {UNIT_PATH}.flotilla-tmp
  mv -f {UNIT_PATH}.flotilla-tmp {UNIT_PATH}
  systemctl daemon-reload
fi
systemctl enable --quiet {UNIT_NAME}
systemctl {verb} {UNIT_NAME}
i=0
until {link} status-line | grep -q '^running'; do
  i=$((i+1)); [ $i -lt 150 ] || {{ echo "the agent did not answer within 15 s; see journalctl -u {UNIT_NAME}" >&2; exit 1; }}
  sleep 0.1
done
"#,
            unit_text = shell_quote(&unit_text())
        )
    } else {
        let stop = if restart { format!("{link} stop >/dev/null\n") } else { String::new() };
        format!("set -e\nmkdir -p /nix/var/flotilla/bin\n{stop}ln -sfn {agent} {link}\n{link} init --detach >/dev/null\n")
    }
}

/// The systemd unit that runs the agent, as [`start_script`] writes it to [`UNIT_PATH`]
/// (followed by a newline).
pub fn unit_text() -> String {
    format!(
        "[Unit]
Description=flotilla agent: runs the services flotilla deploys
After=network-online.target
Wants=network-online.target

[Service]
ExecStart={AGENT_LINK} init
# SIGTERM to the agent stops every service cleanly; what is left after it exits is killed.
KillMode=mixed
TimeoutStopSec=90
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let m = explain_ssh_failure("root@10.0.0.2", changed);
        assert!(m.contains("host key does not match") && m.contains("ssh-keygen -R 10.0.0.2"), "{m}");
        let m = explain_ssh_failure("root@10.0.0.9", "ssh: connect to host 10.0.0.9 port 22: No route to host\n");
        assert!(m.starts_with("cannot reach root@10.0.0.9 (ssh: connect to host 10.0.0.9 port 22: No route to host)"), "{m}");
        let m = explain_ssh_failure("deploy@h", "deploy@h: Permission denied (publickey).\n");
        assert!(m.contains("refused the login") && m.contains("platform.identityFile"), "{m}");
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
