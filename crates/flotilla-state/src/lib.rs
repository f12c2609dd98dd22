//! flotilla's state: deployments, machines and their facts, builds and generations, the
//! ledger of events, and deployment locks, in an embedded SQLite file.
//!
//! This crate owns the schema; no SQL is written anywhere else. Every public method that
//! changes anything does so in one transaction, so a failed command leaves no half-written
//! state. Migrations are the numbered files in `migrations/`, applied in order and recorded
//! in SQLite's `user_version`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_model::format_time;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

mod files;
pub use files::storage_problem;
use serde::Serialize;
use serde_json::Value;

/// The migrations, in order; entry `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_initial.sql"),
    include_str!("../migrations/0002_deploy_locks.sql"),
];

/// Everything that can go wrong with the state DB.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be opened or created.
    #[error("cannot open the state database {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// The file could not be opened or created (before SQLite: it is a link, or not ours).
    #[error("cannot open the state database {path}: {source}")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The filesystem under the state cannot take writes: read-only, full, not ours.
    #[error("{0}")]
    Storage(String),
    /// Its directory could not be created.
    #[error("cannot create the state directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was written by a newer flotilla.
    #[error("the state database {path} has schema version {found}, newer than this flotilla knows ({known}); upgrade flotilla")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// A migration failed; nothing of it was applied.
    #[error("migrating the state database {path} to version {version} failed: {source}")]
    Migrate {
        /// The file.
        path: PathBuf,
        /// The version being applied.
        version: usize,
        /// Why.
        source: rusqlite::Error,
    },
    /// The named deployment is not in the state DB.
    #[error("no deployment named `{0}` in the state database; `flotilla list` shows the known ones")]
    NoDeployment(String),
    /// Another live process holds the deployment's lock.
    #[error("deployment `{deployment}` is locked by {} (pid {} on {}, `{}`) since {}; wait for it to finish (a lock whose process died on this host is taken over by the next command; one left by a dead process on another host is broken with `flotilla unlock -d {deployment} --force`)", .holder.holder, .holder.pid, .holder.host, .holder.command, format_time(.holder.since))]
    Locked {
        /// The deployment.
        deployment: String,
        /// Who holds it.
        holder: Lock,
    },
    /// Any other SQLite error.
    #[error("state database error: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored JSON column did not parse (the file was edited by hand?).
    #[error("state database holds malformed JSON in {what}: {source}")]
    Json {
        /// Which column.
        what: &'static str,
        /// Why.
        source: serde_json::Error,
    },
}

/// This crate's result type.
pub type Result<T, E = StateError> = std::result::Result<T, E>;

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Where the state DB lives: `$FLOTILLA_STATE`, else `$XDG_STATE_HOME/flotilla/state.db`,
/// else `~/.local/state/flotilla/state.db`.
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOTILLA_STATE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
            home.join(".local/state")
        });
    base.join("flotilla/state.db")
}

/// A deployment as listed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentRecord {
    /// Its name.
    pub name: String,
    /// The deployment file it was last evaluated from.
    pub file: Option<String>,
    /// `meta.description`.
    pub description: String,
    /// Number of machines.
    pub machines: usize,
    /// First recorded (Unix seconds).
    pub created_at: i64,
    /// Last changed (Unix seconds).
    pub updated_at: i64,
}

/// What an evaluation says about a deployment.
#[derive(Debug, Clone)]
pub struct DeploymentUpsert<'a> {
    /// Its name.
    pub name: &'a str,
    /// The file.
    pub file: Option<&'a str>,
    /// `meta.description`.
    pub description: &'a str,
}

/// What an evaluation says about one machine.
#[derive(Debug, Clone)]
pub struct MachineUpsert<'a> {
    /// Its name.
    pub name: &'a str,
    /// `platform.type`.
    pub platform: &'a str,
    /// The whole checked `platform` option.
    pub platform_spec: &'a Value,
    /// Its tags.
    pub tags: &'a [String],
    /// Facts to store (merged over the stored ones).
    pub facts: &'a BTreeMap<String, Value>,
}

