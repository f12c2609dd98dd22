//! The smallest HTTP/1.1 client that fetches from a binary cache: `GET` over a plain
//! `TcpStream`, one request per connection, nothing else. It exists because the agent is
//! copied to every machine and must stay small and static: no TLS, no HTTP library, no DNS. A
//! cache is trusted through the signatures on what it serves, never through its transport, so
//! plain http loses nothing the agent relies on. Names are not resolved through glibc's NSS,
//! which a static binary can load only where the machine has the very glibc it was linked
//! with: a name is looked up in the machine's own `/etc/hosts` ([`Url::resolve`]), as health
//! checks' are, and an address literal needs nothing.
//!
//! It must never wait without a bound (every connect, read and write has a timeout, and the
//! whole exchange a deadline, so a server that trickles one byte at a time cannot hold it), never
//! read more than the caller's limit (a hostile or broken server cannot fill the machine's
//! memory or disk), and never follow a redirect (a cache names its files itself).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::machine::MachineRoot;

/// How long a connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a read or write may wait for one byte: the deployer waits this long beyond its
/// own timeout for the agent's next word.
pub const IO_TIMEOUT: Duration = flotilla_protocol::CACHE_TIMEOUT;

/// The most a response's status line and headers may take.
const MAX_HEAD: u64 = 64 << 10;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not `http://host[:port]/...`.
    #[error("{url} is not an http:// URL the agent can fetch ({why})")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        why: flotilla_store::cache::UrlProblem,
    },
    /// The server could not be reached at all (refused, unreachable, no answer to connect):
    /// the one failure that says the cache is down, rather than that one request failed.
    #[error("{url}: cannot connect: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        source: io::Error,
    },
    /// The exchange failed once connected (a read timed out, the deadline passed, the
    /// connection was cut).
    #[error("{url}: {source}")]
    Io {
        /// The URL.
        url: String,
        /// Why.
        source: io::Error,
    },
    /// The server's answer is not HTTP the client reads.
    #[error("{url}: the server's answer is not HTTP/1.x ({why})")]
    Malformed {
        /// The URL.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The body is longer than the caller allows.
    #[error("{url}: the answer is longer than {limit} bytes")]
    TooLong {
        /// The URL.
        url: String,
        /// The limit.
        limit: u64,
    },
}

/// A URL split into what a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `host[:port]`, for the `Host` header.
    pub authority: String,
    /// Host name or address.
    pub host: String,
    /// Port (80 unless given).
    pub port: u16,
    /// The path, starting with `/`.
    pub path: String,
    /// The host's address: the host itself when it is an address, else what [`Url::resolve`]
    /// found; `None` until then.
    pub ip: Option<IpAddr>,
}

impl Url {
    /// Parses `http://host[:port][/path]` with the parser the deployer checks
    /// `deploy.substituters` with ([`flotilla_store::cache::CacheUrl`]), so the two agree;
    /// anything else (https, user info, a fragment, a control character, port 0) is refused.
    pub fn parse(url: &str) -> Result<Url, HttpError> {
        let u = flotilla_store::cache::CacheUrl::parse(url).map_err(|why| HttpError::BadUrl { url: url.to_owned(), why })?;
        let ip = u.host.parse().ok();
        Ok(Url { authority: u.authority, host: u.host, port: u.port, path: u.path, ip })
    }

    /// Resolves the host through the machine's `/etc/hosts` (and `localhost`), never NSS.
    pub fn resolve(&mut self, root: &MachineRoot) {
        if self.ip.is_none() {
            self.ip = crate::health::resolve(root, &self.host);
        }
    }

    /// This URL with `rel` (a relative path such as `abc.narinfo` or `nar/x.nar.zst`) appended
    /// below its path.
    pub fn join(&self, rel: &str) -> Url {
        let base = self.path.trim_end_matches('/');
        Url { path: format!("{base}/{}", rel.trim_start_matches('/')), ..self.clone() }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// An answer: its status and its body, to be read to at most the caller's limit.
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body's length, when the server said it.
    pub content_length: Option<u64>,
    body: Body,
    url: String,
    limit: u64,
    read: u64,
}

enum Body {
    /// `Content-Length` bytes, or until the server closes.
    Plain(io::Take<BufReader<Deadlined>>),
    /// `Transfer-Encoding: chunked`: bytes left in the current chunk, or `None` at the end.
    Chunked(BufReader<Deadlined>, Option<u64>),
}

/// A connection whose every read waits at most [`IO_TIMEOUT`] and never past `deadline`: the
/// per-read timeout alone lets a server sending one byte every few seconds hold it forever.
struct Deadlined {
    stream: TcpStream,
    deadline: Instant,
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let too_slow = || io::Error::new(io::ErrorKind::TimedOut, "the server is too slow: the answer did not arrive by its deadline");
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_slow());
        }
        self.stream.set_read_timeout(Some(left.min(IO_TIMEOUT)))?;
        match self.stream.read(buf) {
            // A read timeout is EAGAIN: say which limit it was.
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Err(if Instant::now() >= self.deadline {
                too_slow()
            } else {
                io::Error::new(io::ErrorKind::TimedOut, format!("the server sent nothing for {} s", IO_TIMEOUT.as_secs()))
            }),
            r => r,
        }
    }
}

