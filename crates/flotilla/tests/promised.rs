//! What the README and docs/architecture.md promise and no other test ran: `flotilla check`
//! finding drift, each `deploy --goal` with the effect it names, `rollback` stepping over a
//! failed generation, a machine refused when its `platform.address` changes, and builds kept
//! from Nix's garbage collector through `gcroots/auto`. Real containers, real Nix, the real
//! agent; everything that deploys runs in a network namespace of the test's own (`Fleet`).

mod common;

use std::path::Path;

use common::{row, web_deployment, Fl, Fleet};
use serde_json::Value;

fn page(f: &Fleet, ip: &str) -> String {
    f.http_get(&format!("http://{ip}/")).unwrap_or_else(|| panic!("nothing answers at {ip}")).trim().to_owned()
}

fn generations(f: &Fleet, file: &str) -> Vec<Value> {
    f.run(&["generations", "-f", file, "web", "--json"]).ok().json().as_array().cloned().unwrap()
}

fn current(gens: &[Value]) -> u64 {
    gens.iter().find(|g| g["current"] == true).and_then(|g| g["number"].as_u64()).unwrap_or_else(|| panic!("no current generation: {gens:?}"))
}

/// The ledger's events of `kind` for `machine`, oldest first.
fn ledger(f: &Fleet, deployment: &str, machine: &str, kind: &str) -> Vec<Value> {
    let log = f.run(&["log", "--json", "-n", "1000", "-d", deployment]).ok().json();
    log.as_array().unwrap().iter().filter(|e| e["machine"] == machine && e["kind"] == kind).cloned().collect()
}

