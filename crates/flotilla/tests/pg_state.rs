//! Team state on PostgreSQL: two deployer processes, each in a working directory of its own,
//! sharing one PostgreSQL database (a throwaway cluster this test process starts on a unix
//! socket, `flotilla_state::testing`), deploying real local machines inside the test's own
//! network namespace (`common::Fleet`). The lock between them is a lease: a second deploy is
//! refused naming the holder; a holder killed on "another host" (its own UTS namespace, so
//! its pid cannot be checked from here) stops blocking once its lease expires, and the ledger
//! says so; read-only commands never wait for the deploy.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{host_named, hostname, this_host, Fleet, KillOnDrop, Run};

/// The lease these tests use, in seconds: short, so a takeover is quick to see.
const LEASE: &str = "3";

/// A deployer: flotilla in the fleet's namespace with the shared PostgreSQL state, run from a
/// working directory of its own, with this host's data directory.
struct Deployer<'a> {
    fleet: &'a Fleet,
    url: &'a str,
    cwd: PathBuf,
}

impl Deployer<'_> {
    fn cmd(&self) -> Command {
        let mut c = self.fleet.cmd();
        c.env("FLOTILLA_STATE", self.url)
            .env("FLOTILLA_DATA", self.fleet.fl.dir.path().join("state"))
            .env("FLOTILLA_LEASE_SECONDS", LEASE)
            .current_dir(&self.cwd)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        Run(self.cmd().args(args).output().expect("flotilla runs"))
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.cmd().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("flotilla starts")
    }
}

/// Destroys what the deployers made, through the PostgreSQL state (the fleet's own cleanup
/// looks at its SQLite state), before the fleet removes its namespace.
struct Cleanup<'a>(Deployer<'a>);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["destroy", "--yes", "-d", "slow"]);
    }
}

fn workdir(fleet: &Fleet, name: &str) -> PathBuf {
    let dir = fleet.fl.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A deployment `slow` of one machine whose web server starts `delay` seconds after the
/// service does, and whose health check waits for it: a deploy holds the lock that long.
fn slow_deployment(fleet: &Fleet, delay: u32) -> String {
    fleet.fl.file(
        "slow.nix",
        &format!(
            r#"{{ meta.name = "slow"; machines.web = {{ pkgs, ... }}: let
    site = pkgs.runCommand "site" {{}} ''
      mkdir $out
      echo 'slow page' > $out/index.html
    '';
  in {{
    packages = [ pkgs.busybox ];
    binsh = "${{pkgs.busybox}}/bin/sh";
    services.httpd = {{
      command = [ "${{pkgs.busybox}}/bin/sh" "-c" "sleep {delay}; exec ${{pkgs.busybox}}/bin/httpd -f -p 80 -h ${{site}}" ];
      healthCheck = {{ http = "http://127.0.0.1/"; interval = 1; retries = 120; timeout = 2; }};
    }};
  }}; }}
"#
        ),
    )
}

