//! The subcommands a deployer runs on a host over ssh, against the built binary: `init
//! --detach`, `stop`, `status-line` and `logs`, checked by their output and exit status, the
//! socket and /proc.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{agent_bin, alive, stat_field, Machine};

fn pidfile(m: &Machine) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(m.path("/run/flotilla/agent.pid")).unwrap()).unwrap()
}

#[test]
fn detach_starts_an_agent_that_outlives_its_launcher_and_stop_stops_it() {
    let m = Machine::new();
    assert_eq!(m.run("status-line", &[]).expect(0).stdout(), "stopped\n");
    let pid = m.start();

    // The launcher has exited (its output was collected); the agent runs on in a session
    // of its own and answers.
    assert!(alive(pid));
    assert!(m.answers());
    assert_ne!(stat_field(&pid.to_string(), 6), pid.to_string(), "the agent leads no session (it forked after setsid), so it cannot get a terminal");
    assert_ne!(stat_field(&pid.to_string(), 6), stat_field("self", 6), "not in the test's session");
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(), std::path::Path::new("/"));
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap(), std::path::Path::new("/dev/null"));
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap(), m.path("/var/log/flotilla-agent.log"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "Umask:\t0022"), "{status}");

    // The pidfile names it with its start time.
    let recorded = pidfile(&m);
    assert_eq!(recorded["pid"], pid);
    assert_eq!(recorded["startTime"].to_string(), stat_field(&pid.to_string(), 22));
    assert_eq!(m.run("status-line", &[]).expect(0).stdout(), format!("running {pid}\n"));

    // Idempotent: a second start finds it; a foreground init refuses.
    assert_eq!(m.run("init", &["--detach"]).expect(0).stdout(), "already running\n");
    assert!(m.run("init", &[]).expect(2).stderr().contains("already answers"));
    assert_eq!(pidfile(&m)["pid"], pid, "still the first agent");

    let log = std::fs::read_to_string(m.path("/var/log/flotilla-agent.log")).unwrap();
    assert!(log.contains(&format!("started detached, pid {pid}")), "{log}");
    assert!(!log.contains("connection ended"), "probes leave no noise in the log:\n{log}");

    assert_eq!(m.run("stop", &[]).expect(0).stdout(), "stopped\n");
    assert!(!alive(pid));
    assert!(!m.socket().exists(), "the socket is gone");
    assert!(!m.path("/run/flotilla/agent.pid").exists(), "the pidfile is gone");
    assert_eq!(m.run("stop", &[]).expect(0).stdout(), "not running\n");
    assert_eq!(m.run("status-line", &[]).expect(0).stdout(), "stopped\n");

    // And it starts again.
    let again = m.start();
    assert_ne!(again, pid);
    assert_eq!(m.run("stop", &[]).expect(0).stdout(), "stopped\n");
}

#[test]
fn two_launchers_at_once_start_one_agent() {
    let m = Machine::new();
    let launch = || Command::new(agent_bin()).args(["init", "--detach", "--root", m.root().to_str().unwrap()]).stdout(Stdio::piped()).spawn().unwrap();
    let (a, b) = (launch(), launch());
    let mut outs: Vec<String> = [a, b].into_iter().map(|c| {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }).collect();
    outs.sort();
    assert_eq!(outs[0], "already running\n", "{outs:?}");
    let pid = outs[1].trim().strip_prefix("started ").unwrap_or_else(|| panic!("{outs:?}"));
    assert_eq!(pidfile(&m)["pid"].to_string(), pid);
    assert_eq!(m.run("stop", &[]).expect(0).stdout(), "stopped\n");
}

#[test]
fn a_stale_pidfile_never_gets_another_process_killed() {
    let m = Machine::new();
    let mut other = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = other.id();
    std::fs::create_dir_all(m.path("/run/flotilla")).unwrap();
    // An agent that ran with this pid once, before the kernel gave it to `sleep`.
    let start: u64 = stat_field(&pid.to_string(), 22).parse().unwrap();
    std::fs::write(m.path("/run/flotilla/agent.pid"), format!("{{\"pid\":{pid},\"startTime\":{}}}\n", start - 1)).unwrap();

    assert_eq!(m.run("status-line", &[]).expect(0).stdout(), "stopped\n");
    assert_eq!(m.run("stop", &["--timeout", "1"]).expect(0).stdout(), "not running\n");
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(pid), "the other process was not signalled");
    assert_eq!(other.try_wait().unwrap(), None);

    // A start over a stale pidfile works, and replaces it.
    let agent = m.start();
    assert_eq!(pidfile(&m)["pid"], agent);
    assert_eq!(m.run("stop", &[]).expect(0).stdout(), "stopped\n");
    assert!(alive(pid));
    other.kill().unwrap();
    other.wait().unwrap();
}

