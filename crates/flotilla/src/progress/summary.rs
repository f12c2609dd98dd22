//! The live display of a fleet too big for a line per machine: a fixed block redrawn in place
//! on the terminal (machines per phase, the slowest still at work), with failures and notes
//! printed above it as they happen, so a thousand machines never scroll a thousand lines.
//!
//! The block is redrawn by a ticker at most [`TICKS_PER_SEC`] times a second, only when what
//! it shows changed, and it is erased without a trace by [`Summary::finish`]: what stays on the
//! screen is what was printed above it (each failure, each note), then the command's report.
//! It never draws more lines than the terminal has rows, and never a line wider than it (a
//! wrapped line would move the cursor away from where the block starts). It writes only
//! `\r`, `\n`, "cursor up" (`ESC [ n A`) and "erase to the end of the screen" (`ESC [ J`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_engine::events::Phase;
use flotilla_engine::EngineEvent;
use flotilla_model::{escape_controls, MachineName};

/// How often the block may be redrawn.
pub const TICKS_PER_SEC: u64 = 10;

/// How many of the slowest machines at work the block names.
const SLOWEST: usize = 5;

/// The block on a terminal, and the ticker that redraws it.
pub struct Summary {
    shared: Arc<Mutex<Screen>>,
    stop: Arc<AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
    verbose: bool,
}

impl Summary {
    /// Starts a block on stderr (a terminal) showing `board` and the events that follow.
    pub fn start(board: Board, verbose: bool) -> Summary {
        let shared = Arc::new(Mutex::new(Screen { board, drawn: Vec::new() }));
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1000 / TICKS_PER_SEC));
                    shared.lock().unwrap_or_else(|p| p.into_inner()).redraw();
                }
            })
        };
        Summary { shared, stop, ticker: Some(ticker), verbose }
    }

    /// Takes one event: the board changes (the ticker shows it), and a failure or a note is
    /// printed above the block at once.
    pub fn event(&mut self, e: &EngineEvent) {
        let mut screen = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let above = screen.board.event(e, Instant::now(), self.verbose);
        if !above.is_empty() {
            screen.print_above(&above);
        }
    }

    /// Prints lines above the block at once.
    pub fn print_above(&mut self, lines: &[String]) {
        if !lines.is_empty() {
            self.shared.lock().unwrap_or_else(|p| p.into_inner()).print_above(lines);
        }
    }

    /// Stops the ticker, shows the last state once (when the ticker had not) and erases the
    /// block: the report that follows starts where the block started.
    pub fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        let mut screen = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        screen.redraw();
        screen.erase();
    }
}

impl Drop for Summary {
    fn drop(&mut self) {
        if self.ticker.is_some() {
            self.finish();
        }
    }
}

/// The board and what of it is on the screen now.
struct Screen {
    board: Board,
    /// The block's lines as last drawn (none: nothing to erase).
    drawn: Vec<String>,
}

impl Screen {
    /// Draws the block again if what it shows changed.
    fn redraw(&mut self) {
        let (rows, cols) = flotilla_engine::terminal::size(std::io::stderr().as_fd()).unwrap_or((24, 80));
        let lines = self.board.render(Instant::now(), usize::from(rows), usize::from(cols));
        if lines == self.drawn {
            return;
        }
        let mut out = erase_sequence(self.drawn.len());
        for l in &lines {
            out.push_str(l);
            out.push('\n');
        }
        write_stderr(&out);
        self.drawn = lines;
    }

    /// Erases the block; the ticker draws it again below whatever is printed now.
    fn erase(&mut self) {
        if !self.drawn.is_empty() {
            write_stderr(&erase_sequence(self.drawn.len()));
            self.drawn.clear();
        }
    }

    /// Prints lines above the block, which stay when it is redrawn.
    fn print_above(&mut self, lines: &[String]) {
        let mut out = erase_sequence(self.drawn.len());
        self.drawn.clear();
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
        write_stderr(&out);
    }
}

/// Moves the cursor from below a block of `lines` lines to its first line and erases from
/// there to the end of the screen.
fn erase_sequence(lines: usize) -> String {
    match lines {
        0 => String::new(),
        n => format!("\r\x1b[{n}A\x1b[J"),
    }
}

fn write_stderr(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes()).and_then(|()| err.flush());
}

/// Where one machine is.
struct Seat {
    /// The phase it is in or last finished.
    phase: Option<Phase>,
    /// When it entered that phase.
    since: Instant,
    /// Whether it works in `phase` now (not between phases, waiting for a place, or done).
    busy: bool,
    /// Whether a failure of it was printed.
    failed: bool,
}

