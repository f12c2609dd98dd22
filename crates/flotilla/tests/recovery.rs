//! A confirmed bad release must not leave its machine beyond the deployer's reach (issue 13,
//! item 5): the agent keeps its own socket when a service removes it. Real containers, real
//! Nix, the real agent, in a network namespace of the test's own.

mod common;

use std::time::{Duration, Instant};

use common::{row, Fleet};

/// A web server serving `page`; `extra` is added to the machine's settings.
fn web(page: &str, extra: &str) -> String {
    common::web_deployment("rec", page, extra)
}

/// A service that removes the agent's socket a moment after the deploy was confirmed, and
/// again whenever it has been put back, for a while.
const SOCKET_EATER: &str = r#"services.eater = {
      script = "sleep 12; i=0; while [ $i -lt 40 ]; do rm -f /run/flotilla/agent.sock; i=$((i+1)); sleep 0.2; done; touch /run/eater-done; sleep 1000000";
      environment.PATH = "${pkgs.busybox}/bin";
    };"#;

#[test]
fn the_agent_recreates_its_socket_when_a_service_removes_it() {
    let f = Fleet::new();
    let file = f.fl.file("rec.nix", &web("v1", ""));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");

    let init = f.machine(&file, "web")["resources"]["init_pid"].as_str().unwrap().to_owned();
    let sockets = || {
        std::fs::read_dir(format!("/proc/{init}/fd")).unwrap().flatten().filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))).count()
    };
    let before = sockets();

    f.fl.file("rec.nix", &web("v2", SOCKET_EATER));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "web")["generation"], 2);

    // Wait until the service is done removing the socket.
    let start = Instant::now();
    while f.run(&["exec", "web", "--", "test", "-e", "/run/eater-done"]).code() != 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the socket eater never finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2)); // the agent's next look at its socket
    // Each listener it replaced was closed: the agent holds no more sockets than before.
    assert!(sockets() <= before, "the agent's sockets went from {before} to {}", sockets());

    let m = f.machine(&file, "web");
    assert_eq!(m["generation"], 2, "the agent answers again: {m:#}");
    assert!(!m["problems"].to_string().contains("unreachable"), "{m:#}");
    f.fl.file("rec.nix", &web("v3", ""));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "a deploy reaches the agent again\n{out}");
    assert_eq!(row(&report, "web")["generation"], 3);
    f.run(&["reboot", "-f", &file]).ok();
    assert_eq!(f.machine(&file, "web")["generation"], 3);
}

/// The page a machine serves on its address, fetched inside the test's namespace.
fn page(f: &Fleet, file: &str) -> Option<String> {
    let ip = f.machine(file, "web")["ip"].as_str().unwrap().to_owned();
    f.http_get(&format!("http://{ip}/")).map(|p| p.trim().to_owned())
}

#[test]
fn a_stopped_machine_is_rolled_back_and_started_on_a_generation_from_outside() {
    let f = Fleet::new();
    let file = f.fl.file("rec.nix", &web("v1", ""));
    assert_eq!(f.deploy_json(&["-f", &file]).0, 0);
    f.fl.file("rec.nix", &web("v2", ""));
    assert_eq!(f.deploy_json(&["-f", &file]).0, 0);
    assert_eq!(page(&f, &file).as_deref(), Some("v2"));

    // Stopped, its agent cannot be asked: the profile is switched from outside.
    f.run(&["stop", "-f", &file]).ok();
    let rb = f.run(&["rollback", "-f", &file, "--json"]).ok().json();
    assert_eq!(rb[0]["from"], 2, "{rb}");
    assert_eq!(rb[0]["to"], 1, "{rb}");
    assert_eq!(rb[0]["stopped"], true, "{rb}");
    assert_eq!(f.machine(&file, "web")["state"], "stopped");
    f.run(&["start", "-f", &file]).ok();
    assert_eq!(page(&f, &file).as_deref(), Some("v1"));
    let m = f.machine(&file, "web");
    assert_eq!((m["generation"].clone(), m["recorded_generation"].clone()), (1.into(), 1.into()), "{m:#}");

    // `start --generation N` boots a stopped machine on generation N.
    f.run(&["stop", "-f", &file]).ok();
    let started = f.run(&["start", "-f", &file, "--generation", "2"]).ok();
    assert!(started.stdout().contains("stopped: it boots this generation when it starts"), "{}", started.stdout());
    assert_eq!(page(&f, &file).as_deref(), Some("v2"));
    assert_eq!(f.machine(&file, "web")["generation"], 2);

    // A generation it does not have is refused, naming those it has; nothing changes.
    f.run(&["stop", "-f", &file]).ok();
    let refused = f.run(&["start", "-f", &file, "--generation", "7"]);
    assert_eq!(refused.code(), 1, "{}\n{}", refused.stdout(), refused.stderr());
    assert!(refused.stdout().contains("it has no generation 7; its generations: 1, 2"), "{}", refused.stdout());
    assert_eq!(f.machine(&file, "web")["state"], "stopped");
}

