//! Fleet commands work per machine (issue 22): a machine this flotilla cannot handle is one
//! failed row with its reason, every other machine is handled, and the exit status is 1; a
//! machine whose host is
//! gone for good can be forgotten; one its file no longer declares is orphaned and can still
//! be destroyed; debug commands leave no agent behind. Real containers, in a network
//! namespace of the test's own.

mod common;

use common::{Fl, Fleet};

/// `box1`, a local machine serving a page with a key, and `vm1`, a VM that is only ever
/// built here: its record is then made one this flotilla cannot handle (see [`unusable`]).
const MIXED: &str = r#"{
  meta.name = "mixed";
  machines.box1 = { pkgs, ... }: {
    packages = [ pkgs.busybox ];
    keys.token.text = "s3cret";
    services.web.command = [ "${pkgs.busybox}/bin/httpd" "-f" "-p" "80" "-h" "${pkgs.writeTextDir "index.html" "box1"}" ];
  };
  machines.vm1 = { pkgs, ... }: { platform.type = "qemu"; boot.kernel = pkgs.linux; };
}"#;

/// What `vm1`'s rows must say.
const REASON: &str = "its recorded platform options make no sense to this flotilla";

/// Makes machine `machine`'s record name a platform this build does not know, as a newer
/// flotilla sharing the state DB would have recorded it: the way a machine becomes one this
/// flotilla cannot handle now that every platform of the file schema is deployable.
fn unusable(state: &std::path::Path, machine: &str) {
    let db = rusqlite::Connection::open(state).expect("the state DB opens");
    let changed = db
        .execute("UPDATE machines SET platform = 'cloud', platform_spec = '{\"type\":\"cloud\",\"region\":\"eu-1\"}' WHERE name = ?1", [machine])
        .expect("the record is changed");
    assert_eq!(changed, 1, "machine {machine} is recorded");
}

#[track_caller]
fn one_failed_row(f: &Fleet, args: &[&str]) -> String {
    let run = f.run(args);
    let said = format!("{}\n{}", run.stdout(), run.stderr());
    assert_eq!(run.code(), 1, "`{}` must fail for vm1 alone (exit 1):\n{said}", args.join(" "));
    let vm1: Vec<&str> = said.lines().filter(|l| l.trim_start().starts_with("vm1")).collect();
    assert!(vm1.iter().any(|l| l.contains("FAILED") || l.contains(REASON)), "`{}`: vm1 is not one failed row:\n{said}", args.join(" "));
    assert!(said.contains(REASON), "`{}` does not say why vm1 failed:\n{said}", args.join(" "));
    said
}

