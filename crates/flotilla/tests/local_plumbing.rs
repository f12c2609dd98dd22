//! The local platform's own plumbing (issue 13, items 4 and 10): a release that cuts its
//! machine off the deployment's bridge is not confirmed and is rolled back, and whatever
//! downed a machine's link or killed its container monitor (and with it its port forwards),
//! `start`, `reboot` and `deploy` put it back; `info` says what is wrong meanwhile. Real
//! containers, real Nix, the real agent, in a network namespace of the test's own.

mod common;

use std::process::Command;

use common::{row, Fleet};

/// A web server serving `page` on port 80, forwarded from the host's 127.0.0.1:`port`;
/// `extra` is added to the machine's settings.
fn web(page: &str, port: u16, extra: &str) -> String {
    common::web_deployment("plumb", page, &format!("platform.forwardPorts = [ {{ host = {port}; guest = 80; }} ];\n    {extra}"))
}

/// A service that takes the machine off its network as soon as it starts; its own health
/// check (inside the machine) still passes.
const CUT_OFF: &str = r#"services.cutoff = {
      script = "ip link set eth0 down; sleep 1000000";
      environment.PATH = "${pkgs.busybox}/bin";
    };"#;

fn ip(f: &Fleet, file: &str) -> String {
    f.machine(file, "web")["ip"].as_str().unwrap().to_owned()
}

/// The page at the machine's address on the bridge, asked once (a few seconds at most).
fn page_over_bridge(f: &Fleet, ip: &str) -> Option<String> {
    let r = f.host(&["curl", "-sSf", "--max-time", "3", &format!("http://{ip}/")]);
    (r.code() == 0).then(|| r.stdout().trim().to_owned())
}

fn netns(f: &Fleet, file: &str) -> String {
    f.machine(file, "web")["resources"]["netns"].as_str().unwrap().to_owned()
}

/// Downs the machine's eth0 from outside, as an operator or a rogue process would.
fn down_eth0(netns: &str) {
    let s = Command::new("ip").args(["-n", netns, "link", "set", "eth0", "down"]).status().unwrap();
    assert!(s.success(), "cannot down eth0 in {netns}");
}

fn current_generation(f: &Fleet, file: &str) -> u64 {
    let gens = f.run(&["generations", "-f", file, "web", "--json"]).ok().json();
    gens.as_array().unwrap().iter().find(|g| g["current"] == true).and_then(|g| g["number"].as_u64()).unwrap_or_else(|| panic!("no current generation: {gens}"))
}

#[test]
fn a_release_that_cuts_its_machine_off_the_bridge_is_rolled_back_and_its_link_restored() {
    let f = Fleet::new();
    let port = common::free_port();
    let file = f.fl.file("plumb.nix", &web("v1", port, ""));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    let ip = ip(&f, &file);
    assert_eq!(page_over_bridge(&f, &ip).as_deref(), Some("v1"));

    // v2 downs eth0: the agent's health check inside passes and its socket still answers
    // through the machine's root, but the machine no longer answers on the bridge.
    f.fl.file("plumb.nix", &web("v2", port, CUT_OFF));
    let (code, report, out) = f.deploy_json(&["-f", &file, "--confirm-timeout", "60"]);
    assert_eq!(code, 1, "a deploy that cut its machine off must fail\n{out}");
    let web = row(&report, "web");
    assert_eq!(web["outcome"], "rolled-back", "{report:#}");
    let why = web["error"].as_str().unwrap_or_default();
    assert!(why.contains("not reachable") && why.contains(&ip), "{report:#}");
    assert!(why.contains("its eth0 is down"), "the restored link is said: {report:#}");
    assert_eq!(current_generation(&f, &file), 1);
    assert_eq!(page_over_bridge(&f, &ip).as_deref(), Some("v1"), "the link is back up after the rollback");
    let m = f.machine(&file, "web");
    assert!(!m["problems"].to_string().contains("eth0"), "{m:#}");
}

#[test]
fn start_reboot_and_deploy_bring_a_downed_link_back_up() {
    let f = Fleet::new();
    let port = common::free_port();
    let file = f.fl.file("plumb.nix", &web("v1", port, ""));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    let (ip, ns) = (ip(&f, &file), netns(&f, &file));
    assert_eq!(page_over_bridge(&f, &ip).as_deref(), Some("v1"));

    for (what, args) in [("start", vec!["start", "-f", &file]), ("reboot", vec!["reboot", "-f", &file]), ("deploy", vec!["deploy", "-f", &file])] {
        down_eth0(&ns);
        assert_eq!(page_over_bridge(&f, &ip), None, "eth0 is down before {what}");
        let m = f.machine(&file, "web");
        let problems = m["problems"].to_string();
        assert!(problems.contains("its eth0 is down"), "info says the link is down before {what}: {m:#}");
        assert_eq!(m["health"], "degraded", "{m:#}");
        f.run(&args).ok();
        assert_eq!(page_over_bridge(&f, &ip).as_deref(), Some("v1"), "{what} brings eth0 back up");
        assert_eq!(f.machine(&file, "web")["problems"].as_array().map(Vec::len), Some(0), "after {what}");
    }
}

#[test]
fn a_dead_container_monitor_is_reported_and_start_and_deploy_restore_its_forwards() {
    let f = Fleet::new();
    let port = common::free_port();
    let file = f.fl.file("plumb.nix", &web("v1", port, ""));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(f.http_get(&url).map(|p| p.trim().to_owned()).as_deref(), Some("v1"));
    let pidfile = f.fl.dir.path().join("state/machines/plumb/web/pid.json");

    for (what, args) in [("start", vec!["start", "-f", &file]), ("deploy", vec!["deploy", "-f", &file])] {
        let pids: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&pidfile).unwrap()).unwrap();
        let monitor = pids["monitor"].as_u64().unwrap() as u32;
        let s = Command::new("kill").args(["-KILL", &monitor.to_string()]).status().unwrap();
        assert!(s.success());
        while common::alive(monitor) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(f.host(&["curl", "-sSf", "--max-time", "3", &url]).code() != 0, "the forward died with its monitor");
        let m = f.machine(&file, "web");
        assert_eq!(m["state"], "running", "{m:#}");
        assert_eq!(m["health"], "degraded", "{m:#}");
        assert!(m["problems"].to_string().contains("monitor is gone, and its port forwards with it"), "{m:#}");

        f.run(&args).ok();
        assert_eq!(f.http_get(&url).map(|p| p.trim().to_owned()).as_deref(), Some("v1"), "{what} restores the forward");
        let m = f.machine(&file, "web");
        assert_eq!(m["health"], "healthy", "after {what}: {m:#}");
        let now: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&pidfile).unwrap()).unwrap();
        assert_ne!(now["monitor"], pids["monitor"], "a new monitor is named in the pidfile");
        assert_eq!(now["init"], pids["init"], "the machine kept running: same init");
    }

    // The adoptive monitor does a monitor's work: a stop ends it and removes the pidfile,
    // and the machine starts again with its forward.
    f.run(&["stop", "-f", &file]).ok();
    assert!(!pidfile.exists());
    f.run(&["start", "-f", &file]).ok();
    assert_eq!(f.http_get(&url).map(|p| p.trim().to_owned()).as_deref(), Some("v1"));
}
