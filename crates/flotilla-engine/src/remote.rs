//! The deployer's side of the agent protocol: copy a closure to a machine (only the paths it
//! lacks, references first, as NARs streamed from the local store) and drive activation,
//! rollback and generations. Transport-agnostic: a unix socket or ssh's stdio.
//!
//! Every request has a deadline suited to it (see [`AgentClient`]), enforced by
//! [`crate::deadline`] on the transport, so a stopped or wedged agent costs a machine its
//! row, never the whole run (nor the deployment's lock).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::deadline::{Fault, Limit, Timed, Watch};

use flotilla_nix::Nix;
use flotilla_protocol::{
    client_handshake, ActivationGoal, ActivationReport, BoxedConnection, Compression, Connection, ErrorKind, GenerationInfo,
    HealthResult, KeyState, KeyUpload, MissReason, PathInfo, Request, Response, ServiceStatus, SubstituteMiss, Welcome,
    SystemPlan, CURRENT_PROTOCOL_VERSION, PLAN_PROTOCOL_VERSION, SUBSTITUTE_PROTOCOL_VERSION,
};
use flotilla_store::StorePath;
use serde::Serialize;

/// Why talking to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// No agent answers on the socket.
    #[error("no agent answers on {socket}: {source}; is the machine started?")]
    Connect {
        /// The socket.
        socket: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The transport to a remote agent (ssh) failed; the message says why and what to do.
    #[error("{destination}: {message}")]
    Transport {
        /// Where it was going.
        destination: String,
        /// What went wrong.
        message: String,
    },
    /// The connection or the protocol failed.
    #[error(transparent)]
    Protocol(#[from] flotilla_protocol::ProtocolError),
    /// Nix could not say what to copy.
    #[error(transparent)]
    Nix(#[from] flotilla_nix::NixError),
    /// The agent answered with an error (its message is for the user).
    #[error("{message}")]
    Agent {
        /// The class of failure.
        kind: ErrorKind,
        /// The agent's words.
        message: String,
    },
    /// The agent answered something that does not fit the request.
    #[error("the agent answered {got} to {request}")]
    Unexpected {
        /// What was asked.
        request: &'static str,
        /// What came back.
        got: &'static str,
    },
    /// The agent did not answer (or, during a copy, took or sent no byte) in time.
    #[error("{agent} did not answer in time: it was asked {asked} and {}; it may be stopped (SIGSTOP), hung or overloaded: {fix}", if *.stalled { format!("moved no data for {} s", .waited.as_secs_f64()) } else { format!("gave no answer within {} s", .waited.as_secs_f64()) })]
    NoAnswer {
        /// Whose agent, e.g. "the agent of machine web1".
        agent: String,
        /// What was asked.
        asked: String,
        /// How long it was given.
        waited: Duration,
        /// Whether it was a copy that stopped moving (rather than an answer that never came).
        stalled: bool,
        /// What to do.
        fix: String,
    },
    /// The agent closed the connection before it answered (it died or was restarted).
    #[error("{agent} closed the connection while it was asked {asked}: it died or was restarted; nothing it had not confirmed was kept: {fix}")]
    AgentGone {
        /// Whose agent.
        agent: String,
        /// What was asked.
        asked: String,
        /// What to do.
        fix: String,
    },
    /// The agent speaks a protocol from before the request (it would not understand it).
    #[error("{agent} is too old to {what} (it speaks protocol {speaks}, that needs {needs}); {fix}")]
    TooOld {
        /// Whose agent, e.g. "the agent of machine web1".
        agent: String,
        /// How to get a newer one, e.g. "redeploy it: `flotilla deploy --on web1`".
        fix: String,
        /// What it was to do, e.g. "run commands".
        what: &'static str,
        /// The protocol version it welcomed us with.
        speaks: u32,
        /// The version the request needs.
        needs: u32,
    },
    /// `FLOTILLA_AGENT_TIMEOUT` is not a number of seconds.
    #[error("FLOTILLA_AGENT_TIMEOUT={0:?} is not a number of seconds; set it to e.g. 30, or unset it for the default ({DEFAULT_ANSWER_TIMEOUT:?})")]
    BadTimeout(String),
    /// Reading a local store path failed.
    #[error("cannot read {path} from the local store: {source}")]
    Local {
        /// The path.
        path: StorePath,
        /// Why.
        source: flotilla_store::Error,
    },
}

/// What a copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyStats {
    /// Paths in the closure.
    pub closure_paths: usize,
    /// Paths the machine lacked and was sent.
    pub paths_sent: u64,
    /// NAR bytes sent (before compression).
    pub bytes_sent: u64,
    /// Seconds it took.
    pub seconds: f64,
    /// What the machine fetched from binary caches itself, when it was asked to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub substituted: Option<SubstituteStats>,
}

/// What a machine fetched from binary caches before the deployer pushed the rest.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SubstituteStats {
    /// Paths the machine lacked and fetched from a cache.
    pub paths: u64,
    /// Their NAR bytes.
    pub bytes: u64,
    /// Paths pushed instead, counted by why no cache gave them (e.g. "cache down").
    pub pushed_because: std::collections::BTreeMap<String, u64>,
    /// Each path pushed instead, with the agent's words.
    pub missed: Vec<SubstituteMiss>,
}

