//! Fetching store paths from binary caches on the machine itself (`Request::Substitute`), so
//! a fleet's machines do not all wait on the deployer's uplink: what colmena and deploy-rs
//! call substituting on the destination.
//!
//! A path is accepted only when all of this holds: a cache's narinfo names it; it is signed by
//! one of the keys the deployer sent (Nix's fingerprint, [`trusted_signer`]); its NAR hash,
//! size and references are the ones the deployer's own store has (so the machine gets exactly
//! what was built and tested, whatever else a trusted key signed); the compressed file has the
//! narinfo's `FileSize` and `FileHash` when given; and the NAR unpacks to that hash. The
//! unpacking is [`MachineRoot::receive`], the one crash-safe receive `AddPaths` uses (temporary
//! name, hash and size checked, rename, registration), fed one path at a time, a few paths side
//! by side ([`PARALLEL`]), a path started only once everything it refers to is valid; the
//! machine's Nix (if it has one) is told about them all at the end, as after `AddPaths`.
//!
//! It must never leave anything half-written: the compressed file is downloaded to a file that
//! is unlinked as soon as it is made (only its descriptor holds it), and `receive` removes its
//! own temporary name on any failure. A path it does not get is not an error: it is reported
//! with why, and the deployer pushes it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{mpsc, Mutex};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::time::{Duration, Instant};

use flotilla_protocol::{MissReason, PathInfo, SubstituteMiss, ZSTD_WINDOW_LOG_MAX};
use flotilla_store::cache::{narinfo_url, trusted_signer, NarInfo, PublicKey};
use flotilla_store::{HashingWriter, NarHash, StorePath};

use crate::http::{self, HttpError, Url};
use crate::machine::{MachineRoot, NixRunner, ReceiveError};

/// The most a narinfo may hold.
const MAX_NARINFO: u64 = 1 << 20;

/// How often the agent tells the deployer it is alive while substituting (downloading,
/// unpacking, waiting on a cache, registering with Nix): the deployer gives up on an agent
/// silent for its answer timeout plus [`flotilla_protocol::CACHE_TIMEOUT`].
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The whole of a narinfo exchange must take at most this long.
const NARINFO_DEADLINE: Duration = flotilla_protocol::CACHE_TIMEOUT;

/// A NAR download gets [`flotilla_protocol::CACHE_TIMEOUT`] for each this many bytes of its
/// size limit (plus one): a cache slower than about 4 MiB/s is given up on, and the deployer
/// pushes instead, so one byte every few seconds cannot hold a machine forever.
const BYTES_PER_TIMEOUT: u64 = 64 << 20;

/// The most a compressed file of a NAR of `nar_size` bytes may hold: the signed `NarSize`
/// bounds it (the narinfo's `FileSize` and `FileHash` are not covered by the signature, so a
/// replayed narinfo could claim anything). zstd never grows incompressible data by more than
/// a few bytes per 128 KiB block plus a frame header; the margin is generous.
pub fn max_file_size(nar_size: u64, zstd: bool) -> u64 {
    if zstd { nar_size + nar_size / 64 + (64 << 10) } else { nar_size }
}

/// How long a NAR download whose compressed size is at most `limit` may take.
pub fn download_deadline(limit: u64) -> Duration {
    flotilla_protocol::CACHE_TIMEOUT * u32::try_from(1 + limit / BYTES_PER_TIMEOUT).unwrap_or(u32::MAX)
}

/// What a `Substitute` did.
#[derive(Debug, Default)]
pub struct Substituted {
    /// Paths valid now (fetched, or valid already).
    pub got: Vec<StorePath>,
    /// NAR bytes fetched.
    pub bytes: u64,
    /// Paths not got, with why.
    pub missed: Vec<SubstituteMiss>,
}

