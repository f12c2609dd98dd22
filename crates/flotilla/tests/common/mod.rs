//! Runs the real `flotilla` binary against a private state DB, with the repository's demo
//! package set as `<nixpkgs>` and substituters off (this machine has no binary cache).

#![allow(dead_code)]

pub mod sshhost;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Fails loudly when something the tests need is not installed: they never skip.
pub fn require_prerequisites() {
    for (what, path) in [("nix-instantiate (Debian: nix-bin)", "nix-instantiate"), ("nix-store (Debian: nix-bin)", "nix-store")] {
        let ok = Command::new(path).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok, "prerequisite missing: {what}; run scripts/install-deps.sh");
    }
    assert!(
        Path::new("/usr/bin/busybox").exists() || Path::new("/bin/busybox").exists(),
        "prerequisite missing: a static busybox (Debian: busybox-static); run scripts/install-deps.sh"
    );
    let agent = Path::new(env!("CARGO_BIN_EXE_flotilla")).with_file_name("flotilla-agent");
    assert!(agent.exists(), "the agent binary {} is missing: build the workspace (cargo build --workspace) first", agent.display());
}

/// A flotilla with its own state directory.
pub struct Fl {
    pub dir: tempfile::TempDir,
}

impl Fl {
    pub fn new() -> Fl {
        require_prerequisites();
        Fl { dir: tempfile::tempdir().unwrap() }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state/state.db")
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        c.env("FLOTILLA_STATE", self.state())
            .env("FLOTILLA_SUBSTITUTERS", "")
            .env_remove("FLOTILLA_AGENT")
            .env_remove("FLOTILLA_NIX_LIB")
            .arg("-I")
            .arg(format!("nixpkgs={}", repo().join("nix/demo-pkgs.nix").display()))
            .current_dir(repo());
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let out = self.cmd().args(args).output().expect("flotilla runs");
        Run(out)
    }

    /// Writes a deployment file into the test's directory and returns its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    }
}

/// A finished run.
pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.0.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout(), self.stderr()))
    }
    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code(), 0, "expected success\nstdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr());
        self
    }
}

/// The agent binary beside the flotilla binary.
pub fn agent_bin() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_flotilla")).with_file_name("flotilla-agent")
}

/// A running `flotilla-agent init --root DIR`; stopped (SIGTERM, then SIGKILL) when dropped,
/// so a failing test leaves no process behind.
pub struct RunningAgent {
    pub child: std::process::Child,
    pub root: PathBuf,
}

