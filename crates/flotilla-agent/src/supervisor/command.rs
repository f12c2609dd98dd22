//! One-off commands (health checks) run through the reaper, so that code outside the
//! supervisor never needs `std::process` (whose `wait` would race the reaper for the status).
//!
//! A command must never outlive its timeout: on expiry its whole process group is killed.
//! Its output is captured up to a bound, never without limit.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::reaper::Reaper;
use super::sys::{self, Program, Stdio};
use super::{cstring, ExitStatus, Result, SupervisorError, DEFAULT_PATH};

/// Output kept per stream; the rest is read and dropped so the command never blocks.
const CAPTURE_LIMIT: usize = 1 << 20;

/// What a one-off command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output (at most 1 MiB).
    pub stdout: Vec<u8>,
    /// Its standard error (at most 1 MiB).
    pub stderr: Vec<u8>,
}

pub(super) fn run(
    reaper: &Reaper,
    chroot: Option<CString>,
    root: &Path,
    argv: &[String],
    timeout: Duration,
    input: Option<&Path>,
) -> Result<CommandOutput> {
    let command = argv.join(" ");
    let invalid = |problem: String| SupervisorError::InvalidCommand { command: command.clone(), problem };
    let spawn_err =
        |stage, source| SupervisorError::CommandSpawn { command: argv.join(" "), stage, source };
    match argv.first() {
        None => return Err(invalid("empty command line; give at least the program".into())),
        Some(p) if !p.starts_with('/') => {
            return Err(invalid(format!("program {p:?} is not an absolute path; give its full path")))
        }
        Some(_) => {}
    }
    let program = Program {
        path: cstring("program", &argv[0]).map_err(|e| invalid(e.to_string()))?,
        search: Vec::new(),
        controlling_tty: false,
        argv: argv.iter().map(|a| cstring("argument", a)).collect::<std::result::Result<_, _>>().map_err(|e| invalid(e.to_string()))?,
        env: vec![cstring("PATH", &format!("PATH={DEFAULT_PATH}")).map_err(|e| invalid(e.to_string()))?],
        chroot,
        cwd: c"/".to_owned(),
        creds: None,
    };
    let dev_null = root.join("dev/null");
    if let Some(file) = input {
        // The input must be readable, or the command would read nothing and look fine.
        File::open(file).map_err(|e| spawn_err("opening the input file", e))?;
    }
    let stdin: OwnedFd = match File::open(input.unwrap_or(&dev_null)) {
        Ok(f) => f.into(),
        Err(_) => sys::pipe().map_err(|e| spawn_err("creating the stdin pipe", e))?.0,
    };
    let (out_r, out_w) = sys::pipe().map_err(|e| spawn_err("creating the stdout pipe", e))?;
    let (err_r, err_w) = sys::pipe().map_err(|e| spawn_err("creating the stderr pipe", e))?;
    let deadline = Instant::now() + timeout;
    let child = reaper
        .spawn(&program, &Stdio { stdin: stdin.as_fd(), stdout: out_w.as_fd(), stderr: err_w.as_fd() })
        .map_err(|f| spawn_err(f.stage, f.error))?;
    drop((stdin, out_w, err_w));

    // Whatever ends the wait early, the command's process group goes with it.
    let kill = || {
        let _ = sys::kill_group(child.pid, libc::SIGKILL);
        child.wait_timeout(Duration::from_secs(5));
    };
    let timed_out = || {
        kill();
        SupervisorError::CommandTimeout { command: command.clone(), timeout }
    };
    let mut streams = [(Some(File::from(out_r)), Vec::new()), (Some(File::from(err_r)), Vec::new())];
    let mut buf = vec![0u8; 64 * 1024];
    while streams.iter().any(|(f, _)| f.is_some()) {
        let now = Instant::now();
        if now >= deadline {
            return Err(timed_out());
        }
        let open: Vec<usize> = (0..2).filter(|i| streams[*i].0.is_some()).collect();
        let fds: Vec<_> = open.iter().map(|i| streams[*i].0.as_ref().map(|f| f.as_fd())).collect();
        let fds: Vec<_> = fds.into_iter().flatten().collect();
        let ready = sys::poll_readable(&fds, deadline - now).map_err(|e| {
            kill();
            spawn_err("polling its output", e)
        })?;
        for (i, is_ready) in open.into_iter().zip(ready) {
            if !is_ready {
                continue;
            }
            let (file, captured) = &mut streams[i];
            match file.as_mut().map(|f| f.read(&mut buf)) {
                Some(Ok(0)) | Some(Err(_)) | None => *file = None,
                Some(Ok(n)) => {
                    let keep = n.min(CAPTURE_LIMIT.saturating_sub(captured.len()));
                    captured.extend_from_slice(&buf[..keep]);
                }
            }
        }
    }
    let status = child.wait_timeout(deadline.saturating_duration_since(Instant::now())).ok_or_else(timed_out)?;
    let [(_, stdout), (_, stderr)] = streams;
    Ok(CommandOutput { status, stdout, stderr })
}