impl SubstituteStats {
    /// "fetched 12 paths (3.1 MiB) from caches; 2 pushed: 2 not in any cache".
    pub fn summary(&self) -> String {
        let mut s = format!("fetched {} paths ({}) from caches", self.paths, flotilla_model::human_bytes(self.bytes));
        if !self.missed.is_empty() {
            let why: Vec<String> = self.pushed_because.iter().map(|(r, n)| format!("{n} {r}")).collect();
            s.push_str(&format!("; {} pushed instead: {}", self.missed.len(), why.join(", ")));
            if let Some(first) = self.missed.first() {
                s.push_str(&format!(" (e.g. {}: {})", first.path, first.detail));
            }
        }
        s
    }
}

/// What an agent says of its machine.
#[derive(Debug, Clone, Serialize)]
pub struct MachineStatus {
    /// The current generation.
    pub generation: Option<u64>,
    /// The running system.
    pub toplevel: Option<StorePath>,
    /// Its services.
    pub services: Vec<ServiceStatus>,
    /// Bytes free for its store.
    pub store_free_bytes: Option<u64>,
    /// A generation awaiting confirmation.
    pub pending_confirmation: Option<u64>,
}

/// What a successful activation did.
#[derive(Debug, Clone, Serialize)]
pub struct Activated {
    /// The generation now current.
    pub generation: u64,
    /// What changed.
    pub report: ActivationReport,
    /// The health checks the agent ran.
    pub health: Vec<HealthResult>,
    /// Whether the agent waits for a confirmation.
    pub awaiting_confirmation: bool,
}

/// What `PutKeys` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeysPut {
    /// Keys written.
    pub written: Vec<String>,
    /// Keys deleted.
    pub removed: Vec<String>,
    /// Services restarted for a changed key.
    pub restarted: Vec<String>,
    /// Services started now that their keys are present.
    pub started: Vec<String>,
}

/// Says how a connection given up by [`AgentClient::into_connection`] failed.
pub(crate) struct Explainer {
    watch: Arc<Watch>,
    agent: String,
    fix: String,
    asked: String,
}

impl Explainer {
    /// How the transport failed, when it did, instead of `err`.
    pub(crate) fn explain(&self, err: RemoteError) -> RemoteError {
        explain_fault(&self.watch, &self.agent, &self.fix, &self.asked, err)
    }
}

/// How a transport watched by `watch` failed, when it did (timed out, the agent gone), instead
/// of `err`, which is what the layer that noticed saw (e.g. a broken pipe encoding a NAR).
fn explain_fault(watch: &Watch, agent: &str, fix: &str, asked: &str, err: RemoteError) -> RemoteError {
    match watch.fault() {
        Some(Fault::TimedOut(limit)) => RemoteError::NoAnswer {
            agent: agent.to_owned(),
            asked: asked.to_owned(),
            waited: limit.waited(),
            stalled: matches!(limit, Limit::Stall(_)),
            fix: fix.to_owned(),
        },
        Some(Fault::PeerGone) => RemoteError::AgentGone { agent: agent.to_owned(), asked: asked.to_owned(), fix: fix.to_owned() },
        None => err,
    }
}

/// How far a copy is.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CopyProgress {
    /// Paths sent so far.
    pub paths: u64,
    /// Paths to send.
    pub total_paths: u64,
    /// NAR bytes sent so far.
    pub bytes: u64,
    /// NAR bytes to send.
    pub total_bytes: u64,
}

/// The paths a machine lacks, found by [`AgentClient::plan_copy`].
#[derive(Debug, Clone)]
pub struct CopyPlan {
    /// Paths in the closure.
    pub closure_paths: usize,
    /// The paths to send, references first.
    pub send: Vec<PathInfo>,
}

