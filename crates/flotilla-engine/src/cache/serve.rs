//! `flotilla cache serve`: a Nix binary cache over HTTP, from a cache directory (what
//! `flotilla cache push` or `nix copy --to file://` wrote) or from this host's store.
//!
//! It is fast the way static file servers are: narinfos are answered from memory (each kept
//! as its whole response), NARs are the pre-compressed files sent from disk as they are by
//! `sendfile` (never re-encoded, never copied through the process), and nothing is spawned
//! per request. The HTTP server is a small one of our own on std's blocking sockets, a thread per
//! connection: measured in bench/cache.sh against nginx it meets the goal, and it keeps the
//! dependency tree to what the workspace already has (hyper with tokio would add a runtime
//! for a server that does one thing). Only the names Nix asks for are answered, each
//! validated (nix-base32 hash parts and file hashes); nothing outside the directory is ever
//! opened, a link in it is never followed.

mod http;
mod index;
mod store;
mod sys;

use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_store::cache::SecretKey;

use http::{Method, Next, RangeAnswer};
use index::{CacheDir, Prepared};
use store::StoreSource;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;
/// How long an idle keep-alive connection is kept (a request head, once begun, has
/// [`http::HEAD_DEADLINE`]).
const IDLE: Duration = Duration::from_secs(30);
/// How long a client may take to accept bytes before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stop waits for requests being answered.
const DRAIN: Duration = Duration::from_secs(10);

/// What to serve.
#[derive(Debug, Clone)]
pub enum Source {
    /// A cache directory.
    Dir(PathBuf),
    /// This host's store; NARs are compressed into `cache_dir` once.
    Store {
        /// Where compressed NARs and their narinfos are kept.
        cache_dir: PathBuf,
    },
}

