//! Nix's distributed builds through flotilla, against real hosts of the ssh test lab
//! (`common::sshhost`) that have Nix: `meta.builders` / `--builders` building on a lab host
//! as a remote builder, a builder that is down (fallback, or the machine failing with the
//! builder named), bad `meta.builders` refused at evaluation, and `deploy --build-on target`
//! building on the machine's own host without the closure coming back to the deployer.
//!
//! The lab hosts' roots are chroots, not mount points, so their Nix cannot sandbox: each Nix
//! host used for building gets `sandbox = false` in its own /etc/nix/nix.conf (the host's,
//! never this machine's), and `build-users-group =`: the hosts share this machine's kernel and
//! its nixbld uids, and Nix kills every process of a build user before it builds, so a host's
//! build and this machine's (another test's) would kill each other.

mod common;

use common::sshhost::{HostOpts, SshHost, SshLab};
use common::{row, Fleet};

/// A Nix host of the lab that can build.
fn nix_host(lab: &SshLab, name: &str) -> SshHost {
    let host = lab.host(name, HostOpts::default().nix());
    use std::io::Write as _;
    let mut conf = std::fs::OpenOptions::new().append(true).open(host.root().join("etc/nix/nix.conf")).expect("the Nix host has /etc/nix/nix.conf");
    writeln!(conf, "sandbox = false\nbuild-users-group =").unwrap();
    host
}

/// `ssh://root@HOST x86_64-linux KEY 1 1 - - HOSTKEY`: the lab's client key, and the host's
/// public key pinned in the entry, so Nix's ssh checks it without any known_hosts of root's.
fn builder_entry(lab: &SshLab, host: &SshHost) -> String {
    let pubkey = std::fs::read_to_string(host.root().join("etc/ssh/ssh_host_ed25519_key.pub")).unwrap();
    format!(
        "ssh://root@{} x86_64-linux {} 1 1 - - {}",
        host.address(),
        lab.identity_file().display(),
        flotilla_store::base64::encode(pubkey.trim().as_bytes())
    )
}

/// A one-machine deployment whose system holds a file made at build time with the name of
/// the host that built it (`uname -n`), and serves it on port 8080. `nonce` makes the build
/// new for every test run. The machine is a local container, or an ssh machine on `ssh`.
fn deployment(lab: &SshLab, nonce: &str, meta: &str, ssh: Option<&SshHost>, extra: &str) -> String {
    let platform = match ssh {
        None => String::new(),
        Some(h) => {
            let opts: String = lab.ssh_options().iter().map(|o| format!("{o:?} ")).collect();
            format!(r#"platform = {{ type = "ssh"; host = "{}"; user = "root"; identityFile = "{}"; sshOptions = [ {opts}]; }};"#, h.address(), lab.identity_file().display())
        }
    };
    format!(
        r#"{{ meta.name = "builders"; {meta}
  machines.app = {{ pkgs, ... }}: let
      site = pkgs.runCommand "built-where-{nonce}" {{}} ''
        mkdir $out
        uname -n > $out/index.html
      '';
    in {{
      {platform}
      packages = [ pkgs.busybox ];
      users.www = {{ home = "/var/empty"; }};
      files."/etc/built-where".source = "${{site}}/index.html";
      services.httpd = {{
        command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "8080" "-h" "${{site}}" ];
        user = "www";
        healthCheck = {{ http = "http://127.0.0.1:8080/"; interval = 1; retries = 5; timeout = 2; }};
      }};
      {extra}
    }};
}}
"#
    )
}

fn nonce() -> String {
    format!("{}-{}", std::process::id(), common::random_hex(4))
}

/// The `built-where` output the machine's toplevel holds, read from `store` (a root).
fn built_where(store_root: &std::path::Path, toplevel: &str) -> String {
    let etc = std::fs::read_link(store_root.join(toplevel.trim_start_matches('/')).join("etc/built-where"))
        .unwrap_or_else(|e| panic!("{toplevel} has no etc/built-where link: {e}"));
    std::fs::read_to_string(store_root.join(etc.to_string_lossy().trim_start_matches('/'))).unwrap().trim().to_owned()
}

