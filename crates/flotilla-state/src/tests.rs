use super::*;
use serde_json::json;

fn open() -> (tempfile::TempDir, State) {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(&dir.path().join("sub/state.db")).unwrap();
    (dir, state)
}

fn evaluate(state: &mut State, ip: &str) {
    let spec = json!({ "type": "local", "subnet": "10.1.0.0/24" });
    let tags = vec!["web".to_owned()];
    let facts: BTreeMap<String, Value> = [("ip".to_owned(), json!(ip))].into();
    let m = MachineUpsert { name: "web1", platform: "local", platform_spec: &spec, tags: &tags, facts: &facts };
    let dep = DeploymentUpsert { name: "webfleet", file: Some("/x/deployment.nix"), description: "d" };
    state.record_evaluation(&dep, &[m]).unwrap();
}

#[test]
fn migrates_an_empty_file_to_the_newest_schema() {
    let (dir, state) = open();
    assert_eq!(state.schema_version().unwrap(), MIGRATIONS.len() as i64);
    drop(state);
    // Opening again applies nothing and keeps the version.
    let again = State::open(&dir.path().join("sub/state.db")).unwrap();
    assert_eq!(again.schema_version().unwrap(), MIGRATIONS.len() as i64);
}

#[test]
fn refuses_a_newer_schema() {
    let (dir, state) = open();
    state.conn.pragma_update(None, "user_version", 99).unwrap();
    drop(state);
    let err = State::open(&dir.path().join("sub/state.db")).err().unwrap();
    assert!(err.to_string().contains("upgrade flotilla"), "{err}");
}

#[test]
fn round_trips_deployments_machines_facts_and_builds() {
    let (_dir, mut state) = open();
    evaluate(&mut state, "10.1.0.2");
    evaluate(&mut state, "10.1.0.3");
    let deps = state.deployments().unwrap();
    assert_eq!(deps.len(), 1);
    assert_eq!(deps[0].name, "webfleet");
    assert_eq!(deps[0].machines, 1);
    assert_eq!(deps[0].file.as_deref(), Some("/x/deployment.nix"));

    let machines = state.machines("webfleet").unwrap();
    assert_eq!(machines[0].tags, ["web"]);
    assert_eq!(machines[0].facts["ip"], json!("10.1.0.3"));
    assert_eq!(machines[0].platform_spec["subnet"], json!("10.1.0.0/24"));
    assert!(machines[0].last_build.is_none());
    assert_eq!(state.facts("webfleet").unwrap()["web1"]["ip"], json!("10.1.0.3"));

    state.record_builds("webfleet", "root@host", &[("web1", "/nix/store/a-x", "/nix/store/a-x.drv")]).unwrap();
    state.record_builds("webfleet", "root@host", &[("web1", "/nix/store/a-x", "/nix/store/a-x.drv")]).unwrap();
    let build = state.machines("webfleet").unwrap()[0].last_build.clone().unwrap();
    assert_eq!(build.toplevel, "/nix/store/a-x");
    assert_eq!(build.status, "built");
    let n: i64 = state.conn.query_row("SELECT COUNT(*) FROM generations", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 1, "rebuilding the same toplevel adds no generation");

    let events = state.events(Some("webfleet"), 10).unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].kind, "build");
}

#[test]
fn delete_forgets_everything_but_the_ledger() {
    let (_dir, mut state) = open();
    evaluate(&mut state, "10.1.0.2");
    state.record_builds("webfleet", "me", &[("web1", "/nix/store/a-x", "/nix/store/a-x.drv")]).unwrap();
    assert!(state.delete_deployment("webfleet", "me").unwrap());
    assert!(!state.delete_deployment("webfleet", "me").unwrap());
    assert!(state.deployments().unwrap().is_empty());
    for table in ["machines", "facts", "generations"] {
        let n: i64 = state.conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0, "{table} emptied by cascade");
    }
    let events = state.events(Some("webfleet"), 10).unwrap();
    assert_eq!(events.last().unwrap().kind, "delete");
    assert!(matches!(state.machines("webfleet"), Err(StateError::NoDeployment(_))));
}

#[test]
fn a_failed_write_leaves_nothing_behind() {
    let (_dir, mut state) = open();
    evaluate(&mut state, "10.1.0.2");
    // web9 does not exist: the whole batch fails and web1's build is not recorded either.
    let err = state.record_builds("webfleet", "me", &[("web1", "/nix/store/a-x", "d"), ("web9", "/nix/store/b-y", "d")]);
    assert!(err.is_err());
    assert!(state.machines("webfleet").unwrap()[0].last_build.is_none());
    assert!(state.events(Some("webfleet"), 10).unwrap().is_empty());
}

