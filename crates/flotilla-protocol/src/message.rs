//! The messages the deployer and the agent exchange, as plain serde types. This module exists
//! so that both sides compile against one definition of the conversation; it must never do
//! I/O, and its JSON shape must never change without a new [`crate::PROTOCOL_VERSION`]
//! (unknown fields are rejected so that a mismatch shows up as an error, not as a silently
//! ignored option).
//!
//! Every request has exactly one final response; before it the agent may send any number of
//! [`Response::Progress`]. The pairs are:
//!
//! | request | final response |
//! | --- | --- |
//! | `QueryMissing` | `Missing` |
//! | `AddPaths` (+ one bulk stream) | `PathsAdded` |
//! | `Substitute` (protocol 4) | `Substituted` |
//! | `Plan` (protocol 5) | `Planned` |
//! | `Activate` | `Activated` (or `Error` of kind `Activation`: it failed and was rolled back) |
//! | `Confirm` | `Confirmed` |
//! | `CheckHealth` | `Health` |
//! | `ListKeys` | `Keys` |
//! | `PutKeys` | `KeysPut` |
//! | `Rollback` | `Activated` (the generation rolled back to) |
//! | `ListGenerations` | `Generations` |
//! | `DeleteGenerations` | `GenerationsDeleted` |
//! | `CollectGarbage` | `GarbageCollected` |
//! | `Status` | `Status` |
//! | `Current` (protocol 6) | `Current` |
//! | `Exec` (protocol 3) | `ExecStarted`, then the command's stdio, then `Exited` (see [`crate::exec`]) |
//! | `PowerOff` | `PoweringOff` (then the machine stops; the connection ends) |
//! | `Goodbye` | none: the agent closes the connection |
//!
//! and any request may instead be answered by `Error`.

use std::fmt;

use flotilla_store::{NarHash, StorePath};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A type that travels in a `Message` frame. Sealed: only this module's messages are sent.
pub trait Message: Serialize + DeserializeOwned + sealed::Sealed {
    /// What to call this message in errors, e.g. "request".
    const WHAT: &'static str;
    /// The same with an article, e.g. "a request".
    const A_WHAT: &'static str;
}

mod sealed {
    /// Keeps [`super::Message`] to the types of this module.
    pub trait Sealed {}
}

macro_rules! message {
    ($ty:ty, $a:literal, $what:literal) => {
        impl sealed::Sealed for $ty {}
        impl Message for $ty {
            const WHAT: &'static str = $what;
            const A_WHAT: &'static str = concat!($a, " ", $what);
        }
    };
}

message!(Hello, "a", "hello");
message!(HandshakeReply, "a", "handshake reply");
message!(Request, "a", "request");
message!(Response, "a", "response");

/// The magic string a client's [`Hello`] carries, so an agent can tell flotilla from noise.
pub const MAGIC: &str = "flotilla";

/// The first message of every connection, sent by the client (the deployer).
///
/// The handshake messages are the one part of the protocol every version must understand,
/// so unlike the others they ignore unknown fields: a later version may add some.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "hello")]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: String,
    /// The lowest protocol version the client speaks.
    pub min_version: u32,
    /// The highest protocol version the client speaks.
    pub max_version: u32,
    /// The client's name and version, for the agent's log, e.g. "flotilla 0.1.0".
    pub client: String,
}

/// The agent's acceptance of a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version both sides speak from now on: the highest in both ranges.
    pub version: u32,
    /// The agent's software version, e.g. "0.1.0".
    pub agent_version: String,
    /// The root directory the agent manages (`/` on a real machine, the machine's root
    /// directory for a local container).
    pub root: String,
}

/// The agent's refusal of a [`Hello`]; the agent closes the connection after sending it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// Why, in words naming the versions each side speaks.
    pub reason: String,
    /// The agent's software version, e.g. "0.1.0".
    pub agent_version: String,
    /// The lowest protocol version the agent speaks.
    pub min_version: u32,
    /// The highest protocol version the agent speaks.
    pub max_version: u32,
}

