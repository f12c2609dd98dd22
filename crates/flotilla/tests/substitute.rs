//! Machines fetch their closures from binary caches (`deploy.substituters`,
//! `deploy.trustedPublicKeys`, `deploy --substitute-on-destination`), and the deployer pushes
//! only what no cache gave, saying why in the machine's row.
//!
//! The cache is `flotilla cache serve` inside the test's network namespace, where the machines
//! reach it on the bridge's address: either serving a directory real Nix wrote (`nix copy
//! --to file://...?compression=zstd&secret-key=...` of the machine's closure, so the agent is
//! shown to read what Nix writes), or serving the deployer host's own store signed on the fly
//! (`--store --key`), so a fleet needs no push step at all.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{row, Fl, Fleet, KillOnDrop};

/// The bridge's address on the default subnet: where machines reach the test's namespace.
const GATEWAY: &str = "10.231.0.1";

/// A key pair made by Nix: (secret key file, public key text).
fn nix_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let (sk, pk) = (dir.join(format!("{name}.secret")), dir.join(format!("{name}.public")));
    let ok = Command::new("nix-store").args(["--generate-binary-cache-key", name]).arg(&sk).arg(&pk).status().expect("prerequisite missing: nix-store (Debian: nix-bin)");
    assert!(ok.success(), "nix-store --generate-binary-cache-key failed");
    (sk, std::fs::read_to_string(pk).unwrap().trim().to_owned())
}

