//! What a user sees of a fleet too big for a line per machine: on a terminal (a pseudo-terminal
//! of 40 rows x 120 columns, through `script`), a summary block redrawn in place, failures
//! printed above it, nothing of it left at the end; `deploy --summary`'s table of the failed
//! and changed machines only; plain output (no terminal) still a line per event; `--json`
//! the same with or without `--summary`.

mod common;

use common::Fleet;

const MACHINES: usize = 30;
const FAILING: &str = "web17";

/// 30 web servers; web17's health check never passes, so it fails in every deploy.
fn fleet_file(f: &Fleet) -> String {
    let mut text = String::from(
        r#"{ meta.name = "display";
  defaults = { pkgs, ... }: { packages = [ pkgs.busybox ]; binsh = "${pkgs.busybox}/bin/sh"; };
  machines = let web = check: { name, pkgs, ... }: {
    services.httpd = {
      command = [ "${pkgs.busybox}/bin/httpd" "-f" "-p" "80" "-h" "${pkgs.writeTextDir "index.html" "hello from ${name}"}" ];
    } // check pkgs;
  }; in {
"#,
    );
    for i in 1..=MACHINES {
        let name = format!("web{i:02}");
        if name == FAILING {
            text.push_str(&format!(
                "    {name} = web (pkgs: {{ healthCheck = {{ command = [ \"${{pkgs.busybox}}/bin/false\" ]; interval = 1; retries = 1; timeout = 2; }}; }});\n"
            ));
        } else {
            text.push_str(&format!("    {name} = web (pkgs: {{ }});\n"));
        }
    }
    text.push_str("  };\n}\n");
    f.fl.file("display.nix", &text)
}

/// A terminal just capable enough for what flotilla writes on one: text, `\r`, `\n`, cursor
/// up (`ESC [ n A`), erase to the end of the screen (`ESC [ J`) or of the line (`ESC [ K`).
/// It keeps every block erased (the frames the user saw) and the screen at the end.
#[derive(Default)]
struct Terminal {
    lines: Vec<Vec<char>>,
    row: usize,
    col: usize,
    frames: Vec<Vec<String>>,
    unknown: Vec<String>,
}

impl Terminal {
    fn feed(text: &str) -> Terminal {
        let mut t = Terminal::default();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\r' => t.col = 0,
                '\n' => {
                    t.row += 1;
                    t.col = 0;
                }
                '\x1b' if chars.peek() == Some(&'[') => {
                    chars.next();
                    let mut params = String::new();
                    let mut last = ' ';
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() || c == '~' {
                            last = c;
                            break;
                        }
                        params.push(c);
                    }
                    let n: usize = params.parse().unwrap_or(1);
                    match last {
                        'A' => t.row = t.row.saturating_sub(n),
                        'J' => {
                            let frame: Vec<String> = t.lines.iter().skip(t.row).map(|l| l.iter().collect()).collect();
                            if !frame.is_empty() {
                                t.frames.push(frame);
                            }
                            t.lines.truncate(t.row + 1);
                            if let Some(l) = t.lines.get_mut(t.row) {
                                l.truncate(t.col);
                            }
                        }
                        'K' => {
                            if let Some(l) = t.lines.get_mut(t.row) {
                                l.truncate(t.col);
                            }
                        }
                        _ => t.unknown.push(format!("ESC[{params}{last}")),
                    }
                }
                c if c.is_control() => {}
                c => {
                    while t.lines.len() <= t.row {
                        t.lines.push(Vec::new());
                    }
                    let line = &mut t.lines[t.row];
                    while line.len() < t.col {
                        line.push(' ');
                    }
                    if t.col < line.len() {
                        line[t.col] = c;
                    } else {
                        line.push(c);
                    }
                    t.col += 1;
                }
            }
        }
        t
    }

    /// The screen at the end, without trailing empty lines.
    fn screen(&self) -> Vec<String> {
        let mut lines: Vec<String> = self.lines.iter().map(|l| l.iter().collect::<String>().trim_end().to_owned()).collect();
        while lines.last().is_some_and(String::is_empty) {
            lines.pop();
        }
        lines
    }
}

/// A block line `  PHASE NOW DONE FAILED` as its words.
fn phase_row<'a>(frame: &'a [String], phase: &str) -> Option<Vec<&'a str>> {
    frame.iter().map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|w| w.first() == Some(&phase) && w.len() == 4)
}

