//! `flotilla cache serve` with real Nix as the client (issue 17): Debian's Nix substitutes
//! from a directory Nix itself wrote (`nix copy --to file://...`) and from this host's store
//! served with `--store`, accepts the right key and refuses a wrong one or a tampered narinfo
//! in its own words; and the HTTP a user's tools see: HEAD, ranges, 404s, keep-alive, no file
//! outside the directory (no `..`, no `%2e%2e`, no link followed), a push while serving seen at
//! once, a narinfo replaced or deleted on disk served as it is now within a second, a large
//! `--store` path asked for by several clients at once compressed once, a clean stop on
//! SIGTERM/SIGINT. Servers listen on 127.0.0.1 only.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, random_hex, repo, require_prerequisites};

/// A running `flotilla cache serve`, stopped when dropped.
struct Serve {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Serve {
    /// Starts `flotilla cache serve ARGS --bind 127.0.0.1:PORT` and waits until it answers.
    fn start(tmp: &Path, args: &[&str]) -> Serve {
        let port = free_port();
        let log = tmp.join(format!("serve-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["cache", "serve"])
            .args(args)
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("flotilla runs");
        let mut s = Serve { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("flotilla cache serve exited ({status}) before answering:\n{}", s.log());
            }
            assert!(Instant::now() < deadline, "flotilla cache serve did not listen within 30 s:\n{}", s.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGNAL and waits for the exit.
    fn stop(&mut self, signal: i32) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "flotilla cache serve did not stop within 20 s of signal {signal}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two input-addressed paths of the demo package set, new to this run: `b` refers to `a`.
/// (Input-addressed: Nix accepts a content-addressed path without any signature.)
fn build_pair() -> (String, String) {
    let text = random_hex(8);
    let expr = format!(
        "let p = import {}/nix/demo-pkgs.nix {{}}; a = p.writeText \"cache-a\" \"{text}\"; in [ a (p.writeText \"cache-b\" \"see ${{a}}\") ]",
        repo().display()
    );
    let out = Command::new("nix-build").args(["--no-out-link", "--option", "substituters", "", "-E", &expr]).output().unwrap();
    assert!(out.status.success(), "nix-build: {}", String::from_utf8_lossy(&out.stderr));
    let paths: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    (paths[0].clone(), paths[1].clone())
}

/// A key pair made by Nix: (secret key file, public key text).
fn nix_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let (sec, public) = (dir.join(format!("{name}.secret")), dir.join(format!("{name}.public")));
    let ok = Command::new("nix-store").arg("--generate-binary-cache-key").arg(name).arg(&sec).arg(&public).status().unwrap();
    assert!(ok.success(), "nix-store --generate-binary-cache-key");
    (sec, std::fs::read_to_string(public).unwrap().trim().to_owned())
}

/// `nix copy --to file://DIR?compression=zstd&secret-key=KEY PATH`: a cache Nix wrote.
fn nix_copy_to_dir(dir: &Path, key: &Path, path: &str) {
    let to = format!("file://{}?compression=zstd&secret-key={}", dir.display(), key.display());
    let out = Command::new("nix").args(["copy", "--extra-experimental-features", "nix-command", "--option", "substituters", "", "--to", &to, path]).output().unwrap();
    assert!(out.status.success(), "nix copy --to {to}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `nix-store --store ROOT -r PATH` substituting from `url` only, trusting `key`: a store that
/// lacks the path (a chroot store under the test's directory).
fn nix_substitute(root: &Path, path: &str, url: &str, key: &str) -> Output {
    Command::new("nix-store")
        .arg("--store")
        .arg(root)
        .args(["-r", path, "--option", "substituters", url, "--option", "trusted-public-keys", key])
        .output()
        .unwrap()
}

/// `nix copy --from URL --to ROOT PATH`, trusting `key`.
fn nix_copy_from(root: &Path, path: &str, url: &str, key: &str) -> Output {
    Command::new("nix")
        .args(["copy", "--extra-experimental-features", "nix-command", "--option", "substituters", "", "--option", "trusted-public-keys", key, "--from", url, "--to"])
        .arg(root)
        .arg(path)
        .output()
        .unwrap()
}

fn in_root(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn hash_part(path: &str) -> &str {
    &path["/nix/store/".len()..][..32]
}

/// One HTTP response read off a connection: status line, headers, body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads one response (whose length is its Content-Length; a HEAD's has no body).
fn read_response(conn: &mut TcpStream, head_only: bool) -> Response {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(conn.read(&mut byte).unwrap(), 1, "the connection closed inside a response head: {:?}", String::from_utf8_lossy(&raw));
        raw.push(byte[0]);
    }
    let text = String::from_utf8(raw).unwrap();
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines.filter(|l| !l.is_empty()).map(|l| {
        let (n, v) = l.split_once(':').unwrap();
        (n.to_owned(), v.trim().to_owned())
    }).collect();
    let mut r = Response { status, headers, body: Vec::new() };
    if !head_only {
        let len: usize = r.header("content-length").expect("a Content-Length").parse().unwrap();
        r.body = vec![0; len];
        conn.read_exact(&mut r.body).unwrap();
    }
    r
}

/// One request on its own connection.
fn request(port: u16, method: &str, target: &str, extra: &str) -> Response {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(conn, "{method} {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").unwrap();
    read_response(&mut conn, method == "HEAD")
}

/// A cache directory Nix wrote, holding `a` and `b`, signed by `key`.
fn nix_cache(tmp: &Path, key: &Path) -> (PathBuf, String, String) {
    let (a, b) = build_pair();
    let dir = tmp.join("cache");
    nix_copy_to_dir(&dir, key, &b);
    (dir, a, b)
}

#[test]
fn nix_substitutes_from_a_served_directory_nix_wrote_with_the_right_key() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let (sec, public) = nix_key(tmp.path(), "serve-test-1");
    let (dir, a, b) = nix_cache(tmp.path(), &sec);
    let serve = Serve::start(tmp.path(), &[dir.to_str().unwrap()]);

    let root = tmp.path().join("store-r");
    let out = nix_substitute(&root, &b, &serve.url(), &public);
    assert!(out.status.success(), "nix-store -r from {}: {}", serve.url(), stderr(&out));
    let got = std::fs::read_to_string(in_root(&root, &b)).unwrap();
    assert_eq!(got, format!("see {a}"), "the substituted path's contents");
    assert!(in_root(&root, &a).exists(), "its reference came along");

    let root = tmp.path().join("store-copy");
    let out = nix_copy_from(&root, &b, &serve.url(), &public);
    assert!(out.status.success(), "nix copy --from {}: {}", serve.url(), stderr(&out));
    assert_eq!(std::fs::read_to_string(in_root(&root, &b)).unwrap(), format!("see {a}"));
}

#[test]
fn nix_refuses_a_served_path_signed_by_another_key_in_its_own_words() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let (sec, _) = nix_key(tmp.path(), "serve-test-signer");
    let (_, other_public) = nix_key(tmp.path(), "serve-test-other");
    let (dir, _a, b) = nix_cache(tmp.path(), &sec);
    let serve = Serve::start(tmp.path(), &[dir.to_str().unwrap()]);

    let root = tmp.path().join("store-r");
    let out = nix_substitute(&root, &b, &serve.url(), &other_public);
    assert!(!out.status.success(), "nix-store -r accepted a path no trusted key signed");
    assert!(stderr(&out).contains("is not signed by any of the keys in 'trusted-public-keys'"), "{}", stderr(&out));
    assert!(!in_root(&root, &b).exists());

    let out = nix_copy_from(&tmp.path().join("store-copy"), &b, &serve.url(), &other_public);
    assert!(!out.status.success(), "nix copy --from accepted a path no trusted key signed");
    assert!(stderr(&out).contains("lacks a valid signature"), "{}", stderr(&out));
}

#[test]
fn nix_refuses_a_tampered_narinfo() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let (sec, public) = nix_key(tmp.path(), "serve-test-tamper");
    let (dir, a, b) = nix_cache(tmp.path(), &sec);
    // Someone with write access to the cache drops b's reference to a: the signature no longer
    // covers what the narinfo says.
    let narinfo = dir.join(format!("{}.narinfo", hash_part(&b)));
    let text = std::fs::read_to_string(&narinfo).unwrap();
    let a_base = &a["/nix/store/".len()..];
    assert!(text.contains(a_base), "{text}");
    assert!(text.contains(&format!("References: {a_base}\n")), "{text}");
    std::fs::write(&narinfo, text.replace(&format!("References: {a_base}\n"), "References: \n")).unwrap();
    let serve = Serve::start(tmp.path(), &[dir.to_str().unwrap()]);

    let out = nix_copy_from(&tmp.path().join("store-copy"), &b, &serve.url(), &public);
    assert!(!out.status.success(), "nix copy --from accepted a tampered narinfo");
    assert!(stderr(&out).contains(&format!("cannot add path '{b}' because it lacks a valid signature")), "{}", stderr(&out));
    let root = tmp.path().join("store-r");
    let out = nix_substitute(&root, &b, &serve.url(), &public);
    assert!(!out.status.success(), "nix-store -r accepted a tampered narinfo");
    assert!(!in_root(&root, &b).exists());
}

#[test]
fn nix_substitutes_this_hosts_store_served_with_store_and_signed_on_the_fly() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let (sec, public) = nix_key(tmp.path(), "serve-test-store");
    let (a, b) = build_pair();
    let kept = tmp.path().join("kept");
    let mut serve = Serve::start(tmp.path(), &["--store", "--key", sec.to_str().unwrap(), "--cache-dir", kept.to_str().unwrap()]);

    let root = tmp.path().join("store-r");
    let out = nix_substitute(&root, &b, &serve.url(), &public);
    assert!(out.status.success(), "nix-store -r from flotilla cache serve --store: {}\n{}", stderr(&out), serve.log());
    assert_eq!(std::fs::read_to_string(in_root(&root, &b)).unwrap(), format!("see {a}"));
    assert!(in_root(&root, &a).exists());

    // The compressed NAR was made once and kept, with its narinfo, in the cache directory.
    let narinfo = std::fs::read_to_string(kept.join(format!("{}.narinfo", hash_part(&b)))).unwrap();
    let url = narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    let size: u64 = narinfo.lines().find_map(|l| l.strip_prefix("FileSize: ")).unwrap().parse().unwrap();
    assert!(url.ends_with(".nar.zst"), "{narinfo}");
    assert_eq!(std::fs::metadata(kept.join(url)).unwrap().len(), size, "{narinfo}");
    // A path the store lacks is a 404, not an error.
    assert_eq!(request(serve.port, "GET", &format!("/{}.narinfo", "0".repeat(32)), "").status, 404);
    assert!(serve.stop(15).success(), "{}", serve.log());
}

#[test]
fn store_mode_without_a_key_is_one_clear_error() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["cache", "serve", "--store", "--bind", "127.0.0.1:0", "--cache-dir"])
        .arg(tmp.path().join("kept"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--store needs --key FILE") && stderr(&out).contains("flotilla cache keygen"), "{}", stderr(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla")).args(["cache", "serve", "--bind", "127.0.0.1:0"]).arg(tmp.path().join("missing")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot serve") && stderr(&out).contains("missing"), "{}", stderr(&out));
}

#[test]
fn head_range_404_and_keep_alive_answer_as_http_says() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let (sec, _) = nix_key(tmp.path(), "serve-test-http");
    let (dir, _a, b) = nix_cache(tmp.path(), &sec);
    let serve = Serve::start(tmp.path(), &[dir.to_str().unwrap()]);
    let narinfo_target = format!("/{}.narinfo", hash_part(&b));
    let narinfo_text = std::fs::read(dir.join(&narinfo_target[1..])).unwrap();

