//! `flotilla plan` and `deploy --plan` (issue 18), with local machines in the test's own
//! network namespace: a new machine, an unchanged one, a package upgrade, a service restart
//! and its reason, a key change by name only, the JSON shape, the refusal without a terminal,
//! a toplevel changed between plan and deploy; and every deploy after a plan checked against
//! it: each service counts its own starts on the machine's disk, so a restart the plan claimed
//! must have happened and nothing else may have restarted.

mod common;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const KEY_V1: &str = "material-AAAA-1";
const KEY_V2: &str = "material-BBBB-2";

/// A deployment `name` of one machine `web`: `httpd` (busybox), `tool` (the demo `hello`
/// package, `hello_pkg`), `keyed` (reads key `token`, whose material is `key`). Each service
/// appends its pid to `/starts/<name>` when it starts.
fn deployment(name: &str, hello_pkg: &str, key: &str) -> String {
    deployment_with(name, hello_pkg, key, "${pkgs.busybox}/bin/sleep 2147483647")
}

/// [`deployment`] with `keyed` running `keyed_exec`.
fn deployment_with(name: &str, hello_pkg: &str, key: &str, keyed_exec: &str) -> String {
    let counted = |svc: &str, exec: &str| format!(r#"[ "${{pkgs.busybox}}/bin/sh" "-c" "mkdir -p /starts; echo $$ >> /starts/{svc}; exec {exec}" ]"#);
    format!(
        r#"{{ meta.name = "{name}"; machines.web = {{ pkgs, ... }}: {{
    packages = [ pkgs.busybox ];
    binsh = "${{pkgs.busybox}}/bin/sh";
    services.httpd = {{
      command = {httpd};
      healthCheck = {{ tcp = 80; interval = 1; retries = 5; timeout = 2; }};
    }};
    services.tool.command = {tool};
    services.keyed = {{ command = {keyed}; keys = [ "token" ]; }};
    keys.token.text = "{key}";
  }}; }}
"#,
        httpd = counted("httpd", "${pkgs.busybox}/bin/httpd -f -p 80 -h /"),
        tool = counted("tool", &format!("${{pkgs.{hello_pkg}}}/bin/hello serve")),
        keyed = counted("keyed", keyed_exec),
    )
}

/// How many times each service started on machine `web` of deployment `name`.
fn starts(f: &Fleet, name: &str) -> BTreeMap<String, usize> {
    let dir = f.fl.dir.path().join("state/machines").join(name).join("web/root/starts");
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        out.insert(e.file_name().to_string_lossy().into_owned(), text.lines().count());
    }
    out
}

