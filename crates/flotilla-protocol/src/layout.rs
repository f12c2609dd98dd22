//! Where things are on a machine: every path the deployer and the agent agree on, written
//! once. Each is absolute as the machine sees it; [`under`] gives it below a directory that
//! stands for the machine's root (a local machine's root on the host, an agent's `--root`).
//!
//! Changing one is changing the contract: an agent and a deployer of different releases must
//! still find each other, so these move only with the protocol version.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The agent's socket: the only way to talk to it.
pub const SOCKET: &str = "/run/flotilla/agent.sock";
/// The agent's runtime directory (socket, pidfile, lock): root's alone.
pub const RUN_DIR: &str = "/run/flotilla";
/// The running agent's pid and start time (`{"pid":N,"startTime":T}`).
pub const PIDFILE: &str = "/run/flotilla/agent.pid";
/// Held by the running agent: two never supervise one root.
pub const LOCKFILE: &str = "/run/flotilla/agent.lock";
/// A detached agent's own output.
pub const AGENT_LOG: &str = "/var/log/flotilla-agent.log";
/// The services' logs: root's alone.
pub const LOG_DIR: &str = "/var/log/flotilla";
/// The agent's state: its registry, profiles and records.
pub const STATE_DIR: &str = "/nix/var/flotilla";
/// The registry of valid store paths, one file per path.
pub const REGISTRY: &str = "/nix/var/flotilla/db";
/// Generations (`system-<N>-link`) and the `system` profile.
pub const PROFILES: &str = "/nix/var/flotilla/profiles";
/// The agent a machine's current generation carries.
pub const SYSTEM_AGENT: &str = "/nix/var/flotilla/profiles/system/bin/flotilla-agent";
/// The agent the deployer puts on a machine before any generation exists.
pub const BOOTSTRAP_AGENT: &str = "/nix/var/flotilla/bin/flotilla-agent";
/// The running system.
pub const CURRENT_SYSTEM: &str = "/run/current-system";
/// Where the agent keeps Nix GC roots on a machine with Nix of its own.
pub const NIX_GCROOTS: &str = "/nix/var/nix/gcroots/flotilla";
/// The start of a root's name in [`NIX_GCROOTS`] that the deployer makes, not the agent: a
/// system built on the machine's host (`built-<machine>`, replaced by each build), kept from
/// Nix's collector between the build and the activation. The agent leaves these alone and
/// `destroy` removes them with the directory.
pub const BUILT_ROOT_PREFIX: &str = "built-";

/// The root the deployer keeps in [`NIX_GCROOTS`] for what it built on `machine`'s host.
pub fn built_root(machine: &str) -> String {
    format!("{NIX_GCROOTS}/{BUILT_ROOT_PREFIX}{machine}")
}

/// Where a machine's `nix-store` is looked for, in order: the agent to register what it
/// receives, the deployer to build on an ssh host. A multi-user install puts it in the
/// default profile, which is on neither sudo's `secure_path` nor a non-interactive ssh
/// `PATH`, so it is never found by name. Each place is root's to write.
pub const NIX_STORE_PLACES: &[&str] = &[
    "/nix/var/nix/profiles/default/bin",
    "/run/current-system/sw/bin",
    "/nix/var/nix/profiles/per-user/root/profile/bin",
    "/root/.nix-profile/bin",
    "/usr/local/bin",
    "/usr/bin",
];

/// Records in [`STATE_DIR`].
pub mod records {
    /// A checked activation not yet kept (what ran before it).
    pub const PENDING: &str = "pending.json";
    /// Failed generations and why.
    pub const FAILED: &str = "failed-generations.json";
    /// The `/etc` entries the agent placed.
    pub const ETC: &str = "etc.json";
    /// The accounts and memberships the agent made.
    pub const ACCOUNTS: &str = "accounts.json";
    /// The keys the agent placed (names, places, owners: never contents).
    pub const KEYS: &str = "keys.json";
}

/// A local machine's pidfile (`pid.json` in its data directory on the deployer's host), written
/// by the container launcher (`flotilla-agent container`) while the container runs and read by
/// the deployer's `local` platform: who to signal, and how to tell that a pid was not reused
/// (start times are field 22 of `/proc/<pid>/stat`, as `flotilla-proc` reads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PidFile {
    /// The monitor (exits after the container's PID 1 does; relays its port forwards).
    pub monitor: u32,
    /// The container's PID 1 as the host sees it: SIGTERM here stops the machine.
    pub init: u32,
    /// PID 1's start time, to tell a reused pid apart.
    pub init_start_time: u64,
}

impl PidFile {
    /// The file's text: one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain numbers serialise") + "\n"
    }
}

/// `path` (one of the above) below `root`, the directory standing for the machine's `/`.
pub fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// `path` relative to the machine's root, for calls that resolve it below a directory.
pub fn relative(path: &str) -> &str {
    path.trim_start_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_nest_as_the_agent_makes_them() {
        for p in [SOCKET, PIDFILE, LOCKFILE] {
            assert_eq!(Path::new(p).parent(), Some(Path::new(RUN_DIR)));
        }
        for p in [REGISTRY, PROFILES] {
            assert_eq!(Path::new(p).parent(), Some(Path::new(STATE_DIR)));
        }
        assert!(SYSTEM_AGENT.starts_with(PROFILES));
        assert_eq!(under(Path::new("/srv/m"), SOCKET), Path::new("/srv/m/run/flotilla/agent.sock"));
        assert_eq!(relative(PROFILES), "nix/var/flotilla/profiles");
    }

    #[test]
    fn the_container_pidfile_is_one_line_of_json_both_sides_read() {
        let p = PidFile { monitor: 4100, init: 4101, init_start_time: 123456 };
        assert_eq!(p.to_json(), "{\"monitor\":4100,\"init\":4101,\"init_start_time\":123456}\n");
        let spaced: PidFile = serde_json::from_str(r#"{"monitor": 1, "init": 2, "init_start_time": 3}"#).unwrap();
        assert_eq!(spaced, PidFile { monitor: 1, init: 2, init_start_time: 3 });
        assert!(serde_json::from_str::<PidFile>(r#"{"monitor": 1, "init": 2, "init_start_time": 3, "x": 4}"#).is_err());
    }
}
