//! A transfer killed half-way (SIGKILL to the agent) never leaves a path that looks valid, and
//! the next push completes it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Fl, RunningAgent};

/// Every registered path on the machine is complete: its NAR hash matches its registration.
fn assert_registry_sound(root: &Path) -> usize {
    let db = root.join("nix/var/flotilla/db");
    let mut n = 0;
    for e in std::fs::read_dir(&db).unwrap().flatten() {
        let reg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap();
        let path = root.join("nix/store").join(e.file_name());
        let digest = flotilla_store::hash_path(&path).unwrap_or_else(|err| panic!("registered {} cannot be read: {err}", path.display()));
        assert_eq!(reg["narHash"].as_str().unwrap(), digest.hash.to_string(), "registered {} is not what was announced", path.display());
        assert_eq!(reg["narSize"].as_u64().unwrap(), digest.size);
        n += 1;
    }
    n
}

#[test]
fn killing_the_agent_mid_transfer_leaves_nothing_valid_that_is_incomplete() {
    let fl = Fl::new();
    let root = fl.dir.path().join("machine");
    let file = fl.file(
        "big.nix",
        r#"{
  meta.name = "bigcopy";
  machines.box = { pkgs, ... }: {
    packages = [ pkgs.busybox (pkgs.runCommand "blob" { } "mkdir -p $out/share; head -c 200000000 /dev/urandom > $out/share/blob") ];
  };
}"#,
    );
    // Build first, so the transfer is what takes time.
    fl.run(&["build", "-f", &file]).ok();

    let mut agent = RunningAgent::start(&root);
    let mut push = fl
        .cmd()
        .args(["debug", "push-to-root", root.to_str().unwrap(), "-f", &file, "--machine", "box", "--goal", "copy"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the big path is being unpacked, then kill the agent without warning.
    let store = root.join("nix/store");
    let start = Instant::now();
    loop {
        let partial = std::fs::read_dir(&store)
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains("-blob")))
            .unwrap_or(false);
        if partial {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the transfer never reached the blob");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    agent.kill();
    let status = push.wait().unwrap();
    assert!(!status.success(), "the push must fail when its agent dies");

    // Nothing incomplete is registered; the blob in particular is not valid.
    assert_registry_sound(&root);
    let blob_registered = std::fs::read_dir(root.join("nix/var/flotilla/db")).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with("-blob"));
    assert!(!blob_registered, "a half-received path was registered as valid");

    // A new agent cleans up and the next push completes.
    let _agent = RunningAgent::start(&root);
    let leftovers: Vec<_> = std::fs::read_dir(&store).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with(".flotilla-partial-")).collect();
    assert!(leftovers.is_empty(), "partial unpacks left behind: {leftovers:?}");
    let again = fl.run(&["debug", "push-to-root", root.to_str().unwrap(), "-f", &file, "--machine", "box", "--goal", "copy", "--json"]).ok().json();
    assert!(again["copy"]["paths_sent"].as_u64().unwrap() >= 1, "{again}");
    let n = assert_registry_sound(&root);
    assert_eq!(n as u64, again["copy"]["closure_paths"].as_u64().unwrap(), "every path of the closure is valid now");
}