/// `GET url`; the body may hold at most `limit` bytes (reading more is an error), and the
/// whole answer must have arrived `within` from now.
pub fn get(url: &Url, limit: u64, within: Duration) -> Result<Response, HttpError> {
    let deadline = Instant::now() + within;
    let io_err = |source| HttpError::Io { url: url.to_string(), source };
    let connect_err = |source| HttpError::Connect { url: url.to_string(), source };
    let ip = url.ip.ok_or_else(|| {
        connect_err(io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {} through the machine's /etc/hosts; use an address or a name listed there", url.host)))
    })?;
    let stream = TcpStream::connect_timeout(&SocketAddr::new(ip, url.port), CONNECT_TIMEOUT).map_err(connect_err)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: flotilla-agent/{}\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n",
        url.path,
        url.authority,
        env!("CARGO_PKG_VERSION")
    );
    (&stream).write_all(request.as_bytes()).map_err(io_err)?;
    let mut reader = BufReader::new(Deadlined { stream, deadline });
    let malformed = |why: String| HttpError::Malformed { url: url.to_string(), why };
    let mut head = (&mut reader).take(MAX_HEAD);
    let mut line = String::new();
    head.read_line(&mut line).map_err(io_err)?;
    let mut words = line.split_whitespace();
    let status = match (words.next(), words.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.parse::<u16>().map_err(|_| malformed(format!("status line {:?}", line.trim_end())))?,
        _ => return Err(malformed(format!("status line {:?}", line.trim_end()))),
    };
    let (mut content_length, mut chunked) = (None, false);
    loop {
        line.clear();
        if head.read_line(&mut line).map_err(io_err)? == 0 {
            return Err(malformed("the headers do not end (or are longer than 64 KiB)".into()));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else { return Err(malformed(format!("header line {l:?}"))) };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<u64>().map_err(|_| malformed(format!("Content-Length {value:?}")))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
            if !chunked && !value.eq_ignore_ascii_case("identity") {
                return Err(malformed(format!("Transfer-Encoding {value:?}")));
            }
        }
    }
    if let Some(n) = content_length.filter(|n| *n > limit && !chunked) {
        let _ = n;
        return Err(HttpError::TooLong { url: url.to_string(), limit });
    }
    let body = if chunked {
        Body::Chunked(reader, Some(0))
    } else {
        // Without a length the body ends when the server closes (Connection: close).
        Body::Plain(reader.take(content_length.unwrap_or(limit.saturating_add(1))))
    };
    Ok(Response { status, content_length: content_length.filter(|_| !chunked), body, url: url.to_string(), limit, read: 0 })
}

impl Response {
    /// Reads the whole body into memory (for small answers: narinfo, nix-cache-info).
    pub fn text(mut self) -> Result<String, HttpError> {
        let mut buf = Vec::new();
        self.read_to_end(&mut buf).map_err(|source| self.error(source))?;
        String::from_utf8(buf).map_err(|_| HttpError::Malformed { url: self.url.clone(), why: "the body is not UTF-8 text".into() })
    }

    /// The error for a failed read of this body.
    pub fn error(&self, source: io::Error) -> HttpError {
        if self.read > self.limit {
            return HttpError::TooLong { url: self.url.clone(), limit: self.limit };
        }
        HttpError::Io { url: self.url.clone(), source }
    }