/// Builds `file`'s machine `web` and has Nix write its closure to a cache directory signed by
/// `secret`; returns the directory.
fn nix_cache(f: &Fleet, file: &str, secret: &Path) -> PathBuf {
    let built = f.run(&["build", "-f", file, "--json"]).ok().json();
    let top = built["machines"][0]["toplevel"].as_str().unwrap_or_else(|| panic!("not built: {built:#}")).to_owned();
    let dir = f.fl.dir.path().join(format!("cache-{}", common::random_hex(4)));
    let out = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "--option", "substituters", "", "copy", "--to"])
        .arg(format!("file://{}?compression=zstd&secret-key={}", dir.display(), secret.display()))
        .arg(&top)
        .output()
        .expect("prerequisite missing: nix (Debian: nix-bin)");
    assert!(out.status.success(), "nix copy failed: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// `flotilla cache serve ARGS` on every address of the test's namespace, once it answers.
fn cache_serve(f: &Fleet, args: &[&str]) -> (KillOnDrop, u16) {
    let port = common::free_port();
    let bind = format!("0.0.0.0:{port}");
    let argv = [&[env!("CARGO_BIN_EXE_flotilla"), "cache", "serve"], args, &["--bind", &bind]].concat();
    let server = KillOnDrop(f.fl_env(f.in_ns_command(&argv)).spawn().expect("flotilla runs"));
    assert!(f.http_get(&format!("http://127.0.0.1:{port}/nix-cache-info")).is_some_and(|t| t.contains("StoreDir: /nix/store")), "flotilla cache serve never answered");
    (server, port)
}

/// `flotilla cache serve DIR`: a directory Nix (or `flotilla cache push`) wrote.
fn serve(f: &Fleet, dir: &Path) -> (KillOnDrop, u16) {
    cache_serve(f, &[dir.to_str().unwrap()])
}

/// The deployment `name`: busybox's httpd serving `page`, with the given `deploy` settings.
fn deployment(f: &Fleet, name: &str, page: &str, deploy: &str) -> String {
    f.fl.file(&format!("{name}.nix"), &common::web_deployment(name, page, deploy))
}

fn deploy_settings(port: u16, key: &str, on: bool) -> String {
    format!(r#"deploy = {{ substituters = [ "http://{GATEWAY}:{port}" ]; trustedPublicKeys = [ "{key}" ]; substituteOnDestination = {on}; }};"#)
}

/// The page of the deployment's machine `web`, from the test's namespace.
fn page(f: &Fleet, file: &str) -> Option<String> {
    let ip = f.machine(file, "web")["ip"].as_str().unwrap().to_owned();
    f.http_get(&format!("http://{ip}/"))
}

/// The machine's root directory (a local container's).
fn machine_root(f: &Fleet, deployment: &str) -> PathBuf {
    f.fl.dir.path().join("state/machines").join(deployment).join("web/root")
}

/// Also the interop check: the cache is a directory real Nix wrote and signed.
#[test]
fn a_machine_fetches_its_closure_from_a_cache_and_the_deployer_sends_nothing() {
    let f = Fleet::new();
    let (sk, pk) = nix_key(f.fl.dir.path(), "test-cache-1");
    let plain = deployment(&f, "subst", "from the cache", "");
    let cache = nix_cache(&f, &plain, &sk);
    let (_server, port) = serve(&f, &cache);
    let file = deployment(&f, "subst", "from the cache", &deploy_settings(port, &pk, false));
    let (code, report, out) = f.deploy_json(&["-f", &file, "--substitute-on-destination"]);
    assert_eq!(code, 0, "{report:#}\n{out}");
    let web = row(&report, "web");
    assert_eq!(web["outcome"], "deployed", "{web:#}");
    let copy = &web["copy"];
    assert_eq!(copy["bytes_sent"], 0, "the deployer pushed bytes a cache had:\n{web:#}");
    assert_eq!(copy["paths_sent"], 0, "{web:#}");
    let fetched = copy["substituted"]["paths"].as_u64().unwrap();
    assert!(fetched >= 3, "the toplevel, busybox and the agent at least:\n{web:#}");
    assert_eq!(copy["substituted"]["missed"], serde_json::json!([]), "{web:#}");
    assert!(web["summary"].as_str().unwrap().contains(&format!("fetched {fetched} paths")), "{web:#}");
    assert_eq!(page(&f, &file).as_deref(), Some("from the cache\n"));
    // What the deployer would have sent instead: the same closure, pushed.
    eprintln!("substitution: deployer sent {} bytes, machine fetched {} bytes in {} paths", copy["bytes_sent"], copy["substituted"]["bytes"], fetched);
}

#[test]
fn a_fleet_fetches_from_the_deployers_own_store_served_signed_on_the_fly_with_no_push_step() {
    let f = Fleet::new();
    let (sk, pk) = nix_key(f.fl.dir.path(), "deployer-store-1");
    let kept = f.fl.dir.path().join("serve-cache");
    // No cache directory, no `nix copy`, no `flotilla cache push`: the store the deploy builds
    // into is the cache.
    let (_server, port) = cache_serve(&f, &["--store", "--key", sk.to_str().unwrap(), "--cache-dir", kept.to_str().unwrap()]);
    let file = deployment(&f, "fromstore", "straight from the store", &deploy_settings(port, &pk, true));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{out}");
    let web = row(&report, "web");
    let copy = &web["copy"];
    assert_eq!((&copy["bytes_sent"], &copy["paths_sent"]), (&serde_json::json!(0), &serde_json::json!(0)), "the deployer pushed what its own store serves:\n{web:#}");
    assert!(copy["substituted"]["paths"].as_u64().unwrap() >= 3, "{web:#}");
    assert_eq!(copy["substituted"]["missed"], serde_json::json!([]), "{web:#}");
    assert_eq!(page(&f, &file).as_deref(), Some("straight from the store\n"));
}

/// The agent is static and never calls into glibc's NSS (which a static binary cannot load on
/// a machine without the same glibc): a cache's host name resolves through the machine's own
/// `/etc/hosts`, as health checks' do. A fresh container has none until its first activation
/// places it, so its first deploy is pushed (the row says why) and the next one fetches.
#[test]
fn a_machine_reaches_a_cache_by_a_host_name_from_its_own_etc_hosts() {
    let f = Fleet::new();
    let (sk, pk) = nix_key(f.fl.dir.path(), "named-cache-1");
    let kept = f.fl.dir.path().join("serve-cache");
    let (_server, port) = cache_serve(&f, &["--store", "--key", sk.to_str().unwrap(), "--cache-dir", kept.to_str().unwrap()]);
    let settings = format!(
        r#"files."/etc/hosts".text = "127.0.0.1 localhost\n{GATEWAY} cache.fleet.test\n";
    deploy = {{ substituters = [ "http://cache.fleet.test:{port}" ]; trustedPublicKeys = [ "{pk}" ]; substituteOnDestination = true; }};"#
    );
    let first = deployment(&f, "named", "pushed first", &settings);
    let (code, report, out) = f.deploy_json(&["-f", &first]);
    assert_eq!(code, 0, "{report:#}\n{out}");
    let web = row(&report, "web");
    assert!(web["summary"].as_str().unwrap().contains("cannot resolve cache.fleet.test through the machine's /etc/hosts"), "{web:#}");

    let file = deployment(&f, "named", "found by name", &settings);
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{out}");
    let web = row(&report, "web");
    let copy = &web["copy"];
    assert_eq!(copy["substituted"]["missed"], serde_json::json!([]), "{web:#}");
    assert!(copy["substituted"]["paths"].as_u64().unwrap() >= 2, "the new site and toplevel:\n{web:#}");
    assert_eq!(copy["bytes_sent"], 0, "the machine did not reach the cache by its name:\n{web:#}");
    assert_eq!(page(&f, &file).as_deref(), Some("found by name\n"));
}

/// A name the machine's `/etc/hosts` does not list: the row says so, and the deployer pushes.
#[test]
fn a_cache_host_name_the_machine_cannot_resolve_is_said_in_the_row_and_everything_is_pushed() {
    let f = Fleet::new();
    let (_, pk) = nix_key(f.fl.dir.path(), "named-cache-1");
    let settings = r#"deploy = { substituters = [ "http://nowhere.fleet.test:5000" ]; trustedPublicKeys = [ "PK" ]; substituteOnDestination = true; };"#.replace("PK", &pk);
    let file = deployment(&f, "unnamed", "pushed anyway", &settings);
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{out}");
    let web = row(&report, "web");
    let sub = &web["copy"]["substituted"];
    let pushed = web["copy"]["paths_sent"].as_u64().unwrap();
    assert_eq!(sub["pushed_because"], serde_json::json!({ "cache down": pushed }), "{web:#}");
    let detail = sub["missed"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("cannot resolve nowhere.fleet.test through the machine's /etc/hosts"), "{detail}");
    assert_eq!(page(&f, &file).as_deref(), Some("pushed anyway\n"));
}

#[test]
fn a_path_signed_by_an_untrusted_key_is_refused_and_pushed_by_the_deployer() {
    let f = Fleet::new();
    let (signer, _) = nix_key(f.fl.dir.path(), "stranger-1");
    let (_, trusted) = nix_key(f.fl.dir.path(), "test-cache-1");
    let plain = deployment(&f, "untrusted", "pushed", "");
    let cache = nix_cache(&f, &plain, &signer);
    let (_server, port) = serve(&f, &cache);
    // On through the machine's own option, without the flag.
    let file = deployment(&f, "untrusted", "pushed", &deploy_settings(port, &trusted, true));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{out}");
    let web = row(&report, "web");
    let copy = &web["copy"];
    let sub = &copy["substituted"];
    assert_eq!(sub["paths"], 0, "a path signed by an untrusted key was taken:\n{web:#}");
    let pushed = copy["paths_sent"].as_u64().unwrap();
    assert!(pushed >= 3 && copy["bytes_sent"].as_u64().unwrap() > 0, "{web:#}");
    assert_eq!(sub["pushed_because"], serde_json::json!({ "signed by no trusted key": pushed }), "{web:#}");
    let detail = sub["missed"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("lacks a valid signature") && detail.contains("stranger-1"), "{detail}");
    let summary = web["summary"].as_str().unwrap();
    assert!(summary.contains(&format!("{pushed} pushed instead: {pushed} signed by no trusted key")), "{summary}");
    assert_eq!(page(&f, &file).as_deref(), Some("pushed\n"));
}

#[test]
fn a_cache_that_is_down_leaves_the_push_to_the_deployer_and_the_row_says_so() {
    let f = Fleet::new();
    let (_, pk) = nix_key(f.fl.dir.path(), "test-cache-1");
    // Nothing listens there.
    let file = deployment(&f, "down", "still deployed", &deploy_settings(common::free_port(), &pk, false));
    let start = std::time::Instant::now();
    let (code, report, out) = f.deploy_json(&["-f", &file, "--substitute-on-destination"]);
    assert_eq!(code, 0, "{report:#}\n{out}");
    let web = row(&report, "web");
    let copy = &web["copy"];
    let pushed = copy["paths_sent"].as_u64().unwrap();
    assert!(pushed >= 3, "{web:#}");
    assert_eq!(copy["substituted"]["pushed_because"], serde_json::json!({ "cache down": pushed }), "{web:#}");
    assert!(web["summary"].as_str().unwrap().contains("cache down"), "{web:#}");
    assert_eq!(page(&f, &file).as_deref(), Some("still deployed\n"));
    assert!(start.elapsed() < std::time::Duration::from_secs(240), "a refused connection must not be waited on per path");
}

#[test]
fn a_nar_that_does_not_match_its_signed_hash_is_refused_and_leaves_nothing_in_the_store() {
    let f = Fleet::new();
    let (sk, pk) = nix_key(f.fl.dir.path(), "test-cache-1");
    let plain = deployment(&f, "tampered", "the real page", "");
    let cache = nix_cache(&f, &plain, &sk);
    // The site's NAR is swapped for the NAR of a site whose page differs in its bytes but not
    // in its length (the same NAR size), and its FileHash and FileSize (which no signature
    // covers) are dropped, so only the signed NarHash can tell.
    let fake = nix_cache(&f, &deployment(&f, "tampered", "the fake page", ""), &sk);
    let site_of = |cache: &Path| {
        let narinfo = std::fs::read_dir(cache)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "narinfo") && std::fs::read_to_string(p).unwrap().lines().any(|l| l.starts_with("StorePath:") && l.ends_with("-site")))
            .expect("the site's narinfo");
        let text = std::fs::read_to_string(&narinfo).unwrap();
        (narinfo, text)
    };
    let field = |text: &str, key: &str| text.lines().find_map(|l| l.strip_prefix(key)).unwrap().to_owned();
    let (narinfo, text) = site_of(&cache);
    let (_, fake_text) = site_of(&fake);
    assert_eq!(field(&text, "NarSize: "), field(&fake_text, "NarSize: "), "the fake must be as long as the real one");
    assert_ne!(field(&text, "NarHash: "), field(&fake_text, "NarHash: "));
    std::fs::copy(fake.join(field(&fake_text, "URL: ")), cache.join(field(&text, "URL: "))).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("FileHash:") && !l.starts_with("FileSize:")).collect();
    std::fs::write(&narinfo, kept.join("\n") + "\n").unwrap();
    let site = field(&text, "StorePath: ");

    let (_server, port) = serve(&f, &cache);
    let file = deployment(&f, "tampered", "the real page", &deploy_settings(port, &pk, false));
    let (code, report, out) = f.deploy_json(&["-f", &file, "--substitute-on-destination"]);
    assert_eq!(code, 0, "{report:#}\n{out}");
    let web = row(&report, "web");
    let sub = &web["copy"]["substituted"];
    let missed = sub["missed"].as_array().unwrap();
    let site_miss = missed.iter().find(|m| m["path"] == site.as_str()).unwrap_or_else(|| panic!("the tampered path was taken:\n{web:#}"));
    assert_eq!(site_miss["reason"], "hash_mismatch", "{web:#}");
    assert!(site_miss["detail"].as_str().unwrap().contains("does not match its signed narinfo"), "{web:#}");
    assert!(sub["paths"].as_u64().unwrap() >= 2, "the untampered paths still come from the cache:\n{web:#}");
    assert!(web["summary"].as_str().unwrap().contains("hash mismatch"), "{web:#}");
    // The deployer pushed the real one; nothing half-written is left in the machine's store.
    assert_eq!(page(&f, &file).as_deref(), Some("the real page\n"));
    let store = machine_root(&f, "tampered").join("nix/store");
    let leftovers: Vec<String> = std::fs::read_dir(&store)
        .unwrap_or_else(|e| panic!("{}: {e}", store.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".flotilla-"))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new(), "left in the machine's store");
}

