//! Safe deploys end to end on the local platform: health checks with automatic rollback, the
//! confirmation canary (a deployer that vanishes), `--rollback-all-on-failure`, manual
//! rollback across stop and start, and keys that never touch a store or the state DB. Real
//! containers, real Nix, the real agent; each test in a network namespace of its own.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{row, Fleet, KillOnDrop};
use serde_json::Value;

/// A deployment of web servers, each `(name, page)`; a page without the word "ok" in it fails
/// the health check (its `/ok` answers 404).
fn web_fleet(machines: &[(&str, &str)], extra: &str) -> String {
    let defs: String = machines
        .iter()
        .map(|(name, page)| {
            let ok = if page.split_whitespace().any(|w| w == "ok") { "echo fine > $out/ok" } else { "" };
            format!(
                r#"
    {name} = {{ pkgs, nodes, ... }}: let
        site = pkgs.runCommand "site-{name}" {{}} ''
          mkdir $out
          echo '{page}' > $out/index.html
          {ok}
        '';
      in {{
        packages = [ pkgs.busybox ];
        binsh = "${{pkgs.busybox}}/bin/sh";
        services.httpd = {{
          command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "80" "-h" "${{site}}" ];
          healthCheck = {{ http = "http://127.0.0.1/ok"; interval = 1; retries = 3; timeout = 2; }};
        }};
        {extra}
      }};"#
            )
        })
        .collect();
    format!("{{ meta.name = \"safe\"; machines = {{{defs}\n  }}; }}\n")
}

fn page(f: &Fleet, file: &str, machine: &str) -> String {
    let ip = f.machine(file, machine)["ip"].as_str().unwrap().to_owned();
    f.http_get(&format!("http://{ip}/")).unwrap_or_else(|| panic!("{machine} serves nothing")).trim().to_owned()
}

fn generations(f: &Fleet, file: &str, machine: &str) -> Vec<Value> {
    f.run(&["generations", "-f", file, machine, "--json"]).ok().json().as_array().cloned().unwrap()
}

/// The newest ledger event of `machine` (`log --json` lists the newest last).
fn newest_event(f: &Fleet, machine: &str) -> Value {
    let ledger = f.run(&["log", "--json", "-d", "safe"]).ok().json();
    let events = ledger.as_array().unwrap_or_else(|| panic!("the ledger is not a list: {ledger:#}"));
    events.iter().rev().find(|e| e["machine"] == machine).cloned().unwrap_or_else(|| panic!("no event for {machine}: {ledger:#}"))
}

fn current(gens: &[Value]) -> u64 {
    gens.iter().find(|g| g["current"] == true).and_then(|g| g["number"].as_u64()).unwrap_or_else(|| panic!("no current generation: {gens:?}"))
}

