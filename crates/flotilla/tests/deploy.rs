//! `flotilla deploy` and the fleet commands end to end, on the local platform: real
//! namespace containers, real veths and a real bridge, all inside a network namespace each
//! test makes for itself (see `common::Fleet`), real Nix builds and the real agent as each
//! container's PID 1.

mod common;

use std::path::Path;

use common::{example, row, Fleet};
use serde_json::Value;

fn outcomes(report: &Value) -> Vec<(String, String)> {
    report["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["machine"].as_str().unwrap().to_owned(), m["outcome"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn the_example_fleet_deploys_serves_and_redeploys_as_a_no_op() {
    let f = Fleet::new();
    let file = example();
    let (code, report, stderr) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(
        outcomes(&report),
        [("monitor", "deployed"), ("vm1", "deployed"), ("web1", "deployed"), ("web2", "deployed")].map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    for m in ["web1", "web2", "vm1", "monitor"] {
        assert_eq!(row(&report, m)["generation"], 1);
    }

    // From the host: at the machine's address, and through the forwarded loopback port.
    let web1 = f.machine(&file, "web1");
    let ip = web1["ip"].as_str().unwrap().to_owned();
    let page = f.http_get(&format!("http://{ip}/")).expect("web1 answers on its address");
    assert!(page.contains("Hello from web1"), "{page}");
    let page = f.http_get("http://127.0.0.1:8082/").expect("web2 answers on its forwarded port");
    assert!(page.contains("Hello from web2"), "{page}");

    // From the monitor: by name (/etc/hosts) and by nodes.web1.ip (its targets file).
    let r = f.run(&["exec", "monitor", "--", "wget", "-q", "-O", "-", "http://web1/"]).ok();
    assert!(r.stdout().contains("Hello from web1"), "{}", r.stdout());
    let targets = f.run(&["exec", "monitor", "--", "cat", "/etc/monitor/targets"]).ok().stdout();
    assert!(targets.contains(&format!("http://{ip}/")), "{targets}");
    let r = f.run(&["exec", "monitor", "--", "wget", "-q", "-O", "-", &format!("http://{ip}/")]).ok();
    assert!(r.stdout().contains("Hello from web1"));
    // The VM on the same bridge: by name from a container, and its own kernel.
    let r = f.run(&["exec", "monitor", "--", "wget", "-q", "-O", "-", "http://vm1/"]).ok();
    assert!(r.stdout().contains("Hello from vm1"), "{}", r.stdout());
    let page = f.http_get("http://127.0.0.1:8083/").expect("vm1 answers on its forwarded port");
    assert!(page.contains("Hello from vm1"), "{page}");
    let vm_kernel = f.run(&["exec", "vm1", "--", "uname", "-r"]).ok().stdout();
    assert!(vm_kernel.trim().ends_with("-cloud-amd64"), "vm1 runs the demo set's kernel: {vm_kernel}");

    // info: all running, healthy, on generation 1 with their services up.
    for m in f.info(&file) {
        assert_eq!(m["state"], "running", "{m:#}");
        assert_eq!(m["health"], "healthy", "{m:#}");
        assert_eq!(m["generation"], 1, "{m:#}");
        assert_eq!(m["services_up"], m["services_total"], "{m:#}");
        assert_eq!(m["services_up"], 1, "{m:#}");
    }
    let table = f.run(&["info", "-f", &file]).ok().stdout();
    assert!(table.lines().any(|l| l.starts_with("web1") && l.contains("running") && l.contains("1/1") && l.contains("healthy")), "{table}");

    // Every machine has its own hostname and PID namespace, with the agent as PID 1.
    let r = f.run(&["exec", "--all", "--", "sh", "-c", "echo $(hostname) $(cat /proc/1/comm)"]).ok();
    let out = r.stdout();
    for m in ["web1", "web2", "vm1", "monitor"] {
        assert!(out.lines().any(|l| l.starts_with(m) && l.ends_with(&format!("| {m} flotilla-agent"))), "{out}");
    }
    let r = f.run(&["exec", "--all", "--", "sh", "-c", "test $(hostname) = web2"]);
    assert_eq!(r.code(), 1, "{}", r.stderr());
    assert!(r.stderr().contains("failed on 3 of 4 machines"), "{}", r.stderr());
    assert_eq!(f.run(&["exec", "web1", "--", "sh", "-c", "exit 7"]).code(), 7);
    assert_eq!(f.run(&["exec", "web1", "--", "pwd"]).ok().stdout(), "/\n");

    // An interactive shell, on a terminal that util-linux's `script` provides.
    let shell = f.cmd_line(&["shell", "web1"]);
    let mut script = f.fl_env(std::process::Command::new("script"));
    let mut child = script
        .args(["-qec", &shell, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("prerequisite missing: script (Debian: bsdutils)");
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(b"echo inside-$(hostname); exit 3\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("inside-web1"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(3), "the shell's exit status passes through");

    // Service logs: the monitor's poll reports both web servers up; all of web1's logs are
    // prefixed by service; an unknown service is named.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let out = f.run(&["logs", "monitor", "poll"]).ok().stdout();
        if out.contains(&format!("up   http://{ip}/")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the monitor never reported web1 up:\n{out}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let r = f.run(&["logs", "web1", "nope"]);
    assert_eq!(r.code(), 2);
    assert!(r.stderr().contains("machine web1: no log for service `nope`") && r.stderr().contains("services with logs: httpd"), "{}", r.stderr());

    // A no-op redeploy asks each machine one question, copies nothing, restarts nothing,
    // and says so.
    let (code, again, stderr) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{again:#}\n{stderr}");
    for m in ["web1", "web2", "vm1", "monitor"] {
        let r = row(&again, m);
        assert_eq!(r["outcome"], "unchanged", "{r:#}");
        assert_eq!(r["generation"], 1);
        assert!(r["copy"].is_null() && r["activation"].is_null(), "nothing was copied or activated: {r:#}");
    }
    // --reactivate activates them all the same: nothing copied, nothing restarted.
    let (code, again, stderr) = f.deploy_json(&["-f", &file, "--reactivate"]);
    assert_eq!(code, 0, "{again:#}\n{stderr}");
    for m in ["web1", "web2", "vm1", "monitor"] {
        let r = row(&again, m);
        assert_eq!(r["outcome"], "unchanged", "{r:#}");
        assert_eq!(r["generation"], 1);
        assert_eq!(r["copy"]["paths_sent"], 0);
        assert_eq!(r["activation"]["services_restarted"], Value::Array(vec![]));
    }
    let plain = f.run(&["deploy", "-f", &file]).ok();
    assert!(plain.stdout().contains("unchanged: nothing copied, nothing restarted"), "{}", plain.stdout());

    // The ledger has it all, each event under its own kind with its own status: every
    // machine provisioned and generation 1 activated, the deploy, and the commands run.
    let log = f.run(&["log", "--json", "-n", "1000", "-d", "webfleet"]).ok().json();
    let events = log.as_array().unwrap_or_else(|| panic!("the ledger is not a list: {log:#}"));
    let has = |machine: Option<&str>, kind: &str, status: &str| {
        events.iter().any(|e| e["machine"].as_str() == machine && e["kind"] == kind && e["status"] == status)
    };
    for m in ["web1", "web2", "vm1", "monitor"] {
        assert!(has(Some(m), "provision", "ok"), "no provision of {m} in the ledger:\n{log:#}");
        let activated = events.iter().any(|e| e["machine"] == m && e["kind"] == "activate" && e["status"] == "ok" && e["details"]["generation"] == 1);
        assert!(activated, "no activation of {m}'s generation 1 in the ledger:\n{log:#}");
    }
    assert!(events.iter().any(|e| e["kind"] == "deploy" && e["status"] == "ok"), "no deploy in the ledger:\n{log:#}");
    assert!(has(Some("web1"), "exec", "ok") && has(Some("web1"), "exec", "failed"), "the commands run on web1 are not in the ledger:\n{log:#}");
    assert!(!events.iter().any(|e| e["status"] == "failed" && e["kind"] != "exec"), "a failure in the ledger of a deploy that worked:\n{log:#}");
}

#[test]
fn stop_start_and_reboot_keep_the_generation_and_destroy_leaves_nothing() {
    let f = Fleet::new();
    let file = example();
    let (code, report, stderr) = f.deploy_json(&["-f", &file, "--on", "web1,monitor"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let before = f.machine(&file, "web1");
    let ip = before["ip"].as_str().unwrap().to_owned();
    let res = before["resources"].clone();

    f.run(&["stop", "-f", &file, "--on", "web1"]).ok();
    let web1 = f.machine(&file, "web1");
    assert_eq!(web1["state"], "stopped");
    assert!(f.host(&["curl", "-sf", "--max-time", "2", &format!("http://{ip}/")]).code() != 0, "a stopped machine still answers");
    assert!(!common::alive(res["init_pid"].as_str().unwrap().parse().unwrap()), "the stopped container's init still runs");

    f.run(&["start", "-f", &file, "--on", "web1"]).ok();
    let web1 = f.machine(&file, "web1");
    assert_eq!((web1["state"].as_str(), web1["generation"].as_u64(), web1["health"].as_str()), (Some("running"), Some(1), Some("healthy")), "{web1:#}");
    assert!(f.http_get(&format!("http://{ip}/")).unwrap().contains("Hello from web1"));

    f.run(&["reboot", "-f", &file, "--on", "web1,monitor"]).ok();
    let r = f.run(&["reboot", "-f", &file, "--on", "web2"]);
    assert_eq!(r.code(), 1, "web2 was never deployed");
    assert!(r.stdout().contains("it does not exist; deploy it"), "{}", r.stdout());
    for m in f.info(&file).into_iter().filter(|m| m["machine"] != "web2" && m["machine"] != "vm1") {
        assert_eq!((m["state"].as_str(), m["generation"].as_u64(), m["health"].as_str()), (Some("running"), Some(1), Some("healthy")), "{m:#}");
    }
    let after = f.machine(&file, "web1")["resources"].clone();
    assert_ne!(after["init_pid"], res["init_pid"], "reboot did not restart the container");
    assert!(f.http_get(&format!("http://{ip}/")).unwrap().contains("Hello from web1"));

    // Destroy without a terminal and without --yes is refused, changing nothing.
    let r = f.run(&["destroy", "-f", &file]);
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(r.stderr().contains("pass --yes"), "{}", r.stderr());
    assert_eq!(f.machine(&file, "web1")["state"], "running");

    // Forgetting a deployment whose machines still exist would orphan them: refused.
    let r = f.run(&["delete", "-d", "webfleet"]);
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(r.stderr().contains("still has machines (monitor, web1)") && r.stderr().contains("flotilla destroy -d webfleet --yes"), "{}", r.stderr());

    let infos = f.info(&file);
    f.run(&["destroy", "-f", &file, "--yes"]).ok();
    for m in &infos {
        let r = &m["resources"];
        let name = m["machine"].as_str().unwrap();
        if name == "vm1" {
            // Never deployed here: nothing of it may exist.
            let disk = Path::new(r["disk"].as_str().unwrap_or_else(|| panic!("vm1: no disk in {m:#}")));
            assert!(!disk.parent().unwrap().exists(), "vm1: its directory exists");
            continue;
        }
        if name != "web2" {
            for pid in ["init_pid", "monitor_pid"] {
                let pid: u32 = r[pid].as_str().unwrap_or_else(|| panic!("{name}: no {pid} in {m:#}")).parse().unwrap();
                assert!(!common::alive(pid), "{name}: process {pid} survived destroy");
            }
        }
        assert!(!Path::new("/run/netns").join(r["netns"].as_str().unwrap()).exists(), "{name}: its network namespace survived");
        assert_ne!(f.host(&["ip", "link", "show", "dev", r["veth"].as_str().unwrap()]).code(), 0, "{name}: its veth survived");
        assert!(!Path::new(r["root"].as_str().unwrap()).exists(), "{name}: its root directory survived");
    }
    let bridge = infos[0]["resources"]["bridge"].as_str().unwrap();
    assert_ne!(f.host(&["ip", "link", "show", "dev", bridge]).code(), 0, "the bridge survived its last machine");
    assert!(f.run(&["info", "-f", &file, "--json"]).ok().json()["machines"].as_array().unwrap().is_empty());
    let log = f.run(&["log", "-d", "webfleet"]).ok().stdout();
    assert!(log.contains("destroy") && log.contains("machine destroyed"), "{log}");
    // Destroyed machines' builds are no longer kept from the garbage collector.
    let roots = f.fl.dir.path().join("state/gcroots/webfleet");
    assert!(!roots.join("web1").exists() && !roots.join("monitor").exists(), "GC roots survived destroy");
    f.run(&["delete", "-d", "webfleet"]).ok();
}

#[test]
fn a_changed_machine_is_the_only_one_redeployed_and_a_failed_build_fails_only_its_machine() {
    let f = Fleet::new();
    let original = std::fs::read_to_string(example()).unwrap();
    let file = f.fl.file("deployment.nix", &original);
    let (code, report, stderr) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");

    // web2 only: a different page, and a marker file.
    let changed = original.replace(
        "      web2 = webServer;",
        "      web2 = args: args.lib.merge (webServer args) { files.\"/etc/marker\".text = \"v2\\n\"; };",
    );
    assert_ne!(changed, original, "the example changed shape; update this test");
    let file2 = f.fl.file("deployment.nix", &changed);
    assert_eq!(file2, file);
    let (code, report, stderr) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(
        outcomes(&report),
        [("monitor", "unchanged"), ("vm1", "unchanged"), ("web1", "unchanged"), ("web2", "deployed")].map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    assert_eq!(row(&report, "web2")["generation"], 2);
    assert_eq!(row(&report, "web1")["generation"], 1);
    assert_eq!(f.run(&["exec", "web2", "--", "cat", "/etc/marker"]).ok().stdout(), "v2\n");

    // A machine whose build fails, selected by tag with another that builds: exit 1, the
    // table says why, the other one is deployed, the unselected one is left alone.
    let broken = changed.replace(
        "      web1 = webServer;",
        "      web1 = args: args.lib.merge (webServer args) { packages = [ (args.pkgs.runCommand \"broken-tool\" {} \"echo the tool does not compile >&2; exit 1\") ]; };",
    );
    let broken = broken.replace("\"v2\\n\"", "\"v3\\n\"");
    f.fl.file("deployment.nix", &broken);
    let r = f.run(&["deploy", "-f", &file, "--on", "@web"]);
    assert_eq!(r.code(), 1, "{}\n{}", r.stdout(), r.stderr());
    let table = r.stdout();
    let web1 = table.lines().find(|l| l.starts_with("web1")).unwrap_or_else(|| panic!("{table}"));
    assert!(web1.contains("FAILED") && web1.contains("build"), "{table}");
    assert!(r.stderr().contains("the tool does not compile") || table.contains("broken-tool"), "{table}\n{}", r.stderr());
    let web2 = table.lines().find(|l| l.starts_with("web2")).unwrap();
    assert!(web2.contains("deployed"), "{table}");
    assert!(!table.contains("monitor"), "monitor was not selected:\n{table}");
    assert_eq!(f.run(&["exec", "web2", "--", "cat", "/etc/marker"]).ok().stdout(), "v3\n");
    assert_eq!(f.machine(&file, "web1")["generation"], 1, "web1 keeps running its last good system");
    assert_eq!(f.machine(&file, "monitor")["generation"], 1);
}

/// `flotilla ARGS`, failing the test when it has not finished within `secs`: a command that
/// waited on a held lock would hang. Output goes to files, so a full pipe never stalls it.
fn finishes_within(f: &Fleet, args: &[&str], secs: u64) -> common::Run {
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    let mut child = common::KillOnDrop(f.cmd().args(args).stdout(out.try_clone().unwrap()).stderr(err.try_clone().unwrap()).spawn().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "`flotilla {}` did not finish within {secs} s: it waits on the lock", args.join(" "));
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let read = |mut file: std::fs::File| {
        use std::io::{Read as _, Seek as _};
        let mut bytes = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut bytes).unwrap();
        bytes
    };
    common::Run(std::process::Output { status, stdout: read(out), stderr: read(err) })
}

/// A deploy of `file` that holds the lock until the test lets it go: its deployer's own check
/// (`checks.gate`) asks 127.0.0.1:`port` in the test's namespace, where nothing answers until
/// the test serves a page there. Returns once the deploy is in that check. With
/// `--reactivate`, a machine that runs its system already is activated and checked too.
fn held_deploy(f: &Fleet, file: &str) -> (common::KillOnDrop, std::thread::JoinHandle<Vec<String>>) {
    use std::io::BufRead as _;
    let mut child = common::KillOnDrop(
        f.cmd().args(["deploy", "--json", "-f", file, "--confirm-timeout", "0", "--reactivate"]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn().unwrap(),
    );
    let mut lines = std::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("\"machine-phase\"") && line.contains("\"phase\":\"check\"") {
            let rest = std::thread::spawn(move || seen.into_iter().chain(lines.map_while(Result::ok)).collect());
            return (child, rest);
        }
    }
    panic!("the deploy ended without reaching its own check: {seen:?}");
}

fn gated_deployment(name: &str, port: u16) -> String {
    common::web_deployment(name, "gated", &format!(r#"checks.gate = {{ http = "http://127.0.0.1:{port}/"; interval = 1; retries = 600; timeout = 1; }};"#))
}

#[test]
fn a_second_deploy_is_refused_while_one_runs_and_a_dead_holder_is_taken_over() {
    let f = Fleet::new();
    const GATE: u16 = 8765;
    let file = f.fl.file("gated.nix", &gated_deployment("locked", GATE));
    // The first deploy holds the lock, blocked in its own check until the gate opens.
    let (mut first, first_out) = held_deploy(&f, &file);
    let r = f.run(&["deploy", "-f", &file]);
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(r.stderr().contains("deployment `locked` is locked by") && r.stderr().contains(&format!("pid {}", first.0.id())), "{}", r.stderr());
    assert!(first.0.try_wait().unwrap().is_none(), "the first deploy ended before the second was refused: the refusal proves nothing");
    // Read-only commands do not wait on it: they finish while the lock is still held.
    assert!(finishes_within(&f, &["log", "-d", "locked"], 60).ok().stdout().contains("locked"));
    let list = finishes_within(&f, &["list", "--json"], 60).ok().json();
    assert_eq!(list[0]["name"], "locked", "{list:#}");
    let info = finishes_within(&f, &["info", "-d", "locked", "--json"], 60).ok().json();
    assert_eq!(info["machines"][0]["machine"], "web", "{info:#}");
    assert!(first.0.try_wait().unwrap().is_none(), "the first deploy ended while the read-only commands ran");
    // Open the gate: the first deploy passes its check and finishes.
    let www = f.fl.dir.path().join("gate");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "open\n").unwrap();
    let _gate = common::KillOnDrop(f.in_ns_command(&["busybox", "httpd", "-f", "-p", &format!("127.0.0.1:{GATE}"), "-h", www.to_str().unwrap()]).spawn().unwrap());
    let status = first.0.wait().unwrap();
    let out = first_out.join().unwrap();
    assert!(status.success(), "{out:?}");
    assert!(out.last().is_some_and(|l| l.contains("\"outcome\":\"deployed\"")), "{out:?}");
    drop(_gate);

    // A deploy killed while holding the lock leaves it behind; the next one takes it over.
    f.fl.file("gated.nix", &gated_deployment("locked", GATE + 1));
    let (mut doomed, _) = held_deploy(&f, &file);
    // nsenter execs flotilla, so the child's pid is flotilla's.
    doomed.stop();
    f.fl.file("gated.nix", &common::web_deployment("locked", "free", ""));
    let r = f.run(&["deploy", "-f", &file]).ok();
    assert!(r.stderr().contains("took over the lock of deployment `locked`"), "{}", r.stderr());
}

#[test]
fn a_machine_that_cannot_start_is_reported_and_leaves_nothing_half_made() {
    let f = Fleet::new();
    let file = example();
    // Something on the host already listens on web1's forwarded port.
    let mut squatter = common::KillOnDrop(f.in_ns_command(&["busybox", "httpd", "-f", "-p", "127.0.0.1:8081", "-h", "/"]).spawn().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while f.host(&["curl", "-s", "--max-time", "1", "http://127.0.0.1:8081/"]).code() == 7 {
        assert!(std::time::Instant::now() < deadline, "the squatter never listened");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (code, report, stderr) = f.deploy_json(&["-f", &file, "--on", "web1,web2"]);
    squatter.stop();
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    let web1 = row(&report, "web1");
    assert_eq!(web1["outcome"], "failed");
    assert_eq!(web1["failed_phase"], "provision");
    let error = web1["error"].as_str().unwrap();
    assert!(error.contains("cannot bind 127.0.0.1:8081") && error.contains("Address already in use"), "{error}");
    assert_eq!(row(&report, "web2")["outcome"], "deployed", "one machine's failure never stops the others");
    // Nothing of web1 was left half-made.
    let web1 = f.machine(&file, "web1");
    assert_eq!(web1["state"], "missing", "{web1:#}");
    assert!(!Path::new(web1["resources"]["root"].as_str().unwrap()).exists());
    assert!(!Path::new("/run/netns").join(web1["resources"]["netns"].as_str().unwrap()).exists());
    assert_ne!(f.host(&["ip", "link", "show", "dev", web1["resources"]["veth"].as_str().unwrap()]).code(), 0);
    // Once the port is free, the next deploy makes it.
    let (code, report, stderr) = f.deploy_json(&["-f", &file, "--on", "web1,web2"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(row(&report, "web1")["outcome"], "deployed");
    assert!(f.http_get("http://127.0.0.1:8081/").unwrap().contains("Hello from web1"));
}