/// The start counts once the machine settled: the agent reports every service running (a
/// service waiting for a key placed after activation starts late) and the counts stayed the
/// same for two seconds (a second start, by a key or the supervisor, comes late too).
fn settled_starts(f: &Fleet, file: &str, name: &str) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (BTreeMap::new(), Instant::now());
    loop {
        assert!(Instant::now() < deadline, "the machine did not settle: starts {:?}", last.0);
        let info = f.machine(file, "web");
        let (up, total) = (info["services_up"].as_u64().unwrap(), info["services_total"].as_u64().unwrap());
        let now = starts(f, name);
        if now != last.0 {
            last = (now, Instant::now());
        } else if up == total && total > 0 && last.1.elapsed() >= Duration::from_secs(2) {
            return last.0;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The services a text plan claims start or restart.
fn claimed(plan: &str) -> Vec<String> {
    let mut v: Vec<String> = plan
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("restart ").or_else(|| l.trim_start().strip_prefix("start ")))
        .map(|rest| rest.split(':').next().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

/// Deploys after `plan` and checks that exactly the services it claimed (re)started.
fn deploy_as_planned(f: &Fleet, file: &str, name: &str, plan: &str) {
    deploy_as_planned_with(f, file, name, plan, &[]);
}

/// [`deploy_as_planned`] with more arguments to `deploy --plan --yes`.
fn deploy_as_planned_with(f: &Fleet, file: &str, name: &str, plan: &str, args: &[&str]) {
    let before = if f.fl.dir.path().join("state/machines").join(name).join("web/root/starts").exists() { starts(f, name) } else { BTreeMap::new() };
    f.run(&[&["deploy", "--plan", "--yes", "-f", file], args].concat()).ok();
    let after = settled_starts(f, file, name);
    let mut restarted: Vec<String> = after.iter().filter(|(s, n)| before.get(*s).copied().unwrap_or(0) != **n).map(|(s, _)| s.clone()).collect();
    restarted.sort();
    assert_eq!(restarted, claimed(plan), "the services that started are the ones the plan claimed\nplan:\n{plan}\nbefore {before:?}\nafter {after:?}");
    for (s, n) in &after {
        assert!(n - before.get(s).copied().unwrap_or(0) <= 1, "service {s} started more than once: {before:?} -> {after:?}");
    }
}

#[test]
fn plan_of_a_new_machine_provisions_nothing_then_an_unchanged_one_plans_nothing() {
    let f = Fleet::new();
    let file = f.fl.file("d.nix", &deployment("plannew", "hello", KEY_V1));
    let r = f.run(&["plan", "-f", &file]).ok();
    let out = r.stdout();
    assert!(out.contains("web: new machine"), "{out}");
    for line in ["start httpd: new service", "start tool: new service", "start keyed: new service", "keys: +token", "checks gating the switch: httpd: tcp 80"] {
        assert!(out.contains(line), "no `{line}` in:\n{out}");
    }
    assert!(out.contains("+hello 1.0"), "a new machine gets every package: {out}");
    assert!(out.contains("plan: 0 changing, 0 unchanged, 1 new;"), "{out}");
    assert!(!out.contains(KEY_V1) && !r.stderr().contains(KEY_V1), "key material in the plan:\n{out}");
    assert!(!f.fl.dir.path().join("state/machines/plannew/web/root").exists(), "plan created the machine");

    deploy_as_planned(&f, &file, "plannew", &out);
    let r = f.run(&["plan", "-f", &file]).ok();
    let out = r.stdout();
    assert!(out.contains("web: unchanged (generation 1)"), "{out}");
    assert!(out.contains("to send: 0 paths, 0 B"), "{out}");
    assert!(claimed(&out).is_empty(), "an unchanged machine restarts nothing: {out}");
    assert!(out.contains("plan: 0 changing, 1 unchanged, 0 new; 0 B to send"), "{out}");
    deploy_as_planned(&f, &file, "plannew", &out);
}

#[test]
fn plan_shows_the_upgrade_the_restarts_with_their_reasons_and_the_key_by_name_and_deploy_does_exactly_that() {
    let f = Fleet::new();
    let file = f.fl.file("d.nix", &deployment("planup", "hello", KEY_V1));
    let first = f.run(&["plan", "-f", &file]).ok().stdout();
    deploy_as_planned(&f, &file, "planup", &first);

    std::fs::write(&file, deployment("planup", "hello_2", KEY_V2)).unwrap();
    let r = f.run(&["plan", "-f", &file]).ok();
    let out = r.stdout();
    assert!(out.contains("web: generation 1 -> 2"), "{out}");
    assert!(out.contains("packages: hello 1.0 -> 2.0"), "{out}");
    assert!(out.contains("restart tool: uses hello-2.0; no longer uses hello-1.0"), "{out}");
    assert!(out.contains("restart keyed: key token changed"), "{out}");
    assert!(out.contains("keys: ~token"), "{out}");
    assert!(!out.contains("httpd:") || !claimed(&out).contains(&"httpd".to_owned()), "httpd did not change: {out}");
    assert_eq!(claimed(&out), vec!["keyed".to_owned(), "tool".to_owned()], "{out}");
    assert!(out.contains("plan: 1 changing, 0 unchanged, 0 new;"), "{out}");
    for text in [&out, &r.stderr()] {
        assert!(!text.contains(KEY_V1) && !text.contains(KEY_V2), "key material in the plan:\n{text}");
    }
    deploy_as_planned(&f, &file, "planup", &out);
}

#[test]
fn plan_json_is_one_object_per_machine_then_the_summary() {
    let f = Fleet::new();
    let file = f.fl.file("d.nix", &deployment("planjson", "hello", KEY_V1));
    let r = f.run(&["plan", "--json", "-f", &file]).ok();
    let out = r.stdout();
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert_eq!(lines.len(), 2, "{out}");
    let web = &lines[0];
    assert_eq!(web["machine"], "web");
    assert!(web["system"].get("closure").is_none(), "the running closure is not part of the plan: {web:#}");
    assert_eq!(web["status"], "new");
    assert_eq!(web["next_generation"], 1);
    assert!(web["toplevel"].as_str().unwrap().starts_with("/nix/store/"), "{web:#}");
    assert!(web["closure"]["size_after"].as_u64().unwrap() > 0, "{web:#}");
    assert_eq!(web["bytes_to_send"], web["closure"]["size_after"], "a new machine is sent its whole closure");
    assert!(web["closure"]["added"].as_array().unwrap().iter().any(|p| p["name"] == "hello" && p["version"] == "1.0"), "{web:#}");
    let services: Vec<(&str, &str)> = web["system"]["services"].as_array().unwrap().iter().map(|s| (s["name"].as_str().unwrap(), s["action"].as_str().unwrap())).collect();
    assert_eq!(services.len(), 3, "{web:#}");
    assert!(services.iter().all(|(_, a)| *a == "start"), "{web:#}");
    assert_eq!(web["keys_added"], serde_json::json!(["token"]));
    assert!(!out.contains(KEY_V1), "key material in the JSON: {out}");
    assert_eq!(lines[1]["summary"]["new"], 1, "{out}");
    assert_eq!(lines[1]["summary"]["bytes_to_send"], web["bytes_to_send"], "{out}");
}

#[test]
fn deploy_plan_refuses_without_a_terminal_unless_yes() {
    let f = Fleet::new();
    let file = f.fl.file("d.nix", &deployment("planrefuse", "hello", KEY_V1));
    let r = Run(f.cmd().args(["deploy", "--plan", "-f", &file]).stdin(Stdio::null()).output().unwrap());
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(r.stderr().contains("no terminal to ask") && r.stderr().contains("--yes"), "{}", r.stderr());
    assert_eq!(r.stderr().lines().count(), 1, "one clear message: {}", r.stderr());
    assert!(!f.fl.dir.path().join("state/machines/planrefuse/web/root").exists(), "the refused deploy created the machine");
}

#[test]
fn deploy_plan_stops_when_the_toplevel_changed_after_the_plan_was_shown() {
    let f = Fleet::new();
    let file = f.fl.file("d.nix", &deployment("planmoved", "hello", KEY_V1));
    let line = f.cmd_line(&["deploy", "--plan", "-f", &file]);
    let mut child = f
        .fl_env(std::process::Command::new("script"))
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("prerequisite missing: script (Debian: bsdutils)");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !seen.contains("deploy this plan?") {
        assert!(Instant::now() < deadline, "no question asked:\n{seen}");
        if let Ok(more) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&more);
        }
    }
    assert!(seen.contains("\x1b[1mweb\x1b[0m: new machine"), "the plan, coloured on a terminal: {seen}");
    // The file is edited while the user reads the plan; then they say yes.
    std::fs::write(&file, deployment("planmoved", "hello_2", KEY_V1)).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"y\n").unwrap();
    let status = child.wait().unwrap();
    drop(stdin);
    while let Ok(more) = rx.recv_timeout(Duration::from_millis(500)) {
        seen.push_str(&more);
    }
    assert_eq!(status.code(), Some(2), "{status:?}: {seen}");
    assert!(seen.contains("the deployment changed between the plan and the deploy, so nothing was deployed"), "{seen}");
    assert!(seen.contains("machine web: the plan showed"), "{seen}");
    assert!(!f.fl.dir.path().join("state/machines/planmoved/web/root").exists(), "the stopped deploy created the machine");
}

