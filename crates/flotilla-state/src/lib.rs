//! flotilla's state: deployments, machines and their facts, builds and generations, the
//! ledger of events, and deployment locks, in an embedded SQLite file (the default) or a
//! PostgreSQL database a team shares (`postgres://USER@HOST/DB`).
//!
//! This crate owns the schema; no SQL is written anywhere else. The queries are written once
//! for both databases (`db` runs them); only the migrations differ per dialect, numbered alike
//! in `migrations/sqlite/` and `migrations/postgres/` and kept in step by a test comparing the
//! schemas they make. Every public method that changes anything does so in one transaction,
//! so a failed command leaves no half-written state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_model::format_time;
use std::cell::RefCell;

mod db;
pub mod export;
mod files;
mod pg;
#[doc(hidden)]
pub mod testing;
use db::{params, Conn, Row, Tx};
pub use files::storage_problem;
pub use pg::is_url;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The migrations, in order, `(SQLite, PostgreSQL)`; entry `i` brings the schema to version
/// `i + 1`.
const MIGRATIONS: &[(&str, &str)] = &[
    (include_str!("../migrations/sqlite/0001_initial.sql"), include_str!("../migrations/postgres/0001_initial.sql")),
    (include_str!("../migrations/sqlite/0002_deploy_locks.sql"), include_str!("../migrations/postgres/0002_deploy_locks.sql")),
    (include_str!("../migrations/sqlite/0003_lock_leases.sql"), include_str!("../migrations/postgres/0003_lock_leases.sql")),
    (include_str!("../migrations/sqlite/0004_machine_host.sql"), include_str!("../migrations/postgres/0004_machine_host.sql")),
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
        source: Box<StateError>,
    },
    /// The named deployment is not in the state DB.
    #[error("no deployment named `{0}` in the state database; `flotilla list` shows the known ones")]
    NoDeployment(String),
    /// Another live process holds the deployment's lock.
    #[error("deployment `{deployment}` is locked by {} (pid {} on {}, `{}`) since {}; wait for it to finish (a lock whose holder died is taken over by the next command once its lease, renewed while the holder runs, has expired; `flotilla unlock -d {deployment} --force` breaks it now)", .holder.holder, .holder.pid, .holder.host, .holder.command, format_time(.holder.since))]
    Locked {
        /// The deployment.
        deployment: String,
        /// Who holds it.
        holder: Box<Lock>,
    },
    /// Any other SQLite error.
    #[error("state database error: {0}")]
    Sql(#[from] rusqlite::Error),
    /// Any other PostgreSQL error.
    #[error("state database error: {0}")]
    Postgres(#[from] postgres::Error),
    /// The PostgreSQL URL does not parse, or holds what it must not.
    #[error("the state URL {url} cannot be used: {why}")]
    Url {
        /// The URL, without its password.
        url: String,
        /// Why, and what to write instead.
        why: String,
    },
    /// The PostgreSQL server could not be reached or refused us.
    #[error("cannot connect to the state database {url}: {source}; check that the server runs and that USER may log in to DATABASE (a password goes in ~/.pgpass or PGPASSWORD)")]
    Connect {
        /// The URL, without a password.
        url: String,
        /// Why.
        source: postgres::Error,
    },
    /// The password file could not be read.
    #[error("cannot read the password file {path}: {why}")]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A query returned a column of another type than the code reads (a schema out of step).
    #[error("state database column {index} is not {want}; the schema is not the one this flotilla made")]
    Column {
        /// Its index in the row.
        index: usize,
        /// What was read.
        want: &'static str,
    },
    /// An import was refused; nothing was imported.
    #[error("{0}")]
    Import(String),
    /// A query that must return a row returned none.
    #[error("state database query returned no row")]
    NoRow,
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

/// Where the state DB lives: `$FLOTILLA_STATE` (a file, or a `postgres://` URL), else `$XDG_STATE_HOME/flotilla/state.db`,
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

/// Where this host keeps what cannot live in a database (local machines' roots, GC roots)
/// for the state at `state`: `$FLOTILLA_DATA`; else, for an SQLite file, its own directory
/// (where it always was: nothing moves for existing users); else, for a PostgreSQL state
/// (which many hosts share), this host's `$XDG_DATA_HOME/flotilla`, else
/// `~/.local/share/flotilla`.
pub fn data_dir(state: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("FLOTILLA_DATA").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if !state.to_str().is_some_and(is_url) {
        return state.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned();
    }
    let base = std::env::var_os("XDG_DATA_HOME").filter(|p| !p.is_empty()).map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
        home.join(".local/share")
    });
    base.join("flotilla")
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
    /// The deployer host holding it (a local or qemu machine's root lives there), as
    /// recorded when it was provisioned; `None` for machines any host can reach.
    pub host: Option<String>,
}

