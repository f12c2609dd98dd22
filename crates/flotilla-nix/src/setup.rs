//! Whether this host's Nix can build at all, and what to do when it cannot.
//!
//! Nix refuses to build for reasons that belong to the host, not to any deployment: no build
//! users, a store it cannot write, a daemon that does not answer. Such a failure is said once,
//! as one sentence with its fix, and never attributed to each machine as if its configuration
//! were wrong. This module reads Nix's own configuration (`nix show-config`, so `nix.conf`,
//! `NIX_CONFIG` and `NIX_CONF_DIR` count exactly as Nix counts them), checks what a build
//! needs before one starts, and recognises the same failures in Nix's error output when
//! they happen anyway.
//!
//! It must never change the host: it reads, connects and opens lock files as Nix does, and
//! the probe build deletes what it built.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_store::StorePath;

use crate::{clean_error, run, Builders, EvalArgs, Nix, NixError, Result};

/// How Nix's installer makes build users, for the fixes.
const AS_THE_INSTALLER_DOES: &str = "as Nix's installer does (flotilla's scripts/setup-nix.sh does: a `nixbld` group whose members are the users nixbld1..nixbld32)";
/// The other way out.
const OR_AS_ROOT: &str = "or set `build-users-group =` in /etc/nix/nix.conf to build as root";

/// The daemon's socket when `NIX_REMOTE=daemon` names none.
const DEFAULT_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// The settings of Nix's configuration that decide whether and how it builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixConfig {
    /// `build-users-group`: builds run as its members when Nix runs as root; empty, as root.
    pub build_users_group: String,
    /// `substituters`, after flotilla's `--substituters` override.
    pub substituters: Vec<String>,
    /// `store` (whose default is `NIX_REMOTE`, else `auto`).
    pub store: String,
    /// `sandbox`: `true`, `false` or `relaxed`.
    pub sandbox: String,
}

/// How Nix reaches its store from this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAccess {
    /// Directly: this process writes `/nix/store` and the database itself.
    Local,
    /// Through a daemon on this socket.
    Daemon(PathBuf),
    /// Another kind of store (ssh-ng://, a chroot store, ...), not checked here.
    Other(String),
}

/// Who builds, when Nix builds locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildUsers {
    /// `build-users-group` is empty: builds run as root.
    Root,
    /// Not root: Nix ignores build users and builds as this user (or the daemon builds).
    NotRoot,
    /// Builds run as the members of this group.
    Group {
        /// The group's name.
        name: String,
        /// How many members it has.
        members: usize,
    },
}

impl Nix {
    /// Nix's version, from `nix-store --version` (e.g. `2.8.0`).
    pub fn version(&self) -> Result<String> {
        let out = run(Command::new("nix-store").arg("--version"), "nix-store")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().next().unwrap_or("").trim();
        if !out.status.success() || line.is_empty() {
            let err = clean_error(&out.stderr);
            return Err(diagnose(&err).map(NixError::Setup).unwrap_or(NixError::Output { command: "nix-store --version".into(), detail: err }));
        }
        Ok(line.rsplit(' ').next().unwrap_or(line).to_owned())
    }

