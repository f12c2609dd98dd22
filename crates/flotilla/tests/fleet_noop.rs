//! A no-op redeploy of a fleet costs each machine one request, counted where it lands: in each
//! machine's agent log, which says what every connection asked. A machine with something to
//! do (a key whose contents changed, a service that no longer runs) is still found and
//! deployed step by step, and only it.

mod common;

use std::path::PathBuf;

use common::{row, Fleet};

const MACHINES: usize = 30;

/// `MACHINES` web servers; web07 has a key read from `key`, web12 a service that is never
/// restarted.
fn fleet(key: &str) -> String {
    let mut s = String::from(
        r#"{ meta.name = "noop";
  defaults = { pkgs, ... }: { packages = [ pkgs.busybox ]; binsh = "${pkgs.busybox}/bin/sh"; };
  machines = let web = extra: { name, pkgs, ... }: let e = extra pkgs; in {
    services = { httpd.command = [ "${pkgs.busybox}/bin/httpd" "-f" "-p" "80" "-h" "${pkgs.writeTextDir "index.html" "hello from ${name}"}" ]; } // (e.services or { });
  } // builtins.removeAttrs e [ "services" ]; in {
"#,
    );
    for i in 1..=MACHINES {
        let extra = match i {
            7 => format!("(pkgs: {{ keys.token.file = \"{key}\"; }})"),
            12 => "(pkgs: { services.idle = { command = [ \"${pkgs.busybox}/bin/sleep\" \"86400\" ]; restart = \"never\"; }; })".to_owned(),
            _ => "(pkgs: { })".to_owned(),
        };
        s.push_str(&format!("    web{i:02} = web {extra};\n"));
    }
    s.push_str("  };\n}\n");
    s
}

/// Each machine's console log: its agent's stderr, where it says what each connection asked.
fn console(f: &Fleet, machine: &str) -> PathBuf {
    f.fl.dir.path().join("state/machines/noop").join(machine).join("console.log")
}

/// What each machine's agent logged about its connections since `from` (each log's length).
fn served_since(f: &Fleet, from: &[u64]) -> Vec<Vec<String>> {
    (1..=MACHINES)
        .map(|i| {
            let text = std::fs::read(console(f, &format!("web{i:02}"))).unwrap();
            String::from_utf8_lossy(&text[from[i - 1] as usize..]).lines().filter(|l| l.contains(" served ")).map(str::to_owned).collect()
        })
        .collect()
}

fn log_lengths(f: &Fleet) -> Vec<u64> {
    (1..=MACHINES).map(|i| std::fs::metadata(console(f, &format!("web{i:02}"))).map(|m| m.len()).unwrap_or(0)).collect()
}

#[test]
fn a_no_op_redeploy_of_thirty_machines_asks_each_one_question_and_a_changed_key_is_still_written() {
    let f = Fleet::new();
    let key = f.fl.dir.path().join("token");
    std::fs::write(&key, "first\n").unwrap();
    let file = f.fl.file("noop.nix", &fleet(&key.to_string_lossy()));
    let (code, report, stderr) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert!(console(&f, "web01").exists(), "the agent's log is not where this test reads it: {}", console(&f, "web01").display());

    // Nothing changed: one request a machine, the question whether anything differs.
    let before = log_lengths(&f);
    let (code, report, stderr) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    for i in 1..=MACHINES {
        assert_eq!(row(&report, &format!("web{i:02}"))["outcome"], "unchanged", "{report:#}");
    }
    let served = served_since(&f, &before);
    for (i, lines) in served.iter().enumerate() {
        assert_eq!(lines.len(), 1, "web{:02}: one connection, not {}: {lines:?}", i + 1, lines.len());
        assert!(lines[0].ends_with("served 1 request: current"), "web{:02}: {lines:?}", i + 1);
    }

    // web07's key changed on the deployer: it alone is deployed, and the key is written.
    std::fs::write(&key, "second\n").unwrap();
    let before = log_lengths(&f);
    let (code, report, stderr) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let web07 = row(&report, "web07");
    assert_eq!(web07["outcome"], "deployed", "{web07:#}");
    assert!(web07["keys"].as_str().is_some_and(|k| k.contains("keys written: token")), "{web07:#}");
    let on_disk = f.run(&["exec", "-f", &file, "web07", "--", "busybox", "cat", "/run/keys/token"]).ok().stdout();
    assert_eq!(on_disk, "second\n");
    let served = served_since(&f, &before);
    for (i, lines) in served.iter().enumerate() {
        let name = format!("web{:02}", i + 1);
        if name == "web07" {
            let asked: usize = lines.iter().map(|l| l.split("served ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0)).sum();
            assert!(asked > 1, "web07 had work to do, and was asked only {asked} requests: {lines:?}");
        } else {
            assert_eq!(row(&report, &name)["outcome"], "unchanged", "{report:#}");
            assert_eq!(lines.len(), 1, "{name}: {lines:?}");
            assert!(lines[0].ends_with("served 1 request: current"), "{name}: {lines:?}");
        }
    }

    // A service that ended on web12 (it is never restarted by its supervisor) is the
    // deploy's to start again: web12 alone is deployed, and its service runs.
    let kill = f.run(&["exec", "-f", &file, "web12", "--", "busybox", "killall", "sleep"]);
    assert_eq!(kill.code(), 0, "{}\n{}", kill.stdout(), kill.stderr());
    let before = log_lengths(&f);
    let (code, report, stderr) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let web12 = row(&report, "web12");
    assert_eq!(web12["outcome"], "deployed", "{web12:#}");
    assert_eq!(web12["activation"]["services_started"], serde_json::json!(["idle"]), "{web12:#}");
    let served = served_since(&f, &before);
    for (i, lines) in served.iter().enumerate() {
        let name = format!("web{:02}", i + 1);
        if name != "web12" {
            assert_eq!(lines.len(), 1, "{name}: {lines:?}");
            assert!(lines[0].ends_with("served 1 request: current"), "{name}: {lines:?}");
        }
    }
    let (code, report, stderr) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(row(&report, "web12")["outcome"], "unchanged", "the service runs again: {report:#}");
}