/// The agent's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HandshakeReply {
    /// The agent accepts; the conversation continues.
    Welcome(Welcome),
    /// The agent refuses and closes.
    Refused(Refused),
}

/// How a bulk stream is compressed; the sender chooses per stream and says so in the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Raw bytes: best on fast links (local sockets), where compressing costs more than it saves.
    #[default]
    None,
    /// One zstd stream: best on slow links.
    Zstd,
}

/// A store path to add on the target, with what is needed to verify and register it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathInfo {
    /// The path.
    pub path: StorePath,
    /// The store paths its contents refer to (itself included if it refers to itself).
    pub references: Vec<StorePath>,
    /// The sha256 of its NAR serialisation; on the wire `sha256:<nix-base32>`.
    pub nar_hash: NarHash,
    /// The size of its NAR serialisation in bytes.
    pub nar_size: u64,
}

/// The first protocol version with [`Request::Substitute`]; the deployer pushes everything to
/// an agent that welcomed it with an older one.
pub const SUBSTITUTE_PROTOCOL_VERSION: u32 = 4;

/// The first protocol version with [`Request::Plan`]; an agent that welcomed the deployer
/// with an older one cannot say what a deploy would change, and the plan says so.
pub const PLAN_PROTOCOL_VERSION: u32 = 5;

/// The first protocol version with [`Request::Current`]; an agent that welcomed the deployer
/// with an older one is asked for its `Status` and deployed step by step, as before.
pub const CURRENT_PROTOCOL_VERSION: u32 = 6;

/// A path a `Substitute` did not get, and why: the deployer pushes it instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubstituteMiss {
    /// The path.
    pub path: StorePath,
    /// Why, as a class the deployer counts.
    pub reason: MissReason,
    /// Why, in words for the user (the cache, the key, the hashes).
    pub detail: String,
}

/// Why a cache did not give a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissReason {
    /// No cache has it (every one answered 404).
    NotInCache,
    /// A cache has it, signed by no trusted key.
    Untrusted,
    /// Its NAR or narinfo does not match: another NAR hash or size than the signed one or the
    /// deployer's, a file hash that differs, another path named.
    HashMismatch,
    /// No cache could be reached, or it answered with an error.
    CacheDown,
    /// The cache's NAR is compressed in a way the agent does not read (only none and zstd).
    UnsupportedCompression,
    /// A path it refers to was not got, so it cannot be added before the deployer sends that.
    ReferenceMissing,
    /// The machine could not write it (disk full, I/O error).
    Failed,
    /// A reason this side does not know (sent by a newer peer); the detail still explains it.
    #[serde(other)]
    Other,
}

impl fmt::Display for MissReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MissReason::NotInCache => "not in any cache",
            MissReason::Untrusted => "signed by no trusted key",
            MissReason::HashMismatch => "hash mismatch",
            MissReason::CacheDown => "cache down",
            MissReason::UnsupportedCompression => "unsupported compression",
            MissReason::ReferenceMissing => "a reference was not fetched",
            MissReason::Failed => "could not be written",
            MissReason::Other => "other",
        })
    }
}

/// What an activation should do, as `nixos-rebuild` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationGoal {
    /// Make it the current generation, activate it now and on boot.
    Switch,
    /// Make it the boot default only.
    Boot,
    /// Activate it now without making it the boot default.
    Test,
    /// Report what activation would change, changing nothing.
    #[serde(alias = "dry-activate")]
    DryActivate,
}

impl ActivationGoal {
    /// Whether it changes the machine at all: every goal but `dry-activate`.
    pub fn activates(self) -> bool {
        self != ActivationGoal::DryActivate
    }

