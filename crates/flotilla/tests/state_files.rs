//! Issue 13: what flotilla keeps on this host. `unlock` never breaks the lock of a process
//! alive here (item 6); the state directory, its database and local machines' roots are
//! private to their owner, and the ledger keeps no `exec` arguments unless asked (item 9);
//! a state directory that cannot be written is said so in words (item 13).

mod common;

use std::process::{Command, Stdio};

use common::{Fl, KillOnDrop};
use flotilla_state::{Lock, State};

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned()
}

/// A lock row of deployment `web` held by `pid` on `host`, written as `flotilla` writes it.
fn hold(fl: &Fl, host: &str, pid: u32) {
    let mut state = State::open(&fl.state()).unwrap();
    let me = Lock {
        holder: "tester@here".into(),
        host: host.into(),
        pid: i64::from(pid),
        pid_start: common::start_time(pid).map_or(0, |t| t as i64),
        command: "deploy".into(),
        since: flotilla_state::now(),
    };
    state.acquire_lock("web", &me, |_| false).unwrap();
}

fn lock_of(fl: &Fl) -> Option<Lock> {
    State::open(&fl.state()).unwrap().lock("web").unwrap()
}

#[test]
fn unlock_refuses_a_lock_whose_process_runs_here_and_breaks_it_once_that_process_died() {
    let fl = Fl::new();
    let mut holder = KillOnDrop(Command::new("sleep").arg("300").stdin(Stdio::null()).spawn().unwrap());
    let pid = holder.0.id();
    hold(&fl, &hostname(), pid);

    let r = fl.run(&["unlock", "-d", "web"]);
    assert_eq!(r.code(), 2, "unlock must refuse a live holder\n{}", r.stderr());
    for part in [format!("pid {pid} on this host"), "sleep 300".into(), "still running".into()] {
        assert!(r.stderr().contains(&part), "expected {part:?} in:\n{}", r.stderr());
    }
    assert_eq!(lock_of(&fl).map(|l| l.pid), Some(i64::from(pid)), "the lock of a live process is kept");
    // --force is for other hosts' locks: it does not break a live one here either.
    assert_eq!(fl.run(&["unlock", "-d", "web", "--force"]).code(), 2);
    assert!(lock_of(&fl).is_some());

    holder.stop();
    let r = fl.run(&["unlock", "-d", "web"]).ok();
    assert!(r.stderr().contains(&format!("broke the lock of deployment web held by tester@here (pid {pid}")), "{}", r.stderr());
    assert_eq!(lock_of(&fl), None);
    let log = fl.run(&["log", "-d", "web", "--json"]).ok().stdout();
    assert!(log.contains("\"broken\"") && log.contains("its process no longer runs"), "{log}");
}

#[test]
fn unlock_breaks_a_lock_held_on_another_host_only_with_force_and_the_ledger_says_forced() {
    let fl = Fl::new();
    hold(&fl, "elsewhere.invalid", 4242);
    let r = fl.run(&["unlock", "-d", "web"]);
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(r.stderr().contains("pid 4242 on host elsewhere.invalid") && r.stderr().contains("unlock -d web --force"), "{}", r.stderr());
    assert!(lock_of(&fl).is_some());

    fl.run(&["unlock", "-d", "web", "--force"]).ok();
    assert_eq!(lock_of(&fl), None);
    let log = fl.run(&["log", "-d", "web", "--json"]).ok().stdout();
    assert!(log.contains("\"forced\"") && log.contains("forced with --force: host elsewhere.invalid"), "{log}");
}
