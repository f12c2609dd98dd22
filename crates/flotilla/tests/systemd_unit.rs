//! What can be tested of an ssh host with systemd on a machine whose PID 1 is not systemd
//! (no test host runs systemd): the start script the deployer sends runs for real, against a
//! `systemctl` double, in a mount namespace of the test's own (private tmpfs mounts over
//! `/etc/systemd/system` and `/nix/var`, so this machine's files are never touched); the unit
//! it writes is checked by Debian's real `systemd-analyze verify` and enabled by the real
//! `systemctl --root` offline. A missing `systemd-analyze` fails the test, naming the package.
//!
//! Not tested here: a real systemd starting, stopping and restarting the unit, the agent
//! coming back after a real reboot, and `reboot --hard` (see docs/testing.md).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::Run;
use flotilla_engine::platform::ssh::{start_script, unit_text, UNIT_PATH};

const UNIT_FILE: &str = "flotilla-agent.service";

/// Fails loudly unless Debian's systemd tools are here (the package starts nothing).
fn require_systemd_tools() {
    for tool in ["systemd-analyze", "systemctl"] {
        let ok = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
        assert!(ok, "prerequisite missing: {tool} (Debian: systemd); run scripts/install-deps.sh");
    }
    assert!(Path::new("/etc/systemd/system").is_dir(), "prerequisite missing: /etc/systemd/system (Debian: systemd); run scripts/install-deps.sh");
    assert!(Path::new("/nix/var").is_dir(), "prerequisite missing: /nix/var (Debian: nix-bin); run scripts/install-deps.sh");
}

fn executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `systemd-analyze verify` of the unit in `root`, as systemd would load it from there.
fn verify(root: &Path) -> Run {
    Run(Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", root.display())).arg(UNIT_FILE).output().expect("systemd-analyze runs"))
}

/// The start script for a host with systemd, run as the host's root would run it, twice (a
/// first start, then an agent upgrade's restart), writes exactly `unit_text()`; the real
/// `systemd-analyze verify` finds nothing to say about it and the real `systemctl` enables it
/// for `multi-user.target`, which is what brings the agent back after a reboot.
#[test]
fn the_unit_the_start_script_writes_passes_systemd_analyze_verify_and_enables() {
    require_systemd_tools();
    common::require_prerequisites();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The double records its arguments; the agent double answers `status-line` as running.
    let bin = d.join("bin");
    std::fs::create_dir(&bin).unwrap();
    executable(&bin.join("systemctl"), &format!("#!/bin/sh\necho \"$*\" >> '{}'\n", d.join("systemctl.log").display()));
    let agent = d.join("agent");
    executable(&agent, "#!/bin/sh\n[ \"$1\" = status-line ] && echo running\n");
    let written = d.join("written.service");
    let first = start_script(&agent.display().to_string(), true, false);
    let again = start_script(&agent.display().to_string(), true, true);
    let inside = format!(
        "set -e\nmount -t tmpfs tmpfs /etc/systemd/system\nmount -t tmpfs tmpfs /nix/var\nexport PATH='{bin}':$PATH\n\
         sh -c \"$1\"\necho --- >> '{log}'\nsh -c \"$2\"\ncp {UNIT_PATH} '{written}'\nreadlink /nix/var/flotilla/bin/flotilla-agent\n",
        bin = bin.display(),
        log = d.join("systemctl.log").display(),
        written = written.display()
    );
    let ran = Run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", &inside, "sh", &first, &again])
        .output()
        .expect("unshare runs"));
    assert_eq!(ran.code(), 0, "the start script failed\nstdout:\n{}\nstderr:\n{}", ran.stdout(), ran.stderr());
    assert_eq!(ran.stdout().trim(), agent.display().to_string(), "the agent link points at the agent given");
    assert_eq!(std::fs::read_to_string(&written).unwrap(), unit_text() + "\n", "the unit on the host is not the one flotilla means");
    // Written and reloaded once; the restart finds it unchanged.
    let log = std::fs::read_to_string(d.join("systemctl.log")).unwrap();
    assert_eq!(
        log,
        format!("daemon-reload\nenable --quiet {UNIT_FILE}\nstart {UNIT_FILE}\n---\nenable --quiet {UNIT_FILE}\nrestart {UNIT_FILE}\n"),
        "what the start script asked of systemctl"
    );

    // A root as systemd sees it: the unit where the script put it, systemd's own units, and
    // the real agent behind the link the unit starts.
    let root = d.join("root");
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    std::fs::create_dir_all(root.join("nix/var/flotilla/bin")).unwrap();
    std::fs::copy(&written, root.join(UNIT_PATH.trim_start_matches('/'))).unwrap();
    std::fs::copy(common::agent_bin(), root.join("nix/var/flotilla/bin/flotilla-agent")).unwrap();
    let copied = Command::new("cp").arg("-a").arg("/usr/lib/systemd/system").arg(root.join("usr/lib/systemd/")).status().unwrap();
    assert!(copied.success(), "cannot copy /usr/lib/systemd/system");

    let v = verify(&root);
    assert_eq!((v.code(), v.stdout(), v.stderr()), (0, String::new(), String::new()), "systemd-analyze verify has something to say about the unit");

    // The check is not blind: a misspelt value, which systemd only warns about and ignores
    // (exit 0), shows in its output.
    let unit = root.join(UNIT_PATH.trim_start_matches('/'));
    std::fs::write(&unit, (unit_text() + "\n").replace("KillMode=mixed", "KillMode=mixd")).unwrap();
    let bad = verify(&root);
    assert!((bad.stdout() + &bad.stderr()).contains("mixd"), "systemd-analyze did not see a bad KillMode: {} {}", bad.stdout(), bad.stderr());
    std::fs::copy(&written, &unit).unwrap();

    // Enabled offline by the real systemctl: wanted by multi-user.target, so started at boot.
    let enable = Run(Command::new("systemctl").arg(format!("--root={}", root.display())).args(["enable", UNIT_FILE]).output().unwrap());
    assert_eq!(enable.code(), 0, "{}", enable.stderr());
    let wants = root.join("etc/systemd/system/multi-user.target.wants").join(UNIT_FILE);
    assert_eq!(std::fs::read_link(&wants).ok().as_deref(), Some(Path::new(UNIT_PATH)), "{} is not enabled for multi-user.target", UNIT_FILE);
    // The unit as a file in the repository, so a change to it shows in review.
    common::check_golden(&common::repo().join("crates/flotilla/tests/golden/flotilla-agent.service"), &(unit_text() + "\n"), "rerun with FLOTILLA_BLESS=1");
}

