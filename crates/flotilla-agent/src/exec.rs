//! `Exec`: a command run on the machine for the deployer, its stdio carried over the agent
//! connection (see `flotilla_protocol::exec`). It exists for machines the deployer reaches
//! only over the agent protocol (a VM's virtio-serial port), where `flotilla exec`, `shell`
//! and `logs` have no ssh and no nsenter to go through.
//!
//! The command runs as root inside the machine, with the environment services get (`PATH`
//! the machine's default), in `/root` (or `/`), in a session of its own, on pipes or on a
//! pseudo-terminal when the deployer asks for one. One thread carries the deployer's stdin
//! to it while this one carries its output back. It must never outlive its deployer: when
//! the connection goes (the deployer was killed, the link cut), its whole process group gets
//! SIGHUP, as a terminal's hang-up would give it, and SIGKILL soon after.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_protocol::{CommandExit, Connection, ErrorKind, OutputStream, ProtocolError, Request, Response, Terminal};

use crate::supervisor::sys;
use crate::supervisor::{Attached, AttachedStdio, ExitStatus, Supervisor, SupervisorError, DEFAULT_PATH};

/// How long a command gets between SIGHUP and SIGKILL once its deployer is gone.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// How long the output is waited for when nothing is ready, between looks at the command.
const POLL: Duration = Duration::from_millis(200);

/// Runs `argv` for the deployer on `conn` (whose `Exec` request was just read) until it
/// ends and its output is all sent, then answers `Exited`. The connection is done after it.
pub fn serve<R, W>(supervisor: &Supervisor, mut conn: Connection<R, W>, argv: Vec<String>, tty: Option<Terminal>) -> Result<(), ProtocolError>
where
    R: Read + Send + 'static,
    W: Write,
{
    let started = match Started::spawn(supervisor, &argv, tty.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            let kind = match e {
                SupervisorError::ProgramNotFound { .. } => ErrorKind::NotFound,
                SupervisorError::InvalidCommand { .. } => ErrorKind::BadRequest,
                _ => ErrorKind::Io,
            };
            return conn.send(&Response::error(kind, e.to_string()));
        }
    };
    let Started { child, stdin, outputs } = started;
    let child = Arc::new(child);
    conn.send(&Response::ExecStarted { pid: child.pid() })?;
    let (input, mut output) = conn.split();
    let gone = Arc::new(AtomicBool::new(false));
    let stdin_side = {
        let (child, gone) = (Arc::clone(&child), Arc::clone(&gone));
        std::thread::spawn(move || {
            relay_stdin(input, stdin);
            gone.store(true, Ordering::SeqCst);
            hang_up(&child);
        })
    };
    let relayed = relay_output(&child, outputs, &mut output);
    let status = child.wait();
    if let Err(e) = relayed {
        // The deployer cannot be told; make sure the command does not go on without it.
        hang_up(&child);
        return Err(e);
    }
    if gone.load(Ordering::SeqCst) {
        return Err(ProtocolError::Closed);
    }
    let status = match status {
        ExitStatus::Exited(code) => CommandExit::Code(code),
        ExitStatus::Signaled(signal) => CommandExit::Signal(signal),
    };
    output.send(&Response::Exited { status })?;
    // The deployer closes once it has the status; the connection is done only then, so
    // whoever serves the next one (a VM's serial port is reopened) finds it free.
    let _ = stdin_side.join();
    Ok(())
}

/// A spawned command and the agent's ends of its stdio.
struct Started {
    child: Attached,
    /// Where its stdin goes: a pipe's write end, or the terminal's master.
    stdin: File,
    /// Its outputs: stdout and stderr pipes, or the terminal's master (everything as stdout).
    outputs: Vec<(File, OutputStream)>,
}

