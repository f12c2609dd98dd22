//! `flotilla cache push s3://...` stages each compressed NAR in a file with no name (issue 17's
//! review): a push killed by SIGKILL in the middle of uploading a NAR leaves nothing in its
//! $TMPDIR. The S3 endpoint is a stand-in on 127.0.0.1 made here, which answers the small
//! requests and holds the NAR's upload open until the push is killed.

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{random_hex, repo, require_prerequisites};

/// Serves S3's small requests (GET: 404, PUT: 200) and, at the first NAR upload, says so on
/// the channel and holds that connection without answering.
fn stall_at_the_first_nar(listener: TcpListener, nar_put: mpsc::Sender<()>) {
    let mut held = Vec::new();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { return };
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        if line.starts_with("PUT ") && line.contains("/nar/") {
            let _ = nar_put.send(());
            held.push(conn);
            continue;
        }
        let mut body = vec![0u8; length];
        let _ = reader.read_exact(&mut body);
        let answer: &[u8] = if line.starts_with("PUT ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        } else {
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        };
        let mut conn = conn;
        let _ = conn.write_all(answer);
    }
}

#[test]
fn an_s3_push_killed_while_uploading_a_nar_leaves_nothing_in_tmpdir() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let salt = random_hex(8);
    let expr = format!(r#"(import {}/nix/demo-pkgs.nix {{}}).writeText "s3-staging-{salt}" "{salt}""#, repo().display());
    let out = Command::new("nix-build").args(["--no-out-link", "--option", "substituters", "", "-E", &expr]).output().unwrap();
    assert!(out.status.success(), "nix-build: {}", String::from_utf8_lossy(&out.stderr));
    let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let flotilla = env!("CARGO_BIN_EXE_flotilla");
    let keys = tmp.path().join("keys");
    let made = Command::new(flotilla).args(["cache", "keygen", "staging-1", "--out", keys.to_str().unwrap()]).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || stall_at_the_first_nar(listener, tx));

    let staging = tmp.path().join("tmpdir");
    std::fs::create_dir(&staging).unwrap();
    let mut push = Command::new(flotilla)
        .env("TMPDIR", &staging)
        .env("HOME", tmp.path())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("FLOTILLA_STATE", tmp.path().join("state.db"))
        .args(["cache", "push", &format!("s3://cache/fleet?endpoint=http://127.0.0.1:{port}&region=us-east-1"), "--key"])
        .arg(keys.join("staging-1.secret"))
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let uploading = rx.recv_timeout(Duration::from_secs(60));
    push.kill().unwrap();
    let status = push.wait().unwrap();
    let mut err = String::new();
    push.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(uploading.is_ok(), "the push never uploaded a NAR ({status}): {err}");
    let left: Vec<_> = std::fs::read_dir(&staging).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "a push killed while uploading left {left:?} in its TMPDIR");
}
