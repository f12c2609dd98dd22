//! What the deployer reads of processes from `/proc`: start times (a pid plus its start time
//! names one process for good, where a pid alone may be reused; read by `flotilla-proc`),
//! command lines, whether it runs as root, and this host's name.

use std::fs;

/// A process's start time in clock ticks after boot, read by `flotilla-proc` (the one reader
/// the deployer, the agent and the tests share); `None` when it does not exist, is a zombie,
/// or `pid` is no process id.
pub fn start_time(pid: i32) -> Option<u64> {
    u32::try_from(pid).ok().and_then(flotilla_proc::start_time)
}

/// A process's command line as one line, its arguments joined by spaces, control characters
/// escaped and clipped to 200 characters (it goes into messages); `None` when unreadable.
pub fn command_line(pid: i32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok().filter(|r| !r.is_empty())?;
    let words: Vec<String> = raw.split(|b| *b == 0).filter(|w| !w.is_empty()).map(|w| String::from_utf8_lossy(w).chars().flat_map(char::escape_debug).collect()).collect();
    let line = words.join(" ");
    Some(match line.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    })
}

pub use flotilla_proc::is_root;

/// Waits up to `timeout` for `child` to exit; a child still running then is killed (and
/// reaped), and `None` says so.
pub fn wait_timeout(child: &mut std::process::Child, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
    let since = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if since.elapsed() < timeout => std::thread::sleep(std::time::Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// This host's name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "localhost".into())
}

/// This host as the state records it (a lock's holder, the deployer host of a local machine):
/// its name and the first 12 digits of `/etc/machine-id`, as `nixos (3d1219c7c4c5)`. Two
/// laptops both named `nixos` are two hosts: neither judges the other's pids, nor touches its
/// local machines. Without a machine id (some containers), the hostname alone.
pub fn host() -> String {
    host_of(&hostname(), fs::read_to_string("/etc/machine-id").ok().as_deref())
}

fn host_of(name: &str, machine_id: Option<&str>) -> String {
    match machine_id.map(str::trim).filter(|id| !id.is_empty()) {
        Some(id) => format!("{name} ({})", id.get(..12).unwrap_or(id)),
        None => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_its_name_and_machine_id_prefix() {
        assert_eq!(host_of("nixos", Some("3d1219c7c4c5404aaa1f6d2a48adfda4\n")), "nixos (3d1219c7c4c5)");
        assert_ne!(host_of("nixos", Some("3d1219c7c4c5404a")), host_of("nixos", Some("9e0c7a11b2d3404a")));
        assert_eq!(host_of("nixos", Some("")), "nixos");
        assert_eq!(host_of("nixos", None), "nixos");
        assert!(host().starts_with(&hostname()));
    }

    #[test]
    fn reads_this_process_and_not_a_missing_one() {
        assert!(start_time(std::process::id() as i32).is_some());
        assert_eq!(start_time(-1), None);
        let me = command_line(std::process::id() as i32).unwrap();
        assert!(!me.is_empty() && !me.contains('\0'), "{me}");
        assert_eq!(command_line(i32::MAX), None);
    }
}