/// Why the request itself cannot be carried out (before any path is tried).
#[derive(Debug, thiserror::Error)]
pub enum SubstituteError {
    /// A cache URL the agent cannot fetch from.
    #[error("{0}; list plain http:// caches in deploy.substituters")]
    Url(#[from] HttpError),
    /// A key that is not `name:base64`.
    #[error("trusted key {key:?}: {source}; list keys as `name:base64` in deploy.trustedPublicKeys")]
    Key {
        /// The key as sent.
        key: String,
        /// Why.
        source: flotilla_store::cache::KeyError,
    },
}

/// One cache's refusal of one path.
struct Miss {
    reason: MissReason,
    detail: String,
    /// The cache could not be connected to at all: it is not asked again in this request.
    unreachable: bool,
}

fn miss(reason: MissReason, detail: impl Into<String>) -> Miss {
    Miss { reason, detail: detail.into(), unreachable: false }
}

/// Fetches `paths` (references first) from `caches` into `root`, each from the first cache
/// that has it and passes every check, [`PARALLEL`] at a time: a path is started only once
/// each of its references among `paths` is done (got, or refused: then it is refused too,
/// after its cache has said why). `progress` is told what is being done, now and then.
pub fn substitute(
    root: &MachineRoot,
    paths: &[PathInfo],
    caches: &[String],
    trusted_keys: &[String],
    run: &NixRunner<'_>,
    progress: &mut dyn FnMut(String),
) -> Result<Substituted, SubstituteError> {
    let mut caches: Vec<Url> = caches.iter().map(|c| Url::parse(c)).collect::<Result<_, _>>()?;
    caches.iter_mut().for_each(|c| c.resolve(root));
    let keys: Vec<PublicKey> = trusted_keys
        .iter()
        .map(|k| PublicKey::parse(k).map_err(|source| SubstituteError::Key { key: k.clone(), source }))
        .collect::<Result<_, _>>()?;
    let down: Mutex<Vec<Option<String>>> = Mutex::new(vec![None; caches.len()]);
    let index: BTreeMap<&StorePath, usize> = paths.iter().enumerate().map(|(i, p)| (&p.path, i)).collect();
    let mut state: Vec<State> = paths
        .iter()
        .map(|info| {
            let valid = root.is_valid(&info.path) && root.registration(&info.path).is_some_and(|r| r.nar_hash == info.nar_hash);
            if valid { State::Valid } else { State::Waiting }
        })
        .collect();
    let mut got: BTreeSet<StorePath> = paths.iter().zip(&state).filter(|(_, s)| matches!(s, State::Valid)).map(|(p, _)| p.path.clone()).collect();
    let done_with = |state: &[State], i: usize| !matches!(state[i], State::Waiting | State::Running);
    let ready = |state: &[State], info: &PathInfo| info.references.iter().filter(|r| **r != info.path).filter_map(|r| index.get(r)).all(|&j| done_with(state, j));

    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Event>();
        let mut running = 0;
        loop {
            for (i, info) in paths.iter().enumerate() {
                if running >= PARALLEL {
                    break;
                }
                if matches!(state[i], State::Waiting) && ready(&state, info) {
                    state[i] = State::Running;
                    running += 1;
                    let (tx, got, caches, keys, down) = (tx.clone(), got.clone(), &caches, &keys, &down);
                    scope.spawn(move || {
                        let mut say = |m: String| {
                            let _ = tx.send(Event::Progress(m));
                        };
                        let result = from_caches(root, caches, info, keys, &got, down, &mut say);
                        let _ = tx.send(Event::Done(i, result));
                    });
                }
            }
            if running == 0 {
                break;
            }
            // Silence while a path unpacks or waits on a slow cache would make the deployer
            // give up on the agent: say it is alive at least every PROGRESS_EVERY.
            let event = match rx.recv_timeout(PROGRESS_EVERY) {
                Ok(e) => e,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    progress(format!("fetching {running} paths from caches"));
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("the loop holds a sender"),
            };
            match event {
                Event::Progress(m) => progress(m),
                Event::Done(i, result) => {
                    running -= 1;
                    state[i] = match result {
                        Ok(bytes) => {
                            progress(format!("fetched {} from a cache", paths[i].path));
                            got.insert(paths[i].path.clone());
                            State::Fetched(bytes)
                        }
                        Err(misses) => State::Missed(worst(&paths[i].path, misses)),
                    };
                }
            }
        }
    });

    // One registration with the machine's Nix for everything fetched (as `AddPaths` does for
    // what it receives), with a heartbeat while it runs (it may take REGISTER_TIMEOUT). The
    // paths are valid in the agent's store whether or not it works, so they are got either
    // way (pushing them again would only be skipped as already valid): the one rule is that a
    // path valid on the machine is not sent again, and activation registers the whole closure
    // with Nix (and fails, saying why, if it still cannot).
    let fetched: Vec<StorePath> = paths.iter().zip(&state).filter(|(_, s)| matches!(s, State::Fetched(_))).map(|(p, _)| p.path.clone()).collect();
    if !fetched.is_empty() {
        let registered = std::thread::scope(|scope| {
            let job = scope.spawn(|| root.register_with_nix(&root.closure(&fetched), run));
            let mut last = Instant::now();
            while !job.is_finished() {
                std::thread::sleep(Duration::from_millis(50));
                if last.elapsed() >= PROGRESS_EVERY {
                    progress("registering the fetched paths with the machine's Nix".to_owned());
                    last = Instant::now();
                }
            }
            job.join().expect("registration does not panic")
        });
        if let Err(e) = registered {
            let note = format!("fetched {} paths, but the machine's Nix did not take them yet ({e}); activation registers them again", fetched.len());
            eprintln!("flotilla-agent: {note}");
            progress(note);
        }
    }
    let mut done = Substituted::default();
    for (info, st) in paths.iter().zip(state) {
        match st {
            State::Valid => done.got.push(info.path.clone()),
            State::Fetched(bytes) => {
                done.got.push(info.path.clone());
                done.bytes += bytes;
            }
            State::Missed(m) => done.missed.push(m),
            // Only a reference cycle among the paths (which Nix never makes) leaves one here.
            State::Waiting | State::Running => {
                done.missed.push(SubstituteMiss { path: info.path.clone(), reason: MissReason::ReferenceMissing, detail: "its references never became valid".into() })
            }
        }
    }
    Ok(done)
}

