//! The state's test suite, run against both backends: each test is one template with a row
//! for SQLite and one for PostgreSQL (a throwaway cluster, see `testing`).

use super::*;
use rstest::rstest;
use rstest_reuse::{apply, template};
use serde_json::json;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A fresh state of `kind`, and where it lives (to open it again).
struct Fresh {
    _dir: tempfile::TempDir,
    location: PathBuf,
}

fn fresh(kind: Kind) -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    let location = match kind {
        Kind::Sqlite => dir.path().join("sub/state.db"),
        Kind::Postgres => PathBuf::from(testing::pg_database()),
    };
    Fresh { _dir: dir, location }
}

fn open(kind: Kind) -> (Fresh, State) {
    let f = fresh(kind);
    let state = State::open(&f.location).unwrap();
    (f, state)
}

/// Runs SQL that no public method would (to fake a newer schema, or count rows).
fn raw(state: &State, sql: &str) -> Vec<Row> {
    state.conn.borrow_mut().write(|tx| tx.query(sql, &[])).unwrap()
}

fn count(state: &State, table: &str) -> i64 {
    raw(state, &format!("SELECT COUNT(*) FROM {table}"))[0].int(0).unwrap()
}

#[template]
#[rstest]
#[case::sqlite(Kind::Sqlite)]
#[case::postgres(Kind::Postgres)]
fn backends(#[case] kind: Kind) {}

fn evaluate(state: &mut State, ip: &str) {
    let spec = json!({ "type": "local", "subnet": "10.1.0.0/24" });
    let tags = vec!["web".to_owned()];
    let facts: BTreeMap<String, Value> = [("ip".to_owned(), json!(ip))].into();
    let m = MachineUpsert { name: "web1", platform: "local", platform_spec: &spec, tags: &tags, facts: &facts };
    let dep = DeploymentUpsert { name: "webfleet", file: Some("/x/deployment.nix"), description: "d" };
    state.record_evaluation(&dep, &[m]).unwrap();
}

#[apply(backends)]
fn migrates_an_empty_database_to_the_newest_schema(kind: Kind) {
    let (f, state) = open(kind);
    assert_eq!(state.schema_version().unwrap(), MIGRATIONS.len() as i64);
    drop(state);
    // Opening again applies nothing and keeps the version.
    let again = State::open(&f.location).unwrap();
    assert_eq!(again.schema_version().unwrap(), MIGRATIONS.len() as i64);
}

#[apply(backends)]
fn refuses_a_newer_schema(kind: Kind) {
    let (f, state) = open(kind);
    match kind {
        Kind::Sqlite => drop(raw(&state, "PRAGMA user_version = 99")),
        Kind::Postgres => drop(raw(&state, "UPDATE flotilla_schema SET version = 99")),
    }
    drop(state);
    let err = State::open(&f.location).err().unwrap();
    assert!(err.to_string().contains("upgrade flotilla"), "{err}");
}

#[apply(backends)]
fn round_trips_deployments_machines_facts_and_builds(kind: Kind) {
    let (_f, mut state) = open(kind);
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
    assert_eq!(machines[0].host, None, "no deployer host holds a machine before it is provisioned");
    state.set_machine_host("webfleet", "web1", Some("alices-laptop")).unwrap();
    evaluate(&mut state, "10.1.0.3");
    assert_eq!(state.machines("webfleet").unwrap()[0].host.as_deref(), Some("alices-laptop"), "an evaluation keeps the holding host");
    assert_eq!(state.facts("webfleet").unwrap()["web1"]["ip"], json!("10.1.0.3"));

    state.record_builds("webfleet", "root@host", &[("web1", "/nix/store/a-x", "/nix/store/a-x.drv")]).unwrap();
    state.record_builds("webfleet", "root@host", &[("web1", "/nix/store/a-x", "/nix/store/a-x.drv")]).unwrap();
    let build = state.machines("webfleet").unwrap()[0].last_build.clone().unwrap();
    assert_eq!(build.toplevel, "/nix/store/a-x");
    assert_eq!(build.status, "built");
    assert_eq!(count(&state, "generations"), 1, "rebuilding the same toplevel adds no generation");

    let events = state.events(Some("webfleet"), 10).unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].kind, "build");
}

