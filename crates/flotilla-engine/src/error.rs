//! Why a command could not run at all: the one error type of the engine's public API.
//! A machine's failure is never one of these; it is a row of the command's report.

use std::path::PathBuf;

use flotilla_nix::NixError;
use flotilla_state::StateError;
use flotilla_model::SelectionError;

/// Why a command could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Nix failed (evaluation error, Nix missing).
    #[error(transparent)]
    Nix(#[from] NixError),
    /// The state DB failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Machines' configs are wrong; every problem found.
    #[error("{}", join_lines(.0))]
    Config(Vec<String>),
    /// `--on` matched nothing.
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// The agent binary is missing or unusable.
    #[error("{0}")]
    Agent(String),
    /// This host lacks what the selected machines' platforms need (`flotilla doctor` says
    /// all of it).
    #[error("{0}")]
    Host(String),
    /// The deployment's lock was lost mid-command (its lease expired and was taken over, or
    /// was broken); the command stopped before changing anything more.
    #[error("{0}")]
    LeaseLost(String),
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn join_lines(v: &[String]) -> String {
    v.join("\n")
}

/// This crate's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
