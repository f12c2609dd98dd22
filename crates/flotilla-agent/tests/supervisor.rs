//! The supervisor against real processes: busybox services in temporary directories, checked
//! the way an operator would (the port answers, the log says so, /proc has no leftovers).
//!
//! Tests run as threads of one process and so share its reaper and subreaper flag; each uses
//! its own directory, port and service names. They need root (setuid, chroot) and a static
//! busybox at /bin/busybox, and fail rather than skip without them.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_agent::supervisor::{
    install_termination_handler, ExitStatus, ServiceState, ServiceStatus, Supervisor, SupervisorConfig,
    SupervisorError, TerminationKind,
};
use flotilla_model::{RestartPolicy, ServiceSpec};

const BUSYBOX: &str = "/bin/busybox";

fn busybox() -> &'static str {
    assert!(
        Path::new(BUSYBOX).is_file(),
        "these tests run real services with a static busybox at {BUSYBOX}; install it (apt-get install busybox-static)"
    );
    BUSYBOX
}

struct Fixture {
    dir: tempfile::TempDir,
    sup: Supervisor,
}

impl Fixture {
    fn new(stop_timeout: Duration) -> Fixture {
        Fixture::with_root(None, stop_timeout, 1 << 20, 3)
    }

    fn with_root(root: Option<&Path>, stop_timeout: Duration, log_max_bytes: u64, log_keep: usize) -> Fixture {
        busybox();
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(SupervisorConfig {
            root: root.map_or_else(|| PathBuf::from("/"), Path::to_owned),
            log_dir: dir.path().join("logs"),
            stop_timeout,
            log_max_bytes,
            log_keep,
        })
        .unwrap();
        Fixture { dir, sup }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn status(&self, name: &str) -> ServiceStatus {
        self.sup.status().into_iter().find(|s| s.name == name).unwrap_or_else(|| panic!("{name} not in status"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("logs/{name}.log"))).unwrap_or_default()
    }

    fn wait_log(&self, name: &str, needle: &str) {
        wait_for(&format!("{needle:?} in {name}.log"), PATIENCE, || self.log(name).contains(needle));
    }
}

fn spec(argv: &[&str], restart: RestartPolicy) -> ServiceSpec {
    ServiceSpec {
        command: Some(argv.iter().map(|s| s.to_string()).collect()),
        script: None,
        environment: BTreeMap::new(),
        user: "root".into(),
        group: None,
        working_directory: None,
        restart,
        after: vec![],
        keys: vec![],
        health_check: None,
    }
}

fn sh(script: &str, restart: RestartPolicy) -> ServiceSpec {
    spec(&[busybox(), "sh", "-c", script], restart)
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How long a test waits for something that must happen: long enough that only a real
/// failure, not a loaded machine, uses it up.
const PATIENCE: Duration = Duration::from_secs(30);

/// A port on 127.0.0.1 no other test gets, in this process or another: the same range and
/// claims (an abstract unix socket named after the port, held for the process's life) as
/// `free_port` in the flotilla crate's tests/common/mod.rs. A port 0 bind let go at once
/// could be handed to anyone next, and a "port closed" check reach their listener.
fn free_port() -> u16 {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    static HELD: std::sync::Mutex<Vec<UnixListener>> = std::sync::Mutex::new(Vec::new());
    const TEST_PORTS: std::ops::Range<u16> = 20000..30000;
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let first = std::process::id().wrapping_mul(7919) % span;
    for i in 0..span {
        let port = TEST_PORTS.start + ((first + i) % span) as u16;
        let name = SocketAddr::from_abstract_name(format!("flotilla-test-port-{port}")).unwrap();
        let Ok(claim) = UnixListener::bind_addr(&name) else { continue };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            held.push(claim);
            return port;
        }
    }
    panic!("no free test port in {TEST_PORTS:?}");
}

/// (pid, state, ppid, pgrp) of every process, from /proc.
fn processes() -> Vec<(i32, char, i32, i32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 3 {
            out.push((pid, f[0].chars().next().unwrap_or('?'), f[1].parse().unwrap_or(0), f[2].parse().unwrap_or(0)));
        }
    }
    out
}