impl RunningAgent {
    pub fn start(root: &Path) -> RunningAgent {
        std::fs::create_dir_all(root).unwrap();
        let log = std::fs::File::create(root.with_extension("agent.log")).unwrap();
        let child = Command::new(agent_bin())
            .arg("init")
            .arg("--root")
            .arg(root)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("agent starts");
        let sock = root.join("run/flotilla/agent.sock");
        let start = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(start.elapsed().as_secs() < 10, "the agent did not open {}", sock.display());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        RunningAgent { child, root: root.to_owned() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        self.child.wait().unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A TCP port on 127.0.0.1 that no other test gets, in this process or in any other flotilla
/// test process on this machine, and that nothing listened on when it was handed out.
///
/// Not a port 0 bind let go at once: the kernel hands the same port to the next caller of
/// port 0 or to an outgoing connection, so a service could find it taken, and a "nothing
/// answers any more" check could reach another test's listener. Ports come from
/// [`TEST_PORTS`], below Linux's ephemeral range (32768-60999, where port 0 and outgoing
/// connections get theirs), and one is taken by binding the abstract unix socket
/// `flotilla-test-port-<port>` and keeping it for the rest of this process's life: only one
/// process can hold the name, so every other test process skips the port, and the name is
/// freed with the process however it ends (no lock file to clean up or to plant a link at).
pub fn free_port() -> u16 {
    static HELD: std::sync::Mutex<Vec<std::os::unix::net::UnixListener>> = std::sync::Mutex::new(Vec::new());
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    // Processes started together begin at different places, so they rarely contend.
    let first = std::process::id().wrapping_mul(7919) % span;
    for i in 0..span {
        let port = TEST_PORTS.start + ((first + i) % span) as u16;
        let Ok(claim) = std::os::unix::net::UnixListener::bind_addr(&port_claim(port)) else {
            continue; // another test process has it
        };
        // Something that is not a flotilla test may listen there.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        held.push(claim);
        return port;
    }
    panic!("no free test port in {TEST_PORTS:?}: every one is claimed by a test process or listened on");
}

/// The abstract unix socket address whose holder has claimed test port `port`.
pub fn port_claim(port: u16) -> std::os::unix::net::SocketAddr {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(format!("flotilla-test-port-{port}")).unwrap()
}

/// The ports [`free_port`] hands out; the agent crate's tests take theirs from the same
/// range with the same claims.
pub const TEST_PORTS: std::ops::Range<u16> = 20000..30000;

/// GET http://127.0.0.1:port/ → body, retrying while the server starts (for up to 30 s,
/// which only a server that never answers uses up).
pub fn http_get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
            if s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").is_ok() {
                let mut buf = String::new();
                if s.read_to_string(&mut buf).is_ok() && buf.starts_with("HTTP/1") {
                    return buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
                }
            }
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Whether a process exists (and is no zombie).
#[allow(unused_imports)] // not every test file uses it
pub use flotilla_proc::alive;

/// Fails loudly unless this process can make containers: root, `ip` and `nsenter`.
pub fn require_container_prerequisites() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:").map(|r| r.split_whitespace().next().unwrap_or("").to_owned()))
        .unwrap_or_default();
    assert_eq!(uid, "0", "prerequisite missing: the container tests run as root (they make namespaces, veths and bridges)");
    for (what, argv) in [("ip (Debian: iproute2)", ["ip", "-V"]), ("nsenter (Debian: util-linux)", ["nsenter", "--version"]), ("curl", ["curl", "--version"])] {
        let ok = Command::new(argv[0]).arg(argv[1]).output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok, "prerequisite missing: {what}; run scripts/install-deps.sh");
    }
}

/// A flotilla whose every command runs inside a network namespace of the test's own, so
/// the deployment's bridge and veths never touch the host's network. Dropping it destroys
/// the deployment, and then, whatever state that left, kills the containers' processes,
/// deletes their network namespaces and the test's own: a failing test leaves nothing.
pub struct Fleet {
    pub fl: Fl,
    pub ns: String,
}