/// Findings on issue 18, item 1: the next generation is the agent's own number (the last
/// generation + 1), not the current + 1: after a rollback they differ.
#[test]
fn plan_after_a_rollback_names_the_generation_the_deploy_makes() {
    let f = Fleet::new();
    let file = f.fl.file("d.nix", "");
    for n in 1..=3 {
        std::fs::write(&file, deployment_with("plangen", "hello", KEY_V1, &format!("${{pkgs.busybox}}/bin/sleep {}", 2147483640 + n))).unwrap();
        let (code, report, log) = f.deploy_json(&["-f", &file]);
        assert_eq!((code, &row(&report, "web")["generation"]), (0, &serde_json::json!(n)), "{log}");
    }
    f.run(&["rollback", "-f", &file, "--to", "1"]).ok();
    std::fs::write(&file, deployment_with("plangen", "hello", KEY_V1, "${pkgs.busybox}/bin/sleep 2147483600")).unwrap();
    let out = f.run(&["plan", "-f", &file]).ok().stdout();
    assert!(out.contains("web: generation 1 -> 4"), "after a rollback from 3 to 1 the next generation is 4:\n{out}");
    // deploy --plan --json: the plan is one "plan" event line, apart from the deploy's events.
    let r = f.run(&["deploy", "--plan", "--yes", "--json", "-f", &file]).ok();
    let lines: Vec<serde_json::Value> = r.stdout().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let plans: Vec<&serde_json::Value> = lines.iter().filter(|l| l["event"] == "plan").collect();
    assert_eq!(plans.len(), 1, "{}", r.stdout());
    assert_eq!(plans[0]["machines"][0]["next_generation"], 4, "{:#}", plans[0]);
    assert!(plans[0]["machines"][0]["system"].get("closure").is_none(), "the running closure is not in the plan: {:#}", plans[0]);
    assert!(lines.iter().all(|l| l.get("event").is_some() || l.get("machines").is_some()), "every line is an event or the report: {}", r.stdout());
    assert_eq!(row(lines.last().unwrap(), "web")["generation"], 4, "{}", r.stdout());
}

