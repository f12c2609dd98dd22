//! Every kind of bad input ends in one clear message naming the machine and the option,
//! exit status 2, nothing built and nothing recorded in the state DB.

mod common;

use common::{Fl, Run};

/// Runs `flotilla build` on a deployment file and checks the refusal.
fn refused(body: &str) -> (Fl, Run) {
    refused_in(Fl::new(), body)
}

fn refused_in(fl: Fl, body: &str) -> (Fl, Run) {
    let file = fl.file("deployment.nix", body);
    let run = fl.run(&["build", "-f", &file]);
    assert_eq!(run.code(), 2, "expected exit 2\nstdout:\n{}\nstderr:\n{}", run.stdout(), run.stderr());
    // Nothing recorded, nothing rooted.
    assert_eq!(fl.run(&["list", "--json"]).ok().json(), serde_json::json!([]));
    assert!(!fl.state().parent().unwrap().join("gcroots").exists());
    (fl, run)
}

#[track_caller]
fn says(run: &Run, text: &str) {
    assert!(run.stderr().contains(text), "stderr lacks {text:?}:\n{}", run.stderr());
}

#[test]
fn unknown_option_suggests_the_nearest() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { servics.a.command = [ "/bin/true" ]; }; }"#);
    says(&run, "machine web1: unknown option `servics`; did you mean `services`?");
}

#[test]
fn unknown_nested_option_suggests_the_nearest() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { services.a = { comand = [ "/bin/true" ]; }; }; }"#);
    says(&run, "machine web1: unknown option `services.a.comand`; did you mean `services.a.command`?");
}

#[test]
fn wrong_type() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { tags = "web"; }; }"#);
    says(&run, "machine web1: option `tags` must be a list of strings, not a string (\"web\")");
}

#[test]
fn bad_machine_name() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines."web_1" = { }; }"#);
    says(&run, "machine web_1: `web_1` is not a valid machine name");
}

#[test]
fn service_after_a_missing_service() {
    let (_, run) = refused(
        r#"{ meta.name = "t"; machines.web1 = { services.api = { command = [ "/bin/true" ]; after = [ "dbb" ]; }; services.db.command = [ "/bin/true" ]; }; }"#,
    );
    says(&run, "machine web1: option `services.api.after` names service \"dbb\", which this machine does not have; did you mean \"db\"?");
}

#[test]
fn two_services_on_one_name() {
    let (_, run) = refused(
        r#"{ meta.name = "t"; machines.web1 = { services.web.command = [ "/bin/true" ]; services.Web.command = [ "/bin/true" ]; }; }"#,
    );
    says(&run, "are two services on one name");
}

#[test]
fn a_service_defined_twice_is_nix_s_own_error_with_its_location() {
    let (fl, run) = refused("{\n  meta.name = \"t\";\n  machines.web1 = {\n    services.web.command = [ \"/bin/true\" ];\n    services.web.command = [ \"/bin/false\" ];\n  };\n}\n");
    says(&run, "already defined");
    says(&run, &format!("{}:5", fl.dir.path().join("deployment.nix").display()));
}

#[test]
fn file_outside_etc() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { files."/var/motd".text = "hi"; }; }"#);
    says(&run, "machine web1: option `files.\"/var/motd\"` is outside /etc");
}

#[test]
fn key_text_that_would_land_in_the_store() {
    let fl = Fl::new();
    let secret = format!("flotilla-test-secret-{}.txt", std::process::id());
    fl.file(&secret, "hunter2");
    let (_fl, run) = refused_in(fl, &format!(r#"{{ meta.name = "t"; machines.web1 = {{ keys.db.text = "${{./{secret}}}"; }}; }}"#));
    says(&run, "machine web1: keys.db.text refers to the Nix store");
    says(&run, "keys.db.file");
    // Refused before anything reached the store.
    let leaked: Vec<_> = std::fs::read_dir("/nix/store")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(&secret))
        .collect();
    assert!(leaked.is_empty(), "the secret file was copied into the store: {leaked:?}");
}

#[test]
fn unknown_key_owner() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { keys.db = { text = "s"; user = "postgres"; }; }; }"#);
    says(&run, "machine web1: option `keys.db.user` names user \"postgres\", which this machine does not have");
}

#[test]
fn nix_evaluation_error_shows_the_file_and_line() {
    let (fl, run) = refused("{\n  meta.name = \"t\";\n  machines.web1 = { pkgs, ... }: {\n    packages = [ pkgs.no-such-package ];\n  };\n}\n");
    says(&run, "attribute 'no-such-package' missing");
    says(&run, &format!("{}:4", fl.dir.path().join("deployment.nix").display()));
}

#[test]
fn missing_meta_name() {
    let (_, run) = refused(r#"{ machines.web1 = { }; }"#);
    says(&run, "sets no `meta.name`");
}

#[test]
fn wrong_platform_type_suggests_the_nearest() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { platform.type = "shh"; }; }"#);
    says(&run, "machine web1: option `platform.type` is \"shh\", which is not one of local, qemu, ssh; did you mean \"ssh\"?");
}

#[test]
fn every_problem_is_reported_at_once() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.a = { tags = 1; }; machines.b = { packagez = [ ]; }; }"#);
    says(&run, "machine a: option `tags`");
    says(&run, "machine b: unknown option `packagez`; did you mean `packages`?");
}

