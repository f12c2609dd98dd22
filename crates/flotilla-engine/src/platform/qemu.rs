//! The `qemu` platform: each machine is a QEMU virtual machine on this host.
//!
//! A machine's data lives beside the state DB, in `machines/<deployment>/<machine>/`:
//! - `disk.qcow2`: its disk, a qcow2 overlay (of `platform.diskSize`) over the deployment's
//!   base image `machines/<deployment>/base-<hash>.img`, an ext4 filesystem labelled
//!   `flotilla-root` that holds only the bootstrap agent. The guest grows its filesystem to
//!   the disk at boot; the deploy then copies the closure into the VM's own store over the
//!   agent protocol, exactly as for any other machine.
//! - `boot/current` → `boot/<toplevel hash>/` with `kernel`, `initrd` and `params`: copies of
//!   what the generation the machine runs boots with, so a reboot boots the current
//!   generation's kernel (and a rollback the old one) even after the host's store dropped it.
//! - `forward.json` and `forward.log`: the relay of `platform.forwardPorts`
//!   (`flotilla-agent forward`, from 127.0.0.1 on this host to the VM's address), started
//!   with the VM and stopped with it, as a local container's monitor relays its forwards.
//! - `vm.json` (QEMU's pid and start time), `console.log` (the serial console; a first boot
//!   that fails removes everything else it made but keeps it, for `flotilla logs --console`), `qmp.sock`,
//!   and `agent.<n>.sock` / `agent.<n>.lock`: the host ends of the virtio-serial ports
//!   `flotilla.agent.<n>` the agent answers on. A connection holds the port's lock for its
//!   life, so up to [`PORTS`] connections run at once and a fifth waits for a free port.
//!
//! Networking: a tap device (`flt-<hash>`) on the deployment's bridge (the one its local
//! containers use: one subnet, `/etc/hosts` and `nodes.<name>.ip` for both), virtio-net in the
//! guest; the guest's address is on the kernel command line (`flotilla.ip=`), planned with
//! the local machines' addresses.
//!
//! What the deployer sends on a port while the guest has it closed reaches whoever opens it
//! next; so the agent writes a hello line when it opens a port, and the deployer sends nothing
//! before it (see [`QemuMachine::open_port`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_model::{Accel, QemuPlatform};
use flotilla_protocol::layout;
use flotilla_store::StorePath;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{bridge, sys, Context, Machine, MachineState, PlatformError, Transport};
use crate::facts::Subnet;
use crate::remote::RemoteError;

/// The virtio-serial ports the agent answers on: as many connections at once.
pub const PORTS: usize = 4;
/// What the agent writes first on a port it opened.
pub const HELLO: &[u8] = b"FLOTILLA-AGENT-HELLO\n";
/// The root filesystem's label, which stage 1 looks for.
pub const ROOT_LABEL: &str = "flotilla-root";

/// How long a booting VM's agent gets to answer (TCG boots a kernel in seconds; several at
/// once on two cores take longer).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a stopping VM's agent gets to stop its services and power off before QEMU is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a running VM's agent gets to say hello on a port.
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a new connection waits for the agent's hello before it connects again.
const RECONNECT_AFTER: Duration = Duration::from_millis(1500);
/// How long the port stays closed before that: long enough for a guest to see it closed.
const RECONNECT_PAUSE: Duration = Duration::from_millis(300);
/// The systems whose kernel, initramfs and parameters a VM keeps copies of (the current one
/// and those booted before it, for rollbacks).
const BOOT_COPIES: usize = 5;
/// How large the console log may grow before a boot starts a new one (the old one kept as
/// `console.log.1`).
const CONSOLE_KEEP: u64 = 8 << 20;
/// The console lines a failure to boot quotes.
const CONSOLE_LINES: usize = 8;

/// Serialises making the deployment's base image.
static BASE: Mutex<()> = Mutex::new(());

/// A QEMU virtual machine.
#[derive(Debug)]
pub struct QemuMachine {
    name: String,
    ctx: Context,
    dir: PathBuf,
    agent: PathBuf,
    spec: QemuPlatform,
    bridge: String,
    tap: String,
    mac: String,
    ip: Ipv4Addr,
    subnet: Subnet,
    /// The system a machine that does not exist yet boots first (its deploy's toplevel).
    first: Mutex<Option<StorePath>>,
}

/// The port forwards' relay, as `forward.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Relay {
    pid: u32,
    start_time: u64,
    /// Its `--forward` specs.
    forwards: Vec<String>,
}

/// QEMU's process, as `vm.json` records it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct VmPid {
    pid: u32,
    start_time: u64,
    /// The address it booted with (on its kernel command line).
    #[serde(default)]
    ip: Option<Ipv4Addr>,
}