impl CopyPlan {
    /// NAR bytes to send (the store space they take, near enough).
    pub fn bytes(&self) -> u64 {
        self.send.iter().map(|p| p.nar_size).sum()
    }
}

/// How long an agent gets to answer a short request (the handshake, `status`, `confirm`,
/// ...), and the longest a copy may go without moving a byte, unless
/// `FLOTILLA_AGENT_TIMEOUT` (seconds) says otherwise.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Beyond its health checks and confirmation window, what an activation, a rollback or a key
/// change may take: stopping and starting services (each has its own stop timeout on the
/// agent), the settling time of services without a health check.
const CHANGE_MARGIN: Duration = Duration::from_secs(120);

/// What `check` may take beyond the usual answer: each health check probes once, all at
/// once, each within its own `timeout` option, which the deployer does not see here.
const PROBE_MARGIN: Duration = Duration::from_secs(60);

/// What deleting generations and collecting garbage may take: removing files from a store
/// that may hold gigabytes.
const HOUSEKEEPING_MARGIN: Duration = Duration::from_secs(600);

/// The answer timeout: `FLOTILLA_AGENT_TIMEOUT` in seconds (fractions allowed), else
/// [`DEFAULT_ANSWER_TIMEOUT`].
pub fn answer_timeout() -> Result<Duration, RemoteError> {
    match std::env::var("FLOTILLA_AGENT_TIMEOUT") {
        Err(_) => Ok(DEFAULT_ANSWER_TIMEOUT),
        Ok(v) if v.trim().is_empty() => Ok(DEFAULT_ANSWER_TIMEOUT),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or(RemoteError::BadTimeout(v)),
    }
}

/// A conversation with one agent. Each request waits at most: the answer timeout for the
/// handshake and short requests; for `activate`, its health-check timeout and confirmation
/// window plus a margin for restarting services; for a copy, as long as bytes move, and the
/// answer timeout without one (plus the agent's time to register the paths at the end).
pub struct AgentClient {
    conn: BoxedConnection,
    welcome: Welcome,
    watch: Arc<Watch>,
    answer: Duration,
    /// "the agent of machine web1", for messages.
    agent: String,
    /// The machine, when the agent is a machine's.
    machine: Option<String>,
    /// What to do when it does not answer.
    fix: String,
}

impl AgentClient {
    /// Connects to an agent's unix socket and shakes hands (for tools that know no machine
    /// name; the platforms use [`AgentClient::connect_unix_for`]).
    pub fn connect_unix(socket: &Path) -> Result<AgentClient, RemoteError> {
        let agent = format!("the agent on {}", socket.display());
        Self::unix(socket, agent, None, "check that agent's process, and restart it".into())
    }

    /// Connects to machine `machine`'s agent on its unix socket and shakes hands.
    pub fn connect_unix_for(machine: &str, socket: &Path) -> Result<AgentClient, RemoteError> {
        Self::unix(socket, format!("the agent of machine {machine}"), Some(machine.to_owned()), Self::fix_for(machine))
    }

    fn unix(socket: &Path, agent: String, machine: Option<String>, fix: String) -> Result<AgentClient, RemoteError> {
        let connect_err = |source| RemoteError::Connect { socket: socket.to_owned(), source };
        let stream = std::os::unix::net::UnixStream::connect(socket).map_err(connect_err)?;
        let reader = stream.try_clone().map_err(connect_err)?;
        Self::start(reader, stream, agent, machine, fix)
    }

    /// Shakes hands with machine `machine`'s agent over any pair of descriptors (a child
    /// process's pipes, for ssh).
    pub fn over<R, W>(machine: &str, reader: R, writer: W) -> Result<AgentClient, RemoteError>
    where
        R: Read + AsFd + Send + 'static,
        W: Write + AsFd + Send + 'static,
    {
        Self::start(reader, writer, format!("the agent of machine {machine}"), Some(machine.to_owned()), Self::fix_for(machine))
    }

    fn fix_for(machine: &str) -> String {
        format!("see `flotilla info --on {machine}` and the machine's agent log, and restart it with `flotilla reboot --on {machine}`")
    }