/// A machine as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineRecord {
    /// Its name.
    pub name: String,
    /// `platform.type`.
    pub platform: String,
    /// The checked `platform` option.
    pub platform_spec: Value,
    /// Its tags.
    pub tags: Vec<String>,
    /// Deploy-time facts (ip, ids, ...).
    pub facts: BTreeMap<String, Value>,
    /// The newest build or generation.
    pub last_build: Option<GenerationRecord>,
}

/// A build of a machine's toplevel, and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationRecord {
    /// The agent's generation number once activated.
    pub number: Option<i64>,
    /// The toplevel store path.
    pub toplevel: String,
    /// Its derivation.
    pub drv: Option<String>,
    /// built | active | superseded | failed | rolled-back
    pub status: String,
    /// When it was built (Unix seconds).
    pub built_at: i64,
    /// When it was activated.
    pub activated_at: Option<i64>,
}

/// One ledger entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// The deployment's name.
    pub deployment: String,
    /// The machine, for per-machine steps.
    pub machine: Option<String>,
    /// When (Unix seconds).
    pub at: i64,
    /// Who (user@host).
    pub actor: String,
    /// What: eval, build, copy, activate, delete, ...
    pub kind: String,
    /// ok | failed | ...
    pub status: String,
    /// A human summary.
    pub message: String,
    /// Structured details.
    pub details: Option<Value>,
}

/// Who holds a deployment's lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lock {
    /// user@host.
    pub holder: String,
    /// The host the holder runs on.
    pub host: String,
    /// Its process id.
    pub pid: i64,
    /// Its process start time (clock ticks after boot; 0 when unknown).
    pub pid_start: i64,
    /// What it is doing (`deploy`, `destroy`, ...).
    pub command: String,
    /// Since when (Unix seconds).
    pub since: i64,
}

/// How a lock was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// It was free.
    Free,
    /// A stale lock of a dead process was taken over.
    TookOver(Lock),
}

/// What [`State::break_lock`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// Nobody held it.
    NotLocked,
    /// This lock was broken.
    Broken(Lock),
    /// This lock was kept, for the reason given.
    Refused(Lock, String),
}

/// An open state DB.
pub struct State {
    conn: Connection,
    path: PathBuf,
}

