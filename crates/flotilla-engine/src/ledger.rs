//! The ledger as a listener of a deploy's events, like the progress renderer and the `--json`
//! printer: what each machine's `MachineFinished` says becomes its ledger events and, when it
//! changed what the machine runs, its active generation. A deploy records them all in one
//! transaction at its end ([`Ledger::record`]), so the state never holds half a deploy.

use flotilla_model::MachineName;

use crate::deploy::Outcome;
use crate::events::{EngineEvent, Phase};
use crate::{Engine, Result};

/// What a deploy's events said, waiting to be recorded.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Machine, kind, status, message.
    events: Vec<(MachineName, String, &'static str, String)>,
    /// Machine, toplevel, generation, message.
    activations: Vec<(MachineName, String, i64, String)>,
}

impl Ledger {
    /// Takes note of `e`; events that say nothing the ledger keeps are passed over.
    pub(crate) fn observe(&mut self, e: &EngineEvent) {
        let EngineEvent::MachineFinished { machine, goal, outcome, failed_phase, error, summary, runs } = e else { return };
        let mut event = |kind: &str, status: &'static str, message: &str| self.events.push((machine.clone(), kind.to_owned(), status, message.to_owned()));
        match outcome {
            Outcome::Failed | Outcome::RolledBack => {
                let status = if *outcome == Outcome::RolledBack { "rolled back" } else { "failed" };
                event(failed_phase.map_or("deploy", Phase::as_str), status, error.as_deref().unwrap_or(""));
            }
            Outcome::Reverted => event("rollback", "ok", summary),
            // What changed nothing on the machine (a copy, a dry run) is an event; an
            // activation is recorded as the generation it made.
            Outcome::Deployed | Outcome::Unchanged if runs.is_none() || !goal.activates() => event(goal.as_str(), "ok", summary),
            Outcome::Deployed | Outcome::Unchanged => {}
        }
        if let Some((generation, toplevel)) = runs {
            self.activations.push((machine.clone(), toplevel.to_absolute(), *generation as i64, summary.clone()));
        }
    }

    /// Records everything observed for `deployment`, in one transaction.
    pub(crate) fn record(self, engine: &mut Engine, deployment: &str) -> Result<()> {
        let events: Vec<flotilla_state::Event> =
            self.events.iter().map(|(machine, kind, status, message)| engine.ledger_entry(deployment, Some(machine.as_str()), kind, status, message)).collect();
        let activations: Vec<flotilla_state::Activation<'_>> = self
            .activations
            .iter()
            .map(|(machine, toplevel, number, message)| flotilla_state::Activation { machine: machine.as_str(), toplevel, number: *number, message })
            .collect();
        let actor = engine.actor.clone();
        engine.state.record_deploy(deployment, &actor, &activations, &events)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::Goal;

    fn finished(outcome: Outcome, goal: Goal, runs: Option<u64>) -> EngineEvent {
        let top = flotilla_store::StorePath::parse("/nix/store/00000000000000000000000000000000-flotilla-system-web").unwrap();
        EngineEvent::MachineFinished {
            machine: MachineName::new("web").unwrap(),
            goal,
            outcome,
            failed_phase: (outcome == Outcome::Failed || outcome == Outcome::RolledBack).then_some(Phase::Activate),
            error: Some("the check failed".into()),
            summary: "summary".into(),
            runs: runs.map(|n| (n, top.clone())),
        }
    }

    fn observed(events: &[EngineEvent]) -> (Vec<(String, &'static str)>, Vec<i64>) {
        let mut ledger = Ledger::default();
        for e in events {
            ledger.observe(e);
        }
        (ledger.events.iter().map(|(_, kind, status, _)| (kind.clone(), *status)).collect(), ledger.activations.iter().map(|a| a.2).collect())
    }

    #[test]
    fn each_way_a_machine_ends_is_recorded_as_the_ledger_has_always_said_it() {
        assert_eq!(observed(&[finished(Outcome::RolledBack, Goal::Switch, None)]), (vec![("activate".into(), "rolled back")], vec![]));
        assert_eq!(observed(&[finished(Outcome::Failed, Goal::Switch, None)]), (vec![("activate".into(), "failed")], vec![]));
        assert_eq!(observed(&[finished(Outcome::Reverted, Goal::Switch, Some(1))]), (vec![("rollback".into(), "ok")], vec![1]));
        // An activation is its generation, not an event; a copy is an event.
        assert_eq!(observed(&[finished(Outcome::Deployed, Goal::Switch, Some(2))]), (vec![], vec![2]));
        assert_eq!(observed(&[finished(Outcome::Deployed, Goal::Copy, None)]), (vec![("copy".into(), "ok")], vec![]));
        // Other events are not the ledger's.
        assert_eq!(observed(&[EngineEvent::Note { message: "hi".into() }]), (vec![], vec![]));
    }
}
