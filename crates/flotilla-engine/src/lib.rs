//! The deployment engine: the pipeline of DESIGN.md, machine by machine.
//!
//! Evaluate (phase 1: platforms), plan facts, evaluate again with facts, check every machine
//! against the option schema, instantiate and realise the selected toplevels in one Nix call,
//! and record it all. A per-machine failure is a row in the report, never an early return;
//! an `Err` means the deployment as a whole could not run (bad input, Nix missing, ...), and
//! then nothing was built and nothing written to the state DB.

//!
//! Each part of that pipeline is a module: [`eval`] reads and checks the file, [`build`]
//! realises and records, [`deploy`] rolls out, [`fleet`] runs the commands on machines that
//! exist, [`lock`] keeps commands on one deployment apart, [`jobs`] runs machines in parallel
//! within each phase's limit, and [`events`] is what they all report through.

pub mod build;
pub mod cache;
pub mod checks;
mod deadline;
pub mod deploy;
pub mod doctor;
mod error;
pub mod eval;
pub mod events;
pub mod exec;
pub mod facts;
pub mod image;
pub mod oci;
pub mod fleet;
pub mod jobs;
pub mod keys;
mod gcroots;
mod ledger;
pub mod lock;
pub mod plan;
pub mod platform;
pub mod procfs;
pub mod remote;
pub mod terminal;

use std::path::Path;

use flotilla_nix::Nix;
use flotilla_state::State;

pub use build::{check_agent, BuildReport, MachineBuild};
pub use error::{EngineError, Result};
pub use eval::{Evaluated, Toplevels};
pub use events::{EngineEvent, Listener, Phase};
pub use jobs::Limits;
pub use lock::LockGuard;

pub(crate) use build::secs;

/// The engine: Nix, the state DB, who is acting, and how many machines each phase works on
/// at once.
pub struct Engine {
    nix: Nix,
    state: State,
    actor: String,
    limits: Limits,
}

impl Engine {
    /// An engine over a Nix handle and an open state DB; `actor` is recorded in the ledger.
    pub fn new(nix: Nix, state: State, actor: String) -> Engine {
        Engine { nix, state, actor, limits: Limits::default() }
    }

    /// How many machines each phase of every command works on at once from now on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The state DB.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// What platforms need to know to act for `deployment`.
    pub fn context(&self, deployment: &str, agent: &Path) -> platform::Context {
        platform::Context { state_path: self.state.path().to_owned(), deployment: deployment.to_owned(), agent: agent.to_owned() }
    }

    /// Appends a ledger event.
    pub fn event(&mut self, deployment: &str, machine: Option<&str>, kind: &str, status: &str, message: &str) -> Result<()> {
        let e = self.ledger_entry(deployment, machine, kind, status, message);
        self.state.add_event(&e)?;
        Ok(())
    }

    /// A ledger event by this engine's actor, now.
    pub(crate) fn ledger_entry(&self, deployment: &str, machine: Option<&str>, kind: &str, status: &str, message: &str) -> flotilla_state::Event {
        flotilla_state::Event {
            deployment: deployment.to_owned(),
            machine: machine.map(str::to_owned),
            at: flotilla_state::now(),
            actor: self.actor.clone(),
            kind: kind.to_owned(),
            status: status.to_owned(),
            message: message.to_owned(),
            details: None,
        }
    }

}