#[test]
fn check_reports_a_service_stopped_behind_flotillas_back_as_drift_and_records_it() {
    let f = Fleet::new();
    let worker = r#"services.worker = { command = [ "${pkgs.busybox}/bin/sleep" "100000" ]; restart = "never"; };"#;
    let file = f.fl.file("drift.nix", &web_deployment("drift", "v1", worker));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");

    // As deployed: exit 0, the table says ok, the ledger says ok.
    let r = f.run(&["check", "-f", &file]);
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stdout().lines().any(|l| l.starts_with("web ") && l.contains("ok") && l.contains("as deployed")), "{}", r.stdout());
    let checks = ledger(&f, "drift", "web", "check");
    assert_eq!(checks.iter().map(|e| e["status"].as_str().unwrap()).collect::<Vec<_>>(), ["ok"], "{checks:#?}");

    // Someone stops the worker by hand; its policy does not restart it.
    let kill_worker = r#"for p in /proc/[0-9]*; do c=$(tr '\0' ' ' < $p/cmdline 2>/dev/null); case "$c" in */sleep\ 100000\ ) kill ${p#/proc/}; echo killed;; esac; done"#;
    let r = f.run(&["exec", "web", "--", "sh", "-c", kill_worker]).ok();
    assert_eq!(r.stdout(), "killed\n", "{}", r.stderr());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = f.run(&["check", "-f", &file, "--json"]);
        let web = r.json().as_array().and_then(|a| a.first().cloned()).unwrap_or_default();
        let problems = web["problems"].as_array().cloned().unwrap_or_default();
        if !problems.is_empty() {
            assert_eq!(r.code(), 1, "drift must fail the check: {web:#}");
            assert!(problems.iter().any(|p| p.as_str().unwrap_or_default().starts_with("service worker is ")), "{web:#}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "check never saw the stopped worker: {web:#}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let r = f.run(&["check", "-f", &file]);
    assert_eq!(r.code(), 1, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stdout().lines().any(|l| l.starts_with("web ") && l.contains("DRIFT") && l.contains("service worker is")), "{}", r.stdout());
    let last = ledger(&f, "drift", "web", "check").pop().unwrap();
    assert_eq!(last["status"], "drift", "{last:#}");
    assert!(last["message"].as_str().unwrap_or_default().contains("service worker is"), "{last:#}");
}

#[test]
fn each_deploy_goal_does_what_it_names_and_no_more() {
    let f = Fleet::new();
    let v = |page: &str| web_deployment("goals", page, "");
    let file = f.fl.file("goals.nix", &v("v1"));

    // build: built, nothing provisioned.
    let (code, report, out) = f.deploy_json(&["-f", &file, "--goal", "build"]);
    assert_eq!(code, 0, "{out}");
    assert!(row(&report, "web")["toplevel"].is_string(), "{report:#}");
    let web = f.machine(&file, "web");
    assert_eq!(web["state"], "missing", "--goal build provisioned the machine: {web:#}");
    assert!(!Path::new(web["resources"]["root"].as_str().unwrap()).exists(), "{web:#}");

    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    let web = f.machine(&file, "web");
    let ip = web["ip"].as_str().unwrap().to_owned();
    let root = web["resources"]["root"].as_str().unwrap().to_owned();
    assert_eq!(page(&f, &ip), "v1");

    // copy: v2's closure is on the machine, nothing activated.
    f.fl.file("goals.nix", &v("v2"));
    let (code, report, out) = f.deploy_json(&["-f", &file, "--goal", "copy"]);
    assert_eq!(code, 0, "{out}");
    let v2 = row(&report, "web")["toplevel"].as_str().unwrap().to_owned();
    assert!(row(&report, "web")["copy"]["paths_sent"].as_u64().unwrap() >= 1, "{report:#}");
    assert!(Path::new(&format!("{root}{v2}/manifest.json")).exists(), "--goal copy left {v2} off the machine");
    assert_eq!(page(&f, &ip), "v1");
    assert_eq!(generations(&f, &file).len(), 1);

    // dry-activate: the report says what would change; nothing does.
    let (code, report, out) = f.deploy_json(&["-f", &file, "--goal", "dry-activate"]);
    assert_eq!(code, 0, "{out}");
    let activation = &row(&report, "web")["activation"];
    assert_eq!(activation["dry_run"], true, "{report:#}");
    assert_eq!(activation["services_restarted"], serde_json::json!(["httpd"]), "{report:#}");
    assert_eq!(page(&f, &ip), "v1");
    let gens = generations(&f, &file);
    assert_eq!((gens.len(), current(&gens)), (1, 1), "{gens:?}");
    assert_eq!(f.machine(&file, "web")["recorded_generation"], 1);

    // boot: v2 is the boot default, v1 still runs; after a restart v2 runs.
    let (code, report, out) = f.deploy_json(&["-f", &file, "--goal", "boot"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "web")["generation"], 2, "{report:#}");
    assert_eq!(page(&f, &ip), "v1", "--goal boot activated the new system now");
    f.run(&["reboot", "-f", &file]).ok();
    assert_eq!(page(&f, &ip), "v2", "--goal boot: the restarted machine does not run the new generation");
    assert_eq!(current(&generations(&f, &file)), 2);

    // test: v3 runs now but is not the boot default: after a restart v2 runs again.
    f.fl.file("goals.nix", &v("v3"));
    let (code, _, out) = f.deploy_json(&["-f", &file, "--goal", "test", "--confirm-timeout", "0"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(page(&f, &ip), "v3", "--goal test did not activate the new system");
    assert_eq!(current(&generations(&f, &file)), 2, "--goal test made a new boot default");
    f.run(&["reboot", "-f", &file]).ok();
    assert_eq!(page(&f, &ip), "v2", "--goal test: the restarted machine kept the tested system");
}

#[test]
fn rollback_steps_over_a_failed_generation() {
    let f = Fleet::new();
    let file = f.fl.file("rb.nix", &web_deployment("rb", "v1", ""));
    assert_eq!(f.deploy_json(&["-f", &file]).0, 0);
    let ip = f.machine(&file, "web")["ip"].as_str().unwrap().to_owned();
    // Generation 2 fails: its service does not start.
    let bad = web_deployment("rb", "v2", "").replace("\"-p\" \"80\"", "\"-p\" \"no-such-port\"");
    f.fl.file("rb.nix", &bad);
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 1, "{out}");
    f.fl.file("rb.nix", &web_deployment("rb", "v3", ""));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "web")["generation"], 3, "{report:#}");
    let gens = generations(&f, &file);
    assert!(gens.iter().any(|g| g["number"] == 2 && g["failed"].is_string()), "{gens:?}");

    // The generation before 3 is 2, which failed: rollback goes to 1.
    let r = f.run(&["rollback", "-f", &file]).ok();
    assert!(r.stdout().lines().any(|l| l.starts_with("web") && l.contains("rolled back")), "{}", r.stdout());
    assert_eq!(current(&generations(&f, &file)), 1, "{}", r.stdout());
    assert_eq!(page(&f, &ip), "v1");
    assert_eq!(f.machine(&file, "web")["recorded_generation"], 1);
}

#[test]
fn a_changed_platform_address_is_refused_for_an_existing_machine() {
    let f = Fleet::new();
    let at = |addr: &str| web_deployment("moving", "here", &format!(r#"platform = {{ type = "local"; address = "{addr}"; }};"#));
    let file = f.fl.file("moving.nix", &at("10.231.0.7"));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(f.machine(&file, "web")["ip"], "10.231.0.7");

    f.fl.file("moving.nix", &at("10.231.0.9"));
    let r = f.run(&["deploy", "-f", &file]);
    assert_ne!(r.code(), 0, "{}\n{}", r.stdout(), r.stderr());
    let said = format!("{}{}", r.stdout(), r.stderr());
    assert!(said.contains("web") && said.contains("platform.address") && said.contains("flotilla destroy --on web"), "{said}");
    // Nothing moved: the machine still answers at its address, on its generation.
    assert_eq!(page(&f, "10.231.0.7"), "here");
    let web = f.machine(&file, "web");
    assert_eq!((web["generation"].as_u64(), web["recorded_generation"].as_u64()), (Some(1), Some(1)), "{web:#}");
}

#[test]
fn built_toplevels_are_registered_as_gc_roots_under_gcroots_auto() {
    let fl = Fl::new();
    let file = fl.file("roots.nix", &web_deployment("roots", &common::random_hex(8), ""));
    let report = fl.run(&["build", "--json", "-f", &file]).ok().json();
    let top = report["machines"][0]["toplevel"].as_str().unwrap_or_else(|| panic!("{report:#}")).to_owned();
    let link = fl.state().parent().unwrap().join("gcroots/roots/web");
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new(&top));
    // Nix's own view: the toplevel's roots include the link, through its registration in
    // /nix/var/nix/gcroots/auto.
    let auto = Path::new("/nix/var/nix/gcroots/auto");
    let registered: Vec<_> = std::fs::read_dir(auto).unwrap().flatten().filter(|e| std::fs::read_link(e.path()).ok().as_deref() == Some(link.as_path())).map(|e| e.path()).collect();
    assert_eq!(registered.len(), 1, "{} is not registered in {}", link.display(), auto.display());
    let roots = std::process::Command::new("nix-store").args(["--query", "--roots", &top]).output().unwrap();
    let roots = String::from_utf8_lossy(&roots.stdout);
    assert!(roots.lines().any(|l| l.starts_with(&format!("{} -> ", link.display()))), "Nix does not see the root:\n{roots}");
    // Deleting the deployment releases it.
    fl.run(&["delete", "-d", "roots"]).ok();
    assert!(!registered[0].exists() && std::fs::symlink_metadata(&registered[0]).is_err(), "the registration survived delete");
}

/// A tmpfs mounted for a test, unmounted when dropped (even when the test failed).
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_machine_whose_store_lacks_room_is_refused_before_anything_is_copied() {
    let f = Fleet::new();
    let file = f.fl.file("room.nix", &web_deployment("room", "v1", ""));
    // The machine's whole root is a disk 40 MiB bigger than the bootstrap agent: the agent
    // fits, the closure (a few MiB) too, but not with the 64 MiB the pre-flight keeps spare.
    let root = f.fl.state().parent().unwrap().join("machines/room/web/root");
    std::fs::create_dir_all(&root).unwrap();
    let agent = std::fs::metadata(common::agent_bin()).unwrap().len() >> 20;
    let size = format!("size={}m", agent + 40);
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &size, "flotilla-test-room"]).arg(&root).status().unwrap();
    assert!(mounted.success(), "cannot mount a tmpfs on {}", root.display());
    let _mounted = Mounted(root.clone());

    let (code, report, said) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 1, "{said}");
    let web = row(&report, "web");
    assert_eq!(web["outcome"], "failed", "{web:#}");
    let error = web["error"].as_str().unwrap();
    assert!(error.contains("the machine's store needs") && error.contains("free; free space on the machine"), "{error}");
    // Nothing was copied: the store holds no path of the closure.
    let store: Vec<String> = std::fs::read_dir(root.join("nix/store")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(store.iter().all(|n| n.starts_with('.')), "paths were copied: {store:?}");

    // Stopped, the disk is unmounted, and the test's Fleet removes the rest.
    f.run(&["stop", "-f", &file]).ok();
    drop(_mounted);
}
