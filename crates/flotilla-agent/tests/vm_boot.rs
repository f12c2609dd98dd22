//! Real boots of a VM under QEMU (TCG) with the agent's own initramfs: stage 1 finds the root
//! by its label and execs the root's agent as the VM's init, which answers on a virtio-serial
//! port, takes its hostname and address from the kernel command line (or a NoCloud seed), and
//! powers off when asked, leaving its root clean. The kernel is the demo cache's
//! (`scripts/demo-cache.sh`); the root is this test's own minimal ext4 (`mkfs.ext4 -d`) with the
//! agent at a fake toplevel's `bin/flotilla-agent`. Every prerequisite missing fails loudly.

use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_protocol::{client_handshake, Connection, ErrorKind, Request, Response};

mod common;

const AGENT: &str = env!("CARGO_BIN_EXE_flotilla-agent");
const HELLO: &[u8] = b"FLOTILLA-AGENT-HELLO\n";

fn kernel() -> PathBuf {
    let dir = PathBuf::from(std::env::var("FLOTILLA_DEMO_CACHE").unwrap_or_else(|_| "/var/cache/flotilla/demo".into())).join("linux");
    assert!(dir.join("bzImage").is_file(), "{} has no bzImage: run scripts/install-deps.sh (it runs scripts/demo-cache.sh)", dir.display());
    dir
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/install-deps.sh)"));
    assert!(out.status.success(), "{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
}

/// The initramfs, built as Nix would build it: the agent as the builder, only the derivation's
/// environment.
fn build_initrd(dir: &Path) -> PathBuf {
    let out = dir.join("initrd-out");
    run(Command::new(AGENT).arg("build-initrd").env_clear().env("kernel", kernel()).env("kernelModules", "").env("out", &out));
    out.join("initrd")
}

