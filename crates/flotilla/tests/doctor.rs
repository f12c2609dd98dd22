//! A fresh machine (issue 12): `flotilla doctor` says what this host lacks and how to fix
//! it; a host that cannot build or lacks a platform's tools fails once, with the fix, before
//! anything is created; and a first deploy whose build fails leaves no machine behind.
//!
//! The broken hosts are made for real, each for its own process only: a Nix configuration
//! naming a build users group that does not exist (`NIX_CONFIG`, read by Nix itself), a PATH
//! without `ip`, and /nix/var/nix bind-mounted read-only in a mount namespace of the test's.

mod common;

use std::path::Path;
use std::process::Command;

use common::{row, Fl, Fleet};

/// A build users group no host has.
const NO_SUCH_GROUP: &str = "flotilla-test-no-such-group";

fn nonce() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{}-{t}", std::process::id())
}

/// The line of `flotilla doctor`'s table for `check`, and the fix line under it if any.
fn doctor_line(table: &str, check: &str) -> (String, Option<String>) {
    let lines: Vec<&str> = table.lines().collect();
    // "STATUS  CHECK  DETAIL": the status is 4 wide, then two spaces; checks are padded to
    // one width, then two spaces ("build" must not match "build users").
    let i = lines
        .iter()
        .position(|l| l.get(6..).is_some_and(|rest| rest.strip_prefix(check).is_some_and(|after| after.starts_with("  "))))
        .unwrap_or_else(|| panic!("no `{check}` line in:\n{table}"));
    let fix = lines.get(i + 1).filter(|l| l.trim_start().starts_with("fix: ")).map(|l| l.trim().to_owned());
    (lines[i].to_owned(), fix)
}

#[test]
fn doctor_passes_on_this_host_and_proves_a_build() {
    let fl = Fl::new();
    let run = fl.run(&["doctor"]);
    let table = run.stdout();
    assert_eq!(run.code(), 0, "{table}\n{}", run.stderr());
    for check in ["nix", "nix store", "build users", "agent", "build", "root", "ip", "nsenter", "namespaces", "ssh", "qemu", "kvm", "skopeo", "container engine"] {
        let (line, _) = doctor_line(&table, check);
        assert!(!line.starts_with("FAIL"), "{line}");
    }
    assert!(doctor_line(&table, "build").0.contains("a toplevel built in"), "{table}");
    assert!(doctor_line(&table, "build users").0.contains("group nixbld has"), "install-deps made the build users:\n{table}");
    assert!(doctor_line(&table, "substituters").0.contains("none"), "{table}");
    assert!(table.trim_end().ends_with("this host can deploy local machines"), "{table}");

    let json = fl.run(&["doctor", "--json"]).ok().json();
    assert_eq!(json["ready"], true);
    let build = json["findings"].as_array().unwrap().iter().find(|f| f["check"] == "build").unwrap();
    assert_eq!(build["status"], "ok", "{json:#}");
}

#[test]
fn missing_build_users_are_said_once_with_the_fix_and_nothing_is_built_or_recorded() {
    let fl = Fl::new();
    let n = nonce();
    // Three machines whose toplevels are new, so Nix would have to build all three.
    let file = fl.file(
        "three.nix",
        &format!(
            r#"{{
              meta.name = "nobuilders";
              machines.a = {{ files."/etc/n".text = "a-{n}"; }};
              machines.b = {{ files."/etc/n".text = "b-{n}"; }};
              machines.c = {{ files."/etc/n".text = "c-{n}"; }};
            }}"#
        ),
    );
    let broken = |args: &[&str]| {
        let out = fl.cmd().env("NIX_CONFIG", format!("build-users-group = {NO_SUCH_GROUP}")).args(args).output().unwrap();
        common::Run(out)
    };

    let doctor = broken(&["doctor"]);
    assert_eq!(doctor.code(), 1, "{}", doctor.stdout());
    let (line, fix) = doctor_line(&doctor.stdout(), "build users");
    assert!(line.starts_with("FAIL") && line.contains(&format!("group '{NO_SUCH_GROUP}'")) && line.contains("no such group"), "{line}");
    let fix = fix.expect("a fix under the failing line");
    assert!(fix.contains("setup-nix.sh") && fix.contains("build-users-group ="), "{fix}");
    assert!(doctor_line(&doctor.stdout(), "build").0.starts_with("FAIL"), "{}", doctor.stdout());
    assert!(doctor.stdout().contains("this host cannot deploy local machines yet"), "{}", doctor.stdout());

    for command in [&["build", "-f", &file][..], &["deploy", "-f", &file, "--goal", "build"][..]] {
        let run = broken(command);
        assert_eq!(run.code(), 2, "{command:?}: could not run at all\n{}\n{}", run.stdout(), run.stderr());
        let err = run.stderr();
        assert_eq!(err.matches("Nix cannot build").count(), 1, "said once, not per machine:\n{err}");
        assert!(err.contains(NO_SUCH_GROUP) && err.contains("setup-nix.sh"), "{err}");
        for m in ["a", "b", "c"] {
            assert!(!err.contains(&format!("{m}: build:")), "no machine's row for the host's problem:\n{err}");
        }
    }
    // Nothing built, nothing recorded, no GC roots.
    assert_eq!(fl.run(&["list", "--json"]).ok().json(), serde_json::json!([]));
    assert!(!fl.state().parent().unwrap().join("gcroots/nobuilders").exists());
    let built = fl.run(&["build", "--json", "-f", &file]).ok().json();
    for m in built["machines"].as_array().unwrap() {
        assert!(m["toplevel"].is_string(), "with the host's own Nix set-up it builds: {m}");
    }
}