/// A build of a machine's toplevel, and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// When its holder last renewed the lease (Unix seconds; set by the state when taken).
    pub renewed_at: i64,
}

/// How a lock was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// It was free.
    Free,
    /// A stale lock of a dead process was taken over.
    TookOver(Lock),
    /// A lease its holder stopped renewing was taken over.
    Expired(Lock),
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
    conn: RefCell<Conn>,
    path: PathBuf,
    /// Seconds added to this host's clock, for tests of a deployer whose clock is wrong.
    pub(crate) skew: i64,
}

impl State {
    /// Opens the state at `path`: a `postgres://` URL, else an SQLite file (created if needed),
    /// and brings its schema up to date.
    pub fn open(path: &Path) -> Result<State> {
        if let Some(url) = path.to_str().filter(|p| is_url(p)) {
            let (client, _) = pg::connect(url)?;
            let mut state = State { conn: RefCell::new(Conn::Postgres(Box::new(client))), path: path.to_owned(), skew: 0 };
            state.migrate()?;
            return Ok(state);
        }
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
        let conn = rusqlite::Connection::open(path).map_err(|source| StateError::Open { path: path.to_owned(), source })?;
        let open_err = |source| StateError::Open { path: path.to_owned(), source };
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(open_err)?;
        // Switching a new file to WAL does not wait on the busy handler: another process
        // opening the same new file at once makes it fail busy, so it is tried again.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match conn.pragma_update(None, "journal_mode", "WAL") {
                Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other.map_err(open_err)?,
            }
        }
        // With WAL, NORMAL syncs at checkpoints: a committed write survives a crash of
        // flotilla, and only a power loss can take the newest transactions.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        let mut state = State { conn: RefCell::new(Conn::Sqlite(conn)), path: path.to_owned(), skew: 0 };
        state.migrate()?;
        Ok(state)
    }

    /// Where this state lives: the SQLite file, or the PostgreSQL URL as given (which holds
    /// no password: one is refused).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this state is a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        matches!(*self.conn.borrow(), Conn::Postgres(_))
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64> {
        let mut conn = self.conn.borrow_mut();
        match &mut *conn {
            Conn::Sqlite(c) => Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?),
            Conn::Postgres(_) => conn.read(pg_version),
        }
    }

    fn migrate(&mut self) -> Result<()> {
        let known = MIGRATIONS.len() as i64;
        let found = self.schema_version()?;
        if found > known {
            return Err(StateError::TooNew { path: self.path.clone(), found, known });
        }
        if found == known {
            return Ok(());
        }
        let path = self.path.clone();
        let conn = self.conn.get_mut();
        let postgres = matches!(conn, Conn::Postgres(_));
        // On PostgreSQL, processes migrating at once queue on an advisory lock taken before
        // any transaction starts: taken inside one, the transaction's snapshot would predate
        // the other's commit and see the old version.
        if let Conn::Postgres(c) = conn {
            c.batch_execute("SELECT pg_advisory_lock(7405182)")?;
        }
        let result = Self::migrate_steps(conn, &path, found, postgres);
        if let Conn::Postgres(c) = conn {
            c.batch_execute("SELECT pg_advisory_unlock(7405182)")?;
        }
        result
    }

    fn migrate_steps(conn: &mut Conn, path: &Path, found: i64, postgres: bool) -> Result<()> {
        for (i, (sqlite, pgsql)) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = i + 1;
            let err = |source| StateError::Migrate { path: path.to_owned(), version, source: Box::new(source) };
            // Another process may be migrating the same database: the write transaction (and,
            // on PostgreSQL, the advisory lock, as its DDL does not conflict as rows do) waits
            // for it, and a step it has already applied is skipped.
            conn.write(|tx| {
                let now_at = if postgres {
                    tx.batch("CREATE TABLE IF NOT EXISTS flotilla_schema (version BIGINT NOT NULL)")?;
                    pg_version(tx)?
                } else {
                    tx.query_one("PRAGMA user_version", &[])?.int(0)?
                };
                if now_at >= version as i64 {
                    return Ok(());
                }
                if postgres {
                    tx.batch(pgsql)?;
                    tx.execute("DELETE FROM flotilla_schema", &[])?;
                    tx.execute("INSERT INTO flotilla_schema (version) VALUES ($1)", params![version as i64])?;
                } else {
                    tx.batch(sqlite)?;
                    tx.batch(&format!("PRAGMA user_version = {version}"))?;
                }
                Ok(())
            })
            .map_err(err)?;
        }
        Ok(())
    }

    fn read<T>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<T>) -> Result<T> {
        self.conn.borrow_mut().read(f)
    }

    fn write<T>(&mut self, f: impl FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        self.conn.get_mut().write(f)
    }

    /// All deployments, by name.
    pub fn deployments(&self) -> Result<Vec<DeploymentRecord>> {
        self.read(|tx| {
            tx.query(
                "SELECT d.name, d.file, d.description, d.created_at, d.updated_at,
                        (SELECT COUNT(*) FROM machines m WHERE m.deployment_id = d.id)
                 FROM deployments d ORDER BY d.name",
                &[],
            )?
            .iter()
            .map(deployment_row)
            .collect()
        })
    }

    /// One deployment, or `None`.
    pub fn deployment(&self, name: &str) -> Result<Option<DeploymentRecord>> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT d.name, d.file, d.description, d.created_at, d.updated_at,
                        (SELECT COUNT(*) FROM machines m WHERE m.deployment_id = d.id)
                 FROM deployments d WHERE d.name = $1",
                params![name],
            )?
            .as_ref()
            .map(deployment_row)
            .transpose()
        })
    }

    /// The machines of a deployment with their facts and newest build, by name.
    pub fn machines(&self, deployment: &str) -> Result<Vec<MachineRecord>> {
        self.read(|tx| {
            let dep_id = deployment_id(tx, deployment)?.ok_or_else(|| StateError::NoDeployment(deployment.to_owned()))?;
            let rows = tx.query("SELECT id, name, platform, platform_spec, tags, host FROM machines WHERE deployment_id = $1 ORDER BY name", params![dep_id])?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let id = r.int(0)?;
                out.push(MachineRecord {
                    name: r.text(1)?,
                    platform: r.text(2)?,
                    platform_spec: parse_json(&r.text(3)?, "machines.platform_spec")?,
                    tags: serde_json::from_str(&r.text(4)?).map_err(|source| StateError::Json { what: "machines.tags", source })?,
                    facts: machine_facts(tx, id)?,
                    last_build: last_generation(tx, id)?,
                    host: r.opt_text(5)?,
                });
            }
            Ok(out)
        })
    }

    /// Facts of every machine of a deployment (empty if the deployment is unknown).
    pub fn facts(&self, deployment: &str) -> Result<BTreeMap<String, BTreeMap<String, Value>>> {
        self.read(|tx| {
            let rows = tx.query(
                "SELECT m.name, f.key, f.value FROM facts f
                 JOIN machines m ON m.id = f.machine_id
                 JOIN deployments d ON d.id = m.deployment_id
                 WHERE d.name = $1",
                params![deployment],
            )?;
            let mut out: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
            for r in rows {
                out.entry(r.text(0)?).or_default().insert(r.text(1)?, parse_json(&r.text(2)?, "facts.value")?);
            }
            Ok(out)
        })
    }

    /// Records an evaluation: the deployment and its machines (with new facts) are created or
    /// updated, in one transaction. Machines no longer in the file are kept: they may still
    /// exist somewhere, and only `destroy` or `delete` forgets them.
    pub fn record_evaluation(&mut self, dep: &DeploymentUpsert<'_>, machines: &[MachineUpsert<'_>]) -> Result<()> {
        let t = now();
        self.write(|tx| write_evaluation(tx, dep, machines, t))
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
        self.write(|tx| {
            write_evaluation(tx, dep, machines, t)?;
            write_builds(tx, dep.name, actor, builds, t)?;
            for (machine, reason) in failures {
                insert_event(tx, &Event {
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
            Ok(())
        })
    }

    /// Records built toplevels `(machine, toplevel, drv)` of machines already recorded, with
    /// one event each, in one transaction.
    pub fn record_builds(&mut self, deployment: &str, actor: &str, builds: &[(&str, &str, &str)]) -> Result<()> {
        let t = now();
        self.write(|tx| write_builds(tx, deployment, actor, builds, t))
    }

    /// Appends one event to the ledger.
    pub fn add_event(&mut self, event: &Event) -> Result<()> {
        self.write(|tx| insert_event(tx, event))
    }

    /// The newest `limit` events, oldest first; of one deployment or of all.
    pub fn events(&self, deployment: Option<&str>, limit: usize) -> Result<Vec<Event>> {
        self.read(|tx| {
            let rows = match deployment {
                Some(d) => tx.query(
                    "SELECT deployment, machine, at, actor, kind, status, message, details, id FROM events
                     WHERE deployment = $1 ORDER BY id DESC LIMIT $2",
                    params![d, limit as i64],
                )?,
                None => tx.query(
                    "SELECT deployment, machine, at, actor, kind, status, message, details, id FROM events
                     ORDER BY id DESC LIMIT $1",
                    params![limit as i64],
                )?,
            };
            let mut out = rows.iter().rev().map(event_row).collect::<Result<Vec<_>>>()?;
            out.shrink_to_fit();
            Ok(out)
        })
    }

    /// Forgets a deployment, its machines, facts and generations (the ledger keeps its events
    /// and gains one saying so). Returns whether it existed.
    pub fn delete_deployment(&mut self, name: &str, actor: &str) -> Result<bool> {
        let t = now();
        self.write(|tx| {
            let n = tx.execute("DELETE FROM deployments WHERE name = $1", params![name])?;
            if n > 0 {
                insert_event(tx, &Event {
                    deployment: name.to_owned(),
                    machine: None,
                    at: t,
                    actor: actor.to_owned(),
                    kind: "delete".into(),
                    status: "ok".into(),
                    message: "deployment forgotten".into(),
                    details: None,
                })?;
            }
            Ok(n > 0)
        })
    }

    /// Takes the lock of `deployment` for `me`, as a lease of `lease` seconds that the holder
    /// renews ([`State::renew_lock`]). A lock held by another process is refused with
    /// [`StateError::Locked`] unless its lease expired (not renewed for `lease` seconds: its
    /// holder died, or lost the database) or `is_dead` says its holder is gone; then it is
    /// taken over, and the ledger says so. Check and take are one write transaction
    /// (immediate on SQLite, serializable on PostgreSQL), so two processes racing for a free
    /// lock cannot both win. `is_dead` is asked only of a holder on `me`'s host (the same
    /// name and machine id): a pid means nothing on another host. Leases are written and
    /// judged by PostgreSQL's clock there, so deployers' clocks do not matter.
    pub fn acquire_lock(&mut self, deployment: &str, me: &Lock, lease: i64, is_dead: impl Fn(&Lock) -> bool) -> Result<Acquired> {
        let local = now() + self.skew;
        self.write(|tx| {
            let t = tx.lease_clock(local)?;
            let held = lock_row(tx, deployment)?;
            let outcome = match held {
                None => Acquired::Free,
                Some(h) if h.host == me.host && h.pid == me.pid && h.pid_start == me.pid_start => Acquired::Free,
                Some(h) if t - h.renewed_at > lease => Acquired::Expired(h),
                // Only a holder on this very host (name and machine id) can be judged by pid.
                Some(h) if h.host == me.host && is_dead(&h) => Acquired::TookOver(h),
                Some(h) => return Err(StateError::Locked { deployment: deployment.to_owned(), holder: Box::new(h) }),
            };
            tx.execute(
                "INSERT INTO locks (deployment, holder, host, pid, pid_start, command, since, renewed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (deployment) DO UPDATE SET holder = excluded.holder, host = excluded.host,
                   pid = excluded.pid, pid_start = excluded.pid_start, command = excluded.command,
                   since = excluded.since, renewed_at = excluded.renewed_at",
                params![deployment, &me.holder, &me.host, me.pid, me.pid_start, &me.command, me.since, t],
            )?;
            let message = match &outcome {
                Acquired::Free => None,
                Acquired::TookOver(old) => Some(format!("took over the stale lock of pid {} on {} ({}), which is no longer running", old.pid, old.host, old.holder)),
                Acquired::Expired(old) => Some(format!(
                    "took over the expired lease of pid {} on {} ({}, `{}`): not renewed since {}, longer than the lease of {lease}s",
                    old.pid,
                    old.host,
                    old.holder,
                    old.command,
                    format_time(old.renewed_at)
                )),
            };
            if let Some(message) = message {
                let status = if matches!(outcome, Acquired::Expired(_)) { "expired" } else { "taken-over" };
                insert_event(tx, &Event { deployment: deployment.to_owned(), machine: None, at: t, actor: me.holder.clone(), kind: "lock".into(), status: status.into(), message, details: None })?;
            }
            Ok(outcome.clone())
        })
    }

    /// Renews `me`'s lease on the lock of `deployment`; whether `me` still holds it (it does
    /// not once another process took it over as expired, or `unlock` broke it).
    pub fn renew_lock(&mut self, deployment: &str, me: &Lock) -> Result<bool> {
        let local = now() + self.skew;
        self.write(|tx| {
            let t = tx.lease_clock(local)?;
            Ok(tx.execute(
                "UPDATE locks SET renewed_at = $5 WHERE deployment = $1 AND host = $2 AND pid = $3 AND pid_start = $4",
                params![deployment, &me.host, me.pid, me.pid_start, t],
            )? == 1)
        })
    }

    /// Releases the lock of `deployment` if `me` holds it.
    pub fn release_lock(&mut self, deployment: &str, me: &Lock) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM locks WHERE deployment = $1 AND host = $2 AND pid = $3 AND pid_start = $4",
                params![deployment, &me.host, me.pid, me.pid_start],
            )?;
            Ok(())
        })
    }

    /// Breaks the lock of `deployment` if `judge` allows it, with a ledger event naming the
    /// holder. `judge` sees the holder inside the same write transaction as the delete (so
    /// the lock it judged is the one broken) and answers the ledger event's status and why it
    /// may be broken, or why not; it is also told for how many seconds the lease has not been
    /// renewed, by the clock leases are judged by (PostgreSQL's, on PostgreSQL).
    pub fn break_lock(&mut self, deployment: &str, actor: &str, judge: impl Fn(&Lock, i64) -> std::result::Result<(&'static str, String), String>) -> Result<Broken> {
        let t = now();
        let local = t + self.skew;
        self.write(|tx| {
            let Some(h) = lock_row(tx, deployment)? else { return Ok(Broken::NotLocked) };
            let idle = tx.lease_clock(local)? - h.renewed_at;
            let (status, why) = match judge(&h, idle) {
                Ok(v) => v,
                Err(refusal) => return Ok(Broken::Refused(h, refusal)),
            };
            tx.execute("DELETE FROM locks WHERE deployment = $1", params![deployment])?;
            insert_event(tx, &Event {
                deployment: deployment.to_owned(),
                machine: None,
                at: t,
                actor: actor.to_owned(),
                kind: "lock".into(),
                status: status.into(),
                message: format!("broke the lock of pid {} on {} ({}, `{}`, since {}): {why}", h.pid, h.host, h.holder, h.command, format_time(h.since)),
                details: None,
            })?;
            Ok(Broken::Broken(h))
        })
    }

    /// Who holds the lock of `deployment`, if anyone.
    pub fn lock(&self, deployment: &str) -> Result<Option<Lock>> {
        self.read(|tx| lock_row(tx, deployment))
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
        self.write(|tx| {
            for a in activations {
                write_activation(tx, deployment, actor, a, t)?;
            }
            for e in events {
                insert_event(tx, e)?;
            }
            Ok(())
        })
    }

    /// The generation `machine` was last recorded running (status `active`), if any.
    pub fn active_generation(&self, deployment: &str, machine: &str) -> Result<Option<GenerationRecord>> {
        self.read(|tx| {
            let Ok(machine_id) = machine_id(tx, deployment, machine) else { return Ok(None) };
            tx.query_opt(
                "SELECT number, toplevel, drv, status, built_at, activated_at FROM generations
                 WHERE machine_id = $1 AND status = 'active' ORDER BY id DESC LIMIT 1",
                params![machine_id],
            )?
            .as_ref()
            .map(generation_row)
            .transpose()
        })
    }

    /// Records the deployer host holding a machine (the one that provisioned its root).
    pub fn set_machine_host(&mut self, deployment: &str, machine: &str, host: Option<&str>) -> Result<()> {
        self.set_machines_host(deployment, &[machine], host)
    }

    /// [`State::set_machine_host`] for many machines in one transaction: a deploy of a
    /// thousand machines writes it once, not a thousand times. A record that says so already
    /// is not written again.
    pub fn set_machines_host(&mut self, deployment: &str, machines: &[&str], host: Option<&str>) -> Result<()> {
        self.record_provisioned(deployment, &[], machines, host)
    }

    /// What provisioning a fleet did, in one transaction: its ledger `events`, and `host` as
    /// the holder of `machines` (see [`State::set_machine_host`]).
    pub fn record_provisioned(&mut self, deployment: &str, events: &[Event], machines: &[&str], host: Option<&str>) -> Result<()> {
        if machines.is_empty() && events.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            for e in events {
                insert_event(tx, e)?;
            }
            for machine in machines {
                let id = machine_id(tx, deployment, machine)?;
                tx.execute("UPDATE machines SET host = $1 WHERE id = $2 AND host IS DISTINCT FROM $1", params![host, id])?;
            }
            Ok(())
        })
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
        let t = now();
        self.write(|tx| {
            let n = tx.execute(
                "DELETE FROM machines WHERE name = $2 AND deployment_id = (SELECT id FROM deployments WHERE name = $1)",
                params![deployment, machine],
            )?;
            insert_event(tx, &Event {
                deployment: deployment.to_owned(),
                machine: Some(machine.to_owned()),
                at: t,
                actor: actor.to_owned(),
                kind: kind.into(),
                status: "ok".into(),
                message: message.into(),
                details: None,
            })?;
            Ok(n > 0)
        })
    }
}