impl Started {
    fn spawn(supervisor: &Supervisor, argv: &[String], tty: Option<&Terminal>) -> Result<Started, SupervisorError> {
        let sys_err = |what: &'static str| move |source| SupervisorError::System { what, source };
        let root = &supervisor.config().root;
        // `/root` as the machine sees it; a link there is the machine's and not followed.
        let cwd = if std::fs::symlink_metadata(root.join("root")).is_ok_and(|m| m.is_dir()) { "/root" } else { "/" };
        let mut env = vec![("PATH", DEFAULT_PATH.to_owned()), ("HOME", cwd.to_owned()), ("USER", "root".into()), ("LOGNAME", "root".into())];
        match tty {
            Some(t) => {
                env.push(("TERM", t.term.clone()));
                let (master, slave) = sys::open_pty(t.rows, t.cols).map_err(sys_err("opening a pseudo-terminal"))?;
                let stdio = AttachedStdio { stdin: slave.as_fd(), stdout: slave.as_fd(), stderr: slave.as_fd() };
                let child = supervisor.spawn_attached(argv, &env, cwd, stdio, true)?;
                // Only the command holds the slave now, so the master reads EIO once it is gone.
                drop(slave);
                let reader = master.try_clone().map_err(sys_err("duplicating the terminal"))?;
                Ok(Started { child, stdin: File::from(master), outputs: vec![(File::from(reader), OutputStream::Stdout)] })
            }
            None => {
                let pipe = |what| sys::pipe().map_err(sys_err(what));
                let (in_r, in_w): (OwnedFd, OwnedFd) = pipe("creating the stdin pipe")?;
                let (out_r, out_w) = pipe("creating the stdout pipe")?;
                let (err_r, err_w) = pipe("creating the stderr pipe")?;
                let stdio = AttachedStdio { stdin: in_r.as_fd(), stdout: out_w.as_fd(), stderr: err_w.as_fd() };
                let child = supervisor.spawn_attached(argv, &env, cwd, stdio, false)?;
                drop((in_r, out_w, err_w));
                let outputs = vec![(File::from(out_r), OutputStream::Stdout), (File::from(err_r), OutputStream::Stderr)];
                Ok(Started { child, stdin: File::from(in_w), outputs })
            }
        }
    }
}

/// Copies the deployer's stdin stream to the command until it ends, then waits for the
/// deployer to close the connection (it sends nothing more): returns when it is gone.
fn relay_stdin<R: Read, W: Write>(mut input: Connection<R, W>, stdin: File) {
    let mut stdin = Some(stdin);
    {
        let mut reader = input.data_reader();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    // A command that closed its stdin does not want the rest: it is dropped.
                    if let Some(Err(_)) = stdin.as_mut().map(|s| s.write_all(&buf[..n])) {
                        stdin = None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
        if reader.finish().is_err() {
            return;
        }
    }
    // End of stdin: a pipe is closed so the command reads end of file; a terminal stays.
    drop(stdin);
    // Nothing more may come; whatever does (the end of the connection, or a protocol
    // violation) means the deployer is done with the command.
    let _ = input.recv::<Request>();
}

/// Sends the command's output as it comes, until every output is closed, or the command has
/// ended and nothing more is ready (a background process it left may hold them open).
fn relay_output<R: Read, W: Write>(child: &Attached, mut outputs: Vec<(File, OutputStream)>, conn: &mut Connection<R, W>) -> Result<(), ProtocolError> {
    let mut buf = vec![0u8; 64 * 1024];
    while !outputs.is_empty() {
        let ended = child.try_wait().is_some();
        let fds: Vec<_> = outputs.iter().map(|(f, _)| f.as_fd()).collect();
        let ready = sys::poll_readable(&fds, POLL).map_err(|source| ProtocolError::Io { during: "waiting for the command's output", source })?;
        if ended && !ready.iter().any(|r| *r) {
            return Ok(());
        }
        let mut closed = Vec::new();
        for (i, is_ready) in ready.into_iter().enumerate() {
            if !is_ready {
                continue;
            }
            let (file, stream) = &mut outputs[i];
            match file.read(&mut buf) {
                Ok(0) => closed.push(i),
                Ok(n) => conn.send_output(*stream, &buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A terminal's master reads EIO once the last holder of its slave is gone.
                Err(_) => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            outputs.remove(i);
        }
    }
    Ok(())
}

/// The deployer is gone: SIGHUP to the command's process group, SIGKILL if it is still there
/// after [`HANGUP_GRACE`]. Does nothing once the command has ended.
fn hang_up(child: &Attached) {
    if !child.signal_group(libc::SIGHUP) {
        return;
    }
    // A stopped process would not act on SIGHUP before it is continued.
    child.signal_group(libc::SIGCONT);
    let deadline = Instant::now() + HANGUP_GRACE;
    while Instant::now() < deadline {
        if child.try_wait().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.signal_group(libc::SIGKILL);
}