#[test]
fn stop_kills_an_agent_that_does_not_stop_in_time_and_says_so() {
    let m = Machine::new();
    // Stands for an agent stuck stopping its services: it ignores SIGTERM.
    let mut stuck = Command::new("sh").args(["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut ready = String::new();
    BufReader::new(stuck.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    let pid = stuck.id();
    std::fs::create_dir_all(m.path("/run/flotilla")).unwrap();
    std::fs::write(m.path("/run/flotilla/agent.pid"), format!("{{\"pid\":{pid},\"startTime\":{}}}\n", stat_field(&pid.to_string(), 22))).unwrap();
    assert_eq!(m.run("status-line", &[]).expect(0).stdout(), format!("running {pid}\n"));

    let run = m.run("stop", &["--timeout", "1"]).expect(1);
    assert_eq!(run.stdout(), "killed\n");
    assert!(run.stderr().contains(&format!("the agent (pid {pid}) did not stop within 1 s and was killed; services it had not stopped yet may still run")), "{}", run.stderr());
    assert!(stuck.wait().unwrap().to_string().contains("SIGKILL"));
    assert!(!m.path("/run/flotilla/agent.pid").exists(), "a killed agent's pidfile is removed");
    assert_eq!(m.run("status-line", &[]).expect(0).stdout(), "stopped\n");
}

#[test]
fn detach_reports_an_agent_that_dies_with_the_end_of_its_log() {
    let m = Machine::new();
    std::fs::write(m.path("/nix"), "not a directory").unwrap();
    let run = m.run("init", &["--detach"]).expect(1);
    let err = run.stderr();
    assert!(err.contains("the agent exited before it answered"), "{err}");
    assert!(err.contains("cannot prepare"), "the log's last lines say why: {err}");
    assert_eq!(run.stdout(), "");
    assert_eq!(m.run("status-line", &[]).expect(0).stdout(), "stopped\n");
}

#[test]
fn detach_writes_to_the_log_it_is_given() {
    let m = Machine::new();
    let log = m.path("elsewhere/agent.out");
    let out = m.run("init", &["--detach", "--log", log.to_str().unwrap()]).expect(0).stdout();
    let pid = out.trim().strip_prefix("started ").unwrap();
    assert!(std::fs::read_to_string(&log).unwrap().contains(&format!("pid {pid}")));
    assert!(!m.path("/var/log/flotilla-agent.log").exists());
    m.run("stop", &[]).expect(0);
}

#[test]
fn command_lines_that_make_no_sense_exit_2() {
    let m = Machine::new();
    assert!(m.run("init", &["--log", "x"]).expect(2).stderr().contains("--log goes with --detach"));
    assert!(m.run("stop", &["--timeout", "soon"]).expect(2).stderr().contains("--timeout soon"));
    assert!(m.run("logs", &["-n", "many"]).expect(2).stderr().contains("-n many"));
    assert!(m.run("logs", &["a", "b"]).expect(2).stderr().contains("unexpected argument \"b\""));
    assert!(m.run("status-line", &["--bogus"]).expect(2).stderr().contains("unknown option \"--bogus\""));
    let usage = common::run_with(agent_bin(), &["--help"]).expect(0).stdout();
    for command in ["init [--root DIR] [--detach [--log FILE]]", "stop [--root DIR] [--timeout SECS]", "status-line [--root DIR]", "logs [--root DIR] [-n LINES] [-f] [SERVICE]", "uninstall [--root DIR] --yes"] {
        assert!(usage.contains(command), "usage lacks {command:?}");
    }
}

fn write_log(m: &Machine, service: &str, text: &str) {
    let dir = m.path("/var/log/flotilla");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{service}.log")), text).unwrap();
}

#[test]
fn logs_prints_the_last_lines_of_one_service_or_all() {
    let m = Machine::new();
    write_log(&m, "web", "w1\nw2\nw3\n");
    write_log(&m, "db", "d1\nd2\n");
    std::fs::write(m.path("/var/log/flotilla/web.log.1"), "rotated\n").unwrap();

    assert_eq!(m.run("logs", &["-n", "2", "web"]).expect(0).stdout(), "w2\nw3\n");
    assert_eq!(m.run("logs", &["web"]).expect(0).stdout(), "w1\nw2\nw3\n", "50 by default");
    assert_eq!(m.run("logs", &["-n", "1"]).expect(0).stdout(), "db | d2\nweb | w3\n");
    assert_eq!(m.run("logs", &["-n", "0", "web"]).expect(0).stdout(), "");

    let missing = m.run("logs", &["api"]).expect(2);
    let expected = format!("no log for service `api` (no {}); services with logs: db, web", m.path("/var/log/flotilla/api.log").display());
    assert!(missing.stderr().contains(&expected), "{}", missing.stderr());
    assert_eq!(missing.stdout(), "");
}

#[test]
fn logs_follow_prints_appended_lines_across_a_rotation() {
    let m = Machine::new();
    write_log(&m, "web", "old\n");
    let path = m.path("/var/log/flotilla/web.log");
    let mut child = Command::new(agent_bin())
        .args(["logs", "--root", m.root().to_str().unwrap(), "-f", "-n", "1", "web"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    // Generous: only a follower that never prints the line uses it up.
    let next = || rx.recv_timeout(Duration::from_secs(30)).expect("a line within 30 s");
    assert_eq!(next(), "old");
    let append = |text: &str| std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(text.as_bytes()).unwrap();
    append("new 1\nhal");
    assert_eq!(next(), "new 1");
    append("f\n");
    assert_eq!(next(), "half", "whole lines only");
    std::fs::rename(&path, m.path("/var/log/flotilla/web.log.1")).unwrap();
    std::fs::write(&path, "after rotation\n").unwrap();
    assert_eq!(next(), "after rotation");
    child.kill().unwrap();
    child.wait().unwrap();
}