    /// Whether the new system runs now, so its health is checked, it may wait for the
    /// deployer's confirmation, and it is rolled back when either fails: `switch` and `test`.
    pub fn is_checked(self) -> bool {
        matches!(self, ActivationGoal::Switch | ActivationGoal::Test)
    }

    /// Whether the machine gets its keys: a system that will run needs them, a dry run
    /// changes nothing.
    pub fn sends_keys(self) -> bool {
        self.activates()
    }

    /// Whether it adds a generation (the machine boots it): `switch` and `boot`.
    pub fn adds_generation(self) -> bool {
        matches!(self, ActivationGoal::Switch | ActivationGoal::Boot)
    }
}

impl fmt::Display for ActivationGoal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ActivationGoal::Switch => "switch",
            ActivationGoal::Boot => "boot",
            ActivationGoal::Test => "test",
            ActivationGoal::DryActivate => "dry-activate",
        })
    }
}

/// A request from the deployer to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Which of these paths does the target lack? Answered by [`Response::Missing`].
    QueryMissing {
        /// The paths to check, usually a whole closure.
        paths: Vec<StorePath>,
    },
    /// Add these paths. Followed by one bulk stream holding their NARs back to back, in this
    /// order. The agent must read the whole stream (to its end) before it answers, even when
    /// it will answer `Error`, and must send nothing (not even `Progress`) while it reads:
    /// otherwise both sides can block writing to each other. Answered by
    /// [`Response::PathsAdded`].
    AddPaths {
        /// The paths, in the order of the stream; references before referrers.
        paths: Vec<PathInfo>,
        /// How the stream is compressed.
        compression: Compression,
    },
    /// Fetch these paths from binary caches instead of the deployer: each from the first cache
    /// that has it, accepted only when its narinfo is signed by one of `trusted_keys`, names
    /// the path with the announced NAR hash, size and references, and its NAR hashes to that;
    /// unpacked as `AddPaths` unpacks. Paths come references first. The agent may send
    /// `Progress` while it works. Answered by [`Response::Substituted`]; the deployer then
    /// pushes what was not got. Protocol 4 and later (see [`SUBSTITUTE_PROTOCOL_VERSION`]).
    Substitute {
        /// The paths, as the deployer has them; references before referrers.
        paths: Vec<PathInfo>,
        /// The caches' `http://` URLs, in order of preference.
        caches: Vec<String>,
        /// `name:base64` ed25519 public keys, as Nix's `trusted-public-keys`.
        trusted_keys: Vec<String>,
    },
    /// What activating `toplevel` would change, changing nothing: the same comparison of the
    /// new manifest with the running one that `Activate` acts on. Answered by
    /// [`Response::Planned`]. Protocol 5 and later (see [`PLAN_PROTOCOL_VERSION`]).
    Plan {
        /// The toplevel store path.
        toplevel: StorePath,
        /// Its `manifest.json`, for a toplevel the machine does not have yet; when it has it,
        /// the agent reads its own copy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manifest: Option<String>,
        /// Names of the keys the deploy would write (their material differs or they are new);
        /// never the material.
        keys_written: Vec<String>,
        /// The goal the deploy would activate with; `None` is `switch`. It decides the next
        /// generation's number (the agent's own rule) and whether anything restarts now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        goal: Option<ActivationGoal>,
    },
    /// Activate a system toplevel that is already in the target's store. Answered by
    /// [`Response::Activated`].
    Activate {
        /// The toplevel store path.
        toplevel: StorePath,
        /// What to do with it.
        goal: ActivationGoal,
        /// If set, the agent rolls back by itself unless a [`Request::Confirm`] for the new
        /// generation arrives within this many seconds (after its health checks passed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confirm_within_secs: Option<u64>,
        /// How long the services' health checks may take in all before the activation counts
        /// as failed and is rolled back; `None` leaves each check to its own retries.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check_timeout_secs: Option<u64>,
    },
    /// Keep the generation just activated: cancels the automatic rollback. Answered by
    /// [`Response::Confirmed`].
    Confirm {
        /// The generation that `Activated` reported.
        generation: u64,
    },
    /// Switch back to an earlier generation: the given one, or the one before the current.
    /// Answered by [`Response::Activated`].
    Rollback {
        /// The generation number to switch to; `None` for the previous one, or, while a
        /// generation awaits confirmation, for what ran before it (the pending generation is
        /// marked failed).
        to: Option<u64>,
        /// Why, recorded with a generation this rejects.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// List the system generations. Answered by [`Response::Generations`].
    ListGenerations,
    /// Delete old generations (never the current one). Answered by
    /// [`Response::GenerationsDeleted`].
    DeleteGenerations {
        /// Keep at least this many of the newest generations.
        keep_last: Option<u32>,
        /// Delete only generations older than this many seconds.
        older_than_secs: Option<u64>,
    },
    /// Delete store paths no generation needs. Answered by [`Response::GarbageCollected`].
    CollectGarbage,
    /// Report the current generation and the services. Answered by [`Response::Status`].
    Status,
    /// Whether a deploy of `toplevel` with `goal` would leave the machine exactly as it is:
    /// the deploy's first question, so that a machine with nothing to do costs it one round
    /// trip. The machine's state comes with the answer either way, as `Status` has it.
    /// Answered by [`Response::Current`]. Protocol 6 and later (see
    /// [`CURRENT_PROTOCOL_VERSION`]).
    Current {
        /// The toplevel the deploy activates.
        toplevel: StorePath,
        /// How it would activate it.
        goal: ActivationGoal,
        /// Every key the deploy leaves on the machine, as `ListKeys` would then report it
        /// (a digest of its contents, never the contents).
        keys: Vec<KeyState>,
    },
    /// Probe every health check of the running system once, now. Answered by
    /// [`Response::Health`].
    CheckHealth,
    /// Which keys are on the machine, with digests of their contents (never the contents).
    /// Answered by [`Response::Keys`].
    ListKeys,
    /// Write these keys (each to a temporary file with its final owner and mode, renamed into
    /// place) and delete the named ones; restarts the services that use a changed key and
    /// starts those that were waiting for one. Answered by [`Response::KeysPut`].
    PutKeys {
        /// Keys to write.
        put: Vec<KeyUpload>,
        /// Names of keys to delete.
        remove: Vec<String>,
        /// The toplevel a switch activates right after these keys (keys sent before
        /// activation): a running service that switch restarts anyway is not restarted for
        /// its key too, so it starts once, as the plan says. Protocol 5 and later.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        switching_to: Option<StorePath>,
    },
    /// Run a command on the machine, as root, with the machine's default `PATH`, in `/root`
    /// (or `/` without one), in a session of its own. Answered by [`Response::ExecStarted`];
    /// then the connection carries the command's stdio both ways until [`Response::Exited`]
    /// (see [`crate::exec`]), and closes. Protocol 3 and later: the deployer must not send it
    /// to an agent that welcomed it with an older version.
    Exec {
        /// The program and its arguments; a program without a `/` is looked up in `PATH`.
        argv: Vec<String>,
        /// A terminal for it (a pseudo-terminal on the machine), or `None` for pipes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tty: Option<Terminal>,
    },
    /// Stop every service cleanly, sync, make the root read-only and power the machine off.
    /// Only a VM's agent (PID 1 of `init --vm`) does it; any other answers `Error` of kind
    /// `Unsupported`, and agents older than this request answer `BadRequest`. Answered by
    /// [`Response::PoweringOff`] before the services stop; the connection then ends.
    PowerOff,
    /// End the conversation; there is no answer, the agent closes the connection.
    Goodbye,
}