fn pg_version(tx: &mut dyn Tx) -> Result<i64> {
    let exists = tx.query_one("SELECT to_regclass('flotilla_schema') IS NOT NULL", &[])?.int(0)? != 0;
    if !exists {
        return Ok(0);
    }
    Ok(tx.query_opt("SELECT version FROM flotilla_schema", &[])?.map(|r| r.int(0)).transpose()?.unwrap_or(0))
}

fn deployment_id(tx: &mut dyn Tx, name: &str) -> Result<Option<i64>> {
    tx.query_opt("SELECT id FROM deployments WHERE name = $1", params![name])?.map(|r| r.int(0)).transpose()
}

fn machine_facts(tx: &mut dyn Tx, machine_id: i64) -> Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for r in tx.query("SELECT key, value FROM facts WHERE machine_id = $1", params![machine_id])? {
        out.insert(r.text(0)?, parse_json(&r.text(1)?, "facts.value")?);
    }
    Ok(out)
}

fn last_generation(tx: &mut dyn Tx, machine_id: i64) -> Result<Option<GenerationRecord>> {
    tx.query_opt(
        "SELECT number, toplevel, drv, status, built_at, activated_at FROM generations
         WHERE machine_id = $1 ORDER BY id DESC LIMIT 1",
        params![machine_id],
    )?
    .as_ref()
    .map(generation_row)
    .transpose()
}