impl QemuMachine {
    /// The VM for machine `name`, from its checked platform options and its facts (`ip`,
    /// planned with the local machines' addresses).
    pub fn new(ctx: &Context, name: &str, spec: &QemuPlatform, facts: &BTreeMap<String, Value>) -> Result<QemuMachine, PlatformError> {
        let (ip, subnet) = bridge::place(name, &spec.subnet, facts)?;
        let hash = bridge::short_hash(&[&ctx.state_path.to_string_lossy(), &ctx.deployment, name]);
        let mac = format!("52:54:{}:{}:{}:{}", &hash[0..2], &hash[2..4], &hash[4..6], &hash[6..8]);
        Ok(QemuMachine {
            name: name.to_owned(),
            ctx: ctx.clone(),
            dir: ctx.machines_dir().join(name),
            agent: ctx.agent.clone(),
            spec: spec.clone(),
            bridge: bridge::name(ctx),
            tap: format!("flt-{hash}"),
            mac,
            ip,
            subnet,
            first: Mutex::new(None),
        })
    }

    fn err(&self, message: impl Into<String>) -> PlatformError {
        PlatformError::failed(&self.name, message)
    }

    fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }

    fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    fn port_socket(&self, n: usize) -> PathBuf {
        self.dir.join(format!("agent.{n}.sock"))
    }

    fn boot_dir(&self) -> PathBuf {
        self.dir.join("boot")
    }

    /// QEMU's process while it runs.
    fn running(&self) -> Option<VmPid> {
        let pid: VmPid = serde_json::from_slice(&fs::read(self.dir.join("vm.json")).ok()?).ok()?;
        flotilla_proc::is_running(pid.pid, pid.start_time).then_some(pid)
    }

    /// Makes the machine's directory, root's alone (it holds the VM's disk).
    fn make_dir(&self) -> Result<(), PlatformError> {
        let deployment = self.dir.parent().unwrap_or(&self.dir);
        for dir in [deployment.parent().unwrap_or(deployment), deployment, &self.dir] {
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(self.err(format!("cannot create {}: {e}", dir.display()))),
            }
        }
        Ok(())
    }

    /// The deployment's base image (made once per agent binary): an ext4 filesystem holding
    /// the bootstrap agent and the directories the agent mounts on. Call with [`BASE`] held.
    fn base_image(&self) -> Result<PathBuf, PlatformError> {
        let agent = fs::read(&self.agent).map_err(|e| self.err(format!("cannot read the agent {} ({e})", self.agent.display())))?;
        let hash = &sha256(&agent)[..16];
        let deployment_dir = self.dir.parent().unwrap_or(&self.dir);
        let base = deployment_dir.join(format!("base-{hash}.img"));
        if base.exists() {
            return Ok(base);
        }
        let staging = deployment_dir.join(format!(".base-{hash}.staging"));
        let partial = deployment_dir.join(format!(".base-{hash}.img.partial"));
        let _ = fs::remove_dir_all(&staging);
        let made = (|| {
            let io = |what: &str, p: &Path, e: std::io::Error| self.err(format!("cannot {what} {}: {e}", p.display()));
            for d in ["dev", "proc", "sys", "run", "tmp", "etc", "var", "root", "nix/store", "nix/var/flotilla/bin"] {
                let p = staging.join(d);
                fs::create_dir_all(&p).map_err(|e| io("create", &p, e))?;
            }
            fs::set_permissions(staging.join("tmp"), fs::Permissions::from_mode(0o1777)).map_err(|e| io("set the mode of", &staging.join("tmp"), e))?;
            let dest = layout::under(&staging, layout::BOOTSTRAP_AGENT);
            fs::write(&dest, &agent).map_err(|e| io("write", &dest, e))?;
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).map_err(|e| io("set the mode of", &dest, e))?;
            let size_mib = agent.len() / (1 << 20) + 64;
            let _ = fs::remove_file(&partial);
            run(&self.name, Command::new("mkfs.ext4").args(["-q", "-F", "-L", ROOT_LABEL, "-d"]).arg(&staging).arg(&partial).arg(format!("{size_mib}M")), "make the base image with mkfs.ext4 (install e2fsprogs)")?;
            fs::rename(&partial, &base).map_err(|e| io("rename into place", &base, e))
        })();
        let _ = fs::remove_dir_all(&staging);
        let _ = fs::remove_file(&partial);
        made.map(|()| base)
    }

    /// Makes the disk: a qcow2 overlay over the base image.
    fn make_disk(&self) -> Result<(), PlatformError> {
        // Held until the disk is in place: a sibling VM that fails meanwhile must not take
        // the base image with it as the deployment's last VM.
        let _one_at_a_time = BASE.lock().unwrap_or_else(|p| p.into_inner());
        self.make_dir()?;
        let base = self.base_image()?;
        let partial = self.dir.join(".disk.qcow2.partial");
        let _ = fs::remove_file(&partial);
        run(
            &self.name,
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&base)
                .arg(&partial)
                .arg(format!("{}M", self.spec.disk_size)),
            "make its disk with qemu-img (install qemu-utils)",
        )?;
        fs::rename(&partial, self.disk()).map_err(|e| self.err(format!("cannot rename {} into place: {e}", self.disk().display())))
    }

    /// Makes `toplevel` the system the VM boots: its kernel, initrd and parameters copied into
    /// `boot/<hash>/`, then `boot/current` switched to it in one rename.
    fn set_boot(&self, toplevel: &StorePath) -> Result<(), PlatformError> {
        let top_abs = toplevel.to_absolute();
        let top = Path::new(&top_abs);
        let hash = toplevel.hash_part().to_owned();
        let boot = self.boot_dir();
        let dir = boot.join(&hash);
        let io = |what: &str, p: &Path, e: std::io::Error| self.err(format!("cannot {what} {}: {e}", p.display()));
        // A copy made while this system was booted before serves again (a rollback), whether
        // or not the host's store still holds it.
        if !dir.join("params").exists() {
            if !top.exists() {
                return Err(self.err(format!(
                    "its system {toplevel} is no longer in this host's store (collected), so its kernel cannot be booted; build it again (flotilla build) or deploy"
                )));
            }
            if !top.join("kernel").exists() {
                return Err(self.err(format!("its system {toplevel} has no kernel; set option `boot.kernel` (e.g. boot.kernel = pkgs.linux;)")));
            }
            let partial = boot.join(format!(".{hash}.partial"));
            let _ = fs::remove_dir_all(&partial);
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&partial).map_err(|e| io("create", &partial, e))?;
            for f in ["kernel", "initrd"] {
                fs::copy(top.join(f), partial.join(f)).map_err(|e| io("copy", &top.join(f), e))?;
            }
            let params = fs::read_to_string(top.join("kernel-params")).unwrap_or_default();
            let params = format!("{} flotilla.system={toplevel}", params.trim());
            fs::write(partial.join("params"), params.trim()).map_err(|e| io("write", &partial.join("params"), e))?;
            fs::rename(&partial, &dir).map_err(|e| io("rename into place", &dir, e))?;
        }
        let link = boot.join(".current.new");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&hash, &link).map_err(|e| io("create", &link, e))?;
        fs::rename(&link, boot.join("current")).map_err(|e| io("switch", &boot.join("current"), e))?;
        // The copies of the systems booted most recently (by their directory's modification
        // time, set now) are kept for rollbacks; older ones go.
        let _ = fs::File::open(&dir).and_then(|d| d.set_modified(std::time::SystemTime::now()));
        let mut copies: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(&boot)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name() != "current" && e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path()))
            .collect();
        copies.sort_by_key(|c| std::cmp::Reverse(c.0));
        for (_, old) in copies.into_iter().skip(BOOT_COPIES) {
            if old != dir {
                let _ = fs::remove_dir_all(old);
            }
        }
        Ok(())
    }

    /// The tap on the deployment's bridge, made if missing.
    fn ensure_tap(&self) -> Result<(), PlatformError> {
        let _one_at_a_time = bridge::NETWORK.lock().unwrap_or_else(|p| p.into_inner());
        let made_bridge = bridge::ensure(&self.name, &self.bridge, &self.subnet)?;
        let made = (|| {
            if !bridge::link_exists(&self.tap) {
                bridge::ip(&self.name, &["tuntap", "add", "dev", &self.tap, "mode", "tap"])?;
            }
            bridge::ip(&self.name, &["link", "set", &self.tap, "master", &self.bridge, "up"]).map(drop)
        })();
        if made.is_err() && made_bridge {
            let _ = bridge::ip(&self.name, &["link", "del", &self.tap]);
            let _ = bridge::ip(&self.name, &["link", "del", &self.bridge]);
        }
        made
    }

    fn remove_tap(&self) -> Result<(), PlatformError> {
        let _one_at_a_time = bridge::NETWORK.lock().unwrap_or_else(|p| p.into_inner());
        if bridge::link_exists(&self.tap) {
            bridge::ip(&self.name, &["link", "del", &self.tap])?;
        }
        bridge::remove_if_unused(&self.name, &self.bridge)
    }

    /// QEMU's accelerator: `platform.accel`, with `auto` probed once per deployment directory.
    fn accel(&self) -> &'static str {
        const TCG: &str = "tcg,tb-size=32"; // a smaller translation cache: about 30 MB less per VM
        match self.spec.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => TCG,
            Accel::Auto => {
                let kernel = self.boot_dir().join("current").join("kernel");
                let cache = self.dir.parent().unwrap_or(&self.dir).join("accel");
                if kvm_boots(&kernel, &cache) {
                    "kvm"
                } else {
                    TCG
                }
            }
        }
    }

    /// QEMU's command line.
    fn qemu_command(&self) -> Result<Command, PlatformError> {
        let boot = self.boot_dir().join("current");
        let params = fs::read_to_string(boot.join("params"))
            .map_err(|_| self.err("it has no system to boot yet (its first deploy failed before provisioning); deploy it again"))?;
        let mut append = format!(
            "console=ttyS0 root=LABEL={ROOT_LABEL} panic=-1 flotilla.hostname={} flotilla.ip={}/{} flotilla.gateway={}",
            self.name,
            self.ip,
            self.subnet.prefix,
            self.subnet.gateway()
        );
        if !params.trim().is_empty() {
            append.push(' ');
            append.push_str(params.trim());
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-name", &format!("flotilla-{}", self.name), "-M", "pc", "-accel", self.accel()])
            .args(["-m", &self.spec.memory.to_string(), "-smp", &self.spec.cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-daemonize"])
            .arg("-pidfile")
            .arg(self.dir.join("qemu.pid"))
            .arg("-kernel")
            .arg(boot.join("kernel"))
            .arg("-initrd")
            .arg(boot.join("initrd"))
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2,discard=unmap", self.disk().display()))
            .args(["-netdev", &format!("tap,id=net0,ifname={},script=no,downscript=no", self.tap)])
            .args(["-device", &format!("virtio-net-pci,netdev=net0,mac={}", self.mac)])
            .args(["-chardev", &format!("file,id=console,path={},append=on", self.console().display())])
            .args(["-serial", "chardev:console"])
            .args(["-qmp", &format!("unix:{},server=on,wait=off", self.dir.join("qmp.sock").display())])
            .args(["-device", "virtio-serial-pci"]);
        for n in 0..PORTS {
            cmd.args(["-chardev", &format!("socket,id=agent{n},path={},server=on,wait=off", self.port_socket(n).display())])
                .args(["-device", &format!("virtserialport,chardev=agent{n},name=flotilla.agent.{n}")]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        Ok(cmd)
    }

    /// Boots the VM and waits for its agent.
    fn boot(&self) -> Result<(), PlatformError> {
        for n in 0..PORTS {
            let _ = fs::remove_file(self.port_socket(n));
        }
        let _ = fs::remove_file(self.dir.join("vm.json"));
        let _ = fs::remove_file(self.dir.join("qemu.pid"));
        if self.port_socket(PORTS - 1).as_os_str().len() >= 108 {
            return Err(self.err(format!(
                "its directory {} is too long a path for a unix socket (108 bytes); keep the state DB in a shorter directory (--state)",
                self.dir.display()
            )));
        }
        // The guest writes the console: it is kept to the last boots, not let grow without end.
        if fs::metadata(self.console()).is_ok_and(|m| m.len() > CONSOLE_KEEP) {
            let _ = fs::rename(self.console(), self.dir.join("console.log.1"));
        }
        // The console of this boot follows a marker, so a failure quotes this boot's lines.
        let mut console = fs::OpenOptions::new().create(true).append(true).mode(0o600).open(self.console()).map_err(|e| self.err(format!("cannot open {}: {e}", self.console().display())))?;
        let _ = writeln!(console, "\n--- flotilla: booting {} ---", self.name);
        let console_start = console.metadata().map(|m| m.len()).unwrap_or(0);
        drop(console);
        // The forwarded ports first: a port someone else holds fails the start before a VM
        // runs (the relay connects to the VM only when a client comes).
        self.start_forwarder()?;
        let booted = self.boot_qemu(console_start);
        if booted.is_err() {
            self.stop_forwarder();
        }
        booted
    }

    /// Starts QEMU and waits for its agent's first hello (QEMU is killed when it does not come).
    fn boot_qemu(&self, console_start: u64) -> Result<(), PlatformError> {
        run(&self.name, &mut self.qemu_command()?, "start QEMU (install qemu-system-x86)")?;
        let pid: u32 = fs::read_to_string(self.dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| self.err("QEMU started but wrote no pidfile"))?;
        let start_time = flotilla_proc::start_time(pid).ok_or_else(|| self.err(format!("QEMU (pid {pid}) exited at once; see {}", self.console().display())))?;
        let record = serde_json::to_vec(&VmPid { pid, start_time, ip: Some(self.ip) }).expect("plain numbers");
        let tmp = self.dir.join(".vm.json.new");
        if let Err(e) = fs::write(&tmp, record).and_then(|()| fs::rename(&tmp, self.dir.join("vm.json"))) {
            // Unrecorded, it could never be stopped or destroyed by flotilla: not left running.
            sys::kill(pid, sys::SIGKILL);
            return Err(self.err(format!("cannot record QEMU's pid in {}, so the VM was stopped again: {e}", self.dir.join("vm.json").display())));
        }

        // One connection waits for the first hello: each connection closed is one the guest
        // must notice before it greets the next.
        let qemu_runs = || flotilla_proc::is_running(pid, start_time);
        let mut waited = self.open_port(START_TIMEOUT, false, &qemu_runs);
        while matches!(&waited, Err(e) if e.kind() == std::io::ErrorKind::NotFound && qemu_runs()) {
            std::thread::sleep(Duration::from_millis(20)); // QEMU has not made the socket yet
            waited = self.open_port(START_TIMEOUT, false, &qemu_runs);
        }
        match waited {
            Ok(_) => Ok(()),
            Err(_) if !qemu_runs() => Err(self.err(format!("it did not boot: QEMU exited; the console says: {}", self.console_since(console_start)))),
            Err(e) => {
                self.kill(VmPid { pid, start_time, ip: None })?; // gone before anyone reads its state
                Err(self.err(format!(
                    "its agent did not answer within {} s ({e}), so the VM was stopped again; the console says: {}",
                    START_TIMEOUT.as_secs(),
                    self.console_since(console_start)
                )))
            }
        }
    }

    fn console_since(&self, offset: u64) -> String {
        let text = fs::read(self.console()).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default());
        let lines: Vec<&str> = text.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect();
        if lines.is_empty() {
            return "nothing".into();
        }
        flotilla_model::escape_controls(&lines[lines.len().saturating_sub(CONSOLE_LINES)..].join(" | ")).into_owned()
    }

    /// A connection to the agent on a free port: the port's lock taken (waiting up to `wait`
    /// for one when all are busy), connected, and the agent's hello read within `wait` while
    /// `alive` holds.
    ///
    /// With `retry`, a connection that gets no hello within [`RECONNECT_AFTER`] is closed and
    /// made again after a pause: a guest may have missed that the port's previous client left
    /// (it connected again before the guest looked), and then still waits for that client's
    /// first frame. Closing for a moment shows it the port closed, so it opens it afresh and
    /// greets. Nothing is ever sent before the hello: what the host sends while the guest has
    /// the port closed is delivered when it opens it again, into the next conversation. Never
    /// while a VM boots (one connection waits for its first hello).
    fn open_port(&self, wait: Duration, retry: bool, alive: &dyn Fn() -> bool) -> std::io::Result<(UnixStream, fs::File)> {
        let until = Instant::now() + wait;
        let (n, lock) = self.free_port(until)?;
        'connect: loop {
            let mut stream = UnixStream::connect(self.port_socket(n))?;
            let reconnect = Instant::now() + RECONNECT_AFTER;
            let mut seen = Vec::new();
            let mut byte = [0u8; 1];
            while !seen.ends_with(HELLO) {
                let now = Instant::now();
                if now >= until {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no hello from the agent on port flotilla.agent.{n} within {} s", wait.as_secs())));
                }
                if !alive() {
                    return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "QEMU exited"));
                }
                if retry && seen.is_empty() && now >= reconnect {
                    drop(stream);
                    std::thread::sleep(RECONNECT_PAUSE);
                    continue 'connect;
                }
                stream.set_read_timeout(Some((until - now).clamp(Duration::from_millis(10), Duration::from_millis(250))))?;
                match stream.read(&mut byte) {
                    Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "QEMU closed the port")),
                    Ok(_) => seen.push(byte[0]),
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e),
                }
                if seen.len() > 4096 {
                    seen.drain(..seen.len() - HELLO.len());
                }
            }
            stream.set_read_timeout(None)?;
            return Ok((stream, lock));
        }
    }

    /// The first port nobody holds, its lock taken; when all are held, the first to come
    /// free before `until`.
    fn free_port(&self, until: Instant) -> std::io::Result<(usize, fs::File)> {
        let open = |n: usize| fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(self.dir.join(format!("agent.{n}.lock")));
        let locks: Vec<fs::File> = (0..PORTS).map(open).collect::<std::io::Result<_>>()?;
        loop {
            for (n, f) in locks.iter().enumerate() {
                if sys::flock(f, false)? {
                    return Ok((n, f.try_clone()?));
                }
            }
            if Instant::now() >= until {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!("all {PORTS} of the VM's agent ports are in use (open `shell`, `exec` or `logs -F` sessions, or other flotilla commands); end one and try again"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes the VM: QEMU killed, its tap, its directory (all of it but the console with
    /// `keep_console`, which a failed provisioning keeps to be read), and the deployment's base
    /// images with its last VM.
    fn remove(&self, keep_console: bool) -> Result<(), PlatformError> {
        self.stop_forwarder();
        if let Some(vm) = self.running() {
            self.kill(vm)?;
        }
        self.remove_tap()?;
        let removed = if !keep_console {
            fs::remove_dir_all(&self.dir)
        } else {
            fs::read_dir(&self.dir).and_then(|entries| {
                for e in entries {
                    let e = e?;
                    if e.file_name() == "console.log" {
                        continue;
                    }
                    // Not followed: a link is removed, not what it names.
                    if e.file_type()?.is_dir() {
                        fs::remove_dir_all(e.path())?;
                    } else {
                        fs::remove_file(e.path())?;
                    }
                }
                Ok(())
            })
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(self.err(format!("cannot remove {}: {e}", self.dir.display()))),
            _ => {}
        }
        if let Some(parent) = self.dir.parent() {
            // The base images and the accelerator's probe go with the deployment's last VM
            // (one whose disk is being made counts).
            let _one_at_a_time = BASE.lock().unwrap_or_else(|p| p.into_inner());
            let vms_left = fs::read_dir(parent).into_iter().flatten().flatten().any(|e| ["disk.qcow2", ".disk.qcow2.partial"].iter().any(|d| e.path().join(d).exists()));
            if !vms_left {
                for e in fs::read_dir(parent).into_iter().flatten().flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with("base-") || n == "accel" {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }

    /// Powers the VM off: the agent stops its services cleanly first; QEMU is killed when it
    /// has not exited in time.
    /// Makes the VM's next boot the generation its agent has switched to, should the deployer
    /// have missed telling the platform (killed between the confirmation and
    /// [`Machine::now_runs`]). Not while a generation awaits confirmation: the agent rolls that
    /// back when it starts. Best effort: powering off goes ahead regardless.
    fn boot_what_it_runs(&self, c: &mut crate::remote::AgentClient) {
        if !c.status().is_ok_and(|s| s.pending_confirmation.is_none()) {
            return;
        }
        let Ok(generations) = c.generations() else { return };
        if let Some(current) = generations.iter().find(|g| g.current) {
            let booted = fs::read_link(self.boot_dir().join("current")).ok();
            if booted.as_deref() != Some(Path::new(current.toplevel.hash_part())) {
                let _ = self.set_boot(&current.toplevel);
            }
        }
    }

    /// Refuses a new address for a running VM: it keeps the one it booted with (its kernel
    /// command line) until it boots again, while the deployment's other machines would be
    /// told the new one, and the old one handed to another machine.
    fn check_address(&self) -> Result<(), PlatformError> {
        match self.running().and_then(|vm| vm.ip) {
            Some(booted) if booted != self.ip => Err(PlatformError::refused(
                &self.name,
                format!(
                    "it runs with address {booted}, but its planned address is now {}; `flotilla reboot --on {}` moves it to the new one, or set platform.address = \"{booted}\" to keep it",
                    self.ip, self.name
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The port forwards' relay while it runs (`forward.json`), with what it forwards.
    fn forwarder(&self) -> Option<Relay> {
        let relay: Relay = serde_json::from_slice(&fs::read(self.dir.join("forward.json")).ok()?).ok()?;
        flotilla_proc::is_running(relay.pid, relay.start_time).then_some(relay)
    }

    /// The `--forward` specs of the relay this VM needs: to the address it booted with.
    fn forward_specs(&self) -> Vec<String> {
        let ip = self.running().and_then(|vm| vm.ip).unwrap_or(self.ip);
        self.spec.forward_ports.iter().map(|f| format!("{}:{ip}:{}", f.host, f.guest)).collect()
    }

    /// Starts the relay of `platform.forwardPorts` (`flotilla-agent forward`, in a process
    /// group of its own, so it outlives the deployer), replacing one that runs: it has bound
    /// every port when this returns, or it failed with its reason.
    fn start_forwarder(&self) -> Result<(), PlatformError> {
        self.stop_forwarder();
        let forwards = self.forward_specs();
        if forwards.is_empty() {
            return Ok(());
        }
        // Its log is this run's only (it says each connection the VM refused).
        let log_path = self.dir.join("forward.log");
        let log = fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&log_path).map_err(|e| self.err(format!("cannot open {}: {e}", log_path.display())))?;
        let mut cmd = Command::new(&self.agent);
        cmd.arg("forward");
        for f in &forwards {
            cmd.arg("--forward").arg(f);
        }
        use std::os::unix::process::CommandExt as _;
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| self.err(format!("cannot run the agent {} to forward its ports ({e})", self.agent.display())))?;
        let mut said = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("piped")), &mut said);
        if said.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            let why = log.lines().last().unwrap_or("it exited").trim_start_matches("flotilla-agent: ").to_owned();
            return Err(PlatformError::refused(&self.name, format!("cannot forward its ports: {}; option `platform.forwardPorts` needs free ports on 127.0.0.1", flotilla_model::escape_controls(&why))));
        }
        let pid = child.id();
        let start_time = flotilla_proc::start_time(pid).unwrap_or_default();
        let record = serde_json::to_vec(&Relay { pid, start_time, forwards }).expect("plain data");
        let tmp = self.dir.join(".forward.json.new");
        if let Err(e) = fs::write(&tmp, record).and_then(|()| fs::rename(&tmp, self.dir.join("forward.json"))) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(self.err(format!("cannot record the port relay's pid: {e}")));
        }
        Ok(())
    }

    /// Stops the port forwards' relay, if it runs.
    fn stop_forwarder(&self) {
        if let Some(relay) = self.forwarder() {
            sys::kill(relay.pid, sys::SIGKILL);
            let since = Instant::now();
            while flotilla_proc::is_running(relay.pid, relay.start_time) && since.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = fs::remove_file(self.dir.join("forward.json"));
    }

    /// Kills QEMU (a power cut) and waits until it has gone.
    fn kill(&self, vm: VmPid) -> Result<(), PlatformError> {
        sys::kill(vm.pid, sys::SIGKILL);
        let killed = Instant::now();
        while flotilla_proc::is_running(vm.pid, vm.start_time) {
            if killed.elapsed() > Duration::from_secs(10) {
                return Err(self.err(format!("QEMU (pid {}) did not exit even after SIGKILL", vm.pid)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn power_off(&self, vm: VmPid) -> Result<(), PlatformError> {
        let asked = self.connect().and_then(|mut c| {
            self.boot_what_it_runs(&mut c);
            c.power_off()
        });
        let deadline = Instant::now() + if asked.is_ok() { STOP_TIMEOUT } else { Duration::ZERO };
        while flotilla_proc::is_running(vm.pid, vm.start_time) {
            if Instant::now() >= deadline {
                self.kill(vm)?;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = fs::remove_file(self.dir.join("vm.json"));
        Ok(())
    }
}

/// Runs `cmd`; on failure, says it could not `what` and QEMU's or the tool's own words.
fn run(machine: &str, cmd: &mut Command, what: &str) -> Result<(), PlatformError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| PlatformError::failed(machine, format!("cannot {what}: {e}")))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(PlatformError::failed(machine, format!("cannot {what}: {}", flotilla_model::escape_controls(why.trim()))));
    }
    Ok(())
}

fn sha256(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether KVM boots a Linux guest on this host (`accel = "auto"`). `/dev/kvm` is not proof:
/// some hosts (paravirtual, some nested set-ups) run a boot sector under KVM but hang a
/// kernel. So the kernel `kernel` is booted under KVM with no root: it panics and, with
/// `panic=-1` and `-no-reboot`, QEMU exits; a kernel that does not get that far within
/// [`KVM_PROBE_TIMEOUT`] means TCG. The answer is kept in `cache` (one file per deployment
/// directory), so only the first VM pays for the probe.
fn kvm_boots(kernel: &Path, cache: &Path) -> bool {
    if let Ok(kept) = fs::read_to_string(cache) {
        return kept.trim() == "kvm";
    }
    let boots = Path::new("/dev/kvm").exists() && kvm_probe(kernel);
    let _ = fs::write(cache, if boots { "kvm\n" } else { "tcg\n" });
    boots
}

/// How long a kernel gets to panic under KVM before KVM counts as hanging guests.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(8);

fn kvm_probe(kernel: &Path) -> bool {
    let child = Command::new("qemu-system-x86_64")
        .args(["-M", "pc", "-accel", "kvm", "-m", "128", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    crate::procfs::wait_timeout(&mut child, KVM_PROBE_TIMEOUT).is_some_and(|s| s.success())
}

impl Machine for QemuMachine {
    fn name(&self) -> &str {
        &self.name
    }

    fn state(&self) -> MachineState {
        if self.running().is_some() {
            MachineState::Running
        } else if self.disk().exists() {
            MachineState::Stopped
        } else {
            MachineState::Missing
        }
    }

    fn prepare(&self, toplevel: &StorePath) {
        *self.first.lock().unwrap_or_else(|p| p.into_inner()) = Some(toplevel.clone());
    }

    fn provision(&self) -> Result<Option<String>, PlatformError> {
        match self.state() {
            MachineState::Running => {
                self.check_address()?;
                self.restore()
            }
            MachineState::Stopped => self.start().map(|()| Some("started".into())),
            MachineState::Missing | MachineState::Unreachable | MachineState::Unusable => {
                let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let made = (|| {
                    if !crate::procfs::is_root() {
                        return Err(PlatformError::refused(&self.name, "the qemu platform makes a tap device on the deployment's bridge, which needs root; run flotilla as root"));
                    }
                    if let Some(top) = &first {
                        self.set_boot(top)?;
                    }
                    self.make_disk()?;
                    self.start()
                })();
                if let Err(e) = made {
                    // The console stays: `flotilla logs --console` shows why it did not boot.
                    return Err(match self.remove(true) {
                        Err(cleanup) => e.and(&format!("; removing what was made failed too ({}); run `flotilla destroy --on {}`", cleanup.message(), self.name)),
                        Ok(()) => e,
                    });
                }
                Ok(Some("created and booted".into()))
            }
        }
    }

    fn start(&self) -> Result<(), PlatformError> {
        if self.running().is_some() {
            return self.restore().map(drop);
        }
        if !self.disk().exists() {
            return Err(self.err("it does not exist; deploy it (flotilla deploy) to create it"));
        }
        self.ensure_tap()?;
        self.boot()
    }

    fn stop(&self) -> Result<(), PlatformError> {
        self.stop_forwarder();
        match self.running() {
            Some(vm) => self.power_off(vm),
            None => Ok(()),
        }
    }

    fn destroy(&self) -> Result<(), PlatformError> {
        self.remove(false)
    }

    fn now_runs(&self, toplevel: &StorePath) -> Result<(), PlatformError> {
        self.set_boot(toplevel)
    }

    fn restore(&self) -> Result<Option<String>, PlatformError> {
        if self.running().is_none() {
            return Ok(None);
        }
        let mut restored = Vec::new();
        let tap_gone = !bridge::link_exists(&self.tap);
        self.ensure_tap()?; // on the bridge and up, whoever changed it
        if tap_gone {
            restored.push(format!("its tap {} was gone", self.tap));
        }
        let wanted = self.forward_specs();
        match self.forwarder() {
            None if wanted.is_empty() => {}
            None => {
                self.start_forwarder()?;
                restored.push("its port forwards were gone".to_owned());
            }
            Some(relay) if relay.forwards != wanted => {
                // platform.forwardPorts changed: the relay follows.
                self.start_forwarder()?;
            }
            Some(_) => {}
        }
        Ok((!restored.is_empty()).then(|| restored.join("; ")))
    }

    fn problems(&self) -> Vec<String> {
        if self.running().is_none() {
            // QEMU ended by itself (a power off inside, a crash): its relay holds the ports.
            return match self.forwarder() {
                Some(_) => vec![format!("its port relay still holds its forwarded ports though QEMU has exited; `flotilla stop --on {}` ends it", self.name)],
                None => Vec::new(),
            };
        }
        let mut problems = Vec::new();
        if !bridge::link_exists(&self.tap) {
            problems.push(format!("its tap {} is gone", self.tap));
        }
        if !self.spec.forward_ports.is_empty() && self.forwarder().is_none() {
            problems.push("its port forwards' relay is gone".to_owned());
        }
        if !problems.is_empty() {
            problems.push(format!("`flotilla start --on {}` restores the platform's plumbing", self.name));
        }
        problems
    }

    fn transport(&self) -> Result<Transport, RemoteError> {
        let connect_err = |source| RemoteError::Connect { socket: self.port_socket(0), source };
        if self.running().is_none() {
            return Err(connect_err(std::io::Error::new(std::io::ErrorKind::NotConnected, "the VM is not running")));
        }
        let (stream, lock) = self.open_port(HELLO_TIMEOUT, true, &|| self.running().is_some()).map_err(connect_err)?;
        let reader = stream.try_clone().map_err(connect_err)?;
        Ok(Transport::new(reader, Locked { stream, _lock: lock }))
    }

    /// Commands (`exec`, `shell`, `logs`) run through the agent over a port.
    fn context(&self) -> Option<&Context> {
        Some(&self.ctx)
    }

    fn resources(&self) -> BTreeMap<String, String> {
        let mut r = BTreeMap::new();
        r.insert("disk".into(), self.disk().display().to_string());
        r.insert("console".into(), self.console().display().to_string());
        r.insert("tap".into(), self.tap.clone());
        r.insert("bridge".into(), self.bridge.clone());
        if let Some(vm) = self.running() {
            r.insert("qemu pid".into(), vm.pid.to_string());
        }
        if let Some(relay) = self.forwarder() {
            r.insert("forward pid".into(), relay.pid.to_string());
        }
        r
    }

    fn console_log(&self) -> Option<PathBuf> {
        Some(self.console())
    }
}

/// The writing half of a port's connection, holding the port's lock until it is dropped.
struct Locked {
    stream: UnixStream,
    _lock: fs::File,
}

impl Write for Locked {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

impl std::os::fd::AsFd for Locked {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tap_and_mac_differ_per_state_db_and_fit_the_kernel_limits() {
        let ctx = |state: &str| Context { state_path: PathBuf::from(state), deployment: "web".into(), agent: PathBuf::from("/a") };
        let spec = QemuPlatform { memory: 512, cpus: 1, disk_size: 2048, accel: Accel::Tcg, address: None, subnet: "10.231.0.0/24".into(), forward_ports: vec![] };
        let facts: BTreeMap<String, Value> = [("ip".to_owned(), Value::from("10.231.0.5"))].into();
        let a = QemuMachine::new(&ctx("/s1/state.db"), "vm1", &spec, &facts).unwrap();
        let b = QemuMachine::new(&ctx("/s2/state.db"), "vm1", &spec, &facts).unwrap();
        assert_ne!(a.tap, b.tap);
        assert!(a.tap.len() <= 15, "{}", a.tap);
        assert!(a.mac.starts_with("52:54:") && a.mac.len() == 17, "{}", a.mac);
        let none = QemuMachine::new(&ctx("/s1/state.db"), "vm1", &spec, &BTreeMap::new()).unwrap_err();
        assert!(none.to_string().contains("has no address yet"), "{none}");
    }
}