    /// Nix's effective configuration, as `nix show-config` reads it, with flotilla's own
    /// `--substituters` applied.
    pub fn config(&self) -> Result<NixConfig> {
        let mut cmd = Command::new("nix");
        cmd.args(["--extra-experimental-features", "nix-command", "show-config", "--json"]);
        self.common_args(&mut cmd, false);
        let out = run(&mut cmd, "nix")?;
        if !out.status.success() {
            let err = clean_error(&out.stderr);
            return Err(diagnose(&err).map(NixError::Setup).unwrap_or(NixError::Output { command: "nix show-config".into(), detail: err }));
        }
        let all: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| NixError::Output { command: "nix show-config --json".into(), detail: e.to_string() })?;
        let value = |key: &str| -> String {
            match &all[key]["value"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Bool(b) => b.to_string(),
                serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(" "),
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            }
        };
        Ok(NixConfig {
            build_users_group: value("build-users-group"),
            substituters: value("substituters").split_whitespace().map(str::to_owned).collect(),
            // NIX_REMOTE is this setting's default, which nix.conf may override: Nix's answer.
            store: value("store"),
            sandbox: value("sandbox"),
        })
    }

    /// The cheap part of `flotilla doctor` for builds: the configuration reads, the store can
    /// be written (or its daemon answers), and there is someone to build as. No build runs.
    /// Run before realising, so a host that cannot build fails once, with the fix.
    pub fn check_build_setup(&self) -> Result<NixConfig> {
        let config = self.config()?;
        if let Err(problem) = store_ready(&config) {
            return Err(NixError::Setup(problem));
        }
        if let Err(problem) = build_users(&config) {
            return Err(NixError::Setup(problem));
        }
        Ok(config)
    }

    /// Builds a throwaway toplevel (one `/etc` file carrying `nonce`, the agent as its
    /// builder: what every deploy builds) and deletes it again. Proves that this host builds
    /// what flotilla needs; returns how long it took.
    pub fn probe_build(&self, agent: &Path, nonce: &str) -> Result<Duration> {
        let start = Instant::now();
        let dir = crate::tempdir_in(&std::env::temp_dir()).map_err(|source| NixError::Library { path: std::env::temp_dir(), source })?;
        let file = dir.join("probe.nix");
        let text = format!("{{ meta.name = \"flotilla-doctor\"; machines.probe = {{ files.\"/etc/flotilla-doctor\".text = \"{nonce}\"; }}; }}\n");
        let built = std::fs::write(&file, text)
            .map_err(|source| NixError::Library { path: file.clone(), source })
            .and_then(|()| {
                let args = EvalArgs { deployment: &file, facts_json: "{}".into(), agent: Some(agent), only: vec!["probe".into()] };
                let toplevels = self.eval_json("toplevels", &args, true)?;
                let drv = toplevels["probe"]["drv"].as_str().and_then(|p| StorePath::parse(p).ok());
                let out = toplevels["probe"]["out"].as_str().and_then(|p| StorePath::parse(p).ok());
                let (Some(drv), Some(out)) = (drv, out) else {
                    return Err(NixError::Output { command: "eval.nix toplevels".into(), detail: format!("no probe toplevel in {toplevels}") });
                };
                let outcome = self.realise(std::slice::from_ref(&drv), &Builders::nix_default(), &mut |_| {})?;
                let made = Path::new(&out.to_absolute()).exists();
                // Leave nothing behind: the output, then the derivation (nothing roots them).
                let _ = Command::new("nix-store").arg("--delete").arg(out.to_absolute()).arg(drv.to_absolute()).stdin(Stdio::null()).output();
                if made {
                    Ok(())
                } else {
                    Err(NixError::Build(outcome.errors.join("\n")))
                }
            });
        let _ = std::fs::remove_dir_all(&dir);
        built.map(|()| start.elapsed())
    }

    /// Asks substituter `url` for its `nix-cache-info`, giving up after `timeout`.
    pub fn ping_substituter(&self, url: &str, timeout: Duration) -> std::result::Result<(), String> {
        let mut cmd = Command::new("nix");
        cmd.args(["--extra-experimental-features", "nix-command", "store", "ping", "--store", url]);
        cmd.args(["--option", "connect-timeout", &timeout.as_secs().max(1).to_string()]);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("cannot run `nix store ping`: {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let mut err = Vec::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_end(&mut e, &mut err);
                    }
                    return if status.success() { Ok(()) } else { Err(clean_error(&err)) };
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("no answer within {} s", timeout.as_secs()));
                }
            }
        }
    }
}

impl NixConfig {
    /// How this process reaches the store.
    pub fn store_access(&self) -> StoreAccess {
        let s = self.store.as_str();
        if s == "daemon" {
            StoreAccess::Daemon(DEFAULT_DAEMON_SOCKET.into())
        } else if let Some(path) = s.strip_prefix("unix://") {
            StoreAccess::Daemon(if path.is_empty() { DEFAULT_DAEMON_SOCKET.into() } else { path.split('?').next().unwrap_or(path).into() })
        } else if s == "auto" || s.is_empty() {
            // Nix's rule: the local store when its state directory can be written, else the
            // daemon when its socket exists.
            if is_root() || !Path::new(DEFAULT_DAEMON_SOCKET).exists() {
                StoreAccess::Local
            } else {
                StoreAccess::Daemon(DEFAULT_DAEMON_SOCKET.into())
            }
        } else if s == "local" || s == "local?" {
            StoreAccess::Local
        } else {
            StoreAccess::Other(s.to_owned())
        }
    }
}