fn group_members(pgid: u32) -> Vec<i32> {
    processes().into_iter().filter(|p| p.3 == pgid as i32).map(|p| p.0).collect()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[test]
fn supervisor_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Supervisor>();
}

#[test]
fn httpd_serves_and_stop_empties_its_process_group() {
    let f = Fixture::new(Duration::from_secs(5));
    let www = f.path("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from flotilla\n").unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    f.sup
        .start("web", &spec(&[busybox(), "httpd", "-f", "-p", &listen, "-h", www.to_str().unwrap()], RestartPolicy::Always))
        .unwrap();

    let mut page = None;
    wait_for("httpd to answer", PATIENCE, || {
        page = http_get(port, "/index.html");
        page.is_some()
    });
    let page = page.unwrap();
    assert!(page.starts_with("HTTP/1.") && page.contains("200"), "{page}");
    assert!(page.ends_with("hello from flotilla\n"), "{page}");

    let status = f.status("web");
    assert_eq!(status.state, ServiceState::Running);
    let pid = status.pid.expect("a running service has a pid");
    assert!(!group_members(pid).is_empty(), "its process group is {pid}");
    assert_eq!(f.sup.running(), vec!["web".to_string()]);

    f.sup.stop("web").unwrap();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} still open after stop");
    let status = f.status("web");
    assert_eq!((status.state, status.pid), (ServiceState::Stopped, None));
    assert_eq!(group_members(pid), Vec::<i32>::new(), "processes left in group {pid}");
    assert!(f.sup.running().is_empty());
    // Stopping again is fine; a stopped service is never restarted.
    f.sup.stop("web").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.status("web").state, ServiceState::Stopped);
    assert_eq!(f.status("web").restarts, 0);
}

#[test]
fn on_failure_restarts_with_growing_backoff_until_stopped() {
    let f = Fixture::new(Duration::from_secs(5));
    f.sup.start("flaky", &sh("echo attempt; exit 1", RestartPolicy::OnFailure)).unwrap();
    let mut saw_backoff = false;
    wait_for("three restarts", PATIENCE, || {
        let s = f.status("flaky");
        saw_backoff |= s.state == ServiceState::Backoff;
        s.restarts >= 3
    });
    assert!(saw_backoff, "never saw the Backoff state");
    let status = f.status("flaky");
    assert_eq!(status.last_exit.as_deref(), Some("exit 1"));
    assert!(f.sup.running().contains(&"flaky".to_string()));
    // The delay doubles: the log shows each wait.
    f.wait_log("flaky", "restarting in 400 ms");
    let log = f.log("flaky");
    for delay in ["restarting in 100 ms", "restarting in 200 ms"] {
        assert!(log.contains(delay), "{log}");
    }
    assert!(log.matches("attempt").count() >= 3, "{log}");

    f.sup.stop("flaky").unwrap();
    let stopped = f.status("flaky");
    assert_eq!(stopped.state, ServiceState::Stopped);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(f.status("flaky").restarts, stopped.restarts, "a stopped service was restarted");
}

#[test]
fn never_and_clean_exits_are_not_restarted() {
    let f = Fixture::new(Duration::from_secs(5));
    f.sup.start("fails", &sh("exit 1", RestartPolicy::Never)).unwrap();
    f.sup.start("killed", &sh("kill -9 $$", RestartPolicy::Never)).unwrap();
    f.sup.start("done", &sh("exit 0", RestartPolicy::OnFailure)).unwrap();
    wait_for("all three to settle", PATIENCE, || f.sup.running().is_empty());
    std::thread::sleep(Duration::from_millis(300));
    let got: Vec<_> = f.sup.status().into_iter().map(|s| (s.name, s.state, s.restarts, s.last_exit, s.pid)).collect();
    assert_eq!(
        got,
        vec![
            ("done".into(), ServiceState::Stopped, 0, Some("exit 0".into()), None),
            ("fails".into(), ServiceState::Failed, 0, Some("exit 1".into()), None),
            ("killed".into(), ServiceState::Failed, 0, Some("signal 9".into()), None),
        ]
    );
}

