//! Runs the built `flotilla-agent` on temporary directories standing for machine roots, as a
//! deployer would over ssh: by its subcommands, reading their output and exit status.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The agent binary under test.
pub fn agent_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_flotilla-agent"))
}

/// A finished run of the agent.
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
    #[track_caller]
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(self.code(), code, "expected exit status {code}\nstdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr());
        self
    }
}

/// `flotilla-agent ARGS`, run with `bin`.
pub fn run_with(bin: &Path, args: &[&str]) -> Run {
    Run(Command::new(bin).args(args).output().expect("the agent runs"))
}

/// A machine root in a temporary directory; an agent started on it is stopped when dropped,
/// so a failing test leaves no daemon behind.
pub struct Machine {
    pub dir: tempfile::TempDir,
}

impl Machine {
    pub fn new() -> Machine {
        Machine { dir: tempfile::tempdir().unwrap() }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel.trim_start_matches('/'))
    }

    /// `flotilla-agent COMMAND --root ROOT ARGS`.
    pub fn run(&self, command: &str, args: &[&str]) -> Run {
        self.run_bin(agent_bin(), command, args)
    }

    pub fn run_bin(&self, bin: &Path, command: &str, args: &[&str]) -> Run {
        let root = self.root().to_str().unwrap();
        let mut all = vec![command, "--root", root];
        all.extend_from_slice(args);
        run_with(bin, &all)
    }

    /// Starts a detached agent and returns its pid.
    pub fn start(&self) -> u32 {
        let out = self.run("init", &["--detach"]).expect(0).stdout();
        out.trim().strip_prefix("started ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("not `started PID`: {out:?}"))
    }

    pub fn socket(&self) -> PathBuf {
        self.path("/run/flotilla/agent.sock")
    }

    pub fn answers(&self) -> bool {
        std::os::unix::net::UnixStream::connect(self.socket()).is_ok()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.path("/run/flotilla/agent.pid").exists() {
            let _ = self.run("stop", &["--timeout", "10"]);
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z'))
}

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`.
pub fn stat_field(pid: &str, n: usize) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s[s.rfind(')').unwrap() + 1..].split_whitespace().nth(n - 3).unwrap().to_owned()
}

/// Waits up to `timeout` for `cond`.
#[track_caller]
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