/// Every start script (systemd or detached, start or restart) parses as POSIX sh (dash, the
/// host's `/bin/sh` on Debian) and as bash.
#[test]
fn the_start_scripts_parse_as_posix_sh_and_bash() {
    let agent = "/nix/store/00000000000000000000000000000000-flotilla-agent";
    for systemd in [true, false] {
        for restart in [true, false] {
            let script = start_script(agent, systemd, restart);
            for shell in ["dash", "bash"] {
                let r = Run(Command::new(shell).args(["-n", "-c", &script]).output().unwrap_or_else(|e| panic!("prerequisite missing: {shell} ({e})")));
                assert_eq!((r.code(), r.stderr()), (0, String::new()), "{shell} -n refuses the start script (systemd {systemd}, restart {restart}):\n{script}");
            }
        }
    }
    // The check is not blind: a script cut short does not parse.
    let cut = start_script(agent, true, false);
    let cut = &cut[..cut.find("done").unwrap()];
    assert_ne!(Run(Command::new("dash").args(["-n", "-c", cut]).output().unwrap()).code(), 0, "dash -n accepted an unfinished loop");
}

/// `FLOTILLA_BLESS` writes the golden file and fails the test, so a blessing run never
/// passes by comparing a file with itself.
#[test]
fn blessing_a_golden_file_writes_it_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let golden = dir.path().join("golden.txt");
    std::fs::write(&golden, "old\n").unwrap();
    let blessed = std::panic::catch_unwind(|| common::check_golden_with(&golden, "new\n", "rerun with FLOTILLA_BLESS=1", true));
    let message = blessed.expect_err("a blessing run passed");
    let message = message.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("blessed") && message.contains("rerun without FLOTILLA_BLESS"), "{message}");
    assert_eq!(std::fs::read_to_string(&golden).unwrap(), "new\n", "blessing did not write the file");
    // Without blessing: the same text passes, another fails.
    common::check_golden_with(&golden, "new\n", "", false);
    assert!(std::panic::catch_unwind(|| common::check_golden_with(&golden, "other\n", "", false)).is_err());
}