#[test]
fn always_restarts_after_a_clean_exit() {
    let f = Fixture::new(Duration::from_secs(5));
    f.sup.start("oneshot", &sh("exit 0", RestartPolicy::Always)).unwrap();
    wait_for("two restarts", PATIENCE, || f.status("oneshot").restarts >= 2);
    assert_eq!(f.status("oneshot").last_exit.as_deref(), Some("exit 0"));
    f.sup.stop("oneshot").unwrap();
}

#[test]
fn a_service_ignoring_sigterm_is_killed_after_the_stop_timeout() {
    let timeout = Duration::from_millis(400);
    let f = Fixture::new(timeout);
    let sleep = format!("{} sleep 1000", busybox());
    f.sup.start("stubborn", &sh(&format!("trap '' TERM; echo ready; {sleep}"), RestartPolicy::Always)).unwrap();
    f.wait_log("stubborn", "ready");
    let pid = f.status("stubborn").pid.unwrap();
    let started = Instant::now();
    f.sup.stop("stubborn").unwrap();
    let took = started.elapsed();
    assert!(took >= timeout, "stopped after {took:?}, before the timeout: SIGTERM was not ignored?");
    assert!(took < timeout + PATIENCE, "stop took {took:?}");
    let status = f.status("stubborn");
    assert_eq!((status.state, status.last_exit.as_deref()), (ServiceState::Stopped, Some("signal 9")));
    assert_eq!(group_members(pid), Vec::<i32>::new());
}

#[test]
fn double_forked_grandchildren_are_reaped() {
    let f = Fixture::new(Duration::from_secs(5));
    let pidfile = f.path("grandchild.pid");
    let grandchild = f.path("grandchild.sh");
    // The grandchild lives until the test ends it, not for a time the test must beat.
    std::fs::write(&grandchild, format!("echo $$ > {}\nexec {} sleep 100000\n", pidfile.display(), busybox())).unwrap();
    // The middle shell backgrounds the grandchild and exits at once: the grandchild is orphaned.
    let script = format!(
        "{bb} sh -c '{bb} sh {gc} &'; echo forked; exec {bb} sleep 1000",
        bb = busybox(),
        gc = grandchild.display()
    );
    f.sup.start("forker", &sh(&script, RestartPolicy::Never)).unwrap();
    wait_for("the grandchild's pid file", PATIENCE, || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    });
    let gc: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let me = std::process::id() as i32;
    // Re-parented to this process (the subreaper), not to the host's init ...
    wait_for("the grandchild to be re-parented here", PATIENCE, || {
        processes().iter().any(|p| p.0 == gc && p.2 == me)
    });
    // ... and reaped when it exits: no zombie entry stays in /proc.
    let argv: Vec<String> = [busybox(), "kill", &gc.to_string()].iter().map(|s| s.to_string()).collect();
    assert!(f.sup.run_command(&argv, PATIENCE).unwrap().status.success(), "cannot end the grandchild {gc}");
    wait_for("the grandchild to be reaped", PATIENCE, || !Path::new(&format!("/proc/{gc}")).exists());
    // No child of this process stays a zombie: each one seen now (other tests' children may
    // be one for a moment) is reaped in time.
    let zombies = || -> Vec<i32> { processes().into_iter().filter(|p| p.1 == 'Z' && p.2 == me).map(|p| p.0).collect() };
    let first = zombies();
    let mut lasting = first.clone();
    wait_for(&format!("the zombie children {first:?} of the test process to be reaped"), PATIENCE, || {
        lasting = zombies().into_iter().filter(|p| first.contains(p)).collect();
        lasting.is_empty()
    });
    assert_eq!(f.status("forker").state, ServiceState::Running);
    f.sup.stop("forker").unwrap();
}