/// How many paths are fetched at once: enough to keep a machine's link busy while another
/// path unpacks, few enough not to swamp a small cache.
pub const PARALLEL: usize = 4;

/// Where one path is.
enum State {
    /// Valid on the machine before the request.
    Valid,
    Waiting,
    Running,
    /// Fetched: its NAR size.
    Fetched(u64),
    Missed(SubstituteMiss),
}

enum Event {
    Progress(String),
    Done(usize, Result<u64, Vec<Miss>>),
}

/// Tries each cache in turn for one path. A cache that cannot be connected to is not asked
/// again in this request (each path would wait out its timeouts); one that answered badly is
/// asked once more for this path, and any cache that was reached stays asked for the others,
/// since one slow or failed request says little about the next.
fn from_caches(
    root: &MachineRoot,
    caches: &[Url],
    info: &PathInfo,
    keys: &[PublicKey],
    got: &BTreeSet<StorePath>,
    down: &Mutex<Vec<Option<String>>>,
    progress: &mut dyn FnMut(String),
) -> Result<u64, Vec<Miss>> {
    let mut misses = Vec::new();
    for (c, cache) in caches.iter().enumerate() {
        if let Some(why) = down.lock().unwrap_or_else(|e| e.into_inner())[c].clone() {
            misses.push(miss(MissReason::CacheDown, why));
            continue;
        }
        let tried = Instant::now();
        let mut result = fetch(root, cache, info, keys, got, progress);
        // A request that failed fast (an error answer, a cut connection) is worth a second
        // try; one that used up its deadline would only take as long again.
        if result.as_ref().is_err_and(|m| m.reason == MissReason::CacheDown && !m.unreachable) && tried.elapsed() < NARINFO_DEADLINE {
            result = fetch(root, cache, info, keys, got, progress);
        }
        match result {
            Ok(bytes) => return Ok(bytes),
            Err(m) => {
                if m.unreachable {
                    down.lock().unwrap_or_else(|e| e.into_inner())[c] = Some(m.detail.clone());
                }
                misses.push(m);
            }
        }
    }
    Err(misses)
}

/// The one miss to report for a path from every cache's: a cache that had it and was refused
/// says more than one that is down, which says more than one that lacks it.
fn worst(path: &StorePath, misses: Vec<Miss>) -> SubstituteMiss {
    let rank = |r: MissReason| match r {
        MissReason::NotInCache => 0,
        MissReason::CacheDown => 1,
        _ => 2,
    };
    let reason = misses.iter().map(|m| m.reason).max_by_key(|r| rank(*r)).unwrap_or(MissReason::NotInCache);
    let detail = if misses.is_empty() { "no cache to ask".to_owned() } else { misses.iter().map(|m| m.detail.as_str()).collect::<Vec<_>>().join("; ") };
    SubstituteMiss { path: path.clone(), reason, detail }
}