#[test]
fn a_fleet_of_30_on_a_terminal_is_a_summary_block_with_its_failure_above_it() {
    let f = Fleet::new();
    let file = fleet_file(&f);
    let table = f.fl.dir.path().join("table.txt");
    // stderr (the progress) on a terminal of 40 rows; stdout (the table) to a file.
    let line = f.cmd_line(&["deploy", "-f", &file]);
    let out = f
        .fl_env(std::process::Command::new("script"))
        .env("TERM", "xterm")
        .args(["-qec", &format!("stty rows 40 cols 120; {line} >'{}'", table.display()), "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("prerequisite missing: script (Debian: bsdutils)");
    let transcript = String::from_utf8_lossy(&out.stdout).into_owned();
    let table = std::fs::read_to_string(&table).unwrap();
    let said = format!("exit {:?}\n--- terminal\n{transcript}\n--- table\n{table}", out.status.code());
    assert_eq!(out.status.code(), Some(1), "one machine failed: exit 1\n{said}");
    let term = Terminal::feed(&transcript);
    assert!(term.unknown.is_empty(), "escape sequences beyond the summary's: {:?}\n{said}", term.unknown);

    // What stays: the failure with its machine and reason, the count, and no block, no wall.
    let screen = term.screen();
    let failure = screen.iter().find(|l| l.starts_with(&format!("{FAILING}: activate: FAILED: "))).unwrap_or_else(|| panic!("the failure is not on the screen\n{said}"));
    assert!(failure.contains("health") || failure.contains("httpd"), "the failure says why: {failure}\n{said}");
    assert!(screen.iter().any(|l| l.contains(&format!("{} of {MACHINES} machines ok", MACHINES - 1))), "{said}");
    assert!(!screen.iter().any(|l| l.contains("slowest:") || l.contains("PHASE") || l.contains(" machines, ")), "the block was left on the screen: {screen:#?}\n{said}");
    let per_machine = transcript.lines().filter(|l| l.contains(": preflight: ") || l.contains(": copy: ")).count();
    assert_eq!(per_machine, 0, "a line per machine on the terminal\n{said}");
    assert!(screen.len() < 20, "{} lines left on the screen: {screen:#?}", screen.len());

    // The block: machines per phase, counting up to all 30 done; the slowest named.
    assert!(!term.frames.is_empty(), "no block was drawn\n{said}");
    assert!(term.frames.iter().all(|fr| fr.len() < 40), "a block taller than the terminal\n{said}");
    assert!(term.frames.iter().any(|fr| fr[0].starts_with(&format!("{MACHINES} machines, "))), "{said}");
    assert!(
        term.frames.iter().any(|fr| phase_row(fr, "copy") == Some(vec!["copy", "0", &MACHINES.to_string(), "0"])),
        "no frame shows all {MACHINES} machines done copying\n{said}"
    );
    assert!(
        term.frames.iter().any(|fr| phase_row(fr, "activate").is_some_and(|w| w[2] == (MACHINES - 1).to_string() && w[3] == "1")),
        "no frame shows {} activated and 1 failed\n{said}",
        MACHINES - 1
    );
    assert!(term.frames.iter().any(|fr| fr.iter().any(|l| l.trim_start().starts_with("slowest: web"))), "no slowest machine named\n{said}");

    // Without --summary the table has a row per machine.
    let rows = table.lines().filter(|l| l.starts_with("web")).count();
    assert_eq!(rows, MACHINES, "{said}");

    // Again, plain (no terminal) and --summary: a line per machine's event on stderr; the
    // table lists the failed machine only and counts the rest.
    let r = f.run(&["deploy", "--summary", "-f", &file]);
    let said = format!("exit {}\n--- stdout\n{}\n--- stderr\n{}", r.code(), r.stdout(), r.stderr());
    assert_eq!(r.code(), 1, "{said}");
    for i in 1..=MACHINES {
        let name = format!("web{i:02}");
        assert!(r.stderr().lines().any(|l| l.starts_with(&format!("{name}: preflight: "))), "no plain line for {name}\n{said}");
    }
    let rows: Vec<String> = r.stdout().lines().filter(|l| l.starts_with("web")).map(str::to_owned).collect();
    assert_eq!(rows.len(), 1, "--summary lists the failed machine only: {rows:#?}\n{said}");
    assert!(rows[0].starts_with(FAILING), "{said}");
    assert!(r.stdout().lines().any(|l| l == format!("... and {} unchanged machines", MACHINES - 1)), "{said}");

    // --json: --summary changes nothing in the report.
    let (code, report, said) = f.deploy_json(&["--summary", "-f", &file]);
    assert_eq!(code, 1, "{said}");
    assert_eq!(report["machines"].as_array().map(Vec::len), Some(MACHINES), "{said}");
    assert_eq!(report["machines"].as_array().unwrap().iter().filter(|m| m["outcome"] == "unchanged").count(), MACHINES - 1, "{said}");
}