#[test]
fn logs_rotate_within_limits() {
    let f = Fixture::with_root(None, Duration::from_secs(5), 2000, 2);
    let script = "i=0; while [ $i -lt 500 ]; do echo \"line $i: the quick brown fox jumps over\"; i=$((i+1)); done";
    f.sup.start("chatty", &sh(script, RestartPolicy::Never)).unwrap();
    wait_for("chatty to finish", PATIENCE, || f.status("chatty").state == ServiceState::Stopped);
    let size = |rel: &str| std::fs::metadata(f.path(rel)).map(|m| m.len()).ok();
    for rel in ["logs/chatty.log", "logs/chatty.log.1", "logs/chatty.log.2"] {
        let len = size(rel).unwrap_or_else(|| panic!("{rel} missing"));
        assert!(len > 0 && len <= 2000, "{rel} is {len} bytes");
    }
    assert_eq!(size("logs/chatty.log.3"), None, "only 2 rotated logs are kept");
    assert!(size("logs/chatty.log.1").unwrap() > 1900, "rotated files are filled up to the limit");
    // Everything reached the log, in order, before the exit was recorded.
    let live = f.log("chatty");
    let lines: Vec<&str> = live.lines().collect();
    assert_eq!(lines.last(), Some(&"-- flotilla-agent: exited (exit 0)"), "{live}");
    assert!(lines[lines.len() - 2].starts_with("line 499:"), "{live}");
    let previous = std::fs::read_to_string(f.path("logs/chatty.log.1")).unwrap();
    assert!(previous.ends_with('\n'), "rotation cuts at a line end");
}

#[test]
fn services_get_a_clean_environment_and_working_directory() {
    let f = Fixture::new(Duration::from_secs(5));
    let mut s = sh("env | sort; echo cwd=$(pwd); read x || echo stdin-eof", RestartPolicy::Never);
    s.environment.insert("GREETING".into(), "hello world".into());
    s.working_directory = Some(f.dir.path().to_str().unwrap().to_owned());
    f.sup.start("envy", &s).unwrap();
    f.wait_log("envy", "exited (exit 0)");
    let log = f.log("envy");
    for line in [
        "PATH=/run/current-system/sw/bin:/bin",
        "HOME=/root",
        "USER=root",
        "LOGNAME=root",
        "GREETING=hello world",
        &format!("cwd={}", f.dir.path().display()),
        "stdin-eof",
    ] {
        assert!(log.lines().any(|l| l == line), "missing {line:?} in:\n{log}");
    }
    assert!(!log.contains("CARGO"), "the agent's environment leaked:\n{log}");

    let mut custom = sh("echo path=$PATH", RestartPolicy::Never);
    custom.environment.insert("PATH".into(), "/opt/bin".into());
    f.sup.start("custom-path", &custom).unwrap();
    f.wait_log("custom-path", "path=/opt/bin");
}

fn chroot_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let p = root.path();
    std::fs::create_dir_all(p.join("etc")).unwrap();
    std::fs::create_dir_all(p.join("bin")).unwrap();
    std::fs::create_dir_all(p.join("home/svc")).unwrap();
    std::fs::write(p.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nsvc:x:1234:1234:svc:/home/svc:/bin/sh\n")
        .unwrap();
    std::fs::write(p.join("etc/group"), "root:x:0:\nsvc:x:1234:\nextra:x:2345:other,svc\nunrelated:x:3456:\n")
        .unwrap();
    std::fs::copy(busybox(), p.join("bin/busybox")).unwrap();
    // The service user must be able to walk from its new / to /bin/busybox.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    root
}