fn holder(pid: i64) -> Lock {
    Lock { holder: "alice@here".into(), host: "here".into(), pid, pid_start: 7, command: "deploy".into(), since: 1_700_000_000 }
}

#[test]
fn a_held_lock_is_refused_with_its_holder_and_a_dead_one_taken_over() {
    let (_dir, mut state) = open();
    assert_eq!(state.acquire_lock("web", &holder(1), |_| false).unwrap(), Acquired::Free);
    let err = state.acquire_lock("web", &holder(2), |_| false).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("locked by alice@here (pid 1 on here, `deploy`) since 2023-11-14 22:13:20 UTC"), "{msg}");
    // Another deployment is independent.
    assert_eq!(state.acquire_lock("db", &holder(2), |_| false).unwrap(), Acquired::Free);
    // The holder is gone: taken over, and the ledger says so.
    assert_eq!(state.acquire_lock("web", &holder(2), |l| l.pid == 1).unwrap(), Acquired::TookOver(holder(1)));
    assert!(state.events(Some("web"), 10).unwrap().iter().any(|e| e.kind == "lock" && e.message.contains("pid 1")));
    // Only the holder releases it.
    state.release_lock("web", &holder(1)).unwrap();
    assert_eq!(state.lock("web").unwrap().map(|l| l.pid), Some(2));
    state.release_lock("web", &holder(2)).unwrap();
    assert_eq!(state.lock("web").unwrap(), None);
    // Breaking a lock held elsewhere says whose it was.
    state.acquire_lock("web", &holder(3), |_| false).unwrap();
    let refused = state.break_lock("web", "bob", |_| Err("it runs".into())).unwrap();
    assert_eq!(refused, Broken::Refused(holder(3), "it runs".into()));
    assert_eq!(state.lock("web").unwrap().map(|l| l.pid), Some(3), "a refused break keeps the lock");
    assert_eq!(state.break_lock("web", "bob", |_| Ok(("forced", "said so".into()))).unwrap(), Broken::Broken(holder(3)));
    assert_eq!(state.lock("web").unwrap(), None);
    assert!(state.events(Some("web"), 10).unwrap().iter().any(|e| e.status == "forced" && e.message.contains("pid 3") && e.message.ends_with("said so")));
    assert_eq!(state.break_lock("web", "bob", |_| unreachable!()).unwrap(), Broken::NotLocked);
}

#[test]
fn activation_marks_one_generation_active_and_supersedes_the_last() {
    let (_dir, mut state) = open();
    evaluate(&mut state, "10.0.0.2");
    state.record_builds("webfleet", "alice", &[("web1", "/nix/store/a", "/nix/store/a.drv")]).unwrap();
    state.record_activation("webfleet", "web1", "alice", "/nix/store/a", 1, "switched").unwrap();
    state.record_builds("webfleet", "alice", &[("web1", "/nix/store/b", "/nix/store/b.drv")]).unwrap();
    state.record_activation("webfleet", "web1", "alice", "/nix/store/b", 2, "switched").unwrap();
    let active = state.active_generation("webfleet", "web1").unwrap().unwrap();
    assert_eq!((active.number, active.toplevel.as_str()), (Some(2), "/nix/store/b"));
    // Rolled back by hand on the machine to a path never built here: still recorded.
    state.record_activation("webfleet", "web1", "alice", "/nix/store/c", 3, "rolled back").unwrap();
    assert_eq!(state.active_generation("webfleet", "web1").unwrap().unwrap().toplevel, "/nix/store/c");
    assert!(state.remove_machine("webfleet", "web1", "alice").unwrap());
    assert!(state.active_generation("webfleet", "web1").unwrap().is_none());
}

#[test]
fn the_ledger_keeps_no_control_characters() {
    let (_dir, mut state) = open();
    state
        .add_event(&Event {
            deployment: "webfleet".into(),
            machine: Some("web1".into()),
            at: 1,
            actor: "root@host".into(),
            kind: "deploy".into(),
            status: "failed".into(),
            message: "health check failed: \x1b]0;pwned\x07\x1b[2J\nsecond line".into(),
            details: None,
        })
        .unwrap();
    let raw: String = state.conn.query_row("SELECT message FROM events", [], |r| r.get(0)).unwrap();
    assert_eq!(raw, "health check failed: \\x1b]0;pwned\\x07\\x1b[2J\nsecond line");
}
