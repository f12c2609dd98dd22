//! `flotilla-agent logs`: the services' logs as the supervisor writes them,
//! `<log dir>/<service>.log`, rotated by renaming to `<service>.log.1`. The deployer runs it
//! on the machine (over ssh) or on a machine's root directory (`--root`), so that reading logs
//! needs no protocol request and works while the agent is down.
//!
//! It only reads. Following prints whole lines only (a line still being written waits for its
//! end), and survives rotation: the rest of the renamed file is read first, then the new file
//! from its start; a file that shrank in place (truncated) is read again from its start.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One service's log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLog {
    /// The service, i.e. the file name without `.log`.
    pub service: String,
    /// The live log file.
    pub path: PathBuf,
}

/// Why logs cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// The named service has no log file.
    #[error("no log for service `{service}` (no {}); {}", path.display(), listing(known))]
    UnknownService {
        /// The service asked for.
        service: String,
        /// The file that does not exist.
        path: PathBuf,
        /// The services that have a log.
        known: Vec<String>,
    },
    /// The name cannot be a service's log file.
    #[error("{0:?} is not a service name")]
    BadName(String),
    /// The log directory cannot be read.
    #[error("cannot read {}: {source}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn listing(known: &[String]) -> String {
    if known.is_empty() {
        "no service has a log yet".into()
    } else {
        format!("services with logs: {} (without a service name, `logs` shows them all)", known.join(", "))
    }
}

/// The logs to show: the one of `service`, or every service's, sorted by name.
pub fn select(log_dir: &Path, service: Option<&str>) -> Result<Vec<ServiceLog>, LogsError> {
    let all = || -> Result<Vec<ServiceLog>, LogsError> {
        let entries = match fs::read_dir(log_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(LogsError::Dir { dir: log_dir.to_owned(), source }),
        };
        let mut logs: Vec<ServiceLog> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let service = name.strip_suffix(".log").filter(|s| !s.is_empty() && !s.starts_with('.'))?;
                Some(ServiceLog { service: service.to_owned(), path: e.path() })
            })
            .collect();
        logs.sort_by(|a, b| a.service.cmp(&b.service));
        Ok(logs)
    };
    let Some(service) = service else { return all() };
    if service.is_empty() || service.starts_with('.') || service.contains('/') {
        return Err(LogsError::BadName(service.to_owned()));
    }
    let path = log_dir.join(format!("{service}.log"));
    if !path.is_file() {
        let known = all().map(|logs| logs.into_iter().map(|l| l.service).collect()).unwrap_or_default();
        return Err(LogsError::UnknownService { service: service.to_owned(), path, known });
    }
    Ok(vec![ServiceLog { service: service.to_owned(), path }])
}

