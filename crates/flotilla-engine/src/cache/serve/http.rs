//! Just enough HTTP/1.1 for Nix's binary-cache protocol: GET and HEAD, keep-alive (and
//! pipelining, since a connection's unread bytes stay in its buffer), a single byte range.
//! What a peer sends is bounded (a request head is at most [`MAX_HEAD`] bytes) and never
//! trusted: a request with a body, an unknown method or a malformed line gets its error and
//! the connection is closed. Nor is it waited for forever: a request head must be complete
//! within [`HEAD_DEADLINE`] of its first byte, however slowly each byte comes (a per-read
//! timeout alone lets a client sending a byte a second hold a thread indefinitely).

use std::io::{self, Read};
use std::time::{Duration, Instant};

/// The largest request head (request line and headers) read; past it, 431.
pub(super) const MAX_HEAD: usize = 16 * 1024;

/// How long a client has, from a request's first byte, to send the whole request head.
pub(super) const HEAD_DEADLINE: Duration = Duration::from_secs(10);

/// A connection a request is read from: its read timeout can be set before each read.
pub(super) trait Conn: Read {
    /// Bounds the next reads to `timeout`.
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()>;
}

impl Conn for std::net::TcpStream {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

impl Conn for &[u8] {
    fn set_timeout(&mut self, _: Duration) -> io::Result<()> {
        Ok(())
    }
}

/// GET or HEAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Method {
    Get,
    Head,
}

/// One parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Request {
    pub method: Method,
    /// The request target as sent (origin form: starts with `/`).
    pub target: String,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
    /// The `Range` header, if any.
    pub range: Option<String>,
}

/// Why a request cannot be answered: the status to send before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    BadRequest,
    MethodNotAllowed,
    HeadTooLarge,
    NotImplemented,
    /// The request head did not arrive within [`HEAD_DEADLINE`].
    TooSlow,
}

impl Refusal {
    /// The whole response, which closes the connection.
    pub(super) fn response(self) -> &'static [u8] {
        match self {
            Refusal::BadRequest => b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nbad request\n",
            Refusal::MethodNotAllowed => b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Type: text/plain\r\nContent-Length: 19\r\nConnection: close\r\n\r\nonly GET and HEAD.\n",
            Refusal::HeadTooLarge => b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Refusal::NotImplemented => b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Refusal::TooSlow => b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        }
    }

    /// The status code, for the log.
    pub(super) fn status(self) -> u16 {
        match self {
            Refusal::BadRequest => 400,
            Refusal::MethodNotAllowed => 405,
            Refusal::HeadTooLarge => 431,
            Refusal::NotImplemented => 501,
            Refusal::TooSlow => 408,
        }
    }
}

/// What reading the next request gave.
pub(super) enum Next {
    Request(Request),
    /// The peer closed (or went idle past the timeout) between requests.
    Closed,
    Refused(Refusal),
}

/// Reads the next request head from `conn` into `buf` (which keeps bytes past it for the next
/// call) and parses it. Between requests the connection may stay quiet for `idle`; once a
/// request's first byte is here, its whole head must follow within [`HEAD_DEADLINE`].
pub(super) fn read_request(conn: &mut impl Conn, buf: &mut Vec<u8>, idle: Duration) -> io::Result<Next> {
    let mut scanned = 0;
    // Pipelined bytes already here start the clock at once.
    let mut started = (!buf.is_empty()).then(Instant::now);
    loop {
        if let Some(end) = find_head_end(buf, scanned) {
            let parsed = parse_head(&buf[..end]);
            buf.drain(..end + 4);
            return Ok(match parsed {
                Ok(r) => Next::Request(r),
                Err(e) => Next::Refused(e),
            });
        }
        if buf.len() >= MAX_HEAD {
            return Ok(Next::Refused(Refusal::HeadTooLarge));
        }
        scanned = buf.len().saturating_sub(3);
        let timeout = match started {
            None => idle,
            Some(t0) => match HEAD_DEADLINE.checked_sub(t0.elapsed()) {
                Some(left) if !left.is_zero() => left,
                _ => return Ok(Next::Refused(Refusal::TooSlow)),
            },
        };
        conn.set_timeout(timeout)?;
        let mut chunk = [0u8; 4096];
        let n = match conn.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) && buf.is_empty() => return Ok(Next::Closed),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(Next::Refused(Refusal::TooSlow)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(if buf.is_empty() { Next::Closed } else { Next::Refused(Refusal::BadRequest) });
        }
        buf.extend_from_slice(&chunk[..n]);
        started.get_or_insert_with(Instant::now);
    }
}

fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + from)
}