    fn read_chunked(reader: &mut BufReader<Deadlined>, left: &mut Option<u64>, buf: &mut [u8]) -> io::Result<usize> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunked encoding: {what}"));
        loop {
            match *left {
                None => return Ok(0),
                Some(0) => {
                    let mut line = String::new();
                    (&mut *reader).take(1024).read_line(&mut line)?;
                    let size = line.trim_end_matches(['\r', '\n']);
                    if size.is_empty() {
                        // The CRLF after the previous chunk's data.
                        line.clear();
                        (&mut *reader).take(1024).read_line(&mut line)?;
                    }
                    let size = line.trim_end_matches(['\r', '\n']).split(';').next().unwrap_or("").trim();
                    let n = u64::from_str_radix(size, 16).map_err(|_| bad("a chunk size is not hexadecimal"))?;
                    if n == 0 {
                        *left = None;
                        return Ok(0);
                    }
                    *left = Some(n);
                }
                Some(n) => {
                    let want = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    let got = reader.read(&mut buf[..want])?;
                    if got == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection inside a chunk"));
                    }
                    *left = Some(n - got as u64);
                    return Ok(got);
                }
            }
        }
    }
}

impl Read for Response {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match &mut self.body {
            Body::Plain(r) => r.read(buf)?,
            Body::Chunked(r, left) => Response::read_chunked(r, left, buf)?,
        };
        if n == 0 {
            if let Some(len) = self.content_length.filter(|len| self.read < *len) {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("the server closed the connection after {} of {len} bytes", self.read)));
            }
        }
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("the answer is longer than {} bytes", self.limit)));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const T: Duration = Duration::from_secs(10);

    /// A server on 127.0.0.1 that answers one connection with `answer`, and what it was asked.
    fn serve_once(answer: &'static [u8]) -> (Url, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut asked = Vec::new();
            let mut buf = [0u8; 1024];
            while !asked.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                asked.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer).unwrap();
            String::from_utf8(asked).unwrap()
        });
        (Url::parse(&format!("http://127.0.0.1:{port}/cache")).unwrap(), t)
    }

    #[test]
    fn urls_are_plain_http_with_a_host() {
        let u = Url::parse("http://10.0.0.1:8080/cache/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("10.0.0.1", 8080, "/cache/"));
        assert_eq!(u.join("x.narinfo").to_string(), "http://10.0.0.1:8080/cache/x.narinfo");
        assert_eq!(Url::parse("http://cache").unwrap().join("nar/a.nar.zst").path, "/nar/a.nar.zst");
        assert_eq!(Url::parse("http://[::1]:81/").unwrap().host, "::1");
        for bad in ["https://cache/", "http://", "http://u@cache/", "http://cache:x/", "http://cache/a b", "ftp://x/"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_body_with_a_length_is_read_and_the_request_is_one_get() {
        let (url, server) = serve_once(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        let r = get(&url.join("a.narinfo"), 100, T).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text().unwrap(), "hello");
        let asked = server.join().unwrap();
        assert!(asked.starts_with("GET /cache/a.narinfo HTTP/1.1\r\nHost: 127.0.0.1:"), "{asked}");
    }

    #[test]
    fn a_chunked_body_is_read_whole() {
        let (url, _server) = serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n");
        assert_eq!(get(&url, 100, T).unwrap().text().unwrap(), "hello");
    }

    #[test]
    fn a_body_longer_than_the_limit_is_refused_whether_announced_or_not() {
        let (url, _s) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n01234567890123456789012345678901234567890123456789");
        assert!(matches!(get(&url, 10, T), Err(HttpError::TooLong { .. })));
        let (url, _s) = serve_once(b"HTTP/1.0 200 OK\r\n\r\n01234567890123456789012345678901234567890123456789");
        let r = get(&url, 10, T).unwrap();
        assert!(matches!(r.text(), Err(HttpError::TooLong { .. })));
    }

    #[test]
    fn a_body_cut_short_is_an_error_not_short_data() {
        let (url, _s) = serve_once(b"HTTP/1.0 200 OK\r\nContent-Length: 50\r\n\r\nshort");
        assert!(get(&url, 100, T).unwrap().text().is_err());
    }

    #[test]
    fn nothing_listening_is_an_io_error() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(matches!(get(&Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap(), 10, T), Err(HttpError::Connect { .. })));
    }

    #[test]
    fn a_server_trickling_bytes_is_cut_off_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
            // One header byte every 200 ms: each read is quick, the whole never ends.
            while s.write_all(b"X").is_ok() {
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let start = Instant::now();
        let e = get(&Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap(), 10, Duration::from_secs(1)).err().expect("a trickle is an error");
        assert!(matches!(e, HttpError::Io { .. }) && e.to_string().contains("too slow"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(3), "gave up after {:?}", start.elapsed());
    }
}
