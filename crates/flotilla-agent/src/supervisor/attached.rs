//! Commands run for a deployer with their stdio attached to its connection (`flotilla exec`
//! over the agent protocol): spawned through the reaper like every child of the agent, as
//! root, in a session of their own, on pipes or a pseudo-terminal the caller made.
//!
//! A command's process group is signalled only while its leader has not been reaped, so a
//! late signal can never reach a group whose id the kernel has since given to another.

use std::os::fd::BorrowedFd;
use std::sync::Mutex;
use std::time::Duration;

use super::reaper::Child;
use super::sys::{self, Program, Stdio};
use super::{cstring, lock, ExitStatus, Result, Supervisor, SupervisorError, DEFAULT_PATH};

/// The descriptors an attached command gets as its stdin, stdout and stderr.
pub struct AttachedStdio<'a> {
    /// Becomes fd 0 (a terminal's slave: also the controlling terminal).
    pub stdin: BorrowedFd<'a>,
    /// Becomes fd 1.
    pub stdout: BorrowedFd<'a>,
    /// Becomes fd 2.
    pub stderr: BorrowedFd<'a>,
}

/// A running attached command; shared by the threads relaying its stdio.
pub struct Attached {
    pid: i32,
    /// The child until it is reaped, then how it ended.
    state: Mutex<(Child, Option<ExitStatus>)>,
}

/// How long a wait holds the lock that signals wait for.
const WAIT_SLICE: Duration = Duration::from_millis(50);

impl Attached {
    /// Its pid, which is also its process group and session.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// How it ended, if it did (without waiting).
    pub fn try_wait(&self) -> Option<ExitStatus> {
        let mut state = lock(&self.state);
        if state.1.is_none() {
            state.1 = state.0.wait_timeout(Duration::ZERO);
        }
        state.1
    }

    /// Waits until it has ended and been reaped.
    pub fn wait(&self) -> ExitStatus {
        loop {
            let mut state = lock(&self.state);
            if let Some(status) = state.1 {
                return status;
            }
            state.1 = state.0.wait_timeout(WAIT_SLICE);
        }
    }

    /// Sends `signal` to its whole process group, unless its leader has been reaped already.
    /// Returns whether the signal was sent.
    pub fn signal_group(&self, signal: i32) -> bool {
        let mut state = lock(&self.state);
        if state.1.is_none() {
            state.1 = state.0.wait_timeout(Duration::ZERO);
        }
        state.1.is_none() && sys::kill_group(self.pid, signal).is_ok()
    }
}

impl Supervisor {
    /// Starts `argv` as root inside the machine root, with `env` as its whole environment,
    /// in `cwd`, in a new session on `stdio` (with `tty`, fd 0 becomes its controlling
    /// terminal). A program without a `/` is looked up in [`DEFAULT_PATH`] as the machine
    /// sees it. Returns once the program has been exec'd.
    pub fn spawn_attached(&self, argv: &[String], env: &[(&str, String)], cwd: &str, stdio: AttachedStdio<'_>, tty: bool) -> Result<Attached> {
        let command = argv.join(" ");
        let invalid = |problem: String| SupervisorError::InvalidCommand { command: command.clone(), problem };
        let Some(program) = argv.first().filter(|p| !p.is_empty()) else {
            return Err(invalid("empty command line; give at least the program".into()));
        };
        let mut candidates: Vec<String> = if program.contains('/') {
            vec![program.clone()]
        } else {
            DEFAULT_PATH.split(':').map(|dir| format!("{dir}/{program}")).collect()
        };
        let path = candidates.remove(0);
        let c = |what: &str, v: &str| cstring(what, v).map_err(|e| invalid(e.to_string()));
        let program_c = Program {
            path: c("program", &path)?,
            search: candidates.iter().map(|p| c("program", p)).collect::<Result<_>>()?,
            controlling_tty: tty,
            argv: argv.iter().map(|a| c("argument", a)).collect::<Result<_>>()?,
            env: env.iter().map(|(k, v)| c("environment variable", &format!("{k}={v}"))).collect::<Result<_>>()?,
            chroot: self.chroot.clone(),
            cwd: c("working directory", cwd)?,
            creds: None,
        };
        let child = self
            .reaper
            .spawn(&program_c, &Stdio { stdin: stdio.stdin, stdout: stdio.stdout, stderr: stdio.stderr })
            .map_err(|f| match f.error.raw_os_error() {
                Some(libc::ENOENT | libc::ENOTDIR) if f.stage == sys::EXEC_STAGE => SupervisorError::ProgramNotFound {
                    program: program.clone(),
                    path: if program.contains('/') { None } else { Some(DEFAULT_PATH) },
                },
                _ => SupervisorError::CommandSpawn { command: command.clone(), stage: f.stage, source: f.error },
            })?;
        Ok(Attached { pid: child.pid, state: Mutex::new((child, None)) })
    }
}
