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
