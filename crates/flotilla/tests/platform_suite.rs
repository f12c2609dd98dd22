//! The one test every platform passes: a machine walked through its whole lifecycle by the
//! real CLI (provision and deploy, a no-op redeploy, a change, stop and start keeping the
//! generation, a reboot, exec, logs, a rollback, and a destroy that leaves nothing behind).
//! A platform is one [`Platform`] fixture (its `platform` options, how to reach the
//! machine's page, what it must not leave behind) and one row of `platform_suite!`.
//!
//! Real components: real Nix, the real agent; `local` machines are namespace containers in the
//! test's own network namespace, `ssh` machines hosts of `common::sshhost` (a network
//! namespace with Debian's OpenSSH server) reached by the real ssh client.

mod common;

use std::path::Path;

use common::sshhost::{HostOpts, SshHost, SshLab};
use common::{row, Fleet, Run};
use flotilla_protocol::layout;

/// What the shared scenario needs of a platform.
trait Platform {
    /// Sets up what the platform runs on, inside the test's fleet.
    fn new(f: &Fleet) -> Self;
    /// The machine's `platform` options, as Nix.
    fn options(&self) -> String;
    /// More of the machine's options the platform needs (a VM's kernel), as Nix.
    fn extra(&self) -> String {
        String::new()
    }
    /// The address the machine's services answer on from the test's namespace, once deployed.
    fn address(&self, f: &Fleet, file: &str) -> String;
    /// What the platform left of the machine after `destroy` (empty: nothing). `before`
    /// is the machine's `info` record from before the destroy.
    fn leftovers(&self, f: &Fleet, before: &serde_json::Value) -> Vec<String>;
}

/// A local namespace container.
struct Local;

impl Platform for Local {
    fn new(_: &Fleet) -> Local {
        Local
    }
    fn options(&self) -> String {
        r#"{ type = "local"; }"#.into()
    }
    fn address(&self, f: &Fleet, file: &str) -> String {
        f.machine(file, "web")["ip"].as_str().expect("a local machine has an address").to_owned()
    }
    fn leftovers(&self, f: &Fleet, before: &serde_json::Value) -> Vec<String> {
        let r = &before["resources"];
        let mut left = Vec::new();
        let root = r["root"].as_str().expect("a local machine has a root");
        if Path::new(root).parent().is_some_and(Path::exists) {
            left.push(format!("its directory {}", Path::new(root).parent().unwrap().display()));
        }
        if let Some(ns) = r["netns"].as_str().filter(|ns| Path::new("/run/netns").join(ns).exists()) {
            left.push(format!("network namespace {ns}"));
        }
        for link in ["veth", "bridge"].iter().filter_map(|k| r[*k].as_str()) {
            if f.host(&["ip", "link", "show", "dev", link]).code() == 0 {
                left.push(format!("link {link}"));
            }
        }
        left
    }
}

/// A QEMU virtual machine on the deployment's bridge (TCG: this host's KVM hangs guests).
struct Qemu;

impl Platform for Qemu {
    fn new(_: &Fleet) -> Qemu {
        Qemu
    }
    fn options(&self) -> String {
        r#"{ type = "qemu"; memory = 256; accel = "tcg"; }"#.into()
    }
    fn extra(&self) -> String {
        "boot.kernel = pkgs.linux;".into()
    }
    fn address(&self, f: &Fleet, file: &str) -> String {
        f.machine(file, "web")["ip"].as_str().expect("a VM has an address").to_owned()
    }
    fn leftovers(&self, f: &Fleet, before: &serde_json::Value) -> Vec<String> {
        let r = &before["resources"];
        let mut left = Vec::new();
        let disk = r["disk"].as_str().expect("a VM has a disk");
        if Path::new(disk).parent().is_some_and(Path::exists) {
            left.push(format!("its directory {}", Path::new(disk).parent().unwrap().display()));
        }
        for link in ["tap", "bridge"].iter().filter_map(|k| r[*k].as_str()) {
            if f.host(&["ip", "link", "show", "dev", link]).code() == 0 {
                left.push(format!("link {link}"));
            }
        }
        // A zombie waiting for this host's init to reap it has ended.
        if let Some(pid) = r["qemu pid"].as_str().and_then(|p| p.parse().ok()).filter(|p| common::alive(*p)) {
            left.push(format!("QEMU (pid {pid})"));
        }
        left
    }
}

/// A host reached over ssh, as root.
struct Ssh {
    lab: SshLab,
    host: SshHost,
}

impl Platform for Ssh {
    fn new(f: &Fleet) -> Ssh {
        let lab = SshLab::new(&f.ns);
        let host = lab.host("web", HostOpts::default());
        Ssh { lab, host }
    }
    fn options(&self) -> String {
        let opts: String = self.lab.ssh_options().iter().map(|o| format!("{o:?} ")).collect();
        format!(
            r#"{{ type = "ssh"; host = "{}"; user = "root"; identityFile = "{}"; sshOptions = [ {opts}]; }}"#,
            self.host.address(),
            self.lab.identity_file().display()
        )
    }
    fn address(&self, _: &Fleet, _: &str) -> String {
        self.host.address()
    }
    /// What the agent places on a host, by the paths of the contract; the host's own files
    /// stay.
    fn leftovers(&self, _: &Fleet, _: &serde_json::Value) -> Vec<String> {
        let root = self.host.root();
        let mut left: Vec<String> = [layout::STATE_DIR, layout::RUN_DIR, layout::LOG_DIR, layout::AGENT_LOG, layout::NIX_GCROOTS, layout::CURRENT_SYSTEM, "/etc/flotilla-page"]
            .into_iter()
            .filter(|p| std::fs::symlink_metadata(layout::under(root, p)).is_ok())
            .map(str::to_owned)
            .collect();
        let store = layout::under(root, flotilla_store::STORE_DIR);
        left.extend(std::fs::read_dir(store).into_iter().flatten().flatten().map(|e| format!("store path {}", e.file_name().to_string_lossy())));
        if self.host.run(&["sh", "-c", "ps -eo args | grep -v grep | grep -c flotilla-agent"]).stdout().trim() != "0" {
            left.push("a running agent".into());
        }
        left
    }
}

