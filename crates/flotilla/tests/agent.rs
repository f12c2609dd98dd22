//! The agent on a plain directory standing for a machine's root: copy, activate, restart only
//! what changed, roll back, supervise, stop cleanly, and never keep an unconfirmed generation
//! across a restart. Real Nix, real agent, real busybox httpd.

mod common;

use std::path::Path;

use common::{alive, free_port, http_get, listeners, Fl, RunningAgent};
use flotilla_engine::remote::AgentClient;
use flotilla_protocol::ActivationGoal;
use flotilla_store::StorePath;
use serde_json::Value;

/// A one-machine deployment: an httpd serving `page` on `port`, an idle service that must
/// survive page changes, and a service that keeps exiting.
fn deployment(port: u16, page: &str) -> String {
    format!(
        r#"{{
  meta.name = "pushtest";
  machines.box = {{ pkgs, ... }}: {{
    packages = [ pkgs.busybox ];
    files."/etc/motd".text = "page {page}\n";
    services.web.command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "127.0.0.1:{port}" "-h" "${{pkgs.writeTextDir "index.html" "{page}"}}" ];
    services.idle = {{ command = [ "${{pkgs.busybox}}/bin/sleep" "100000" ]; }};
    services.flaky = {{ script = "sleep 0.3; exit 3"; restart = "always"; }};
  }};
}}"#
    )
}

fn push(fl: &Fl, root: &Path, file: &str, goal: &str) -> Value {
    fl.run(&["debug", "push-to-root", root.to_str().unwrap(), "-f", file, "--machine", "box", "--goal", goal, "--json"]).ok().json()
}

fn status(fl: &Fl, root: &Path) -> Value {
    fl.run(&["debug", "root", root.to_str().unwrap(), "status", "--json"]).ok().json()
}