#[apply(backends)]
fn delete_forgets_everything_but_the_ledger(kind: Kind) {
    let (_f, mut state) = open(kind);
    evaluate(&mut state, "10.1.0.2");
    state.record_builds("webfleet", "me", &[("web1", "/nix/store/a-x", "/nix/store/a-x.drv")]).unwrap();
    assert!(state.delete_deployment("webfleet", "me").unwrap());
    assert!(!state.delete_deployment("webfleet", "me").unwrap());
    assert!(state.deployments().unwrap().is_empty());
    for table in ["machines", "facts", "generations"] {
        assert_eq!(count(&state, table), 0, "{table} emptied by cascade");
    }
    let events = state.events(Some("webfleet"), 10).unwrap();
    assert_eq!(events.last().unwrap().kind, "delete");
    assert!(matches!(state.machines("webfleet"), Err(StateError::NoDeployment(_))));
}

#[apply(backends)]
fn a_failed_write_leaves_nothing_behind(kind: Kind) {
    let (_f, mut state) = open(kind);
    evaluate(&mut state, "10.1.0.2");
    // web9 does not exist: the whole batch fails and web1's build is not recorded either.
    let err = state.record_builds("webfleet", "me", &[("web1", "/nix/store/a-x", "d"), ("web9", "/nix/store/b-y", "d")]);
    assert!(err.is_err());
    assert!(state.machines("webfleet").unwrap()[0].last_build.is_none());
    assert!(state.events(Some("webfleet"), 10).unwrap().is_empty());
}

fn holder(pid: i64) -> Lock {
    Lock { holder: "alice@here".into(), host: "here".into(), pid, pid_start: 7, command: "deploy".into(), since: 1_700_000_000, renewed_at: 0 }
}

/// The lock as stored, its renewal time left out (the state sets it).
fn held(state: &State, deployment: &str) -> Option<Lock> {
    state.lock(deployment).unwrap().map(|l| Lock { renewed_at: 0, ..l })
}

#[apply(backends)]
fn a_held_lock_is_refused_with_its_holder_and_a_dead_one_taken_over(kind: Kind) {
    let (_f, mut state) = open(kind);
    assert_eq!(state.acquire_lock("web", &holder(1), 60, |_| false).unwrap(), Acquired::Free);
    let err = state.acquire_lock("web", &holder(2), 60, |_| false).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("locked by alice@here (pid 1 on here, `deploy`) since 2023-11-14 22:13:20 UTC"), "{msg}");
    // Another deployment is independent.
    assert_eq!(state.acquire_lock("db", &holder(2), 60, |_| false).unwrap(), Acquired::Free);
    // The holder is gone: taken over, and the ledger says so.
    let l1 = state.lock("web").unwrap().unwrap();
    assert_eq!(state.acquire_lock("web", &holder(2), 60, |l| l.pid == 1).unwrap(), Acquired::TookOver(l1));
    assert!(state.events(Some("web"), 10).unwrap().iter().any(|e| e.kind == "lock" && e.message.contains("pid 1")));
    // Only the holder releases it.
    state.release_lock("web", &holder(1)).unwrap();
    assert_eq!(held(&state, "web").map(|l| l.pid), Some(2));
    state.release_lock("web", &holder(2)).unwrap();
    assert_eq!(held(&state, "web"), None);
    // Breaking a lock held elsewhere says whose it was.
    state.acquire_lock("web", &holder(3), 60, |_| false).unwrap();
    let refused = state.break_lock("web", "bob", |_, _| Err("it runs".into())).unwrap();
    let Broken::Refused(l3, why) = refused else { panic!("{refused:?}") };
    assert_eq!((Lock { renewed_at: 0, ..l3 }, why.as_str()), (holder(3), "it runs"));
    assert_eq!(held(&state, "web").map(|l| l.pid), Some(3), "a refused break keeps the lock");
    assert!(matches!(state.break_lock("web", "bob", |_, _| Ok(("forced", "said so".into()))).unwrap(), Broken::Broken(l) if l.pid == 3));
    assert_eq!(held(&state, "web"), None);
    assert!(state.events(Some("web"), 10).unwrap().iter().any(|e| e.status == "forced" && e.message.contains("pid 3") && e.message.ends_with("said so")));
    assert_eq!(state.break_lock("web", "bob", |_, _| unreachable!()).unwrap(), Broken::NotLocked);
}

