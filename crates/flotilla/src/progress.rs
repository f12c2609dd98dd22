//! Progress while the engine works: one line per machine redrawn in place on a terminal,
//! plain lines otherwise, or one JSON object per event for CI (`--json`).

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::time::Duration;

use flotilla_engine::EngineEvent;
use flotilla_model::{escape_controls, human_bytes, MachineName};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How events are shown.
pub enum Progress {
    /// Redrawn lines on a terminal.
    Live { bars: MultiProgress, lines: BTreeMap<MachineName, ProgressBar>, verbose: bool },
    /// One line per step.
    Plain { verbose: bool },
    /// One JSON object per event on stdout.
    Json,
}

impl Progress {
    /// Live when stderr is a terminal, plain otherwise; JSON when asked.
    pub fn new(json: bool, verbose: bool) -> Progress {
        if json {
            Progress::Json
        } else if std::io::stderr().is_terminal() {
            Progress::Live { bars: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()), lines: BTreeMap::new(), verbose }
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
            Progress::Live { bars, lines, verbose } => {
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
        if let Progress::Live { bars, lines, .. } = self {
            for bar in lines.values() {
                bar.finish_and_clear();
            }
            let _ = bars.clear();
        }
    }
}

/// The first line of a detail (often a machine's words), control characters escaped.
fn first_line(s: &str) -> std::borrow::Cow<'_, str> {
    escape_controls(s.lines().next().unwrap_or(""))
}