fn parse_head(head: &[u8]) -> Result<Request, Refusal> {
    let head = std::str::from_utf8(head).map_err(|_| Refusal::BadRequest)?;
    let mut lines = head.split("\r\n");
    let line = lines.next().ok_or(Refusal::BadRequest)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(Refusal::BadRequest);
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(Refusal::BadRequest),
    };
    if !target.starts_with('/') {
        return Err(Refusal::BadRequest);
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => return Err(Refusal::MethodNotAllowed),
        _ => return Err(Refusal::BadRequest),
    };
    let mut keep_alive = http11;
    let mut range = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(Refusal::BadRequest)?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(Refusal::BadRequest);
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("connection") {
            // Only HTTP/1.1's default (keep-alive) is kept; a 1.0 client is answered and closed.
            if value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) {
                keep_alive = false;
            }
        } else if name.eq_ignore_ascii_case("range") {
            range = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Refusal::NotImplemented);
        } else if name.eq_ignore_ascii_case("content-length") && value != "0" {
            // GET and HEAD carry no body; reading one would let a peer desynchronise the stream.
            return Err(Refusal::BadRequest);
        }
    }
    Ok(Request { method, target: target.to_owned(), keep_alive, range })
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RangeAnswer {
    /// The whole file (no range, or one this server ignores, as RFC 9110 allows).
    Whole,
    /// Bytes `start..=end`.
    Part { start: u64, end: u64 },
    /// No byte of it exists: 416.
    Unsatisfiable,
}

/// Reads a single `bytes=` range; several ranges, other units and malformed values are served
/// whole.
pub(super) fn range(header: Option<&str>, len: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return RangeAnswer::Whole };
    if spec.contains(',') {
        return RangeAnswer::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeAnswer::Whole };
    let num = |s: &str| if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) { s.parse::<u64>().ok() } else { None };
    match (a.is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Part { start: len.saturating_sub(n), end: len - 1 }
            }
        }
        (false, Some(start), end) if b.is_empty() || end.is_some() => {
            if start >= len {
                return RangeAnswer::Unsatisfiable;
            }
            match end {
                Some(end) if end < start => RangeAnswer::Whole,
                Some(end) => RangeAnswer::Part { start, end: end.min(len - 1) },
                None => RangeAnswer::Part { start, end: len - 1 },
            }
        }
        _ => RangeAnswer::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Next {
        let mut buf = Vec::new();
        read_request(&mut text.as_bytes(), &mut buf, Duration::from_secs(1)).unwrap()
    }

    #[test]
    fn pipelined_requests_are_read_one_at_a_time() {
        let mut input: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /b HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut buf = Vec::new();
        let Next::Request(a) = read_request(&mut input, &mut buf, Duration::from_secs(1)).unwrap() else { panic!() };
        assert_eq!((a.method, a.target.as_str(), a.keep_alive), (Method::Get, "/a", true));
        let Next::Request(b) = read_request(&mut input, &mut buf, Duration::from_secs(1)).unwrap() else { panic!() };
        assert_eq!((b.method, b.target.as_str(), b.keep_alive), (Method::Head, "/b", false));
        assert!(matches!(read_request(&mut input, &mut buf, Duration::from_secs(1)).unwrap(), Next::Closed));
    }

    #[test]
    fn bodies_methods_and_garbage_are_refused() {
        assert!(matches!(parse("POST / HTTP/1.1\r\n\r\n"), Next::Refused(Refusal::MethodNotAllowed)));
        assert!(matches!(parse("GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"), Next::Refused(Refusal::BadRequest)));
        assert!(matches!(parse("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Next::Refused(Refusal::NotImplemented)));
        assert!(matches!(parse("GET http://x/ HTTP/1.1\r\n\r\n"), Next::Refused(Refusal::BadRequest)));
        assert!(matches!(parse("GET / HTTP/2\r\n\r\n"), Next::Refused(Refusal::BadRequest)));
        assert!(matches!(parse("GET /"), Next::Refused(Refusal::BadRequest)));
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(parse(&huge), Next::Refused(Refusal::HeadTooLarge)));
        let Next::Request(r) = parse("GET / HTTP/1.0\r\n\r\n") else { panic!() };
        assert!(!r.keep_alive, "HTTP/1.0 closes");
    }

    #[test]
    fn ranges() {
        use RangeAnswer::*;
        assert_eq!(range(None, 10), Whole);
        assert_eq!(range(Some("bytes=0-3"), 10), Part { start: 0, end: 3 });
        assert_eq!(range(Some("bytes=4-"), 10), Part { start: 4, end: 9 });
        assert_eq!(range(Some("bytes=-3"), 10), Part { start: 7, end: 9 });
        assert_eq!(range(Some("bytes=-30"), 10), Part { start: 0, end: 9 });
        assert_eq!(range(Some("bytes=5-100"), 10), Part { start: 5, end: 9 });
        assert_eq!(range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(range(Some("bytes=0-1,3-4"), 10), Whole);
        assert_eq!(range(Some("items=0-1"), 10), Whole);
        assert_eq!(range(Some("bytes=x-1"), 10), Whole);
        assert_eq!(range(Some("bytes=5-2"), 10), Whole);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a peer sends, reading it ends in a request, a refusal or a close: no panic,
        /// and no more buffered than one head.
        #[test]
        fn any_bytes_are_read_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut input: &[u8] = &bytes;
            let mut buf = Vec::new();
            for _ in 0..64 {
                match read_request(&mut input, &mut buf, Duration::from_secs(1)).unwrap() {
                    Next::Request(r) => prop_assert!(r.target.starts_with('/')),
                    Next::Closed | Next::Refused(_) => break,
                }
            }
        }

        /// A range answered is always inside the file.
        #[test]
        fn ranges_stay_inside_the_file(header in "bytes=[0-9]{0,6}-[0-9]{0,6}", len in 0u64..1_000_000) {
            if let RangeAnswer::Part { start, end } = range(Some(&header), len) {
                prop_assert!(start <= end && end < len);
            }
        }
    }
}
