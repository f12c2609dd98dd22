//! Logging in to a registry: the credentials the user's container tools already saved, and
//! the challenge a registry answers with when a request needs them.
//!
//! Credentials are read from the files `skopeo login`, `podman login` and `docker login`
//! write (containers-auth.json(5): `$REGISTRY_AUTH_FILE`, else
//! `$XDG_RUNTIME_DIR/containers/auth.json`, `$XDG_CONFIG_HOME/containers/auth.json` and
//! `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`), never from flotilla's own state.
//! A password must never reach a log, an error or the state DB: [`Credentials`] does not show
//! it in `Debug`, and nothing here puts a file's contents into an error.

use std::path::{Path, PathBuf};


/// A user name and password for one registry, and the file they came from.
#[derive(Clone)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    password: String,
    /// The auth file that held them.
    pub from: PathBuf,
}

impl Credentials {
    /// Credentials given directly (tests, a future `--creds`).
    pub fn new(username: String, password: String, from: PathBuf) -> Credentials {
        Credentials { username, password, from }
    }

    /// The password; only for an `Authorization` header.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The value of a Basic `Authorization` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", flotilla_store::base64::encode(raw.as_bytes()))
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<hidden>").field("from", &self.from).finish()
    }
}

/// Why an auth file could not be used. It names the file, never its contents.
#[derive(Debug, thiserror::Error)]
#[error("auth file {}: {detail}; fix it or log in again with `skopeo login HOST`", .path.display())]
pub struct AuthFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it (no secret in it).
    pub detail: String,
}

/// The auth files to search, in the order containers-auth.json(5) gives: when
/// `$REGISTRY_AUTH_FILE` is set, only that file.
pub fn auth_files() -> Vec<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(f) = var("REGISTRY_AUTH_FILE") {
        return vec![f];
    }
    let mut files = Vec::new();
    if let Some(d) = var("XDG_RUNTIME_DIR") {
        files.push(d.join("containers/auth.json"));
    }
    let home = var("HOME");
    match (var("XDG_CONFIG_HOME"), &home) {
        (Some(d), _) => files.push(d.join("containers/auth.json")),
        (None, Some(h)) => files.push(h.join(".config/containers/auth.json")),
        (None, None) => {}
    }
    match (var("DOCKER_CONFIG"), &home) {
        (Some(d), _) => files.push(d.join("config.json")),
        (None, Some(h)) => files.push(h.join(".docker/config.json")),
        (None, None) => {}
    }
    files
}

/// The credentials for `host` (`HOST[:PORT]`) from the first of `files` that has an entry for
/// it; a missing file is skipped, an unreadable or malformed one is an error.
pub fn lookup(files: &[PathBuf], host: &str) -> Result<Option<Credentials>, AuthFileError> {
    for path in files {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(AuthFileError { path: path.clone(), detail: format!("cannot be read ({e})") }),
        };
        if let Some(c) = in_file(path, &text, host)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

#[derive(serde::Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, Entry>,
}

#[derive(serde::Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

fn in_file(path: &Path, text: &[u8], host: &str) -> Result<Option<Credentials>, AuthFileError> {
    let bad = |detail: String| AuthFileError { path: path.to_owned(), detail };
    // serde_json's message gives a line and column, never the text it read.
    let file: AuthFile = serde_json::from_slice(text).map_err(|e| bad(format!("is not an auth file ({e})")))?;
    let Some((_, entry)) = file.auths.iter().find(|(k, _)| key_host(k) == host) else { return Ok(None) };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let raw = flotilla_store::base64::decode(auth.trim()).ok_or_else(|| bad(format!("the `auth` of {host} is not base64 of user:password")))?;
        let raw = String::from_utf8(raw).map_err(|_| bad(format!("the `auth` of {host} is not text")))?;
        let Some((user, pass)) = raw.split_once(':') else {
            return Err(bad(format!("the `auth` of {host} is not base64 of user:password")));
        };
        return Ok(Some(Credentials { username: user.to_owned(), password: pass.to_owned(), from: path.to_owned() }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials { username: u.clone(), password: p.clone(), from: path.to_owned() })),
        _ => Err(bad(format!("the entry of {host} has no `auth`"))),
    }
}

/// The registry host an `auths` key names: keys may carry a scheme and a path
/// (`https://host:5000/v1/`).
fn key_host(key: &str) -> &str {
    let k = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// What a registry asks for in its `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// A user name and password with every request.
    Basic,
    /// A token from `realm`, for `service`, covering `scope`.
    Bearer {
        /// Where to get the token.
        realm: String,
        /// The registry's name for itself.
        service: Option<String>,
        /// What the token should allow, if the registry said.
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses a `WWW-Authenticate` header value; `None` for a scheme this client does not speak.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
        let params = parse_params(rest);
        let get = |k: &str| params.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
        if scheme.eq_ignore_ascii_case("basic") {
            Some(Challenge::Basic)
        } else if scheme.eq_ignore_ascii_case("bearer") {
            Some(Challenge::Bearer { realm: get("realm")?, service: get("service"), scope: get("scope") })
        } else {
            None
        }
    }
}

/// `k="v", k2=v2` as RFC 7235 auth-params: quoted strings may hold commas and `\"`.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            continue;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_owned();
        }
        out.push((name, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_quoted_commas() {
        let c = Challenge::parse(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#).unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into())
            }
        );
        assert_eq!(Challenge::parse(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        assert_eq!(Challenge::parse("Negotiate abc"), None);
        assert_eq!(Challenge::parse("Bearer service=x"), None, "a bearer challenge without a realm is unusable");
    }

    #[test]
    fn credentials_from_auths_keys_with_scheme_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("auth.json");
        // "alice:s3cr:et" (a password may hold a colon)
        std::fs::write(&f, r#"{"auths":{"https://reg.example:5000/v1/":{"auth":"YWxpY2U6czNjcjpldA=="}}}"#).unwrap();
        let c = lookup(&[dir.path().join("missing.json"), f.clone()], "reg.example:5000").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password()), ("alice", "s3cr:et"));
        assert!(!format!("{c:?}").contains("s3cr"), "Debug must not show the password");
        assert!(lookup(std::slice::from_ref(&f), "reg.example").unwrap().is_none(), "the port is part of the host");
    }

    #[test]
    fn a_malformed_auth_file_is_named_without_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("auth.json");
        std::fs::write(&f, r#"{"auths":{"h":{"auth":"!!topsecret!!"}}}"#).unwrap();
        let e = lookup(std::slice::from_ref(&f), "h").unwrap_err().to_string();
        assert!(e.contains("auth.json") && e.contains("not base64") && !e.contains("topsecret"), "{e}");
        std::fs::write(&f, "topsecret").unwrap();
        let e = lookup(&[f], "h").unwrap_err().to_string();
        assert!(e.contains("not an auth file") && !e.contains("topsecret"), "{e}");
    }
}