    let r = request(serve.port, "GET", "/nix-cache-info", "");
    assert_eq!(r.status, 200);
    assert!(String::from_utf8(r.body).unwrap().contains("StoreDir: /nix/store"));

    let r = request(serve.port, "GET", &narinfo_target, "");
    assert_eq!((r.status, &r.body), (200, &narinfo_text), "a narinfo Nix wrote is served byte for byte");
    let r = request(serve.port, "HEAD", &narinfo_target, "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(narinfo_text.len().to_string().as_str()), "HEAD says the GET's length");

    let url = String::from_utf8(narinfo_text.clone()).unwrap().lines().find_map(|l| l.strip_prefix("URL: ").map(str::to_owned)).unwrap();
    let nar = std::fs::read(dir.join(&url)).unwrap();
    let r = request(serve.port, "GET", &format!("/{url}"), "");
    assert_eq!((r.status, r.header("content-type")), (200, Some("application/x-nix-nar")));
    assert_eq!(r.body, nar);
    let r = request(serve.port, "GET", &format!("/{url}"), "Range: bytes=4-11\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some(format!("bytes 4-11/{}", nar.len()).as_str()));
    assert_eq!(r.body, &nar[4..12]);
    let r = request(serve.port, "GET", &format!("/{url}"), "Range: bytes=-5\r\n");
    assert_eq!((r.status, &r.body[..]), (206, &nar[nar.len() - 5..]));
    let r = request(serve.port, "GET", &format!("/{url}"), &format!("Range: bytes={}-\r\n", nar.len()));
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some(format!("bytes */{}", nar.len()).as_str()));

    // Missing paths and NARs: 404 (and fast: the index, then one failed open).
    let t0 = Instant::now();
    for i in 0..200 {
        let r = request(serve.port, "GET", &format!("/{}{:04}.narinfo", "0".repeat(28), i), "");
        assert_eq!(r.status, 404);
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "200 misses took {:?}", t0.elapsed());
    assert_eq!(request(serve.port, "GET", &format!("/nar/{}.nar.zst", "1".repeat(52)), "").status, 404);
    assert_eq!(request(serve.port, "POST", "/nix-cache-info", "").status, 405);

    // Keep-alive: two requests, one connection, both answered, then a pipelined pair.
    let mut conn = TcpStream::connect(("127.0.0.1", serve.port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(conn, "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut conn, false).status, 200);
    write!(conn, "GET {narinfo_target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let r = read_response(&mut conn, false);
    assert_eq!((r.status, &r.body), (200, &narinfo_text), "the second request on the same connection");
    write!(conn, "HEAD /{url} HTTP/1.1\r\nHost: x\r\n\r\nGET /{url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut conn, true).status, 200);
    assert_eq!(read_response(&mut conn, false).body, nar);
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "Connection: close closes after the answer");
}

#[test]
fn no_file_outside_the_directory_is_served_by_dot_dot_escapes_or_links() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let (sec, _) = nix_key(tmp.path(), "serve-test-escape");
    let (dir, _a, b) = nix_cache(tmp.path(), &sec);
    // A secret beside the cache, and links to it planted in the cache under names the server
    // answers to: a NAR name and b's narinfo (moved out, a link left in its place).
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "TOP-SECRET\n").unwrap();
    let nar_link = format!("{}.nar.zst", "a".repeat(52));
    std::os::unix::fs::symlink(&secret, dir.join("nar").join(&nar_link)).unwrap();
    std::os::unix::fs::symlink("../../secret", dir.join("nar").join(format!("{}.nar", "b".repeat(52)))).unwrap();
    let narinfo_name = format!("{}.narinfo", hash_part(&b));
    let moved = tmp.path().join("moved.narinfo");
    std::fs::rename(dir.join(&narinfo_name), &moved).unwrap();
    std::os::unix::fs::symlink(&moved, dir.join(&narinfo_name)).unwrap();
    let serve = Serve::start(tmp.path(), &[dir.to_str().unwrap()]);

    let key_name = sec.file_name().unwrap().to_str().unwrap();
    let attempts = [
        format!("/nar/{nar_link}"),
        format!("/nar/{}.nar", "b".repeat(52)),
        format!("/{narinfo_name}"),
        "/../secret".to_owned(),
        "/../../../../etc/passwd".to_owned(),
        "/nar/../../secret".to_owned(),
        "/%2e%2e/secret".to_owned(),
        "/nar/%2e%2e%2f%2e%2e%2fsecret".to_owned(),
        format!("/%2e%2e/{key_name}"),
        format!("/../{key_name}"),
        "/nar/".to_owned(),
        "/nar".to_owned(),
        "/".to_owned(),
    ];
    for target in &attempts {
        for method in ["GET", "HEAD"] {
            let r = request(serve.port, method, target, "");
            let body = String::from_utf8_lossy(&r.body);
            assert_eq!(r.status, 404, "{method} {target} answered {}: {body}", r.status);
            assert!(!body.contains("SECRET") && !body.contains("root:") && !body.contains(key_name), "{method} {target}: {body}");
        }
    }
}

#[test]
fn a_path_pushed_while_serving_is_served_at_its_first_request() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let (sec, public) = nix_key(tmp.path(), "serve-test-push");
    let (dir, _a, _b) = nix_cache(tmp.path(), &sec);
    let serve = Serve::start(tmp.path(), &[dir.to_str().unwrap()]);
    let (_c, d) = build_pair();
    let target = format!("/{}.narinfo", hash_part(&d));
    assert_eq!(request(serve.port, "GET", &target, "").status, 404, "not pushed yet");

    nix_copy_to_dir(&dir, &sec, &d);
    let r = request(serve.port, "GET", &target, "");
    assert_eq!(r.status, 200, "a narinfo pushed while serving");
    let root = tmp.path().join("store-r");
    let out = nix_substitute(&root, &d, &serve.url(), &public);
    assert!(out.status.success(), "nix-store -r of a path pushed while serving: {}", stderr(&out));
    assert!(in_root(&root, &d).exists());
}

#[test]
fn sigterm_and_sigint_stop_the_server_cleanly() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("empty-cache");
    std::fs::create_dir(&dir).unwrap();
    for (signal, name) in [(15, "SIGTERM"), (2, "SIGINT")] {
        let mut serve = Serve::start(tmp.path(), &[dir.to_str().unwrap()]);
        // An idle keep-alive connection does not hold the stop up.
        let mut idle = TcpStream::connect(("127.0.0.1", serve.port)).unwrap();
        write!(idle, "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(read_response(&mut idle, false).status, 200);
        let status = serve.stop(signal);
        assert!(status.success(), "{name}: exit {status}\n{}", serve.log());
        assert!(serve.log().contains(&format!("stopped ({name})")), "{}", serve.log());
        assert!(TcpStream::connect(("127.0.0.1", serve.port)).is_err(), "still listening after {name}");
    }
}

/// `nix_substitute` with Nix's own narinfo cache off, so each run asks the server again.
fn nix_substitute_uncached(root: &Path, path: &str, url: &str, key: &str) -> Output {
    Command::new("nix-store")
        .arg("--store")
        .arg(root)
        .args(["-r", path, "--option", "substituters", url, "--option", "trusted-public-keys", key])
        .args(["--option", "narinfo-cache-positive-ttl", "0", "--option", "narinfo-cache-negative-ttl", "0"])
        .output()
        .unwrap()
}

/// Waits past the server's once-a-second check of the narinfos it holds in memory.
fn past_recheck() {
    std::thread::sleep(Duration::from_millis(1_200));
}

#[test]
fn a_narinfo_replaced_or_deleted_on_disk_is_served_as_it_is_now_within_a_second() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let (first, first_public) = nix_key(tmp.path(), "serve-test-first");
    let (later, later_public) = nix_key(tmp.path(), "serve-test-later");
    let (dir, _a, b) = nix_cache(tmp.path(), &first);
    // The same closure pushed elsewhere signed by the later key: what a later push re-signing
    // it writes.
    let resigned_dir = tmp.path().join("cache-later");
    nix_copy_to_dir(&resigned_dir, &later, &b);
    let name = format!("{}.narinfo", hash_part(&b));
    let target = format!("/{name}");
    let original = std::fs::read(dir.join(&name)).unwrap();
    let resigned = std::fs::read(resigned_dir.join(&name)).unwrap();
    assert_ne!(original, resigned);
    let serve = Serve::start(tmp.path(), &[dir.to_str().unwrap()]);
    assert_eq!(request(serve.port, "GET", &target, "").body, original, "served from memory");
    let out = nix_substitute_uncached(&tmp.path().join("store-0"), &b, &serve.url(), &later_public);
    assert!(!out.status.success(), "not signed by the later key yet");
    assert!(stderr(&out).contains("is not signed by any of the keys"), "{}", stderr(&out));

    // Replaced the way a push replaces it (b's and its reference's): the new file renamed over
    // the old.
    for entry in std::fs::read_dir(resigned_dir.join("nar")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join("nar").join(entry.file_name())).unwrap();
    }
    for entry in std::fs::read_dir(&resigned_dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_str().unwrap().ends_with(".narinfo") {
            std::fs::copy(entry.path(), dir.join(".new.narinfo")).unwrap();
            std::fs::rename(dir.join(".new.narinfo"), dir.join(entry.file_name())).unwrap();
        }
    }
    past_recheck();
    let r = request(serve.port, "GET", &target, "");
    assert_eq!((r.status, String::from_utf8_lossy(&r.body)), (200, String::from_utf8_lossy(&resigned)), "the re-signed narinfo, not the one in memory");
    let out = nix_substitute_uncached(&tmp.path().join("store-1"), &b, &serve.url(), &later_public);
    assert!(out.status.success(), "Nix trusting only the later key substitutes the re-signed path: {}", stderr(&out));
    let out = nix_substitute_uncached(&tmp.path().join("store-2"), &b, &serve.url(), &first_public);
    assert!(!out.status.success(), "the first key's signature is no longer served");
    assert!(stderr(&out).contains("is not signed by any of the keys"), "{}", stderr(&out));

