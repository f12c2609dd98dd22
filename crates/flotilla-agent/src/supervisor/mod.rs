//! The agent's service supervisor: it starts each service of the active generation as its own
//! process group, with a clean environment and the service's user, logs its output, restarts
//! it per its policy with back-off, stops it (SIGTERM, then SIGKILL) and reaps every child of
//! the agent, orphans included, because the agent may be PID 1 of a container.
//!
//! It owns `waitpid`: the agent makes itself a child subreaper and one reaper thread waits for
//! every child; other code runs its one-off commands through [`Supervisor::run_command`] and
//! must never spawn with `std::process` or wait for a child itself. The supervisor must never
//! restart a service that was stopped on purpose, and never leave a zombie behind.
//!
//! Layout: `sys` holds the only unsafe code (fork/exec, waitpid, kill, prctl, the signal
//! handler); `reaper` routes exit statuses; `service` is one service's state machine; `log`
//! the rotating log files; `accounts` reads `etc/passwd` and `etc/group` of the machine root.

mod accounts;
mod attached;
mod command;
mod log;
mod reaper;
mod service;
mod signal;
pub(crate) mod sys;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flotilla_model::ServiceSpec;
use serde::{Deserialize, Serialize};

pub use attached::{Attached, AttachedStdio};
pub use command::CommandOutput;
pub use signal::{install_termination_handler, TerminationKind, TerminationSignal};

use log::RotatingLog;
use reaper::Reaper;
use service::{Launch, Service};

/// `PATH` of a service whose environment does not set one.
pub const DEFAULT_PATH: &str = "/run/current-system/sw/bin:/bin";

/// How the supervisor runs services on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorConfig {
    /// The machine's root: `/`, or a directory standing for it (services are chrooted there).
    pub root: PathBuf,
    /// Where `<service>.log` files go (as the agent sees it, not inside `root`).
    pub log_dir: PathBuf,
    /// How long a service has after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// Size at which a log rotates; 0 never rotates.
    pub log_max_bytes: u64,
    /// Rotated logs kept (`<name>.log.1` … `<name>.log.<log_keep>`).
    pub log_keep: usize,
}

// A service's state and status are the protocol's own types: the agent reports them to the
// deployer as they are.
pub use flotilla_protocol::{ServiceState, ServiceStatus};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }

    /// The exit code, if it exited rather than being killed.
    pub fn code(&self) -> Option<i32> {
        match self {
            ExitStatus::Exited(code) => Some(*code),
            ExitStatus::Signaled(_) => None,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exit {code}"),
            ExitStatus::Signaled(signal) => write!(f, "signal {signal}"),
        }
    }
}

