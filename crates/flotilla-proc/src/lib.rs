//! What flotilla reads of processes in `/proc`, written once for the deployer, the agent and
//! the tests: a process's state and start time from `/proc/<pid>/stat`.
//!
//! A pid alone may be given to another process once its owner exits; a pid together with its
//! start time (field 22 of `stat`, clock ticks after boot) names one process for good. The
//! pidfiles of the contract ([`flotilla_protocol::layout`]) record both, and whoever signals a
//! process from one checks both first.
//!
//! It is its own crate, not a module of the protocol crate, because that crate stays pure (no
//! filesystem, no processes) and this one is nothing but reading the host: both sides
//! depend on it, and it depends on nothing, so the agent's dependencies stay few.
//!
//! What it must never do: write anything, or guess (an unreadable or odd `stat` is `None` or
//! an error, never a made-up time).

use std::fs;
use std::io;

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie: exited, not yet reaped), ...
    pub state: char,
    /// Field 22: when it started, in clock ticks after boot.
    pub start_time: u64,
}

impl Stat {
    /// Parses the text of a `stat` file.
    pub fn parse(text: &str) -> Option<Stat> {
        // The command name (field 2) is in parentheses and may hold anything, spaces and ')'
        // included: the fields after the last ')' start at field 3.
        let mut fields = text.get(text.rfind(')')? + 1..)?.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let start_time = fields.nth(22 - 4)?.parse().ok()?;
        Some(Stat { state, start_time })
    }

    /// Reads process `pid`'s (`"self"` for this one).
    pub fn read(pid: &str) -> io::Result<Stat> {
        let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        Stat::parse(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unexpected /proc/{pid}/stat")))
    }

    /// Whether it has exited (a zombie only waits to be reaped).
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z'
    }
}

/// Process `pid`'s start time; `None` when it does not exist or is a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    Stat::read(&pid.to_string()).ok().filter(|s| !s.is_zombie()).map(|s| s.start_time)
}

/// This process's start time.
pub fn own_start_time() -> io::Result<u64> {
    Stat::read("self").map(|s| s.start_time)
}

/// Whether the process `pid` that started at `start_time` still runs (exists, is no zombie,
/// and its pid was not given to another process since).
pub fn is_running(pid: u32, start_time: u64) -> bool {
    self::start_time(pid) == Some(start_time)
}

/// Whether a process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    start_time(pid).is_some()
}

/// This process's effective uid (`Uid:` of `/proc/self/status`); `None` without `/proc`.
pub fn euid() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:").and_then(|ids| ids.split_whitespace().nth(1).and_then(|euid| euid.parse().ok()))))
}

/// Whether this process runs with an effective uid of 0.
pub fn is_root() -> bool {
    euid() == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_survives_odd_command_names() {
        let stat = "4101 (we ir) d) S 1 4101 4101 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1 2 3";
        assert_eq!(Stat::parse(stat), Some(Stat { state: 'S', start_time: 987654 }));
        assert_eq!(Stat::parse("garbage"), None);
        assert_eq!(Stat::parse("1 (x) Z 1"), None);
    }

    #[test]
    fn this_process_runs_and_a_changed_start_time_or_missing_pid_does_not() {
        let me = std::process::id();
        let t = own_start_time().unwrap();
        assert_eq!(start_time(me), Some(t));
        assert!(is_running(me, t));
        assert!(!is_running(me, t + 1), "a reused pid is not the recorded process");
        assert!(!alive(u32::MAX));
    }
}