#[test]
fn chrooted_service_runs_as_the_user_of_the_roots_passwd() {
    let root = chroot_root();
    let f = Fixture::with_root(Some(root.path()), Duration::from_secs(5), 1 << 20, 1);
    let script = "echo uid=$(/bin/busybox id -u) gid=$(/bin/busybox id -g) groups=$(/bin/busybox id -G) \
                  home=$HOME user=$USER; echo root: $(/bin/busybox ls /)";
    let mut s = spec(&["/bin/busybox", "sh", "-c", script], RestartPolicy::Never);
    s.user = "svc".into();
    f.sup.start("as-svc", &s).unwrap();
    f.wait_log("as-svc", "exited (exit 0)");
    let log = f.log("as-svc");
    assert!(log.contains("uid=1234 gid=1234 groups=1234 2345 home=/home/svc user=svc"), "{log}");
    assert!(log.contains("root: bin etc home"), "not chrooted into the machine root:\n{log}");

    // One-off commands run inside the machine root too.
    let out = f.sup.run_command(&["/bin/busybox".into(), "ls".into(), "/".into()], PATIENCE).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bin\netc\nhome\n");

    // A user missing from the root's passwd is a clear error, before anything runs.
    s.user = "ghost".into();
    let err = f.sup.start("haunted", &s).unwrap_err();
    assert!(matches!(err, SupervisorError::UnknownUser { .. }), "{err:?}");
    let msg = err.to_string();
    let passwd = root.path().canonicalize().unwrap().join("etc/passwd");
    assert!(msg.contains("haunted") && msg.contains("ghost") && msg.contains(passwd.to_str().unwrap()), "{msg}");
    s.user = "svc".into();
    s.group = Some("wheel".into());
    let err = f.sup.start("haunted", &s).unwrap_err().to_string();
    assert!(err.contains("haunted") && err.contains("wheel"), "{err}");
}

#[test]
fn start_errors_name_the_service_and_the_fix() {
    let f = Fixture::new(Duration::from_secs(5));
    let err = f.sup.start("rel", &spec(&["busybox", "true"], RestartPolicy::Never)).unwrap_err().to_string();
    assert!(err.contains("rel") && err.contains("absolute"), "{err}");
    let err = f.sup.start("gone", &spec(&["/nonexistent/bin/x"], RestartPolicy::Always)).unwrap_err();
    assert!(matches!(err, SupervisorError::Spawn { .. }), "{err:?}");
    assert!(err.to_string().contains("gone") && err.to_string().contains("execve"), "{err}");
    assert_eq!(f.status("gone").state, ServiceState::Failed);
    let mut bad_dir = sh("true", RestartPolicy::Never);
    bad_dir.working_directory = Some("/nonexistent-dir".into());
    let err = f.sup.start("lost", &bad_dir).unwrap_err().to_string();
    assert!(err.contains("lost") && err.contains("working directory"), "{err}");

    f.sup.start("twice", &sh("exec /bin/busybox sleep 1000", RestartPolicy::Always)).unwrap();
    let err = f.sup.start("twice", &sh("true", RestartPolicy::Always)).unwrap_err();
    assert!(matches!(err, SupervisorError::AlreadyRunning { .. }), "{err:?}");
    let err = f.sup.stop("nobody-by-that-name").unwrap_err();
    assert!(matches!(err, SupervisorError::UnknownService { .. }), "{err:?}");
    f.sup.stop("twice").unwrap();
}

