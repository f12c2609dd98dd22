//! Runs the real `flotilla` binary against a private state DB, with the repository's demo
//! package set as `<nixpkgs>` and substituters off (this machine has no binary cache).

#![allow(dead_code)]

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
        assert!(ok, "prerequisite missing: {what}; run scripts/setup.sh");
    }
    assert!(
        Path::new("/usr/bin/busybox").exists() || Path::new("/bin/busybox").exists(),
        "prerequisite missing: a static busybox (Debian: busybox-static); run scripts/setup.sh"
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

/// A TCP port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET http://127.0.0.1:port/ → body, retrying while the server starts.
pub fn http_get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    for _ in 0..100 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            if s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").is_ok() {
                let mut buf = String::new();
                if s.read_to_string(&mut buf).is_ok() && buf.starts_with("HTTP/1") {
                    return buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}

/// Whether a process exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true)
}
