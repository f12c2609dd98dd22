//! The deployer's side of the agent protocol: copy a closure to a machine (only the paths it
//! lacks, references first, as NARs streamed from the local store) and drive activation,
//! rollback and generations. Transport-agnostic: a unix socket today, ssh's stdio later.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use flotilla_nix::Nix;
use flotilla_protocol::{
    client_handshake, ActivationGoal, ActivationReport, BoxedConnection, Compression, Connection, GenerationInfo, PathInfo,
    Request, Response, ServiceStatus, Welcome,
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
    /// The connection or the protocol failed.
    #[error(transparent)]
    Protocol(#[from] flotilla_protocol::ProtocolError),
    /// Nix could not say what to copy.
    #[error(transparent)]
    Nix(#[from] flotilla_nix::NixError),
    /// The agent answered with an error (its message is for the user).
    #[error("the agent refused: {0}")]
    Agent(String),
    /// The agent answered something that does not fit the request.
    #[error("the agent answered {got} to {request}")]
    Unexpected {
        /// What was asked.
        request: &'static str,
        /// What came back.
        got: &'static str,
    },
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

/// A conversation with one agent.
pub struct AgentClient {
    conn: BoxedConnection,
    welcome: Welcome,
}

impl AgentClient {
    /// Connects to an agent's unix socket and shakes hands.
    pub fn connect_unix(socket: &Path) -> Result<AgentClient, RemoteError> {
        let connect_err = |source| RemoteError::Connect { socket: socket.to_owned(), source };
        let stream = std::os::unix::net::UnixStream::connect(socket).map_err(connect_err)?;
        let reader = stream.try_clone().map_err(connect_err)?;
        Self::over(Box::new(reader), Box::new(stream))
    }

    /// Shakes hands over any byte stream (a child process's pipes, for ssh).
    pub fn over(reader: Box<dyn Read + Send>, writer: Box<dyn Write + Send>) -> Result<AgentClient, RemoteError> {
        let mut conn = Connection::boxed(reader, writer);
        let welcome = client_handshake(&mut conn, concat!("flotilla ", env!("CARGO_PKG_VERSION")))?;
        Ok(AgentClient { conn, welcome })
    }

    /// What the agent said in the handshake.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    fn call(&mut self, request: &Request) -> Result<Response, RemoteError> {
        match self.conn.call(request, |_| {})? {
            Response::Error { message, .. } => Err(RemoteError::Agent(message)),
            r => Ok(r),
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
        infos: &[flotilla_nix::PathInfo],
        compression: Compression,
        progress: &mut dyn FnMut(&CopyProgress),
    ) -> Result<CopyStats, RemoteError> {
        let start = Instant::now();
        let all: Vec<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
        let missing = match self.call(&Request::QueryMissing { paths: all })? {
            Response::Missing { paths } => paths.into_iter().collect::<std::collections::BTreeSet<_>>(),
            other => return Err(RemoteError::Unexpected { request: "query_missing", got: other.name() }),
        };
        let mut stats = CopyStats { closure_paths: infos.len(), ..Default::default() };
        let send: Vec<PathInfo> = infos
            .iter()
            .filter(|i| missing.contains(&i.path))
            .map(|i| PathInfo { path: i.path.clone(), references: i.references.clone(), nar_hash: i.nar_hash, nar_size: i.nar_size })
            .collect();
        if send.is_empty() {
            stats.seconds = start.elapsed().as_secs_f64();
            return Ok(stats);
        }
        self.conn.send(&Request::AddPaths { paths: send.clone(), compression })?;
        let total_paths = send.len() as u64;
        let total_bytes: u64 = send.iter().map(|i| i.nar_size).sum();
        {
            let mut writer = self.conn.bulk_writer(compression)?;
            for info in &send {
                let n = flotilla_store::encode_path(Path::new(&info.path.to_absolute()), &mut writer)
                    .map_err(|source| RemoteError::Local { path: info.path.clone(), source })?;
                stats.paths_sent += 1;
                stats.bytes_sent += n;
                progress(&CopyProgress { paths: stats.paths_sent, total_paths, bytes: stats.bytes_sent, total_bytes });
            }
            writer.finish()?;
        }
        match self.conn.wait_response(|_| {})? {
            Response::PathsAdded { .. } => {}
            Response::Error { message, .. } => return Err(RemoteError::Agent(message)),
            other => return Err(RemoteError::Unexpected { request: "add_paths", got: other.name() }),
        }
        stats.seconds = start.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// Activates a toplevel already on the machine.
    pub fn activate(&mut self, toplevel: &StorePath, goal: ActivationGoal) -> Result<(u64, ActivationReport), RemoteError> {
        match self.call(&Request::Activate { toplevel: toplevel.clone(), goal, confirm_within_secs: None })? {
            Response::Activated { generation, report } => Ok((generation, report)),
            other => Err(RemoteError::Unexpected { request: "activate", got: other.name() }),
        }
    }

    /// Re-activates an earlier generation (default: the previous one).
    pub fn rollback(&mut self, to: Option<u64>) -> Result<(u64, ActivationReport), RemoteError> {
        match self.call(&Request::Rollback { to })? {
            Response::Activated { generation, report } => Ok((generation, report)),
            other => Err(RemoteError::Unexpected { request: "rollback", got: other.name() }),
        }
    }

    /// The machine's generations.
    pub fn generations(&mut self) -> Result<Vec<GenerationInfo>, RemoteError> {
        match self.call(&Request::ListGenerations)? {
            Response::Generations { generations } => Ok(generations),
            other => Err(RemoteError::Unexpected { request: "list_generations", got: other.name() }),
        }
    }

    /// Deletes old generations; returns their numbers.
    pub fn delete_generations(&mut self, keep_last: Option<u32>, older_than_secs: Option<u64>) -> Result<Vec<u64>, RemoteError> {
        match self.call(&Request::DeleteGenerations { keep_last, older_than_secs })? {
            Response::GenerationsDeleted { deleted } => Ok(deleted),
            other => Err(RemoteError::Unexpected { request: "delete_generations", got: other.name() }),
        }
    }

    /// Removes store paths no generation needs; returns (paths, bytes).
    pub fn collect_garbage(&mut self) -> Result<(u64, u64), RemoteError> {
        match self.call(&Request::CollectGarbage)? {
            Response::GarbageCollected { paths, bytes } => Ok((paths, bytes)),
            other => Err(RemoteError::Unexpected { request: "collect_garbage", got: other.name() }),
        }
    }

    /// The current generation, running system and services.
    pub fn status(&mut self) -> Result<MachineStatus, RemoteError> {
        match self.call(&Request::Status)? {
            Response::Status { generation, toplevel, services } => Ok(MachineStatus { generation, toplevel, services }),
            other => Err(RemoteError::Unexpected { request: "status", got: other.name() }),
        }
    }
}