fn pid_of(status: &Value, service: &str) -> u32 {
    let s = status["services"].as_array().unwrap().iter().find(|s| s["name"] == service).unwrap_or_else(|| panic!("no {service} in {status}"));
    s["pid"].as_u64().unwrap_or_else(|| panic!("{service} has no pid: {s}")) as u32
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

#[test]
fn push_activate_change_rollback_and_stop() {
    let fl = Fl::new();
    let root = fl.dir.path().join("machine");
    let mut agent = RunningAgent::start(&root);
    let port = free_port();
    let file = fl.file("deployment.nix", &deployment(port, "one"));

    // First push: the closure is copied and the services start.
    let first = push(&fl, &root, &file, "switch");
    assert!(first["copy"]["paths_sent"].as_u64().unwrap() >= 3, "{first}");
    assert_eq!(first["generation"], 1);
    assert_eq!(strs(&first["report"]["services_started"]), ["flaky", "idle", "web"]);
    assert_eq!(http_get(port).as_deref(), Some("one"));
    assert_eq!(std::fs::read_to_string(root.join("etc/motd")).unwrap(), "page one\n");
    let toplevel = first["toplevel"].as_str().unwrap();
    assert!(root.join(toplevel.trim_start_matches('/')).join("manifest.json").exists(), "the closure is in the machine's own store");

    // Second push of the same system: nothing sent, nothing restarted, same generation.
    let before = status(&fl, &root);
    let again = push(&fl, &root, &file, "switch");
    assert_eq!(again["copy"]["paths_sent"], 0, "{again}");
    assert_eq!(again["generation"], 1);
    assert!(strs(&again["report"]["services_restarted"]).is_empty(), "{again}");
    assert_eq!(pid_of(&status(&fl, &root), "web"), pid_of(&before, "web"));

    // Change the page: only the web service restarts.
    let file = fl.file("deployment.nix", &deployment(port, "two"));
    let idle_pid = pid_of(&before, "idle");
    let changed = push(&fl, &root, &file, "switch");
    assert_eq!(changed["generation"], 2);
    assert_eq!(strs(&changed["report"]["services_restarted"]), ["web"]);
    assert_eq!(strs(&changed["report"]["etc_changed"]), ["/etc/motd"]);
    assert_eq!(http_get(port).as_deref(), Some("two"));
    assert_eq!(pid_of(&status(&fl, &root), "idle"), idle_pid, "idle kept running");

    // Dry activation of the old page says what would change and changes nothing.
    let file_one = fl.file("deployment.nix", &deployment(port, "one"));
    let dry = push(&fl, &root, &file_one, "dry-activate");
    assert_eq!(dry["report"]["dry_run"], true);
    assert_eq!(strs(&dry["report"]["services_restarted"]), ["web"]);
    assert_eq!(http_get(port).as_deref(), Some("two"));

    // Roll back: the old page is served again, and both generations are listed.
    let rb = fl.run(&["debug", "root", root.to_str().unwrap(), "rollback", "--json"]).ok().json();
    assert_eq!(rb["generation"], 1);
    assert_eq!(http_get(port).as_deref(), Some("one"));
    let gens = fl.run(&["debug", "root", root.to_str().unwrap(), "generations", "--json"]).ok().json();
    let gens = gens.as_array().unwrap();
    assert_eq!(gens.len(), 2);
    assert_eq!(gens[0]["current"], true);
    assert_eq!(gens[1]["current"], false);

    // The service that keeps exiting is restarted by its policy.
    let st = status(&fl, &root);
    let flaky = st["services"].as_array().unwrap().iter().find(|s| s["name"] == "flaky").unwrap();
    assert!(flaky["restarts"].as_u64().unwrap() >= 1, "{flaky}");

    // SIGTERM stops every service, then the agent.
    let pids = [pid_of(&st, "web"), pid_of(&st, "idle")];
    let exit = agent.terminate();
    assert!(exit.success(), "agent exit: {exit}");
    for pid in pids {
        assert!(!alive(pid), "service pid {pid} survived the agent");
    }
    assert_eq!(listeners(port), Vec::<u32>::new(), "port {port} is still served after the agent stopped");
    assert!(http_get_once(port).is_none(), "the web service still answers");
}

/// Issue 21: a port handed to one test is handed to no other, in this process or another
/// (so a "nothing answers any more" check never reaches another test's listener), and comes
/// from outside the range the kernel hands out for port 0 and outgoing connections.
#[test]
fn test_ports_are_claimed_for_the_life_of_the_process() {
    let (a, b) = (free_port(), free_port());
    assert_ne!(a, b, "one port handed out twice");
    for port in [a, b] {
        assert!(common::TEST_PORTS.contains(&port), "port {port} is outside the test range {:?}", common::TEST_PORTS);
        // Any process binding the claim is refused while this one holds it.
        let other = std::os::unix::net::UnixListener::bind_addr(&common::port_claim(port));
        assert!(other.is_err(), "port {port} is not claimed: another test process could get it too");
    }
}

/// Kills what a SIGKILLed agent left running (as a crash or a power cut would have), each
/// service with its process group, and waits until it is gone.
fn kill_orphaned_services(pids: &[u32]) {
    for pid in pids {
        let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while pids.iter().any(|p| alive(*p)) {
        assert!(std::time::Instant::now() < deadline, "the services of the killed agent did not die");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The children of `parent` with `arg` among their arguments.
fn pids_of_children_with_arg(parent: u32, arg: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(parent) && cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes())
        })
        .collect()
}

fn http_get_once(port: u16) -> Option<()> {
    std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
}

/// Issue 21, item 5: the page served after the restart must come from a new httpd the new
/// agent started, not from the old one a SIGTERM failed to stop.
#[test]
fn the_agent_restarts_services_of_the_current_system_when_it_starts_again() {
    let fl = Fl::new();
    let root = fl.dir.path().join("machine");
    let port = free_port();
    let file = fl.file("deployment.nix", &deployment(port, "again"));
    let mut agent = RunningAgent::start(&root);
    push(&fl, &root, &file, "switch");
    assert_eq!(http_get(port).as_deref(), Some("again"));
    let old = pid_of(&status(&fl, &root), "web");
    assert!(listeners(port).contains(&old), "the agent's httpd (pid {old}) serves port {port}: {:?}", listeners(port));

    // Stopped, the agent leaves nothing serving the port.
    let exit = agent.terminate();
    assert!(exit.success(), "agent exit: {exit}");
    assert!(!alive(old), "the old httpd (pid {old}) survived its agent's SIGTERM");
    assert_eq!(listeners(port), Vec::<u32>::new(), "port {port} is still served after the agent stopped");
    assert!(http_get_once(port).is_none(), "port {port} still answers after the agent stopped");
    drop(agent);

    // Started again, it starts the current system's httpd: a new process serves the page.
    let _agent = RunningAgent::start(&root);
    assert_eq!(http_get(port).as_deref(), Some("again"));
    let new = pid_of(&status(&fl, &root), "web");
    assert_ne!(new, old, "the web service was not started again");
    assert!(listeners(port).contains(&new), "the new httpd (pid {new}) serves port {port}: {:?}", listeners(port));
}

/// The machine's Nix GC roots the agent keeps: name → target.
fn nix_roots(root: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(root.join("nix/var/nix/gcroots/flotilla"))
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_link(e.path()).unwrap().to_string_lossy().into_owned()))
        .collect();
    out.sort();
    out
}