#[test]
fn restart_replaces_the_process_and_keeps_the_old_one_on_a_bad_spec() {
    let f = Fixture::new(Duration::from_secs(5));
    let s = sh("exec /bin/busybox sleep 1000", RestartPolicy::Always);
    f.sup.start("svc", &s).unwrap();
    let old = f.status("svc").pid.unwrap();
    let mut bad = s.clone();
    bad.user = "no-such-user".into();
    assert!(f.sup.restart("svc", &bad).is_err());
    assert_eq!(f.status("svc").pid, Some(old), "a bad spec must not stop the running service");
    f.sup.restart("svc", &s).unwrap();
    let new = f.status("svc");
    assert_eq!(new.state, ServiceState::Running);
    assert_ne!(new.pid, Some(old));
    assert_eq!(group_members(old), Vec::<i32>::new());
    // restart also starts a service that was never started.
    f.sup.restart("fresh", &s).unwrap();
    f.sup.stop_all();
    assert!(f.sup.running().is_empty());
}

#[test]
fn run_command_returns_output_and_status_and_times_out() {
    let f = Fixture::new(Duration::from_secs(5));
    let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let out = f
        .sup
        .run_command(&argv(&[busybox(), "sh", "-c", "echo out; echo err >&2; exit 3"]), PATIENCE)
        .unwrap();
    assert_eq!(out.status, ExitStatus::Exited(3));
    assert_eq!((out.stdout.as_slice(), out.stderr.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
    assert!(!out.status.success());

    let ok = f.sup.run_command(&argv(&[busybox(), "true"]), PATIENCE).unwrap();
    assert!(ok.status.success());

    let started = Instant::now();
    let err = f.sup.run_command(&argv(&[busybox(), "sleep", "1000"]), Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, SupervisorError::CommandTimeout { .. }), "{err:?}");
    assert!(started.elapsed() < PATIENCE, "timeout took {:?}", started.elapsed());

    let err = f.sup.run_command(&argv(&["/nonexistent"]), Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, SupervisorError::CommandSpawn { .. }), "{err:?}");
    assert!(f.sup.run_command(&[], Duration::from_secs(1)).is_err());
}

#[test]
fn stop_all_stops_dependents_before_what_they_are_after() {
    let f = Fixture::new(Duration::from_secs(5));
    let order = f.path("order");
    let service = |name: &str, after: &[&str]| {
        let script = format!(
            "trap 'echo {name} >> {order}; exit 0' TERM; echo ready; {bb} sleep 1000 & wait",
            order = order.display(),
            bb = busybox()
        );
        let mut s = sh(&script, RestartPolicy::Always);
        s.after = after.iter().map(|a| a.to_string()).collect();
        (name.to_string(), s)
    };
    // db <- api <- web, and db <- worker.
    for (name, s) in [service("db", &[]), service("api", &["db"]), service("web", &["api"]), service("worker", &["db"])] {
        f.sup.start(&name, &s).unwrap();
        f.wait_log(&name, "ready");
    }
    f.sup.stop_all();
    let stopped = std::fs::read_to_string(&order).unwrap();
    let pos = |name: &str| stopped.lines().position(|l| l == name).unwrap_or_else(|| panic!("{name}: {stopped}"));
    assert!(pos("web") < pos("api"), "{stopped}");
    assert!(pos("api") < pos("db"), "{stopped}");
    assert!(pos("worker") < pos("db"), "{stopped}");
    for s in f.sup.status() {
        assert_eq!((s.state, s.last_exit.as_deref()), (ServiceState::Stopped, Some("exit 0")), "{s:?}");
    }
}

#[test]
fn termination_handler_reports_sigterm_and_sigint() {
    let f = Fixture::new(Duration::from_secs(5));
    let signal = install_termination_handler().unwrap();
    assert_eq!(signal.wait_timeout(Duration::from_millis(10)), None);
    let me = std::process::id().to_string();
    for (flag, kind) in [("-TERM", TerminationKind::Terminate), ("-INT", TerminationKind::Interrupt)] {
        let argv: Vec<String> = [busybox(), "kill", flag, &me].iter().map(|s| s.to_string()).collect();
        assert!(f.sup.run_command(&argv, PATIENCE).unwrap().status.success());
        assert_eq!(install_termination_handler().unwrap().wait_timeout(PATIENCE), Some(kind));
    }
}
