//! The agent's side of the protocol: one thread per deployer connection on the control
//! socket, each request carried out under one lock so two deploys never interleave on a
//! machine. Errors go back to the deployer as messages for its user; internals stay here.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use flotilla_protocol::{server_handshake, Connection, ErrorKind, ProtocolError, Request, Response};

use crate::activate::{Agent, AgentError};

/// The agent's version, told to deployers in the handshake.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Accepts connections until the listener fails; each is served on its own thread.
pub fn serve(agent: Arc<Mutex<Agent>>, listener: UnixListener) {
    for stream in listener.incoming() {
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

fn handle(agent: &Mutex<Agent>, stream: UnixStream) -> Result<(), ProtocolError> {
    let mut conn = Connection::unix(stream)?;
    let root = agent.lock().expect("agent lock").root().root().to_string_lossy().into_owned();
    server_handshake(&mut conn, AGENT_VERSION, &root)?;
    loop {
        let request: Request = match conn.recv() {
            Ok(r) => r,
            Err(ProtocolError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        if matches!(request, Request::Goodbye) {
            return Ok(());
        }
        let response = {
            let agent = agent.lock().unwrap_or_else(|p| p.into_inner());
            dispatch(&agent, request, &mut conn)?
        };
        conn.send(&response)?;
    }
}

fn dispatch<R: io::Read, W: io::Write>(agent: &Agent, request: Request, conn: &mut Connection<R, W>) -> Result<Response, ProtocolError> {
    Ok(match request {
        Request::QueryMissing { paths } => Response::Missing { paths: agent.root().missing(&paths) },
        Request::AddPaths { paths, compression } => {
            let mut reader = conn.bulk_reader(compression)?;
            let result = agent.root().receive(&paths, &mut reader);
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
        Request::Activate { toplevel, goal, confirm_within_secs } => {
            if confirm_within_secs.is_some() {
                return Ok(Response::error(ErrorKind::Unsupported, "this agent does not support confirmed (magic-rollback) activation yet"));
            }
            match agent.activate(&toplevel, goal) {
                Ok((generation, report)) => Response::Activated { generation, report },
                Err(e) => error(e),
            }
        }
        Request::Rollback { to } => match agent.rollback(to) {
            Ok((generation, report)) => Response::Activated { generation, report },
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
            services: agent.supervisor().status(),
        },
        Request::Confirm { .. } => Response::error(ErrorKind::Unsupported, "this agent does not support confirmed (magic-rollback) activation yet"),
        Request::Goodbye => unreachable!("handled by the caller"),
    })
}

fn error(e: AgentError) -> Response {
    let kind = match e {
        AgentError::NotFound(_) => ErrorKind::NotFound,
        AgentError::Io { .. } => ErrorKind::Io,
        AgentError::Activation(_) => ErrorKind::Activation,
    };
    Response::error(kind, e.to_string())
}