    fn start<R, W>(reader: R, writer: W, agent: String, machine: Option<String>, fix: String) -> Result<AgentClient, RemoteError>
    where
        R: Read + AsFd + Send + 'static,
        W: Write + AsFd + Send + 'static,
    {
        let answer = answer_timeout()?;
        let watch = Watch::new(Limit::from_now(answer));
        let timed = |e: std::io::Error| RemoteError::Protocol(flotilla_protocol::ProtocolError::Io { during: "preparing the connection to the agent", source: e });
        let reader = Timed::new(reader, Arc::clone(&watch)).map_err(timed)?;
        let writer = Timed::new(writer, Arc::clone(&watch)).map_err(timed)?;
        let mut conn = Connection::boxed(Box::new(reader), Box::new(writer));
        let welcome = match client_handshake(&mut conn, concat!("flotilla ", env!("CARGO_PKG_VERSION"))) {
            Ok(w) => w,
            // Only a timeout is said here: a connection closed during the handshake is
            // explained by the platform, which knows where to look (ssh's stderr).
            Err(e) => {
                return Err(match watch.fault() {
                    Some(Fault::TimedOut(limit)) => RemoteError::NoAnswer { agent, asked: "to shake hands".into(), waited: limit.waited(), stalled: false, fix },
                    _ => e.into(),
                })
            }
        };
        Ok(AgentClient { conn, welcome, watch, answer, agent, machine, fix })
    }

    /// Says how the transport failed, when it did, instead of `err` (which is what the layer
    /// that noticed saw, e.g. a broken pipe while encoding a NAR).
    fn explain(&self, err: RemoteError, asked: &str) -> RemoteError {
        explain_fault(&self.watch, &self.agent, &self.fix, asked, err)
    }

    /// How to get an agent that speaks a newer protocol than this one.
    pub(crate) fn too_old_fix(&self) -> String {
        match &self.machine {
            Some(m) => format!("redeploy it: `flotilla deploy --on {m}`"),
            None => "update that agent".to_owned(),
        }
    }

    /// What the agent said in the handshake.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Whose agent this is, e.g. "the agent of machine web1".
    pub(crate) fn agent_name(&self) -> &str {
        &self.agent
    }

    /// Sends `request` and waits for its first answer, within the answer timeout.
    pub(crate) fn call_now(&mut self, request: &Request) -> Result<Response, RemoteError> {
        self.call(request, Duration::ZERO)
    }

    /// Sets how long the transport may wait for the agent from now on.
    pub(crate) fn set_limit(&self, limit: Limit) {
        self.watch.set(limit);
    }

    /// Gives up the connection, for a conversation that is not request and answer (`Exec`),
    /// with what explains its failures while the agent is `asked` something.
    pub(crate) fn into_connection(self, asked: String) -> (BoxedConnection, Explainer) {
        (self.conn, Explainer { watch: self.watch, agent: self.agent, fix: self.fix, asked })
    }

    /// Sends `request` and waits for its answer, at most `extra` beyond the answer timeout.
    fn call(&mut self, request: &Request, extra: Duration) -> Result<Response, RemoteError> {
        self.watch.set(Limit::from_now(self.answer + extra));
        match self.conn.call(request, |_| {}) {
            Ok(Response::Error { kind, message }) | Err(flotilla_protocol::ProtocolError::Agent { kind, message }) => {
                Err(RemoteError::Agent { kind, message })
            }
            Ok(r) => Ok(r),
            Err(e) => Err(self.explain(e.into(), &format!("`{}`", request.name()))),
        }
    }

    /// Copies the closure of `roots` from the local store, sending only the paths the machine
    /// lacks. `progress` is called after each path with what is done and what is to send.
    pub fn copy_closure(
        &mut self,
        nix: &Nix,
        roots: &[StorePath],
        compression: Compression,
        progress: &mut dyn FnMut(&CopyProgress),
    ) -> Result<CopyStats, RemoteError> {
        let infos = nix.closure_info(roots)?.ok_or_else(|| {
            RemoteError::Nix(flotilla_nix::NixError::Eval(format!(
                "the closure of {} is not in the local store; build it first",
                roots.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            )))
        })?;
        self.copy_paths(&infos, compression, progress)
    }

    /// Copies `infos` (a closure, references first), sending only the paths the machine lacks.
    pub fn copy_paths(
        &mut self,
        infos: &[PathInfo],
        compression: Compression,
        progress: &mut dyn FnMut(&CopyProgress),
    ) -> Result<CopyStats, RemoteError> {
        let plan = self.plan_copy(infos)?;
        self.copy_planned(plan, compression, progress)
    }

