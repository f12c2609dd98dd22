//! The ssh platform end to end, against real hosts: each a network namespace with a root of
//! its own running Debian's OpenSSH server (`common::sshhost`), reached by the real ssh
//! client from the test's own namespace. Real Nix, the real agent, no Nix on most hosts.

mod common;

use common::sshhost::{HostOpts, SshHost, SshLab, SudoRule};
use common::{row, Fleet, Run};

/// A deployment of web servers on ssh hosts, each `(name, host address, login user, page)`.
/// The page is on port 8080: the service runs as an unprivileged user, and a real host keeps
/// ports below 1024 for root.
fn ssh_fleet(lab: &SshLab, machines: &[(&str, &str, &str, &str)], extra: &str) -> String {
    let opts: String = lab.ssh_options().iter().map(|o| format!("{o:?} ")).collect();
    let key = lab.identity_file();
    let defs: String = machines
        .iter()
        .map(|(name, addr, user, page)| {
            format!(
                r#"
    {name} = {{ pkgs, ... }}: let
        site = pkgs.runCommand "site-{name}" {{}} ''
          mkdir $out
          echo '{page}' > $out/index.html
        '';
      in {{
        platform = {{ type = "ssh"; host = "{addr}"; user = "{user}"; identityFile = "{key}"; sshOptions = [ {opts}]; }};
        packages = [ pkgs.busybox ];
        files."/etc/flotilla-page".text = "{page}\n";
        users.www = {{ home = "/var/empty"; }};
        services.httpd = {{
          command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "8080" "-h" "${{site}}" ];
          user = "www";
          healthCheck = {{ http = "http://127.0.0.1:8080/"; interval = 1; retries = 5; timeout = 2; }};
        }};
        {extra}
      }};"#,
                key = key.display()
            )
        })
        .collect();
    format!("{{ meta.name = \"sshfleet\"; machines = {{{defs}\n  }}; }}\n")
}

fn page(f: &Fleet, host: &SshHost) -> Option<String> {
    f.http_get(&format!("http://{}:8080/", host.address())).map(|p| p.trim().to_owned())
}

/// Logins sshd accepted so far (one per TCP connection).
fn logins(host: &SshHost) -> usize {
    host.sshd_log().matches("Accepted publickey").count()
}

