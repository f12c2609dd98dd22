//! Connecting to a PostgreSQL state: a libpq-style URL (`postgres://USER@HOST[:PORT]/DB`,
//! `?host=/socket/dir` for a unix socket), completed from the `PG*` variables as libpq does,
//! and the password from `PGPASSWORD` or the password file (`$PGPASSFILE`, else `~/.pgpass`),
//! which the client library does not read itself. A password is never taken from the URL:
//! the URL is the state's name, seen in process listings, in errors and in the ledger's
//! neighbourhood, so one there is refused with where to put it instead.

use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::PathBuf;
use std::str::FromStr as _;

use postgres::config::Host;

use crate::{Result, StateError};

/// Whether `location` names a PostgreSQL state rather than an SQLite file.
pub fn is_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

/// The connection settings for `url`, with what the URL leaves out taken from `PGHOST`,
/// `PGPORT`, `PGUSER`, `PGDATABASE` and the password file.
pub(crate) fn config(url: &str) -> Result<postgres::Config> {
    let bad = |why: String| StateError::Url { url: redact(url), why };
    let mut config = postgres::Config::from_str(url).map_err(|e| bad(format!("{e}; write it as postgres://USER@HOST[:PORT]/DATABASE (a unix socket: postgres://USER@/DATABASE?host=/run/postgresql)")))?;
    if config.get_password().is_some() {
        return Err(bad("it holds a password, which would be seen by every process listing and error message; remove it from the URL and put it in ~/.pgpass (mode 0600: HOST:PORT:DATABASE:USER:PASSWORD) or PGPASSWORD".into()));
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if config.get_hosts().is_empty() {
        match env("PGHOST") {
            Some(h) if h.starts_with('/') => config.host_path(h),
            Some(h) => config.host(&h),
            None => config.host_path("/var/run/postgresql"),
        };
    }
    if config.get_ports().is_empty() {
        let port = match env("PGPORT") {
            Some(p) => p.parse().map_err(|_| bad(format!("PGPORT is `{p}`, not a port number")))?,
            None => 5432,
        };
        config.port(port);
    }
    if config.get_user().is_none() {
        let user = env("PGUSER").or_else(|| env("USER")).or_else(|| env("LOGNAME")).ok_or_else(|| bad("it names no user, and neither PGUSER nor USER is set; write postgres://USER@HOST/DATABASE".into()))?;
        config.user(&user);
    }
    if config.get_dbname().is_none() {
        let db = env("PGDATABASE").unwrap_or_else(|| config.get_user().unwrap_or_default().to_owned());
        config.dbname(&db);
    }
    if let Some(p) = env("PGPASSWORD") {
        config.password(p);
    } else if let Some(p) = pgpass_password(&config)? {
        config.password(p);
    }
    config.application_name("flotilla");
    config.connect_timeout(std::time::Duration::from_secs(10));
    Ok(config)
}

/// `url` with any password in it replaced by `***`, for messages.
pub(crate) fn redact(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let end = url[start..].find(['/', '?']).map_or(url.len(), |i| start + i);
    let authority = match url[start..end].rfind('@') {
        Some(at) => match url[start..start + at].find(':') {
            Some(colon) => format!("{}***{}", &url[..start + colon + 1], &url[start + at..end]),
            None => url[..end].to_owned(),
        },
        None => url[..end].to_owned(),
    };
    // A `password=` query parameter is a password too (libpq reads it); every other one is shown.
    let rest = &url[end..];
    let Some(q) = rest.find('?') else { return authority + rest };
    let query = rest[q + 1..]
        .split('&')
        .map(|kv| if kv.split('=').next().is_some_and(|k| k.eq_ignore_ascii_case("password")) { "password=***" } else { kv })
        .collect::<Vec<_>>()
        .join("&");
    format!("{authority}{}?{query}", &rest[..q])
}

/// The URL as shown: user, host, port and database, never a password.
pub(crate) fn describe(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => String::new(),
    };
    format!(
        "postgres://{}@{}:{}/{}",
        config.get_user().unwrap_or_default(),
        host,
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_dbname().unwrap_or_default()
    )
}

/// Connects.
pub(crate) fn connect(url: &str) -> Result<(postgres::Client, String)> {
    let config = config(url)?;
    let shown = describe(&config);
    let client = config.connect(postgres::NoTls).map_err(|source| StateError::Connect { url: shown.clone(), source })?;
    Ok((client, shown))
}