    /// Which of `infos` the machine lacks: what [`AgentClient::copy_planned`] would send.
    pub fn plan_copy(&mut self, infos: &[PathInfo]) -> Result<CopyPlan, RemoteError> {
        let all: Vec<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
        let missing = match self.call(&Request::QueryMissing { paths: all }, Duration::ZERO)? {
            Response::Missing { paths } => paths.into_iter().collect::<std::collections::BTreeSet<_>>(),
            other => return Err(RemoteError::Unexpected { request: "query_missing", got: other.name() }),
        };
        let send: Vec<PathInfo> = infos
            .iter()
            .filter(|i| missing.contains(&i.path))
            .cloned()
            .collect();
        Ok(CopyPlan { closure_paths: infos.len(), send })
    }

    /// Asks the machine to fetch `plan`'s paths from `caches` (accepting signatures by
    /// `trusted_keys`) and takes what it got out of the plan, so that
    /// [`AgentClient::copy_planned`] pushes only the rest. An agent from before substitution
    /// fetches nothing: every path is pushed, and the stats say why.
    pub fn substitute(&mut self, plan: &mut CopyPlan, caches: &[String], trusted_keys: &[String], progress: &mut dyn FnMut(&str)) -> Result<SubstituteStats, RemoteError> {
        let mut stats = SubstituteStats::default();
        if plan.send.is_empty() {
            return Ok(stats);
        }
        if self.welcome().version < SUBSTITUTE_PROTOCOL_VERSION {
            let detail = format!("the agent speaks protocol {}, and fetching from caches needs {SUBSTITUTE_PROTOCOL_VERSION}: {}", self.welcome().version, self.too_old_fix());
            stats.missed = plan.send.iter().map(|i| SubstituteMiss { path: i.path.clone(), reason: MissReason::Other, detail: detail.clone() }).collect();
            stats.pushed_because.insert("agent too old".into(), stats.missed.len() as u64);
            return Ok(stats);
        }
        let request = Request::Substitute { paths: plan.send.clone(), caches: caches.to_vec(), trusted_keys: trusted_keys.to_vec() };
        // The agent reports each path as it goes; between two reports it may wait out a slow
        // cache's timeout.
        self.watch.set(Limit::Stall(self.answer + flotilla_protocol::CACHE_TIMEOUT));
        let answer = self.conn.call(&request, |message| progress(message));
        let (got, bytes, missed) = match answer {
            Ok(Response::Substituted { got, bytes, missed }) => (got, bytes, missed),
            Ok(Response::Error { kind, message }) | Err(flotilla_protocol::ProtocolError::Agent { kind, message }) => return Err(RemoteError::Agent { kind, message }),
            Ok(other) => return Err(RemoteError::Unexpected { request: "substitute", got: other.name() }),
            Err(e) => return Err(self.explain(e.into(), "to fetch store paths from caches")),
        };
        let got: std::collections::BTreeSet<StorePath> = got.into_iter().collect();
        plan.send.retain(|i| !got.contains(&i.path));
        stats.paths = got.len() as u64;
        stats.bytes = bytes;
        for m in &missed {
            *stats.pushed_because.entry(m.reason.to_string()).or_default() += 1;
        }
        stats.missed = missed;
        Ok(stats)
    }

