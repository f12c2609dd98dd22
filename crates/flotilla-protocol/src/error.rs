//! The one error type of this crate. It exists so that every way a conversation with a peer
//! can go wrong has a name and a message a user can act on. It must never carry the peer's
//! internals into the message beyond what the peer chose to send (`Agent` shows only the
//! agent's user-facing text), and must never panic on hostile input.

use std::io;
use std::path::PathBuf;

use crate::frame::FrameKind;
use crate::message::{ErrorKind, Request, Response};

/// Everything that can go wrong while speaking the flotilla protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading from or writing to the byte stream failed.
    #[error("{during}: {source}")]
    Io {
        /// What the protocol was doing, e.g. "reading a frame header".
        during: &'static str,
        /// The underlying error.
        source: io::Error,
    },

    /// Connecting to an agent's unix socket failed.
    #[error("cannot connect to the agent socket {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// The peer closed the connection cleanly, between frames.
    #[error("the other side closed the connection")]
    Closed,

    /// The peer closed the connection in the middle of a frame.
    #[error(
        "the connection ended in the middle of a frame ({got} of {expected} bytes of the {part})"
    )]
    Truncated {
        /// Which part of the frame was cut: "header" or "payload".
        part: &'static str,
        /// How many bytes the part should have had.
        expected: u64,
        /// How many arrived.
        got: u64,
    },

    /// The peer closed the connection inside a bulk stream, before its `DataEnd`.
    #[error("the connection ended in the middle of a bulk data stream, after {received} bytes")]
    DataStreamCut {
        /// How many bytes of the stream arrived.
        received: u64,
    },

    /// A frame header announced a payload above [`crate::MAX_FRAME_PAYLOAD`].
    #[error("a frame announced {len} bytes, more than the {max} allowed; the stream is corrupt or not flotilla protocol")]
    FrameTooLarge {
        /// The announced payload length.
        len: u32,
        /// The limit.
        max: u32,
    },

    /// A frame header carried a kind byte this version does not know.
    #[error("unknown frame kind {kind:#04x}; the stream is corrupt or not flotilla protocol")]
    UnknownFrameKind {
        /// The kind byte.
        kind: u8,
    },

    /// A frame is well-formed on the wire but breaks a rule of its kind.
    #[error("malformed frame: {reason}")]
    MalformedFrame {
        /// What rule it broke.
        reason: &'static str,
    },

    /// A frame of one kind arrived where another was required.
    #[error(
        "expected {expected}, but the other side sent a {got} frame; the two sides are out of step"
    )]
    UnexpectedFrame {
        /// What was expected, in words.
        expected: &'static str,
        /// What arrived.
        got: FrameKind,
    },

    /// A message could not be serialised (a bug, or a message above the frame limit).
    #[error("cannot encode the {what}: {reason}")]
    Encode {
        /// Which message, e.g. "request".
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// A message frame did not hold a valid message of the expected type.
    #[error("the other side sent an invalid {what}: {source}")]
    Decode {
        /// Which message was expected, e.g. "request".
        what: &'static str,
        /// The JSON error.
        source: serde_json::Error,
    },

    /// The client's handshake found something other than a flotilla agent on the stream.
    #[error("the other side is not a flotilla agent; it sent {preview} (check that nothing, e.g. a shell startup file, prints to stdout before flotilla-agent starts)")]
    NotAnAgent {
        /// The first bytes it sent, escaped for display.
        preview: String,
    },

    /// The stream closed during the handshake, before the agent answered.
    #[error("the connection closed before the agent answered the handshake; is flotilla-agent installed and able to start on the target?")]
    HandshakeClosed,

    /// The server's handshake received a hello without the flotilla magic.
    #[error("the client is not flotilla (its hello carried magic {got:?})")]
    BadMagic {
        /// The magic it sent.
        got: String,
    },

    /// The agent refused the handshake because the two sides share no protocol version.
    #[error("the agent (version {agent_version}) refused this flotilla: it speaks protocol {}, this flotilla speaks protocol {}; {advice}", versions(*agent_min, *agent_max), versions(*our_min, *our_max))]
    AgentRefused {
        /// The agent's reason, as it gave it.
        reason: String,
        /// The agent's software version.
        agent_version: String,
        /// Lowest version the agent speaks.
        agent_min: u32,
        /// Highest version the agent speaks.
        agent_max: u32,
        /// Lowest version this side speaks.
        our_min: u32,
        /// Highest version this side speaks.
        our_max: u32,
        /// What to do about it.
        advice: String,
    },

    /// The agent welcomed the client with a version outside the range the client offered.
    #[error("the agent chose protocol version {version}, but this flotilla offered protocol {}; redeploy the agent", versions(*our_min, *our_max))]
    BadWelcome {
        /// The version the agent chose.
        version: u32,
        /// Lowest version offered.
        our_min: u32,
        /// Highest version offered.
        our_max: u32,
    },

    /// The server refused a client that shares no protocol version with it.
    #[error("refused client `{client}`: it speaks protocol {}, this agent speaks protocol {}", versions(*client_min, *client_max), versions(*our_min, *our_max))]
    ClientRefused {
        /// The client's name as it gave it.
        client: String,
        /// Lowest version the client speaks.
        client_min: u32,
        /// Highest version the client speaks.
        client_max: u32,
        /// Lowest version this side speaks.
        our_min: u32,
        /// Highest version this side speaks.
        our_max: u32,
    },

    /// The agent answered a request with an error.
    #[error("the agent reported an error ({kind}): {message}")]
    Agent {
        /// The class of error.
        kind: ErrorKind,
        /// The agent's user-facing message.
        message: String,
    },

    /// The agent answered a request with a response of the wrong kind.
    #[error("the agent answered a `{request}` request with `{response}`; the agent and flotilla disagree about the protocol")]
    UnexpectedResponse {
        /// The request's name.
        request: &'static str,
        /// The response's name.
        response: &'static str,
    },

    /// A bulk stream in this direction was abandoned midway, so frame boundaries are lost.
    #[error("the connection is unusable: a bulk data stream was {0} before its end")]
    Abandoned(&'static str),

    /// A bulk stream held more bytes than its reader consumed.
    #[error("the bulk data stream held more data than expected ({extra} extra bytes or more)")]
    TrailingData {
        /// How many extra bytes were seen (a lower bound).
        extra: u64,
    },
}

/// "version 1" or "versions 1 to 3", for messages.
pub(crate) fn versions(min: u32, max: u32) -> String {
    if min == max {
        format!("version {min}")
    } else {
        format!("versions {min} to {max}")
    }
}

/// The result type of this crate.
pub type Result<T, E = ProtocolError> = std::result::Result<T, E>;

impl ProtocolError {
    /// Wraps an I/O error with what the protocol was doing.
    pub(crate) fn io(during: &'static str) -> impl FnOnce(io::Error) -> ProtocolError {
        move |source| ProtocolError::Io { during, source }
    }

    /// Turns this error into an `io::Error`, for `Read`/`Write` impls; [`ProtocolError::from_io`]
    /// recovers it.
    pub(crate) fn into_io(self) -> io::Error {
        match self {
            // Keep the OS error as is, so callers can still see e.g. `BrokenPipe`.
            ProtocolError::Io { source, .. } => source,
            ProtocolError::Truncated { .. }
            | ProtocolError::Closed
            | ProtocolError::DataStreamCut { .. } => {
                io::Error::new(io::ErrorKind::UnexpectedEof, self)
            }
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }

    /// The error for a response that does not answer `request`, for callers matching on
    /// [`crate::Connection::call`]'s result.
    pub fn unexpected_response(request: &Request, response: &Response) -> ProtocolError {
        ProtocolError::UnexpectedResponse {
            request: request.name(),
            response: response.name(),
        }
    }

    /// Recovers a protocol error from an `io::Error` returned by this crate's readers and
    /// writers, or wraps a foreign one with `during`.
    pub fn from_io(during: &'static str, err: io::Error) -> ProtocolError {
        if err.get_ref().is_some_and(|e| e.is::<ProtocolError>()) {
            if let Some(Ok(e)) = err.into_inner().map(|e| e.downcast::<ProtocolError>()) {
                return *e;
            }
            unreachable!("checked to hold a ProtocolError above");
        } else {
            ProtocolError::Io {
                during,
                source: err,
            }
        }
    }
}