/// The password file's entry for this connection, as libpq reads it: the first line whose
/// fields match (`*` matches anything; `\:` and `\\` are escapes). A file that others can
/// read is ignored, as libpq does, and said so.
fn pgpass_password(config: &postgres::Config) -> Result<Option<String>> {
    let path = match std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("HOME").filter(|p| !p.is_empty()) {
            Some(h) => PathBuf::from(h).join(".pgpass"),
            None => return Ok(None),
        },
    };
    pgpass_file_password(config, path)
}

fn pgpass_file_password(config: &postgres::Config, path: PathBuf) -> Result<Option<String>> {
    let mut file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::PasswordFile { path, why: e.to_string() }),
    };
    let meta = file.metadata().map_err(|e| StateError::PasswordFile { path: path.clone(), why: e.to_string() })?;
    if !meta.is_file() {
        return Ok(None);
    }
    if meta.mode() & 0o077 != 0 {
        eprintln!("warning: password file {} has group or world access and is ignored; make it u=rw (chmod 0600)", path.display());
        return Ok(None);
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| StateError::PasswordFile { path: path.clone(), why: e.to_string() })?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        // libpq matches a socket connection against `localhost`, and against the path itself.
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432).to_string();
    let db = config.get_dbname().unwrap_or_default();
    let user = config.get_user().unwrap_or_default();
    Ok(pgpass_lookup(&text, &host, &port, db, user))
}

/// The password of the first entry of a password file matching the connection.
pub(crate) fn pgpass_lookup(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    let socket = host.starts_with('/');
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass(line);
        if fields.len() < 5 {
            continue;
        }
        let is = |field: &str, value: &str| field == "*" || field == value;
        let host_ok = is(&fields[0], host) || (socket && fields[0] == "localhost");
        if host_ok && is(&fields[1], port) && is(&fields[2], db) && is(&fields[3], user) {
            // A password may itself hold colons: everything after the fourth field.
            return Some(fields[4..].join(":"));
        }
    }
    None
}

fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().expect("one field").push(n);
                }
            }
            ':' => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_file_is_read_as_libpq_reads_it() {
        let text = "# comment\nother:5432:*:alice:no\ndb.example:*:fleet:alice:pa\\:ss:word\n*:*:*:*:fallback\n";
        assert_eq!(pgpass_lookup(text, "db.example", "5433", "fleet", "alice").as_deref(), Some("pa:ss:word"));
        assert_eq!(pgpass_lookup(text, "db.example", "5433", "other", "alice").as_deref(), Some("fallback"));
        assert_eq!(pgpass_lookup("localhost:5432:d:u:sock\n", "/run/postgresql", "5432", "d", "u").as_deref(), Some("sock"));
        assert_eq!(pgpass_lookup("h:5432:d:u:x\n", "h", "5432", "d", "v"), None);
    }

    #[test]
    fn a_password_file_others_may_read_is_ignored_as_libpq_ignores_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "db.example:5432:fleet:alice:s3cret\n").unwrap();
        let config = postgres::Config::from_str("postgres://alice@db.example/fleet").unwrap();
        let mut config = config;
        config.port(5432);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(pgpass_file_password(&config, path.clone()).unwrap().as_deref(), Some("s3cret"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(pgpass_file_password(&config, path).unwrap(), None);
    }

    #[test]
    fn a_password_in_the_url_is_refused_and_never_repeated() {
        let err = config("postgres://alice:hunter2@db.example/fleet").unwrap_err().to_string();
        assert!(err.contains("~/.pgpass"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(redact("postgres://a:b@h/d?x=1"), "postgres://a:***@h/d?x=1");
        assert_eq!(redact("postgres://a@h/d"), "postgres://a@h/d");
        let err = config("postgres://alice@db.example/fleet?password=hunter2").unwrap_err().to_string();
        assert!(err.contains("~/.pgpass"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(redact("postgres://a@h/d?sslmode=disable&password=hunter2&x=1"), "postgres://a@h/d?sslmode=disable&password=***&x=1");
        assert_eq!(redact("postgres://a:b@h/d?PASSWORD=c"), "postgres://a:***@h/d?password=***");
    }
}
