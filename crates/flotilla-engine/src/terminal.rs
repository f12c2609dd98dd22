//! The deployer's own terminal, for a command run with one on a machine over the agent
//! protocol (`flotilla agent-exec --tty`): its size, and raw mode while the command runs so
//! that every key (Ctrl-C included) goes to the machine's terminal, not to this process.
//! std has no termios; the calls are here, and only here.
//!
//! It must never leave the terminal raw: [`RawMode`] restores what it saved when dropped,
//! which every return and every unwinding panic does.
#![allow(unsafe_code)] // tcgetattr/tcsetattr/ioctl(TIOCGWINSZ) on a descriptor the caller owns

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The terminal's size as (rows, cols), if `fd` is a terminal that has one.
pub fn size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; all-zero is valid, and TIOCGWINSZ writes one there.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: `ws` lives on this frame for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// A terminal in raw mode until this is dropped, when its settings before are restored.
pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Puts the terminal `fd` in raw mode (as `cfmakeraw`); the caller keeps `fd` open for
    /// as long as this lives.
    pub fn enable(fd: BorrowedFd<'_>) -> io::Result<RawMode> {
        let fd = fd.as_raw_fd();
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` lives on this frame for the call.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` lives on this frame for the call.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same descriptor; TCSADRAIN lets the
        // command's last output reach the screen first.
        unsafe { libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved) };
    }
}
