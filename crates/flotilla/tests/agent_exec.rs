//! `flotilla agent-exec`: a command run in a machine through its agent connection, the way
//! `exec`, `shell` and `logs` reach a machine that has nothing but the agent protocol (a VM).
//! On a real local machine (a namespace container with the real agent as its PID 1, real
//! Nix, in a network namespace of the test's own): its stdout and stderr arrive apart and
//! exact, stdin reaches it, its exit status (or 128 + its signal) is the client's, `--tty`
//! gives it a terminal, a client killed midway leaves nothing running on the machine, and a
//! missing program is one clear error.

mod common;

use std::io::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Fleet;

/// Deploys the one-machine web deployment; returns its file.
fn deployed(f: &Fleet) -> String {
    let file = f.fl.file("exec.nix", &common::web_deployment("agentexec", "hi", ""));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    file
}

/// The pids of the host's processes (the machine's included) whose command line is `argv`.
fn processes(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

#[test]
fn agent_exec_relays_stdio_and_status_through_the_agent() {
    let f = Fleet::new();
    let file = deployed(&f);
    let exec = |args: &[&str]| f.run(&[&["agent-exec", "-f", &file, "web", "--"], args].concat());

    // stdout and stderr apart, byte for byte.
    let r = exec(&["sh", "-c", "printf 'out\\n1'; printf 'err\\n2' >&2"]);
    assert_eq!((r.code(), r.stdout().as_str(), r.stderr().as_str()), (0, "out\n1", "err\n2"));

    // As root, in /root, with the machine's PATH, the program looked up there.
    let r = exec(&["sh", "-c", "id -u; pwd; echo $PATH; test -t 0 || echo no-tty"]).ok();
    assert_eq!(r.stdout(), "0\n/root\n/run/current-system/sw/bin:/bin\nno-tty\n");

    // stdin reaches the command, to its end.
    let mut child = f.cmd().args(["agent-exec", "-f", &file, "web", "--", "cat"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input).map(|()| input));
    let out = child.wait_with_output().unwrap();
    let input = writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == input, "cat gave back {} bytes of {}, or other bytes", out.stdout.len(), input.len());

    // The command's exit status is the client's; a signal is 128 + its number.
    assert_eq!(exec(&["sh", "-c", "exit 7"]).code(), 7);
    assert_eq!(exec(&["sh", "-c", "kill -9 $$"]).code(), 128 + 9);
    assert_eq!(exec(&["sh", "-c", "kill -TERM $$"]).code(), 128 + 15);

    // A program the machine does not have: one line that names it and the fix, status 127.
    let r = exec(&["no-such-program", "x"]);
    assert_eq!(r.code(), 127, "{}", r.stderr());
    assert_eq!(
        r.stderr(),
        "error: machine web: no program \"no-such-program\" in PATH (/run/current-system/sw/bin:/bin); give its full path, or add the package that has it to the machine\n"
    );
    assert_eq!(r.stdout(), "");
    let r = exec(&["/nowhere/prog"]);
    assert_eq!(r.code(), 127, "{}", r.stderr());
    assert!(r.stderr().contains("no program \"/nowhere/prog\" there"), "{}", r.stderr());
}

#[test]
fn agent_exec_tty_gives_the_command_a_terminal() {
    let f = Fleet::new();
    let file = deployed(&f);
    let line = f.cmd_line(&["agent-exec", "-f", &file, "web", "--tty", "--", "sh", "-c", "tty; stty size; echo TERM=$TERM; exit 3"]);
    let out = f
        .fl_env(std::process::Command::new("script"))
        .env("TERM", "vt100")
        .args(["-qec", &format!("stty rows 33 cols 101; {line}"), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("prerequisite missing: script (Debian: bsdutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    // The terminal may echo what `script` sends at the end of its own input (a control
    // character) before the command's first line.
    assert!(text.lines().any(|l| l.trim_end().trim_start_matches(|c: char| c.is_control() || c == '^' || c == '@').starts_with("/dev/pts/")), "no terminal: {text}");
    assert!(text.contains("33 101"), "the terminal's size is this one's: {text}");
    assert!(text.contains("TERM=vt100"), "{text}");
    assert_eq!(out.status.code(), Some(3), "the status passes through: {text}");
}

#[test]
fn a_killed_agent_exec_client_leaves_nothing_running_on_the_machine() {
    let f = Fleet::new();
    let file = deployed(&f);
    for tty in [false, true] {
        let marker = if tty { "7654321" } else { "7654322" };
        let mut args = vec!["agent-exec", "-f", &file, "web"];
        if tty {
            args.push("--tty");
        }
        args.extend(["--", "sleep", marker]);
        let mut client = f.cmd().args(&args).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while processes(&["sleep", marker]).is_empty() {
            assert!(Instant::now() < deadline, "the command never started on the machine (tty {tty})");
            std::thread::sleep(Duration::from_millis(50));
        }
        client.kill().unwrap();
        client.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !processes(&["sleep", marker]).is_empty() {
            assert!(Instant::now() < deadline, "`sleep {marker}` outlived its killed client (tty {tty})");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The agent still serves.
    let r = f.run(&["agent-exec", "-f", &file, "web", "--", "echo", "still"]).ok();
    assert_eq!(r.stdout(), "still\n");
}
