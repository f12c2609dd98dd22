//! The conversation between the flotilla deployer and `flotilla-agent`, the static binary on
//! every target machine: the messages, their framing on a byte stream, the version handshake,
//! and bulk streams for NARs. It exists as one crate so both sides compile against the same
//! definition, and it stays pure: it never spawns a process and never touches the filesystem,
//! except for opening a transport in [`Connection`]'s constructors.
//!
//! A conversation: the client calls [`client_handshake`] and the agent [`server_handshake`];
//! then the client sends [`Request`]s and the agent answers each with [`Response`]s
//! (see [`message`] for the pairs), with one bulk stream after an `AddPaths` request, and
//! a command's stdio both ways after an `Exec` (see [`exec`]).
//!
//! Versions: 2 is the base; 3 adds `Exec`; 4 adds `Substitute` (machines fetch from caches);
//! 5 adds `Plan` (what a deploy would change).

mod connection;
mod data;
mod error;
pub mod exec;
pub mod frame;
mod handshake;
pub mod layout;
pub mod message;

pub use connection::{BoxedConnection, Connection, IO_BUFFER_SIZE};
pub use data::{
    BulkReader, BulkStats, BulkWriter, DataReader, DataWriter, DATA_CHUNK_SIZE, ZSTD_LEVEL,
    ZSTD_WINDOW_LOG_MAX,
};
pub use error::{ProtocolError, Result};
pub use exec::{ExecEvent, OutputStream, EXEC_PROTOCOL_VERSION};
pub use frame::{FrameKind, MAX_FRAME_PAYLOAD};
pub use handshake::{client_handshake, server_handshake, server_handshake_range};
pub use message::{
    ActivationGoal, ActivationReport, CommandExit, Compression, ErrorKind, GenerationInfo, HandshakeReply,
    HealthResult, Hello, KeyState, KeyUpload, Message, MissReason, PathInfo, Refused, Request, Response, ServiceAction, ServicePlan, ServiceState, ServiceStatus, SubstituteMiss, SystemPlan, Terminal, Welcome,
    CURRENT_PROTOCOL_VERSION, MAGIC, PLAN_PROTOCOL_VERSION, SUBSTITUTE_PROTOCOL_VERSION,
};

/// The protocol version this build speaks best; bump it on any incompatible message change.
pub const PROTOCOL_VERSION: u32 = 6;

/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 2;

/// The longest an agent waits on a binary cache for a connection, or for one byte of an
/// answer, before it counts the cache as down; the deployer waits this long beyond its answer
/// timeout for the next word of a `Substitute`.
pub const CACHE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The longest an agent lets the host's Nix take to register the paths of one `AddPaths`
/// (on a machine with Nix): the deployer waits this long beyond its usual answer timeout for
/// `PathsAdded`, after the last byte.
pub const REGISTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

#[cfg(test)]
mod tests;