/// Fetches one path from one cache; returns its NAR size.
fn fetch(root: &MachineRoot, cache: &Url, info: &PathInfo, keys: &[PublicKey], got: &BTreeSet<StorePath>, progress: &mut dyn FnMut(String)) -> Result<u64, Miss> {
    let down = |e: HttpError| Miss { unreachable: matches!(e, HttpError::Connect { .. }), ..miss(MissReason::CacheDown, format!("cache down: {e}")) };
    let narinfo_at = cache.join(&narinfo_url(&info.path));
    let answer = http::get(&narinfo_at, MAX_NARINFO, NARINFO_DEADLINE).map_err(down)?;
    match answer.status {
        200 => {}
        404 | 410 => return Err(miss(MissReason::NotInCache, format!("not in {cache}"))),
        s => return Err(miss(MissReason::CacheDown, format!("cache down: {narinfo_at} answered HTTP {s}"))),
    }
    let text = answer.text().map_err(down)?;
    let mismatch = |what: String| miss(MissReason::HashMismatch, format!("{narinfo_at}: {what}"));
    let ni = NarInfo::parse(&text).map_err(|e| mismatch(format!("cannot be read ({e})")))?;
    if ni.store_path != info.path {
        return Err(mismatch(format!("names {}, not the path asked for", ni.store_path)));
    }
    if trusted_signer(&ni, keys).is_none() {
        let names: Vec<&str> = ni.sigs.iter().filter_map(|s| s.split_once(':').map(|(n, _)| n)).collect();
        let signed = if names.is_empty() { "it carries no signature".to_owned() } else { format!("it is signed by {}", names.join(", ")) };
        return Err(miss(
            MissReason::Untrusted,
            format!("untrusted signature: {narinfo_at} lacks a valid signature by a trusted key ({signed}; trusted: {})", keys.iter().map(PublicKey::name).collect::<Vec<_>>().join(", ")),
        ));
    }
    let refs: BTreeSet<&StorePath> = ni.references.iter().collect();
    if ni.nar_hash != info.nar_hash || ni.nar_size != info.nar_size || refs != info.references.iter().collect() {
        return Err(mismatch(format!(
            "is signed for NAR hash {} ({} bytes), but the deployer's store has {} ({} bytes) with these references",
            ni.nar_hash, ni.nar_size, info.nar_hash, info.nar_size
        )));
    }
    // Checked once the cache is known to have it, so a path the cache refuses says why, not
    // that its reference (refused for the same reason) is missing.
    if let Some(r) = info.references.iter().find(|r| **r != info.path && !got.contains(*r) && !root.is_valid(r)) {
        return Err(miss(MissReason::ReferenceMissing, format!("it refers to {r}, which no cache gave")));
    }
    let zstd = match ni.compression.as_str() {
        "none" => false,
        "zstd" => true,
        other => return Err(miss(MissReason::UnsupportedCompression, format!("unsupported compression {other:?} at {narinfo_at} (the agent reads none and zstd), pushed instead"))),
    };
    if ni.url.is_empty() || ni.url.contains("://") || ni.url.starts_with('/') || ni.url.split('/').any(|s| s == "..") {
        return Err(mismatch(format!("its URL {:?} is not a file below the cache", ni.url)));
    }
    let file_hash = match &ni.file_hash {
        Some(h) => Some(NarHash::parse(h).map_err(|e| mismatch(format!("its FileHash cannot be read ({e})")))?),
        None => None,
    };
    // The bound comes from the signed NarSize, never from FileSize alone, which the
    // signature does not cover.
    let limit = max_file_size(ni.nar_size, zstd);
    if let Some(claimed) = ni.file_size.filter(|s| *s > limit) {
        return Err(mismatch(format!("its FileSize {claimed} is more than a {} NAR of {} bytes can take (at most {limit}); the narinfo is not one Nix or flotilla wrote", ni.compression, ni.nar_size)));
    }
    let limit = ni.file_size.unwrap_or(limit);
    let nar_at = cache.join(&ni.url);
    let mut body = http::get(&nar_at, limit, download_deadline(limit)).map_err(down)?;
    match body.status {
        200 => {}
        404 | 410 => return Err(miss(MissReason::NotInCache, format!("{nar_at} is missing though its narinfo is there"))),
        s => return Err(miss(MissReason::CacheDown, format!("cache down: {nar_at} answered HTTP {s}"))),
    }

    let mut file = download_file(root, &info.path).map_err(|e| miss(MissReason::Failed, format!("cannot make a download file in the machine's store: {e}")))?;
    let mut hashing = HashingWriter::new(&mut file);
    let (mut buf, mut last) = (vec![0u8; 256 << 10], Instant::now());
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(down(body.error(e))),
        };
        hashing.write_all(&buf[..n]).map_err(|e| miss(MissReason::Failed, format!("cannot write the download of {} on the machine: {e}", info.path)))?;
        if last.elapsed() >= PROGRESS_EVERY {
            progress(format!("fetching {}: {} bytes", info.path, hashing.bytes()));
            last = Instant::now();
        }
    }
    let (_, digest) = hashing.finish();
    if ni.file_size.is_some_and(|s| s != digest.size) || file_hash.is_some_and(|h| h != digest.hash) {
        return Err(miss(
            MissReason::HashMismatch,
            format!("hash mismatch: {nar_at} is {} bytes hashing to {}, its narinfo says {} bytes hashing to {}", digest.size, digest.hash, ni.file_size.unwrap_or(digest.size), ni.file_hash.as_deref().unwrap_or("(no FileHash)")),
        ));
    }
    file.rewind().map_err(|e| miss(MissReason::Failed, format!("cannot read back the download of {}: {e}", info.path)))?;
    let mut nar: Box<dyn Read> = if zstd {
        let mut d = zstd::stream::read::Decoder::new(file).map_err(|e| miss(MissReason::Failed, format!("cannot start zstd: {e}")))?;
        d.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(|e| miss(MissReason::Failed, format!("cannot start zstd: {e}")))?;
        Box::new(d)
    } else {
        Box::new(file)
    };
    match root.receive_unregistered(std::slice::from_ref(info), &mut nar) {
        Ok(_) => Ok(info.nar_size),
        Err(ReceiveError::Integrity { problem, .. }) => Err(miss(MissReason::HashMismatch, format!("hash mismatch: the NAR from {nar_at} does not match its signed narinfo: {problem}"))),
        Err(ReceiveError::Io { what: "cannot read the stream for", source, .. }) => {
            Err(miss(MissReason::HashMismatch, format!("hash mismatch: the NAR from {nar_at} cannot be unpacked: {source}")))
        }
        Err(e) => Err(miss(MissReason::Failed, e.to_string())),
    }
}

