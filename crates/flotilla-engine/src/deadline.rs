//! Deadlines on the deployer's side of a conversation with an agent. A stopped (SIGSTOP),
//! wedged or vanished agent must never hang `info`, `check` or `deploy` (and with it the
//! deployment's lock): every byte the deployer reads from or writes to an agent waits at most
//! until the deadline of the request it belongs to. This is the one place that enforces it,
//! for every transport that is a file descriptor (a unix socket, ssh's pipes): the descriptor
//! is made non-blocking and each read or write that would block waits in `poll(2)` for the
//! time left.
//!
//! Two kinds of limit: a request that must be answered by a point in time
//! ([`Limit::Within`]), and a bulk copy that may run as long as it moves bytes
//! ([`Limit::Stall`]: no byte in either direction for that long is the end). The [`Watch`]
//! shared by a connection's reader and writer also remembers how the transport failed (it
//! timed out, or the agent closed it), so the client can say that in words instead of the
//! error of whatever layer happened to notice (e.g. a NAR encoder's "Broken pipe").
//!
//! It must never busy-wait and never leave a descriptor blocking half the time.
#![allow(unsafe_code)] // poll(2) and fcntl(2) on descriptors this module's wrappers own

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long the transport may wait for the agent now.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Limit {
    /// Everything up to the answer must be done by this instant; `allowed` is the time the
    /// request was given, for the message.
    Within { until: Instant, allowed: Duration },
    /// Any single wait for the agent (to take bytes or send them) may last this long.
    Stall(Duration),
}

impl Limit {
    /// A request given `allowed` from now.
    pub(crate) fn from_now(allowed: Duration) -> Limit {
        Limit::Within { until: Instant::now() + allowed, allowed }
    }

    /// How long the transport waited when the limit was reached.
    pub(crate) fn waited(self) -> Duration {
        match self {
            Limit::Within { allowed, .. } => allowed,
            Limit::Stall(d) => d,
        }
    }
}

/// What ended a transport, as far as this side can tell.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// The limit was reached while waiting for the agent.
    TimedOut(Limit),
    /// The agent closed the connection (end of stream, a broken pipe, a reset).
    PeerGone,
}

/// The limit and the fault of one connection, shared by its reader and writer.
#[derive(Debug)]
pub(crate) struct Watch {
    state: Mutex<(Limit, Option<Fault>)>,
}

impl Watch {
    /// A watch starting with `limit`.
    pub(crate) fn new(limit: Limit) -> Arc<Watch> {
        Arc::new(Watch { state: Mutex::new((limit, None)) })
    }

    /// Sets the limit for what comes next.
    pub(crate) fn set(&self, limit: Limit) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).0 = limit;
    }

    /// How the transport failed, if it did.
    pub(crate) fn fault(&self) -> Option<Fault> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).1
    }

    fn limit(&self) -> Limit {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).0
    }

    fn note(&self, fault: Fault) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.1.get_or_insert(fault); // the first fault is the cause; later ones follow from it
    }

    fn note_error(&self, e: &io::Error) {
        if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) {
            self.note(Fault::PeerGone);
        }
    }

    /// Waits until `fd` is ready for `events` or the limit is reached.
    fn wait(&self, fd: std::os::fd::BorrowedFd<'_>, events: libc::c_short) -> io::Result<()> {
        loop {
            let limit = self.limit();
            let left = match limit {
                Limit::Within { until, .. } => until.saturating_duration_since(Instant::now()),
                Limit::Stall(d) => d,
            };
            if left.is_zero() {
                self.note(Fault::TimedOut(limit));
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the agent did not answer in time"));
            }
            let ms = i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX);
            let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
            // SAFETY: one pollfd that lives on this stack frame for the call; the descriptor
            // is borrowed from its owner for that time.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            match rc {
                0 if matches!(limit, Limit::Stall(_)) => {
                    self.note(Fault::TimedOut(limit));
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "the agent moved no data in time"));
                }
                0 => continue, // the next turn finds no time left
                r if r < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                _ => return Ok(()), // ready, or hung up: the read or write says which
            }
        }
    }
}

/// A reader or writer whose waits for the agent are bounded by a [`Watch`].
pub(crate) struct Timed<T> {
    inner: T,
    watch: Arc<Watch>,
}

impl<T: AsFd> Timed<T> {
    /// Wraps `inner`, making its descriptor non-blocking.
    pub(crate) fn new(inner: T, watch: Arc<Watch>) -> io::Result<Timed<T>> {
        let fd = inner.as_fd().as_raw_fd();
        // SAFETY: fcntl on a descriptor `inner` owns, reading then setting its status flags.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Timed { inner, watch })
    }
}

impl<T: Read + AsFd> Read for Timed<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(0) if !buf.is_empty() => {
                    self.watch.note(Fault::PeerGone);
                    return Ok(0);
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.watch.wait(self.inner.as_fd(), libc::POLLIN)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.watch.note_error(&e);
                    return Err(e);
                }
            }
        }
    }
}

impl<T: Write + AsFd> Write for Timed<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.inner.write(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.watch.wait(self.inner.as_fd(), libc::POLLOUT)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.watch.note_error(&e);
                    return Err(e);
                }
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_silent_peer_ends_a_read_at_the_deadline() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let watch = Watch::new(Limit::from_now(Duration::from_millis(200)));
        let mut r = Timed::new(ours, Arc::clone(&watch)).unwrap();
        let start = Instant::now();
        let e = r.read(&mut [0; 8]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
        assert!(matches!(watch.fault(), Some(Fault::TimedOut(_))));
    }

    #[test]
    fn a_peer_that_stops_reading_ends_a_write_after_the_stall() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let watch = Watch::new(Limit::Stall(Duration::from_millis(200)));
        let mut w = Timed::new(ours, Arc::clone(&watch)).unwrap();
        let e = w.write_all(&vec![0; 64 << 20]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(matches!(watch.fault(), Some(Fault::TimedOut(Limit::Stall(_)))));
    }

    #[test]
    fn a_closed_peer_is_told_apart_from_a_slow_one() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let watch = Watch::new(Limit::Stall(Duration::from_secs(5)));
        let mut w = Timed::new(ours, Arc::clone(&watch)).unwrap();
        assert!(w.write_all(&[0; 1024]).is_err());
        assert!(matches!(watch.fault(), Some(Fault::PeerGone)));
    }
}