static NEXT_NS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Fleet {
    pub fn new() -> Fleet {
        require_container_prerequisites();
        let fl = Fl::new();
        let ns = format!("fltest-{}-{}", std::process::id(), NEXT_NS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let made = Command::new("ip").args(["netns", "add", &ns]).status().unwrap();
        assert!(made.success(), "cannot create the test's network namespace {ns}");
        let fleet = Fleet { fl, ns };
        fleet.host(&["ip", "link", "set", "lo", "up"]);
        fleet
    }

    /// `flotilla ARGS` inside the test's namespace.
    pub fn cmd(&self) -> Command {
        let inner = self.fl.cmd();
        let mut c = self.in_ns();
        c.arg(inner.get_program()).args(inner.get_args()).current_dir(repo());
        for (k, v) in inner.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run(self.cmd().args(args).output().expect("flotilla runs"))
    }

    /// `flotilla ARGS` in the test's namespace as one shell word list, for `script -c`.
    pub fn cmd_line(&self, args: &[&str]) -> String {
        let c = self.cmd();
        let words = std::iter::once(c.get_program()).chain(c.get_args()).map(|w| w.to_string_lossy().into_owned()).chain(args.iter().map(|a| (*a).to_owned()));
        words.map(|w| format!("'{}'", w.replace('\'', "'\\''"))).collect::<Vec<_>>().join(" ")
    }

    /// `command` with the environment flotilla's commands get.
    pub fn fl_env(&self, mut command: Command) -> Command {
        for (k, v) in self.fl.cmd().get_envs() {
            match v {
                Some(v) => command.env(k, v),
                None => command.env_remove(k),
            };
        }
        command.current_dir(repo());
        command
    }

    /// A command on the "host": inside the test's namespace, where the bridge is.
    pub fn host(&self, argv: &[&str]) -> Run {
        Run(self.in_ns().args(argv).output().expect("nsenter runs"))
    }

    /// A command on the "host" side, to spawn.
    pub fn in_ns_command(&self, argv: &[&str]) -> Command {
        let mut c = self.in_ns();
        c.args(argv).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        c
    }

    /// `nsenter` into the test's network namespace only. Not `ip netns exec`: that also makes
    /// a mount namespace of its own, a slave of the host's, so the named network namespaces
    /// flotilla makes inside it would not be visible to the next command.
    fn in_ns(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns)).arg("--");
        c
    }

    /// GET `url` from the host side with curl; `None` when nothing answers. (Not the host's
    /// static busybox wget: with the host's /etc/nsswitch.conf it crashes in glibc's NSS.)
    pub fn http_get(&self, url: &str) -> Option<String> {
        for _ in 0..50 {
            let r = self.host(&["curl", "-sSf", "--max-time", "3", url]);
            if r.code() == 0 {
                return Some(r.stdout());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        None
    }

    /// `flotilla deploy --json ARGS`: the exit status, the final report (the last line of
    /// stdout), and everything it printed (the events and stderr), for messages.
    pub fn deploy_json(&self, args: &[&str]) -> (i32, serde_json::Value, String) {
        let r = self.run(&[&["deploy", "--json"], args].concat());
        let out = r.stdout();
        let last = out.lines().last().unwrap_or_else(|| panic!("deploy printed nothing\nstderr:\n{}", r.stderr()));
        let report = serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not the report ({e}): {last}\nstderr:\n{}", r.stderr()));
        (r.code(), report, format!("{out}\n{}", r.stderr()))
    }

    /// Each machine's `info --json` record. Panics when the output has no `machines` list:
    /// an empty answer must mean no machines, never a renamed key.
    pub fn info(&self, file: &str) -> Vec<serde_json::Value> {
        let j = self.run(&["info", "-f", file, "--json"]).ok().json();
        j["machines"].as_array().cloned().unwrap_or_else(|| panic!("`info --json` has no \"machines\" list:\n{j:#}"))
    }

    /// A machine's info record.
    pub fn machine(&self, file: &str, name: &str) -> serde_json::Value {
        self.info(file).into_iter().find(|m| m["machine"] == name).unwrap_or_else(|| panic!("no machine {name} in info"))
    }

    /// Every resource the machines of this test's state hold, from their data directories.
    fn leftovers(&self) -> (Vec<(i32, u64)>, Vec<String>) {
        let mut pids = Vec::new();
        let mut netns = Vec::new();
        let machines = self.fl.dir.path().join("state/machines");
        for dep in std::fs::read_dir(&machines).into_iter().flatten().flatten() {
            for m in std::fs::read_dir(dep.path()).into_iter().flatten().flatten() {
                if let Ok(text) = std::fs::read_to_string(m.path().join("pid.json")) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                        // The container's init, named by pid and start time: killing it ends the
                        // container; a pid alone may be another process's by now.
                        if let (Some(pid), Some(start)) = (v["init"].as_i64(), v["init_start_time"].as_u64()) {
                            pids.push((pid as i32, start));
                        }
                    }
                }
            }
        }
        // The machines' namespaces are named after a hash of this state DB's path; find
        // them through the containers' names as info reports them.
        if let Ok(out) = self.cmd().args(["info", "--json"]).output() {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                for m in v["machines"].as_array().into_iter().flatten() {
                    netns.extend(m["resources"]["netns"].as_str().map(str::to_owned));
                }
            }
        }
        (pids, netns)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let (pids, netns) = self.leftovers();
        let _ = self.cmd().args(["destroy", "--yes"]).output();
        for (pid, _) in pids.iter().filter(|(p, s)| start_time(*p as u32) == Some(*s)) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        for ns in netns.iter().filter(|n| Path::new("/run/netns").join(n).exists()) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A child process killed and reaped when dropped, so a failing test leaves none behind.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process's start time (field 22 of its stat), `None` when it is gone or a zombie: the
/// reader the deployer and the agent use.
#[allow(unused_imports)] // not every test file uses it
pub use flotilla_proc::start_time;

/// The example deployment file.
pub fn example() -> String {
    repo().join("examples/webfleet/deployment.nix").to_string_lossy().into_owned()
}