#[apply(backends)]
fn activation_marks_one_generation_active_and_supersedes_the_last(kind: Kind) {
    let (_f, mut state) = open(kind);
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

#[apply(backends)]
fn the_ledger_keeps_no_control_characters(kind: Kind) {
    let (_f, mut state) = open(kind);
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
    let message = raw(&state, "SELECT message FROM events")[0].text(0).unwrap();
    assert_eq!(message, "health check failed: \\x1b]0;pwned\\x07\\x1b[2J\nsecond line");
}

/// One table as flotilla sees it: columns (name, type, not null) in order, the primary key's
/// columns, and the other indexes (unique or not, their columns).
type Shape = (Vec<(String, String, bool)>, Vec<String>, std::collections::BTreeSet<(bool, String)>);

fn normal_type(t: &str) -> String {
    match t.to_ascii_lowercase().as_str() {
        "integer" | "bigint" | "int8" => "integer".into(),
        other => other.into(),
    }
}

fn schema(state: &State) -> BTreeMap<String, Shape> {
    let mut conn = state.conn.borrow_mut();
    let postgres = matches!(*conn, Conn::Postgres(_));
    conn.read(|tx| {
        let mut out = BTreeMap::new();
        let tables: Vec<String> = if postgres {
            tx.query("SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE' AND table_name <> 'flotilla_schema'", &[])?
        } else {
            tx.query("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'", &[])?
        }
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<_>>()?;
        for t in tables {
            let mut columns = Vec::new();
            let mut pk: Vec<(i64, String)> = Vec::new();
            let mut indexes = std::collections::BTreeSet::new();
            if postgres {
                for r in tx.query("SELECT column_name::text, data_type::text, is_nullable::text FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position", params![&t])? {
                    columns.push((r.text(0)?, normal_type(&r.text(1)?), r.text(2)? == "NO"));
                }
                for r in tx.query(
                    "SELECT i.indisprimary, i.indisunique, array_to_string(ARRAY(
                        SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o)
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o), ',')
                     FROM pg_index i WHERE i.indrelid = to_regclass($1)",
                    params![&t],
                )? {
                    if r.int(0)? != 0 {
                        pk = r.text(2)?.split(',').enumerate().map(|(i, c)| (i as i64, c.to_owned())).collect();
                    } else {
                        indexes.insert((r.int(1)? != 0, r.text(2)?));
                    }
                }
            } else {
                for r in tx.query("SELECT name, type, \"notnull\", pk FROM pragma_table_info($1) ORDER BY cid", params![&t])? {
                    let name = r.text(0)?;
                    let in_pk = r.int(3)?;
                    columns.push((name.clone(), normal_type(&r.text(1)?), r.int(2)? != 0 || in_pk > 0));
                    if in_pk > 0 {
                        pk.push((in_pk, name));
                    }
                }
                for r in tx.query("SELECT name, \"unique\", origin FROM pragma_index_list($1)", params![&t])? {
                    if r.text(2)? == "pk" {
                        continue;
                    }
                    let cols: Vec<String> = tx.query("SELECT name FROM pragma_index_info($1) ORDER BY seqno", params![r.text(0)?])?.iter().map(|c| c.text(0)).collect::<Result<_>>()?;
                    indexes.insert((r.int(1)? != 0, cols.join(",")));
                }
            }
            pk.sort();
            out.insert(t, (columns, pk.into_iter().map(|(_, c)| c).collect(), indexes));
        }
        Ok(out)
    })
    .unwrap()
}

#[test]
fn both_dialects_migrate_to_the_same_schema() {
    let (_a, sqlite) = open(Kind::Sqlite);
    let (_b, postgres) = open(Kind::Postgres);
    let (s, p) = (schema(&sqlite), schema(&postgres));
    assert_eq!(s.keys().collect::<Vec<_>>(), ["deployments", "events", "facts", "generations", "locks", "machines"], "{s:#?}");
    assert_eq!(s, p, "the SQLite and PostgreSQL migrations are out of step");
    // The comparison sees what it must: the lock's lease column, and the unique machine names.
    assert!(s["locks"].0.iter().any(|(c, t, nn)| c == "renewed_at" && t == "integer" && *nn));
    assert!(s["machines"].2.contains(&(true, "deployment_id,name".to_owned())));
}