/// Whether Nix can reach its store for writing: its database lock opens read-write (as Nix
/// opens it), or its daemon's socket accepts a connection. `Err` is the problem and its fix.
pub fn store_ready(config: &NixConfig) -> std::result::Result<String, String> {
    match config.store_access() {
        StoreAccess::Local => {
            let db = Path::new("/nix/var/nix/db");
            if !db.is_dir() {
                return Err("Nix cannot build: its store database /nix/var/nix/db does not exist; create it with `nix-store --init` as root".into());
            }
            let lock = db.join("big-lock");
            match std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&lock) {
                Ok(_) => Ok("local store /nix/store, writable".into()),
                Err(e) => Err(store_not_writable(&format!("opening {}: {e}", lock.display()))),
            }
        }
        StoreAccess::Daemon(socket) => match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(_) => Ok(format!("through the Nix daemon at {}", socket.display())),
            Err(e) => Err(daemon_refuses(&socket.display().to_string(), &e.to_string())),
        },
        StoreAccess::Other(store) => Ok(format!("store {store} (not checked)")),
    }
}

/// Whether there is someone to build as. `Err` is the problem and its fix.
pub fn build_users(config: &NixConfig) -> std::result::Result<BuildUsers, String> {
    if config.store_access() != StoreAccess::Local {
        // The daemon builds as its own build users; its host's business.
        return Ok(BuildUsers::NotRoot);
    }
    if !is_root() {
        return Ok(BuildUsers::NotRoot);
    }
    let group = config.build_users_group.trim();
    if group.is_empty() {
        return Ok(BuildUsers::Root);
    }
    // NSS knows the host's groups (files, LDAP, ...); this static binary cannot ask it itself.
    let out = Command::new("getent").args(["group", group]).stdin(Stdio::null()).output();
    let line = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_owned(),
        Ok(o) if o.status.code() == Some(2) => return Err(group_missing(group)),
        Ok(o) => return Err(format!("cannot look up group '{group}' (build-users-group): getent said {}; check the host's /etc/group and /etc/nsswitch.conf", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => return Err(format!("cannot look up group '{group}' (build-users-group): cannot run getent: {e}; install libc-bin (Debian), which has it")),
    };
    let members = line.splitn(4, ':').nth(3).unwrap_or("").split(',').filter(|m| !m.trim().is_empty()).count();
    if members == 0 {
        return Err(group_empty(group));
    }
    Ok(BuildUsers::Group { name: group.to_owned(), members })
}

/// Recognises, in Nix's error output, a failure that is the host's set-up rather than a
/// deployment's: the problem and its fix in one sentence, or `None`. Only Nix's own error
/// lines count: an `error: ` line (or the first line, which flotilla's cleaned messages
/// start with), never a warning and never a builder's log lines (indented, or `> `), and
/// only Nix's words about its own state, never a path a builder may touch.
pub fn diagnose(stderr: &str) -> Option<String> {
    for (i, line) in stderr.lines().enumerate() {
        let line = match line.strip_prefix("error: ") {
            Some(rest) => rest,
            None if i == 0 && !line.starts_with("warning:") && !line.starts_with(' ') => line,
            None => continue,
        };
        if let Some(group) = between(line, "the group '", "' specified in 'build-users-group' does not exist") {
            return Some(group_missing(group));
        }
        if let Some(group) = between(line, "the build users group '", "' has no members") {
            return Some(group_empty(group));
        }
        if let Some(rest) = line.strip_prefix("cannot connect to socket at '") {
            let (socket, why) = rest.split_once("': ").unwrap_or((rest.trim_end_matches('\''), "refused"));
            return Some(daemon_refuses(socket, why));
        }
        // Nix's state directory (its database, locks, profiles) is Nix's alone; a builder
        // writes only its own output, so a store path in a message may be the build's fault.
        if line.starts_with("remounting /nix/store writable")
            || (line.contains("/nix/var/nix") && (line.contains("Read-only file system") || line.contains("Permission denied")))
        {
            return Some(store_not_writable(line));
        }
        if line.starts_with("cloning builder process") || line.starts_with("unable to start build process") {
            return Some(format!(
                "Nix cannot start a build here ({line}); run flotilla as root on the host or in a privileged container, or set `sandbox = false` in /etc/nix/nix.conf"
            ));
        }
    }
    None
}

/// The substituters Nix warned it could not reach, with its reason (from a build's output).
pub fn unreachable_substituter(line: &str) -> Option<String> {
    let rest = line.strip_prefix("warning: unable to download '")?;
    let (url, why) = rest.split_once("': ")?;
    // Nix retries, each time with another delay in the line: the reason is what comes before.
    let why = why.split("; retrying").next().unwrap_or(why);
    // The cache's address, not the file Nix asked it for.
    let cache = url.rsplit_once('/').map(|(base, _)| base).unwrap_or(url);
    Some(format!(
        "binary cache {cache} cannot be reached ({}); Nix builds without it, after waiting on it; pass --substituters '' (or FLOTILLA_SUBSTITUTERS=\"\") to build offline without waiting",
        why.trim()
    ))
}

/// The distributed-build setting a Nix daemon dropped because the user is not one it trusts
/// (`builders` and `builders-use-substitutes` are restricted settings): the builders were
/// never used, whatever Nix said after. The setting's name, from a build's output.
pub fn ignored_builder_setting(line: &str) -> Option<&str> {
    // Nix 2.4 and later say "client-specified", earlier ones "user-specified".
    let rest = line.strip_prefix("warning: ignoring the ")?.split_once("-specified setting '")?.1;
    let (setting, why) = rest.split_once('\'')?;
    (setting.starts_with("builders") && why.contains("not a trusted user")).then_some(setting)
}

/// What to tell the user when the daemon dropped the builders: `meta.builders` needs the
/// deploying user in the daemon's `trusted-users`.
pub fn builders_ignored(user: &str) -> String {
    format!(
        "the Nix daemon ignored `meta.builders` (and `--builders`): {user} is not one of its trusted users, and `builders` is a setting only they may pass; add `trusted-users = root {user}` to /etc/nix/nix.conf and restart nix-daemon, or deploy as root, or list the builders in /etc/nix/machines"
    )
}

fn between<'a>(line: &'a str, before: &str, after: &str) -> Option<&'a str> {
    line.split_once(before)?.1.split_once(after).map(|(x, _)| x)
}