impl Request {
    /// Whether `response` is a valid final answer to this request (see the module table).
    /// `Error` answers every request; `Progress` is never final; `Goodbye` has no answer.
    pub fn is_answered_by(&self, response: &Response) -> bool {
        matches!(
            (self, response),
            (Request::QueryMissing { .. }, Response::Missing { .. })
                | (Request::AddPaths { .. }, Response::PathsAdded { .. })
                | (Request::Substitute { .. }, Response::Substituted { .. })
                | (Request::Plan { .. }, Response::Planned { .. })
                | (Request::Activate { .. }, Response::Activated { .. })
                | (Request::Confirm { .. }, Response::Confirmed { .. })
                | (Request::Rollback { .. }, Response::Activated { .. })
                | (Request::ListGenerations, Response::Generations { .. })
                | (
                    Request::DeleteGenerations { .. },
                    Response::GenerationsDeleted { .. }
                )
                | (Request::CollectGarbage, Response::GarbageCollected { .. })
                | (Request::Status, Response::Status { .. })
                | (Request::Current { .. }, Response::Current { .. })
                | (Request::CheckHealth, Response::Health { .. })
                | (Request::ListKeys, Response::Keys { .. })
                | (Request::PutKeys { .. }, Response::KeysPut { .. })
                | (Request::Exec { .. }, Response::ExecStarted { .. })
                | (Request::PowerOff, Response::PoweringOff)
        ) || (matches!(response, Response::Error { .. }) && *self != Request::Goodbye)
    }