#[apply(backends)]
fn two_deployers_racing_for_a_free_lock_never_both_win(kind: Kind) {
    let f = fresh(kind);
    drop(State::open(&f.location).unwrap());
    for round in 0..15 {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let winners: Vec<bool> = std::thread::scope(|s| {
            let racers: Vec<_> = [1, 2]
                .map(|pid| {
                    let (barrier, location) = (barrier.clone(), f.location.clone());
                    s.spawn(move || {
                        let mut state = State::open(&location).unwrap();
                        barrier.wait();
                        match state.acquire_lock("web", &holder(pid), 60, |_| false) {
                            Ok(Acquired::Free) => true,
                            Err(StateError::Locked { .. }) => false,
                            other => panic!("round {round}: {other:?}"),
                        }
                    })
                })
                .into_iter()
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(winners.iter().filter(|w| **w).count(), 1, "round {round}: {winners:?}");
        let mut state = State::open(&f.location).unwrap();
        let pid = state.lock("web").unwrap().unwrap().pid;
        state.release_lock("web", &holder(pid)).unwrap();
    }
}

#[apply(backends)]
fn a_lease_not_renewed_is_taken_over_and_the_ledger_says_expired(kind: Kind) {
    let (f, mut state) = open(kind);
    state.acquire_lock("web", &holder(1), 60, |_| false).unwrap();
    assert!(state.renew_lock("web", &holder(1)).unwrap(), "the holder renews its own lease");
    // Renewed just now: a second deployer is refused, whatever the lease.
    assert!(matches!(state.acquire_lock("web", &holder(2), 60, |_| false), Err(StateError::Locked { .. })));
    // Its holder stops renewing: 90 seconds later the lease of 60 has expired.
    raw(&state, "UPDATE locks SET renewed_at = renewed_at - 90");
    let mut other = State::open(&f.location).unwrap();
    let outcome = other.acquire_lock("web", &holder(2), 60, |_| false).unwrap();
    assert!(matches!(&outcome, Acquired::Expired(old) if old.pid == 1), "{outcome:?}");
    let said = other.events(Some("web"), 10).unwrap();
    assert!(said.iter().any(|e| e.kind == "lock" && e.status == "expired" && e.message.contains("pid 1")), "{said:?}");
    // The old holder finds out at its next renewal, and the new one keeps the lock.
    assert!(!state.renew_lock("web", &holder(1)).unwrap());
    assert_eq!(held(&state, "web").map(|l| l.pid), Some(2));
}

#[apply(backends)]
fn deployers_opening_a_new_database_at_once_all_migrate_it(kind: Kind) {
    let f = fresh(kind);
    let opened: Vec<Result<i64>> = std::thread::scope(|s| {
        let all: Vec<_> = (0..4).map(|_| s.spawn(|| State::open(&f.location).and_then(|st| st.schema_version()))).collect();
        all.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for o in opened {
        assert_eq!(o.unwrap(), MIGRATIONS.len() as i64);
    }
}

#[apply(backends)]
fn an_export_imports_whole_into_either_backend_and_an_existing_or_locked_one_is_refused(kind: Kind) {
    // Made on SQLite, imported into `kind`.
    let (_a, mut from) = open(Kind::Sqlite);
    evaluate(&mut from, "10.1.0.2");
    from.record_builds("webfleet", "alice", &[("web1", "/nix/store/a", "/nix/store/a.drv")]).unwrap();
    from.record_activation("webfleet", "web1", "alice", "/nix/store/a", 1, "switched").unwrap();
    from.set_machine_host("webfleet", "web1", Some("alices-laptop")).unwrap();
    let export = from.export("webfleet").unwrap();
    assert_eq!(export.machines[0].host.as_deref(), Some("alices-laptop"));
    let text = serde_json::to_string(&export).unwrap();
    assert_eq!(export::parse(&text).unwrap(), export, "an export reads back as written");

    let (_b, mut to) = open(kind);
    to.import(&export, false, "bob").unwrap();
    let mut back = to.export("webfleet").unwrap();
    let import = back.events.pop().unwrap();
    assert_eq!((import.kind.as_str(), import.actor.as_str()), ("import", "bob"));
    assert_eq!(back, export);
    assert_eq!(to.machines("webfleet").unwrap(), from.machines("webfleet").unwrap());

    let err = to.import(&export, false, "bob").unwrap_err().to_string();
    assert!(err.contains("exists in this state already") && err.contains("--replace"), "{err}");
    to.import(&export, true, "bob").unwrap();
    assert_eq!(to.events(Some("webfleet"), 100).unwrap().len(), export.events.len() + 1, "replaced, not added to");

    to.acquire_lock("webfleet", &holder(9), 60, |_| false).unwrap();
    assert!(matches!(to.import(&export, true, "bob"), Err(StateError::Locked { .. })), "a locked deployment is never replaced");
    let newer = export::Export { version: export::VERSION + 1, ..export.clone() };
    assert!(to.import(&newer, true, "bob").unwrap_err().to_string().contains("upgrade"));
}

#[apply(backends)]
fn an_export_from_before_machine_hosts_imports_with_no_host(kind: Kind) {
    let (_a, mut from) = open(Kind::Sqlite);
    evaluate(&mut from, "10.1.0.2");
    from.set_machine_host("webfleet", "web1", Some("alices-laptop")).unwrap();
    let mut old: Value = serde_json::to_value(from.export("webfleet").unwrap()).unwrap();
    old["machines"][0].as_object_mut().unwrap().remove("host").unwrap();
    let export = export::parse(&old.to_string()).unwrap();
    let (_b, mut to) = open(kind);
    to.import(&export, false, "bob").unwrap();
    assert_eq!(to.machines("webfleet").unwrap()[0].host, None);
}

/// Two laptops both named `nixos`: the same hostname, another machine id. The other's pid is
/// not found here, yet its holder is alive there: its lock is not taken over before its lease
/// expires, and then only as expired.
#[apply(backends)]
fn a_lock_of_a_host_with_the_same_name_but_another_machine_id_is_not_taken_over_by_pid(kind: Kind) {
    let (_f, mut state) = open(kind);
    let on = |host: &str, pid| Lock { host: host.into(), holder: "alice@nixos".into(), ..holder(pid) };
    state.acquire_lock("web", &on("nixos (3d1219c7c4c5)", 1), 60, |_| false).unwrap();
    let here = on("nixos (9e0c7a11b2d3)", 2);
    let err = state.acquire_lock("web", &here, 60, |_| true).unwrap_err();
    assert!(matches!(&err, StateError::Locked { holder, .. } if holder.host == "nixos (3d1219c7c4c5)"), "{err}");
    assert!(err.to_string().contains("pid 1 on nixos (3d1219c7c4c5)"), "{err}");
    assert_eq!(held(&state, "web").map(|l| (l.pid, l.host)), Some((1, "nixos (3d1219c7c4c5)".into())));
    assert!(state.events(Some("web"), 10).unwrap().iter().all(|e| e.kind != "lock"));
    // On the holder's own host (name and machine id) a dead pid is taken over at once.
    let mut same = on("nixos (3d1219c7c4c5)", 2);
    same.pid_start = 8;
    assert!(matches!(state.acquire_lock("web", &same, 60, |l| l.pid == 1).unwrap(), Acquired::TookOver(l) if l.pid == 1));
    // Once its lease expired, the other laptop's lock is taken over, as expired.
    raw(&state, "UPDATE locks SET renewed_at = renewed_at - 90");
    assert!(matches!(state.acquire_lock("web", &here, 60, |_| true).unwrap(), Acquired::Expired(l) if l.pid == 2));
}

/// On PostgreSQL a lease is written and judged by the server's clock: a holder whose clock is
/// 90 seconds behind (or a taker whose clock is 90 seconds ahead) does not make a live lease of
/// 60 seconds look expired. SQLite is opened on one host only, by its one clock.
#[test]
fn a_holder_with_a_skewed_clock_is_not_taken_over_early_on_postgres() {
    let (f, mut behind) = open(Kind::Postgres);
    behind.skew = -90;
    behind.acquire_lock("web", &holder(1), 60, |_| false).unwrap();
    assert!(behind.renew_lock("web", &holder(1)).unwrap());
    let mut fair = State::open(&f.location).unwrap();
    assert!(matches!(fair.acquire_lock("web", &holder(2), 60, |_| false), Err(StateError::Locked { .. })));
    let mut ahead = State::open(&f.location).unwrap();
    ahead.skew = 90;
    assert!(matches!(ahead.acquire_lock("web", &holder(2), 60, |_| false), Err(StateError::Locked { .. })));
    let refused = ahead.break_lock("web", "bob", |_, idle| if idle > 60 { Ok(("expired", format!("idle {idle}s"))) } else { Err(format!("idle {idle}s")) }).unwrap();
    assert!(matches!(&refused, Broken::Refused(l, _) if l.pid == 1), "{refused:?}");
    assert_eq!(held(&fair, "web").map(|l| l.pid), Some(1));
}