/// Findings on issue 18, item 2: a key rotated together with the service that reads it
/// restarts that service once (the switch's restart), as the plan says, not twice.
#[test]
fn a_key_rotated_with_the_service_reading_it_restarts_it_once() {
    let f = Fleet::new();
    let file = f.fl.file("d.nix", &deployment("plankey", "hello", KEY_V1));
    let first = f.run(&["plan", "-f", &file]).ok().stdout();
    deploy_as_planned(&f, &file, "plankey", &first);
    std::fs::write(&file, deployment_with("plankey", "hello", KEY_V2, "${pkgs.busybox}/bin/sleep 2147483646")).unwrap();
    let out = f.run(&["plan", "-f", &file]).ok().stdout();
    assert_eq!(claimed(&out), vec!["keyed".to_owned()], "{out}");
    assert!(out.contains("key token changed") && out.contains("keys: ~token"), "{out}");
    let before = starts(&f, "plankey");
    deploy_as_planned(&f, &file, "plankey", &out);
    let after = starts(&f, "plankey");
    assert_eq!(after["keyed"], before["keyed"] + 1, "keyed started exactly once more: {before:?} -> {after:?}");
}

/// Findings on issue 18, item 7: `deploy --plan --goal boot` plans a boot, not a switch:
/// nothing restarts now, and the deploy restarts nothing.
#[test]
fn deploy_plan_with_goal_boot_plans_no_restarts_and_the_deploy_makes_none() {
    let f = Fleet::new();
    let file = f.fl.file("d.nix", &deployment("planboot", "hello", KEY_V1));
    let first = f.run(&["plan", "-f", &file]).ok().stdout();
    deploy_as_planned(&f, &file, "planboot", &first);
    std::fs::write(&file, deployment("planboot", "hello_2", KEY_V1)).unwrap();
    let before = starts(&f, "planboot");
    let r = f.run(&["deploy", "--plan", "--yes", "--goal", "boot", "-f", &file]).ok();
    let out = r.stdout();
    assert!(out.contains("web: generation 1 -> 2"), "{out}");
    assert!(out.contains("boot: generation 2 becomes current at the next start, nothing restarts now: restart tool"), "{out}");
    assert!(claimed(&out).is_empty(), "a boot restarts nothing now: {out}");
    assert_eq!(settled_starts(&f, &file, "planboot"), before, "the boot deploy restarted something:\n{out}");
}

/// Findings on issue 18, item 11: `plan --no-build` of a system not built yet says so and
/// exits 0: it is what was asked, not a failure.
#[test]
fn plan_no_build_of_an_unbuilt_machine_exits_zero() {
    let f = Fleet::new();
    let nonce = random_hex(8);
    let file = f.fl.file("d.nix", &deployment_with("plannobuild", "hello", KEY_V1, &format!("${{pkgs.busybox}}/bin/sleep 2147483647; : {nonce}")));
    let r = f.run(&["plan", "--no-build", "-f", &file]);
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stdout().contains("web: not built yet"), "{}", r.stdout());
    assert!(r.stdout().contains("1 not planned"), "{}", r.stdout());
}