/// A root filesystem labelled `label` with the agent as its system's `bin/flotilla-agent`.
fn build_root(dir: &Path, label: &str) -> PathBuf {
    let stage = dir.join("root");
    let toplevel = "/nix/store/00000000000000000000000000000000-vm-test-toplevel";
    let bin = stage.join(&toplevel[1..]).join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(AGENT, bin.join("flotilla-agent")).unwrap();
    let profiles = stage.join("nix/var/flotilla/profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    std::os::unix::fs::symlink(toplevel, profiles.join("system")).unwrap();
    for d in ["dev", "proc", "sys", "run", "tmp", "etc", "var", "root"] {
        std::fs::create_dir_all(stage.join(d)).unwrap();
    }
    let img = dir.join("root.img");
    run(Command::new("mkfs.ext4").args(["-q", "-F", "-L", label, "-d"]).arg(&stage).arg(&img).arg("160M"));
    img
}

/// A running QEMU (in a network namespace of its own when networked); killed and the
/// namespace deleted when dropped, whatever happened.
struct Vm {
    dir: tempfile::TempDir,
    qemu: Child,
    netns: Option<String>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Vm {
    /// Boots with `append` as the kernel command line (after `console=ttyS0`); `seed` attaches
    /// a second disk; `netns` puts QEMU in a new namespace with a tap at 10.250.0.1/24.
    fn boot(dir: tempfile::TempDir, append: &str, seed: Option<&Path>, netns: Option<&str>) -> Vm {
        let initrd = build_initrd(dir.path());
        let mut qemu = Command::new("qemu-system-x86_64");
        if let Some(ns) = netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            run(Command::new("ip").args(["netns", "add", ns]));
            run(Command::new("ip").args(["-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]));
            run(Command::new("ip").args(["-n", ns, "addr", "add", "10.250.0.1/24", "dev", "tap0"]));
            run(Command::new("ip").args(["-n", ns, "link", "set", "tap0", "up"]));
            qemu = Command::new("ip");
            qemu.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            qemu.args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no", "-device", "virtio-net-pci,netdev=n0"]);
        }
        let d = dir.path();
        qemu.args(["-M", "pc", "-accel", "tcg,tb-size=32", "-nographic", "-nodefaults", "-m", "256", "-kernel"])
            .arg(kernel().join("bzImage"))
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 {append}"))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw", d.join("root.img").display()))
            .args(["-device", "virtio-serial-pci"]);
        for port in ["a0", "a1"] {
            qemu.arg("-chardev")
                .arg(format!("socket,id={port},path={},server=on,wait=off", d.join(format!("{port}.sock")).display()))
                .arg("-device")
                .arg(format!("virtserialport,chardev={port},name=flotilla.agent.{}", &port[1..]));
        }
        qemu.arg("-serial")
            .arg(format!("file:{}", d.join("console.log").display()));
        if let Some(seed) = seed {
            qemu.arg("-drive").arg(format!("file={},if=virtio,format=raw,readonly=on", seed.display()));
        }
        let qemu = qemu.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("qemu-system-x86_64 (run scripts/install-deps.sh)");
        Vm { dir, qemu, netns: netns.map(str::to_owned) }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.path().join("console.log")).unwrap_or_default()).into_owned()
    }

    /// Connects to the agent's port as the host side does: drop bytes up to the hello line,
    /// then the handshake.
    fn connect(&mut self) -> Connection<UnixStream, UnixStream> {
        self.connect_port("a0")
    }

    /// Connects to the port `port` (`a0`, `a1`).
    fn connect_port(&mut self, port: &str) -> Connection<UnixStream, UnixStream> {
        let sock = self.dir.path().join(format!("{port}.sock"));
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut stream = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    assert!(self.qemu.try_wait().unwrap().is_none(), "QEMU exited before its port answered ({e}); console:\n{}", self.console());
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("QEMU's port socket {}: {e}", sock.display()),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
        let mut seen = Vec::new();
        while !seen.ends_with(HELLO) {
            let mut byte = [0u8];
            match stream.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                other => panic!("no hello line from the agent ({other:?}; read {:?}); console:\n{}", String::from_utf8_lossy(&seen), self.console()),
            }
        }
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut conn = Connection::unix(stream).unwrap();
        client_handshake(&mut conn, "vm-boot-test").unwrap_or_else(|e| panic!("handshake: {e}; console:\n{}", self.console()));
        conn
    }

    /// Waits for QEMU to exit by itself within `patience`; panics with the console otherwise.
    fn wait_exit(&mut self, patience: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < patience {
            if self.qemu.try_wait().unwrap().is_some() {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("QEMU still runs {} s on; console:\n{}", patience.as_secs(), self.console());
    }
}

fn status(conn: &mut Connection<UnixStream, UnixStream>) {
    match conn.call(&Request::Status, |_| {}).unwrap() {
        Response::Status { .. } => {}
        other => panic!("Status answered {other:?}"),
    }
}

/// One boot for everything a running VM must do: hello and handshake on its port, `Status`,
/// the command line's hostname, a second connection after the first closed, two ports served
/// at once, its address answering inside the test's namespace, the root grown to its disk,
/// and `PowerOff` ending QEMU with a clean root.
#[test]
fn vm_boots_serves_its_port_answers_on_its_address_and_powers_off_clean() {
    let dir = tempfile::tempdir().unwrap();
    let img = build_root(dir.path(), "flotilla-root");
    let blocks = |img: &Path| -> u64 {
        let out = Command::new("dumpe2fs").arg("-h").arg(img).output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        out.lines().find_map(|l| l.strip_prefix("Block count:")).and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("{out}"))
    };
    let before = blocks(&img);
    // The disk is larger than the filesystem on it, as when platform.diskSize exceeds the image.
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(256 << 20).unwrap();
    let ns = format!("flvm-{}", std::process::id());
    let started = Instant::now();
    let mut vm = Vm::boot(dir, "root=LABEL=flotilla-root flotilla.hostname=web1 flotilla.ip=10.250.0.2/24 flotilla.gateway=10.250.0.1", None, Some(&ns));
    let mut conn = vm.connect();
    eprintln!("agent answered {:.1} s after QEMU started", started.elapsed().as_secs_f64());
    status(&mut conn);
    assert!(vm.console().contains("flotilla-agent: this machine is web1"), "console:\n{}", vm.console());
    conn.goodbye().unwrap();
    // The port is reopened for the next client.
    let mut conn = vm.connect();
    status(&mut conn);
    // Each port has its own thread: a second deployer is served while the first holds a0.
    let mut other = vm.connect_port("a1");
    status(&mut other);
    status(&mut conn);
    let ping = Command::new("ip").args(["netns", "exec", &ns, "busybox", "ping", "-c", "1", "-W", "5", "10.250.0.2"]).output().unwrap();
    assert!(ping.status.success(), "the guest does not answer at 10.250.0.2: {}{}\nconsole:\n{}", String::from_utf8_lossy(&ping.stdout), String::from_utf8_lossy(&ping.stderr), vm.console());
    match conn.call(&Request::PowerOff, |_| {}).unwrap() {
        Response::PoweringOff => {}
        other => panic!("PowerOff answered {other:?}"),
    }
    let took = vm.wait_exit(Duration::from_secs(15));
    eprintln!("QEMU exited {:.1} s after PowerOff", took.as_secs_f64());
    let fsck = Command::new("e2fsck").args(["-f", "-n"]).arg(vm.dir.path().join("root.img")).output().unwrap();
    assert!(fsck.status.success(), "the root is not clean after power off: {}", String::from_utf8_lossy(&fsck.stdout));
    let state = Command::new("dumpe2fs").arg("-h").arg(vm.dir.path().join("root.img")).output().unwrap();
    let state = String::from_utf8_lossy(&state.stdout);
    let after = blocks(&vm.dir.path().join("root.img"));
    assert!(after > before, "the root was not grown to its disk: {before} blocks before, {after} after; console:\n{}", vm.console());
    assert!(state.lines().any(|l| l.starts_with("Filesystem state:") && l.trim_end().ends_with(" clean")), "{state}");
    // A journal left to replay means the root was still mounted read-write at power off.
    assert!(state.lines().any(|l| l.starts_with("Filesystem features:") && !l.contains("needs_recovery")), "{state}");
}

