//! The deployer's side of `Exec`: a command run on a machine over its agent connection, with
//! this process's stdin, stdout and stderr relayed (see `flotilla_protocol::exec`). It is how
//! `flotilla exec`, `shell` and `logs` reach a machine that has nothing but the agent
//! protocol (a VM's virtio-serial port): the platform's [`crate::platform::Machine::command`]
//! runs `flotilla agent-exec`, which comes here.
//!
//! A command may run for as long as it likes, so no answer timeout applies once it started;
//! the connection ending is the only end. Output this process cannot write (its reader went
//! away) is dropped and the command runs to its end with its own status, as `exec` does on
//! every platform.

use std::io::{Read, Write};
use std::time::Duration;

use flotilla_protocol::{CommandExit, ExecEvent, OutputStream, Request, Response, Terminal, EXEC_PROTOCOL_VERSION};

use crate::deadline::Limit;
use crate::remote::{AgentClient, RemoteError};

impl AgentClient {
    /// Runs `argv` on the machine (on a pseudo-terminal of the given size and type with
    /// `tty`), copying `stdin` to it and its output to `stdout` and `stderr` as it comes, and
    /// returns how it ended. The connection is used up: the agent closes it after.
    ///
    /// `stdin` is read on a thread of its own that may stay blocked in a read after the
    /// command ended (a terminal nobody types on): give it something the caller can leave.
    pub fn exec(
        mut self,
        argv: &[String],
        tty: Option<Terminal>,
        stdin: Box<dyn Read + Send>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<CommandExit, RemoteError> {
        if self.welcome().version < EXEC_PROTOCOL_VERSION {
            return Err(RemoteError::TooOld {
                agent: self.agent_name().to_owned(),
                fix: self.too_old_fix(),
                speaks: self.welcome().version,
                needs: EXEC_PROTOCOL_VERSION,
                what: "run commands",
            });
        }
        let request = Request::Exec { argv: argv.to_vec(), tty };
        match self.call_now(&request)? {
            Response::ExecStarted { .. } => {}
            other => return Err(RemoteError::Unexpected { request: "exec", got: other.name() }),
        }
        // From now on the command decides how long this takes.
        self.set_limit(Limit::Stall(Duration::MAX));
        let program = argv.first().map_or("", String::as_str);
        let (conn, asked) = self.into_connection(format!("to run `{program}`"));
        let (mut from_agent, mut to_agent) = conn.split();
        // The writing half is handed back, never dropped, so that a transport whose halves
        // are separate (ssh's pipes) does not end the connection at the end of stdin.
        let stdin_side = std::thread::spawn(move || {
            let mut stdin = stdin;
            let mut buf = vec![0u8; 64 * 1024];
            let mut w = to_agent.data_writer();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => 0, // unreadable stdin is as good as none
                };
                if n == 0 {
                    let _ = w.finish();
                    break;
                }
                if w.write_all(&buf[..n]).and_then(|()| w.flush()).is_err() {
                    // The agent is gone; the output side says how.
                    drop(w);
                    break;
                }
            }
            to_agent
        });
        let (mut out_ok, mut err_ok) = (true, true);
        let ended = loop {
            match from_agent.recv_exec_event() {
                Ok(ExecEvent::Output(OutputStream::Stdout, bytes)) => {
                    out_ok = out_ok && stdout.write_all(bytes).and_then(|()| stdout.flush()).is_ok();
                }
                Ok(ExecEvent::Output(OutputStream::Stderr, bytes)) => {
                    err_ok = err_ok && stderr.write_all(bytes).and_then(|()| stderr.flush()).is_ok();
                }
                Ok(ExecEvent::End(end)) => match *end {
                    Response::Exited { status } => break Ok(status),
                    Response::Error { kind, message } => break Err(RemoteError::Agent { kind, message }),
                    other => break Err(RemoteError::Unexpected { request: "exec", got: other.name() }),
                },
                Err(e) => break Err(asked.explain(e.into())),
            }
        };
        // Not joined: it may be waiting for a key nobody will press.
        drop(stdin_side);
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_protocol::{server_handshake_range, Connection, ErrorKind, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
    use std::os::unix::net::UnixStream;

    /// A client connected to an agent played by `agent` (after its handshake, speaking
    /// protocol versions `min..=max`).
    fn client_of(min: u32, max: u32, agent: impl FnOnce(Connection<UnixStream, UnixStream>) + Send + 'static) -> AgentClient {
        let (near, far) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut conn = Connection::unix(far).unwrap();
            server_handshake_range(&mut conn, "0.0.1", "/", min, max).unwrap();
            agent(conn);
        });
        let reader = near.try_clone().unwrap();
        AgentClient::over("web1", reader, near).unwrap()
    }

    #[test]
    fn an_agent_from_before_exec_is_said_to_be_too_old_and_is_sent_nothing() {
        let (tx, rx) = std::sync::mpsc::channel();
        let client = client_of(MIN_PROTOCOL_VERSION, EXEC_PROTOCOL_VERSION - 1, move |mut conn| {
            let _ = tx.send(conn.recv::<Request>().map(|r| r.name()).map_err(|e| e.to_string()));
        });
        let err = client.exec(&["true".into()], None, Box::new(std::io::empty()), &mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the agent of machine web1 is too old to run commands (it speaks protocol 2, that needs 3); redeploy it: `flotilla deploy --on web1`"
        );
        // The client hung up without a request, which the old agent sees as a closed connection.
        let seen = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(seen.is_err(), "{seen:?}");
    }

    #[test]
    fn an_agent_that_refuses_says_why_and_one_that_vanishes_is_named() {
        let client = client_of(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, |mut conn| {
            let _ = conn.recv::<Request>();
            conn.send(&Response::error(ErrorKind::NotFound, "no program \"nosuch\" in PATH")).unwrap();
        });
        match client.exec(&["nosuch".into()], None, Box::new(std::io::empty()), &mut Vec::new(), &mut Vec::new()) {
            Err(RemoteError::Agent { kind: ErrorKind::NotFound, message }) => assert_eq!(message, "no program \"nosuch\" in PATH"),
            other => panic!("{other:?}"),
        }
        let client = client_of(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, |mut conn| {
            let _ = conn.recv::<Request>();
            conn.send(&Response::ExecStarted { pid: 9 }).unwrap();
            conn.send_output(OutputStream::Stdout, b"partial").unwrap();
        });
        let mut out = Vec::new();
        let err = client.exec(&["cat".into()], None, Box::new(std::io::empty()), &mut out, &mut Vec::new()).unwrap_err();
        assert_eq!(out, b"partial");
        assert!(matches!(err, RemoteError::AgentGone { .. }), "{err:?}");
        assert!(err.to_string().starts_with("the agent of machine web1 closed the connection while it was asked to run `cat`"), "{err}");
    }
}