fn group_missing(group: &str) -> String {
    format!("Nix cannot build: it is set to build as the members of group '{group}' (build-users-group), and this host has no such group; create it and its build users {AS_THE_INSTALLER_DOES}, {OR_AS_ROOT}")
}

fn group_empty(group: &str) -> String {
    format!("Nix cannot build: group '{group}' (build-users-group) has no members to build as; add build users to it {AS_THE_INSTALLER_DOES}, {OR_AS_ROOT}")
}

fn store_not_writable(what: &str) -> String {
    format!("Nix cannot write to its store ({what}); run flotilla as root on a host whose /nix is writable (not a read-only mount), or through a running Nix daemon (NIX_REMOTE=daemon)")
}

fn daemon_refuses(socket: &str, why: &str) -> String {
    format!("Nix is set to use its daemon (NIX_REMOTE or `store` in nix.conf) and none answers at {socket} ({why}); start it (`systemctl start nix-daemon`, or `nix-daemon &` as root), or as root unset NIX_REMOTE to use the store directly")
}

use flotilla_proc::is_root;

#[cfg(test)]
mod tests {
    use super::*;

    // Nix 2.8's own words, as it prints them.
    #[test]
    fn set_up_failures_are_recognised_with_their_fix() {
        let missing = diagnose("warning: the group 'nixbld' specified in 'build-users-group' does not exist\nerror: the group 'nixbld' specified in 'build-users-group' does not exist\n").unwrap();
        assert!(missing.contains("group 'nixbld'") && missing.contains("setup-nix.sh") && missing.contains("build-users-group ="), "{missing}");
        let empty = diagnose("error: the build users group 'nixbld' has no members\n").unwrap();
        assert!(empty.contains("has no members"), "{empty}");
        let daemon = diagnose("error: cannot connect to socket at '/nix/var/nix/daemon-socket/socket': No such file or directory\n").unwrap();
        assert!(daemon.contains("/nix/var/nix/daemon-socket/socket (No such file or directory)") && daemon.contains("nix-daemon"), "{daemon}");
        let ro = diagnose("error: could not set permissions on '/nix/var/nix/profiles/per-user' to 755: Read-only file system\n").unwrap();
        assert!(ro.contains("cannot write to its store") && ro.contains("per-user"), "{ro}");
        assert!(diagnose("error: remounting /nix/store writable: Invalid argument\n").is_some());
    }