/// A phase's count.
#[derive(Default, Clone, Copy)]
struct Tally {
    done: usize,
    failed: usize,
}

/// What the block shows, kept from the events; pure, so it is tested without a terminal.
pub struct Board {
    started: Instant,
    machines: BTreeMap<MachineName, Seat>,
    /// The phases in the order they were first seen.
    phases: Vec<(Phase, Tally)>,
}

impl Board {
    /// A board with no machine yet, its clock started at `started`.
    pub fn new(started: Instant) -> Board {
        Board { started, machines: BTreeMap::new(), phases: Vec::new() }
    }

    /// How many machines the events named.
    pub fn machine_count(&self) -> usize {
        self.machines.len()
    }

    fn tally(&mut self, phase: Phase) -> &mut Tally {
        let i = match self.phases.iter().position(|(p, _)| *p == phase) {
            Some(i) => i,
            None => {
                self.phases.push((phase, Tally::default()));
                self.phases.len() - 1
            }
        };
        &mut self.phases[i].1
    }

    /// `machine` is in `phase` from `now`: at work in it (`busy`), or only listed for it,
    /// waiting for a place under the phase's limit.
    fn enter(&mut self, machine: &MachineName, phase: Phase, now: Instant, busy: bool) {
        self.tally(phase);
        let seat = self.machines.entry(machine.clone()).or_insert(Seat { phase: None, since: now, busy: false, failed: false });
        seat.phase = Some(phase);
        seat.since = now;
        seat.busy = busy;
    }

    /// Takes an event; returns the lines to print above the block (a failure, a note).
    pub fn event(&mut self, e: &EngineEvent, now: Instant, verbose: bool) -> Vec<String> {
        match e {
            EngineEvent::PhaseStarted { phase, machines } => {
                // Listed for the phase, not yet in it: a fleet of 1,000 waits for 8 places in
                // the copy. The build is one Nix call for them all: all are in it at once.
                let building = *phase == Phase::Build;
                for m in machines {
                    self.enter(m, *phase, now, building);
                }
            }
            EngineEvent::MachinePhase { machine, phase } => self.enter(machine, *phase, now, true),
            EngineEvent::MachineDone { machine, phase, ok, detail } => {
                let tally = self.tally(*phase);
                if *ok {
                    tally.done += 1;
                } else {
                    tally.failed += 1;
                }
                let seat = self.machines.entry(machine.clone()).or_insert(Seat { phase: Some(*phase), since: now, busy: false, failed: false });
                seat.busy = false;
                if !ok {
                    seat.failed = true;
                    return vec![failure_line(machine, phase.as_str(), detail)];
                }
            }
            // A machine's end: a failure no phase reported is printed here, never lost.
            EngineEvent::MachineFinished { machine, failed_phase, error, .. } => {
                let seat = self.machines.entry(machine.clone()).or_insert(Seat { phase: *failed_phase, since: now, busy: false, failed: false });
                seat.busy = false;
                if let (Some(error), false) = (error, seat.failed) {
                    seat.failed = true;
                    return vec![failure_line(machine, failed_phase.map_or("deploy", Phase::as_str), error)];
                }
            }
            EngineEvent::Note { message } => return vec![format!("note: {}", escape_controls(message))],
            EngineEvent::NixLog { line } if verbose => return vec![format!("  nix: {}", escape_controls(line))],
            EngineEvent::NixLog { .. } | EngineEvent::CopyProgress { .. } | EngineEvent::AwaitingConfirmation { .. } => {}
        }
        Vec::new()
    }

    /// The block for a terminal of `rows` x `cols`: a line for the fleet, a line per phase
    /// (machines in it now, done, failed), then the slowest machines at work; never more
    /// than `rows - 1` lines, none wider than `cols - 1` characters.
    pub(super) fn render(&self, now: Instant, rows: usize, cols: usize) -> Vec<String> {
        let busy: Vec<(&MachineName, &Seat)> = self.machines.iter().filter(|(_, s)| s.busy).collect();
        let failed = self.machines.values().filter(|s| s.failed).count();
        let mut lines = vec![format!(
            "{} machines, {}s: {} at work, {} failed",
            self.machines.len(),
            now.saturating_duration_since(self.started).as_secs(),
            busy.len(),
            failed
        )];
        lines.push(format!("  {:<10} {:>6} {:>6} {:>6}", "PHASE", "NOW", "DONE", "FAILED"));
        for (phase, tally) in &self.phases {
            let now_in = busy.iter().filter(|(_, s)| s.phase == Some(*phase)).count();
            lines.push(format!("  {:<10} {now_in:>6} {:>6} {:>6}", phase.as_str(), tally.done, tally.failed));
        }
        let mut slowest = busy;
        slowest.sort_by_key(|(name, s)| (s.since, *name));
        let room = rows.saturating_sub(1).saturating_sub(lines.len());
        for (name, s) in slowest.iter().take(SLOWEST.min(room)) {
            let phase = s.phase.map_or("-", Phase::as_str);
            lines.push(format!("  slowest: {name} {phase} {}s", now.saturating_duration_since(s.since).as_secs()));
        }
        lines.truncate(rows.saturating_sub(1).max(1));
        let width = cols.saturating_sub(1).max(1);
        lines.into_iter().map(|l| if l.chars().count() > width { l.chars().take(width).collect() } else { l }).collect()
    }
}