/// A machine's row of a deploy report.
pub fn row<'a>(report: &'a serde_json::Value, machine: &str) -> &'a serde_json::Value {
    report["machines"].as_array().unwrap().iter().find(|m| m["machine"] == machine).unwrap_or_else(|| panic!("no row for {machine} in {report:#}"))
}

/// A deployment `name` of one machine `web`: busybox's httpd on port 80 serving `page`, with
/// an http health check; `extra` is added to the machine's settings.
pub fn web_deployment(name: &str, page: &str, extra: &str) -> String {
    format!(
        r#"{{ meta.name = "{name}"; machines.web = {{ pkgs, ... }}: let
    site = pkgs.runCommand "site" {{}} ''
      mkdir $out
      echo '{page}' > $out/index.html
    '';
  in {{
    packages = [ pkgs.busybox ];
    binsh = "${{pkgs.busybox}}/bin/sh";
    services.httpd = {{
      command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "80" "-h" "${{site}}" ];
      healthCheck = {{ http = "http://127.0.0.1/"; interval = 1; retries = 3; timeout = 2; }};
    }};
    {extra}
  }}; }}
"#
    )
}

/// Compares `actual` with the golden file `golden`. With `FLOTILLA_BLESS` set it writes
/// `actual` there instead and fails, so a blessing run never counts as a pass: rerun without
/// it (and review the diff) to see the tests pass.
#[track_caller]
pub fn check_golden(golden: &Path, actual: &str, regenerate: &str) {
    check_golden_with(golden, actual, regenerate, std::env::var_os("FLOTILLA_BLESS").is_some())
}

/// [`check_golden`] with the blessing decided by the caller (its own tests cannot set the
/// environment of a process whose other tests run in parallel).
#[track_caller]
pub fn check_golden_with(golden: &Path, actual: &str, regenerate: &str, bless: bool) {
    if bless {
        std::fs::write(golden, actual).unwrap_or_else(|e| panic!("cannot bless {}: {e}", golden.display()));
        panic!("blessed {}: FLOTILLA_BLESS wrote it and proves nothing; review `git diff` and rerun without FLOTILLA_BLESS", golden.display());
    }
    let expected = std::fs::read_to_string(golden).unwrap_or_else(|e| panic!("cannot read the golden file {} ({e}); {regenerate}", golden.display()));
    assert!(actual == expected, "{} differs from what the test produced; if the change is intended, {regenerate}\n--- expected\n{expected}\n--- actual\n{actual}", golden.display());
}

/// `bytes` random bytes from the kernel, as hex: a name no earlier run can have used.
pub fn random_hex(bytes: usize) -> String {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).expect("/dev/urandom is readable");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The processes listening on TCP port `port` of 127.0.0.1 (or of every address) in this
/// network namespace: whose socket it is, from /proc/net/tcp and each process's descriptors,
/// so that a test can tell its own service from anyone else's.
pub fn listeners(port: u16) -> Vec<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp is readable");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (addr, p) = f.get(1)?.split_once(':')?;
            let listening = f.get(3) == Some(&"0A");
            let ours = u16::from_str_radix(p, 16).ok() == Some(port) && (addr == "0100007F" || addr == "00000000");
            let inode = f.get(9)?;
            (listening && ours).then(|| format!("socket:[{inode}]"))
        })
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str())))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// This host's name (`/proc/sys/kernel/hostname`).
#[allow(dead_code)]
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned()
}

/// This host as flotilla records it (a lock's holder, the deployer host of a local machine): its
/// hostname and the first 12 digits of `/etc/machine-id`, or the hostname alone on a host
/// without one (flotilla's own fallback).
#[allow(dead_code)]
pub fn this_host() -> String {
    host_named(&hostname())
}

/// A host named `name` with this machine's machine id, as flotilla records it.
#[allow(dead_code)]
pub fn host_named(name: &str) -> String {
    match std::fs::read_to_string("/etc/machine-id").ok().map(|id| id.trim().to_owned()).filter(|id| !id.is_empty()) {
        Some(id) => format!("{name} ({})", id.get(..12).unwrap_or(&id)),
        None => name.to_owned(),
    }
}
