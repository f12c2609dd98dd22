//! `flotilla doctor`: is this host ready to run flotilla, and if not, what to do.
//!
//! Each check says ok, or the problem and its fix in one line. A check that fails is one the
//! default platform (`local`) cannot deploy without; a warning is about a platform or a
//! command that is not needed for that (ssh, QEMU, OCI tools). The cheap part, which spawns
//! nothing, is [`require_tools`]: `deploy` runs it before anything is provisioned, and the
//! build runs [`flotilla_nix::Nix::check_build_setup`] before Nix is asked to build, so a
//! host that cannot deploy fails once, with its fix, before anything is created.
//!
//! Doctor only looks: it changes nothing on the host (its probe build is deleted again, its
//! namespaces end with the `unshare` that made them).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_model::{MachineName, Platform};
use flotilla_nix::{BuildUsers, Nix};
use serde::Serialize;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Ready.
    Ok,
    /// Missing or broken, but the default platform deploys without it.
    Warn,
    /// The default platform cannot deploy until this is fixed.
    Fail,
}

impl Status {
    /// As users read it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked.
    pub check: &'static str,
    /// How it came out.
    pub status: Status,
    /// What was found, or the problem.
    pub detail: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, detail: impl Into<String>) -> Finding {
        Finding { check, status: Status::Ok, detail: detail.into(), fix: None }
    }

    fn problem(check: &'static str, status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { check, status, detail: detail.into(), fix: Some(fix.into()) }
    }

    /// A problem whose text already carries its fix after a `; ` (as Nix set-up errors do).
    fn problem_with_fix(check: &'static str, status: Status, text: &str) -> Finding {
        match text.split_once("; ") {
            Some((what, fix)) => Finding::problem(check, status, what, fix),
            None => Finding { check, status, detail: text.to_owned(), fix: None },
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Every check, in order.
    pub findings: Vec<Finding>,
    /// Whether the default platform can deploy from this host: no check failed.
    pub ready: bool,
}

/// What doctor may do beyond looking.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How long a binary cache may take to answer.
    pub substituter_timeout: Duration,
    /// How long a guest may take to start under KVM before TCG is assumed.
    pub kvm_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options { substituter_timeout: Duration::from_secs(5), kvm_timeout: Duration::from_secs(10) }
    }
}

/// Runs every check.
pub fn examine(nix: &Nix, agent: &Path, opts: Options) -> Report {
    let mut f = Vec::new();
    examine_nix(nix, agent, opts, &mut f);
    examine_local(&mut f);
    examine_others(opts, &mut f);
    let ready = f.iter().all(|x| x.status != Status::Fail);
    Report { findings: f, ready }
}