    /// The request's name on the wire, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::QueryMissing { .. } => "query_missing",
            Request::AddPaths { .. } => "add_paths",
            Request::Substitute { .. } => "substitute",
            Request::Plan { .. } => "plan",
            Request::Activate { .. } => "activate",
            Request::Confirm { .. } => "confirm",
            Request::Rollback { .. } => "rollback",
            Request::ListGenerations => "list_generations",
            Request::DeleteGenerations { .. } => "delete_generations",
            Request::CollectGarbage => "collect_garbage",
            Request::Status => "status",
            Request::Current { .. } => "current",
            Request::CheckHealth => "check_health",
            Request::ListKeys => "list_keys",
            Request::PutKeys { .. } => "put_keys",
            Request::Exec { .. } => "exec",
            Request::PowerOff => "power_off",
            Request::Goodbye => "goodbye",
        }
    }
}

/// A message from the agent to the deployer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The paths of a `QueryMissing` the target lacks, in the order asked.
    Missing {
        /// The missing paths.
        paths: Vec<StorePath>,
    },
    /// The paths of an `AddPaths` are in the store, verified and registered.
    PathsAdded {
        /// How many paths were added.
        paths: u64,
        /// How many NAR bytes they held.
        bytes: u64,
    },
    /// What a `Substitute` got from the caches, and why it did not get the rest.
    Substituted {
        /// The paths now valid on the machine, fetched from a cache (or found valid already).
        got: Vec<StorePath>,
        /// How many NAR bytes they held.
        bytes: u64,
        /// Every path asked for and not got, in the order asked, with why.
        missed: Vec<SubstituteMiss>,
    },
    /// What a `Plan` found: what activating its toplevel would change.
    Planned {
        /// The plan.
        plan: SystemPlan,
    },
    /// A generation is active (after `Activate` or `Rollback`), its health checks passed.
    Activated {
        /// Its number.
        generation: u64,
        /// What activation changed.
        report: ActivationReport,
        /// The health checks run after activation.
        health: Vec<HealthResult>,
        /// Whether the agent now waits for a `Confirm` of this generation, over a new
        /// connection, and rolls back without one.
        awaiting_confirmation: bool,
    },
    /// The generation is kept; no automatic rollback will happen.
    Confirmed {
        /// The generation confirmed.
        generation: u64,
    },
    /// The system generations, oldest first.
    Generations {
        /// The generations.
        generations: Vec<GenerationInfo>,
    },
    /// The generations a `DeleteGenerations` removed.
    GenerationsDeleted {
        /// Their numbers.
        deleted: Vec<u64>,
    },
    /// What a `CollectGarbage` freed.
    GarbageCollected {
        /// How many store paths were deleted.
        paths: u64,
        /// How many bytes that freed.
        bytes: u64,
    },
    /// The machine's state.
    Status {
        /// The current generation, if any.
        generation: Option<u64>,
        /// The current toplevel, if any.
        toplevel: Option<StorePath>,
        /// The supervised services.
        services: Vec<ServiceStatus>,
        /// Bytes free for the store's filesystem.
        store_free_bytes: Option<u64>,
        /// A generation activated and not yet confirmed.
        pending_confirmation: Option<u64>,
    },
    /// The answer to a `Current`.
    Current {
        /// Why a deploy of the toplevel asked about still has work to do on the machine;
        /// `None`: the machine runs it exactly as that deploy would leave it.
        differs: Option<String>,
        /// The current generation, if any.
        generation: Option<u64>,
        /// The current toplevel, if any.
        toplevel: Option<StorePath>,
        /// The supervised services.
        services: Vec<ServiceStatus>,
        /// Bytes free for the store's filesystem.
        store_free_bytes: Option<u64>,
        /// A generation activated and not yet confirmed.
        pending_confirmation: Option<u64>,
    },
    /// The result of a `CheckHealth`, one per service with a health check.
    Health {
        /// The results.
        services: Vec<HealthResult>,
    },
    /// The keys on the machine.
    Keys {
        /// The keys, by name.
        keys: Vec<KeyState>,
    },
    /// What a `PutKeys` did.
    KeysPut {
        /// Keys written.
        written: Vec<String>,
        /// Keys deleted.
        removed: Vec<String>,
        /// Services restarted because a key they use changed.
        restarted: Vec<String>,
        /// Services started because the keys they waited for are now present.
        started: Vec<String>,
    },
    /// The command of an `Exec` runs; its stdio follows on the connection.
    ExecStarted {
        /// Its process id on the machine (also its process group and session id).
        pid: u32,
    },
    /// The command of an `Exec` ended and its output was all sent; the agent closes next.
    Exited {
        /// How it ended.
        status: CommandExit,
    },
    /// The agent took a `PowerOff`: it stops its services and powers the machine off now.
    PoweringOff,
    /// A step of work in progress, for the user to see; not a final answer.
    Progress {
        /// What the agent is doing, e.g. "restarting nginx".
        message: String,
    },
    /// The request failed.
    Error {
        /// The class of failure.
        kind: ErrorKind,
        /// What happened and what to do, for users: never internals such as backtraces.
        message: String,
    },
}