#[test]
fn gc_keeps_what_generations_need() {
    let fl = Fl::new();
    let root = fl.dir.path().join("machine");
    // The machine has Nix of its own: the agent keeps a GC root there for each generation.
    std::fs::create_dir_all(root.join("nix/var/nix/db")).unwrap();
    let _agent = RunningAgent::start(&root);
    let port = free_port();
    let a = push(&fl, &root, &fl.file("d.nix", &deployment(port, "a")), "switch");
    let b = push(&fl, &root, &fl.file("d.nix", &deployment(port, "b")), "switch");
    let c = push(&fl, &root, &fl.file("d.nix", &deployment(port, "c")), "switch");
    let top = |v: &Value| v["toplevel"].as_str().unwrap().to_owned();
    let roots = |names: &[(&str, &Value)]| names.iter().map(|(n, v)| ((*n).to_owned(), top(v))).collect::<Vec<_>>();
    assert_eq!(nix_roots(&root), roots(&[("running", &c), ("system-1", &a), ("system-2", &b), ("system-3", &c)]));
    let r = root.to_str().unwrap();
    let deleted = fl.run(&["debug", "root", r, "delete-generations", "--keep-last", "1", "--json"]).ok().json();
    assert_eq!(deleted, serde_json::json!([1, 2]));
    assert_eq!(nix_roots(&root), roots(&[("running", &c), ("system-3", &c)]));
    let gc = fl.run(&["debug", "root", r, "gc", "--json"]).ok().json();
    assert!(gc["paths"].as_u64().unwrap() >= 2, "old toplevels and pages collected: {gc}");
    // The current system still works, and pushing it again sends nothing.
    assert_eq!(http_get(port).as_deref(), Some("c"));
    let again = push(&fl, &root, &fl.file("d.nix", &deployment(port, "c")), "switch");
    assert_eq!(again["copy"]["paths_sent"], 0);
}

#[test]
fn an_agent_that_restarts_before_a_generation_is_confirmed_returns_to_the_one_before() {
    let fl = Fl::new();
    let root = fl.dir.path().join("machine");
    let port = free_port();
    let mut agent = RunningAgent::start(&root);
    push(&fl, &root, &fl.file("d.nix", &deployment(port, "one")), "switch");
    let two = push(&fl, &root, &fl.file("d.nix", &deployment(port, "two")), "copy");
    let toplevel = StorePath::parse(two["toplevel"].as_str().unwrap()).unwrap();

    // Generation 2 passes its checks and awaits a confirmation that never comes: the agent
    // dies (SIGKILL, as in a crash) inside the window, and with it its services.
    let mut client = AgentClient::connect_unix(&root.join("run/flotilla/agent.sock")).unwrap();
    let activated = client.activate(&toplevel, ActivationGoal::Switch, Some(30), Some(600)).unwrap();
    assert!(activated.awaiting_confirmation);
    assert_eq!(activated.generation, 2);
    assert_eq!(http_get(port).as_deref(), Some("two"));
    assert!(root.join("nix/var/flotilla/pending.json").exists(), "the pending generation is recorded on disk");
    let st = status(&fl, &root);
    let services = [pid_of(&st, "web"), pid_of(&st, "idle")];
    drop(client);
    agent.kill();
    kill_orphaned_services(&services);

    // The next agent restores generation 1 before starting anything, and says why 2 failed.
    let _agent = RunningAgent::start(&root);
    assert_eq!(http_get(port).as_deref(), Some("one"));
    let gens = fl.run(&["debug", "root", root.to_str().unwrap(), "generations", "--json"]).ok().json();
    let gens = gens.as_array().unwrap();
    assert_eq!(gens.len(), 2, "{gens:?}");
    assert_eq!(gens[0]["current"], true, "{gens:?}");
    assert_eq!(gens[1]["failed"], "the agent restarted before generation 2 was confirmed", "{gens:?}");
    assert!(!root.join("nix/var/flotilla/pending.json").exists());
    let st = status(&fl, &root);
    assert_eq!(st["generation"], 1, "{st}");
    assert!(st["toplevel"].as_str().is_some_and(|t| t != toplevel.to_absolute()), "generation 1's system runs: {st}");
}