/// What can go wrong supervising services; each message names the service and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The configured root is unusable.
    #[error("machine root {path} is not usable ({source}); give the directory that stands for the machine's /")]
    BadRoot {
        /// The root given.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The log directory cannot be created.
    #[error("cannot create the service log directory {path}: {source}; check that the agent may write there")]
    LogDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A process-wide facility (the reaper, a thread, a signal handler) could not be set up.
    #[error("supervisor: {what} failed: {source}")]
    System {
        /// What was being set up.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The spec has no command.
    #[error("service {service}: no command to run; the system manifest must give `command` (scripts are resolved when the system is built)")]
    NoCommand {
        /// The service.
        service: String,
    },
    /// The program is not an absolute path.
    #[error("service {service}: program {program:?} is not an absolute path; give its full path (a store path)")]
    RelativeCommand {
        /// The service.
        service: String,
        /// The program as given.
        program: String,
    },
    /// Something else in the spec cannot be used (name, environment, working directory).
    #[error("service {service}: {problem}")]
    InvalidSpec {
        /// The service.
        service: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// `etc/passwd` or `etc/group` cannot be read.
    #[error("service {service}: cannot read {path}: {source}; the machine's account files must exist before its services start")]
    AccountFile {
        /// The service.
        service: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The service's user is not in the machine's passwd file.
    #[error("service {service}: user {user:?} does not exist in {passwd}; declare it under `users` or fix the service's `user`")]
    UnknownUser {
        /// The service.
        service: String,
        /// The missing user.
        user: String,
        /// The passwd file searched.
        passwd: PathBuf,
    },
    /// The service's group is not in the machine's group file.
    #[error("service {service}: group {group:?} does not exist in {group_file}; declare it under `groups` or fix the service's `group`")]
    UnknownGroup {
        /// The service.
        service: String,
        /// The missing group.
        group: String,
        /// The group file searched.
        group_file: PathBuf,
    },
    /// The agent is not root and the service wants another user.
    #[error("service {service}: the agent runs as uid {agent_uid} and cannot switch to user {user:?} (uid {uid}); run the agent as root, or the service as the agent's user")]
    NotPrivileged {
        /// The service.
        service: String,
        /// The wanted user.
        user: String,
        /// Its uid.
        uid: u32,
        /// The agent's uid.
        agent_uid: u32,
    },
    /// The process could not be started.
    #[error("service {service}: starting {program} failed at {stage}: {source}")]
    Spawn {
        /// The service.
        service: String,
        /// The program.
        program: String,
        /// The step that failed.
        stage: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// `start` of a service that is already up.
    #[error("service {service} is already running; use restart to replace it")]
    AlreadyRunning {
        /// The service.
        service: String,
    },
    /// A name the supervisor does not know.
    #[error("no service named {service} is supervised; `status` lists the supervised services")]
    UnknownService {
        /// The name asked for.
        service: String,
    },
    /// A process group outlived SIGKILL.
    #[error("service {service}: process group {pgid} is still there {waited:?} after SIGTERM and SIGKILL; a process is stuck in the kernel (state D in /proc/<pid>/stat)")]
    StopFailed {
        /// The service.
        service: String,
        /// Its process group.
        pgid: u32,
        /// How long stop waited.
        waited: Duration,
    },
    /// A one-off command cannot be run as given.
    #[error("command {command}: {problem}")]
    InvalidCommand {
        /// The command line.
        command: String,
        /// What is wrong.
        problem: String,
    },
    /// A one-off command could not be started.
    #[error("command {command}: starting it failed at {stage}: {source}")]
    CommandSpawn {
        /// The command line.
        command: String,
        /// The step that failed.
        stage: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// An attached command's program is not on the machine.
    #[error("no program {program:?} {}; give its full path, or add the package that has it to the machine", match .path { Some(p) => format!("in PATH ({p})"), None => "there".to_owned() })]
    ProgramNotFound {
        /// The program as given.
        program: String,
        /// The PATH searched, when it was looked up there.
        path: Option<&'static str>,
    },
    /// A one-off command ran out of time and was killed.
    #[error("command {command}: still running after {timeout:?}, killed; raise the timeout or fix the command")]
    CommandTimeout {
        /// The command line.
        command: String,
        /// The limit.
        timeout: Duration,
    },
}

/// The supervisor's result type.
pub type Result<T, E = SupervisorError> = std::result::Result<T, E>;

/// Locks a mutex, ignoring poisoning: every critical section here leaves consistent state.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A value handed to the system holds a NUL byte: which one.
#[derive(Debug)]
struct NulIn(String);

impl std::fmt::Display for NulIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} contains a NUL byte; remove it", self.0)
    }
}

/// `value` for the system; `Err` with the sentence for the spec's error when it holds a NUL byte.
fn cstring(what: &str, value: &str) -> std::result::Result<CString, NulIn> {
    CString::new(value).map_err(|_| NulIn(format!("{what} {value:?}")))
}

/// Supervises the services of one machine. Share it with `Arc`; dropping it stops them all.
pub struct Supervisor {
    config: SupervisorConfig,
    /// `Some(root)` when services are chrooted (the root is not `/`).
    chroot: Option<CString>,
    reaper: &'static Reaper,
    services: Mutex<BTreeMap<String, Arc<Service>>>,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A supervisor with no services; makes this process a child subreaper and starts the
    /// process-wide reaper on first use.
    pub fn new(config: SupervisorConfig) -> Result<Supervisor> {
        let bad_root = |source| SupervisorError::BadRoot { path: config.root.clone(), source };
        let root = config.root.canonicalize().map_err(bad_root)?;
        if !root.is_dir() {
            return Err(bad_root(io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let chroot = if root == Path::new("/") {
            None
        } else {
            Some(
                CString::new(root.as_os_str().as_encoded_bytes())
                    .map_err(|_| bad_root(io::Error::from_raw_os_error(libc::EINVAL)))?,
            )
        };
        std::fs::create_dir_all(&config.log_dir)
            .map_err(|source| SupervisorError::LogDir { path: config.log_dir.clone(), source })?;
        let reaper = Reaper::global().map_err(|(what, source)| SupervisorError::System { what, source })?;
        Ok(Supervisor { config: SupervisorConfig { root, ..config }, chroot, reaper, services: Mutex::new(BTreeMap::new()) })
    }

    /// The configuration (with `root` made canonical).
    pub fn config(&self) -> &SupervisorConfig {
        &self.config
    }

    /// Checks `spec` and turns it into what the child needs, before anything is stopped or
    /// spawned.
    fn prepare(&self, name: &str, spec: &ServiceSpec) -> Result<Launch> {
        let invalid = |problem: String| SupervisorError::InvalidSpec { service: name.to_owned(), problem };
        if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
            return Err(invalid(format!(
                "{name:?} cannot name a service (it names the log file): use letters, digits, '-', '_', '.', '@'"
            )));
        }
        let argv = match spec.command.as_deref() {
            Some(argv) if !argv.is_empty() => argv,
            _ => return Err(SupervisorError::NoCommand { service: name.to_owned() }),
        };
        if !argv[0].starts_with('/') {
            return Err(SupervisorError::RelativeCommand { service: name.to_owned(), program: argv[0].clone() });
        }
        let identity = accounts::resolve(name, &self.config.root, &spec.user, spec.group.as_deref())?;
        let agent_uid = sys::euid();
        let creds = if agent_uid == 0 {
            Some(sys::Creds { uid: identity.uid, gid: identity.gid, groups: identity.groups.clone() })
        } else if identity.uid == agent_uid {
            None
        } else {
            return Err(SupervisorError::NotPrivileged {
                service: name.to_owned(),
                user: identity.user,
                uid: identity.uid,
                agent_uid,
            });
        };
        let mut env = BTreeMap::new();
        env.insert("PATH".to_owned(), DEFAULT_PATH.to_owned());
        env.insert("HOME".to_owned(), identity.home.clone());
        env.insert("USER".to_owned(), identity.user.clone());
        env.insert("LOGNAME".to_owned(), identity.user.clone());
        env.extend(spec.environment.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut env_c = Vec::with_capacity(env.len());
        for (key, value) in &env {
            if key.is_empty() || key.contains('=') {
                return Err(invalid(format!("environment variable name {key:?} is empty or contains '='; rename it")));
            }
            env_c.push(cstring("environment variable", &format!("{key}={value}")).map_err(|e| invalid(e.to_string()))?);
        }
        let cwd = spec.working_directory.as_deref().unwrap_or("/");
        if !cwd.starts_with('/') {
            return Err(invalid(format!("working directory {cwd:?} is not absolute; give a full path")));
        }
        let program = sys::Program {
            path: cstring("program", &argv[0]).map_err(|e| invalid(e.to_string()))?,
            search: Vec::new(),
            controlling_tty: false,
            argv: argv.iter().map(|a| cstring("argument", a)).collect::<std::result::Result<_, _>>().map_err(|e| invalid(e.to_string()))?,
            env: env_c,
            chroot: self.chroot.clone(),
            cwd: cstring("working directory", cwd).map_err(|e| invalid(e.to_string()))?,
            creds,
        };
        let dev_null = self.config.root.join("dev/null");
        let log_path = self.config.log_dir.join(format!("{name}.log"));
        Ok(Launch {
            program,
            dev_null: dev_null.exists().then_some(dev_null),
            log: Arc::new(Mutex::new(RotatingLog::new(log_path, self.config.log_max_bytes, self.config.log_keep))),
        })
    }

    fn start_prepared(&self, name: &str, spec: &ServiceSpec, launch: Launch) -> Result<()> {
        let service = Arc::new(Service::new(name, spec.after.clone(), spec.restart, launch));
        {
            let mut services = lock(&self.services);
            if services.get(name).is_some_and(|s| s.active()) {
                return Err(SupervisorError::AlreadyRunning { service: name.to_owned() });
            }
            services.insert(name.to_owned(), Arc::clone(&service));
        }
        service.start(self.reaper, self.config.stop_timeout)
    }

    fn get(&self, name: &str) -> Result<Arc<Service>> {
        lock(&self.services)
            .get(name)
            .cloned()
            .ok_or_else(|| SupervisorError::UnknownService { service: name.to_owned() })
    }

    /// Starts `name`; returns once its program has been exec'd (or with why it could not be).
    pub fn start(&self, name: &str, spec: &ServiceSpec) -> Result<()> {
        let launch = self.prepare(name, spec)?;
        self.start_prepared(name, spec, launch)
    }

    /// Stops `name` (SIGTERM to its process group, SIGKILL after `stop_timeout`) and returns
    /// once every process of the group is gone. It stays listed, as `Stopped`.
    pub fn stop(&self, name: &str) -> Result<()> {
        self.get(name)?.stop(self.config.stop_timeout)
    }

    /// Stops `name` if it is supervised and starts it with `spec`; a spec that cannot be
    /// started (unknown user, bad command) is rejected before the old service is stopped.
    pub fn restart(&self, name: &str, spec: &ServiceSpec) -> Result<()> {
        let launch = self.prepare(name, spec)?;
        match self.stop(name) {
            Ok(()) | Err(SupervisorError::UnknownService { .. }) => {}
            Err(e) => return Err(e),
        }
        self.start_prepared(name, spec, launch)
    }

    /// Every supervised service, by name.
    pub fn status(&self) -> Vec<ServiceStatus> {
        let services: Vec<Arc<Service>> = lock(&self.services).values().cloned().collect();
        services.iter().map(|s| s.status()).collect()
    }

    /// Names of the services being kept up (starting, running or waiting to restart).
    pub fn running(&self) -> Vec<String> {
        self.status()
            .into_iter()
            .filter(|s| matches!(s.state, ServiceState::Starting | ServiceState::Running | ServiceState::Backoff))
            .map(|s| s.name)
            .collect()
    }

    /// Stops every service, dependents first: a service that others are `after` is stopped
    /// only once those others are gone. Services with nothing between them stop in parallel.
    pub fn stop_all(&self) {
        let services: BTreeMap<String, Arc<Service>> = lock(&self.services).clone();
        for layer in stop_order(&services) {
            std::thread::scope(|scope| {
                for service in layer {
                    scope.spawn(move || {
                        if let Err(e) = service.stop(self.config.stop_timeout) {
                            service.note(&e.to_string());
                        }
                    });
                }
            });
        }
    }

    /// Runs a one-off command (a health check) to completion, capturing its output; it is
    /// killed, with its process group, after `timeout`. It runs as the agent, inside the
    /// machine root, with `PATH` set to [`DEFAULT_PATH`] and stdin at end-of-file.
    pub fn run_command(&self, argv: &[String], timeout: Duration) -> Result<CommandOutput> {
        command::run(self.reaper, self.chroot.clone(), &self.config.root, argv, timeout, None)
    }

    /// [`Supervisor::run_command`] with stdin read from `input` (a file on this host). Every
    /// child of the agent is waited for by the supervisor's reaper, so the agent runs its own
    /// helpers (the host's `nix-store`) this way too, never with `std::process`.
    pub fn run_command_with_input(&self, argv: &[String], timeout: Duration, input: &std::path::Path) -> Result<CommandOutput> {
        command::run(self.reaper, self.chroot.clone(), &self.config.root, argv, timeout, Some(input))
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Groups services into layers to stop one after another: each layer holds the services no
/// remaining service is `after`. A cycle (which the config check rejects) ends in one layer.
fn stop_order(services: &BTreeMap<String, Arc<Service>>) -> Vec<Vec<&Arc<Service>>> {
    let mut left: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let mut layers = Vec::new();
    while !left.is_empty() {
        let needed: BTreeSet<&str> =
            left.iter().flat_map(|name| services[*name].after.iter().map(String::as_str)).collect();
        let mut layer: Vec<&str> = left.iter().copied().filter(|name| !needed.contains(name)).collect();
        if layer.is_empty() {
            layer = left.iter().copied().collect();
        }
        for name in &layer {
            left.remove(name);
        }
        layers.push(layer.into_iter().map(|name| &services[name]).collect());
    }
    layers
}