impl Response {
    /// The response's name on the wire, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Response::Missing { .. } => "missing",
            Response::PathsAdded { .. } => "paths_added",
            Response::Substituted { .. } => "substituted",
            Response::Planned { .. } => "planned",
            Response::Activated { .. } => "activated",
            Response::Confirmed { .. } => "confirmed",
            Response::Generations { .. } => "generations",
            Response::GenerationsDeleted { .. } => "generations_deleted",
            Response::GarbageCollected { .. } => "garbage_collected",
            Response::Status { .. } => "status",
            Response::Current { .. } => "current",
            Response::Health { .. } => "health",
            Response::Keys { .. } => "keys",
            Response::KeysPut { .. } => "keys_put",
            Response::ExecStarted { .. } => "exec_started",
            Response::Exited { .. } => "exited",
            Response::PoweringOff => "powering_off",
            Response::Progress { .. } => "progress",
            Response::Error { .. } => "error",
        }
    }

    /// An `Error` response; `message` is shown to users as is.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error {
            kind,
            message: message.into(),
        }
    }
}

/// The terminal an `Exec` asks for: its size and type, as the deployer's own terminal has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terminal {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
    /// `TERM` for the command, e.g. "xterm-256color".
    pub term: String,
}

/// How the command of an `Exec` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CommandExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl CommandExit {
    /// The status a shell would give it: the code, or 128 + the signal's number.
    pub fn shell_status(self) -> u8 {
        match self {
            CommandExit::Code(c) => (c & 0xff) as u8,
            CommandExit::Signal(s) => (128 + (s & 0x7f)) as u8,
        }
    }
}