impl State {
    /// Opens (creating if needed) the state DB at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<State> {
        Self::open_private(path).map_err(|e| match storage_problem(path, &e) {
            Some(message) => StateError::Storage(message),
            None => e,
        })
    }

    fn open_private(path: &Path) -> Result<State> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            files::make_dir(dir).map_err(|source| StateError::CreateDir { path: dir.to_owned(), source })?;
        }
        files::make_db_file(path).map_err(|source| StateError::OpenFile { path: path.to_owned(), source })?;
        let conn = Connection::open(path).map_err(|source| StateError::Open { path: path.to_owned(), source })?;
        let open_err = |source| StateError::Open { path: path.to_owned(), source };
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        // With WAL, NORMAL syncs at checkpoints: a committed write survives a crash of
        // flotilla, and only a power loss can take the newest transactions.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        let mut state = State { conn, path: path.to_owned() };
        state.migrate()?;
        Ok(state)
    }

    /// The file this state lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version the file is at.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn migrate(&mut self) -> Result<()> {
        let known = MIGRATIONS.len() as i64;
        let found = self.schema_version()?;
        if found > known {
            return Err(StateError::TooNew { path: self.path.clone(), found, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = i + 1;
            let err = |source| StateError::Migrate { path: self.path.clone(), version, source };
            // Another process may be migrating the same file: take the write lock first and
            // skip a step it has already applied.
            let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(err)?;
            let now_at: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(err)?;
            if now_at >= version as i64 {
                continue;
            }
            tx.execute_batch(sql).map_err(err)?;
            tx.pragma_update(None, "user_version", version as i64).map_err(err)?;
            tx.commit().map_err(err)?;
        }
        Ok(())
    }

    /// All deployments, by name.
    pub fn deployments(&self) -> Result<Vec<DeploymentRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT d.name, d.file, d.description, d.created_at, d.updated_at,
                    (SELECT COUNT(*) FROM machines m WHERE m.deployment_id = d.id)
             FROM deployments d ORDER BY d.name",
        )?;
        let rows = stmt.query_map([], deployment_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One deployment, or `None`.
    pub fn deployment(&self, name: &str) -> Result<Option<DeploymentRecord>> {
        Ok(self
            .conn
            .query_row(
                "SELECT d.name, d.file, d.description, d.created_at, d.updated_at,
                        (SELECT COUNT(*) FROM machines m WHERE m.deployment_id = d.id)
                 FROM deployments d WHERE d.name = ?1",
                [name],
                deployment_row,
            )
            .optional()?)
    }

    /// The machines of a deployment with their facts and newest build, by name.
    pub fn machines(&self, deployment: &str) -> Result<Vec<MachineRecord>> {
        let dep_id = self.deployment_id(deployment)?.ok_or_else(|| StateError::NoDeployment(deployment.to_owned()))?;
        let mut stmt = self.conn.prepare(
            "SELECT id, name, platform, platform_spec, tags FROM machines WHERE deployment_id = ?1 ORDER BY name",
        )?;
        let rows: Vec<(i64, String, String, String, String)> = stmt
            .query_map([dep_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, name, platform, spec, tags) in rows {
            out.push(MachineRecord {
                name,
                platform,
                platform_spec: parse_json(&spec, "machines.platform_spec")?,
                tags: serde_json::from_str(&tags).map_err(|source| StateError::Json { what: "machines.tags", source })?,
                facts: self.machine_facts(id)?,
                last_build: self.last_generation(id)?,
            });
        }
        Ok(out)
    }

    /// Facts of every machine of a deployment (empty if the deployment is unknown).
    pub fn facts(&self, deployment: &str) -> Result<BTreeMap<String, BTreeMap<String, Value>>> {
        let mut stmt = self.conn.prepare(
            "SELECT m.name, f.key, f.value FROM facts f
             JOIN machines m ON m.id = f.machine_id
             JOIN deployments d ON d.id = m.deployment_id
             WHERE d.name = ?1",
        )?;
        let mut out: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        let rows = stmt.query_map([deployment], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
        for row in rows {
            let (machine, key, value) = row?;
            out.entry(machine).or_default().insert(key, parse_json(&value, "facts.value")?);
        }
        Ok(out)
    }

    /// Records an evaluation: the deployment and its machines (with new facts) are created or
    /// updated, in one transaction. Machines no longer in the file are kept: they may still
    /// exist somewhere, and only `destroy` or `delete` forgets them.
    pub fn record_evaluation(&mut self, dep: &DeploymentUpsert<'_>, machines: &[MachineUpsert<'_>]) -> Result<()> {
        let tx = self.conn.transaction()?;
        write_evaluation(&tx, dep, machines, now())?;
        tx.commit()?;
        Ok(())
    }

    /// Records a build run in one transaction: the evaluation (as `record_evaluation`), the
    /// toplevels built `(machine, toplevel, drv)`, and a ledger event per machine, failures
    /// `(machine, reason)` included. Building the same toplevel again adds no generation.
    pub fn record_build_run(
        &mut self,
        dep: &DeploymentUpsert<'_>,
        machines: &[MachineUpsert<'_>],
        actor: &str,
        builds: &[(&str, &str, &str)],
        failures: &[(&str, &str)],
    ) -> Result<()> {
        let t = now();
        let tx = self.conn.transaction()?;
        write_evaluation(&tx, dep, machines, t)?;
        write_builds(&tx, dep.name, actor, builds, t)?;
        for (machine, reason) in failures {
            insert_event(&tx, &Event {
                deployment: dep.name.to_owned(),
                machine: Some((*machine).to_owned()),
                at: t,
                actor: actor.to_owned(),
                kind: "build".into(),
                status: "failed".into(),
                message: (*reason).to_owned(),
                details: None,
            })?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records built toplevels `(machine, toplevel, drv)` of machines already recorded, with
    /// one event each, in one transaction.
    pub fn record_builds(&mut self, deployment: &str, actor: &str, builds: &[(&str, &str, &str)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        write_builds(&tx, deployment, actor, builds, now())?;
        tx.commit()?;
        Ok(())
    }

    /// Appends one event to the ledger.
    pub fn add_event(&mut self, event: &Event) -> Result<()> {
        let tx = self.conn.transaction()?;
        insert_event(&tx, event)?;
        tx.commit()?;
        Ok(())
    }

    /// The newest `limit` events, oldest first; of one deployment or of all.
    pub fn events(&self, deployment: Option<&str>, limit: usize) -> Result<Vec<Event>> {
        let mut stmt = self.conn.prepare(
            "SELECT deployment, machine, at, actor, kind, status, message, details FROM (
               SELECT * FROM events WHERE ?1 IS NULL OR deployment = ?1 ORDER BY id DESC LIMIT ?2
             ) ORDER BY id",
        )?;
        let rows = stmt.query_map(params![deployment, limit as i64], |r| {
            Ok((
                Event {
                    deployment: r.get(0)?,
                    machine: r.get(1)?,
                    at: r.get(2)?,
                    actor: r.get(3)?,
                    kind: r.get(4)?,
                    status: r.get(5)?,
                    message: r.get(6)?,
                    details: None,
                },
                r.get::<_, Option<String>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut e, details) = row?;
            e.details = details.map(|d| parse_json(&d, "events.details")).transpose()?;
            out.push(e);
        }
        Ok(out)
    }

    /// Forgets a deployment, its machines, facts and generations (the ledger keeps its events
    /// and gains one saying so). Returns whether it existed.
    pub fn delete_deployment(&mut self, name: &str, actor: &str) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let n = tx.execute("DELETE FROM deployments WHERE name = ?1", [name])?;
        if n > 0 {
            insert_event(&tx, &Event {
                deployment: name.to_owned(),
                machine: None,
                at: now(),
                actor: actor.to_owned(),
                kind: "delete".into(),
                status: "ok".into(),
                message: "deployment forgotten".into(),
                details: None,
            })?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// Takes the lock of `deployment` for `me`. A lock held by another process is refused with
    /// [`StateError::Locked`] unless `is_dead` says its holder is gone, in which case it is
    /// taken over (and said so). Check and take are one immediate transaction, so two
    /// processes racing for a free lock cannot both win.
    pub fn acquire_lock(&mut self, deployment: &str, me: &Lock, is_dead: impl Fn(&Lock) -> bool) -> Result<Acquired> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let held = lock_row(&tx, deployment)?;
        let outcome = match held {
            None => Acquired::Free,
            Some(h) if h.host == me.host && h.pid == me.pid && h.pid_start == me.pid_start => Acquired::Free,
            Some(h) if is_dead(&h) => Acquired::TookOver(h),
            Some(h) => return Err(StateError::Locked { deployment: deployment.to_owned(), holder: h }),
        };
        tx.execute(
            "INSERT OR REPLACE INTO locks (deployment, holder, host, pid, pid_start, command, since)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![deployment, me.holder, me.host, me.pid, me.pid_start, me.command, me.since],
        )?;
        if let Acquired::TookOver(old) = &outcome {
            insert_event(&tx, &Event {
                deployment: deployment.to_owned(),
                machine: None,
                at: now(),
                actor: me.holder.clone(),
                kind: "lock".into(),
                status: "taken-over".into(),
                message: format!("took over the stale lock of pid {} on {} ({}), which is no longer running", old.pid, old.host, old.holder),
                details: None,
            })?;
        }
        tx.commit()?;
        Ok(outcome)
    }

    /// Releases the lock of `deployment` if `me` holds it.
    pub fn release_lock(&mut self, deployment: &str, me: &Lock) -> Result<()> {
        self.conn.execute(
            "DELETE FROM locks WHERE deployment = ?1 AND host = ?2 AND pid = ?3 AND pid_start = ?4",
            params![deployment, me.host, me.pid, me.pid_start],
        )?;
        Ok(())
    }

    /// Breaks the lock of `deployment` if `judge` allows it, with a ledger event naming the
    /// holder. `judge` sees the holder inside the same immediate transaction as the delete
    /// (so the lock it judged is the one broken) and answers the ledger event's status and
    /// why it may be broken, or why not.
    pub fn break_lock(&mut self, deployment: &str, actor: &str, judge: impl FnOnce(&Lock) -> std::result::Result<(&'static str, String), String>) -> Result<Broken> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(h) = lock_row(&tx, deployment)? else { return Ok(Broken::NotLocked) };
        let (status, why) = match judge(&h) {
            Ok(v) => v,
            Err(refusal) => return Ok(Broken::Refused(h, refusal)),
        };
        tx.execute("DELETE FROM locks WHERE deployment = ?1", [deployment])?;
        insert_event(&tx, &Event {
            deployment: deployment.to_owned(),
            machine: None,
            at: now(),
            actor: actor.to_owned(),
            kind: "lock".into(),
            status: status.into(),
            message: format!("broke the lock of pid {} on {} ({}, `{}`, since {}): {why}", h.pid, h.host, h.holder, h.command, format_time(h.since)),
            details: None,
        })?;
        tx.commit()?;
        Ok(Broken::Broken(h))
    }

    /// Who holds the lock of `deployment`, if anyone.
    pub fn lock(&self, deployment: &str) -> Result<Option<Lock>> {
        let tx = self.conn.unchecked_transaction()?;
        lock_row(&tx, deployment)
    }

    /// Records that `machine` now runs `toplevel` as generation `number`: its build row becomes
    /// `active` (a row is added when the toplevel was never built here) and the previously
    /// active one `superseded`, with one ledger event; in one transaction.
    pub fn record_activation(&mut self, deployment: &str, machine: &str, actor: &str, toplevel: &str, number: i64, message: &str) -> Result<()> {
        self.record_deploy(deployment, actor, &[Activation { machine, toplevel, number, message }], &[])
    }

    /// Records a deploy's outcome in one transaction: each activation (as
    /// [`State::record_activation`]) and each other event.
    pub fn record_deploy(&mut self, deployment: &str, actor: &str, activations: &[Activation<'_>], events: &[Event]) -> Result<()> {
        let t = now();
        let tx = self.conn.transaction()?;
        for a in activations {
            write_activation(&tx, deployment, actor, a, t)?;
        }
        for e in events {
            insert_event(&tx, e)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The generation `machine` was last recorded running (status `active`), if any.
    pub fn active_generation(&self, deployment: &str, machine: &str) -> Result<Option<GenerationRecord>> {
        let tx = self.conn.unchecked_transaction()?;
        let Ok(machine_id) = machine_id(&tx, deployment, machine) else { return Ok(None) };
        Ok(tx
            .query_row(
                "SELECT number, toplevel, drv, status, built_at, activated_at FROM generations
                 WHERE machine_id = ?1 AND status = 'active' ORDER BY id DESC LIMIT 1",
                [machine_id],
                generation_row,
            )
            .optional()?)
    }

    /// Forgets one machine of a deployment (its facts and generations) after it was
    /// destroyed, with a ledger event. Returns whether it was known.
    pub fn remove_machine(&mut self, deployment: &str, machine: &str, actor: &str) -> Result<bool> {
        self.remove_machine_saying(deployment, machine, actor, "destroy", "machine destroyed")
    }

    /// Forgets one machine of a deployment whose host is gone for good, without anything
    /// done on it: the ledger says so. Returns whether it was known.
    pub fn forget_machine(&mut self, deployment: &str, machine: &str, actor: &str) -> Result<bool> {
        self.remove_machine_saying(deployment, machine, actor, "forget", "machine forgotten: nothing on its host was cleaned up")
    }

    fn remove_machine_saying(&mut self, deployment: &str, machine: &str, actor: &str, kind: &str, message: &str) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "DELETE FROM machines WHERE name = ?2 AND deployment_id = (SELECT id FROM deployments WHERE name = ?1)",
            params![deployment, machine],
        )?;
        insert_event(&tx, &Event {
            deployment: deployment.to_owned(),
            machine: Some(machine.to_owned()),
            at: now(),
            actor: actor.to_owned(),
            kind: kind.into(),
            status: "ok".into(),
            message: message.into(),
            details: None,
        })?;
        tx.commit()?;
        Ok(n > 0)
    }

    fn deployment_id(&self, name: &str) -> Result<Option<i64>> {
        Ok(self.conn.query_row("SELECT id FROM deployments WHERE name = ?1", [name], |r| r.get(0)).optional()?)
    }

    fn machine_facts(&self, machine_id: i64) -> Result<BTreeMap<String, Value>> {
        let mut stmt = self.conn.prepare("SELECT key, value FROM facts WHERE machine_id = ?1")?;
        let rows = stmt.query_map([machine_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (k, v) = row?;
            out.insert(k, parse_json(&v, "facts.value")?);
        }
        Ok(out)
    }

    fn last_generation(&self, machine_id: i64) -> Result<Option<GenerationRecord>> {
        Ok(self
            .conn
            .query_row(
                "SELECT number, toplevel, drv, status, built_at, activated_at FROM generations
                 WHERE machine_id = ?1 ORDER BY id DESC LIMIT 1",
                [machine_id],
                generation_row,
            )
            .optional()?)
    }
}

fn write_evaluation(tx: &Transaction<'_>, dep: &DeploymentUpsert<'_>, machines: &[MachineUpsert<'_>], t: i64) -> Result<()> {
    let dep_id = upsert_deployment(tx, dep, t)?;
    for m in machines {
        tx.execute(
            "INSERT INTO machines (deployment_id, name, platform, platform_spec, tags, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT (deployment_id, name) DO UPDATE SET
               platform = excluded.platform, platform_spec = excluded.platform_spec,
               tags = excluded.tags, updated_at = excluded.updated_at",
            params![dep_id, m.name, m.platform, m.platform_spec.to_string(), json(m.tags), t],
        )?;
        let machine_id: i64 = tx.query_row(
            "SELECT id FROM machines WHERE deployment_id = ?1 AND name = ?2",
            params![dep_id, m.name],
            |r| r.get(0),
        )?;
        for (key, value) in m.facts {
            tx.execute(
                "INSERT INTO facts (machine_id, key, value, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (machine_id, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                params![machine_id, key, value.to_string(), t],
            )?;
        }
    }
    Ok(())
}

fn write_builds(tx: &Transaction<'_>, deployment: &str, actor: &str, builds: &[(&str, &str, &str)], t: i64) -> Result<()> {
    for (machine, toplevel, drv) in builds {
        let machine_id = machine_id(tx, deployment, machine)?;
        let updated = tx.execute(
            "UPDATE generations SET built_at = ?3
             WHERE id = (SELECT id FROM generations WHERE machine_id = ?1 ORDER BY id DESC LIMIT 1)
               AND toplevel = ?2",
            params![machine_id, toplevel, t],
        )?;
        if updated == 0 {
            tx.execute(
                "INSERT INTO generations (machine_id, toplevel, drv, status, built_at) VALUES (?1, ?2, ?3, 'built', ?4)",
                params![machine_id, toplevel, drv, t],
            )?;
        }
        insert_event(tx, &Event {
            deployment: deployment.to_owned(),
            machine: Some((*machine).to_owned()),
            at: t,
            actor: actor.to_owned(),
            kind: "build".into(),
            status: "ok".into(),
            message: (*toplevel).to_owned(),
            details: None,
        })?;
    }
    Ok(())
}

/// One machine's activation, to record.
#[derive(Debug, Clone, Copy)]
pub struct Activation<'a> {
    /// The machine.
    pub machine: &'a str,
    /// The toplevel it runs.
    pub toplevel: &'a str,
    /// The agent's generation number.
    pub number: i64,
    /// A summary for the ledger.
    pub message: &'a str,
}

fn write_activation(tx: &Transaction<'_>, deployment: &str, actor: &str, a: &Activation<'_>, t: i64) -> Result<()> {
    let machine_id = machine_id(tx, deployment, a.machine)?;
    tx.execute(
        "UPDATE generations SET status = 'superseded' WHERE machine_id = ?1 AND status = 'active' AND toplevel <> ?2",
        params![machine_id, a.toplevel],
    )?;
    let updated = tx.execute(
        "UPDATE generations SET status = 'active', number = ?3, activated_at = COALESCE(
             CASE WHEN status = 'active' AND number = ?3 THEN activated_at END, ?4)
         WHERE id = (SELECT id FROM generations WHERE machine_id = ?1 AND toplevel = ?2 ORDER BY id DESC LIMIT 1)",
        params![machine_id, a.toplevel, a.number, t],
    )?;
    if updated == 0 {
        tx.execute(
            "INSERT INTO generations (machine_id, number, toplevel, status, built_at, activated_at)
             VALUES (?1, ?2, ?3, 'active', ?4, ?4)",
            params![machine_id, a.number, a.toplevel, t],
        )?;
    }
    insert_event(tx, &Event {
        deployment: deployment.to_owned(),
        machine: Some(a.machine.to_owned()),
        at: t,
        actor: actor.to_owned(),
        kind: "activate".into(),
        status: "ok".into(),
        message: a.message.to_owned(),
        details: Some(serde_json::json!({ "generation": a.number, "toplevel": a.toplevel })),
    })
}

fn generation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GenerationRecord> {
    Ok(GenerationRecord {
        number: r.get(0)?,
        toplevel: r.get(1)?,
        drv: r.get(2)?,
        status: r.get(3)?,
        built_at: r.get(4)?,
        activated_at: r.get(5)?,
    })
}

fn lock_row(tx: &Transaction<'_>, deployment: &str) -> Result<Option<Lock>> {
    Ok(tx
        .query_row(
            "SELECT holder, host, pid, pid_start, command, since FROM locks WHERE deployment = ?1",
            [deployment],
            |r| {
                Ok(Lock {
                    holder: r.get(0)?,
                    host: r.get(1)?,
                    pid: r.get(2)?,
                    pid_start: r.get(3)?,
                    command: r.get(4)?,
                    since: r.get(5)?,
                })
            },
        )
        .optional()?)
}

fn deployment_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeploymentRecord> {
    Ok(DeploymentRecord {
        name: r.get(0)?,
        file: r.get(1)?,
        description: r.get(2)?,
        created_at: r.get(3)?,
        updated_at: r.get(4)?,
        machines: r.get::<_, i64>(5)? as usize,
    })
}

fn upsert_deployment(tx: &Transaction<'_>, dep: &DeploymentUpsert<'_>, t: i64) -> Result<i64> {
    tx.execute(
        "INSERT INTO deployments (name, file, description, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT (name) DO UPDATE SET file = excluded.file, description = excluded.description,
           updated_at = excluded.updated_at",
        params![dep.name, dep.file, dep.description, t],
    )?;
    Ok(tx.query_row("SELECT id FROM deployments WHERE name = ?1", [dep.name], |r| r.get(0))?)
}

fn machine_id(tx: &Transaction<'_>, deployment: &str, machine: &str) -> Result<i64> {
    tx.query_row(
        "SELECT m.id FROM machines m JOIN deployments d ON d.id = m.deployment_id WHERE d.name = ?1 AND m.name = ?2",
        params![deployment, machine],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| StateError::NoDeployment(format!("{deployment}` (machine `{machine}")))
}

/// Every event enters the ledger here. Its message often carries text from a machine (a
/// failure reason, a health check's answer), so control characters are escaped before it is
/// kept: the ledger never holds an escape sequence for a later reader's terminal. (Details are
/// JSON, whose strings escape them already.)
fn insert_event(tx: &Transaction<'_>, e: &Event) -> Result<()> {
    use flotilla_model::{escape_controls, escape_controls_block};
    tx.execute(
        "INSERT INTO events (deployment, machine, at, actor, kind, status, message, details)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            escape_controls(&e.deployment),
            e.machine.as_deref().map(escape_controls),
            e.at,
            escape_controls(&e.actor),
            escape_controls(&e.kind),
            escape_controls(&e.status),
            escape_controls_block(&e.message),
            e.details.as_ref().map(Value::to_string)
        ],
    )?;
    Ok(())
}

fn json<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serialises")
}

fn parse_json(s: &str, what: &'static str) -> Result<Value> {
    serde_json::from_str(s).map_err(|source| StateError::Json { what, source })
}

#[cfg(test)]
mod tests;
