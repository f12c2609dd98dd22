//! `flotilla eval` and `flotilla build` on the example, end to end with real Nix.

mod common;

use std::path::Path;
use std::process::Command;

use common::{repo, Fl};

const EXAMPLE: &str = "examples/webfleet/deployment.nix";

/// Store path hashes depend on the host's busybox; the golden file abstracts them.
fn normalise_store_paths(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("/nix/store/") {
        out.push_str(&rest[..i + 11]);
        rest = &rest[i + 11..];
        if rest.len() > 32 && rest.as_bytes()[32] == b'-' && rest[..32].bytes().all(|c| c.is_ascii_alphanumeric()) {
            out.push_str("<hash>");
            rest = &rest[32..];
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn eval_json_matches_the_golden_file() {
    let fl = Fl::new();
    let run = fl.run(&["eval", "--json", "-f", EXAMPLE]).ok();
    let actual = normalise_store_paths(&serde_json::to_string_pretty(&run.json()).unwrap()) + "\n";
    let golden = repo().join("crates/flotilla/tests/golden/webfleet-eval.json");
    common::check_golden(&golden, &actual, "rerun with FLOTILLA_BLESS=1 to rewrite it");
    // Secrets never appear in output.
    assert!(!run.stdout().contains("example-token-not-a-real-secret"));
}

#[test]
fn build_realises_every_toplevel_with_busybox_and_the_agent_in_its_closure() {
    let fl = Fl::new();
    let run = fl.run(&["build", "--json", "-f", EXAMPLE]).ok();
    let report = run.json();
    let machines = report["machines"].as_array().unwrap();
    assert_eq!(machines.len(), 4);
    for m in machines {
        let name = m["machine"].as_str().unwrap();
        let top = m["toplevel"].as_str().unwrap_or_else(|| panic!("{name} not built: {m}"));
        let top = Path::new(top);
        let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(top.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["system"]["name"], name);
        assert_eq!(
            std::fs::read_to_string(top.join("etc/motd")).unwrap(),
            "Managed by flotilla. Changes here are lost at the next deploy.\n"
        );
        assert!(top.join("sw/bin/httpd").exists(), "busybox applets are on the PATH");
        let closure = Command::new("nix-store").arg("-qR").arg(top).output().unwrap();
        let closure = String::from_utf8_lossy(&closure.stdout);
        assert!(closure.lines().any(|l| l.ends_with("-busybox")), "{closure}");
        assert!(closure.lines().any(|l| l.ends_with("-flotilla-agent")), "{closure}");
        // Key metadata is in the manifest, the secret is not anywhere in the toplevel.
        assert!(!std::fs::read_to_string(top.join("manifest.json")).unwrap().contains("example-token"));
        // A GC root keeps it.
        let root = fl.state().parent().unwrap().join("gcroots/webfleet").join(name);
        assert_eq!(std::fs::read_link(&root).unwrap(), top);
    }
    // The monitor's config used web1's address, recorded as a fact.
    let info = fl.run(&["info", "--json", "-d", "webfleet"]).ok().json();
    let web1 = info["machines"].as_array().unwrap().iter().find(|m| m["machine"] == "web1").unwrap();
    let ip = web1["facts"]["ip"].as_str().unwrap();
    let monitor = machines.iter().find(|m| m["machine"] == "monitor").unwrap();
    let targets = std::fs::read_to_string(Path::new(monitor["toplevel"].as_str().unwrap()).join("etc/monitor/targets")).unwrap();
    assert!(targets.contains(&format!("http://{ip}/")), "{targets}");
}

#[test]
fn building_twice_changes_nothing() {
    let fl = Fl::new();
    // The example with a motd of this run's own, so the first build has to build every
    // toplevel: Nix's report of what it built is then known to show up, and its absence from
    // the second run means something.
    let example = std::fs::read_to_string(repo().join(EXAMPLE)).unwrap();
    let motd = "Changes here are lost at the next deploy.";
    assert!(example.contains(motd), "the example changed shape; update this test");
    let file = fl.file("deployment.nix", &example.replace(motd, &format!("{motd} {}", common::random_hex(8))));
    let built = |run: &common::Run| -> Vec<String> {
        run.stderr().lines().filter_map(|l| l.split_once("nix: building '").map(|(_, drv)| drv.trim_end_matches("'...").to_owned())).collect()
    };
    let first_run = fl.run(&["-v", "build", "--json", "-f", &file]).ok();
    let first = first_run.json();
    let built_first: Vec<String> = built(&first_run).into_iter().filter(|d| d.contains("-flotilla-system-")).collect();
    assert_eq!(built_first.len(), 4, "the first build did not build the four toplevels:\n{}", first_run.stderr());
    for m in ["monitor", "vm1", "web1", "web2"] {
        assert!(built_first.iter().any(|drv| drv.ends_with(&format!("-flotilla-system-{m}.drv"))), "{m} was not built: {built_first:?}");
    }
    let info_first = fl.run(&["info", "--json", "-d", "webfleet"]).ok().json();
    let second_run = fl.run(&["-v", "build", "--json", "-f", &file]).ok();
    let second = second_run.json();
    let info_second = fl.run(&["info", "--json", "-d", "webfleet"]).ok().json();
    // Built once: the second run had Nix build no derivation at all.
    assert_eq!(built(&second_run), Vec::<String>::new(), "{}", second_run.stderr());
    assert!(!second_run.stderr().contains("will be built"), "{}", second_run.stderr());
    // Same toplevels.
    assert_eq!(first["machines"].as_array().map(Vec::len), Some(4), "{first:#}");
    assert_eq!(first["machines"], second["machines"]);
    let machines = |info: &serde_json::Value| info["machines"].as_array().unwrap().clone();
    assert_eq!(machines(&info_first).len(), 4, "{info_first:#}");
    assert_eq!(machines(&info_second).len(), 4, "{info_second:#}");
    for (a, b) in machines(&info_first).iter().zip(machines(&info_second).iter()) {
        // Addresses (facts) and the recorded build stay the same; only its timestamp moves.
        assert_eq!(a["machine"], b["machine"]);
        assert!(a["facts"]["ip"].is_string(), "{a:#}");
        assert_eq!(a["facts"], b["facts"]);
        assert!(a["last_build"]["toplevel"].is_string(), "{a:#}");
        assert_eq!(a["last_build"]["toplevel"], b["last_build"]["toplevel"]);
        assert_eq!(b["last_build"]["status"], "built");
    }
    // The ledger has one build event per machine per run.
    let log = fl.run(&["log", "--json", "-d", "webfleet"]).ok().json();
    assert_eq!(log.as_array().unwrap().iter().filter(|e| e["kind"] == "build").count(), 8);
}

#[test]
fn on_selects_by_tag_and_name_and_refuses_a_typo() {
    let fl = Fl::new();
    let report = fl.run(&["build", "--json", "-f", EXAMPLE, "--on", "@web"]).ok().json();
    let names: Vec<&str> = report["machines"].as_array().unwrap().iter().map(|m| m["machine"].as_str().unwrap()).collect();
    assert_eq!(names, ["vm1", "web1", "web2"]);
    let report = fl.run(&["build", "--json", "-f", EXAMPLE, "--on", "mon*"]).ok().json();
    assert_eq!(report["machines"][0]["machine"], "monitor");
    let typo = fl.run(&["build", "-f", EXAMPLE, "--on", "web3"]);
    assert_eq!(typo.code(), 2);
    assert!(typo.stderr().contains("`web3` matches no machine"), "{}", typo.stderr());
}

#[test]
fn a_failing_build_fails_only_its_machine() {
    let fl = Fl::new();
    let file = fl.file(
        "broken.nix",
        r#"{
          meta.name = "half";
          machines.good = { pkgs, ... }: { packages = [ pkgs.busybox ]; };
          machines.bad = { pkgs, ... }: {
            packages = [ (pkgs.runCommand "doomed" { } "echo the build of doomed broke >&2; exit 3") ];
          };
        }"#,
    );
    let run = fl.run(&["build", "--json", "-f", &file]);
    assert_eq!(run.code(), 1, "{}", run.stderr());
    let report = run.json();
    let by_name = |n: &str| report["machines"].as_array().unwrap().iter().find(|m| m["machine"] == n).unwrap().clone();
    assert!(by_name("good")["toplevel"].is_string());
    let err = by_name("bad")["error"].as_str().unwrap().to_owned();
    assert!(err.contains("doomed"), "{err}");
    let log = fl.run(&["log", "--json", "-d", "half"]).ok().json();
    assert!(log.as_array().unwrap().iter().any(|e| e["machine"] == "bad" && e["status"] == "failed"));
}

#[test]
fn list_info_delete_round_trip() {
    let fl = Fl::new();
    assert_eq!(fl.run(&["list", "--json"]).ok().json(), serde_json::json!([]));
    fl.run(&["build", "-f", EXAMPLE]).ok();
    let list = fl.run(&["list", "--json"]).ok().json();
    assert_eq!(list[0]["name"], "webfleet");
    assert_eq!(list[0]["machines"], 4);
    let table = fl.run(&["info", "-d", "webfleet"]).ok().stdout();
    assert!(table.contains("MACHINE") && table.contains("web2") && table.contains("10.231.0."), "{table}");
    fl.run(&["delete", "-d", "webfleet"]).ok();
    assert_eq!(fl.run(&["list", "--json"]).ok().json(), serde_json::json!([]));
    assert!(!fl.state().parent().unwrap().join("gcroots/webfleet").exists());
    let again = fl.run(&["delete", "-d", "webfleet"]);
    assert_eq!(again.code(), 2);
    assert!(again.stderr().contains("no deployment named `webfleet`"));
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let fl = Fl::new();
    let bash = fl.run(&["completions", "bash"]).ok().stdout();
    assert!(bash.contains("flotilla") && bash.contains("--on"), "{bash}");
    let man = fl.run(&["man"]).ok().stdout();
    assert!(man.contains(".TH flotilla"), "{man}");
}

#[test]
fn docs_options_md_is_the_generated_reference() {
    let fl = Fl::new();
    let generated = fl.run(&["options"]).ok().stdout();
    let doc = repo().join("docs/options.md");
    common::check_golden(&doc, &generated, "regenerate it with `flotilla options > docs/options.md` (or FLOTILLA_BLESS=1)");
    for option in ["services.<name>.healthCheck", "keys.<name>.destDir", "files.<name>.mode", "platform"] {
        assert!(generated.contains(&format!("### `{option}`")), "{option} undocumented");
    }
}