#[test]
fn a_failing_health_check_rolls_back_and_manual_rollback_survives_stop_and_start() {
    let f = Fleet::new();
    let file = f.fl.file("safe.nix", &web_fleet(&[("web", "v1 ok")], ""));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "web")["health"][0]["healthy"], true, "{report:#}");
    assert_eq!(page(&f, &file, "web"), "v1 ok");

    // v2's health check answers 404: the agent rolls back by itself; the table says so, with
    // the check and its last output; exit 1; v1 is still served.
    f.fl.file("safe.nix", &web_fleet(&[("web", "v2 bad")], ""));
    let r = f.run(&["deploy", "-f", &file]);
    assert_eq!(r.code(), 1, "{}\n{}", r.stdout(), r.stderr());
    let line = r.stdout().lines().find(|l| l.starts_with("web")).unwrap_or_default().to_owned();
    assert!(line.contains("rolled back"), "{}", r.stdout());
    assert!(line.contains("health check of service httpd (http http://127.0.0.1/ok)") && line.contains("404"), "{line}");
    assert_eq!(page(&f, &file, "web"), "v1 ok");
    let gens = generations(&f, &file, "web");
    assert_eq!(gens.len(), 2, "{gens:?}");
    assert_eq!(current(&gens), 1);
    assert!(gens[1]["failed"].as_str().unwrap().contains("health check of service httpd"), "{gens:?}");
    let table = f.run(&["generations", "-f", &file, "web"]).ok().stdout();
    assert!(table.lines().any(|l| l.starts_with("2 ") && l.contains("failed: health check")), "{table}");
    assert!(table.lines().any(|l| l.starts_with("1 ") && l.contains("ok") && l.ends_with("current")), "{table}");
    // The ledger records the rollback; the state DB still says generation 1.
    let event = newest_event(&f, "web");
    assert_eq!((event["kind"].as_str(), event["status"].as_str()), (Some("activate"), Some("rolled back")), "{event:#}");
    assert!(event["message"].as_str().unwrap_or_default().contains("health check of service httpd"), "{event:#}");
    assert_eq!(f.machine(&file, "web")["recorded_generation"], 1);

    // A service that does not stay up, beside an httpd that passes its check: the agent
    // rolls back for that service, and says so; the health check has nothing to do with it.
    let flaky = r#"services.flaky = { script = "echo flaky is up; sleep 1; echo flaky gives up; exit 3"; };"#;
    f.fl.file("safe.nix", &web_fleet(&[("web", "v2b ok")], flaky));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 1, "{out}");
    let web = row(&report, "web");
    assert_eq!(web["outcome"], "rolled-back", "{report:#}");
    let error = web["error"].as_str().unwrap_or_default();
    assert!(error.contains("service flaky") && error.contains("did not stay up") && error.contains("(exit 3)"), "the error does not name the service that died: {error}");
    assert!(!error.contains("httpd"), "httpd passed its check, yet the error names it: {error}");
    assert_eq!(page(&f, &file, "web"), "v1 ok");
    let gens = generations(&f, &file, "web");
    assert_eq!(current(&gens), 1, "{gens:?}");
    assert!(gens.last().unwrap()["failed"].as_str().unwrap_or_default().contains("flaky"), "{gens:?}");
    // The ledger: this deploy's event for web is a rollback that names the service.
    let event = newest_event(&f, "web");
    assert_eq!((event["kind"].as_str(), event["status"].as_str()), (Some("activate"), Some("rolled back")), "{event:#}");
    assert!(event["message"].as_str().unwrap_or_default().contains("flaky"), "{event:#}");

    // Two good deploys, then back to generation 1 by hand.
    f.fl.file("safe.nix", &web_fleet(&[("web", "v3 ok")], ""));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    let v3 = row(&report, "web")["generation"].as_u64().unwrap();
    assert_eq!(page(&f, &file, "web"), "v3 ok");
    let r = f.run(&["rollback", "-f", &file, "--to", "1"]).ok();
    assert!(r.stdout().lines().any(|l| l.starts_with("web") && l.contains("rolled back") && l.contains(&v3.to_string())), "{}", r.stdout());
    assert_eq!(page(&f, &file, "web"), "v1 ok");
    assert_eq!(current(&generations(&f, &file, "web")), 1);
    assert_eq!(f.machine(&file, "web")["recorded_generation"], 1, "the rollback is recorded");

    // Across a stop and a start the machine keeps the generation it was rolled back to.
    f.run(&["stop", "-f", &file]).ok();
    f.run(&["start", "-f", &file]).ok();
    assert_eq!(page(&f, &file, "web"), "v1 ok");
    assert_eq!(current(&generations(&f, &file, "web")), 1);

    // `rollback` without --to goes to the generation before the current one; there is none.
    let r = f.run(&["rollback", "-f", &file]);
    assert_eq!(r.code(), 1);
    assert!(r.stdout().contains("no good generation before the current one"), "{}", r.stdout());
}

