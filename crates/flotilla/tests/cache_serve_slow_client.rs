//! `flotilla cache serve` against a slow-header client (issue 17's review): a client trickling
//! its request head a byte a second is answered 408 and closed within the head deadline
//! (10 s from its first byte), however long each byte takes to come, while another client is
//! served meanwhile. The server listens on 127.0.0.1 only.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, require_prerequisites};

/// Sends `GET /nix-cache-info` on a new connection and returns the status line.
fn status_line(port: u16) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = Vec::new();
    conn.read_to_end(&mut text).unwrap();
    String::from_utf8_lossy(&text).lines().next().unwrap_or_default().to_owned()
}

#[test]
fn a_client_trickling_its_request_head_is_closed_within_the_deadline_while_others_are_served() {
    require_prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    std::fs::create_dir(&dir).unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["cache", "serve"])
        .arg(&dir)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("flotilla runs");
    let guard = scopeguard(&mut child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "flotilla cache serve did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let t0 = Instant::now();
    let head = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed_after = None;
    let mut served_meanwhile = false;
    for &byte in head.iter() {
        // Writes succeed until the server has closed and the peer reset the connection.
        if slow.write_all(&[byte]).is_err() {
            closed_after = Some(t0.elapsed());
            break;
        }
        // Is the server done with us? A read that sees an answer or EOF says so.
        slow.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
        let mut answer = [0u8; 256];
        match slow.read(&mut answer) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&answer[..n]).into_owned();
                assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "the slow client got {text:?}");
                closed_after = Some(t0.elapsed());
                break;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => {
                closed_after = Some(t0.elapsed());
                break;
            }
        }
        if !served_meanwhile && t0.elapsed() > Duration::from_secs(3) {
            assert_eq!(status_line(port), "HTTP/1.1 200 OK", "another client is served while the slow one trickles");
            served_meanwhile = true;
        }
    }
    let closed_after = closed_after.expect("the slow client was never closed: it sent its whole head at a byte a second");
    assert!(served_meanwhile, "the other client was tried");
    assert!(closed_after >= Duration::from_secs(9), "closed after {closed_after:?}, before the 10 s deadline");
    assert!(closed_after <= Duration::from_secs(13), "closed after {closed_after:?}, not within the 10 s deadline");
    drop(guard);
}

/// Kills the server when the test ends, passing or not.
fn scopeguard(child: &mut std::process::Child) -> impl Drop + '_ {
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    Kill(child)
}