/// A file in the machine's store directory to download into, unlinked at once: only the
/// returned descriptor holds it, so a crash leaves nothing behind. Made with `O_EXCL` and
/// `O_NOFOLLOW`, so a link planted at its name is never followed.
fn download_file(root: &MachineRoot, path: &StorePath) -> io::Result<File> {
    let dir = root.store_dir();
    let name = dir.join(format!(".flotilla-fetch-{}-{}", std::process::id(), path.base_name()));
    // A leftover of an agent that had this pid: never followed, just removed.
    if fs::symlink_metadata(&name).is_ok() {
        fs::remove_file(&name)?;
    }
    let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&name)?;
    fs::remove_file(&name)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(n: u8) -> StorePath {
        StorePath::parse(&format!("/nix/store/{}-p{n}", std::iter::repeat_n(char::from(b'a' + n), 32).collect::<String>())).unwrap()
    }

    #[test]
    fn a_path_a_cache_refused_is_reported_over_one_that_was_down_or_lacked_it() {
        let m = worst(&sp(1), vec![miss(MissReason::NotInCache, "a"), miss(MissReason::Untrusted, "b"), miss(MissReason::CacheDown, "c")]);
        assert_eq!((m.reason, m.detail.as_str()), (MissReason::Untrusted, "a; b; c"));
        assert_eq!(worst(&sp(1), vec![miss(MissReason::NotInCache, "a"), miss(MissReason::CacheDown, "c")]).reason, MissReason::CacheDown);
    }

    #[test]
    fn a_bad_cache_url_or_key_refuses_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let root = MachineRoot::new(dir.path());
        let run = |_: &[String], _: &std::path::Path| Ok((true, String::new()));
        let e = substitute(&root, &[], &["https://cache".into()], &[], &run, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("plain http://"), "{e}");
        let e = substitute(&root, &[], &["http://cache".into()], &["nocolon".into()], &run, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("deploy.trustedPublicKeys"), "{e}");
    }

    /// A hostile cache (a test double): it serves a narinfo Nix wrote and signed, with its
    /// `FileSize` replaced by `file_size` (or dropped), and answers every NAR request with an
    /// endless body. Returns its URL and how many body bytes it managed to send.
    fn hostile_cache(file_size: Option<&'static str>) -> (Url, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        use std::net::TcpListener;
        use std::sync::atomic::{AtomicU64, Ordering};
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../flotilla-store/tests/golden/cache");
        let narinfo: String = fs::read_to_string(golden.join("gav1jzyr0h57gwv1ykqb5jnrxiv1bjh7.narinfo"))
            .unwrap()
            .lines()
            .filter_map(|l| match (l.starts_with("FileSize: "), file_size) {
                (true, Some(n)) => Some(format!("FileSize: {n}\n")),
                (true, None) => None,
                (false, _) => Some(format!("{l}\n")),
            })
            .collect();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = std::sync::Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let (mut s, narinfo, counter) = (conn.unwrap(), narinfo.clone(), counter.clone());
                std::thread::spawn(move || {
                    let mut asked = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !asked.ends_with(b"\r\n\r\n") {
                        let Ok(n @ 1..) = s.read(&mut buf) else { return };
                        asked.extend_from_slice(&buf[..n]);
                    }
                    if asked.starts_with(b"GET /gav1jzyr0h57gwv1ykqb5jnrxiv1bjh7.narinfo ") {
                        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{narinfo}", narinfo.len());
                        return;
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
                    let chunk = vec![0x28u8; 64 << 10];
                    while s.write_all(&chunk).is_ok() {
                        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        (Url::parse(&format!("http://127.0.0.1:{port}")).unwrap(), sent)
    }

    fn golden_fetch(cache: &Url) -> Result<u64, (MissReason, String)> {
        let dir = tempfile::tempdir().unwrap();
        let root = MachineRoot::new(dir.path());
        fs::create_dir_all(root.store_dir()).unwrap();
        let a = StorePath::parse("/nix/store/3rdbzg114kn3qj0k3bqb8gq806szhj4i-golden-a").unwrap();
        let info = PathInfo {
            path: StorePath::parse("/nix/store/gav1jzyr0h57gwv1ykqb5jnrxiv1bjh7-golden-b").unwrap(),
            references: vec![a.clone()],
            nar_hash: NarHash::parse("sha256:1lbndpy5v3y1dzn7adis9jlqgb3sbzd417d2wkqn8rmjr2wrmxim").unwrap(),
            nar_size: 176,
        };
        let keys = [PublicKey::parse("golden-1:Ge8tRIwMrfurUavL1HIqEqQwErSf4AP0swvsh1DgoXM=").unwrap()];
        // Without a bound it would download forever: wait a few seconds, not for ever.
        let (tx, rx) = mpsc::channel();
        let cache = cache.clone();
        std::thread::spawn(move || {
            let _ = tx.send(fetch(&root, &cache, &info, &keys, &BTreeSet::from([a]), &mut |_| {}).map_err(|m| (m.reason, m.detail)));
            drop(dir);
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("the fetch ends within 10 s")
    }

    #[test]
    fn a_replayed_narinfo_claiming_a_huge_file_size_cannot_fill_the_disk() {
        // The signature covers NarSize, not FileSize: 10 GiB for a 176-byte NAR is refused
        // before a byte of the NAR is asked for.
        let (cache, sent) = hostile_cache(Some("10737418240"));
        let (reason, detail) = golden_fetch(&cache).expect_err("refused");
        assert_eq!(reason, MissReason::HashMismatch, "{detail}");
        assert!(detail.contains("FileSize 10737418240") && detail.contains("at most"), "{detail}");
        assert_eq!(sent.load(std::sync::atomic::Ordering::Relaxed), 0, "the NAR was asked for");

        // No FileSize at all: the endless body is cut at the bound the signed NarSize gives.
        let (cache, _sent) = hostile_cache(None);
        let (reason, detail) = golden_fetch(&cache).expect_err("refused");
        assert_eq!(reason, MissReason::CacheDown, "{detail}");
        assert!(detail.contains(&format!("longer than {} bytes", max_file_size(176, true))), "{detail}");
    }
}