/// Waits until `deploy` holds the lock of `slow` in the shared state; its holder.
fn wait_for_lock(url: &str, deploy: &mut Child, within: Duration) -> flotilla_state::Lock {
    let start = Instant::now();
    loop {
        if let Some(l) = flotilla_state::State::open(std::path::Path::new(url)).unwrap().lock("slow").unwrap() {
            return l;
        }
        if let Some(status) = deploy.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(deploy.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the first deploy ended ({status}) before it was seen holding the lock:\n{err}");
        }
        assert!(start.elapsed() < within, "no deploy took the lock of `slow` within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `flotilla ARGS` as `deployer` runs it, on "another host": in a UTS namespace whose
/// hostname is `alices-laptop`.
fn elsewhere(deployer: &Deployer<'_>, args: &[&str]) -> Child {
    let inner = deployer.cmd();
    let mut c = Command::new("unshare");
    c.args(["--uts", "sh", "-c", "hostname alices-laptop && exec \"$@\"", "sh"]).arg(inner.get_program()).args(inner.get_args()).args(args);
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.current_dir(&deployer.cwd).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().unwrap()
}

#[test]
fn a_second_deployer_is_refused_with_the_holder_named_and_info_does_not_wait() {
    let fleet = Fleet::new();
    let url = flotilla_state::testing::pg_database();
    let alice = Deployer { fleet: &fleet, url: &url, cwd: workdir(&fleet, "alice") };
    let bob = Deployer { fleet: &fleet, url: &url, cwd: workdir(&fleet, "bob") };
    let _cleanup = Cleanup(Deployer { fleet: &fleet, url: &url, cwd: workdir(&fleet, "cleanup") });
    let file = slow_deployment(&fleet, 15);

    let mut first = KillOnDrop(alice.spawn(&["deploy", "-f", &file]));
    let holder = wait_for_lock(&url, &mut first.0, Duration::from_secs(300));
    assert_eq!(holder.command, "deploy");

    // Bob's deploy is refused at once, naming who holds the lock: user, host, command.
    let refused = bob.run(&["deploy", "-f", &file]);
    assert_ne!(refused.code(), 0, "a second deploy ran while the first held the lock:\n{}", refused.stderr());
    let said = refused.stderr();
    let host = hostname();
    assert!(said.contains(&format!("is locked by {}", holder.holder)) && holder.holder.ends_with(&format!("@{host}")), "{said}");
    assert!(said.contains(&format!("on {}, `deploy`", this_host())), "{said}");

    // A read-only command reads the last committed state while the deploy runs (once the
    // build recorded the deployment, its machine waiting for its slow server).
    let state = flotilla_state::State::open(std::path::Path::new(&url)).unwrap();
    while state.deployment("slow").unwrap().is_none() {
        assert!(first.0.try_wait().unwrap().is_none(), "the deploy ended before recording the deployment");
        std::thread::sleep(Duration::from_millis(100));
    }
    // `info` takes no lock: it is never refused or held by the deploy's lock. It does ask the
    // machine's agent, which answers one request at a time, so while the agent runs the
    // deploy's slow activation the machine's row waits for it (a known limit, not the lock's).
    // `log` reads only the state: it answers at once.
    let started = Instant::now();
    let log = bob.run(&["log", "-d", "slow", "--json"]);
    assert_eq!(log.code(), 0, "{}", log.stderr());
    assert!(started.elapsed() < Duration::from_secs(10), "log waited {:?} for the deploy", started.elapsed());
    assert!(first.0.try_wait().unwrap().is_none(), "the deploy ended before log ran: the test proves nothing");
    let info = Run(bob.cmd().env("FLOTILLA_AGENT_TIMEOUT", "3").args(["info", "-d", "slow", "--json"]).output().expect("flotilla runs"));
    assert!(matches!(info.code(), 0 | 1), "{}", info.stderr());
    assert!(!info.stderr().contains("is locked"), "info was held by the lock:\n{}", info.stderr());

    let status = first.0.wait().unwrap();
    assert!(status.success(), "the first deploy failed");
    // Now the lock is free: Bob's deploy runs (a no-op redeploy).
    bob.run(&["deploy", "-f", &file]).ok();
}

#[test]
fn a_holder_killed_elsewhere_loses_its_lease_and_the_next_deploy_takes_over() {
    let fleet = Fleet::new();
    let url = flotilla_state::testing::pg_database();
    let alice = Deployer { fleet: &fleet, url: &url, cwd: workdir(&fleet, "alice") };
    let bob = Deployer { fleet: &fleet, url: &url, cwd: workdir(&fleet, "bob") };
    let _cleanup = Cleanup(Deployer { fleet: &fleet, url: &url, cwd: workdir(&fleet, "cleanup") });
    let file = slow_deployment(&fleet, 30);

    // Alice deploys from "another host": a UTS namespace with a hostname of its own, so her
    // pid means nothing to Bob and only the lease can free the lock.
    let mut first = KillOnDrop(elsewhere(&alice, &["deploy", "-f", &file]));
    let holder = wait_for_lock(&url, &mut first.0, Duration::from_secs(300));
    assert_eq!(holder.host, host_named("alices-laptop"));
    first.0.kill().unwrap();
    first.0.wait().unwrap();

    // Straight after the kill the lease still runs: refused, naming Alice's host.
    let refused = bob.run(&["deploy", "-f", &file]);
    let said = refused.stderr();
    assert_ne!(refused.code(), 0, "{said}");
    assert!(said.contains(&format!("on {}, `deploy`", host_named("alices-laptop"))), "{said}");

    // Once the lease expired, Bob's deploy takes over and deploys; the ledger says so.
    std::thread::sleep(Duration::from_secs(LEASE.parse::<u64>().unwrap() + 1));
    let taken = bob.run(&["deploy", "-f", &file]);
    assert_eq!(taken.code(), 0, "{}\n{}", taken.stdout(), taken.stderr());
    assert!(taken.stderr().contains("whose lease was not renewed"), "{}", taken.stderr());
    let log = bob.run(&["log", "-d", "slow", "--json"]).ok().json();
    let events = log.as_array().cloned().unwrap_or_else(|| log["events"].as_array().cloned().unwrap_or_default());
    assert!(
        events.iter().any(|e| e["kind"] == "lock" && e["status"] == "expired" && e["message"].as_str().is_some_and(|m| m.contains("alices-laptop"))),
        "no expired-lease takeover in the ledger:\n{log:#}"
    );
}

#[test]
fn a_deployment_exported_from_sqlite_and_imported_into_postgres_shows_the_same_and_no_secret() {
    let fleet = Fleet::new();
    let text_secret = format!("TEXTKEY-{}", common::random_hex(16));
    let file_secret = format!("FILEKEY-{}", common::random_hex(16));
    let cmd_secret = format!("CMDKEY-{}", common::random_hex(16));
    let key_file = fleet.fl.file("key.txt", &file_secret);
    let extra = format!(
        r#"keys.text = {{ text = "{text_secret}"; }}; keys.file = {{ file = "{key_file}"; }}; keys.cmd = {{ command = [ "/bin/sh" "-c" "echo {cmd_secret}" ]; }};"#
    );
    let file = fleet.fl.file("moved.nix", &common::web_deployment("moved", "moved page", &extra));
    // Deployed with the default SQLite state (the fleet's own).
    let (code, report, said) = fleet.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{said}");

    let export = fleet.run(&["export", "-d", "moved"]).ok().stdout();
    let doc: serde_json::Value = serde_json::from_str(&export).unwrap();
    assert_eq!((doc["format"].as_str(), doc["version"].as_u64()), (Some("flotilla-state-export"), Some(1)));
    assert!(!doc["machines"].as_array().unwrap().is_empty() && !doc["events"].as_array().unwrap().is_empty(), "{doc:#}");
    for secret in [&text_secret, &file_secret, &cmd_secret] {
        assert!(!export.contains(secret.as_str()), "the export holds key material {secret}:\n{export}");
    }

    // Into PostgreSQL, from another working directory on this host (same data directory).
    let url = flotilla_state::testing::pg_database();
    let team = Deployer { fleet: &fleet, url: &url, cwd: workdir(&fleet, "team") };
    let import = |args: &[&str]| {
        let mut c = team.cmd();
        c.arg("import").args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), export.as_bytes()).unwrap();
        drop(child.stdin.take());
        Run(child.wait_with_output().unwrap())
    };
    import(&[]).ok();
    // Twice is refused, naming the way out; --replace replaces.
    let again = import(&[]);
    assert_ne!(again.code(), 0);
    assert!(again.stderr().contains("exists in this state already") && again.stderr().contains("--replace"), "{}", again.stderr());
    import(&["--replace"]).ok();

    // `log` shows the same ledger (and the import); `info` the same machines and generations.
    let events = |r: Run| -> Vec<serde_json::Value> {
        r.ok().json().as_array().unwrap().iter().map(|e| serde_json::json!([e["machine"], e["at"], e["actor"], e["kind"], e["status"], e["message"], e["details"]])).collect()
    };
    let before = events(fleet.run(&["log", "-d", "moved", "--json", "-n", "1000"]));
    let mut after = events(team.run(&["log", "-d", "moved", "--json", "-n", "1000"]));
    assert_eq!(after.pop().unwrap()[3], "import");
    assert_eq!(before, after);
    let machines = |r: Run| -> Vec<serde_json::Value> {
        let j = r.ok().json();
        j["machines"].as_array().unwrap().iter().map(|m| serde_json::json!([m["machine"], m["platform"], m["ip"], m["generation"]])).collect()
    };
    let before = machines(fleet.run(&["info", "-d", "moved", "--json"]));
    let after = machines(team.run(&["info", "-d", "moved", "--json"]));
    assert_eq!(before, after);
    assert!(before.iter().any(|m| m[3] == 1), "{before:?}");
}

#[test]
fn a_deploy_whose_lock_is_broken_changes_no_further_machine() {
    let fleet = Fleet::new();
    let url = flotilla_state::testing::pg_database();
    let alice = Deployer { fleet: &fleet, url: &url, cwd: workdir(&fleet, "alice") };
    let bob = Deployer { fleet: &fleet, url: &url, cwd: workdir(&fleet, "bob") };
    let _cleanup = Cleanup(Deployer { fleet: &fleet, url: &url, cwd: workdir(&fleet, "cleanup") });
    // web1 answers its health check 20 s after activation, web2 at once; one machine at a
    // time (--parallel 1), web1 first.
    let file = fleet.fl.file(
        "two.nix",
        r#"{ meta.name = "slow"; machines = let web = delay: { pkgs, ... }: {
    packages = [ pkgs.busybox ];
    binsh = "${pkgs.busybox}/bin/sh";
    services.httpd = {
      command = [ "${pkgs.busybox}/bin/sh" "-c" "sleep ${toString delay}; exec ${pkgs.busybox}/bin/httpd -f -p 80 -h ${pkgs.writeTextDir "index.html" "ok"}" ];
      healthCheck = { http = "http://127.0.0.1/"; interval = 1; retries = 120; timeout = 2; };
    };
  }; in { web1 = web 20; web2 = web 0; }; }
"#,
    );
    let mut first = KillOnDrop(elsewhere(&alice, &["deploy", "-f", &file, "--parallel", "1"]));
    wait_for_lock(&url, &mut first.0, Duration::from_secs(300));
    let state = flotilla_state::State::open(std::path::Path::new(&url)).unwrap();
    while state.deployment("slow").unwrap().is_none() {
        assert!(first.0.try_wait().unwrap().is_none(), "the deploy ended before recording the deployment");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Bob breaks Alice's live lock by hand while web1 waits for its server.
    let broke = bob.run(&["unlock", "-d", "slow", "--force"]);
    assert_eq!(broke.code(), 0, "{}", broke.stderr());
    let out = std::mem::replace(&mut first.0, Command::new("true").spawn().unwrap()).wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "a deploy that lost its lock ended well:\n{said}");
    assert!(said.contains("was taken over or broken by another command"), "{said}");

    // web2 was never activated: no generation recorded for it, none running.
    let machines = state.machines("slow").unwrap();
    let web2 = machines.iter().find(|m| m.name == "web2").expect("web2 recorded by the build");
    assert!(web2.last_build.as_ref().is_none_or(|g| g.status != "active"), "{web2:?}");
    assert!(state.active_generation("slow", "web2").unwrap().is_none());
    let log = state.events(Some("slow"), 100).unwrap();
    assert!(log.iter().any(|e| e.kind == "lock" && e.status == "forced" && e.message.contains("alices-laptop")), "{log:?}");
    assert!(!log.iter().any(|e| e.kind == "activate" && e.machine.as_deref() == Some("web2")), "{log:?}");
}
