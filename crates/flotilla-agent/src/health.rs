//! Health checks: the agent's own probes of the services it runs, after an activation and
//! when a deployer asks. A check is one of an `http` URL answering 2xx, a `tcp` port
//! accepting a connection, or a `command` exiting 0, probed every `interval` seconds until it
//! passes or `retries` probes have failed (or the activation's deadline passes).
//!
//! The probes run inside the machine: in a container the agent is PID 1 of its network
//! namespace, so `127.0.0.1` is the machine itself. Names are resolved through the machine's
//! own `/etc/hosts` (the agent is static and never calls into NSS).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use flotilla_model::HealthCheck;
use flotilla_protocol::HealthResult;

use crate::machine::MachineRoot;
use crate::supervisor::Supervisor;

/// Output kept from a probe for the user.
const OUTPUT_LIMIT: usize = 2048;

/// What one probe of a check found.
struct Probe {
    ok: bool,
    output: String,
}

/// How a check is shown to users: `http http://127.0.0.1/`, `tcp 5432`, `command /bin/true`.
pub fn describe(check: &HealthCheck) -> String {
    if let Some(url) = &check.http {
        format!("http {url}")
    } else if let Some(port) = check.tcp {
        format!("tcp {port}")
    } else if let Some(argv) = &check.command {
        format!("command {}", argv.join(" "))
    } else {
        "none".into()
    }
}

/// Probes `check` of `service` until it passes, `retries` probes failed, or `deadline`.
/// `once` makes a single probe (what `flotilla check` asks for).
pub fn run(root: &MachineRoot, supervisor: &Supervisor, service: &str, check: &HealthCheck, deadline: Option<Instant>, once: bool) -> HealthResult {
    let allowed = if once { 1 } else { check.retries.max(1) };
    let timeout = Duration::from_secs(u64::from(check.timeout.max(1)));
    let interval = Duration::from_secs(u64::from(check.interval));
    let mut result = HealthResult { service: service.to_owned(), check: describe(check), healthy: false, probes: 0, output: String::new() };
    loop {
        let probe_timeout = match deadline {
            Some(d) => timeout.min(d.saturating_duration_since(Instant::now())).max(Duration::from_millis(100)),
            None => timeout,
        };
        let probe = probe(root, supervisor, check, probe_timeout);
        result.probes += 1;
        result.output = probe.output;
        if probe.ok {
            result.healthy = true;
            return result;
        }
        if result.probes >= allowed {
            return result;
        }
        if deadline.is_some_and(|d| Instant::now() + interval >= d) {
            result.output = format!("{} (the check timeout ended the probes)", result.output);
            return result;
        }
        std::thread::sleep(interval);
    }
}

fn probe(root: &MachineRoot, supervisor: &Supervisor, check: &HealthCheck, timeout: Duration) -> Probe {
    if let Some(url) = &check.http {
        return http(root, url, timeout);
    }
    if let Some(port) = check.tcp {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        return match TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => Probe { ok: true, output: format!("port {port} accepts connections") },
            Err(e) => Probe { ok: false, output: format!("connecting to port {port}: {e}") },
        };
    }
    if let Some(argv) = &check.command {
        return match supervisor.run_command(argv, timeout) {
            Ok(out) => {
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                let text = truncate(text.trim());
                let ok = out.status.success();
                Probe { ok, output: if text.is_empty() { out.status.to_string() } else { format!("{}: {text}", out.status) } }
            }
            Err(e) => Probe { ok: false, output: e.to_string() },
        };
    }
    Probe { ok: false, output: "the check names nothing to probe".into() }
}

/// One `GET` over HTTP/1.0; a 2xx status passes.
fn http(root: &MachineRoot, url: &str, timeout: Duration) -> Probe {
    let fail = |output: String| Probe { ok: false, output };
    let Some(rest) = url.strip_prefix("http://") else {
        return fail(format!("{url} is not an http:// URL"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h, p),
            Err(_) => return fail(format!("{url}: {p:?} is not a port")),
        },
        _ => (authority, 80),
    };
    let host_bare = host.trim_start_matches('[').trim_end_matches(']');
    let Some(ip) = resolve(root, host_bare) else {
        return fail(format!("{url}: cannot resolve {host_bare} through the machine's /etc/hosts; use an address or a name listed there"));
    };
    let addr = SocketAddr::new(ip, port);
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return fail(format!("connecting to {addr}: {e}")),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: flotilla-agent\r\nConnection: close\r\n\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()) {
        return fail(format!("sending the request to {addr}: {e}"));
    }
    let mut answer = Vec::new();
    if let Err(e) = stream.take(64 * 1024).read_to_end(&mut answer) {
        if answer.is_empty() {
            return fail(format!("reading the answer from {addr}: {e}"));
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or("").trim().to_owned();
    let code = status_line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("");
    let output = if body.is_empty() { status_line.clone() } else { truncate(&format!("{status_line}: {body}")) };
    match code {
        Some(c) if (200..300).contains(&c) => Probe { ok: true, output },
        Some(_) => Probe { ok: false, output },
        None => fail(format!("{addr} did not answer HTTP: {}", truncate(&text))),
    }
}

/// An address literal, `localhost`, or a name from the machine's `/etc/hosts`.
pub(crate) fn resolve(root: &MachineRoot, host: &str) -> Option<IpAddr> {
    if let Ok(ip) = host.parse() {
        return Some(ip);
    }
    if host == "localhost" {
        return Some(IpAddr::from([127, 0, 0, 1]));
    }
    let hosts = std::fs::read_to_string(root.path("/etc/hosts")).ok()?;
    hosts.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let ip: IpAddr = fields.next()?.parse().ok()?;
        fields.any(|name| name == host).then_some(ip)
    })
}

fn truncate(s: &str) -> String {
    if s.len() <= OUTPUT_LIMIT {
        return s.to_owned();
    }
    let mut end = OUTPUT_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_read_as_users_wrote_them() {
        let base = HealthCheck { http: None, tcp: None, command: None, timeout: 1, interval: 0, retries: 1 };
        assert_eq!(describe(&HealthCheck { tcp: Some(5432), ..base.clone() }), "tcp 5432");
        assert_eq!(describe(&HealthCheck { http: Some("http://127.0.0.1/".into()), ..base }), "http http://127.0.0.1/");
    }

    #[test]
    fn long_output_is_cut_on_a_character_boundary() {
        let s = "é".repeat(OUTPUT_LIMIT);
        let t = truncate(&s);
        assert!(t.len() <= OUTPUT_LIMIT + "…".len());
        assert!(t.ends_with('…'));
    }

    #[test]
    fn names_resolve_through_the_machine_hosts_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/hosts"), "127.0.0.1 localhost\n10.1.2.3 web1 web1.local # a comment\n").unwrap();
        let root = MachineRoot::new(dir.path());
        assert_eq!(resolve(&root, "web1.local"), Some(IpAddr::from([10, 1, 2, 3])));
        assert_eq!(resolve(&root, "10.9.9.9"), Some(IpAddr::from([10, 9, 9, 9])));
        assert_eq!(resolve(&root, "elsewhere"), None);
    }
}