/// `flotilla build` of a machine with `deploy` set to `settings`: it must be refused.
fn refused(settings: &str) -> String {
    let fl = Fl::new();
    let file = fl.file("d.nix", &format!(r#"{{ meta.name = "t"; machines.web1 = {{ {settings} }}; }}"#));
    let run = fl.run(&["build", "-f", &file]);
    assert_eq!(run.code(), 2, "expected exit 2\nstdout:\n{}\nstderr:\n{}", run.stdout(), run.stderr());
    assert_eq!(fl.run(&["list", "--json"]).ok().json(), serde_json::json!([]), "something was recorded");
    run.stderr()
}

#[test]
fn an_https_substituter_or_a_bad_key_is_refused_at_evaluation_naming_machine_option_and_fix() {
    let e = refused(r#"deploy.substituters = [ "https://cache.example/" ]; deploy.trustedPublicKeys = [ "c-1:gQ7eaoE+XVkVbHAKpmzzKkz/hKLRiHg3AVMNFKUW8JM=" ];"#);
    assert!(e.contains("machine web1: option `deploy.substituters` has \"https://cache.example/\", but the agent fetches plain http:// only"), "{e}");
    assert!(e.contains("serve the cache over http://"), "{e}");
    let e = refused(r#"deploy.substituters = [ "http://10.0.0.1:5000" ]; deploy.trustedPublicKeys = [ "c-1:notbase64!" ];"#);
    assert!(e.contains("machine web1: option `deploy.trustedPublicKeys` has \"c-1:notbase64!\", which is not a public key"), "{e}");
    assert!(e.contains("`name:base64`"), "{e}");
    let e = refused(r#"deploy.substituters = [ "http://10.0.0.1:5000" ];"#);
    assert!(e.contains("machine web1: option `deploy.trustedPublicKeys` is empty"), "{e}");
}

#[test]
fn substitute_on_destination_without_any_cache_is_refused() {
    let f = Fleet::new();
    let file = deployment(&f, "nocache", "x", "");
    let r = f.run(&["deploy", "-f", &file, "--substitute-on-destination"]);
    assert_eq!(r.code(), 2, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("--substitute-on-destination: no selected machine names a cache to fetch from (web set no `deploy.substituters`)"), "{}", r.stderr());
    assert_eq!(f.run(&["list", "--json"]).ok().json(), serde_json::json!([]), "something was recorded");
}

/// A test double of a cache that stalls: inside the test's namespace, it answers every request
/// with a status line and then one header byte every 2 seconds, for ever. Each read the agent
/// makes succeeds quickly; only a deadline on the whole answer ends it.
fn stalling_cache(f: &Fleet) -> (KillOnDrop, u16) {
    let port = common::free_port();
    let script = format!(
        r#"
import socket, threading, time
def answer(c):
    try:
        c.recv(65536)
        c.sendall(b"HTTP/1.1 200 OK\r\n")
        while True:
            c.sendall(b"X")
            time.sleep(2)
    except OSError:
        pass
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port}))
s.listen(64)
open("{ready}", "w").close()
while True:
    c, _ = s.accept()
    threading.Thread(target=answer, args=(c,), daemon=True).start()
"#,
        ready = f.fl.dir.path().join("stall-ready").display()
    );
    let server = KillOnDrop(f.in_ns_command(&["python3", "-c", &script]).spawn().expect("prerequisite missing: python3 (the stalling cache double)"));
    let ready = f.fl.dir.path().join("stall-ready");
    for _ in 0..100 {
        if ready.exists() {
            return (server, port);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the stalling cache double (python3) never listened");
}

/// Review of issue 17, finding 3: a cache that stalls must not fail the deploy. The agent
/// keeps telling the deployer it is alive while it waits, gives the cache up at its deadline,
/// and the deployer pushes everything, saying why in the row.
#[test]
fn a_cache_that_stalls_mid_answer_never_fails_the_deploy_the_deployer_pushes_instead() {
    let f = Fleet::new();
    let (_sk, pk) = nix_key(f.fl.dir.path(), "stall-1");
    let (_double, port) = stalling_cache(&f);
    let file = deployment(&f, "stall", "pushed past a stalled cache", &deploy_settings(port, &pk, true));
    let started = std::time::Instant::now();
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "a stalled cache failed the deploy:\n{report:#}\n{out}");
    let web = row(&report, "web");
    assert_eq!(web["outcome"], "deployed", "{web:#}");
    let copy = &web["copy"];
    assert!(copy["paths_sent"].as_u64().unwrap() >= 3, "the deployer did not push the closure:\n{web:#}");
    assert_eq!(copy["substituted"]["paths"], 0, "{web:#}");
    assert!(copy["substituted"]["pushed_because"]["cache down"].as_u64().unwrap() >= 3, "the row does not say the cache was down:\n{web:#}");
    assert!(web["summary"].as_str().unwrap().contains("cache down"), "{web:#}");
    assert_eq!(page(&f, &file).as_deref(), Some("pushed past a stalled cache\n"));
    eprintln!("deploy past a stalled cache took {:?}", started.elapsed());
}