impl fmt::Display for CommandExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandExit::Code(c) => write!(f, "exit status {c}"),
            CommandExit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// The class of an [`Response::Error`], so the deployer can react without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is invalid (e.g. a path whose references are not present).
    BadRequest,
    /// Something the request names does not exist (a generation, a store path).
    NotFound,
    /// The request conflicts with the machine's state (e.g. another activation is running).
    Conflict,
    /// The agent could not read or write what it needed (disk full, permissions).
    Io,
    /// Received data did not match its announced hash or size.
    Integrity,
    /// Activation failed (it would not complete, or a health check did not pass in time);
    /// the agent has rolled back to the previous generation.
    Activation,
    /// The health checks failed and there was nothing to roll back to (the machine already
    /// ran this generation).
    Unhealthy,
    /// The agent does not support this on this machine.
    Unsupported,
    /// A kind this side does not know (sent by a newer peer); the message still explains it.
    #[serde(other)]
    Other,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::BadRequest => "bad request",
            ErrorKind::NotFound => "not found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Io => "I/O",
            ErrorKind::Integrity => "integrity",
            ErrorKind::Activation => "activation",
            ErrorKind::Unhealthy => "unhealthy",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Other => "other",
        })
    }
}

/// What an activation changed (or, for a dry run, would change).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationReport {
    /// True if nothing was changed (goal `DryActivate`).
    pub dry_run: bool,
    /// `/etc` entries created, relative to `/etc`.
    pub etc_added: Vec<String>,
    /// `/etc` entries whose target changed.
    pub etc_changed: Vec<String>,
    /// `/etc` entries removed.
    pub etc_removed: Vec<String>,
    /// Users created.
    pub users_added: Vec<String>,
    /// Users removed.
    pub users_removed: Vec<String>,
    /// Services started (new).
    pub services_started: Vec<String>,
    /// Services stopped (removed).
    pub services_stopped: Vec<String>,
    /// Services restarted (changed).
    pub services_restarted: Vec<String>,
    /// Services left running as they were.
    pub services_unchanged: Vec<String>,
    /// Other notes for the user, e.g. "a reboot is needed for the new kernel".
    pub messages: Vec<String>,
}

/// What activating a toplevel would do to a machine, as the agent's own comparison of the
/// new manifest with the running one finds it (the comparison activation then acts on).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemPlan {
    /// The current generation, if any.
    pub generation: Option<u64>,
    /// The generation the activation would leave current, numbered by the agent's own rule
    /// (the last generation + 1, not the current + 1: after a rollback they differ).
    #[serde(default)]
    pub next_generation: Option<u64>,
    /// The running system, if any.
    pub toplevel: Option<StorePath>,
    /// Services, in the order activation treats them: stops first, then starts.
    pub services: Vec<ServicePlan>,
    /// `/etc` entries that would be created, relative to `/etc`.
    pub etc_added: Vec<String>,
    /// `/etc` entries whose target would change.
    pub etc_changed: Vec<String>,
    /// `/etc` entries that would be removed.
    pub etc_removed: Vec<String>,
    /// Users and groups that would be created (`user x`, `group y`).
    pub users_added: Vec<String>,
    /// Users and groups that would be removed.
    pub users_removed: Vec<String>,
    /// The health checks that gate the switch: `service: check`.
    pub health_checks: Vec<String>,
    /// The running system's closure with each path's NAR size, for the closure diff. The
    /// deployer takes it out once the diff is made: it is not part of the plan it prints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub closure: Vec<(StorePath, u64)>,
}