#[test]
fn a_machine_that_cannot_be_handled_is_one_failed_row_of_every_fleet_command() {
    let f = Fleet::new();
    let file = f.fl.file("mixed.nix", MIXED);

    // `build` records both machines (a system builds whatever its platform); box1 is deployed,
    // then vm1's record is made one this flotilla cannot handle.
    f.run(&["build", "-f", &file]).ok();
    let (code, _, said) = f.deploy_json(&["-f", &file, "--on", "box1"]);
    assert_eq!(code, 0, "{said}");
    // What `ip` says on the way reaches the user only inside a failure's message.
    assert!(!said.lines().any(|l| l.starts_with("Error:")), "a tool's own output reached the terminal:\n{said}");
    unusable(&f.fl.state(), "vm1");

    // info: box1 running and healthy, vm1 one row that says why; exit 0 (info only reports).
    let info = f.info(&file);
    let row = |m: &str| info.iter().find(|i| i["machine"] == m).unwrap_or_else(|| panic!("no {m} in {info:?}")).clone();
    assert_eq!(row("box1")["state"], "running");
    assert_eq!(row("box1")["health"], "healthy", "{:#}", row("box1"));
    assert_eq!(row("vm1")["state"], "unusable", "{:#}", row("vm1"));
    assert!(row("vm1")["problems"].to_string().contains(REASON), "{:#}", row("vm1"));

    one_failed_row(&f, &["check", "-f", &file]);
    one_failed_row(&f, &["upload-keys", "-f", &file]);
    one_failed_row(&f, &["rollback", "-f", &file]);
    let exec = one_failed_row(&f, &["exec", "-f", &file, "--all", "--", "hostname"]);
    assert!(exec.contains("box1 | box1"), "exec --all ran nothing on box1:\n{exec}");
    assert!(!exec.contains("box1: exit"), "exec --all failed on box1:\n{exec}");

    one_failed_row(&f, &["stop", "-f", &file]);
    assert_eq!(f.machine(&file, "box1")["state"], "stopped");
    one_failed_row(&f, &["start", "-f", &file]);
    assert_eq!(f.machine(&file, "box1")["state"], "running");
    one_failed_row(&f, &["reboot", "-f", &file]);
    assert_eq!(f.machine(&file, "box1")["state"], "running");
    let ip = f.machine(&file, "box1")["ip"].as_str().unwrap().to_owned();
    assert_eq!(f.http_get(&format!("http://{ip}/")).as_deref().map(str::trim), Some("box1"));

    // A single-machine command on vm1 says why, naming it.
    let logs = f.run(&["logs", "-f", &file, "vm1"]);
    assert_ne!(logs.code(), 0);
    assert!(logs.stderr().contains(REASON), "{}", logs.stderr());

    // destroy removes box1 entirely and fails for vm1 alone.
    one_failed_row(&f, &["destroy", "-f", &file, "--yes"]);
    assert_eq!(f.info(&file).len(), 1, "box1 is gone from the state, vm1 is not");
    assert!(!f.fl.state().parent().unwrap().join("machines/mixed/box1").exists(), "box1's directory is left");

    // Forgetting asks first: without a terminal to ask on, nothing without --yes.
    let unasked = f.run(&["delete", "-f", &file, "--force"]);
    assert_eq!(unasked.code(), 2, "{}\n{}", unasked.stdout(), unasked.stderr());
    assert!(unasked.stderr().contains("pass --yes to confirm"), "{}", unasked.stderr());
    assert_eq!(f.info(&file).len(), 1, "vm1 was forgotten without being asked");

    // vm1 can never be reached: it is forgotten, and the ledger says nothing was cleaned up.
    let forgot = f.run(&["destroy", "-f", &file, "--on", "vm1", "--forget", "--yes"]).ok();
    assert!(forgot.stdout().contains("forgotten (nothing on its host was cleaned up)"), "{}", forgot.stdout());
    assert!(f.info(&file).is_empty());
    let ledger = f.run(&["log", "--json"]).ok().json();
    let forget = ledger.as_array().unwrap().iter().find(|e| e["kind"] == "forget").unwrap_or_else(|| panic!("no forget event: {ledger:#}"));
    assert_eq!(forget["machine"], "vm1");
    assert_eq!(forget["message"], "machine forgotten: nothing on its host was cleaned up");
}

