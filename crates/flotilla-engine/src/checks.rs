//! The deployer's own checks (`checks.<name>.http`): after the agent's health checks passed
//! and before the deployer confirms the new generation, it probes what users outside the
//! machine will reach. A plain HTTP/1.0 GET; any 2xx passes.
//!
//! The agent probes `http` health checks with the same few lines; the two live apart because
//! the agent shares no code with the deployer beyond the protocol and model crates.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use flotilla_model::DeployerCheck;

/// How one deployer check ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    /// The check's name.
    pub name: String,
    /// The URL.
    pub url: String,
    /// Whether it passed.
    pub ok: bool,
    /// Probes made.
    pub probes: u32,
    /// The last probe's answer or error.
    pub output: String,
}

/// Probes `check` until it passes or `retries` probes failed.
pub fn run(name: &str, check: &DeployerCheck) -> CheckResult {
    let timeout = Duration::from_secs(u64::from(check.timeout.max(1)));
    let mut r = CheckResult { name: name.to_owned(), url: check.http.clone(), ok: false, probes: 0, output: String::new() };
    loop {
        r.probes += 1;
        match get(&check.http, timeout) {
            Ok(status) if (200..300).contains(&status.0) => {
                r.ok = true;
                r.output = status.1;
                return r;
            }
            Ok((_, line)) => r.output = line,
            Err(e) => r.output = e,
        }
        if r.probes >= check.retries.max(1) {
            return r;
        }
        std::thread::sleep(Duration::from_secs(u64::from(check.interval)));
    }
}

/// One GET; the status code and status line, or why there was none.
fn get(url: &str, timeout: Duration) -> Result<(u16, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url} is not an http:// URL"))?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    let with_port = if authority.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} has no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).and_then(|()| s.set_write_timeout(Some(timeout))).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: flotilla\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut head = Vec::new();
    s.take(4096).read_to_end(&mut head).map_err(|e| format!("reading from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    let code = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("{addr} did not answer HTTP: {line:?}"))?;
    Ok((code, line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(answer: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = l.accept() {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let _ = c.write_all(answer.as_bytes());
            }
        });
        format!("http://127.0.0.1:{port}/health")
    }

    #[test]
    fn a_2xx_passes_and_anything_else_fails_with_the_status_line() {
        let check = |url: String| DeployerCheck { http: url, timeout: 2, interval: 0, retries: 1 };
        assert!(run("ok", &check(serve_once("HTTP/1.0 204 No Content\r\n\r\n"))).ok);
        let bad = run("bad", &check(serve_once("HTTP/1.0 503 Service Unavailable\r\n\r\n")));
        assert!(!bad.ok);
        assert_eq!(bad.output, "HTTP/1.0 503 Service Unavailable");
    }
}
