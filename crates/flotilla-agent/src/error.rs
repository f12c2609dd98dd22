//! The agent's error: why an operation on the machine failed, in words for the deployer's
//! user. It lives apart from [`crate::activate`] so that the modules activation uses (`etc`,
//! `keys`, `users`) depend on it and not on the activation that calls them.

use std::io;

/// Why an operation on the machine failed; the message is for the deployer's user.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request names something the machine does not have.
    #[error("{0}")]
    NotFound(String),
    /// Filesystem trouble.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: io::Error,
    },
    /// Activation could not complete, or its checks failed; the previous generation was
    /// restored.
    #[error("{0}")]
    Activation(String),
    /// The health checks failed and there was nothing to roll back to.
    #[error("{0}")]
    Unhealthy(String),
    /// The request is malformed or names something unusable.
    #[error("{0}")]
    BadRequest(String),
    /// The request conflicts with what the machine is doing.
    #[error("{0}")]
    Conflict(String),
}

/// `AgentError::Io` for `what`, as a `map_err` argument.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}
