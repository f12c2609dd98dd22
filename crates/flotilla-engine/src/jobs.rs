//! Jobs: each machine's work runs on a worker thread and reports through events, which reach
//! the caller's listener on the caller's thread, in order. How many machines are in a phase
//! at once is a per-phase limit ([`Limits`]), so a slow copy never holds back more machines
//! than the copy may, and the default is written here once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use flotilla_model::MachineName;

use crate::{EngineEvent, Listener, Phase};

/// Machines provisioned, and copied to, at once when nobody says otherwise: work for this
/// host's CPUs and disk, where more at once only queue.
pub const DEFAULT_PARALLEL: usize = 8;

/// Machines activating at once when nobody says otherwise. An activation mostly waits (a
/// service without a health check must stay up 2 s, health checks probe on their
/// intervals), so many wait together: on 2 cores, 100 fresh machines spent 25 s in
/// activation 8 at a time, and under 2 s 64 at a time, the CPU never the limit.
pub const DEFAULT_ACTIVATE_PARALLEL: usize = 64;

/// How many machines may be in each phase at once. Evaluation and build are one Nix call for
/// the whole fleet (Nix's own `max-jobs` spreads the build), so they have no limit here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Machines being created, started, stopped or destroyed.
    pub provision: usize,
    /// Machines receiving closures (and pre-flight checked before it).
    pub copy: usize,
    /// Machines activating, checking, confirming or rolling back, and receiving keys.
    pub activate: usize,
}

impl Limits {
    /// Every phase at most `n` machines at once (what `--parallel` sets).
    pub fn all(n: usize) -> Limits {
        Limits { provision: n, copy: n, activate: n }
    }

    /// The most machines any phase works on at once: the number of workers a job needs.
    pub fn widest(&self) -> usize {
        self.provision.max(self.copy).max(self.activate)
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { provision: DEFAULT_PARALLEL, copy: DEFAULT_PARALLEL, activate: DEFAULT_ACTIVATE_PARALLEL }
    }
}

/// A counting semaphore: a phase's free places. A job that runs several phases in a row on
/// one machine takes each phase's place for the length of that phase only.
#[derive(Debug)]
pub(crate) struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    /// `n` places (at least one).
    pub(crate) fn new(n: usize) -> Slots {
        Slots { free: Mutex::new(n.max(1)), freed: Condvar::new() }
    }

    /// Waits for a place; it is given back when the guard drops.
    pub(crate) fn take(&self) -> Slot<'_> {
        let mut free = self.free.lock().expect("slots");
        while *free == 0 {
            free = self.freed.wait(free).expect("slots");
        }
        *free -= 1;
        Slot(self)
    }
}

/// A place in a phase, held until dropped.
pub(crate) struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().expect("slots") += 1;
        self.0.freed.notify_one();
    }
}

/// Runs `work` on every item with at most `parallel` at once, sending what it reports to the
/// caller's thread, where `listen` sees each event in order; returns the results in the
/// order of `items`.
pub(crate) fn fan_out<T: Sync, R: Send>(
    items: &[T],
    parallel: usize,
    listen: Listener<'_>,
    work: impl Fn(&T, &dyn Fn(EngineEvent)) -> R + Sync,
) -> Vec<R> {
    let (tx, rx) = mpsc::channel::<EngineEvent>();
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..parallel.clamp(1, items.len().max(1)) {
            let tx = tx.clone();
            let (next, results, work) = (&next, &results, &work);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let send = |e: EngineEvent| {
                    let _ = tx.send(e);
                };
                let r = work(item, &send);
                *results[i].lock().expect("result slot") = Some(r);
            });
        }
        drop(tx);
        for event in rx {
            listen(&event);
        }
    });
    results.into_iter().map(|r| r.into_inner().expect("result slot").expect("every item worked on")).collect()
}

/// The event of `machine` finishing `phase`, with what it did or why it failed.
pub(crate) fn done(machine: &MachineName, phase: Phase, r: std::result::Result<&str, &str>) -> EngineEvent {
    EngineEvent::MachineDone {
        machine: machine.clone(),
        phase,
        ok: r.is_ok(),
        detail: match r {
            Ok(s) | Err(s) => s.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_keeps_order_and_delivers_every_event() {
        let items: Vec<u32> = (0..20).collect();
        let mut seen = 0;
        let out = fan_out(&items, 4, &mut |_| seen += 1, |i, send| {
            send(EngineEvent::NixLog { line: i.to_string() });
            i * 2
        });
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(seen, 20);
    }

    #[test]
    fn a_phase_never_holds_more_machines_than_its_limit() {
        // Eight workers, a phase of two places: at no moment are three inside it.
        let items: Vec<u32> = (0..16).collect();
        let slots = Slots::new(2);
        let inside = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        fan_out(&items, 8, &mut |_| {}, |_, _| {
            let _place = slots.take();
            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            inside.fetch_sub(1, Ordering::SeqCst);
        });
        assert_eq!(most.load(Ordering::SeqCst), 2, "the copy phase's limit was not kept");
    }

    #[test]
    fn parallel_sets_every_phase_and_the_default_activates_more_at_once() {
        assert_eq!(Limits::all(3), Limits { provision: 3, copy: 3, activate: 3 });
        assert_eq!(Limits::default(), Limits { provision: 8, copy: 8, activate: 64 });
        assert_eq!(Limits { provision: 1, copy: 3, activate: 2 }.widest(), 3);
    }
}