/// Stage 1 that cannot find its root says why on the console and powers off; nothing hangs.
#[test]
fn vm_without_its_root_says_so_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    build_root(dir.path(), "flotilla-root");
    let mut vm = Vm::boot(dir, "root=LABEL=no-such-root", None, None);
    vm.wait_exit(Duration::from_secs(60));
    let console = vm.console();
    assert!(console.contains("flotilla stage1: no root filesystem labelled \"no-such-root\""), "console:\n{console}");
}

/// A NoCloud seed (vfat, label CIDATA) names the machine when the command line does not.
#[test]
fn vm_takes_its_hostname_from_a_nocloud_seed() {
    let dir = tempfile::tempdir().unwrap();
    build_root(dir.path(), "flotilla-root");
    let seed = dir.path().join("seed.img");
    std::fs::write(dir.path().join("meta-data"), "instance-id: i-1\nlocal-hostname: seeded\n").unwrap();
    run(Command::new("mkfs.vfat").args(["-n", "CIDATA", "-C"]).arg(&seed).arg("1024"));
    run(Command::new("mcopy").arg("-i").arg(&seed).arg(dir.path().join("meta-data")).arg("::meta-data"));
    let mut vm = Vm::boot(dir, "root=LABEL=flotilla-root", Some(&seed), None);
    let mut conn = vm.connect();
    status(&mut conn);
    assert!(vm.console().contains("flotilla-agent: this machine is seeded"), "console:\n{}", vm.console());
    match conn.call(&Request::PowerOff, |_| {}).unwrap() {
        Response::PoweringOff => {}
        other => panic!("PowerOff answered {other:?}"),
    }
    vm.wait_exit(Duration::from_secs(15));
}

/// An agent that is not a VM's init refuses `PowerOff` and goes on serving.
#[test]
fn power_off_is_refused_outside_a_vm() {
    let machine = common::Machine::new();
    machine.start();
    let mut conn = Connection::unix(UnixStream::connect(machine.socket()).unwrap()).unwrap();
    client_handshake(&mut conn, "vm-boot-test").unwrap();
    match conn.call(&Request::PowerOff, |_| {}) {
        Err(flotilla_protocol::ProtocolError::Agent { kind: ErrorKind::Unsupported, message }) => {
            assert!(message.contains("only a VM's agent powers its machine off"), "{message}")
        }
        other => panic!("PowerOff outside a VM answered {other:?}"),
    }
    status(&mut conn);
}