/// Issue 13, item 1 (and 12): a key directory every user may write, or one that is not a
/// plain absolute directory, is refused at evaluation, before anything is built.
#[test]
fn a_key_directory_every_user_may_write_is_refused() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { keys.tok = { text = "s"; user = "root"; destDir = "/tmp"; }; }; }"#);
    says(&run, "machine web1: option `keys.tok.destDir` is \"/tmp\", under /tmp, where every user may write");
    assert!(!run.stderr().contains("\"s\""), "no key material in the error");
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { keys.tok = { text = "s"; destDir = "/run/../etc"; }; }; }"#);
    says(&run, "machine web1: option `keys.tok.destDir` is \"/run/../etc\"; it must be an absolute directory without `.` or `..`");
}

/// Issue 13, item 11: a key whose secret has the wrong type is refused by option and kind;
/// the material itself is never printed, whatever its shape.
#[test]
fn key_material_of_the_wrong_type_is_never_printed() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { keys.k.text = 1234567; }; }"#);
    says(&run, "machine web1: option `keys.k.text` must be a string or null, not a number (its value is not shown: it is secret)");
    assert!(!run.stderr().contains("1234567"), "the key's material is in the error:\n{}", run.stderr());
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { keys.k.text = [ "hunter2-in-a-list" ]; }; }"#);
    says(&run, "machine web1: option `keys.k.text` must be a string or null, not a list (its value is not shown: it is secret)");
    assert!(!run.stderr().contains("hunter2"), "the key's material is in the error:\n{}", run.stderr());
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { keys.k = "hunter2-as-the-key"; }; }"#);
    says(&run, "machine web1: option `keys.k` must be an attribute set, not a string (its value is not shown: it is secret)");
    assert!(!run.stderr().contains("hunter2"), "the key's material is in the error:\n{}", run.stderr());
}

/// Issue 13, item 12: a key directory that is `/` or climbs out with `..` is refused by
/// `eval` as by `build`, before any machine is provisioned or built.
#[test]
fn a_key_directory_that_is_root_or_climbs_is_refused_at_evaluation() {
    for dir in ["/", "/run/../etc"] {
        let body = format!(r#"{{ meta.name = "t"; machines.web1 = {{ keys.tok = {{ text = "s"; destDir = "{dir}"; }}; }}; }}"#);
        let expected = format!("machine web1: option `keys.tok.destDir` is \"{dir}\"; it must be an absolute directory without `.` or `..`, and not /, e.g. \"/run/keys\"");
        let fl = Fl::new();
        let file = fl.file("deployment.nix", &body);
        let eval = fl.run(&["eval", "-f", &file]);
        assert_eq!(eval.code(), 2, "eval accepted destDir {dir}\nstdout:\n{}\nstderr:\n{}", eval.stdout(), eval.stderr());
        says(&eval, &expected);
        let (_, run) = refused(&body);
        says(&run, &expected);
    }
}

/// Issue 13, item 13: a `files` path with `..` says so, and suggests a plain path instead
/// of gluing /etc in front of it.
#[test]
fn a_file_path_with_dot_dot_says_so() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { files."/etc/../root/x".text = "hi"; }; }"#);
    says(&run, "machine web1: option `files.\"/etc/../root/x\"` has a `..` component; a file is named by its plain path, without `.`, `..` or `//`: it points to /root/x, outside /etc");
    assert!(!run.stderr().contains("/etc/etc/"), "a nonsense suggestion:\n{}", run.stderr());
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { files."/etc/app/../motd".text = "hi"; }; }"#);
    says(&run, "machine web1: option `files.\"/etc/app/../motd\"` has a `..` component; a file is named by its plain path, without `.`, `..` or `//`: write it as `files.\"/etc/motd\"`");
}

/// Issue 13, item 14: a file's `source` is a store path (a Nix path literal is one), never a
/// host path read as it is.
#[test]
fn a_file_source_outside_the_store_is_refused() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { files."/etc/motd".source = "/etc/shadow"; }; }"#);
    says(&run, "machine web1: option `files.\"/etc/motd\".source` is \"/etc/shadow\", a path outside the Nix store");
    says(&run, "write a Nix path literal (`source = ./shadow;`");
    // A path literal is copied into the store by Nix and builds.
    let fl = Fl::new();
    fl.file("motd", "hello from a path literal\n");
    let file = fl.file("deployment.nix", r#"{ meta.name = "t"; machines.web1 = { files."/etc/motd".source = ./motd; }; }"#);
    let built = fl.run(&["build", "-f", &file, "--json"]).ok().json();
    let toplevel = built["machines"][0]["toplevel"].as_str().unwrap_or_else(|| panic!("no toplevel in {built:#}")).to_owned();
    assert_eq!(std::fs::read_to_string(format!("{toplevel}/etc/motd")).unwrap(), "hello from a path literal\n");
}

/// Issue 13, item 14: a setuid or setgid mode is refused unless `allowSetuid` asks for it.
#[test]
fn a_setuid_file_needs_allow_setuid() {
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { files."/etc/tool".text = "x"; files."/etc/tool".mode = "4755"; }; }"#);
    says(&run, "machine web1: option `files.\"/etc/tool\".mode` is \"4755\", which makes the file setuid; set `files.\"/etc/tool\".allowSetuid = true;` if that is meant, or drop the leading digit (\"0755\")");
    let (_, run) = refused(r#"{ meta.name = "t"; machines.web1 = { files."/etc/tool".text = "x"; files."/etc/tool".mode = "2755"; }; }"#);
    says(&run, "which makes the file setgid");
    let fl = Fl::new();
    let file = fl.file("deployment.nix", r#"{ meta.name = "t"; machines.web1 = { files."/etc/tool" = { text = "x"; mode = "4755"; allowSetuid = true; }; }; }"#);
    fl.run(&["build", "-f", &file]).ok();
}