#[test]
fn an_agent_that_dies_during_health_checks_returns_to_the_generation_before() {
    let fl = Fl::new();
    let root = fl.dir.path().join("machine");
    let port = free_port();
    let mut agent = RunningAgent::start(&root);
    push(&fl, &root, &fl.file("d.nix", &deployment(port, "one")), "switch");
    // Generation 2's web service has a health check that takes a minute to pass.
    let slow = deployment(port, "two").replace(
        "services.idle =",
        "services.web.healthCheck = { command = [ \"${pkgs.busybox}/bin/sleep\" \"60\" ]; timeout = 120; };\n    services.idle =",
    );
    let two = push(&fl, &root, &fl.file("d.nix", &slow), "copy");
    let toplevel = StorePath::parse(two["toplevel"].as_str().unwrap()).unwrap();

    let sock = root.join("run/flotilla/agent.sock");
    let activating = std::thread::spawn(move || {
        let mut client = AgentClient::connect_unix(&sock).unwrap();
        client.activate(&toplevel, ActivationGoal::Switch, Some(120), None).map(|a| a.generation)
    });
    // Generation 2 is switched in and serving; its check is still running when the agent dies.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while http_get(port).as_deref() != Some("two") {
        assert!(std::time::Instant::now() < deadline, "generation 2 never started serving");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let record: Value = serde_json::from_str(&std::fs::read_to_string(root.join("nix/var/flotilla/pending.json")).unwrap()).unwrap();
    assert_eq!(record["generation"], 2, "{record}");
    assert_eq!(record["stage"], "checking", "{record}");
    // (Not `status`: the agent answers nothing else while it activates.)
    let services: Vec<u32> = [format!("127.0.0.1:{port}"), "100000".to_owned(), "60".to_owned()]
        .iter()
        .flat_map(|arg| pids_of_children_with_arg(agent.pid() as u32, arg))
        .collect();
    assert_eq!(services.len(), 3, "web, idle and the health check run: {services:?}");
    agent.kill();
    let outcome = activating.join().unwrap();
    assert!(outcome.is_err(), "the activation cannot have succeeded: its agent died: {outcome:?}");
    kill_orphaned_services(&services);

    // The next agent does not keep the generation nobody checked: generation 1 runs again.
    let _agent = RunningAgent::start(&root);
    assert_eq!(http_get(port).as_deref(), Some("one"));
    let gens = fl.run(&["debug", "root", root.to_str().unwrap(), "generations", "--json"]).ok().json();
    let gens = gens.as_array().unwrap();
    assert_eq!(gens[0]["current"], true, "{gens:?}");
    assert_eq!(gens[1]["failed"], "the agent restarted before generation 2 had passed its health checks", "{gens:?}");
    assert!(!root.join("nix/var/flotilla/pending.json").exists());
}

