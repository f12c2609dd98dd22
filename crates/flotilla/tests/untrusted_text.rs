//! Issue 13, item 8: text a machine controls (a health check's output, a service's log, a
//! failure reason, a command's output in a listing) reaches the operator's terminal and the
//! ledger with its control characters escaped, never as raw escape sequences.
//!
//! Runs real containers inside the test's own network namespace (`common::Fleet`).

mod common;

use common::Fleet;

/// What a hostile service prints: retitle the terminal, then clear the screen.
const RAW: &str = "\x1b]0;pwned\x07\x1b[2J";
/// The same, as flotilla shows it.
const SHOWN: &str = "\\x1b]0;pwned\\x07\\x1b[2J";

/// A machine whose service logs `RAW` and whose health check prints it, exiting `check_exit`.
fn deployment(check_exit: u8) -> String {
    format!(
        r#"{{ pkgs, ... }}: {{
  meta.name = "untrusted";
  machines.web1 = {{
    packages = [ pkgs.busybox ];
    binsh = "${{pkgs.busybox}}/bin/sh";
    services.noisy = {{
      script = "printf 'noisy started \\033]0;pwned\\007\\033[2J\\n'; exec sleep 100000";
      healthCheck = {{
        command = [ "${{pkgs.busybox}}/bin/sh" "-c" "printf 'check says \\033]0;pwned\\007\\033[2J'; exit {check_exit}" ];
        retries = 1;
        interval = 1;
      }};
    }};
  }};
}}
"#
    )
}

#[track_caller]
fn no_raw_escape(what: &str, text: &str) {
    assert!(!text.contains('\x1b') && !text.contains('\x07'), "{what} holds a raw control character:\n{text:?}");
}

#[track_caller]
fn shows_escaped(what: &str, text: &str) {
    no_raw_escape(what, text);
    assert!(text.contains(SHOWN), "{what} lacks the escaped form {SHOWN:?}:\n{text}");
}

#[test]
fn text_from_a_machine_is_escaped_on_the_terminal_and_in_the_ledger() {
    // Nix turns `\\033` into `\033`, which printf turns into ESC.
    assert!(deployment(0).contains(r"\\033]0;pwned\\007"));
    let f = Fleet::new();
    let file = f.fl.file("deployment.nix", &deployment(0));
    let r = f.run(&["deploy", "-f", &file]);
    assert_eq!(r.code(), 0, "first deploy failed\nstdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());

    // The service's log, as `flotilla logs` prints it.
    let r = f.run(&["logs", "-f", &file, "web1", "noisy"]).ok();
    assert!(r.stdout().contains("noisy started"), "{}", r.stdout());
    shows_escaped("`flotilla logs`", &r.stdout());

    // The health check's output in `info`'s table.
    let r = f.run(&["info", "-f", &file]).ok();
    shows_escaped("`flotilla info`", &r.stdout());
    no_raw_escape("`flotilla info` (stderr)", &r.stderr());

    // A command's output in the `exec --all` listing.
    let r = f.run(&["exec", "-f", &file, "--all", "--", "printf", "line \\033]0;pwned\\007\\033[2J\\n"]).ok();
    shows_escaped("`flotilla exec --all`", &r.stdout());

    // A release whose check fails with the sequence: the deploy's table and messages, the
    // generations listing and the ledger all show it escaped.
    std::fs::write(&file, deployment(1)).unwrap();
    let r = f.run(&["deploy", "-f", &file]);
    assert_eq!(r.code(), 1, "the failing release deployed\nstdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
    shows_escaped("`flotilla deploy` of a failing release", &format!("{}{}", r.stdout(), r.stderr()));

    let r = f.run(&["generations", "-f", &file, "web1"]).ok();
    assert!(r.stdout().contains("failed"), "{}", r.stdout());
    shows_escaped("`flotilla generations`", &r.stdout());

    let r = f.run(&["log", "-n", "100"]).ok();
    shows_escaped("`flotilla log`", &r.stdout());

    // The ledger itself: the database (and its journal) never hold the raw sequence.
    let dir = f.fl.state().parent().unwrap().to_owned();
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("state.db") {
            stored.extend(std::fs::read(entry.path()).unwrap());
        }
    }
    let stored = String::from_utf8_lossy(&stored);
    assert!(stored.contains("check says"), "the failure is not in the ledger at all");
    assert!(!stored.contains(RAW), "the ledger holds the raw escape sequence");
    assert!(stored.contains(SHOWN), "the ledger lacks the escaped form");
}
