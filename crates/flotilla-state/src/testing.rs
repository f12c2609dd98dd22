//! A throwaway PostgreSQL cluster for tests (this crate's and the CLI's): `initdb` and
//! `pg_ctl` from Debian's postgresql under a temporary directory, listening only on a unix
//! socket inside it, run as the `postgres` system user when the tests run as root (the
//! server refuses root). One cluster per test process, each caller getting a database of its
//! own; a watcher removes the cluster when the test process exits, however it exits. A
//! missing PostgreSQL panics with how to install it: it never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Where Debian's postgresql puts its programs.
const BIN: &str = "/usr/lib/postgresql/15/bin";

/// The running cluster: its directory (the socket is in it).
struct Cluster {
    dir: PathBuf,
    /// The watcher outlives this process on purpose: it is never waited for.
    _watcher: std::process::Child,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn am_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Runs `program` as the cluster's owner.
fn as_owner(program: &str) -> Command {
    let path = Path::new(BIN).join(program);
    if am_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(mut c: Command, what: &str) {
    let out = c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(out.status.success(), "{what} failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn start() -> Cluster {
    assert!(
        Path::new(BIN).join("initdb").exists(),
        "PostgreSQL is not installed ({BIN}/initdb is missing): the state tests need it; run scripts/install-deps.sh (apt-get install postgresql)"
    );
    let dir = std::env::temp_dir().join(format!("flotilla-pg-{}-{}", std::process::id(), crate::now()));
    std::fs::create_dir(&dir).expect("make the cluster's directory");
    if am_root() {
        let out = Command::new("chown").arg("postgres:").arg(&dir).output().expect("chown");
        assert!(out.status.success(), "chown postgres {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    }
    let data = dir.join("data");
    let mut init = as_owner("initdb");
    init.arg("-D").arg(&data).args(["-U", "flotilla", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"]);
    run(init, "initdb");
    // The watcher: when this process is gone, stop the server and remove everything.
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        stop = if am_root() { format!("runuser -u postgres -- {BIN}/pg_ctl") } else { format!("{BIN}/pg_ctl") },
        data = data.display(),
        dir = dir.display(),
    );
    let watcher = Command::new("setsid").args(["sh", "-c", &script]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start the cluster's watcher");
    let mut ctl = as_owner("pg_ctl");
    ctl.arg("-D").arg(&data).arg("-l").arg(dir.join("log")).arg("-o").arg(format!(
        "-k {} -c listen_addresses= -F -c max_connections=200 -c shared_buffers=16MB",
        dir.display()
    ));
    ctl.args(["-w", "start"]);
    run(ctl, "pg_ctl start");
    Cluster { dir, _watcher: watcher }
}

/// The URL of a new, empty database in this process's cluster (started on first use).
pub fn pg_database() -> String {
    let cluster = CLUSTER.get_or_init(start);
    let name = format!("t{}", NEXT.fetch_add(1, Ordering::SeqCst));
    let admin = url(&cluster.dir, "postgres");
    let mut client = postgres::Client::connect(&admin, postgres::NoTls).unwrap_or_else(|e| panic!("connecting to the test cluster {admin}: {e}"));
    client.batch_execute(&format!("CREATE DATABASE {name}")).expect("create a test database");
    url(&cluster.dir, &name)
}

fn url(dir: &Path, db: &str) -> String {
    let socket: String = dir.display().to_string().replace('/', "%2F");
    format!("postgres://flotilla@{socket}/{db}")
}