    // Rewritten in place (same inode).
    std::fs::write(dir.join(&name), &original).unwrap();
    past_recheck();
    assert_eq!(request(serve.port, "GET", &target, "").body, original, "the narinfo rewritten in place");

    // Deleted: 404 to GET and HEAD.
    std::fs::remove_file(dir.join(&name)).unwrap();
    past_recheck();
    assert_eq!(request(serve.port, "GET", &target, "").status, 404, "a deleted narinfo");
    assert_eq!(request(serve.port, "HEAD", &target, "").status, 404, "a deleted narinfo");
    // And back again: served at its first request.
    std::fs::write(dir.join(&name), &resigned).unwrap();
    assert_eq!(request(serve.port, "GET", &target, "").body, resigned);
}

#[test]
fn concurrent_first_requests_for_a_large_store_path_compress_it_once() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let (sec, _public) = nix_key(tmp.path(), "serve-test-once");
    // 48 MiB that zstd cannot shrink much, new to this run: encoding, hashing and compressing
    // it takes long enough that every request below arrives while it is being made.
    let src = tmp.path().join("large");
    std::fs::create_dir(&src).unwrap();
    let mut x = u64::from_str_radix(&random_hex(8), 16).unwrap() | 1;
    let data: Vec<u8> = (0..48 << 20).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 32) as u8
    }).collect();
    std::fs::write(src.join("data"), &data).unwrap();
    drop(data);
    let out = Command::new("nix-store").arg("--add").arg(&src).output().unwrap();
    assert!(out.status.success(), "nix-store --add: {}", stderr(&out));
    let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let kept = tmp.path().join("kept");
    let serve = Serve::start(tmp.path(), &["--store", "--key", sec.to_str().unwrap(), "--cache-dir", kept.to_str().unwrap(), "--verbose"]);

    let target = format!("/{}.narinfo", hash_part(&path));
    let start = std::sync::Arc::new(std::sync::Barrier::new(4));
    let answers: Vec<_> = (0..4)
        .map(|_| {
            let (start, target, port) = (std::sync::Arc::clone(&start), target.clone(), serve.port);
            std::thread::spawn(move || {
                start.wait();
                let r = request(port, "GET", &target, "");
                (r.status, r.body)
            })
        })
        .collect();
    let answers: Vec<_> = answers.into_iter().map(|t| t.join().unwrap()).collect();
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{}\n{}", String::from_utf8_lossy(body), serve.log());
        assert_eq!(body, &answers[0].1, "every request is answered the same narinfo");
    }
    let log = serve.log();
    let made = log.lines().filter(|l| l.starts_with("made ") && l.contains(&path)).count();
    assert_eq!(made, 1, "{path} compressed {made} times for 4 concurrent requests:\n{log}");
    let nars: Vec<_> = std::fs::read_dir(kept.join("nar")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(nars.len(), 1, "one compressed NAR, no leftovers: {nars:?}");
    drop(serve);
    // Only this test's path, made above.
    let _ = Command::new("nix-store").args(["--delete", &path]).output();
}

