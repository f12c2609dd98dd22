//! Service logs: what a service writes to stdout and stderr, appended to
//! `<log_dir>/<name>.log` and rotated to `<name>.log.1` … `<name>.log.<keep>` by size.
//!
//! A log exists so a service never blocks on a full pipe and its output survives it; so this
//! must never stop draining the pipe, even when the disk is full (output is dropped then), and
//! never let the live file grow past the size limit.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};

use super::lock;

/// A size-rotated log file. Shared (behind a mutex) by every incarnation of one service.
pub(super) struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: Option<File>,
    size: u64,
}

/// One service's log, shared between its output pumps and its monitor.
pub(super) type SharedLog = Arc<Mutex<RotatingLog>>;

impl RotatingLog {
    /// The log at `path`; `max_bytes == 0` never rotates.
    pub fn new(path: PathBuf, max_bytes: u64, keep: usize) -> RotatingLog {
        RotatingLog { path, max_bytes, keep, file: None, size: 0 }
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        name.into()
    }

    /// The live file, opened when needed: never through a link (one planted at its name is
    /// not followed, and that output is dropped), readable by root only, whatever mode an
    /// older file had.
    fn file(&mut self) -> Option<&mut File> {
        if self.file.is_none() {
            let file = OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&self.path).ok()?;
            let meta = file.metadata().ok()?;
            if !meta.is_file() {
                return None;
            }
            if meta.permissions().mode() & 0o077 != 0 {
                file.set_permissions(std::fs::Permissions::from_mode(0o600)).ok()?;
            }
            self.size = meta.len();
            self.file = Some(file);
        }
        self.file.as_mut()
    }

    fn rotate(&mut self) {
        self.file = None;
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
            }
            let _ = std::fs::rename(&self.path, self.rotated(1));
        }
        self.size = 0;
    }

    fn append(&mut self, data: &[u8]) -> bool {
        let Some(file) = self.file() else { return false };
        if file.write_all(data).is_err() {
            // Reopen next time: the file may have been removed or the disk freed.
            self.file = None;
            return false;
        }
        self.size += data.len() as u64;
        true
    }

    /// Appends `data`, rotating first when it would not fit; cuts at a newline when one fits.
    pub fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.file().is_none() {
                return;
            }
            if self.max_bytes == 0 {
                self.append(data);
                return;
            }
            let room = self.max_bytes.saturating_sub(self.size) as usize;
            if data.len() <= room {
                self.append(data);
                return;
            }
            let cut = match data[..room].iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                // A line longer than the whole file is cut hard; otherwise start a new file.
                None if self.size == 0 => room,
                None => 0,
            };
            if !self.append(&data[..cut]) {
                return;
            }
            data = &data[cut..];
            self.rotate();
        }
    }

    /// Writes a line of the agent's own about this service (start, exit, restart).
    pub fn note(&mut self, message: &str) {
        self.write(format!("-- flotilla-agent: {message}\n").as_bytes());
    }
}

/// Copies everything from `pipe` into `log` on a thread of its own until every writer has
/// closed it. The returned receiver disconnects when that has happened.
pub(super) fn pump(name: &str, pipe: File, log: SharedLog) -> std::io::Result<Receiver<()>> {
    let (done, finished) = mpsc::channel::<()>();
    std::thread::Builder::new().name(format!("log-{name}")).spawn(move || {
        let _done = done;
        let mut pipe = pipe;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => lock(&log).write(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    })?;
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(dir: &std::path::Path) -> Vec<(String, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().into_string().unwrap(), e.metadata().unwrap().len())
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_log_is_readable_by_root_only_and_a_link_at_its_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let path = dir.path().join("web.log");
        RotatingLog::new(path.clone(), 0, 0).write(b"new\n");
        assert_eq!(mode(&path), 0o600);
        // A log an older agent left readable by everyone is made private.
        let old = dir.path().join("old.log");
        std::fs::write(&old, "old\n").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        RotatingLog::new(old.clone(), 0, 0).write(b"more\n");
        assert_eq!((mode(&old), std::fs::read_to_string(&old).unwrap().as_str()), (0o600, "old\nmore\n"));
        // A link planted at a log's name: the output is dropped, the target untouched.
        let target = dir.path().join("passwd");
        std::fs::write(&target, "root:x:0:0\n").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let planted = dir.path().join("app.log");
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        RotatingLog::new(planted, 0, 0).write(b"owned\n");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "root:x:0:0\n");
        assert_eq!(mode(&target), 0o644, "the link's target was chmodded");
    }

    #[test]
    fn rotates_at_line_boundaries_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::new(dir.path().join("s.log"), 100, 2);
        for i in 0..100 {
            log.write(format!("line {i:04}\n").as_bytes()); // 10 bytes each
        }
        let got = sizes(dir.path());
        assert_eq!(
            got,
            vec![("s.log".into(), 100), ("s.log.1".into(), 100), ("s.log.2".into(), 100)]
        );
        let live = std::fs::read_to_string(dir.path().join("s.log")).unwrap();
        assert!(live.starts_with("line 0090\n") && live.ends_with("line 0099\n"), "{live}");
    }

    #[test]
    fn long_lines_are_cut_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::new(dir.path().join("s.log"), 10, 1);
        log.write(b"abc\n");
        log.write(&[b'x'; 25]);
        let got = sizes(dir.path());
        assert_eq!(got, vec![("s.log".into(), 5), ("s.log.1".into(), 10)]);
    }

    #[test]
    fn zero_keep_truncates_and_zero_max_never_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::new(dir.path().join("a.log"), 8, 0);
        log.write(b"1234567\n1234567\n");
        let mut unlimited = RotatingLog::new(dir.path().join("b.log"), 0, 3);
        unlimited.write(&[b'y'; 1000]);
        assert_eq!(sizes(dir.path()), vec![("a.log".into(), 8), ("b.log".into(), 1000)]);
    }
}