/// Nix, its store, build users, caches, the agent and a real build.
fn examine_nix(nix: &Nix, agent: &Path, opts: Options, f: &mut Vec<Finding>) {
    match nix.version() {
        Ok(v) => f.push(Finding::ok("nix", format!("Nix {v}"))),
        Err(flotilla_nix::NixError::Setup(problem)) => {
            f.push(Finding::ok("nix", "installed (it fails before saying its version)"));
            f.push(Finding::problem_with_fix("nix store", Status::Fail, &problem));
            f.push(Finding::problem("build", Status::Fail, "not tried: the problem above stops every build", "fix it, then run flotilla doctor again"));
            return;
        }
        Err(e) => {
            f.push(Finding::problem("nix", Status::Fail, format!("Nix cannot be run: {e}"), "install Nix (Debian: apt-get install nix-bin, then flotilla's scripts/setup-nix.sh)"));
            return;
        }
    }
    let config = match nix.config() {
        Ok(c) => c,
        Err(e) => {
            f.push(Finding::problem_with_fix("nix config", Status::Fail, &e.to_string()));
            return;
        }
    };
    let mut can_build = true;
    match flotilla_nix::store_ready(&config) {
        Ok(detail) => f.push(Finding::ok("nix store", detail)),
        Err(problem) => {
            f.push(Finding::problem_with_fix("nix store", Status::Fail, &problem));
            can_build = false;
        }
    }
    match flotilla_nix::build_users(&config) {
        Ok(BuildUsers::Group { name, members }) => f.push(Finding::ok("build users", format!("group {name} has {members} build users (build-users-group)"))),
        Ok(BuildUsers::Root) => f.push(Finding::ok("build users", "none: build-users-group is empty, so Nix builds as root")),
        Ok(BuildUsers::NotRoot) => f.push(Finding::ok("build users", "not needed here: Nix does not build as this user's own processes (not root, or a daemon builds)")),
        Err(problem) => {
            f.push(Finding::problem_with_fix("build users", Status::Fail, &problem));
            can_build = false;
        }
    }
    f.push(Finding::ok("sandbox", format!("sandbox = {}", if config.sandbox.is_empty() { "(unset)" } else { &config.sandbox })));
    if config.substituters.is_empty() {
        f.push(Finding::ok("substituters", "none: builds never wait on a binary cache"));
    }
    for url in &config.substituters {
        match nix.ping_substituter(url, opts.substituter_timeout) {
            Ok(()) => f.push(Finding::ok("substituters", format!("{url} answers"))),
            Err(why) => f.push(Finding::problem(
                "substituters",
                Status::Warn,
                format!("{url} does not answer ({why}): every build waits on it, then builds without it"),
                "pass --substituters '' (or FLOTILLA_SUBSTITUTERS=\"\") to build offline, or fix this host's network",
            )),
        }
    }
    match crate::check_agent(agent) {
        Ok(()) => f.push(Finding::ok("agent", format!("{} (static)", agent.display()))),
        Err(e) => {
            f.push(Finding::problem_with_fix("agent", Status::Fail, &e.to_string()));
            can_build = false;
        }
    }
    if !can_build {
        f.push(Finding::problem("build", Status::Fail, "not tried: the problems above stop every build", "fix them, then run flotilla doctor again"));
        return;
    }
    let nonce = format!("{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    match nix.probe_build(agent, &nonce) {
        Ok(took) => f.push(Finding::ok("build", format!("a toplevel built in {:.1} s (and was deleted again)", took.as_secs_f64()))),
        Err(flotilla_nix::NixError::Setup(problem)) => f.push(Finding::problem_with_fix("build", Status::Fail, &problem)),
        Err(e) => f.push(Finding::problem("build", Status::Fail, format!("a trivial toplevel did not build: {e}"), "read Nix's message; `nix-store --verify --check-contents` checks the store")),
    }
}

/// What the `local` platform needs: root, namespaces, `ip` and `nsenter`.
fn examine_local(f: &mut Vec<Finding>) {
    if crate::procfs::is_root() {
        f.push(Finding::ok("root", "running as root, as the local platform needs"));
    } else {
        f.push(Finding::problem("root", Status::Fail, "not root: the local platform makes namespaces, veths and bridges", "run flotilla as root (e.g. with sudo)"));
    }
    for (tool, package) in [("ip", "iproute2"), ("nsenter", "util-linux")] {
        match on_path(tool) {
            Some(p) => f.push(Finding::ok(tool, p.display().to_string())),
            None => f.push(Finding::problem(tool, Status::Fail, format!("`{tool}` is not on PATH; the local platform needs it"), format!("install {package} (Debian: apt-get install {package})"))),
        }
    }
    f.push(namespaces());
}

/// Whether each kind of namespace a local machine is made of can be created here, each
/// tried for real by util-linux's `unshare` (a user namespace is said, not required: the
/// local platform runs as root and does not use one).
fn namespaces() -> Finding {
    if on_path("unshare").is_none() {
        return Finding::problem("namespaces", Status::Fail, "cannot check: `unshare` is not on PATH", "install util-linux (Debian: apt-get install util-linux)");
    }
    let kinds: [(&str, &[&str], bool); 6] = [
        ("mount", &["--mount"], true),
        ("UTS", &["--uts"], true),
        ("IPC", &["--ipc"], true),
        ("PID", &["--pid", "--fork"], true),
        ("network", &["--net"], true),
        ("user", &["--user"], false),
    ];
    let mut usable = Vec::new();
    let mut missing_required = Vec::new();
    let mut missing_optional = Vec::new();
    for (name, flags, required) in kinds {
        let out = Command::new("unshare").args(flags).arg("true").stdin(Stdio::null()).output();
        match out {
            Ok(o) if o.status.success() => usable.push(name),
            Ok(o) => {
                let why = format!("{name} ({})", String::from_utf8_lossy(&o.stderr).trim().trim_start_matches("unshare: "));
                if required { missing_required.push(why) } else { missing_optional.push(why) }
            }
            Err(e) => missing_required.push(format!("{name} (cannot run unshare: {e})")),
        }
    }
    if !missing_required.is_empty() {
        return Finding::problem(
            "namespaces",
            Status::Fail,
            format!("cannot create {}", missing_required.join(", ")),
            "run as root on a kernel with namespaces; inside a container, make it privileged",
        );
    }
    let mut detail = format!("can create {}", usable.join(", "));
    if !missing_optional.is_empty() {
        detail.push_str(&format!("; not {} (the local platform does not need it)", missing_optional.join(", ")));
    }
    Finding::ok("namespaces", detail)
}