/// The last `n` lines of `data` (a final line without newline counts), without their newlines.
pub fn last_lines(data: &[u8], n: usize) -> Vec<&[u8]> {
    if n == 0 || data.is_empty() {
        return Vec::new();
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut lines: Vec<&[u8]> = body.rsplit(|b| *b == b'\n').take(n).collect();
    lines.reverse();
    lines
}

/// Reads the end of `file` (of length `len`) holding at least its last `n` lines, without
/// reading a large log whole.
fn read_end(file: &mut File, len: u64, n: usize) -> io::Result<Vec<u8>> {
    const CHUNK: u64 = 64 << 10;
    let mut start = len;
    let mut data = Vec::new();
    while start > 0 {
        let size = CHUNK.min(start);
        start -= size;
        let mut chunk = vec![0; size as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&data);
        data = chunk;
        // n lines need n newlines before them (one more if the data ends with one).
        let newlines = data.iter().filter(|b| **b == b'\n').count();
        if newlines > n {
            break;
        }
    }
    if start > 0 {
        // The first line may have been cut by the chunk boundary: drop it.
        let cut = data.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
        data.drain(..cut);
    }
    Ok(data)
}

/// A log being shown: where reading stopped and the start of a line not yet ended.
struct Tracked {
    log: ServiceLog,
    file: Option<File>,
    /// (device, inode) of `file`, to notice rotation.
    id: Option<(u64, u64)>,
    offset: u64,
    partial: Vec<u8>,
}

/// Shows logs: the last lines of each, then (to follow) what is appended to them.
pub struct Tail {
    tracked: Vec<Tracked>,
    prefix: bool,
}

impl Tail {
    /// Shows `logs`; each line gets a `service | ` prefix when there is more than one.
    pub fn new(logs: Vec<ServiceLog>) -> Tail {
        let prefix = logs.len() > 1;
        Tail { tracked: logs.into_iter().map(|log| Tracked { log, file: None, id: None, offset: 0, partial: Vec::new() }).collect(), prefix }
    }

    fn emit(out: &mut dyn Write, prefix: bool, service: &str, line: &[u8]) -> io::Result<()> {
        if prefix {
            write!(out, "{service} | ")?;
        }
        out.write_all(line)?;
        out.write_all(b"\n")
    }

    /// Prints the last `n` lines of each log, one log after the other. When `follow` comes
    /// next, a last line without its newline is held back until it is complete.
    pub fn print_last(&mut self, n: usize, follow: bool, out: &mut dyn Write) -> io::Result<()> {
        for t in &mut self.tracked {
            // A log that vanished since it was listed (rotated away) is followed once it is back.
            let Ok(mut file) = File::open(&t.log.path) else { continue };
            let meta = file.metadata()?;
            let mut data = read_end(&mut file, meta.len(), n)?;
            if follow {
                let whole = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                t.partial = data.split_off(whole);
            }
            for line in last_lines(&data, n) {
                Self::emit(out, self.prefix, &t.log.service, line)?;
            }
            (t.offset, t.id) = (meta.len(), Some((meta.dev(), meta.ino())));
            t.file = Some(file);
        }
        out.flush()
    }

    /// Prints the whole lines appended since the last call (or since [`Tail::print_last`]).
    pub fn poll(&mut self, out: &mut dyn Write) -> io::Result<()> {
        let prefix = self.prefix;
        for t in &mut self.tracked {
            // Two rounds at most: the rest of a rotated file, then its successor.
            for _ in 0..2 {
                if let Some(file) = &mut t.file {
                    let len = file.metadata()?.len();
                    if len < t.offset {
                        // Truncated in place: start over.
                        t.offset = 0;
                        t.partial.clear();
                    }
                    file.seek(SeekFrom::Start(t.offset))?;
                    let before = t.partial.len();
                    file.read_to_end(&mut t.partial)?;
                    t.offset += (t.partial.len() - before) as u64;
                    if let Some(end) = t.partial.iter().rposition(|b| *b == b'\n') {
                        let rest = t.partial.split_off(end + 1);
                        for line in t.partial[..end].split(|b| *b == b'\n') {
                            Self::emit(out, prefix, &t.log.service, line)?;
                        }
                        t.partial = rest;
                    }
                }
                let Ok(meta) = fs::metadata(&t.log.path) else { break };
                if t.id == Some((meta.dev(), meta.ino())) {
                    break;
                }
                // Rotated: what is left of the old file was read above; a line it never
                // ended is shown as it is, and the new file is read from its start.
                if t.file.is_some() && !t.partial.is_empty() {
                    let line = std::mem::take(&mut t.partial);
                    Self::emit(out, prefix, &t.log.service, &line)?;
                }
                let Ok(file) = File::open(&t.log.path) else { break };
                let meta = file.metadata()?;
                (t.file, t.id, t.offset) = (Some(file), Some((meta.dev(), meta.ino())), 0);
                t.partial.clear();
            }
        }
        out.flush()
    }

    /// Polls every `interval` until `stop` says so (a command that follows never stops).
    pub fn follow(&mut self, out: &mut dyn Write, interval: Duration, stop: &mut dyn FnMut() -> bool) -> io::Result<()> {
        while !stop() {
            std::thread::sleep(interval);
            self.poll(out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn write(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
    }

    fn append(path: &Path, text: &str) {
        fs::OpenOptions::new().append(true).create(true).open(path).unwrap().write_all(text.as_bytes()).unwrap();
    }

    fn text(out: &[u8]) -> String {
        String::from_utf8_lossy(out).into_owned()
    }

    #[test]
    fn last_lines_counts_a_final_line_without_newline() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), [b"b".as_slice(), b"c"]);
        assert_eq!(last_lines(b"a\nb\nc", 2), [b"b".as_slice(), b"c"]);
        assert_eq!(last_lines(b"a\n", 5), [b"a".as_slice()]);
        assert_eq!(last_lines(b"a\n\nb\n", 2), [b"".as_slice(), b"b"]);
        assert!(last_lines(b"a\nb\n", 0).is_empty());
        assert!(last_lines(b"", 3).is_empty());
    }

    #[test]
    fn the_tail_of_a_long_log_is_read_from_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        let body: String = (0..50_000).map(|i| format!("line {i}\n")).collect();
        write(&path, &body);
        let mut file = File::open(&path).unwrap();
        let end = read_end(&mut file, body.len() as u64, 3).unwrap();
        assert!(end.len() < 70 << 10, "read {} bytes for 3 lines", end.len());
        assert_eq!(last_lines(&end, 3), [b"line 49997".as_slice(), b"line 49998", b"line 49999"]);
        let all = read_end(&mut file, body.len() as u64, 60_000).unwrap();
        assert_eq!(all.len(), body.len());
    }

    #[test]
    fn one_service_is_unprefixed_several_are_prefixed() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("web.log"), "w1\nw2\nw3\n");
        write(&dir.path().join("db.log"), "d1\n");
        write(&dir.path().join("web.log.1"), "old\n");
        let mut out = Vec::new();
        Tail::new(select(dir.path(), Some("web")).unwrap()).print_last(2, false, &mut out).unwrap();
        assert_eq!(text(&out), "w2\nw3\n");
        let mut out = Vec::new();
        let all = select(dir.path(), None).unwrap();
        assert_eq!(all.iter().map(|l| l.service.as_str()).collect::<Vec<_>>(), ["db", "web"], "rotated files are not services");
        Tail::new(all).print_last(2, false, &mut out).unwrap();
        assert_eq!(text(&out), "db | d1\nweb | w2\nweb | w3\n");
    }

    #[test]
    fn an_unknown_service_is_an_error_naming_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("web.log"), "w\n");
        let e = select(dir.path(), Some("nope")).unwrap_err().to_string();
        assert!(e.starts_with("no log for service `nope` (no "), "{e}");
        assert!(e.contains("nope.log)"), "{e}");
        assert!(e.contains("services with logs: web"), "{e}");
        assert!(matches!(select(dir.path(), Some("../x")), Err(LogsError::BadName(_))));
        assert!(select(&dir.path().join("missing"), None).unwrap().is_empty());
    }

    #[test]
    fn following_prints_whole_appended_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        write(&path, "one\ntwo\nhal");
        let mut tail = Tail::new(select(dir.path(), Some("web")).unwrap());
        let mut out = Vec::new();
        tail.print_last(10, true, &mut out).unwrap();
        assert_eq!(text(&out), "one\ntwo\n", "the unfinished line waits");
        append(&path, "f\nthree\nfou");
        tail.poll(&mut out).unwrap();
        assert_eq!(text(&out), "one\ntwo\nhalf\nthree\n");
        append(&path, "r\n");
        tail.poll(&mut out).unwrap();
        assert_eq!(text(&out), "one\ntwo\nhalf\nthree\nfour\n");
        tail.poll(&mut out).unwrap();
        assert_eq!(text(&out), "one\ntwo\nhalf\nthree\nfour\n", "nothing new, nothing printed");
    }

    #[test]
    fn following_survives_rotation_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        write(&path, "a\n");
        let mut tail = Tail::new(select(dir.path(), Some("web")).unwrap());
        let mut out = Vec::new();
        tail.print_last(10, true, &mut out).unwrap();
        // The supervisor rotates by renaming; lines written just before still show, then the
        // new file from its start, even when it is already longer than the old one was.
        append(&path, "b\n");
        fs::rename(&path, dir.path().join("web.log.1")).unwrap();
        write(&path, "c-is-a-long-line\nd\n");
        tail.poll(&mut out).unwrap();
        assert_eq!(text(&out), "a\nb\nc-is-a-long-line\nd\n");
        // Truncated in place: the file shrinks, so it is read again from its start.
        write(&path, "e\n");
        tail.poll(&mut out).unwrap();
        assert_eq!(text(&out), "a\nb\nc-is-a-long-line\nd\ne\n");
    }

    #[test]
    fn follow_prints_what_another_process_appends_until_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        write(&path, "");
        let mut tail = Tail::new(select(dir.path(), None).unwrap());
        // What follow prints, seen by its stop condition too: it stops once all three lines
        // are out (or at a deadline no loaded machine reaches), not at a guess of how long
        // the writer takes.
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut out = Shared::default();
        tail.print_last(10, true, &mut out).unwrap();
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                for i in 0..3 {
                    append(&path, &format!("tick {i}\n"));
                    std::thread::sleep(Duration::from_millis(30));
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen = out.clone();
        let mut stop = || text(&seen.0.lock().unwrap()).lines().count() >= 3 || Instant::now() > deadline;
        tail.follow(&mut out, Duration::from_millis(10), &mut stop).unwrap();
        writer.join().unwrap();
        assert_eq!(text(&out.0.lock().unwrap()), "tick 0\ntick 1\ntick 2\n");
    }
}
