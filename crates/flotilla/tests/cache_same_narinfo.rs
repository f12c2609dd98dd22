//! `flotilla cache push` and `flotilla cache serve --store` make a path's files the one same
//! way (issue 17's review): for the same path and key, the narinfo a push writes and the one
//! the store server answers are the same lines, `CA` of a content-addressed path and `Deriver`
//! of a built one included (as `nix copy` keeps them). The server listens on 127.0.0.1 only.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, random_hex, repo, require_prerequisites};

fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("{} does not run ({e}); run scripts/install-deps.sh", argv[0]));
    assert!(out.status.success(), "{argv:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The body of `GET target`, which must answer 200.
fn get(port: u16, target: &str) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(conn, "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}");
    body.to_owned()
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text.lines().map(str::to_owned).collect();
    v.sort();
    v
}

#[test]
fn push_and_serve_store_write_the_same_narinfo_with_ca_and_deriver() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let salt = random_hex(8);
    let ca_path = run(&["nix-instantiate", "--read-write-mode", "--eval", "--strict", "--json", "-E", &format!(r#"builtins.toFile "same-ca-{salt}" "{salt}""#)]);
    let ca_path: String = serde_json::from_str(&ca_path).unwrap();
    let expr = format!(r#"(import {}/nix/demo-pkgs.nix {{}}).writeText "same-built-{salt}" "{salt}""#, repo().display());
    let built = run(&["nix-build", "--no-out-link", "--option", "substituters", "", "-E", &expr]).trim().to_owned();

    let flotilla = env!("CARGO_BIN_EXE_flotilla");
    let keys = tmp.path().join("keys");
    run(&[flotilla, "cache", "keygen", "same-1", "--out", keys.to_str().unwrap()]);
    let key = keys.join("same-1.secret");
    let cache = tmp.path().join("pushed");
    run(&[flotilla, "cache", "push", cache.to_str().unwrap(), "--key", key.to_str().unwrap(), &ca_path, &built]);

    let port = free_port();
    let kept = tmp.path().join("kept");
    let mut child = Command::new(flotilla)
        .args(["cache", "serve", "--store", "--key", key.to_str().unwrap(), "--cache-dir", kept.to_str().unwrap()])
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("flotilla runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "flotilla cache serve --store exited before answering");
        assert!(Instant::now() < deadline, "flotilla cache serve --store did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut checked = Vec::new();
    for path in [&ca_path, &built] {
        let name = format!("{}.narinfo", &path[11..43]);
        let pushed = std::fs::read_to_string(cache.join(&name)).unwrap();
        let served = get(port, &format!("/{name}"));
        checked.push((pushed.clone(), sorted_lines(&pushed) == sorted_lines(&served), served));
    }
    let _ = child.kill();
    let _ = child.wait();
    for (pushed, same, served) in &checked {
        assert!(same, "push wrote\n{pushed}\nserve --store answered\n{served}");
    }
    assert!(checked[0].0.lines().any(|l| l.starts_with("CA: text:sha256:")), "a content-addressed path's narinfo keeps its CA:\n{}", checked[0].0);
    assert!(checked[1].0.lines().any(|l| l.starts_with("Deriver: ") && l.ends_with(".drv")), "a built path's narinfo names its deriver:\n{}", checked[1].0);
}
