//! `flotilla-agent forward --forward HOSTPORT:IP:PORT...`: relays TCP connections from
//! `127.0.0.1:HOSTPORT` to `IP:PORT`, as a local container's monitor does for its forwards, for
//! machines that have no monitor of their own (a qemu VM on the deployment's bridge). It binds
//! every listener first and says `ready` on stdout, or exits 1 with the reason, so the
//! deployer that starts it knows; then it serves until it is killed.

use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener};

use crate::cli::{Arg, Parser, UsageError};
use crate::container::{serve_forward, Forward};

/// Why `forward` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The command line was wrong.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// A port could not be listened on.
    #[error("cannot listen on 127.0.0.1:{port} for forward {forward}: {source}")]
    Bind {
        /// The host port.
        port: u16,
        /// The forward.
        forward: Forward,
        /// Why.
        source: std::io::Error,
    },
}

/// Parses `--forward` specs (at least one, each host port once).
pub fn parse(args: &[String]) -> Result<Vec<Forward>, UsageError> {
    let help = "flotilla-agent --help";
    let mut forwards: Vec<Forward> = Vec::new();
    for arg in Parser::new(args, &["--forward"], &[], help) {
        match arg? {
            Arg::Value("--forward", spec) => {
                let f = Forward::parse(spec).map_err(|e| UsageError::Invalid(format!("--forward {spec}: {e}")))?;
                if forwards.iter().any(|o| o.host_port == f.host_port) {
                    return Err(UsageError::Invalid(format!("--forward {spec}: host port {} is forwarded twice", f.host_port)));
                }
                forwards.push(f);
            }
            Arg::Positional(p) => return Err(UsageError::Unexpected { arg: p.to_owned(), help }),
            _ => unreachable!("forward takes only --forward"),
        }
    }
    if forwards.is_empty() {
        return Err(UsageError::Required { option: "--forward", help });
    }
    Ok(forwards)
}

/// Binds every forward's listener, says `ready`, and serves them until killed.
pub fn run(forwards: &[Forward]) -> Result<(), ForwardError> {
    let mut listeners = Vec::new();
    for f in forwards {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, f.host_port)).map_err(|source| ForwardError::Bind { port: f.host_port, forward: *f, source })?;
        listeners.push((listener, *f));
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    drop(out);
    let threads: Vec<_> = listeners.into_iter().map(|(l, f)| std::thread::spawn(move || serve_forward(l, f))).collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn forwards_are_parsed_and_a_port_forwarded_twice_is_refused() {
        let f = parse(&args("--forward 8083:10.231.0.4:80 --forward 8443:10.231.0.4:443")).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].to_string(), "8443:10.231.0.4:443");
        assert!(parse(&args("--forward 8083:10.231.0.4:80 --forward 8083:10.231.0.5:80")).unwrap_err().to_string().contains("forwarded twice"));
        assert!(parse(&[]).unwrap_err().to_string().contains("--forward is required"));
        assert!(parse(&args("--forward nope")).is_err());
    }
}