fn event_row(r: &Row) -> Result<Event> {
    Ok(Event {
        deployment: r.text(0)?,
        machine: r.opt_text(1)?,
        at: r.int(2)?,
        actor: r.text(3)?,
        kind: r.text(4)?,
        status: r.text(5)?,
        message: r.text(6)?,
        details: r.opt_text(7)?.map(|d| parse_json(&d, "events.details")).transpose()?,
    })
}

fn write_evaluation(tx: &mut dyn Tx, dep: &DeploymentUpsert<'_>, machines: &[MachineUpsert<'_>], t: i64) -> Result<()> {
    let dep_id = upsert_deployment(tx, dep, t)?;
    for m in machines {
        tx.execute(
            "INSERT INTO machines (deployment_id, name, platform, platform_spec, tags, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $6)
             ON CONFLICT (deployment_id, name) DO UPDATE SET
               platform = excluded.platform, platform_spec = excluded.platform_spec,
               tags = excluded.tags, updated_at = excluded.updated_at",
            params![dep_id, m.name, m.platform, m.platform_spec.to_string(), json(m.tags), t],
        )?;
        let machine_id = tx.query_one("SELECT id FROM machines WHERE deployment_id = $1 AND name = $2", params![dep_id, m.name])?.int(0)?;
        for (key, value) in m.facts {
            tx.execute(
                "INSERT INTO facts (machine_id, key, value, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (machine_id, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                params![machine_id, key, value.to_string(), t],
            )?;
        }
    }
    Ok(())
}

