//! Progress while the engine works: one line per machine redrawn in place on a terminal
//! while the fleet fits on it, a summary block once it does not (`summary.rs`), plain lines
//! when stderr is no terminal, or one JSON object per event for CI (`--json`).

mod summary;

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::os::fd::AsFd as _;
use std::time::Duration;

use flotilla_engine::EngineEvent;
use flotilla_model::{escape_controls, human_bytes, MachineName};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The most machines shown a line each on a terminal. Past it, or past the terminal's rows
/// (less a few for the lines printed with them), the display is a summary: indicatif can
/// redraw only the lines still on the screen, so a list longer than the terminal leaves a
/// scrolling wall of stale copies, and a list of more than a screenful is not read anyway.
pub const MAX_MACHINE_LINES: usize = 20;

/// Whether `machines` lines, one per machine, fit on this terminal.
fn fits(machines: usize) -> bool {
    let rows = flotilla_engine::terminal::size(std::io::stderr().as_fd()).map_or(24, |(rows, _)| usize::from(rows));
    machines <= MAX_MACHINE_LINES.min(rows.saturating_sub(4))
}

/// How events are shown.
pub enum Progress {
    /// Redrawn lines on a terminal, a line per machine. The board follows the events too,
    /// so that the summary it turns into when the fleet grows past [`fits`] knows them all.
    Live { bars: MultiProgress, lines: BTreeMap<MachineName, ProgressBar>, verbose: bool, board: summary::Board },
    /// A block redrawn on a terminal: machines per phase, the slowest; failures above it.
    Summary(summary::Summary),
    /// One line per step.
    Plain { verbose: bool },
    /// One JSON object per event on stdout.
    Json,
}

impl Progress {
    /// Live when stderr is a terminal (a summary once the fleet does not fit on it), plain
    /// otherwise; JSON when asked.
    pub fn new(json: bool, verbose: bool) -> Progress {
        if json {
            Progress::Json
        } else if std::io::stderr().is_terminal() {
            Progress::Live {
                bars: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                lines: BTreeMap::new(),
                verbose,
                board: summary::Board::new(std::time::Instant::now()),
            }
        } else {
            Progress::Plain { verbose }
        }
    }

    /// Shows one event.
    pub fn event(&mut self, e: &EngineEvent) {
        match self {
            Progress::Json => {
                outln!("{}", serde_json::to_string(e).expect("events serialise"));
            }
            Progress::Plain { verbose } => match e {
                EngineEvent::PhaseStarted { phase, machines } => eprintln!("{}: {}", phase.as_str(), crate::output::names(machines)),
                EngineEvent::MachineDone { machine, phase, ok, detail } => {
                    let status = if *ok { "" } else { "FAILED: " };
                    eprintln!("{machine}: {}: {status}{}", phase.as_str(), first_line(detail));
                }
                EngineEvent::Note { message } => eprintln!("note: {}", escape_controls(message)),
                EngineEvent::AwaitingConfirmation { machine, generation, within_secs } => {
                    eprintln!("{machine}: generation {generation} rolls back unless confirmed within {within_secs} s")
                }
                EngineEvent::NixLog { line } if *verbose => eprintln!("  nix: {}", escape_controls(line)),
                _ => {}
            },
            Progress::Summary(s) => s.event(e),
            Progress::Live { bars, lines, verbose, board } => {
                let above = board.event(e, std::time::Instant::now(), *verbose);
                if !fits(board.machine_count()) {
                    for bar in lines.values() {
                        bar.finish_and_clear();
                    }
                    let _ = bars.clear();
                    let board = std::mem::replace(board, summary::Board::new(std::time::Instant::now()));
                    let mut s = summary::Summary::start(board, *verbose);
                    s.print_above(&above);
                    *self = Progress::Summary(s);
                    return;
                }
                let mut line = |machine: &MachineName| -> ProgressBar {
                    lines
                        .entry(machine.clone())
                        .or_insert_with(|| {
                            let bar = bars.add(ProgressBar::new_spinner());
                            bar.set_style(ProgressStyle::with_template("{spinner} {prefix:<12} {msg}").expect("template parses"));
                            bar.set_prefix(machine.to_string());
                            bar.enable_steady_tick(Duration::from_millis(120));
                            bar
                        })
                        .clone()
                };
                match e {
                    EngineEvent::PhaseStarted { phase, machines } => {
                        for m in machines {
                            line(m).set_message(format!("{}…", phase.as_str()));
                        }
                    }
                    EngineEvent::MachinePhase { machine, phase } => line(machine).set_message(format!("{}…", phase.as_str())),
                    EngineEvent::CopyProgress { machine, bytes, total_bytes, paths, total_paths } => line(machine).set_message(format!(
                        "copy {paths}/{total_paths} paths, {} of {}",
                        human_bytes(*bytes),
                        human_bytes(*total_bytes)
                    )),
                    EngineEvent::MachineDone { machine, phase, ok, detail } => {
                        let status = if *ok { "" } else { "FAILED: " };
                        line(machine).set_message(format!("{}: {status}{}", phase.as_str(), first_line(detail)));
                    }
                    EngineEvent::Note { message } => {
                        let _ = bars.println(format!("note: {}", escape_controls(message)));
                    }
                    EngineEvent::AwaitingConfirmation { machine, generation, .. } => {
                        line(machine).set_message(format!("generation {generation} awaits confirmation…"))
                    }
                    EngineEvent::NixLog { line } if *verbose => {
                        let _ = bars.println(format!("  nix: {}", escape_controls(line)));
                    }
                    EngineEvent::NixLog { .. } => {}
                    // The row was drawn by its phases; the report at the end says the rest.
                    EngineEvent::MachineFinished { .. } => {}
                }
            }
        }
    }

    /// Stops redrawing and clears the lines: the report that follows says how each machine
    /// ended.
    pub fn finish(&mut self) {
        match self {
            Progress::Live { bars, lines, .. } => {
                for bar in lines.values() {
                    bar.finish_and_clear();
                }
                let _ = bars.clear();
            }
            Progress::Summary(s) => s.finish(),
            Progress::Plain { .. } | Progress::Json => {}
        }
    }
}

/// The first line of a detail (often a machine's words), control characters escaped.
fn first_line(s: &str) -> std::borrow::Cow<'_, str> {
    escape_controls(s.lines().next().unwrap_or(""))
}