#[test]
fn a_deployer_that_vanishes_before_confirming_gets_its_change_rolled_back() {
    let f = Fleet::new();
    let file = f.fl.file("safe.nix", &web_fleet(&[("web", "v1 ok")], ""));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    // The address now, so that nothing inside the confirmation window evaluates or probes.
    let url = format!("http://{}/", f.machine(&file, "web")["ip"].as_str().unwrap());
    let served = |f: &Fleet| f.host(&["curl", "-sSf", "--max-time", "2", &url]).stdout().trim().to_owned();

    // v2 passes the agent's health check, but the deployer's own check (nothing listens on
    // port 1) keeps the deployer busy probing; it is killed while the agent awaits its
    // confirmation. The window is wide enough that a loaded machine still reads v2 inside it.
    const WINDOW: u64 = 8;
    let slow_check = r#"checks.outside = { http = "http://127.0.0.1:1/"; interval = 1; retries = 60; };"#;
    f.fl.file("safe.nix", &web_fleet(&[("web", "v2 ok")], slow_check));
    let mut child = KillOnDrop(
        f.cmd()
            .args(["deploy", "--json", "-f", &file, "--confirm-timeout", &WINDOW.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut awaited = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line.contains("\"awaiting-confirmation\"") {
            awaited = Some(line);
            break;
        }
    }
    let awaited = awaited.expect("the deploy never reported a generation awaiting confirmation");
    let window_opened = Instant::now();
    assert!(awaited.contains(&format!("\"within_secs\":{WINDOW}")), "{awaited}");
    child.0.kill().unwrap();
    child.0.wait().unwrap();

    // The order of events, each with the time it was seen: v2 is served, unconfirmed, inside
    // the window; v1 is served again only once the window has run out, without a deployer.
    let mut seen: Vec<(String, Duration)> = Vec::new();
    let deadline = window_opened + Duration::from_secs(WINDOW + 20);
    loop {
        let page = served(&f);
        if seen.last().map(|(p, _)| p) != Some(&page) {
            seen.push((page.clone(), window_opened.elapsed()));
        }
        if page == "v1 ok" {
            break;
        }
        assert!(Instant::now() < deadline, "the agent never rolled back the unconfirmed generation: {seen:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pages: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).filter(|p| !p.is_empty()).collect();
    assert_eq!(pages, ["v2 ok", "v1 ok"], "{seen:?}");
    let v2_at = seen.iter().find(|(p, _)| p == "v2 ok").unwrap().1;
    assert!(v2_at < Duration::from_secs(WINDOW), "v2 was first read {v2_at:?} after the window opened, too late to prove anything: {seen:?}");
    let back_at = seen.last().unwrap().1;
    assert!(back_at >= Duration::from_secs(WINDOW - 1), "v1 returned {back_at:?} after the window opened, before the {WINDOW} s window ran out: {seen:?}");
    let gens = generations(&f, &file, "web");
    assert_eq!(current(&gens), 1, "{gens:?}");
    assert!(gens[1]["failed"].as_str().unwrap().contains(&format!("not confirmed within {WINDOW} s")), "{gens:?}");

    // A deployer that stays confirms: the same change, without the slow check, is kept.
    f.fl.file("safe.nix", &web_fleet(&[("web", "v2 ok")], ""));
    let (code, report, out) = f.deploy_json(&["-f", &file, "--confirm-timeout", "3"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"phase\":\"confirm\""), "{out}");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(page(&f, &file, "web"), "v2 ok", "a confirmed generation stays");
    assert_eq!(current(&generations(&f, &file, "web")), row(&report, "web")["generation"].as_u64().unwrap());
}

#[test]
fn one_bad_machine_of_three_reverts_the_others_with_rollback_all_on_failure() {
    let f = Fleet::new();
    let file = f.fl.file("safe.nix", &web_fleet(&[("a", "a1 ok"), ("b", "b1 ok"), ("c", "c1 ok")], ""));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");

    f.fl.file("safe.nix", &web_fleet(&[("a", "a2 ok"), ("b", "b2 ok"), ("c", "c2 bad")], ""));
    let r = f.run(&["deploy", "-f", &file, "--rollback-all-on-failure"]);
    assert_eq!(r.code(), 1, "{}\n{}", r.stdout(), r.stderr());
    let table = r.stdout();
    assert!(table.lines().any(|l| l.starts_with("c ") && l.contains("rolled back")), "{table}");
    let reverted = table.split("reverted by --rollback-all-on-failure:").nth(1).unwrap_or_else(|| panic!("no reverted table:\n{table}"));
    for m in ["a", "b"] {
        assert!(reverted.lines().any(|l| l.starts_with(&format!("{m} ")) && l.contains("reverted to generation 1")), "{table}");
    }
    for (m, p) in [("a", "a1 ok"), ("b", "b1 ok"), ("c", "c1 ok")] {
        assert_eq!(page(&f, &file, m), p);
        assert_eq!(current(&generations(&f, &file, m)), 1);
        assert_eq!(f.machine(&file, m)["recorded_generation"], 1, "{m}");
    }

    // Without the flag, the good machines keep their new generation.
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(row(&report, "a")["outcome"], "deployed");
    assert_eq!(row(&report, "c")["outcome"], "rolled-back");
    assert_eq!(page(&f, &file, "a"), "a2 ok");
}

#[test]
fn keys_land_with_owner_and_mode_never_in_a_store_or_the_state_db_and_restart_only_their_service() {
    let f = Fleet::new();
    let marker = f.fl.file("marker", "");
    std::thread::sleep(Duration::from_millis(1100)); // ctimes after the marker's
    // A random nonce: this run's toplevel and its derivation are then new store paths, made
    // after the marker, so the scan below covers them (a nonce that repeats across runs would
    // name paths an earlier run made, older than the marker and never scanned).
    let nonce = common::random_hex(16);
    let text_secret = format!("TEXT-SECRET-{nonce}");
    let file_secret = format!("FILE-SECRET-{nonce}");
    let key_file = f.fl.file("key-on-deployer", &file_secret);
    let machine = |text: &str, with_file_key: bool| {
        let file_key = if with_file_key { format!(r#"keys.fromfile = {{ file = "{key_file}"; }};"#) } else { String::new() };
        format!(
            r#"{{ meta.name = "keys"; machines.vault = {{ pkgs, ... }}: {{
  packages = [ pkgs.busybox ];
  binsh = "${{pkgs.busybox}}/bin/sh";
  files."/etc/run-id".text = "{nonce}";
  users.app = {{ }};
  keys.db = {{ text = "{text}"; user = "app"; group = "app"; mode = "0640"; }};
  keys.late = {{ command = [ "/bin/sh" "-c" "printf CMD-SECRET-{nonce}" ]; uploadAt = "post-activation"; destDir = "/run/keys/late"; }};
  {file_key}
  services.app = {{ script = "echo start; exec ${{pkgs.busybox}}/bin/sleep 100000"; keys = [ "db" ]; user = "app"; }};
  services.other = {{ script = "echo start; exec ${{pkgs.busybox}}/bin/sleep 100000"; }};
}}; }}"#
        )
    };
    let file = f.fl.file("keys.nix", &machine(&text_secret, true));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains(&text_secret) && !out.contains(&file_secret) && !out.contains("CMD-SECRET"), "a secret in deploy's output:\n{out}");
    assert!(row(&report, "vault")["keys"].as_str().unwrap().contains("db"), "{report:#}");

    let stat = |path: &str| f.run(&["exec", "vault", "--", "stat", "-c", "%U %G %a", path]).ok().stdout().trim().to_owned();
    let cat = |path: &str| f.run(&["exec", "vault", "--", "cat", path]).ok().stdout();
    assert_eq!(stat("/run/keys/db"), "app app 640");
    assert_eq!(cat("/run/keys/db"), text_secret);
    assert_eq!(stat("/run/keys/fromfile"), "root root 600");
    assert_eq!(cat("/run/keys/fromfile"), file_secret);
    assert_eq!(cat("/run/keys/late/late"), format!("CMD-SECRET-{nonce}"));
    let mounts = cat("/proc/mounts");
    assert!(mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/run") && l.contains("tmpfs")), "/run/keys is not in memory:\n{mounts}");

    // Nowhere in a store: not in any host store path made since the test began (the secrets
    // are new, so any path holding one was made now; /etc/run-id makes this run's toplevel
    // and its derivation new too, so the scan covers them), not in the machine's store.
    let host_paths = f.host(&["find", "/nix/store", "-maxdepth", "1", "-cnewer", &marker]).stdout();
    let host_paths: Vec<&str> = host_paths.lines().filter(|p| *p != "/nix/store").collect();
    let toplevel = row(&report, "vault")["toplevel"].as_str().unwrap_or_else(|| panic!("no toplevel in {report:#}")).to_owned();
    assert!(host_paths.contains(&toplevel.as_str()), "this run's toplevel {toplevel} is not among the scanned paths, so the scan would prove nothing: {host_paths:?}");
    let root = f.machine(&file, "vault")["resources"]["root"].as_str().unwrap_or_else(|| panic!("info names no root")).to_owned();
    for secret in [&text_secret, &file_secret, &format!("CMD-SECRET-{nonce}")] {
        let mut grep = std::process::Command::new("grep");
        grep.args(["-rlF", secret.as_str(), &format!("{root}/nix/store")]).args(&host_paths);
        let found = grep.output().unwrap();
        // Other tests build and delete store paths meanwhile: a path that vanished during the
        // scan is no finding (grep says so and exits 2), any other error is.
        let vanished_only = String::from_utf8_lossy(&found.stderr).lines().all(|l| l.ends_with("No such file or directory"));
        assert!(found.stdout.is_empty(), "{secret} found in: {}", String::from_utf8_lossy(&found.stdout));
        assert!(found.status.code() == Some(1) || (found.status.code() == Some(2) && vanished_only), "grep failed: {}", String::from_utf8_lossy(&found.stderr));
        // Not in the state DB, its WAL, or the ledger.
        for db in [f.fl.state(), f.fl.state().with_extension("db-wal")] {
            if let Ok(bytes) = std::fs::read(&db) {
                assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} is in {}", db.display());
            }
        }
    }
    let ledger = f.run(&["log"]).ok().stdout();
    assert!(!ledger.contains("SECRET"), "{ledger}");

    // A changed key restarts the service that uses it, and only that one.
    let starts = |svc: &str| f.run(&["logs", "vault", svc]).ok().stdout().lines().filter(|l| *l == "start").count();
    assert_eq!((starts("app"), starts("other")), (1, 1));
    let text2 = format!("TEXT-SECRET-2-{nonce}");
    f.fl.file("keys.nix", &machine(&text2, false));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(cat("/run/keys/db"), text2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while starts("app") < 2 {
        assert!(Instant::now() < deadline, "app was not restarted for its key");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(starts("other"), 1, "a service that does not use the key was restarted");
    let keys = row(&report, "vault")["keys"].as_str().unwrap().to_owned();
    assert!(keys.contains("restarted for a key: app"), "{keys}");
    // The key no longer declared is deleted; the unchanged command key was not sent again.
    assert!(keys.contains("keys removed: fromfile") && !keys.contains("late"), "{keys}");
    let r = f.run(&["exec", "vault", "--", "test", "-e", "/run/keys/fromfile"]);
    assert_eq!(r.code(), 1, "the removed key is still there");

    // upload-keys re-sends a key lost on the machine, without a deploy.
    f.run(&["exec", "vault", "--", "rm", "/run/keys/db"]).ok();
    let r = f.run(&["upload-keys", "-f", &file]).ok();
    assert!(r.stdout().contains("keys written: db"), "{}", r.stdout());
    assert_eq!(cat("/run/keys/db"), text2);

    // A restarted machine (its /run is new) gets its keys again, and the service that waits
    // for one runs.
    f.run(&["stop", "-f", &file]).ok();
    f.run(&["start", "-f", &file]).ok();
    assert_eq!(cat("/run/keys/db"), text2);
    assert_eq!(stat("/run/keys/db"), "app app 640");
    let info = f.machine(&file, "vault");
    assert_eq!(info["services_up"], 2, "{info:#}");
}
