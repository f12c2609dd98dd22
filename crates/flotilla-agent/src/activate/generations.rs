//! Generations: the links `nix/var/flotilla/profiles/system-<N>-link` to toplevels, the
//! `system` profile that names the current one, and the record of those that failed. Listing,
//! adding, deleting and rolling back to a generation live here; each profile change is one
//! atomic rename. What makes a generation run is [`super::switch`]'s.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_protocol::{ActivationGoal, ActivationReport, GenerationInfo};
use flotilla_store::StorePath;

use super::Agent;
use crate::error::{io_err, AgentError};
use crate::machine::symlink_atomic;

/// The agent's record of failed generations (number → why), in its state directory.
const FAILED: &str = flotilla_protocol::layout::records::FAILED;

impl Agent {
    pub(super) fn gen_link(&self, n: u64) -> PathBuf {
        self.root.profiles_dir().join(format!("system-{n}-link"))
    }

    /// Every generation, oldest first.
    pub fn generations(&self) -> Result<Vec<GenerationInfo>, AgentError> {
        let current = self.current_generation();
        let failed: BTreeMap<u64, String> = self.root.read_state(FAILED).unwrap_or_default();
        let mut out = Vec::new();
        let dir = self.root.profiles_dir();
        for e in fs::read_dir(&dir).map_err(io_err(format!("cannot list {}", dir.display())))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("system-").and_then(|r| r.strip_suffix("-link")).and_then(|n| n.parse::<u64>().ok()) else { continue };
            let Ok(target) = fs::read_link(e.path()) else { continue };
            let Ok(toplevel) = StorePath::parse(&target.to_string_lossy()) else { continue };
            let created = fs::symlink_metadata(e.path()).and_then(|m| m.modified()).ok();
            out.push(GenerationInfo {
                number: n,
                toplevel,
                created_unix: created.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()).unwrap_or(0),
                current: current == Some(n),
                failed: failed.get(&n).cloned(),
            });
        }
        out.sort_by_key(|g| g.number);
        Ok(out)
    }

    /// The generation the `system` profile points at.
    pub fn current_generation(&self) -> Option<u64> {
        let target = fs::read_link(self.root.profiles_dir().join("system")).ok()?;
        let name = target.file_name()?.to_string_lossy().into_owned();
        name.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok()
    }

    /// The system running now (`/run/current-system`).
    pub fn running_system(&self) -> Option<StorePath> {
        let target = fs::read_link(self.root.path("/run/current-system")).ok()?;
        StorePath::parse(&target.to_string_lossy()).ok()
    }

    /// Links a new generation for `toplevel` and makes it current, unless the current one
    /// already is `toplevel`.
    pub(super) fn add_generation(&self, toplevel: &StorePath, dry: bool) -> Result<u64, AgentError> {
        let n = self.generation_for(toplevel, ActivationGoal::Switch)?;
        if dry || Some(n) == self.current_generation() {
            return Ok(n);
        }
        symlink_atomic(Path::new(&toplevel.to_absolute()), &self.gen_link(n)).map_err(io_err("cannot link the new generation"))?;
        symlink_atomic(Path::new(&format!("system-{n}-link")), &self.root.profiles_dir().join("system"))
            .map_err(io_err("cannot switch the system profile"))?;
        Ok(n)
    }

    /// The generation an activation of `toplevel` for `goal` leaves current: for `switch`
    /// and `boot` the current one when it already is `toplevel`, else a new one.
    pub(super) fn generation_for(&self, toplevel: &StorePath, goal: ActivationGoal) -> Result<u64, AgentError> {
        if !goal.adds_generation() {
            return Ok(self.current_generation().unwrap_or(0));
        }
        let gens = self.generations()?;
        Ok(match gens.iter().find(|g| g.current) {
            Some(cur) if &cur.toplevel == toplevel => cur.number,
            _ => gens.last().map_or(1, |g| g.number + 1),
        })
    }

    /// Switches back to generation `to` (default: the one before the current).
    ///
    /// While a generation awaits confirmation, `to: None` rejects it instead: what ran before
    /// it runs again and it is marked failed, for `reason`.
    pub fn rollback(&self, to: Option<u64>, reason: Option<&str>) -> Result<(u64, ActivationReport), AgentError> {
        let pending = self.take_pending();
        match (pending, to) {
            (Some(p), None) => {
                let done = self.return_to(&p.previous, reason.unwrap_or("rolled back before it was confirmed"))?;
                let report = ActivationReport { messages: vec![done], ..Default::default() };
                return Ok((self.current_generation().unwrap_or(0), report));
            }
            // The deployer rejects a generation it thinks is pending; the window already
            // closed and the agent rolled it back: going back one more would be wrong.
            (None, None) if reason.is_some() => {
                return Err(AgentError::NotFound("no generation awaits confirmation: it was rolled back already, when its confirmation window closed".into()));
            }
            _ => {}
        }
        let gens = self.generations()?;
        let current = self.current_generation();
        let target = match to {
            Some(n) => gens.iter().find(|g| g.number == n).ok_or_else(|| {
                AgentError::NotFound(format!("generation {n} does not exist; generations: {}", list(&gens)))
            })?,
            None => gens
                .iter()
                .rev()
                .find(|g| current.is_none_or(|c| g.number < c) && g.failed.is_none())
                .ok_or_else(|| AgentError::NotFound(format!("no good generation before the current one to roll back to; generations: {}", list(&gens))))?,
        };
        let m = self.manifest(&target.toplevel)?;
        symlink_atomic(Path::new(&format!("system-{}-link", target.number)), &self.root.profiles_dir().join("system"))
            .map_err(io_err("cannot switch the system profile"))?;
        let mut report = self.switch_to(&target.toplevel, &m.system, false)?;
        self.forget_stale_record();
        report.messages.extend(self.sync_gc_roots());
        Ok((target.number, report))
    }

    pub(super) fn mark_failed(&self, n: u64, why: &str) {
        let mut failed: BTreeMap<u64, String> = self.root.read_state(FAILED).unwrap_or_default();
        failed.insert(n, why.to_owned());
        if let Err(e) = self.root.write_state(FAILED, &failed) {
            eprintln!("flotilla-agent: cannot record generation {n} as failed: {e}");
        }
    }

    /// Deletes generations (never the current one): all but the newest `keep_last`, and/or
    /// those older than `older_than_secs`.
    pub fn delete_generations(&self, keep_last: Option<u32>, older_than_secs: Option<u64>) -> Result<Vec<u64>, AgentError> {
        self.refuse_while_pending("delete generations")?;
        let gens = self.generations()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let keep_from = keep_last.map(|k| gens.len().saturating_sub(k as usize)).unwrap_or(0);
        let mut deleted = Vec::new();
        for (i, g) in gens.iter().enumerate() {
            let by_count = keep_last.is_some() && i < keep_from;
            let by_age = older_than_secs.is_some_and(|a| now.saturating_sub(g.created_unix) > a);
            let chosen = (keep_last.is_some() || older_than_secs.is_some()) && (keep_last.is_none() || by_count) && (older_than_secs.is_none() || by_age);
            if chosen && !g.current {
                fs::remove_file(self.gen_link(g.number)).map_err(io_err(format!("cannot delete generation {}", g.number)))?;
                deleted.push(g.number);
            }
        }
        if let Some(problem) = self.sync_gc_roots() {
            eprintln!("flotilla-agent: {problem}");
        }
        Ok(deleted)
    }
}

fn list(gens: &[GenerationInfo]) -> String {
    if gens.is_empty() {
        return "none".into();
    }
    gens.iter().map(|g| g.number.to_string()).collect::<Vec<_>>().join(", ")
}