#[test]
fn a_host_without_ip_fails_doctor_and_deploy_before_anything_is_made() {
    let f = Fleet::new();
    // Every program this host has, but `ip`.
    let bin = f.fl.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for dir in ["/usr/local/bin", "/usr/sbin", "/usr/bin"] {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name();
            if name != "ip" && !bin.join(&name).exists() {
                std::os::unix::fs::symlink(entry.path(), bin.join(&name)).unwrap();
            }
        }
    }
    let doctor = common::Run(f.fl.cmd().env("PATH", &bin).arg("doctor").output().unwrap());
    assert_eq!(doctor.code(), 1, "{}", doctor.stdout());
    let (line, fix) = doctor_line(&doctor.stdout(), "ip");
    assert!(line.starts_with("FAIL") && line.contains("`ip` is not on PATH"), "{line}");
    assert!(fix.unwrap().contains("apt-get install iproute2"));
    assert!(!doctor_line(&doctor.stdout(), "nsenter").0.starts_with("FAIL"));

    let file = f.fl.file("one.nix", r#"{ meta.name = "noip"; machines.lonely = { }; }"#);
    let deploy = common::Run(f.cmd().env("PATH", &bin).args(["deploy", "-f", &file]).output().unwrap());
    assert_eq!(deploy.code(), 2, "{}\n{}", deploy.stdout(), deploy.stderr());
    let err = deploy.stderr();
    assert!(err.contains("`ip` is not on PATH and machine lonely (platform.type = \"local\") needs it; install iproute2"), "{err}");
    // Nothing made: no deployment recorded, no machine directory, no bridge or veth.
    assert_eq!(f.run(&["list", "--json"]).ok().json(), serde_json::json!([]));
    assert!(!f.fl.dir.path().join("state/machines/noip").exists());
    let links = f.host(&["ip", "-o", "link"]).ok().stdout();
    assert!(!links.contains("flb-") && !links.contains("flv-"), "{links}");
}

#[test]
fn a_store_that_cannot_be_written_fails_doctor_with_the_fix() {
    let fl = Fl::new();
    // /nix/var/nix read-only for this one process tree, as on a host with a read-only /nix.
    let flotilla = fl.cmd();
    let mut words = vec![flotilla.get_program().to_string_lossy().into_owned()];
    words.extend(flotilla.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.push("doctor".into());
    let quoted: Vec<String> = words.iter().map(|w| format!("'{}'", w.replace('\'', "'\\''"))).collect();
    let script = format!("mount --bind /nix/var/nix /nix/var/nix && mount -o remount,bind,ro /nix/var/nix && exec {}", quoted.join(" "));
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    for (k, v) in flotilla.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let run = common::Run(cmd.current_dir(common::repo()).output().unwrap());
    assert_eq!(run.code(), 1, "{}\n{}", run.stdout(), run.stderr());
    let (line, fix) = doctor_line(&run.stdout(), "nix store");
    assert!(line.starts_with("FAIL") && line.contains("Nix cannot write to its store") && line.contains("Read-only file system"), "{line}");
    assert!(fix.unwrap().contains("/nix is writable"));
    assert!(doctor_line(&run.stdout(), "build").0.starts_with("FAIL"));
}

#[test]
fn a_first_deploy_whose_build_fails_leaves_no_container_namespace_or_veth() {
    let f = Fleet::new();
    let n = nonce();
    let file = f.fl.file(
        "half.nix",
        &format!(
            r#"{{
              meta.name = "buildfirst";
              machines.sound = {{ files."/etc/n".text = "{n}"; }};
              machines.unbuildable = {{ pkgs, ... }}: {{
                packages = [ (pkgs.runCommand "doomed-{n}" {{ }} "echo doomed >&2; exit 3") ];
              }};
            }}"#
        ),
    );
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(row(&report, "sound")["outcome"], "deployed", "{out}");
    let bad = row(&report, "unbuildable");
    assert_eq!((bad["outcome"].as_str(), bad["failed_phase"].as_str()), (Some("failed"), Some("build")), "{out}");
    let provisioned = out.lines().any(|l| l.contains("\"machine\":\"unbuildable\"") && l.contains("\"phase\":\"provision\""));
    assert!(!provisioned, "the unbuilt machine was provisioned:\n{out}");

    // No container: no root, no pidfile, no process; no named network namespace; no veth.
    let machines = f.fl.dir.path().join("state/machines/buildfirst");
    assert!(machines.join("sound").exists(), "the sound machine's data directory is where the test looks");
    assert!(!machines.join("unbuildable").exists(), "the unbuilt machine has a directory");
    let netns: Vec<String> = std::fs::read_dir("/run/netns").unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let sound_ns = f.machine(&file, "sound")["resources"]["netns"].as_str().unwrap().to_owned();
    assert!(netns.contains(&sound_ns), "the sound machine's namespace {sound_ns} is where the test looks");
    let id = sound_ns.strip_suffix("-sound").unwrap();
    assert!(!Path::new("/run/netns").join(format!("{id}-unbuildable")).exists(), "the unbuilt machine has a network namespace");
    let veths = f.host(&["ip", "-o", "link"]).ok().stdout().lines().filter(|l| l.contains("flv-")).count();
    assert_eq!(veths, 1, "only the sound machine's veth is on the bridge");
    assert_ne!(f.machine(&file, "unbuildable")["state"], "running");
}