fn ok(r: Run, what: &str) -> Run {
    assert_eq!(r.code(), 0, "{what} failed\nstdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
    r
}

/// Files the agent leaves on a host while it manages it.
fn flotilla_traces(host: &SshHost) -> Vec<String> {
    let root = host.root();
    let mut found: Vec<String> = [
        "nix/var/flotilla",
        "run/flotilla",
        "var/log/flotilla",
        "var/log/flotilla-agent.log",
        "nix/var/nix/gcroots/flotilla",
        "etc/flotilla-page",
        "run/current-system",
    ]
        .iter()
        .filter(|p| std::fs::symlink_metadata(root.join(p)).is_ok())
        .map(|p| format!("/{p}"))
        .collect();
    if let Ok(d) = std::fs::read_dir(root.join("nix/store")) {
        found.extend(d.flatten().map(|e| format!("/nix/store/{}", e.file_name().to_string_lossy())));
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    if passwd.lines().any(|l| l.starts_with("www:")) {
        found.push("user www".into());
    }
    found
}

/// The host's account files, to compare with what they were before flotilla came.
fn accounts(host: &SshHost) -> Vec<(&'static str, String)> {
    ["etc/passwd", "etc/group", "etc/shadow", "etc/gshadow"]
        .into_iter()
        .map(|f| (f, std::fs::read_to_string(host.root().join(f)).unwrap_or_else(|e| panic!("cannot read {f} of {}: {e}", host.name()))))
        .collect()
}

/// Waits until no ssh session of `user` is left on `host` (sshd's per-connection processes).
fn wait_until_no_ssh_session(host: &SshHost, user: &str) {
    let session = format!("sshd: {user}");
    let start = std::time::Instant::now();
    loop {
        let left: Vec<_> = host.processes().into_iter().filter(|(_, cmd)| cmd.starts_with(&session)).collect();
        if left.is_empty() {
            return;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "{user}'s ssh sessions are still open on {}: {left:?}", host.name());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn first_deploy_bootstraps_the_agent_then_noop_change_rollback_stop_start_and_destroy() {
    let f = Fleet::new();
    let lab = SshLab::new(&f.ns);
    let host = lab.host("web1", HostOpts::default());
    let accounts_before = accounts(&host);
    assert!(flotilla_traces(&host).is_empty(), "a fresh host has no flotilla: {:?}", flotilla_traces(&host));

    // First deploy: the agent is copied (by its store path) and started detached: no systemd.
    let v1 = f.fl.file("sshfleet.nix", &ssh_fleet(&lab, &[("web1", &host.address(), "root", "one")], ""));
    let before = logins(&host);
    let (code, report, out) = f.deploy_json(&["-f", &v1]);
    assert_eq!(code, 0, "{out}\nsshd:\n{}", host.sshd_log());
    assert!(out.contains("agent copied") && out.contains("detached") && out.contains("flotilla start web1"), "the deploy says how the agent runs: {out}");
    assert_eq!(row(&report, "web1")["outcome"], "deployed", "{report:#}");
    assert_eq!(logins(&host) - before, 1, "one ssh connection for the whole deploy\n{}", host.sshd_log());
    assert_eq!(page(&f, &host).as_deref(), Some("one"));
    let agent = std::fs::read_link(host.root().join("nix/var/flotilla/bin/flotilla-agent")).expect("the agent link");
    assert!(agent.starts_with("/nix/store") && host.root().join(agent.strip_prefix("/").unwrap()).is_file(), "{agent:?}");
    assert_eq!(std::fs::read_to_string(host.root().join("etc/flotilla-page")).unwrap(), "one\n");
    // What destroy must take away is there now, so the checks after it can see it.
    let traces = flotilla_traces(&host);
    for t in ["/nix/var/flotilla", "/run/flotilla", "/var/log/flotilla-agent.log", "/etc/flotilla-page", "user www"] {
        assert!(traces.iter().any(|x| x == t), "{t} is not among the traces after a deploy: {traces:?}");
    }
    assert_ne!(accounts(&host), accounts_before, "the deploy added the user www");

    // The deployer leaving does not stop anything: the page is served once its ssh
    // connection is gone from the host.
    wait_until_no_ssh_session(&host, "root");
    assert_eq!(page(&f, &host).as_deref(), Some("one"));

    // No-op redeploy: nothing copied, nothing restarted, one connection again.
    let before = logins(&host);
    let (code, report, out) = f.deploy_json(&["-f", &v1]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "web1")["outcome"], "unchanged", "{report:#}");
    assert_eq!(logins(&host) - before, 1, "{}", host.sshd_log());

    // A change.
    let v2 = f.fl.file("sshfleet.nix", &ssh_fleet(&lab, &[("web1", &host.address(), "root", "two")], ""));
    let (code, report, out) = f.deploy_json(&["-f", &v2]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "web1")["outcome"], "deployed");
    assert_eq!(page(&f, &host).as_deref(), Some("two"));

    // exec runs as root on the host; logs come from the host; info sees it running.
    let r = ok(f.run(&["exec", "-f", &v2, "web1", "--", "sh", "-c", "id -u; cat /etc/flotilla-page"]), "exec");
    assert_eq!(r.stdout(), "0\ntwo\n");
    // The supervisor's own lines in the service's log, read on the host through ssh.
    let r = ok(f.run(&["logs", "-f", &v2, "web1", "httpd"]), "logs");
    assert!(r.stdout().contains("-- flotilla-agent: started"), "{}", r.stdout());
    let info = f.machine(&v2, "web1");
    assert_eq!(info["state"], "running", "{info:#}");
    assert_eq!(info["platform"], "ssh", "{info:#}");

    // Rollback to generation 1.
    ok(f.run(&["rollback", "-f", &v2, "--on", "web1"]), "rollback");
    assert_eq!(page(&f, &host).as_deref(), Some("one"));
    let gens = f.run(&["generations", "-f", &v2, "web1", "--json"]).ok().json();
    let current: Vec<u64> = gens.as_array().unwrap().iter().filter(|g| g["current"] == true).filter_map(|g| g["number"].as_u64()).collect();
    assert_eq!(current, [1], "{gens:#}");

    // Stop and start act on the agent and its services.
    ok(f.run(&["stop", "-f", &v2, "--on", "web1"]), "stop");
    assert_eq!(f.machine(&v2, "web1")["state"], "stopped");
    assert!(f.host(&["curl", "-sf", "--max-time", "2", &format!("http://{}:8080/", host.address())]).code() != 0, "stopped services do not answer");
    ok(f.run(&["start", "-f", &v2, "--on", "web1"]), "start");
    assert_eq!(page(&f, &host).as_deref(), Some("one"), "the rolled-back generation comes back");

    // Destroy removes flotilla from the host and leaves the host.
    ok(f.run(&["destroy", "-f", &v2, "--yes"]), "destroy");
    assert!(flotilla_traces(&host).is_empty(), "left on the host: {:?}", flotilla_traces(&host));
    // Exactly as they were, but for the groups every machine has (`nobody` on Debian, which
    // names gid 65534 `nogroup`): the agent adds them and uninstall by design never removes them.
    for ((file, after), (_, before)) in accounts(&host).iter().zip(&accounts_before) {
        let mut expected = before.clone();
        let added = match *file {
            "etc/group" => ":x:65534:\n",
            "etc/gshadow" => ":!::\n",
            _ => "",
        };
        if !added.is_empty() {
            for name in ["nogroup", "nobody"].into_iter().filter(|g| !before.lines().any(|l| l.split(':').next() == Some(*g))) {
                expected.push_str(&format!("{name}{added}"));
            }
        }
        assert_eq!(after, &expected, "the host's /{file} is not as it was");
    }
    assert!(host.run(&["sh", "-c", "ps -eo args | grep -v grep | grep -c flotilla-agent"]).stdout().trim() == "0", "no agent runs");
    assert_eq!(lab.ssh(&host, "root", "echo still here").stdout().trim(), "still here");
    assert!(f.info(&v2).is_empty(), "web1 is forgotten: {:?}", f.info(&v2));
}

#[test]
fn a_non_root_user_deploys_through_passwordless_sudo_and_one_that_would_be_asked_a_password_is_refused() {
    let f = Fleet::new();
    let lab = SshLab::new(&f.ns);
    let good = lab.host("good", HostOpts::default().user("deploy", SudoRule::Passwordless));
    let asks = lab.host("asks", HostOpts::default().user("deploy", SudoRule::Password));
    let file = f.fl.file(
        "sshfleet.nix",
        &ssh_fleet(&lab, &[("good", &good.address(), "deploy", "sudo works"), ("asks", &asks.address(), "deploy", "never")], ""),
    );
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(row(&report, "good")["outcome"], "deployed", "{report:#}");
    assert_eq!(page(&f, &good).as_deref(), Some("sudo works"));
    let agent_user = good.run(&["sh", "-c", "ps -o user=,args= -e | grep 'flotilla-agent init' | grep -v grep"]).stdout();
    assert!(agent_user.trim_start().starts_with("root"), "the agent runs as root: {agent_user}");

    let bad = row(&report, "asks");
    let error = bad["error"].as_str().unwrap_or_default();
    assert_eq!(bad["outcome"], "failed", "{report:#}");
    assert!(error.contains("sudo would ask for a password") && error.contains("NOPASSWD") && error.contains("platform.user"), "{error}");
    assert!(flotilla_traces(&asks).is_empty(), "nothing was done on the host whose sudo asks: {:?}", flotilla_traces(&asks));
}

#[test]
fn an_unreachable_host_and_a_changed_host_key_fail_alone_with_clear_errors() {
    let f = Fleet::new();
    let lab = SshLab::new(&f.ns);
    let good = lab.host("good", HostOpts::default());
    let changed = lab.host("changed", HostOpts::default());
    lab.replace_host_key(&changed);
    let file = f.fl.file(
        "sshfleet.nix",
        &ssh_fleet(&lab, &[("good", &good.address(), "root", "fine"), ("gone", "10.250.0.99", "root", "x"), ("changed", &changed.address(), "root", "x")], ""),
    );
    let logins_before = logins(&changed);
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(row(&report, "good")["outcome"], "deployed", "{report:#}");
    assert_eq!(page(&f, &good).as_deref(), Some("fine"));

    let gone = row(&report, "gone")["error"].as_str().unwrap_or_default().to_owned();
    assert!(gone.contains("cannot reach root@10.250.0.99") && gone.contains("platform.host"), "{gone}");
    let key = row(&report, "changed")["error"].as_str().unwrap_or_default().to_owned();
    assert!(key.contains("host key does not match") && key.contains(&format!("ssh-keygen -R {}", changed.address())), "{key}");
    assert!(flotilla_traces(&changed).is_empty(), "nothing reached the host with the changed key: {:?}", flotilla_traces(&changed));
    assert_eq!(logins(&changed), logins_before, "no login on it: {}", changed.sshd_log());
}

#[test]
fn an_agent_that_speaks_an_older_protocol_is_replaced_by_the_deploy() {
    let f = Fleet::new();
    let lab = SshLab::new(&f.ns);
    let host = lab.host("web1", HostOpts::default());
    let file = f.fl.file("sshfleet.nix", &ssh_fleet(&lab, &[("web1", &host.address(), "root", "kept")], ""));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");

    // Test double for an older release: the same agent, started so that it speaks only
    // protocol 1 (FLOTILLA_AGENT_TEST_PLAY_PROTOCOL, honoured by debug builds only).
    let played = host.run(&["sh", "-c", "/nix/var/flotilla/bin/flotilla-agent stop && FLOTILLA_AGENT_TEST_PLAY_PROTOCOL=1 /nix/var/flotilla/bin/flotilla-agent init --detach"]);
    assert_eq!(played.code(), 0, "{}", played.stderr());
    let refused = f.run(&["generations", "-f", &file, "web1"]);
    assert_ne!(refused.code(), 0, "this flotilla cannot talk to the old agent: {}", refused.stdout());
    assert!(refused.stderr().contains("older"), "{}", refused.stderr());

    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("older protocol") && out.contains("restarted"), "the deploy says it replaced the agent: {out}");
    assert_eq!(row(&report, "web1")["outcome"], "unchanged", "{report:#}");
    assert_eq!(page(&f, &host).as_deref(), Some("kept"));
    ok(f.run(&["generations", "-f", &file, "web1"]), "generations with the new agent");
}

#[test]
fn on_a_host_with_nix_flotillas_paths_survive_its_garbage_collector_and_destroy_leaves_its_store_alone() {
    let f = Fleet::new();
    let lab = SshLab::new(&f.ns);
    let host = lab.host("nixhost", HostOpts::default().nix());
    let file = f.fl.file("sshfleet.nix", &ssh_fleet(&lab, &[("nixhost", &host.address(), "root", "with nix")], ""));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the host has Nix"), "{out}");
    let toplevel = row(&report, "nixhost")["toplevel"].as_str().unwrap().to_owned();
    let gcroots = host.root().join("nix/var/nix/gcroots/flotilla");
    assert!(gcroots.join("agent").exists(), "the agent keeps its GC roots in {}", gcroots.display());

    // The host's own Nix knows the system and its garbage collector keeps it.
    let gc = host.run(&["nix-store", "--gc"]);
    assert_eq!(gc.code(), 0, "{}", gc.stderr());
    let valid = host.run(&["nix-store", "--check-validity", &toplevel]);
    assert_eq!(valid.code(), 0, "{}", valid.stderr());
    assert!(host.root().join(toplevel.trim_start_matches('/')).exists(), "the toplevel survived the host's GC");
    assert_eq!(page(&f, &host).as_deref(), Some("with nix"));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "nixhost")["outcome"], "unchanged", "{report:#}");

    ok(f.run(&["destroy", "-f", &file, "--yes"]), "destroy");
    assert!(host.root().join("nix/var/nix/db").is_dir(), "the host's Nix database stays");
    let verify = host.run(&["nix-store", "--verify"]);
    assert_eq!(verify.code(), 0, "the host's store is consistent after destroy: {}", verify.stderr());
    assert!(!host.root().join("nix/var/flotilla").exists());
    assert!(std::fs::symlink_metadata(&gcroots).is_err(), "destroy left flotilla's GC roots in the host's Nix: {}", gcroots.display());
}