/// One machine `web` on `platform`: busybox's httpd serving `page` on port 8080 as an
/// unprivileged user, with a health check, and `page` in /etc/flotilla-page too.
fn deployment(platform: &str, extra: &str, page: &str) -> String {
    format!(
        r#"{{ meta.name = "suite"; machines.web = {{ pkgs, ... }}: let
    site = pkgs.runCommand "site" {{}} ''
      mkdir $out
      echo '{page}' > $out/index.html
    '';
  in {{
    platform = {platform};
    {extra}
    packages = [ pkgs.busybox ];
    files."/etc/flotilla-page".text = "{page}\n";
    users.www = {{ home = "/var/empty"; }};
    services.httpd = {{
      command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "8080" "-h" "${{site}}" ];
      user = "www";
      healthCheck = {{ http = "http://127.0.0.1:8080/"; interval = 1; retries = 5; timeout = 2; }};
    }};
  }}; }}
"#
    )
}

#[track_caller]
fn ok(r: Run, what: &str) -> Run {
    assert_eq!(r.code(), 0, "{what} failed\nstdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
    r
}

/// The generation the machine runs, by `flotilla generations`.
fn current_generation(f: &Fleet, file: &str) -> u64 {
    let gens = ok(f.run(&["generations", "-f", file, "web", "--json"]), "generations").json();
    let current: Vec<u64> = gens.as_array().unwrap().iter().filter(|g| g["current"] == true).filter_map(|g| g["number"].as_u64()).collect();
    assert_eq!(current.len(), 1, "one current generation: {gens:#}");
    current[0]
}

/// The whole lifecycle of one machine on platform `P`.
fn lifecycle<P: Platform>() {
    let f = Fleet::new();
    let p = P::new(&f);
    let v1 = f.fl.file("suite.nix", &deployment(&p.options(), &p.extra(), "one"));
    let page = |file: &str| f.http_get(&format!("http://{}:8080/", p.address(&f, file))).map(|s| s.trim().to_owned());

    // Provision and deploy.
    let (code, report, out) = f.deploy_json(&["-f", &v1]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "web")["outcome"], "deployed", "{report:#}");
    assert_eq!(page(&v1).as_deref(), Some("one"));

    // A no-op redeploy changes nothing.
    let (code, report, out) = f.deploy_json(&["-f", &v1]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "web")["outcome"], "unchanged", "{report:#}");
    assert_eq!(current_generation(&f, &v1), 1);

    // A change is a new generation.
    let v2 = f.fl.file("suite.nix", &deployment(&p.options(), &p.extra(), "two"));
    let (code, report, out) = f.deploy_json(&["-f", &v2]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "web")["outcome"], "deployed", "{report:#}");
    assert_eq!(page(&v2).as_deref(), Some("two"));
    assert_eq!(current_generation(&f, &v2), 2);

    // Stop and start keep the generation.
    ok(f.run(&["stop", "-f", &v2, "--on", "web"]), "stop");
    assert_eq!(f.machine(&v2, "web")["state"], "stopped");
    let url = format!("http://{}:8080/", p.address(&f, &v2));
    assert_ne!(f.host(&["curl", "-sf", "--max-time", "2", &url]).code(), 0, "a stopped machine's services do not answer");
    ok(f.run(&["start", "-f", &v2, "--on", "web"]), "start");
    assert_eq!(f.machine(&v2, "web")["state"], "running");
    assert_eq!(page(&v2).as_deref(), Some("two"));
    assert_eq!(current_generation(&f, &v2), 2);

    // A reboot comes back on the same generation.
    ok(f.run(&["reboot", "-f", &v2, "--on", "web"]), "reboot");
    assert_eq!(page(&v2).as_deref(), Some("two"));
    assert_eq!(current_generation(&f, &v2), 2);

    // exec runs as root in the machine; logs are the services' own.
    let r = ok(f.run(&["exec", "-f", &v2, "web", "--", "sh", "-c", "id -u; cat /etc/flotilla-page"]), "exec");
    assert_eq!(r.stdout(), "0\ntwo\n");
    let r = ok(f.run(&["logs", "-f", &v2, "web", "httpd"]), "logs");
    assert!(r.stdout().contains("-- flotilla-agent: started"), "{}", r.stdout());

    // Rollback returns to generation 1.
    ok(f.run(&["rollback", "-f", &v2, "--on", "web"]), "rollback");
    assert_eq!(page(&v2).as_deref(), Some("one"));
    assert_eq!(current_generation(&f, &v2), 1);

    // Destroy leaves nothing.
    let before = f.machine(&v2, "web");
    ok(f.run(&["destroy", "-f", &v2, "--yes"]), "destroy");
    assert!(f.info(&v2).is_empty(), "web is forgotten: {:?}", f.info(&v2));
    let left = p.leftovers(&f, &before);
    assert!(left.is_empty(), "destroy left: {left:?}");
}

/// One test per platform, each the whole lifecycle: `name => fixture`.
macro_rules! platform_suite {
    ($($name:ident => $platform:ty),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                lifecycle::<$platform>();
            }
        )*
    };
}

platform_suite! {
    a_local_machine_walks_the_whole_lifecycle => Local,
    an_ssh_machine_walks_the_whole_lifecycle => Ssh,
    a_qemu_machine_walks_the_whole_lifecycle => Qemu,
}
