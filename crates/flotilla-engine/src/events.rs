//! What the engine reports while it works. Every command's jobs send these; the progress
//! renderer, the `--json` printer and the ledger recorder listen to the same stream, so no
//! consumer has a private view of what happened.

use flotilla_model::MachineName;
use serde::Serialize;

/// A step of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Creating or starting machines.
    Provision,
    /// Building toplevels.
    Build,
    /// Checking a machine can take the deploy: reachable, protocol, free disk.
    Preflight,
    /// Copying closures.
    Copy,
    /// Uploading keys.
    Keys,
    /// Activating generations (the agent checks their health).
    Activate,
    /// The deployer's own checks.
    Check,
    /// Confirming the new generation over a new connection.
    Confirm,
    /// Returning to an earlier generation.
    Rollback,
    /// Starting a machine.
    Start,
    /// Stopping a machine.
    Stop,
    /// Rebooting a machine.
    Reboot,
    /// Destroying a machine.
    Destroy,
}

impl Phase {
    /// The phase's name as users see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Provision => "provision",
            Phase::Build => "build",
            Phase::Preflight => "preflight",
            Phase::Copy => "copy",
            Phase::Keys => "keys",
            Phase::Activate => "activate",
            Phase::Check => "check",
            Phase::Confirm => "confirm",
            Phase::Rollback => "rollback",
            Phase::Start => "start",
            Phase::Stop => "stop",
            Phase::Reboot => "reboot",
            Phase::Destroy => "destroy",
        }
    }
}

/// Something the engine reports while it works; renderers, JSON printers and the ledger all
/// consume the same stream.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EngineEvent {
    /// A phase started, for some machines (all when empty).
    PhaseStarted {
        /// Which.
        phase: Phase,
        /// For which machines.
        machines: Vec<MachineName>,
    },
    /// One machine entered a phase.
    MachinePhase {
        /// The machine.
        machine: MachineName,
        /// The phase.
        phase: Phase,
    },
    /// How far a machine's copy is.
    CopyProgress {
        /// The machine.
        machine: MachineName,
        /// NAR bytes sent.
        bytes: u64,
        /// NAR bytes to send.
        total_bytes: u64,
        /// Paths sent.
        paths: u64,
        /// Paths to send.
        total_paths: u64,
    },
    /// A machine activated a generation and rolls it back unless the deployer confirms it,
    /// over a new connection, in time.
    AwaitingConfirmation {
        /// The machine.
        machine: MachineName,
        /// The generation.
        generation: u64,
        /// Seconds the agent waits.
        within_secs: u64,
    },
    /// Something the user should know that is not a failure.
    Note {
        /// What.
        message: String,
    },
    /// A line of Nix's build output.
    NixLog {
        /// The line.
        line: String,
    },
    /// One machine finished a phase.
    MachineDone {
        /// The machine.
        machine: MachineName,
        /// The phase.
        phase: Phase,
        /// Whether it worked.
        ok: bool,
        /// The toplevel or the reason.
        detail: String,
    },
    /// One machine's deploy ended (its whole row is in the report): what the ledger records.
    MachineFinished {
        /// The machine.
        machine: MachineName,
        /// How far the deploy went.
        goal: crate::deploy::Goal,
        /// How it ended.
        outcome: crate::deploy::Outcome,
        /// The phase that failed, if one did.
        failed_phase: Option<Phase>,
        /// Why it failed.
        error: Option<String>,
        /// What happened, in a few words.
        summary: String,
        /// The generation it runs now and its toplevel, when this deploy (or its revert)
        /// changed what it runs.
        runs: Option<(u64, flotilla_store::StorePath)>,
    },
}

/// Where events go.
pub type Listener<'a> = &'a mut dyn FnMut(&EngineEvent);
