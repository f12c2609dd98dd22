//! The handshake that opens every connection: the client says which protocol versions it
//! speaks, the agent picks one or refuses. It exists so that a deployer and an agent built
//! from different flotilla versions fail at the first message with advice, instead of
//! misreading each other later. It must never proceed on a version outside both ranges, and
//! the [`Hello`] / [`HandshakeReply`] shapes must never change incompatibly.

use std::io::{self, Read, Write};

use crate::connection::Connection;
use crate::error::{versions, ProtocolError, Result};
use crate::message::{HandshakeReply, Hello, Refused, Welcome, MAGIC};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Opens the conversation as the client (the deployer): sends [`Hello`] and returns the
/// agent's [`Welcome`]. A refusal becomes [`ProtocolError::AgentRefused`] with advice; a peer
/// that is not an agent becomes [`ProtocolError::NotAnAgent`] showing what it sent.
pub fn client_handshake<R: Read, W: Write>(
    conn: &mut Connection<R, W>,
    client_name: &str,
) -> Result<Welcome> {
    client_handshake_range(conn, client_name, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
}

/// [`client_handshake`] offering the versions `min..=max`; tests use it to play other releases.
pub(crate) fn client_handshake_range<R: Read, W: Write>(
    conn: &mut Connection<R, W>,
    client_name: &str,
    min: u32,
    max: u32,
) -> Result<Welcome> {
    let hello = Hello {
        magic: MAGIC.to_owned(),
        min_version: min,
        max_version: max,
        client: client_name.to_owned(),
    };
    // A broken pipe means the other side is gone: the agent never started (`ssh host
    // flotilla-agent` found no such command) or something else answered and quit. What it
    // sent before quitting, if anything, tells the two apart, so read that before giving up.
    let peer_gone = match conn.send(&hello) {
        Ok(()) => false,
        Err(ProtocolError::Io { source, .. }) if source.kind() == io::ErrorKind::BrokenPipe => true,
        Err(e) => return Err(e),
    };
    let reply = conn.recv::<HandshakeReply>().map_err(|e| match e {
        ProtocolError::Closed => ProtocolError::HandshakeClosed,
        ProtocolError::Io { ref source, .. } if source.kind() == io::ErrorKind::ConnectionReset => {
            ProtocolError::HandshakeClosed
        }
        ProtocolError::Decode { .. } => ProtocolError::NotAnAgent {
            preview: conn.preview_of_last_read(true),
        },
        ProtocolError::Truncated { .. }
        | ProtocolError::FrameTooLarge { .. }
        | ProtocolError::UnknownFrameKind { .. }
        | ProtocolError::MalformedFrame { .. }
        | ProtocolError::UnexpectedFrame { .. } => ProtocolError::NotAnAgent {
            preview: conn.preview_of_last_read(false),
        },
        e => e,
    });
    let reply = match reply {
        Err(e @ ProtocolError::NotAnAgent { .. }) => return Err(e),
        _ if peer_gone => return Err(ProtocolError::HandshakeClosed),
        reply => reply?,
    };
    match reply {
        HandshakeReply::Welcome(welcome) if (min..=max).contains(&welcome.version) => Ok(welcome),
        HandshakeReply::Welcome(welcome) => Err(ProtocolError::BadWelcome {
            version: welcome.version,
            our_min: min,
            our_max: max,
        }),
        HandshakeReply::Refused(refused) => Err(refusal(refused, min, max)),
    }
}

/// Turns the agent's refusal into an error that says which side to update.
fn refusal(refused: Refused, our_min: u32, our_max: u32) -> ProtocolError {
    let advice = if refused.max_version < our_min {
        "the agent is older than this flotilla: redeploy the agent so that it matches".to_owned()
    } else if refused.min_version > our_max {
        "the agent is newer than this flotilla: upgrade flotilla, or redeploy the agent from this one"
            .to_owned()
    } else {
        format!("the agent said: {}", refused.reason)
    };
    ProtocolError::AgentRefused {
        reason: refused.reason,
        agent_version: refused.agent_version,
        agent_min: refused.min_version,
        agent_max: refused.max_version,
        our_min,
        our_max,
        advice,
    }
}

/// Answers the conversation as the server (the agent): reads the client's [`Hello`], and
/// either welcomes it with the highest version both speak (returned) or sends `Refused`
/// naming both ranges and returns [`ProtocolError::ClientRefused`]; the caller then closes.
pub fn server_handshake<R: Read, W: Write>(
    conn: &mut Connection<R, W>,
    agent_version: &str,
    root: &str,
) -> Result<u32> {
    server_handshake_range(
        conn,
        agent_version,
        root,
        MIN_PROTOCOL_VERSION,
        PROTOCOL_VERSION,
    )
}

/// [`server_handshake`] speaking the versions `min..=max`; tests use it to play other releases.
pub fn server_handshake_range<R: Read, W: Write>(
    conn: &mut Connection<R, W>,
    agent_version: &str,
    root: &str,
    min: u32,
    max: u32,
) -> Result<u32> {
    let hello = conn.recv::<Hello>()?;
    let refuse = |conn: &mut Connection<R, W>, reason: String| {
        // The refusal is a courtesy: the caller closes either way, so a failure to send it
        // must not hide the reason for refusing.
        let _ = conn.send(&HandshakeReply::Refused(Refused {
            reason,
            agent_version: agent_version.to_owned(),
            min_version: min,
            max_version: max,
        }));
    };
    if hello.magic != MAGIC {
        refuse(
            conn,
            "the hello does not carry the flotilla magic".to_owned(),
        );
        return Err(ProtocolError::BadMagic { got: hello.magic });
    }
    let version = hello.max_version.min(max);
    if version < hello.min_version.max(min) {
        refuse(
            conn,
            format!(
                "this agent (version {agent_version}) speaks protocol {}, the client `{}` speaks protocol {}",
                versions(min, max),
                hello.client,
                versions(hello.min_version, hello.max_version),
            ),
        );
        return Err(ProtocolError::ClientRefused {
            client: hello.client,
            client_min: hello.min_version,
            client_max: hello.max_version,
            our_min: min,
            our_max: max,
        });
    }
    conn.send(&HandshakeReply::Welcome(Welcome {
        version,
        agent_version: agent_version.to_owned(),
        root: root.to_owned(),
    }))?;
    Ok(version)
}