/// A failure as the plain display prints it: `web07: activate: FAILED: reason`.
fn failure_line(machine: &MachineName, phase: &str, detail: &str) -> String {
    format!("{machine}: {phase}: FAILED: {}", escape_controls(detail.lines().next().unwrap_or("")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: usize) -> MachineName {
        MachineName::new(&format!("web{n:02}")).unwrap()
    }

    #[test]
    fn the_block_counts_machines_per_phase_and_names_the_slowest() {
        let t0 = Instant::now();
        let mut b = Board::new(t0);
        let all: Vec<MachineName> = (1..=30).map(m).collect();
        b.event(&EngineEvent::PhaseStarted { phase: Phase::Build, machines: all.clone() }, t0, false);
        for n in &all {
            b.event(&EngineEvent::MachineDone { machine: n.clone(), phase: Phase::Build, ok: true, detail: "built".into() }, t0, false);
        }
        for (i, n) in all.iter().enumerate().take(8) {
            b.event(&EngineEvent::MachinePhase { machine: n.clone(), phase: Phase::Copy }, t0 + Duration::from_secs(i as u64), false);
        }
        let above = b.event(&EngineEvent::MachineDone { machine: m(3), phase: Phase::Copy, ok: false, detail: "disk full\nmore".into() }, t0, false);
        assert_eq!(above, vec!["web03: copy: FAILED: disk full".to_owned()]);
        // Its end says the same failure again: printed once.
        let finished = EngineEvent::MachineFinished {
            machine: m(3),
            goal: flotilla_engine::deploy::Goal::Switch,
            outcome: flotilla_engine::deploy::Outcome::Failed,
            failed_phase: Some(Phase::Copy),
            error: Some("disk full".into()),
            summary: String::new(),
            runs: None,
        };
        assert!(b.event(&finished, t0, false).is_empty());
        let lines = b.render(t0 + Duration::from_secs(10), 40, 120);
        assert_eq!(lines[0], "30 machines, 10s: 7 at work, 1 failed");
        assert!(lines.contains(&format!("  {:<10} {:>6} {:>6} {:>6}", "build", 0, 30, 0)), "{lines:#?}");
        assert!(lines.contains(&format!("  {:<10} {:>6} {:>6} {:>6}", "copy", 7, 0, 1)), "{lines:#?}");
        assert_eq!(lines.iter().filter(|l| l.contains("slowest:")).count(), SLOWEST);
        assert!(lines.contains(&"  slowest: web01 copy 10s".to_owned()), "{lines:#?}");
        assert!(!lines.iter().any(|l| l.contains("web03")), "a failed machine is not at work: {lines:#?}");
    }

    #[test]
    fn the_block_fits_the_terminal() {
        let t0 = Instant::now();
        let mut b = Board::new(t0);
        let all: Vec<MachineName> = (1..=30).map(m).collect();
        b.event(&EngineEvent::PhaseStarted { phase: Phase::Build, machines: all }, t0, false);
        let lines = b.render(t0, 5, 12);
        assert_eq!(lines.len(), 4);
        assert!(lines.iter().all(|l| l.chars().count() <= 11), "{lines:#?}");
        assert_eq!(b.render(t0, 1, 80).len(), 1);
    }

    #[test]
    fn a_failure_no_phase_reported_is_printed_at_the_machines_end() {
        let t0 = Instant::now();
        let mut b = Board::new(t0);
        let finished = EngineEvent::MachineFinished {
            machine: m(7),
            goal: flotilla_engine::deploy::Goal::Switch,
            outcome: flotilla_engine::deploy::Outcome::Failed,
            failed_phase: None,
            error: Some("no\x1b[2Jway".into()),
            summary: String::new(),
            runs: None,
        };
        assert_eq!(b.event(&finished, t0, false), vec!["web07: deploy: FAILED: no\\x1b[2Jway".to_owned()]);
    }
}