#[test]
fn a_machine_the_file_no_longer_declares_is_orphaned_and_destroyed_from_the_state() {
    let f = Fleet::new();
    let two = r#"{ meta.name = "orph"; machines.a = { pkgs, ... }: { packages = [ pkgs.busybox ]; }; machines.b = { pkgs, ... }: { packages = [ pkgs.busybox ]; }; }"#;
    let file = f.fl.file("orph.nix", two);
    assert_eq!(f.deploy_json(&["-f", &file]).0, 0);
    f.fl.file("orph.nix", r#"{ meta.name = "orph"; machines.a = { pkgs, ... }: { packages = [ pkgs.busybox ]; }; }"#);

    let b = f.machine(&file, "b");
    assert_eq!(b["health"], "orphaned", "{b:#}");
    assert!(b["problems"].to_string().contains("no longer declares it; `flotilla destroy -d orph --on b --yes` removes it"), "{b:#}");
    assert_eq!(f.machine(&file, "a")["health"], "healthy");
    assert_eq!(f.run(&["check", "-f", &file]).code(), 1, "an orphan is drift");
    let ledger = f.run(&["log", "--json"]).ok().json();
    let check_b = ledger.as_array().unwrap().iter().rev().find(|e| e["kind"] == "check" && e["machine"] == "b").unwrap_or_else(|| panic!("no check of b: {ledger:#}"));
    assert_eq!(check_b["status"], "drift", "the ledger says what the table said: {check_b:#}");

    // A running machine is not forgotten: that would leave it behind.
    let refused = f.run(&["destroy", "-f", &file, "--on", "b", "--forget", "--yes"]);
    assert_eq!(refused.code(), 1);
    assert!(refused.stdout().contains("it is running on its platform, so forgetting it would leave it behind"), "{}", refused.stdout());

    // Destroyed from the state alone: the file has no definition of it any more.
    f.run(&["destroy", "-f", &file, "--on", "b", "--yes"]).ok();
    let left: Vec<String> = f.info(&file).iter().map(|i| i["machine"].as_str().unwrap().to_owned()).collect();
    assert_eq!(left, ["a"]);
    assert!(!f.fl.state().parent().unwrap().join("machines/orph/b").exists(), "b's directory is left");
}

#[test]
fn debug_copy_to_root_leaves_no_agent_running() {
    common::require_prerequisites();
    let fl = Fl::new();
    let root = fl.dir.path().join("machine");
    let src = fl.dir.path().join("payload");
    std::fs::write(&src, "payload\n").unwrap();
    let added = std::process::Command::new("nix-store").arg("--add").arg(&src).output().unwrap();
    assert!(added.status.success(), "{added:?}");
    let path = String::from_utf8(added.stdout).unwrap().trim().to_owned();

    let copied = fl.run(&["debug", "copy-to-root", root.to_str().unwrap(), &path, "--json"]).ok().json();
    assert_eq!(copied["paths_sent"], 1, "{copied}");
    assert!(root.join(path.trim_start_matches('/')).exists());
    assert!(std::os::unix::net::UnixStream::connect(root.join("run/flotilla/agent.sock")).is_err(), "an agent still answers on the root");
    let agents: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("flotilla-agent") && c.contains(root.to_str().unwrap()))
        .collect();
    assert!(agents.is_empty(), "agents left running: {agents:?}");
}

#[test]
fn output_into_a_reader_that_went_away_ends_quietly() {
    common::require_prerequisites();
    let fl = Fl::new();
    for args in [&["options"][..], &["man"], &["completions", "bash"], &["deploy", "--help"]] {
        // The pipe's reading end is closed before flotilla writes a byte.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3>&1; { sleep 0.3; \"$0\" \"$@\"; echo \"status $?\" >&3; } | sh -c 'exec 0<&-; sleep 2'")
            .arg(fl.cmd().get_program())
            .args(args)
            .envs(fl.cmd().get_envs().filter_map(|(k, v)| Some((k, v?))))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(said.trim(), "status 0", "`flotilla {}` into a closed pipe: {said}\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "`flotilla {}` into a closed pipe said: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn a_deploy_whose_reader_went_away_still_runs_to_its_end() {
    let f = Fleet::new();
    let file = f.fl.file("gone.nix", &common::web_deployment("gone", "v1", ""));
    // `deploy --json | head -n 1`: the reader leaves after the first event.
    let line = f.cmd_line(&["deploy", "--json", "-f", &file]);
    let out = f
        .fl_env(std::process::Command::new("sh"))
        .arg("-c")
        .arg(format!("exec 3>&1; {{ {line}; echo \"status $?\" >&3; }} | head -n 1 >/dev/null"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "status 0", "{}", String::from_utf8_lossy(&out.stderr));
    // The deploy went on: the machine runs generation 1, recorded, and the lock is released.
    let web = f.machine(&file, "web");
    assert_eq!((web["state"].clone(), web["generation"].clone(), web["recorded_generation"].clone()), ("running".into(), 1.into(), 1.into()), "{web:#}");
    let (code, _, said) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{said}");
}