/// `flotilla cache serve`'s options.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// What to serve.
    pub source: Source,
    /// Where to listen (`127.0.0.1:5000`, `[::]:80`).
    pub bind: String,
    /// The secret key narinfos are signed with as they are served.
    pub key: Option<PathBuf>,
    /// `Priority` in `nix-cache-info`, instead of the directory's.
    pub priority: Option<u32>,
    /// One line on stderr per request.
    pub verbose: bool,
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The cache directory cannot be served.
    #[error("cannot serve {path}: {reason}")]
    Dir {
        /// The directory or file.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// The key is unusable.
    #[error("--key: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `--store` without `--key`, or another wrong combination.
    #[error("{0}")]
    Usage(String),
    /// The address cannot be listened on.
    #[error("--bind {addr}: {reason}")]
    Bind {
        /// The address given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Nix's database cannot be read.
    #[error("--store: {0}; serve a cache directory instead (flotilla cache push DIR, then flotilla cache serve DIR)")]
    StoreDb(String),
}

/// The shared state of a running server.
struct Shared {
    cache: CacheDir,
    store: Option<StoreSource>,
    verbose: bool,
    stopping: AtomicBool,
    connections: AtomicUsize,
    answering: AtomicUsize,
}

/// A server bound to its address, its cache loaded, not yet answering.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Loads the key and the cache and binds the address; nothing is answered before
    /// [`Server::run`].
    pub fn open(opts: &ServeOptions) -> Result<Server, ServeError> {
        let key = opts.key.as_deref().map(read_key).transpose()?;
        let (cache, store) = match &opts.source {
            Source::Dir(dir) => (CacheDir::open(dir, key, opts.priority)?, None),
            Source::Store { cache_dir } => {
                if key.is_none() {
                    return Err(ServeError::Usage(
                        "flotilla cache serve --store needs --key FILE: Nix refuses paths no trusted key signed (make a key with `flotilla cache keygen NAME --out DIR`)".into(),
                    ));
                }
                let store = StoreSource::open(opts.verbose).map_err(ServeError::StoreDb)?;
                prepare_cache_dir(cache_dir)?;
                let cache = CacheDir::open(cache_dir, key, opts.priority)?;
                store::remove_leftovers(&cache);
                (cache, Some(store))
            }
        };
        let listener = TcpListener::bind(&opts.bind).map_err(|e| ServeError::Bind { addr: opts.bind.clone(), reason: format!("{e}; pick a free address, e.g. --bind 127.0.0.1:5000") })?;
        let shared = Shared { cache, store, verbose: opts.verbose, stopping: AtomicBool::new(false), connections: AtomicUsize::new(0), answering: AtomicUsize::new(0) };
        Ok(Server { listener, shared: Arc::new(shared) })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// How many narinfos it holds in memory now.
    pub fn narinfos(&self) -> usize {
        self.shared.cache.len()
    }

    /// Answers until SIGINT or SIGTERM, then stops accepting, lets the requests being answered
    /// finish (for up to 10 s) and returns the signal's name.
    pub fn run(self) -> io::Result<&'static str> {
        sys::block_stop_signals();
        let addr = self.local_addr()?;
        let signal = Arc::new(std::sync::OnceLock::new());
        {
            let (shared, signal) = (Arc::clone(&self.shared), Arc::clone(&signal));
            std::thread::Builder::new().name("signals".into()).spawn(move || {
                let _ = signal.set(sys::wait_stop_signal());
                shared.stopping.store(true, Ordering::SeqCst);
                // Wake the accept below.
                let _ = TcpStream::connect_timeout(&wake_address(addr), Duration::from_secs(1));
            })?;
        }
        for conn in self.listener.incoming() {
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            if self.shared.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                continue; // dropped: the client retries
            }
            self.shared.connections.fetch_add(1, Ordering::Relaxed);
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new().name("conn".into()).spawn(move || {
                shared.connection(conn);
                shared.connections.fetch_sub(1, Ordering::Relaxed);
            });
            if spawned.is_err() {
                self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let deadline = std::time::Instant::now() + DRAIN;
        while self.shared.answering.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(signal.get().copied().unwrap_or("a signal"))
    }
}

/// Where to connect to reach a listener on `addr` (an unspecified address is reached on
/// loopback).
fn wake_address(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// The secret key, read the one way every `--key` is (zeroized after use, the same hints).
fn read_key(path: &Path) -> Result<SecretKey, ServeError> {
    super::keys::read_secret_key(path).map_err(|e| ServeError::Key { path: path.to_owned(), reason: e.to_string() })
}

/// Makes `--store`'s cache directory (and its `nar/`) if missing, and refuses one that is a
/// link or that another user could write: the server writes files there and serves them.
fn prepare_cache_dir(dir: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    let err = |reason: String| ServeError::Dir { path: dir.to_owned(), reason };
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir.join("nar")).map_err(|e| err(e.to_string()))?;
    let me = std::fs::metadata("/proc/self").map_err(|e| err(e.to_string()))?.uid();
    for d in [dir.to_owned(), dir.join("nar")] {
        let meta = std::fs::symlink_metadata(&d).map_err(|e| err(e.to_string()))?;
        if !meta.is_dir() || meta.uid() != me || !index::private(&meta) {
            return Err(ServeError::Dir {
                path: d,
                reason: "is not a directory of this user's that only it can write; give --cache-dir a directory only you can write".into(),
            });
        }
    }
    Ok(())
}

/// What a request asks for.
enum Route<'a> {
    CacheInfo,
    NarInfo(&'a str),
    Nar(&'a str),
}

/// Only the names Nix asks for: anything else (`..`, `%2e`, other files) is not found.
fn route(target: &str) -> Option<Route<'_>> {
    if target == "/nix-cache-info" {
        return Some(Route::CacheInfo);
    }
    if let Some(hash) = target.strip_prefix('/').and_then(|t| t.strip_suffix(".narinfo")) {
        return index::valid_hash_part(hash).then_some(Route::NarInfo(hash));
    }
    let name = target.strip_prefix("/nar/")?;
    let stem = [".nar.zst", ".nar.xz", ".nar.bz2", ".nar"].iter().find_map(|ext| name.strip_suffix(ext))?;
    let ok = (32..=64).contains(&stem.len()) && stem.bytes().all(|b| flotilla_store::NIX_BASE32_CHARS.contains(&b));
    ok.then_some(Route::Nar(name))
}

const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nnot found\n";
const NOT_FOUND_HEAD_LEN: usize = NOT_FOUND.len() - 10;

impl Shared {
    fn connection(&self, mut conn: TcpStream) {
        let _ = conn.set_nodelay(true);
        let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
        let peer = conn.peer_addr().ok();
        let mut buf = Vec::with_capacity(1024);
        loop {
            let req = match http::read_request(&mut conn, &mut buf, IDLE) {
                Ok(Next::Request(r)) => r,
                Ok(Next::Closed) | Err(_) => return,
                Ok(Next::Refused(refusal)) => {
                    let _ = conn.write_all(refusal.response());
                    if self.verbose {
                        eprintln!("{} - {} (refused)", peer.map(|p| p.to_string()).unwrap_or_default(), refusal.status());
                    }
                    return;
                }
            };
            self.answering.fetch_add(1, Ordering::SeqCst);
            let answered = self.answer(&mut conn, &req);
            self.answering.fetch_sub(1, Ordering::SeqCst);
            if self.verbose {
                let (status, bytes) = answered.as_ref().map_or((0, 0), |a| *a);
                let method = if req.method == Method::Get { "GET" } else { "HEAD" };
                eprintln!("{} {method} {} {status} {bytes}", peer.map(|p| p.to_string()).unwrap_or_default(), req.target.escape_debug());
            }
            if answered.is_err() || !req.keep_alive || self.stopping.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// Answers one request; the status and body bytes sent, or an error after which the
    /// connection cannot be reused.
    fn answer(&self, conn: &mut TcpStream, req: &http::Request) -> io::Result<(u16, u64)> {
        let head = req.method == Method::Head;
        let prepared = |conn: &mut TcpStream, p: &Prepared| -> io::Result<(u16, u64)> {
            let n = if head { p.head_len } else { p.bytes.len() };
            conn.write_all(&p.bytes[..n])?;
            Ok((200, (n - p.head_len) as u64))
        };
        let not_found = |conn: &mut TcpStream| -> io::Result<(u16, u64)> {
            conn.write_all(if head { &NOT_FOUND[..NOT_FOUND_HEAD_LEN] } else { NOT_FOUND })?;
            Ok((404, 0))
        };
        match route(&req.target) {
            None => not_found(conn),
            Some(Route::CacheInfo) => prepared(conn, self.cache.cache_info()),
            Some(Route::NarInfo(hash)) => match self.narinfo(hash) {
                Some(p) => prepared(conn, &p),
                None => not_found(conn),
            },
            Some(Route::Nar(name)) => match self.cache.open_nar(name) {
                Some(file) => send_file(conn, file, req, head),
                None => not_found(conn),
            },
        }
    }

    fn narinfo(&self, hash: &str) -> Option<Arc<Prepared>> {
        if let Some(found) = self.cache.narinfo(hash) {
            return Some(found);
        }
        let store = self.store.as_ref()?;
        match store.fill(&self.cache, hash) {
            Ok(true) => self.cache.load(hash),
            Ok(false) => None,
            Err(e) => {
                eprintln!("warning: {e}");
                None
            }
        }
    }
}

fn send_file(conn: &mut TcpStream, file: std::fs::File, req: &http::Request, head: bool) -> io::Result<(u16, u64)> {
    let len = file.metadata()?.len();
    const TYPE: &str = "Content-Type: application/x-nix-nar\r\nAccept-Ranges: bytes";
    let (status, start, count) = match http::range(req.range.as_deref(), len) {
        RangeAnswer::Whole => {
            conn.write_all(format!("HTTP/1.1 200 OK\r\n{TYPE}\r\nContent-Length: {len}\r\n\r\n").as_bytes())?;
            (200, 0, len)
        }
        RangeAnswer::Part { start, end } => {
            let count = end - start + 1;
            conn.write_all(format!("HTTP/1.1 206 Partial Content\r\n{TYPE}\r\nContent-Range: bytes {start}-{end}/{len}\r\nContent-Length: {count}\r\n\r\n").as_bytes())?;
            (206, start, count)
        }
        RangeAnswer::Unsatisfiable => {
            conn.write_all(format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n\r\n").as_bytes())?;
            return Ok((416, 0));
        }
    };
    if head {
        return Ok((status, 0));
    }
    // File to socket as stored, inside the kernel.
    let sent = sys::send_file(conn, &file, start, count)?;
    if sent != count {
        // The file shrank under us: the length promised cannot be kept; close.
        return Err(io::Error::other("file shorter than its length"));
    }
    Ok((status, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_key_given_to_serve_key_says_so_as_push_does() {
        let dir = tempfile::tempdir().unwrap();
        let files = super::super::keys::keygen("serve-k", dir.path()).unwrap();
        assert!(read_key(&files.secret).is_ok());
        let err = read_key(&files.public).unwrap_err().to_string();
        assert!(err.starts_with("--key: the signing key") && err.contains("is a public key") && !err.contains(&files.public_key), "{err}");
        let err = read_key(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("cannot read the signing key") && err.contains("flotilla cache keygen"), "{err}");
    }

    #[test]
    fn only_the_names_nix_asks_for_are_routed() {
        let hash = "0".repeat(32);
        assert!(matches!(route("/nix-cache-info"), Some(Route::CacheInfo)));
        assert!(matches!(route(&format!("/{hash}.narinfo")), Some(Route::NarInfo(h)) if h == hash));
        let nar = format!("{}.nar.zst", "1".repeat(52));
        assert!(matches!(route(&format!("/nar/{nar}")), Some(Route::Nar(n)) if n == nar));
        for bad in [
            "/",
            "/nar/",
            "/../nix-cache-info",
            "/nix-cache-info?x",
            &format!("/{}.narinfo", "e".repeat(32)), // `e` is not nix-base32
            &format!("/{}.narinfo", "0".repeat(31)),
            &format!("/nar/../{hash}.narinfo"),
            &format!("/nar/%2e%2e%2f{}.nar", "1".repeat(52)),
            &format!("/nar/{}.nar.gz", "1".repeat(52)),
            &format!("/nar/x/{}.nar", "1".repeat(52)),
        ] {
            assert!(route(bad).is_none(), "{bad} was routed");
        }
    }
}