    /// Sends what [`AgentClient::plan_copy`] found missing.
    pub fn copy_planned(&mut self, plan: CopyPlan, compression: Compression, progress: &mut dyn FnMut(&CopyProgress)) -> Result<CopyStats, RemoteError> {
        let start = Instant::now();
        let mut stats = CopyStats { closure_paths: plan.closure_paths, ..Default::default() };
        let send = plan.send;
        if send.is_empty() {
            stats.seconds = start.elapsed().as_secs_f64();
            return Ok(stats);
        }
        // While the stream flows, a wait for the agent ends only when no byte moved for the
        // answer timeout; the answer after the last byte may take the agent's registration.
        self.watch.set(Limit::Stall(self.answer));
        let sent = self.send_paths(&send, compression, &mut stats, progress);
        if let Err(e) = sent {
            return Err(self.explain(e, "to receive a copy of store paths"));
        }
        self.watch.set(Limit::from_now(self.answer + flotilla_protocol::REGISTER_TIMEOUT));
        match self.conn.wait_response(|_| {}) {
            Ok(Response::PathsAdded { .. }) => {}
            Ok(Response::Error { kind, message }) | Err(flotilla_protocol::ProtocolError::Agent { kind, message }) => {
                return Err(RemoteError::Agent { kind, message })
            }
            Ok(other) => return Err(RemoteError::Unexpected { request: "add_paths", got: other.name() }),
            Err(e) => return Err(self.explain(e.into(), "to confirm the copied store paths")),
        }
        stats.seconds = start.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// Sends `AddPaths` and its bulk stream of NARs.
    fn send_paths(&mut self, send: &[PathInfo], compression: Compression, stats: &mut CopyStats, progress: &mut dyn FnMut(&CopyProgress)) -> Result<(), RemoteError> {
        self.conn.send(&Request::AddPaths { paths: send.to_vec(), compression })?;
        let total_paths = send.len() as u64;
        let total_bytes: u64 = send.iter().map(|i| i.nar_size).sum();
        let mut writer = self.conn.bulk_writer(compression)?;
        for info in send {
            let n = flotilla_store::encode_path(Path::new(&info.path.to_absolute()), &mut writer)
                .map_err(|source| RemoteError::Local { path: info.path.clone(), source })?;
            stats.paths_sent += 1;
            stats.bytes_sent += n;
            progress(&CopyProgress { paths: stats.paths_sent, total_paths, bytes: stats.bytes_sent, total_bytes });
        }
        writer.finish()?;
        Ok(())
    }

    /// What activating `toplevel` would change, as the agent's own comparison finds it;
    /// `manifest` is its `manifest.json` when the machine lacks it. An agent from before plans
    /// is not guessed at: the error says it is too old and how to update it.
    pub fn plan(&mut self, toplevel: &StorePath, manifest: Option<String>, keys_written: Vec<String>, goal: ActivationGoal) -> Result<SystemPlan, RemoteError> {
        if self.welcome().version < PLAN_PROTOCOL_VERSION {
            return Err(RemoteError::Agent {
                kind: ErrorKind::Unsupported,
                message: format!("plan unavailable: agent too old (it speaks protocol {}, a plan needs {PLAN_PROTOCOL_VERSION}); {}", self.welcome().version, self.too_old_fix()),
            });
        }
        match self.call(&Request::Plan { toplevel: toplevel.clone(), manifest, keys_written, goal: Some(goal) }, Duration::ZERO)? {
            Response::Planned { plan } => Ok(plan),
            other => Err(RemoteError::Unexpected { request: "plan", got: other.name() }),
        }
    }

    /// Activates a toplevel already on the machine; the agent checks its health (within
    /// `check_timeout_secs`) and, with `confirm_within_secs`, waits for [`AgentClient::confirm`]
    /// over another connection.
    pub fn activate(&mut self, toplevel: &StorePath, goal: ActivationGoal, check_timeout_secs: Option<u64>, confirm_within_secs: Option<u64>) -> Result<Activated, RemoteError> {
        let extra = Duration::from_secs(check_timeout_secs.unwrap_or(0) + confirm_within_secs.unwrap_or(0)) + CHANGE_MARGIN;
        match self.call(&Request::Activate { toplevel: toplevel.clone(), goal, confirm_within_secs, check_timeout_secs }, extra)? {
            Response::Activated { generation, report, health, awaiting_confirmation } => Ok(Activated { generation, report, health, awaiting_confirmation }),
            other => Err(RemoteError::Unexpected { request: "activate", got: other.name() }),
        }
    }

    /// Keeps a generation that awaits confirmation.
    pub fn confirm(&mut self, generation: u64) -> Result<(), RemoteError> {
        match self.call(&Request::Confirm { generation }, Duration::ZERO)? {
            Response::Confirmed { .. } => Ok(()),
            other => Err(RemoteError::Unexpected { request: "confirm", got: other.name() }),
        }
    }

    /// Probes the running system's health checks once.
    pub fn check_health(&mut self) -> Result<Vec<HealthResult>, RemoteError> {
        match self.call(&Request::CheckHealth, PROBE_MARGIN)? {
            Response::Health { services } => Ok(services),
            other => Err(RemoteError::Unexpected { request: "check_health", got: other.name() }),
        }
    }

    /// The keys on the machine, with digests.
    pub fn list_keys(&mut self) -> Result<Vec<KeyState>, RemoteError> {
        match self.call(&Request::ListKeys, Duration::ZERO)? {
            Response::Keys { keys } => Ok(keys),
            other => Err(RemoteError::Unexpected { request: "list_keys", got: other.name() }),
        }
    }

    /// Writes and deletes keys; `switching_to` is the toplevel a switch activates next (an
    /// agent older than plans is not told: it restarts a service for its key as before).
    pub fn put_keys(&mut self, put: Vec<KeyUpload>, remove: Vec<String>, switching_to: Option<&StorePath>) -> Result<KeysPut, RemoteError> {
        let switching_to = switching_to.filter(|_| self.welcome().version >= PLAN_PROTOCOL_VERSION).cloned();
        match self.call(&Request::PutKeys { put, remove, switching_to }, CHANGE_MARGIN)? {
            Response::KeysPut { written, removed, restarted, started } => Ok(KeysPut { written, removed, restarted, started }),
            other => Err(RemoteError::Unexpected { request: "put_keys", got: other.name() }),
        }
    }

    /// Re-activates an earlier generation (default: the previous one; while a generation
    /// awaits confirmation, what ran before it, and `reason` is recorded as why it failed).
    pub fn rollback(&mut self, to: Option<u64>, reason: Option<&str>) -> Result<(u64, ActivationReport), RemoteError> {
        match self.call(&Request::Rollback { to, reason: reason.map(str::to_owned) }, CHANGE_MARGIN)? {
            Response::Activated { generation, report, .. } => Ok((generation, report)),
            other => Err(RemoteError::Unexpected { request: "rollback", got: other.name() }),
        }
    }

    /// The machine's generations.
    pub fn generations(&mut self) -> Result<Vec<GenerationInfo>, RemoteError> {
        match self.call(&Request::ListGenerations, Duration::ZERO)? {
            Response::Generations { generations } => Ok(generations),
            other => Err(RemoteError::Unexpected { request: "list_generations", got: other.name() }),
        }
    }

    /// Deletes old generations; returns their numbers.
    pub fn delete_generations(&mut self, keep_last: Option<u32>, older_than_secs: Option<u64>) -> Result<Vec<u64>, RemoteError> {
        match self.call(&Request::DeleteGenerations { keep_last, older_than_secs }, HOUSEKEEPING_MARGIN)? {
            Response::GenerationsDeleted { deleted } => Ok(deleted),
            other => Err(RemoteError::Unexpected { request: "delete_generations", got: other.name() }),
        }
    }

    /// Removes store paths no generation needs; returns (paths, bytes).
    pub fn collect_garbage(&mut self) -> Result<(u64, u64), RemoteError> {
        match self.call(&Request::CollectGarbage, HOUSEKEEPING_MARGIN)? {
            Response::GarbageCollected { paths, bytes } => Ok((paths, bytes)),
            other => Err(RemoteError::Unexpected { request: "collect_garbage", got: other.name() }),
        }
    }

    /// Asks a VM's agent to stop its services and power the machine off.
    pub fn power_off(&mut self) -> Result<(), RemoteError> {
        match self.call(&Request::PowerOff, Duration::ZERO)? {
            Response::PoweringOff => Ok(()),
            other => Err(RemoteError::Unexpected { request: "power_off", got: other.name() }),
        }
    }

    /// The machine's state, and why a deploy of `toplevel` with `goal` leaving `keys` would
    /// still have work to do on it (`None`: none), in one round trip. An agent from before
    /// the question (protocol 5 and older) is asked for its status, and always has work.
    pub fn current(&mut self, toplevel: &StorePath, goal: ActivationGoal, keys: Vec<KeyState>) -> Result<(MachineStatus, Option<String>), RemoteError> {
        if self.welcome().version < CURRENT_PROTOCOL_VERSION {
            return Ok((self.status()?, Some(format!("its agent speaks protocol {}, before the question", self.welcome().version))));
        }
        match self.call(&Request::Current { toplevel: toplevel.clone(), goal, keys }, Duration::ZERO)? {
            Response::Current { differs, generation, toplevel, services, store_free_bytes, pending_confirmation } => {
                Ok((MachineStatus { generation, toplevel, services, store_free_bytes, pending_confirmation }, differs))
            }
            other => Err(RemoteError::Unexpected { request: "current", got: other.name() }),
        }
    }

    /// The current generation, running system and services.
    pub fn status(&mut self) -> Result<MachineStatus, RemoteError> {
        match self.call(&Request::Status, Duration::ZERO)? {
            Response::Status { generation, toplevel, services, store_free_bytes, pending_confirmation } => {
                Ok(MachineStatus { generation, toplevel, services, store_free_bytes, pending_confirmation })
            }
            other => Err(RemoteError::Unexpected { request: "status", got: other.name() }),
        }
    }
}

#[cfg(test)]
mod substitute_tests {
    use super::*;
    use flotilla_protocol::{server_handshake_range, MIN_PROTOCOL_VERSION};
    use std::os::unix::net::UnixStream;

