//! The agent's side of the protocol: one thread per deployer connection on the control
//! socket, each request carried out under one lock so two deploys never interleave on a
//! machine. Errors go back to the deployer as messages for its user; internals stay here.
//!
//! Each connection has a number, so that a confirmation can be told to come over a new one.
//! An activation that awaits confirmation gets a timer thread that rolls it back at the
//! deadline unless the confirmation came first.

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_protocol::{server_handshake, server_handshake_range, ActivationGoal, Connection, ErrorKind, ProtocolError, Request, Response};

use crate::activate::Agent;
use crate::error::AgentError;

/// The agent's version, told to deployers in the handshake.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Accepts connections, each served on its own thread, until the listener fails or is
/// retired (`retired` set and the listener shut down, which wakes its accept).
fn serve_until(agent: Arc<Mutex<Agent>>, listener: &UnixListener, retired: &AtomicBool) {
    for stream in listener.incoming() {
        if retired.load(Ordering::SeqCst) {
            return;
        }
        match stream {
            Ok(stream) => {
                let agent = Arc::clone(&agent);
                std::thread::spawn(move || {
                    if let Err(e) = handle(&agent, stream) {
                        eprintln!("flotilla-agent: connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("flotilla-agent: accept failed: {e}");
                break;
            }
        }
    }
}

/// How often the agent looks whether its socket's path still leads to its socket.
const SOCKET_WATCH: Duration = Duration::from_secs(1);

/// Keeps the agent's socket while it lives; [`SocketKeeper::stop`] before removing it.
pub struct SocketKeeper {
    stopped: Arc<AtomicBool>,
}

impl SocketKeeper {
    /// Stops watching the socket (the agent is stopping and removes it).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}

/// One listener and its accept loop, which ends when it is retired.
struct Serving {
    retired: Arc<AtomicBool>,
    listener: Arc<UnixListener>,
}

impl Serving {
    fn start(agent: &Arc<Mutex<Agent>>, listener: UnixListener) -> Serving {
        let retired = Arc::new(AtomicBool::new(false));
        let listener = Arc::new(listener);
        let (agent, flag, serving) = (Arc::clone(agent), Arc::clone(&retired), Arc::clone(&listener));
        std::thread::spawn(move || serve_until(agent, &serving, &flag));
        Serving { retired, listener }
    }

    /// Ends the accept loop, which closes the listener, so that a service removing the
    /// socket again and again costs no descriptor and no thread each time.
    fn retire(self) {
        use std::os::fd::AsFd as _;
        self.retired.store(true, Ordering::SeqCst);
        if let Err(e) = crate::supervisor::sys::shut_down_listener(self.listener.as_fd()) {
            eprintln!("flotilla-agent: cannot close the socket it no longer listens on: {e}");
        }
    }
}

/// Listens on `socket`, and keeps listening there for the agent's life: a service (root on
/// its machine) that removes or replaces the socket would otherwise cut every deployer
/// command off the machine, the `reboot`, `deploy` or `rollback` that would undo it included.
/// Once a second the path's device and inode are compared with the socket bound; when they
/// differ a new socket is bound beside it and renamed over whatever is there, and the old
/// listener is closed.
pub fn listen(agent: Arc<Mutex<Agent>>, socket: &Path) -> io::Result<SocketKeeper> {
    let (listener, mut ours) = bind(socket)?;
    let mut serving = Serving::start(&agent, listener);
    let stopped = Arc::new(AtomicBool::new(false));
    let keeper = SocketKeeper { stopped: Arc::clone(&stopped) };
    let socket = socket.to_owned();
    std::thread::spawn(move || loop {
        std::thread::sleep(SOCKET_WATCH);
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        if identity(&socket).is_ok_and(|id| id == ours) {
            continue;
        }
        match bind(&socket) {
            Ok((listener, id)) => {
                eprintln!("flotilla-agent: {} was removed or replaced; listening there again", socket.display());
                ours = id;
                std::mem::replace(&mut serving, Serving::start(&agent, listener)).retire();
            }
            Err(e) => eprintln!("flotilla-agent: {} was removed or replaced, and binding it again failed: {e}", socket.display()),
        }
    });
    Ok(keeper)
}

/// A path's device and inode, not following a link.
fn identity(path: &Path) -> io::Result<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Binds a socket at a temporary name beside `socket` and renames it into place, so the path
/// never misses a socket that answers once it had one.
fn bind(socket: &Path) -> io::Result<(UnixListener, (u64, u64))> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let name = socket.file_name().unwrap_or_default().to_string_lossy();
    let tmp = socket.with_file_name(format!(".{name}.new"));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let id = identity(&tmp).and_then(|id| std::fs::rename(&tmp, socket).map(|()| id));
    if id.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok((listener, id?))
}

/// A test double for an older release: debug builds started with
/// `FLOTILLA_AGENT_TEST_PLAY_PROTOCOL=N` speak only protocol version N, so the deployer's
/// replacement of an outdated agent can be tested without keeping old binaries around.
/// Release builds ignore it.
fn played_protocol() -> Option<u32> {
    if !cfg!(debug_assertions) {
        return None;
    }
    std::env::var("FLOTILLA_AGENT_TEST_PLAY_PROTOCOL").ok()?.parse().ok()
}

/// Numbers connections, for [`Agent::confirm`].
static CONNECTIONS: AtomicU64 = AtomicU64::new(1);

fn handle(agent: &Arc<Mutex<Agent>>, stream: UnixStream) -> Result<(), ProtocolError> {
    serve_connection(agent, Connection::unix(stream)?)
}

/// Serves one deployer connection over any byte stream (the control socket, a VM's
/// virtio-serial port) until the deployer leaves.
pub fn serve_connection<R: io::Read + Send + 'static, W: io::Write>(agent: &Arc<Mutex<Agent>>, mut conn: Connection<R, W>) -> Result<(), ProtocolError> {
    let id = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    let root = agent.lock().expect("agent lock").root().root().to_string_lossy().into_owned();
    let shaken = match played_protocol() {
        None => server_handshake(&mut conn, AGENT_VERSION, &root),
        Some(v) => server_handshake_range(&mut conn, AGENT_VERSION, &root, v, v),
    };
    match shaken {
        // A probe (`status-line`, `init --detach`) connects and leaves without a word.
        Err(ProtocolError::Closed) => return Ok(()),
        result => result?,
    };
    let mut served = Served { connection: id, requests: Vec::new() };
    loop {
        let request: Request = match conn.recv() {
            Ok(r) => r,
            Err(ProtocolError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        served.requests.push(request.name());
        if matches!(request, Request::Goodbye) {
            return Ok(());
        }
        // A command runs as long as it likes, so it runs outside the agent's lock; it is the
        // connection's last request.
        if let Request::Exec { argv, tty } = request {
            let supervisor = agent.lock().unwrap_or_else(|p| p.into_inner()).shared_supervisor();
            return crate::exec::serve(&supervisor, conn, argv, tty);
        }
        if matches!(request, Request::PowerOff) {
            // Answered first: the services stop and the machine powers off under this
            // connection, which then just ends.
            if !crate::vm::is_vm_init() {
                conn.send(&Response::error(ErrorKind::Unsupported, "only a VM's agent powers its machine off; this agent is not a VM's init (stop the machine with `flotilla stop`)"))?;
                continue;
            }
            conn.send(&Response::PoweringOff)?;
            if !crate::vm::request_power_off() {
                eprintln!("flotilla-agent: a deployer asked for power off, and it could not start");
            }
            return Ok(());
        }
        let response = {
            let agent = agent.lock().unwrap_or_else(|p| p.into_inner());
            dispatch(&agent, request, &mut conn, id)?
        };
        if let Response::Activated { generation, awaiting_confirmation: true, .. } = &response {
            watch_confirmation(Arc::clone(agent), *generation);
        }
        conn.send(&response)?;
    }
}

/// What a connection asked, said in the agent's log when it ends (one line a connection):
/// what each deployer did on the machine, and how many round trips a deploy cost it.
struct Served {
    connection: u64,
    requests: Vec<&'static str>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let asked = self.requests.iter().filter(|r| **r != "goodbye").count();
        if asked > 0 {
            eprintln!("flotilla-agent: connection {} served {asked} request{}: {}", self.connection, if asked == 1 { "" } else { "s" }, self.requests.join(" "));
        }
    }
}

/// Rolls `generation` back at its confirmation deadline, unless it was confirmed by then.
fn watch_confirmation(agent: Arc<Mutex<Agent>>, generation: u64) {
    std::thread::spawn(move || loop {
        let deadline = agent.lock().unwrap_or_else(|p| p.into_inner()).confirmation_deadline(generation);
        let Some(deadline) = deadline else { return };
        let now = Instant::now();
        if now < deadline {
            std::thread::sleep((deadline - now).min(Duration::from_millis(500)));
            continue;
        }
        if let Some(what) = agent.lock().unwrap_or_else(|p| p.into_inner()).expire(generation) {
            eprintln!("flotilla-agent: {what}");
        }
        return;
    });
}

fn dispatch<R: io::Read, W: io::Write>(agent: &Agent, request: Request, conn: &mut Connection<R, W>, id: u64) -> Result<Response, ProtocolError> {
    Ok(match request {
        // Only the registry answers. A path at its final name that is not registered (on a
        // machine with Nix, Nix's own) is reported missing and sent: telling whether it is the
        // same path needs the NAR hash the deployer announces only with AddPaths, where
        // `receive` then keeps it unchanged if it matches.
        Request::QueryMissing { paths } => Response::Missing { paths: agent.root().missing(&paths) },
        Request::AddPaths { paths, compression } => {
            let mut reader = conn.bulk_reader(compression)?;
            let result = agent.root().receive(&paths, &mut reader, &agent.nix_runner());
            // Read the stream to its end whatever happened, so the answer can be sent.
            match &result {
                Ok(_) => reader.finish()?,
                Err(_) => reader.drain()?,
            };
            match result {
                Ok((paths, bytes)) => Response::PathsAdded { paths, bytes },
                Err(e @ crate::machine::ReceiveError::Integrity { .. }) => Response::error(ErrorKind::Integrity, e.to_string()),
                Err(e) => Response::error(ErrorKind::Io, e.to_string()),
            }
        }
        Request::Substitute { paths, caches, trusted_keys } => {
            // Progress keeps the deployer waiting as long as paths keep coming; a send that
            // fails is noticed by the final answer's.
            let mut progress = |message: String| {
                let _ = conn.send(&Response::Progress { message });
            };
            match crate::substitute::substitute(agent.root(), &paths, &caches, &trusted_keys, &agent.nix_runner(), &mut progress) {
                Ok(done) => Response::Substituted { got: done.got, bytes: done.bytes, missed: done.missed },
                Err(e) => Response::error(ErrorKind::BadRequest, e.to_string()),
            }
        }
        Request::Plan { toplevel, manifest, keys_written, goal } => match agent.plan(&toplevel, manifest.as_deref(), &keys_written, goal.unwrap_or(ActivationGoal::Switch)) {
            Ok(plan) => Response::Planned { plan },
            Err(e) => error(e),
        },
        Request::Activate { toplevel, goal, confirm_within_secs, check_timeout_secs } => {
            let (check, confirm) = (check_timeout_secs.map(Duration::from_secs), confirm_within_secs.map(Duration::from_secs));
            match agent.activate_checked(&toplevel, goal, check, confirm, id) {
                Ok(a) => Response::Activated { generation: a.generation, report: a.report, health: a.health, awaiting_confirmation: a.awaiting_confirmation },
                Err(e) => {
                    eprintln!("flotilla-agent: activating {toplevel}: {e}");
                    error(e)
                }
            }
        }
        Request::Confirm { generation } => match agent.confirm(generation, id) {
            Ok(()) => Response::Confirmed { generation },
            Err(e) => error(e),
        },
        Request::Rollback { to, reason } => match agent.rollback(to, reason.as_deref()) {
            Ok((generation, report)) => Response::Activated { generation, report, health: Vec::new(), awaiting_confirmation: false },
            Err(e) => error(e),
        },
        Request::CheckHealth => Response::Health { services: agent.check_health() },
        Request::ListKeys => match agent.list_keys() {
            Ok(keys) => Response::Keys { keys },
            Err(e) => error(e),
        },
        Request::PutKeys { put, remove, switching_to } => match agent.put_keys(&put, &remove, switching_to.as_ref()) {
            Ok(k) => Response::KeysPut { written: k.written, removed: k.removed, restarted: k.restarted, started: k.started },
            Err(e) => error(e),
        },
        Request::ListGenerations => match agent.generations() {
            Ok(generations) => Response::Generations { generations },
            Err(e) => error(e),
        },
        Request::DeleteGenerations { keep_last, older_than_secs } => match agent.delete_generations(keep_last, older_than_secs) {
            Ok(deleted) => Response::GenerationsDeleted { deleted },
            Err(e) => error(e),
        },
        Request::CollectGarbage => match agent.collect_garbage() {
            Ok((paths, bytes)) => Response::GarbageCollected { paths, bytes },
            Err(e) => error(e),
        },
        Request::Status => Response::Status {
            generation: agent.current_generation(),
            toplevel: agent.running_system(),
            services: agent.service_status(),
            store_free_bytes: agent.store_free_bytes(),
            pending_confirmation: agent.pending_confirmation(),
        },
        Request::Current { toplevel, goal, keys } => Response::Current {
            differs: agent.differs(&toplevel, goal, &keys),
            generation: agent.current_generation(),
            toplevel: agent.running_system(),
            services: agent.service_status(),
            store_free_bytes: agent.store_free_bytes(),
            pending_confirmation: agent.pending_confirmation(),
        },
        Request::Goodbye | Request::Exec { .. } | Request::PowerOff => unreachable!("handled by the caller"),
    })
}

fn error(e: AgentError) -> Response {
    let kind = match e {
        AgentError::NotFound(_) => ErrorKind::NotFound,
        AgentError::Io { .. } => ErrorKind::Io,
        AgentError::Activation(_) => ErrorKind::Activation,
        AgentError::Unhealthy(_) => ErrorKind::Unhealthy,
        AgentError::BadRequest(_) => ErrorKind::BadRequest,
        AgentError::Conflict(_) => ErrorKind::Conflict,
    };
    Response::error(kind, e.to_string())
}