/// Platforms and commands beyond the default: ssh, QEMU and KVM, OCI tools.
fn examine_others(opts: Options, f: &mut Vec<Finding>) {
    match version_of("ssh", &["-V"]) {
        Some(v) => f.push(Finding::ok("ssh", v)),
        None => f.push(Finding::problem("ssh", Status::Warn, "the OpenSSH client is not installed: platform.type = \"ssh\" needs it", "install openssh-client (Debian: apt-get install openssh-client)")),
    }
    let qemu = on_path("qemu-system-x86_64");
    match qemu.as_ref().and_then(|_| version_of("qemu-system-x86_64", &["--version"])) {
        Some(v) => f.push(Finding::ok("qemu", v)),
        None => f.push(Finding::problem(
            "qemu",
            Status::Warn,
            "qemu-system-x86_64 is not installed: the qemu platform (local VMs) and disk image tests need it",
            "install qemu-system-x86 (Debian: apt-get install qemu-system-x86)",
        )),
    }
    f.push(kvm(qemu.as_deref(), opts.kvm_timeout));
    match version_of("skopeo", &["--version"]) {
        Some(v) => f.push(Finding::ok("skopeo", v)),
        None => f.push(Finding::problem("skopeo", Status::Warn, "skopeo is not installed: copying OCI images between registries needs it (not in this flotilla yet)", "install skopeo (Debian: apt-get install skopeo)")),
    }
    let mut engines: Vec<String> = Vec::new();
    engines.extend(version_of("podman", &["--version"]));
    if let Some(v) = version_of("docker", &["--version"]) {
        // The docker command is only a client; images run where its daemon answers.
        let socket = Path::new("/var/run/docker.sock");
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            engines.push(v);
        } else if engines.is_empty() {
            f.push(Finding::problem(
                "container engine",
                Status::Warn,
                format!("{v}, but no Docker daemon answers at {}: OCI images can be built but not run on this host", socket.display()),
                "start the Docker daemon, or install podman (Debian: apt-get install podman), which needs none",
            ));
            return;
        }
    }
    if engines.is_empty() {
        f.push(Finding::problem("container engine", Status::Warn, "neither podman nor docker is installed: OCI images can be built but not run on this host", "install podman (Debian: apt-get install podman)"));
    } else {
        f.push(Finding::ok("container engine", engines.join("; ")));
    }
}

/// Whether KVM accelerates a guest here, found by booting one: a 512-byte boot sector that
/// writes to QEMU's debug-exit port, which ends QEMU with a known status. A host whose KVM
/// hangs guests (some nested set-ups) would otherwise hang the first VM instead.
fn kvm(qemu: Option<&Path>, timeout: Duration) -> Finding {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Finding::problem("kvm", Status::Warn, "/dev/kvm is absent: VMs will run under TCG (software emulation, much slower)", "enable virtualisation (the kvm_intel or kvm_amd module), or accept TCG");
    }
    let Some(qemu) = qemu else {
        return Finding::ok("kvm", "/dev/kvm is present (not tried: QEMU is not installed)");
    };
    match boot_probe(qemu, timeout) {
        Ok(took) => Finding::ok("kvm", format!("a guest's first instructions (a boot sector) ran under KVM in {:.1} s; whether a Linux guest boots, the first VM will tell", took.as_secs_f64())),
        Err(why) => Finding::problem("kvm", Status::Warn, format!("/dev/kvm is present but a guest does not boot under KVM ({why}): VMs will run under TCG"), "nothing to do for TCG; for KVM, check the host's virtualisation (nested KVM, paravirtual hosts)"),
    }
}