    #[test]
    fn an_agent_from_before_substitution_is_sent_nothing_and_every_path_is_pushed_saying_why() {
        let (near, far) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut conn = Connection::unix(far).unwrap();
            server_handshake_range(&mut conn, "0.0.1", "/", MIN_PROTOCOL_VERSION, SUBSTITUTE_PROTOCOL_VERSION - 1).unwrap();
            let _ = tx.send(conn.recv::<Request>().map(|r| r.name()).map_err(|e| e.to_string()));
        });
        let mut client = AgentClient::over("web1", near.try_clone().unwrap(), near).unwrap();
        let path = StorePath::parse("/nix/store/lyklk3c3m7576knld0dg2rpspz1x9apk-busybox-static").unwrap();
        let info = PathInfo { path: path.clone(), references: vec![], nar_hash: flotilla_store::NarHash::digest(b""), nar_size: 1 };
        let mut plan = CopyPlan { closure_paths: 1, send: vec![info] };
        let stats = client.substitute(&mut plan, &["http://10.0.0.1:5000".into()], &[], &mut |_| {}).unwrap();
        assert_eq!(plan.send.len(), 1, "the path is still to push");
        assert_eq!((stats.paths, stats.pushed_because.get("agent too old").copied()), (0, Some(1)));
        assert!(stats.summary().contains("1 pushed instead: 1 agent too old"), "{}", stats.summary());
        assert!(stats.missed[0].detail.contains("fetching from caches needs 4"), "{}", stats.missed[0].detail);
        drop(client);
        let seen = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(seen.is_err(), "the old agent was sent {seen:?}");
    }

    #[test]
    fn an_agent_from_before_the_question_is_asked_its_status_and_always_has_work() {
        let (near, far) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let top = StorePath::parse("/nix/store/lyklk3c3m7576knld0dg2rpspz1x9apk-flotilla-system-web1").unwrap();
        let running = top.clone();
        std::thread::spawn(move || {
            let mut conn = Connection::unix(far).unwrap();
            server_handshake_range(&mut conn, "0.0.1", "/", MIN_PROTOCOL_VERSION, CURRENT_PROTOCOL_VERSION - 1).unwrap();
            let asked = conn.recv::<Request>().unwrap();
            conn.send(&Response::Status { generation: Some(3), toplevel: Some(running), services: vec![], store_free_bytes: None, pending_confirmation: None }).unwrap();
            let _ = tx.send(asked.name());
        });
        let mut client = AgentClient::over("web1", near.try_clone().unwrap(), near).unwrap();
        let (status, differs) = client.current(&top, ActivationGoal::Switch, vec![]).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "status", "a protocol 5 agent is sent no `current`");
        assert_eq!((status.generation, status.toplevel.as_ref()), (Some(3), Some(&top)));
        assert!(differs.is_some_and(|d| d.contains("protocol 5")), "it runs the toplevel, and is still deployed step by step");
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;
    use flotilla_protocol::{server_handshake_range, MIN_PROTOCOL_VERSION};
    use std::os::unix::net::UnixStream;

    #[test]
    fn an_agent_from_before_plans_is_sent_no_plan_and_the_plan_says_it_is_too_old() {
        let (near, far) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut conn = Connection::unix(far).unwrap();
            server_handshake_range(&mut conn, "0.0.1", "/", MIN_PROTOCOL_VERSION, PLAN_PROTOCOL_VERSION - 1).unwrap();
            let _ = tx.send(conn.recv::<Request>().map(|r| r.name()).map_err(|e| e.to_string()));
        });
        let mut client = AgentClient::over("web1", near.try_clone().unwrap(), near).unwrap();
        let top = StorePath::parse("/nix/store/lyklk3c3m7576knld0dg2rpspz1x9apk-flotilla-system-web1").unwrap();
        let err = client.plan(&top, None, vec![], ActivationGoal::Switch).unwrap_err().to_string();
        assert!(err.contains("plan unavailable: agent too old"), "{err}");
        assert!(err.contains("flotilla deploy --on web1"), "the fix: {err}");
        drop(client);
        let seen = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(seen.is_err(), "the old agent was sent {seen:?}");
    }
}