#[test]
fn a_profile_directory_the_machine_swapped_for_a_link_is_refused_not_followed() {
    let f = Fleet::new();
    let file = f.fl.file("rec.nix", &web("v1", ""));
    assert_eq!(f.deploy_json(&["-f", &file]).0, 0);
    f.fl.file("rec.nix", &web("v2", ""));
    assert_eq!(f.deploy_json(&["-f", &file]).0, 0);
    let root = std::path::PathBuf::from(f.machine(&file, "web")["resources"]["root"].as_str().unwrap());
    f.run(&["stop", "-f", &file]).ok();

    // Root in the machine made its profiles a link to a directory of the host's.
    let host_dir = f.fl.dir.path().join("host-dir");
    std::fs::create_dir(&host_dir).unwrap();
    std::os::unix::fs::symlink("system-1-link", host_dir.join("system")).unwrap();
    let profiles = root.join("nix/var/flotilla/profiles");
    std::fs::rename(&profiles, root.join("nix/var/flotilla/profiles.real")).unwrap();
    std::os::unix::fs::symlink(&host_dir, &profiles).unwrap();

    let refused = f.run(&["rollback", "-f", &file]);
    assert_eq!(refused.code(), 1, "{}\n{}", refused.stdout(), refused.stderr());
    assert!(refused.stdout().contains("without following a link"), "{}", refused.stdout());
    assert_eq!(std::fs::read_link(host_dir.join("system")).unwrap(), std::path::Path::new("system-1-link"), "the host's directory was written");
    assert_eq!(std::fs::read_dir(&host_dir).unwrap().count(), 1);
}

#[test]
fn a_stopped_machine_with_a_generation_not_yet_kept_returns_to_the_one_its_agent_would() {
    let f = Fleet::new();
    let file = f.fl.file("rec.nix", &web("v1", ""));
    for page in ["v1", "v2", "v3"] {
        f.fl.file("rec.nix", &web(page, ""));
        assert_eq!(f.deploy_json(&["-f", &file]).0, 0);
    }
    let root = std::path::PathBuf::from(f.machine(&file, "web")["resources"]["root"].as_str().unwrap());
    f.run(&["stop", "-f", &file]).ok();
    // It stopped while generation 3 awaited its confirmation, activated over generation 1
    // (a `rollback --to 1` had run in between): its agent would return to 1, not to 2.
    let record = r#"{"generation":3,"previous_generation":1,"previous_toplevel":null,"deadline_unix":0,"window_secs":30,"stage":"confirming"}"#;
    std::fs::write(root.join("nix/var/flotilla/pending.json"), record).unwrap();
    let rb = f.run(&["rollback", "-f", &file, "--json"]).ok().json();
    assert_eq!((rb[0]["from"].clone(), rb[0]["to"].clone()), (3.into(), 1.into()), "{rb}");
    assert!(!root.join("nix/var/flotilla/pending.json").exists(), "the record went with the generation it kept");
    f.run(&["start", "-f", &file]).ok();
    assert_eq!(page(&f, &file).as_deref(), Some("v1"));
}

#[test]
fn logs_followed_into_a_reader_that_goes_away_ends() {
    let f = Fleet::new();
    let chatter = r#"services.chatter = { script = "while true; do echo tick; sleep 0.2; done"; environment.PATH = "${pkgs.busybox}/bin"; };"#;
    let file = f.fl.file("rec.nix", &web("v1", chatter));
    assert_eq!(f.deploy_json(&["-f", &file]).0, 0);
    let line = f.cmd_line(&["logs", "-f", &file, "web", "chatter", "-F"]);
    let start = Instant::now();
    let out = f.fl_env(std::process::Command::new("timeout")).args(["60", "sh", "-c", &format!("{line} | head -n 4")]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "`logs -F | head` did not end: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("tick")).count(), 3, "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
}