#[test]
fn a_checked_generation_without_a_confirmation_window_is_kept_across_a_restart() {
    let fl = Fl::new();
    let root = fl.dir.path().join("machine");
    let port = free_port();
    {
        let _agent = RunningAgent::start(&root);
        push(&fl, &root, &fl.file("d.nix", &deployment(port, "one")), "switch");
        push(&fl, &root, &fl.file("d.nix", &deployment(port, "two")), "switch");
        assert!(!root.join("nix/var/flotilla/pending.json").exists(), "a kept generation leaves no record behind");
    }
    let _agent = RunningAgent::start(&root);
    assert_eq!(http_get(port).as_deref(), Some("two"));
    let st = status(&fl, &root);
    assert_eq!(st["generation"], 2, "{st}");
}

#[test]
fn a_one_shot_service_that_finishes_cleanly_is_no_failure_to_stay_up() {
    let fl = Fl::new();
    let root = fl.dir.path().join("machine");
    let _agent = RunningAgent::start(&root);
    let port = free_port();
    let with_setup = deployment(port, "one").replace(
        "services.idle =",
        "services.setup = { script = \"echo migrated\"; restart = \"on-failure\"; };\n    services.idle =",
    );
    let pushed = push(&fl, &root, &fl.file("d.nix", &with_setup), "switch");
    assert_eq!(pushed["generation"], 1, "{pushed}");
    assert_eq!(http_get(port).as_deref(), Some("one"));
    let gens = fl.run(&["debug", "root", root.to_str().unwrap(), "generations", "--json"]).ok().json();
    assert_eq!(gens[0]["failed"], Value::Null, "{gens}");
}

#[test]
fn accounts_and_files_of_the_machines_are_refused_before_anything_changes() {
    let fl = Fl::new();
    let root = fl.dir.path().join("machine");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let passwd = "root:x:0:0:root:/root:/bin/bash\nwww:x:33:33::/var/www:/usr/sbin/nologin\n";
    std::fs::write(root.join("etc/passwd"), passwd).unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nwww:x:33:\n").unwrap();
    std::fs::write(root.join("etc/motd"), "the machine's\n").unwrap();
    let _agent = RunningAgent::start(&root);
    let machine = |www: &str| {
        format!(
            r#"{{ meta.name = "host"; machines.box = {{ pkgs, ... }}: {{
  files."/etc/motd".text = "flotilla's\n";
  users.www = {{ {www} }};
  services.idle = {{ command = [ "${{pkgs.busybox}}/bin/sleep" "100000" ]; user = "www"; }};
}}; }}"#
        )
    };
    let file = fl.file("d.nix", &machine("uid = 1005;"));
    let r = fl.run(&["debug", "push-to-root", root.to_str().unwrap(), "-f", &file, "--machine", "box", "--goal", "switch"]);
    assert_ne!(r.code(), 0, "{}", r.stdout());
    let err = r.stderr();
    assert!(err.contains("user www: exists on this machine with uid 33, not the declared 1005, and was not created by flotilla; flotilla does not change accounts it did not create: drop users.www.uid or use another name"), "{err}");
    assert!(err.contains("/etc/motd exists on this machine and was not placed by flotilla; flotilla never replaces files it does not own: remove or move it on the machine, or stop declaring files.\"/etc/motd\""), "{err}");
    // Nothing changed: no generation, no file, no account, no service.
    assert_eq!(std::fs::read_dir(root.join("nix/var/flotilla/profiles")).unwrap().count(), 0);
    assert_eq!(std::fs::read_to_string(root.join("etc/motd")).unwrap(), "the machine's\n");
    assert_eq!(std::fs::read_to_string(root.join("etc/passwd")).unwrap(), passwd);
    assert!(status(&fl, &root)["services"].as_array().unwrap().is_empty());

    // The machine's file moved away and the uid no longer declared: the account is used as
    // it is, and the service runs as it.
    std::fs::rename(root.join("etc/motd"), root.join("etc/motd.orig")).unwrap();
    let done = push(&fl, &root, &fl.file("d.nix", &machine("")), "switch");
    assert_eq!(done["generation"], 1);
    assert!(std::fs::read_to_string(root.join("etc/passwd")).unwrap().starts_with(passwd));
    let pid = pid_of(&status(&fl, &root), "idle");
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap().lines().find_map(|l| l.strip_prefix("Uid:").map(|r| r.split_whitespace().next().unwrap().to_owned()));
    assert_eq!(uid.as_deref(), Some("33"));
}