fn write_builds(tx: &mut dyn Tx, deployment: &str, actor: &str, builds: &[(&str, &str, &str)], t: i64) -> Result<()> {
    for (machine, toplevel, drv) in builds {
        let machine_id = machine_id(tx, deployment, machine)?;
        let updated = tx.execute(
            "UPDATE generations SET built_at = $3
             WHERE id = (SELECT id FROM generations WHERE machine_id = $1 ORDER BY id DESC LIMIT 1)
               AND toplevel = $2",
            params![machine_id, *toplevel, t],
        )?;
        if updated == 0 {
            tx.execute(
                "INSERT INTO generations (machine_id, toplevel, drv, status, built_at) VALUES ($1, $2, $3, 'built', $4)",
                params![machine_id, *toplevel, *drv, t],
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

fn write_activation(tx: &mut dyn Tx, deployment: &str, actor: &str, a: &Activation<'_>, t: i64) -> Result<()> {
    let machine_id = machine_id(tx, deployment, a.machine)?;
    tx.execute(
        "UPDATE generations SET status = 'superseded' WHERE machine_id = $1 AND status = 'active' AND toplevel <> $2",
        params![machine_id, a.toplevel],
    )?;
    let updated = tx.execute(
        "UPDATE generations SET status = 'active', number = $3, activated_at = COALESCE(
             CASE WHEN status = 'active' AND number = $3 THEN activated_at END, $4)
         WHERE id = (SELECT id FROM generations WHERE machine_id = $1 AND toplevel = $2 ORDER BY id DESC LIMIT 1)",
        params![machine_id, a.toplevel, a.number, t],
    )?;
    if updated == 0 {
        tx.execute(
            "INSERT INTO generations (machine_id, number, toplevel, status, built_at, activated_at)
             VALUES ($1, $2, $3, 'active', $4, $4)",
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

fn generation_row(r: &Row) -> Result<GenerationRecord> {
    Ok(GenerationRecord {
        number: r.opt_int(0)?,
        toplevel: r.text(1)?,
        drv: r.opt_text(2)?,
        status: r.text(3)?,
        built_at: r.int(4)?,
        activated_at: r.opt_int(5)?,
    })
}

fn lock_row(tx: &mut dyn Tx, deployment: &str) -> Result<Option<Lock>> {
    tx.query_opt("SELECT holder, host, pid, pid_start, command, since, renewed_at FROM locks WHERE deployment = $1", params![deployment])?
        .map(|r| {
            Ok(Lock {
                holder: r.text(0)?,
                host: r.text(1)?,
                pid: r.int(2)?,
                pid_start: r.int(3)?,
                command: r.text(4)?,
                since: r.int(5)?,
                renewed_at: r.int(6)?,
            })
        })
        .transpose()
}

fn deployment_row(r: &Row) -> Result<DeploymentRecord> {
    Ok(DeploymentRecord {
        name: r.text(0)?,
        file: r.opt_text(1)?,
        description: r.text(2)?,
        created_at: r.int(3)?,
        updated_at: r.int(4)?,
        machines: r.int(5)? as usize,
    })
}

fn upsert_deployment(tx: &mut dyn Tx, dep: &DeploymentUpsert<'_>, t: i64) -> Result<i64> {
    tx.execute(
        "INSERT INTO deployments (name, file, description, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)
         ON CONFLICT (name) DO UPDATE SET file = excluded.file, description = excluded.description,
           updated_at = excluded.updated_at",
        params![dep.name, dep.file, dep.description, t],
    )?;
    tx.query_one("SELECT id FROM deployments WHERE name = $1", params![dep.name])?.int(0)
}

fn machine_id(tx: &mut dyn Tx, deployment: &str, machine: &str) -> Result<i64> {
    tx.query_opt("SELECT m.id FROM machines m JOIN deployments d ON d.id = m.deployment_id WHERE d.name = $1 AND m.name = $2", params![deployment, machine])?
        .map(|r| r.int(0))
        .transpose()?
        .ok_or_else(|| StateError::NoDeployment(format!("{deployment}` (machine `{machine}")))
}

/// Every event enters the ledger here. Its message often carries text from a machine (a
/// failure reason, a health check's answer), so control characters are escaped before it is
/// kept: the ledger never holds an escape sequence for a later reader's terminal. (Details are
/// JSON, whose strings escape them already.)
fn insert_event(tx: &mut dyn Tx, e: &Event) -> Result<()> {
    use flotilla_model::{escape_controls, escape_controls_block};
    tx.execute(
        "INSERT INTO events (deployment, machine, at, actor, kind, status, message, details)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