    #[test]
    fn a_deployments_own_failures_are_not_the_hosts() {
        assert_eq!(diagnose("error: builder for '/nix/store/abc-x.drv' failed with exit code 1;\n       last 10 log lines:\n       > cp: /nix/store/abc: Permission denied\n"), None);
        // A builder's own output, printed as it ran, and its own `error:` about its output.
        assert_eq!(diagnose("building '/nix/store/abc-x.drv'...\nerror: failed to open /nix/store/abc-x/lib: Read-only file system\n"), None);
        // Nix's warning about the build users precedes every error on such a host; the error
        // that follows is the deployment's.
        assert_eq!(diagnose("warning: the group 'nixbld' specified in 'build-users-group' does not exist\nerror: undefined variable 'pkgs'\n"), None);
        assert_eq!(diagnose("error: undefined variable 'pkgs'\n"), None);
    }

    /// The daemon's warning that it dropped `builders` is recognised, in both wordings Nix
    /// has used, and no other restricted setting or warning passes for it.
    #[test]
    fn a_daemon_ignoring_the_builders_is_recognised() {
        let now = "warning: ignoring the client-specified setting 'builders', because it is a restricted setting and you are not a trusted user";
        assert_eq!(ignored_builder_setting(now), Some("builders"));
        let old = "warning: ignoring the user-specified setting 'builders-use-substitutes', because it is a restricted setting and you are not a trusted user";
        assert_eq!(ignored_builder_setting(old), Some("builders-use-substitutes"));
        let other = "warning: ignoring the client-specified setting 'sandbox', because it is a restricted setting and you are not a trusted user";
        assert_eq!(ignored_builder_setting(other), None);
        assert_eq!(ignored_builder_setting("building '/nix/store/abc-builders.drv'..."), None);
        assert!(builders_ignored("alice").contains("trusted-users = root alice"));
    }

    #[test]
    fn an_unreachable_cache_is_named_by_its_address() {
        let note = unreachable_substituter("warning: unable to download 'https://cache.example.org/nix-cache-info': Couldn't resolve host name (6)").unwrap();
        assert!(note.starts_with("binary cache https://cache.example.org cannot be reached (Couldn't resolve host name (6))"), "{note}");
        assert_eq!(unreachable_substituter("warning: something else"), None);
        let retry = |ms| format!("warning: unable to download 'https://cache.example.org/nix-cache-info': Couldn't resolve host name (6); retrying in {ms} ms");
        assert_eq!(unreachable_substituter(&retry(281)), unreachable_substituter(&retry(592)), "one note however often Nix retries");
    }

    #[test]
    fn store_access_follows_nix() {
        let cfg = |store: &str| NixConfig { build_users_group: String::new(), substituters: vec![], store: store.into(), sandbox: "true".into() };
        assert_eq!(cfg("daemon").store_access(), StoreAccess::Daemon(DEFAULT_DAEMON_SOCKET.into()));
        assert_eq!(cfg("unix:///run/nix.sock").store_access(), StoreAccess::Daemon("/run/nix.sock".into()));
        assert_eq!(cfg("local").store_access(), StoreAccess::Local);
        assert_eq!(cfg("local?root=/srv/nix").store_access(), StoreAccess::Other("local?root=/srv/nix".into()));
        assert_eq!(cfg("ssh-ng://builder").store_access(), StoreAccess::Other("ssh-ng://builder".into()));
    }
}