/// Review of issue 17, finding 2: `serve DIR --key` signs whatever DIR holds, so DIR, `nar/`
/// and each narinfo must be the server's user's and writable by no one else.
#[test]
fn serve_dir_with_key_refuses_a_directory_or_narinfo_others_can_write() {
    use std::os::unix::fs::PermissionsExt as _;
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let (sec, _public) = nix_key(tmp.path(), "serve-private-1");
    let (dir, a, b) = nix_cache(tmp.path(), &sec);
    let (resign, _) = nix_key(tmp.path(), "serve-private-2");
    let chmod = |p: &Path, mode: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    // Without the check it would serve for ever: give it 20 s to refuse, then stop it.
    let serve_with_key = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["cache", "serve", "--bind", "127.0.0.1:0", "--key"])
            .arg(&resign)
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };

    for writable in [dir.clone(), dir.join("nar")] {
        chmod(&writable, 0o777);
        let out = serve_with_key();
        assert_eq!(out.status.code(), Some(2), "served {} writable by all with --key: {}", writable.display(), stderr(&out));
        let said = stderr(&out);
        assert!(said.contains(&format!("cannot serve {}", writable.display())) && said.contains("chmod go-w") && said.contains("serve without --key"), "{said}");
        chmod(&writable, 0o755);
    }

    // A narinfo others may write is not signed and served; one only the server's user may
    // write is.
    let (writable, private) = (dir.join(format!("{}.narinfo", hash_part(&b))), hash_part(&a));
    chmod(&writable, 0o666);
    let serve = Serve::start(tmp.path(), &["--key", resign.to_str().unwrap(), dir.to_str().unwrap()]);
    assert_eq!(request(serve.port, "GET", &format!("/{}.narinfo", hash_part(&b)), "").status, 404, "a narinfo others can write was signed and served");
    let ok = request(serve.port, "GET", &format!("/{private}.narinfo"), "");
    assert_eq!(ok.status, 200);
    assert!(String::from_utf8_lossy(&ok.body).contains("Sig: serve-private-2:"), "not re-signed: {}", String::from_utf8_lossy(&ok.body));
    assert!(serve.log().contains("others may write it"), "{}", serve.log());
}