#[test]
fn a_host_gone_for_good_is_forgotten_and_nothing_on_it_is_touched() {
    let f = Fleet::new();
    let lab = SshLab::new(&f.ns);
    let mut host = lab.host("gone", HostOpts::default());
    let file = f.fl.file("sshfleet.nix", &ssh_fleet(&lab, &[("web1", &host.address(), "root", "one")], ""));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");

    // Decommissioned: its sshd is gone with everything it ran; its disk is still there.
    host.kill();
    let left = flotilla_traces(&host);
    assert!(left.iter().any(|t| t == "/nix/var/flotilla"), "{left:?}");
    assert_eq!(f.machine(&file, "web1")["state"], "unreachable");

    // destroy cannot reach it: one failed row, and it stays in the state.
    let failed = f.run(&["destroy", "-f", &file, "--yes"]);
    assert_eq!(failed.code(), 1, "{}\n{}", failed.stdout(), failed.stderr());
    assert_eq!(f.info(&file).len(), 1);

    // Forgotten: out of the state, the ledger says nothing was cleaned, its files untouched.
    let forgot = ok(f.run(&["destroy", "-f", &file, "--forget", "--yes"]), "destroy --forget");
    assert!(forgot.stdout().contains("forgotten (nothing on its host was cleaned up)"), "{}", forgot.stdout());
    assert!(f.info(&file).is_empty());
    let ledger = f.run(&["log", "--json"]).ok().json();
    let forget = ledger.as_array().unwrap().iter().find(|e| e["kind"] == "forget").unwrap_or_else(|| panic!("no forget event: {ledger:#}"));
    assert_eq!((forget["machine"].clone(), forget["message"].clone()), ("web1".into(), "machine forgotten: nothing on its host was cleaned up".into()));
    assert_eq!(flotilla_traces(&host), left, "forgetting touched the host's files");
}
