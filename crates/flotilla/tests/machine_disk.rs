//! A machine whose disk cannot take what the deployer sends says so: the error names the
//! machine's disk and the fix, not a bad NAR, and nothing half-written is left in its store.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent_bin, Fl};

/// An agent whose `/nix/store` is a 1 MiB tmpfs, mounted in a mount namespace of its own.
struct SmallDiskAgent {
    child: std::process::Child,
}

impl SmallDiskAgent {
    fn start(root: &std::path::Path) -> SmallDiskAgent {
        let store = root.join("nix/store");
        std::fs::create_dir_all(&store).unwrap();
        let script = format!(
            "mount -t tmpfs -o size=1m flotilla-test-disk '{}' && exec '{}' init --root '{}'",
            store.display(),
            agent_bin().display(),
            root.display()
        );
        let log = std::fs::File::create(root.with_extension("agent.log")).unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare runs (util-linux)");
        let sock = root.join("run/flotilla/agent.sock");
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            let log = std::fs::read_to_string(root.with_extension("agent.log")).unwrap_or_default();
            assert!(start.elapsed() < Duration::from_secs(10), "the agent did not open {}; its log:\n{log}", sock.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        SmallDiskAgent { child }
    }

    /// The machine's store as the agent sees it.
    fn store_entries(&self, root: &std::path::Path) -> Vec<String> {
        let out = Command::new("nsenter")
            .args(["-t", &self.child.id().to_string(), "-m", "ls", "-A"])
            .arg(root.join("nix/store"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
    }
}

impl Drop for SmallDiskAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_full_machine_disk_is_said_and_leaves_no_partial_path() {
    common::require_prerequisites();
    let fl = Fl::new();
    let root = fl.dir.path().join("machine");
    let agent = SmallDiskAgent::start(&root);
    // busybox alone is about 2 MiB: it cannot fit.
    let file = fl.file("d.nix", r#"{ meta.name = "small"; machines.box = { pkgs, ... }: { packages = [ pkgs.busybox ]; }; }"#);
    let run = fl.run(&["debug", "push-to-root", root.to_str().unwrap(), "-f", &file, "--machine", "box", "--goal", "copy"]);
    assert_ne!(run.code(), 0, "the copy cannot have succeeded\n{}", run.stdout());
    let said = run.stderr();
    assert!(said.contains("this machine's disk is full:"), "{said}");
    assert!(said.contains("free space on the machine, or give it a bigger disk, and deploy again"), "{said}");
    assert!(!said.contains("bad NAR") && !said.to_lowercase().contains("integrity"), "a full disk is not a bad NAR: {said}");
    let leftovers: Vec<String> = agent.store_entries(&root).into_iter().filter(|e| e.starts_with('.')).collect();
    assert!(leftovers.is_empty(), "partial paths left in the machine's store: {leftovers:?}");
}
