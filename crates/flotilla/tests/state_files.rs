//! Issue 13: what flotilla keeps on this host. `unlock` never breaks the lock of a process
//! alive here (item 6); the state directory, its database and local machines' roots are
//! private to their owner, and the ledger keeps no `exec` arguments unless asked (item 9);
//! a state directory that cannot be written is said so in words (item 13).

mod common;

use std::process::{Command, Stdio};

use common::{this_host, Fl, KillOnDrop};
use flotilla_state::{Lock, State};

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
        renewed_at: 0,
    };
    state.acquire_lock("web", &me, 60, |_| false).unwrap();
}

fn lock_of(fl: &Fl) -> Option<Lock> {
    State::open(&fl.state()).unwrap().lock("web").unwrap()
}

#[test]
fn unlock_refuses_a_lock_whose_process_runs_here_and_breaks_it_once_that_process_died() {
    let fl = Fl::new();
    let mut holder = KillOnDrop(Command::new("sleep").arg("300").stdin(Stdio::null()).spawn().unwrap());
    let pid = holder.0.id();
    hold(&fl, &this_host(), pid);

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

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

/// `flotilla ARGS` under umask 000, so only flotilla's own choice of modes counts.
fn run_with_open_umask(fl: &Fl, args: &[&str]) -> common::Run {
    let inner = fl.cmd();
    let mut c = Command::new("sh");
    c.arg("-c").arg("umask 000; exec \"$0\" \"$@\"").arg(inner.get_program()).args(inner.get_args()).args(args).current_dir(common::repo());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    common::Run(c.output().unwrap())
}

#[test]
fn the_state_directory_and_database_are_private_from_the_first_command() {
    let fl = Fl::new();
    run_with_open_umask(&fl, &["list"]).ok();
    let dir = fl.state().parent().unwrap().to_owned();
    assert_eq!(mode(&dir), 0o700, "state directory");
    assert_eq!(mode(&fl.state()), 0o600, "state database");
    // While a connection is open SQLite keeps its -wal and -shm files: they take the
    // database's mode.
    let _open = State::open(&fl.state()).unwrap();
    for side in ["state.db-wal", "state.db-shm"] {
        assert_eq!(mode(&dir.join(side)), 0o600, "{side}");
    }
}

#[test]
fn exec_records_that_a_command_ran_but_not_its_arguments_unless_asked_and_machine_dirs_are_private() {
    let f = common::Fleet::new();
    let file = f.fl.file("private.nix", r#"{ meta.name = "private"; machines.box = { pkgs, ... }: { packages = [ pkgs.busybox ]; }; }"#);
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");

    let machines = f.fl.dir.path().join("state/machines");
    for d in [machines.clone(), machines.join("private"), machines.join("private/box")] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    assert_eq!(mode(&machines.join("private/box/root")), 0o755, "the machine's / must stay enterable by its own users");

    f.run(&["exec", "-d", "private", "box", "--", "echo", "hunter2-one"]).ok();
    f.run(&["exec", "-d", "private", "--all", "--", "echo", "hunter2-two"]).ok();
    let log = f.run(&["log", "-d", "private", "--json"]).ok().stdout();
    assert!(!log.contains("hunter2"), "exec arguments reached the ledger:\n{log}");
    assert_eq!(log.matches("a command ran (exit status: 0)").count(), 2, "{log}");

    f.run(&["exec", "-d", "private", "--record-command", "box", "--", "echo", "on-purpose"]).ok();
    let log = f.run(&["log", "-d", "private", "--json"]).ok().stdout();
    assert!(log.contains("echo on-purpose (exit status: 0)"), "{log}");
}

/// A state directory on a read-only filesystem, and one on a full one, are said so. Each
/// filesystem is a tmpfs mounted in a private mount namespace (`unshare -m`), gone with it.
#[test]
fn a_read_only_or_full_state_directory_is_said_so_in_words() {
    let fl = Fl::new();
    let (ro, full) = (fl.dir.path().join("ro"), fl.dir.path().join("full"));
    std::fs::create_dir(&ro).unwrap();
    std::fs::create_dir(&full).unwrap();
    let script = r#"
set -e
mount --make-rprivate /
mount -t tmpfs -o size=4m tmpfs "$RO"
FLOTILLA_STATE="$RO/state/state.db" "$FL" list >/dev/null
mount -o remount,ro "$RO"
echo "== read-only"
FLOTILLA_STATE="$RO/state/state.db" "$FL" list 2>&1 || echo "exit=$?"
mount -t tmpfs -o size=256k tmpfs "$FULL"
mkdir "$FULL/state"
dd if=/dev/zero of="$FULL/fill" bs=4k 2>/dev/null || true
echo "== full"
FLOTILLA_STATE="$FULL/state/state.db" "$FL" list 2>&1 || echo "exit=$?"
"#;
    let inner = fl.cmd();
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", script])
        .env("FL", inner.get_program())
        .env("RO", &ro)
        .env("FULL", &full)
        .env("FLOTILLA_SUBSTITUTERS", "")
        .output()
        .expect("prerequisite missing: unshare (Debian: util-linux)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the script failed:\n{text}");
    let (ro_part, full_part) = text.split_once("== full").unwrap_or_else(|| panic!("{text}"));
    assert!(ro_part.contains(&format!("the state directory {}/state is on a read-only filesystem", ro.display())), "{ro_part}");
    assert!(ro_part.contains("exit=2"), "{ro_part}");
    assert!(full_part.contains(&format!("the filesystem of the state directory {}/state is full", full.display())), "{full_part}");
    assert!(full_part.contains("exit=2"), "{full_part}");
    for bad in ["disk I/O error", "xShmMap", "attempt to write a readonly database"] {
        assert!(!text.contains(bad), "SQLite's words reached the user ({bad}):\n{text}");
    }
}

/// Issue 19: a local machine's root lives on the deployer host that provisioned it. Its
/// record says which host (`info --json`'s `host`); once the record says another host, `info`
/// here says "held on" that host instead of probing a root that is not here, and `stop` and
/// `deploy` of it from here are refused naming the host and the fix, with nothing changed.
#[test]
fn info_says_which_host_holds_a_local_machine_and_other_hosts_leave_it_alone() {
    let f = common::Fleet::new();
    let file = f.fl.file("held.nix", r#"{ meta.name = "held"; machines.box = { pkgs, ... }: { packages = [ pkgs.busybox ]; }; }"#);
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");

    let info: serde_json::Value = serde_json::from_str(&f.run(&["info", "-d", "held", "--json"]).ok().stdout()).unwrap();
    let m = &info["machines"][0];
    assert_eq!(m["host"], serde_json::json!(this_host()), "{info}");
    assert_eq!(m["state"], "running", "{info}");

    // The record now says another deployer host provisioned it.
    State::open(&f.fl.state()).unwrap().set_machine_host("held", "box", Some("alices-laptop")).unwrap();
    let r = f.run(&["info", "-d", "held"]).ok();
    let row = r.stdout().lines().find(|l| l.starts_with("box")).unwrap_or_default().to_owned();
    assert!(row.contains("held on alices-laptop"), "the row must say where it is:\n{}", r.stdout());
    assert!(r.stderr().contains("run this flotilla command on alices-laptop"), "{}", r.stderr());
    let info: serde_json::Value = serde_json::from_str(&f.run(&["info", "-d", "held", "--json"]).ok().stdout()).unwrap();
    assert_eq!(info["machines"][0]["host"], "alices-laptop", "{info}");

    let r = f.run(&["stop", "-d", "held", "--on", "box"]);
    assert_ne!(r.code(), 0, "stop of a machine held elsewhere must fail\n{}", r.stderr());
    assert!(r.stderr().contains("held on alices-laptop") && r.stderr().contains("run this flotilla command on alices-laptop"), "{}", r.stderr());
    let r = f.run(&["deploy", "-f", &file]);
    assert_ne!(r.code(), 0, "deploy of a machine held elsewhere must be refused");
    assert!(r.stderr().contains("machine box: held on alices-laptop"), "{}", r.stderr());

    // Nothing was changed here: back on its own host, it still runs.
    State::open(&f.fl.state()).unwrap().set_machine_host("held", "box", Some(&this_host())).unwrap();
    let info: serde_json::Value = serde_json::from_str(&f.run(&["info", "-d", "held", "--json"]).ok().stdout()).unwrap();
    assert_eq!(info["machines"][0]["state"], "running", "{info}");
}
