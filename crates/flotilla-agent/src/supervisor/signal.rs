//! SIGTERM and SIGINT turned into something a thread can wait for, so `flotilla-agent init`
//! can stop every service cleanly when its container or the operator tells it to.
//!
//! As PID 1 the agent gets no default action for these signals: without a handler they are
//! ignored, so installing this is what makes the agent stoppable at all. The handler only
//! writes a byte to a pipe; all real work happens in the waiting thread. It must never do more.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{lock, sys, Result, SupervisorError};

/// Which termination signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminationKind {
    /// SIGTERM.
    Terminate,
    /// SIGINT.
    Interrupt,
}

/// A handle on the process's SIGTERM/SIGINT handler; clones share one queue of signals.
#[derive(Debug, Clone)]
pub struct TerminationSignal {
    pipe: Arc<Mutex<File>>,
}

static INSTALLED: OnceLock<TerminationSignal> = OnceLock::new();

/// Installs the SIGTERM/SIGINT handler (once per process; later calls return the same handle).
pub fn install_termination_handler() -> Result<TerminationSignal> {
    if let Some(installed) = INSTALLED.get() {
        return Ok(installed.clone());
    }
    let system = |source| SupervisorError::System { what: "installing the SIGTERM/SIGINT handler", source };
    // Two threads racing here would each install a pipe; the lock keeps it to one.
    static INSTALLING: Mutex<()> = Mutex::new(());
    let _guard = lock(&INSTALLING);
    if let Some(installed) = INSTALLED.get() {
        return Ok(installed.clone());
    }
    let (read, write): (OwnedFd, OwnedFd) = sys::pipe().map_err(system)?;
    sys::install_termination_handler(write).map_err(system)?;
    let signal = TerminationSignal { pipe: Arc::new(Mutex::new(File::from(read))) };
    Ok(INSTALLED.get_or_init(|| signal).clone())
}

impl TerminationSignal {
    /// Blocks until SIGTERM or SIGINT arrives (or has arrived since the last wait).
    pub fn wait(&self) -> TerminationKind {
        loop {
            if let Some(kind) = self.wait_timeout(Duration::from_secs(3600)) {
                return kind;
            }
        }
    }

    /// Like `wait`, giving up after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<TerminationKind> {
        let deadline = Instant::now() + timeout;
        let mut pipe = lock(&self.pipe);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ready = sys::poll_readable(&[pipe.as_fd()], left).ok()?;
            if ready.first() == Some(&true) {
                let mut byte = [0u8];
                if let Ok(1) = pipe.read(&mut byte) {
                    return Some(if i32::from(byte[0]) == libc::SIGINT {
                        TerminationKind::Interrupt
                    } else {
                        TerminationKind::Terminate
                    });
                }
            }
            if left.is_zero() {
                return None;
            }
        }
    }
}