/// What activation would do with one service, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePlan {
    /// The service.
    pub name: String,
    /// What happens to it.
    pub action: ServiceAction,
    /// Why: for a restart, what differs (command, environment, a store path it uses, a key
    /// it reads, its `after` order); for a start of a service the system had, that it is not
    /// running.
    pub reasons: Vec<String>,
}

/// What activation does with a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceAction {
    /// It is new (or not running): started.
    Start,
    /// The new system has no such service: stopped.
    Stop,
    /// It changed: stopped and started again.
    Restart,
}

impl fmt::Display for ServiceAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceAction::Start => "start",
            ServiceAction::Stop => "stop",
            ServiceAction::Restart => "restart",
        })
    }
}

/// One system generation on the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationInfo {
    /// Its number, increasing with each activation.
    pub number: u64,
    /// Its toplevel store path.
    pub toplevel: StorePath,
    /// When it was created, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// True for the generation that is active now.
    pub current: bool,
    /// Why it was rolled back, if it failed (activation, a health check, no confirmation).
    pub failed: Option<String>,
}

/// The state of one service the agent supervises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceStatus {
    /// The service's name.
    pub name: String,
    /// What it is doing.
    pub state: ServiceState,
    /// Its main process, if running.
    pub pid: Option<u32>,
    /// How many times the agent restarted it since the generation was activated.
    pub restarts: u32,
    /// How its last process ended, e.g. "exit status 1" or "signal 9 (SIGKILL)".
    pub last_exit: Option<String>,
    /// Since when it is in this state, in seconds since the Unix epoch.
    pub since_unix: u64,
    /// The keys it waits for (state `Waiting`).
    pub waiting_for: Vec<String>,
}

/// The outcome of one service's health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthResult {
    /// The service.
    pub service: String,
    /// What is probed, e.g. "http http://127.0.0.1:80/" or "tcp 5432".
    pub check: String,
    /// Whether it passed.
    pub healthy: bool,
    /// Probes made.
    pub probes: u32,
    /// The last probe's output or error (at most a few KiB), for the user.
    pub output: String,
}

/// A key to place on the machine. Its material never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyUpload {
    /// The key's name: its file name in `dest_dir`.
    pub name: String,
    /// The absolute directory it goes in.
    pub dest_dir: String,
    /// Owner.
    pub user: String,
    /// Group.
    pub group: String,
    /// Permission bits.
    pub mode: u32,
    /// The secret.
    pub data: Vec<u8>,
}

impl fmt::Debug for KeyUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyUpload")
            .field("name", &self.name)
            .field("dest_dir", &self.dest_dir)
            .field("user", &self.user)
            .field("group", &self.group)
            .field("mode", &format_args!("{:04o}", self.mode))
            .field("data", &format_args!("<{} bytes redacted>", self.data.len()))
            .finish()
    }
}

/// A key as the machine has it: where, whose, and a digest of its contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyState {
    /// The key's name.
    pub name: String,
    /// Its directory.
    pub dest_dir: String,
    /// Owner.
    pub user: String,
    /// Group.
    pub group: String,
    /// Permission bits.
    pub mode: u32,
    /// `sha256:<hex>` of its contents, so the deployer can tell whether to send it again.
    pub digest: String,
}

/// The state of a supervised service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Started, not yet ready.
    Starting,
    /// Running and ready.
    Running,
    /// Stopped on purpose.
    Stopped,
    /// Gave up after failing.
    Failed,
    /// Failed and waiting before the next restart.
    Backoff,
    /// Not started: a key it needs is not on the machine yet.
    Waiting,
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceState::Starting => "starting",
            ServiceState::Running => "running",
            ServiceState::Stopped => "stopped",
            ServiceState::Failed => "failed",
            ServiceState::Backoff => "backoff",
            ServiceState::Waiting => "waiting for keys",
        })
    }
}
