//! Issue 13, item 3: a stopped (SIGSTOP) agent costs its machine a row that says the agent
//! did not answer in time, never the whole run: `info`, `check` and `deploy` finish within a
//! bound, the other machine is handled, and the deployment's lock is released at the end.
//! Real containers, real agents, in the test's own network namespace.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{row, Fleet, Run};

const FILE: &str = r#"{
  meta.name = "deadlines";
  machines.awake = { pkgs, ... }: { packages = [ pkgs.busybox ]; };
  machines.frozen = { pkgs, ... }: { packages = [ pkgs.busybox ]; };
}"#;

/// The agent (the container's init) of `machine`, from the launcher's `pid.json`.
fn agent_pid(f: &Fleet, machine: &str) -> i32 {
    let p = f.fl.dir.path().join("state/machines/deadlines").join(machine).join("pid.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap();
    v["init"].as_i64().unwrap_or_else(|| panic!("no init pid in {v}")) as i32
}

/// Stops a process for the guard's life; continues it when dropped, so the fleet's cleanup
/// can stop the machine.
struct Frozen(i32);

impl Frozen {
    fn new(pid: i32) -> Frozen {
        assert!(Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

/// `flotilla ARGS` with agents given two seconds to answer; the run and how long it took.
/// A run still going after two minutes is killed and fails the test (it would hang forever
/// without deadlines).
fn timed(f: &Fleet, args: &[&str]) -> (Run, Duration) {
    let start = Instant::now();
    let child = f.cmd().env("FLOTILLA_AGENT_TIMEOUT", "2").args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            let out = waiter.join().unwrap();
            panic!("`flotilla {}` hung on the stopped agent (killed after 2 minutes)\nstderr:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (Run(waiter.join().unwrap()), start.elapsed())
}

fn assert_says_no_answer(text: &str, asked: &str) {
    for part in ["the agent of machine frozen did not answer in time", asked, "within 2 s", "flotilla reboot --on frozen"] {
        assert!(text.contains(part), "expected {part:?} in:\n{text}");
    }
}

#[test]
fn a_stopped_agent_is_reported_in_time_and_the_rest_of_the_fleet_goes_on() {
    let f = Fleet::new();
    let file = f.fl.file("deadlines.nix", FILE);
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["machines"].as_array().unwrap().len(), 2);

    let _frozen = Frozen::new(agent_pid(&f, "frozen"));

    // info: its row says the agent did not answer; the other machine is healthy.
    let (r, took) = timed(&f, &["info", "-f", &file, "--json"]);
    assert!(took < Duration::from_secs(20), "info took {took:?}\n{}", r.stderr());
    let info = r.ok().json();
    let machines = info["machines"].as_array().unwrap();
    let by = |n: &str| machines.iter().find(|m| m["machine"] == n).unwrap_or_else(|| panic!("no {n} in {info}")).clone();
    assert_eq!(by("awake")["health"], "healthy", "{info:#}");
    assert_says_no_answer(&by("frozen")["problems"].to_string(), "to shake hands");

    // check: exit 1 for the frozen machine, in time.
    let (r, took) = timed(&f, &["check", "-f", &file]);
    assert!(took < Duration::from_secs(20), "check took {took:?}");
    assert_eq!(r.code(), 1, "{}\n{}", r.stdout(), r.stderr());
    assert_says_no_answer(&format!("{}{}", r.stdout(), r.stderr()), "to shake hands");

    // deploy: exit 1, the frozen machine's row says why, the awake one is deployed.
    for attempt in 0..2 {
        let (r, took) = timed(&f, &["deploy", "-f", &file, "--json"]);
        assert!(took < Duration::from_secs(60), "deploy {attempt} took {took:?}\n{}", r.stderr());
        let all = format!("{}\n{}", r.stdout(), r.stderr());
        // The second run finds no lock left by the first.
        assert!(!all.contains("is locked by"), "deploy {attempt} was refused by a lock:\n{all}");
        assert_eq!(r.code(), 1, "deploy {attempt}:\n{all}");
        let report: serde_json::Value = serde_json::from_str(r.stdout().lines().last().unwrap()).unwrap();
        let frozen = row(&report, "frozen");
        assert_eq!(frozen["outcome"], "failed", "{report:#}");
        assert_says_no_answer(frozen["error"].as_str().unwrap(), "to shake hands");
        let awake = row(&report, "awake");
        assert!(matches!(awake["outcome"].as_str(), Some("deployed" | "unchanged")), "{report:#}");
    }
}

/// Issue 13, item 13: an agent that dies during a copy is said so (its connection closed,
/// what to do), not as "cannot read … from the local store: Broken pipe".
#[test]
fn an_agent_dying_mid_copy_is_said_to_have_closed_the_connection() {
    let fl = common::Fl::new();
    let root = fl.dir.path().join("machine");
    let file = fl.file(
        "big.nix",
        r#"{
  meta.name = "diecopy";
  machines.box = { pkgs, ... }: {
    packages = [ pkgs.busybox (pkgs.runCommand "blob" { } "mkdir -p $out/share; head -c 100000000 /dev/urandom > $out/share/blob") ];
  };
}"#,
    );
    fl.run(&["build", "-f", &file]).ok();
    let mut agent = common::RunningAgent::start(&root);
    let push = fl
        .cmd()
        .args(["debug", "push-to-root", root.to_str().unwrap(), "-f", &file, "--machine", "box", "--goal", "copy"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let store = root.join("nix/store");
    let start = Instant::now();
    while !std::fs::read_dir(&store).map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains("-blob"))).unwrap_or(false) {
        assert!(start.elapsed() < Duration::from_secs(120), "the transfer never reached the blob");
        std::thread::sleep(Duration::from_millis(5));
    }
    agent.kill();
    let out = push.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("closed the connection while it was asked to receive a copy of store paths: it died or was restarted"), "{said}");
    assert!(!said.contains("Broken pipe") && !said.contains("from the local store"), "{said}");
}