/// Boots the debug-exit boot sector under KVM; `Ok` with the time when it exits as planned.
fn boot_probe(qemu: &Path, timeout: Duration) -> Result<Duration, String> {
    // mov al, 0x21; out 0xf4, al; hlt; jmp $  (QEMU then exits with status (0x21 << 1) | 1).
    let mut sector = vec![0u8; 512];
    sector[..7].copy_from_slice(&[0xb0, 0x21, 0xe6, 0xf4, 0xf4, 0xeb, 0xfe]);
    sector[510] = 0x55;
    sector[511] = 0xaa;
    let dir = private_temp_dir("flotilla-doctor-kvm").map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let disk = dir.join("boot.img");
    let result = (|| {
        std::fs::write(&disk, &sector).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let mut child = Command::new(qemu)
            .args(["-accel", "kvm", "-display", "none", "-nodefaults", "-no-reboot", "-m", "16", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=ide", disk.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        match crate::procfs::wait_timeout(&mut child, timeout) {
            Some(status) if status.code() == Some(0x43) => Ok(start.elapsed()),
            Some(status) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                Err(format!("QEMU exited with {status}: {}", err.trim()))
            }
            None => Err(format!("no sign of life within {} s", timeout.as_secs())),
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A new directory under the temporary directory, made by this call (never one that was
/// there, nor a link someone left at its name: the temporary directory is anyone's).
fn private_temp_dir(prefix: &str) -> std::io::Result<PathBuf> {
    let base = std::env::temp_dir();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    for i in 0..100u32 {
        let dir = base.join(format!("{prefix}-{}-{nanos:x}-{i}", std::process::id()));
        match std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free name"))
}

/// The host tools the selected machines' platforms need, checked without running anything:
/// `Err` names the machines, the missing tool and how to install it. `deploy` calls it
/// before it provisions anything.
pub fn require_tools<'a>(machines: impl IntoIterator<Item = (&'a MachineName, &'a Platform)>) -> Result<(), String> {
    require_tools_in(machines, std::env::var_os("PATH").as_deref())
}

fn require_tools_in<'a>(machines: impl IntoIterator<Item = (&'a MachineName, &'a Platform)>, path: Option<&std::ffi::OsStr>) -> Result<(), String> {
    let mut missing: std::collections::BTreeMap<(&str, &str), Vec<String>> = std::collections::BTreeMap::new();
    for (name, platform) in machines {
        let needs: &[(&str, &str)] = match platform {
            Platform::Local(_) => &[("ip", "iproute2"), ("nsenter", "util-linux")],
            Platform::Ssh(_) => &[("ssh", "openssh-client")],
            Platform::Qemu(_) => &[("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils"), ("mkfs.ext4", "e2fsprogs"), ("ip", "iproute2")],
        };
        for &(tool, package) in needs {
            if find_in(tool, path).is_none() {
                missing.entry((tool, package)).or_default().push(format!("{name} (platform.type = \"{}\")", platform.kind()));
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = missing
        .into_iter()
        .map(|((tool, package), machines)| {
            format!("`{tool}` is not on PATH and machine {} needs it; install {package} (Debian: apt-get install {package}), then `flotilla doctor` checks the rest", machines.join(", "))
        })
        .collect();
    Err(lines.join("\n"))
}

/// Where `program` is on `PATH`, if it is there and executable.
pub fn on_path(program: &str) -> Option<PathBuf> {
    find_in(program, std::env::var_os("PATH").as_deref())
}

fn find_in(program: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path?)
        .map(|dir| dir.join(program))
        .find(|p| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// The first line a program prints of its version, `None` when it cannot be run.
fn version_of(program: &str, args: &[&str]) -> Option<String> {
    on_path(program)?;
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().ok()?;
    // ssh prints its version on stderr.
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    let line = String::from_utf8_lossy(&text).lines().next()?.trim().to_owned();
    (!line.is_empty()).then_some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_splits_into_what_and_fix() {
        let f = Finding::problem_with_fix("build users", Status::Fail, "Nix cannot build: no group; create it");
        assert_eq!((f.detail.as_str(), f.fix.as_deref()), ("Nix cannot build: no group", Some("create it")));
    }

    #[test]
    fn missing_tools_name_the_machines_and_the_package() {
        let local = Platform::Local(serde_json::from_value(serde_json::json!({ "address": null, "subnet": "10.9.0.0/24", "forwardPorts": [] })).unwrap());
        let a = MachineName::new("a").unwrap();
        // A PATH with nothing on it: every tool is missing.
        let err = require_tools_in([(&a, &local)], Some(std::ffi::OsStr::new("/nonexistent"))).unwrap_err();
        assert!(err.contains("`ip` is not on PATH and machine a (platform.type = \"local\") needs it; install iproute2"), "{err}");
        assert!(err.contains("`nsenter`"), "{err}");
    }
}