#[test]
fn meta_builders_builds_on_the_lab_host_and_the_deployer_receives_the_result() {
    let f = Fleet::new();
    let lab = SshLab::new(&f.ns);
    let builder = nix_host(&lab, "bigbox");
    let meta = format!("meta.builders = {:?}; meta.buildLocally = false;", builder_entry(&lab, &builder));
    let file = f.fl.file("d.nix", &deployment(&lab, &nonce(), &meta, None, ""));
    let r = f.run(&["build", "-f", &file, "--json", "-v"]);
    assert_eq!(r.code(), 0, "stdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
    let report: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap_or_else(|e| panic!("{e}: {}", r.stdout()));
    let toplevel = row(&report, "app")["toplevel"].as_str().unwrap().to_owned();
    // The deployer's store holds the result, and what built it was the builder.
    assert_eq!(built_where(std::path::Path::new("/"), &toplevel), "bigbox", "the system was not built on the builder");
    let valid = std::process::Command::new("nix-store").args(["--check-validity", &toplevel]).status().unwrap();
    assert!(valid.success(), "the deployer's store did not receive {toplevel}");
    assert!(r.stderr().contains(&format!("on 'ssh://root@{}'", builder.address())), "the build log names the builder:\n{}", r.stderr());
}

#[test]
fn a_down_builder_falls_back_to_this_host_or_fails_the_machine_naming_it() {
    let f = Fleet::new();
    let lab = SshLab::new(&f.ns);
    let builder = nix_host(&lab, "gone");
    let entry = builder_entry(&lab, &builder);
    drop(builder); // nothing answers at its address any more
    let down = entry.split_whitespace().next().unwrap().trim_start_matches("ssh://").to_owned();

    // Local builds allowed (the default): Nix builds here, and flotilla says why.
    let file = f.fl.file("d.nix", &deployment(&lab, &nonce(), &format!("meta.builders = {entry:?};"), None, ""));
    let r = f.run(&["build", "-f", &file]);
    assert_eq!(r.code(), 0, "stdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains(&format!("cannot build on 'ssh://{down}'")) && r.stderr().contains("built on this host instead"), "{}", r.stderr());

    // Builders only: the machine fails, its reason naming the builder; exit 1, not 2.
    let file = f.fl.file("d2.nix", &deployment(&lab, &nonce(), &format!("meta.builders = {entry:?}; meta.buildLocally = false;"), None, ""));
    let r = f.run(&["build", "-f", &file, "--json"]);
    assert_eq!(r.code(), 1, "stdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
    let report: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap_or_else(|e| panic!("{e}: {}", r.stdout()));
    let error = row(&report, "app")["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains(&format!("cannot build on 'ssh://{down}'")), "the reason names the builder: {error}");
}

#[test]
fn bad_meta_builders_is_one_clear_error_at_evaluation() {
    let f = Fleet::new();
    let lab = SshLab::new(&f.ns);
    let file = f.fl.file("d.nix", &deployment(&lab, &nonce(), r#"meta.builders = "ssh://b x86_64-linux - four";"#, None, ""));
    let r = f.run(&["build", "-f", &file]);
    assert_eq!(r.code(), 2, "stdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
    let err = r.stderr();
    assert!(err.contains("option `meta.builders`") && err.contains("`four` as field 4 (max jobs)") && err.contains("ssh://builder x86_64-linux - 4"), "{err}");
    assert!(!err.contains("building"), "nothing was built: {err}");
    // The flag is checked the same way, and a missing machines file is named.
    let file = f.fl.file("ok.nix", &deployment(&lab, &nonce(), "", None, ""));
    let r = f.run(&["build", "-f", &file, "--builders", "@/nonexistent/machines"]);
    assert_eq!(r.code(), 2, "stderr:\n{}", r.stderr());
    assert!(r.stderr().contains("option `--builders`: the machines file `@/nonexistent/machines` cannot be read"), "{}", r.stderr());
}

#[test]
fn build_on_target_builds_on_the_machines_host_and_nothing_comes_back() {
    let f = Fleet::new();
    let lab = SshLab::new(&f.ns);
    let host = nix_host(&lab, "target1");
    let file = f.fl.file("d.nix", &deployment(&lab, &nonce(), "", Some(&host), ""));
    let (code, report, out) = f.deploy_json(&["-f", &file, "--build-on", "target"]);
    assert_eq!(code, 0, "{out}\nsshd:\n{}", host.sshd_log());
    let toplevel = row(&report, "app")["toplevel"].as_str().unwrap().to_owned();
    // Built there, by the host's Nix, and never in the deployer's store.
    let valid = std::process::Command::new("nix-store").args(["--check-validity", &toplevel]).output().unwrap();
    assert!(!valid.status.success(), "{toplevel} is valid in the deployer's store");
    assert_eq!(built_where(host.root(), &toplevel), "target1");
    assert_eq!(row(&report, "app")["copy"]["paths_sent"], 0, "nothing was sent: {report:#}");
    // The machine runs it: its page answers with the builder's name, and info says so.
    assert_eq!(f.http_get(&format!("http://{}:8080/", host.address())).map(|p| p.trim().to_owned()), Some("target1".into()));
    let info = f.machine(&file, "app");
    assert!(info["last_build"]["toplevel"].as_str() == Some(&*toplevel) && info["health"] == "healthy", "{info:#}");
    // The host's Nix keeps what it built from its collector with the deployer's root, which
    // the agent's activation left alone and `destroy` removes.
    let root = host.root().join(flotilla_protocol::layout::relative(&flotilla_protocol::layout::built_root("app")));
    assert_eq!(std::fs::read_link(&root).ok().map(|t| t.display().to_string()), Some(toplevel.clone()), "GC root {}", root.display());
    let destroyed = f.run(&["destroy", "-f", &file, "--yes"]);
    assert_eq!(destroyed.code(), 0, "destroy: {}", destroyed.stderr());
    assert!(std::fs::symlink_metadata(&root).is_err(), "destroy left the GC root {}", root.display());
}

#[test]
fn build_on_target_refuses_a_host_without_nix_naming_machine_option_and_fix() {
    let f = Fleet::new();
    let lab = SshLab::new(&f.ns);
    let host = lab.host("nonix", HostOpts::default());
    let file = f.fl.file("d.nix", &deployment(&lab, &nonce(), "", Some(&host), "deploy.buildOnTarget = true;"));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 1, "{out}");
    let error = row(&report, "app")["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("deploy.buildOnTarget") && error.contains("has none") && error.contains("install Nix there"), "{error}");
    assert!(out.contains("app"), "{out}");
    // A local machine cannot have it at all: refused at evaluation.
    let local = f.fl.file("l.nix", &deployment(&lab, &nonce(), "", None, "deploy.buildOnTarget = true;"));
    let r = f.run(&["build", "-f", &local]);
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(r.stderr().contains("machine app") && r.stderr().contains("deploy.buildOnTarget") && r.stderr().contains("unset it"), "{}", r.stderr());
}
