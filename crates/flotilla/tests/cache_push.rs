//! `flotilla cache keygen` and `flotilla cache push` (issue 17), with real Nix as the reader:
//! Debian's Nix 2.8 substitutes from the `file://` caches flotilla writes into a store of its
//! own (a chroot store under the test's directory), accepts them with the right key only,
//! refuses tampered narinfos in its own words, and shares caches with `nix copy` both ways.
//! S3 is tested against moto's server (`moto_server`, a test double: no real S3-compatible
//! server installs from the package registries here, and Nix 2.8 as Debian builds it has no
//! s3:// store), with its signature checking on, and read back by mirroring the bucket into
//! a directory that Nix substitutes from.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{random_hex, Fl};

/// Two paths built by Nix, `b` referring to `a`, unique to this run. Input-addressed: a
/// content-addressed path's narinfo carries its `CA`, and Nix takes such a path unsigned, so
/// only these show whether a signature is checked.
fn closure(tag: &str) -> (String, String) {
    let salt = random_hex(8);
    let expr = format!(
        r#"let p = import {}/nix/demo-pkgs.nix {{}}; a = p.writeText "a-{tag}-{salt}" "hello {salt}"; in [ a (p.writeText "b-{tag}" "see ${{a}}") ]"#,
        common::repo().display()
    );
    let out = nix(&["nix-build", "--no-out-link", "--option", "substituters", "", "-E", &expr]);
    let v: Vec<String> = out.lines().map(str::to_owned).collect();
    assert_eq!(v.len(), 2, "{v:?}");
    (v[0].clone(), v[1].clone())
}

/// Runs a Nix command that must succeed; its stdout.
fn nix(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("{} does not run ({e}); run scripts/install-deps.sh", argv[0]));
    assert!(out.status.success(), "{argv:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `nix-store -r PATH` into a fresh chroot store under `dir`, substituting only from
/// `file://cache` and trusting only `key`: (succeeded, stderr).
fn substitute(dir: &Path, cache: &Path, key: &str, path: &str) -> (bool, String, PathBuf) {
    let store = dir.join(format!("store-{}", random_hex(4)));
    let out = Command::new("nix-store")
        .arg("--store")
        .arg(&store)
        .args(["-r", path, "--option", "substituters"])
        .arg(format!("file://{}", cache.display()))
        .args(["--option", "trusted-public-keys", key, "--option", "require-sigs", "true"])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned(), store)
}

fn keygen(fl: &Fl, name: &str) -> (PathBuf, String) {
    let keys = fl.dir.path().join("keys");
    fl.run(&["cache", "keygen", name, "--out", keys.to_str().unwrap()]).ok();
    let public = std::fs::read_to_string(keys.join(format!("{name}.public"))).unwrap();
    (keys.join(format!("{name}.secret")), public)
}

fn push(fl: &Fl, dest: &Path, key: &Path, paths: &[&str]) -> serde_json::Value {
    let mut args = vec!["cache", "push", dest.to_str().unwrap(), "--key", key.to_str().unwrap(), "--json"];
    args.extend_from_slice(paths);
    fl.run(&args).ok().json()
}

/// Every narinfo in `cache` names a NAR that is there, complete (its FileSize), and
/// references only paths whose narinfos are there: what a reader may rely on at any moment.
fn assert_consistent(cache: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(cache).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "narinfo") {
            continue;
        }
        n += 1;
        let text = std::fs::read_to_string(&p).unwrap();
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{k}: "))).unwrap_or_else(|| panic!("{} has no {k}", p.display())).to_owned();
        let nar = cache.join(field("URL"));
        let size = std::fs::metadata(&nar).unwrap_or_else(|_| panic!("{} names {} which is missing", p.display(), nar.display())).len();
        assert_eq!(size.to_string(), field("FileSize"), "{} is not complete", nar.display());
        for r in field("References").split_whitespace() {
            let hash = &r[..32];
            assert!(cache.join(format!("{hash}.narinfo")).exists(), "{} refers to {r}, whose narinfo is missing", p.display());
        }
    }
    n
}

#[test]
fn a_pushed_closure_substitutes_with_the_right_key_and_is_refused_with_another() {
    let fl = Fl::new();
    let (key, public) = keygen(&fl, "test-cache-1");
    let (_, other) = keygen(&fl, "other-cache-1");
    let (a, b) = closure("right-key");
    let cache = fl.dir.path().join("cache");
    let r = push(&fl, &cache, &key, &[&b]);
    assert_eq!((r["pushed"].as_u64(), r["skipped"].as_u64()), (Some(2), Some(0)), "{r}");
    assert!(cache.join("nix-cache-info").exists());
    assert_eq!(assert_consistent(&cache), 2);

    let (ok, err, store) = substitute(fl.dir.path(), &cache, &public, &b);
    assert!(ok, "Nix did not substitute from the pushed cache: {err}");
    let inside = |p: &str| store.join(p.trim_start_matches('/'));
    assert_eq!(std::fs::read_to_string(inside(&b)).unwrap(), std::fs::read_to_string(&b).unwrap());
    assert_eq!(std::fs::read_to_string(inside(&a)).unwrap(), std::fs::read_to_string(&a).unwrap());

    let (ok, err, store) = substitute(fl.dir.path(), &cache, &other, &b);
    assert!(!ok, "Nix substituted with an untrusted key");
    assert!(err.contains("is not signed by any of the keys in 'trusted-public-keys'"), "{err}");
    assert!(!inside_of(&store, &b).exists());

    // Pushed again: nothing to do.
    let r = push(&fl, &cache, &key, &[&b]);
    assert_eq!((r["pushed"].as_u64(), r["skipped"].as_u64(), r["file_bytes"].as_u64()), (Some(0), Some(2), Some(0)), "{r}");
}

fn inside_of(store: &Path, p: &str) -> PathBuf {
    store.join(p.trim_start_matches('/'))
}

#[test]
fn a_tampered_narinfo_is_refused_by_nix() {
    let fl = Fl::new();
    let (key, public) = keygen(&fl, "tamper-1");
    for (what, edit) in [
        ("NarSize", Box::new(|t: &str| t.lines().map(|l| if let Some(n) = l.strip_prefix("NarSize: ") { format!("NarSize: {}", n.parse::<u64>().unwrap() + 8) } else { l.to_owned() }).collect::<Vec<_>>().join("\n") + "\n") as Box<dyn Fn(&str) -> String>),
        ("Sig", Box::new(|t: &str| {
            // One base64 character of the signature changed.
            let i = t.find("Sig: tamper-1:").unwrap() + "Sig: tamper-1:".len() + 10;
            let c = if &t[i..=i] == "A" { "B" } else { "A" };
            format!("{}{c}{}", &t[..i], &t[i + 1..])
        })),
    ] {
        let (_, b) = closure(&format!("tamper-{what}"));
        let cache = fl.dir.path().join(format!("cache-{what}"));
        push(&fl, &cache, &key, &[&b]);
        let narinfo = cache.join(format!("{}.narinfo", &b[11..43]));
        let text = std::fs::read_to_string(&narinfo).unwrap();
        let changed = edit(&text);
        assert_ne!(text, changed);
        std::fs::write(&narinfo, changed).unwrap();
        let (ok, err, _) = substitute(fl.dir.path(), &cache, &public, &b);
        assert!(!ok, "Nix accepted a narinfo whose {what} was tampered with");
        assert!(err.contains("is not signed by any of the keys in 'trusted-public-keys'"), "{what}: {err}");
    }
}

#[test]
fn a_cache_nix_wrote_gets_only_the_missing_paths_and_nix_reads_the_union() {
    let fl = Fl::new();
    let (ours, ours_public) = keygen(&fl, "ours-1");
    let (a, b) = closure("union");
    let cache = fl.dir.path().join("cache");
    let url = |k: &Path| format!("file://{}?compression=zstd&secret-key={}", cache.display(), k.display());
    // Nix signs `a` with our key: our key file is in Nix's format.
    nix(&["nix", "--extra-experimental-features", "nix-command", "copy", "--option", "substituters", "", "--to", &url(&ours), &a]);
    let r = push(&fl, &cache, &ours, &[&b]);
    assert_eq!((r["pushed"].as_u64(), r["skipped"].as_u64()), (Some(1), Some(1)), "{r}");
    // Nix's signature with our key verifies under our reading of it.
    assert_eq!(r["kept_foreign"], serde_json::json!([]), "{r}");
    let (ok, err, _) = substitute(fl.dir.path(), &cache, &ours_public, &b);
    assert!(ok, "Nix could not read the union of its cache and our push: {err}");

    // A key Nix made signs our push, and a narinfo another key signed is kept, and said so.
    let nixkeys = fl.dir.path().join("nixkeys");
    std::fs::create_dir_all(&nixkeys).unwrap();
    let (sk, pk) = (nixkeys.join("nix-1.secret"), nixkeys.join("nix-1.public"));
    nix(&["nix-store", "--generate-binary-cache-key", "nix-1", sk.to_str().unwrap(), pk.to_str().unwrap()]);
    let (c, d) = closure("nix-key");
    nix(&["nix", "--extra-experimental-features", "nix-command", "copy", "--option", "substituters", "", "--to", &url(&sk), &c]);
    let r = push(&fl, &cache, &ours, &[&d]);
    assert_eq!(r["kept_foreign"], serde_json::json!([c]), "{r}");
    let r = push(&fl, &cache, &sk, &[&d]);
    assert_eq!(r["pushed"].as_u64(), Some(0), "{r}");
    let keys = format!("{} {}", ours_public, std::fs::read_to_string(&pk).unwrap());
    let (ok, err, _) = substitute(fl.dir.path(), &cache, &keys, &d);
    assert!(ok, "{err}");
}

#[test]
fn a_push_killed_midway_leaves_no_narinfo_without_its_nar() {
    let fl = Fl::new();
    let (key, public) = keygen(&fl, "kill-1");
    // Sixteen paths of 24 MiB of random bytes each (zstd cannot shrink them), under one root.
    let stage = fl.dir.path().join("stage");
    let mut parts = Vec::new();
    for i in 0..16 {
        let d = stage.join(format!("blob-{i}-{}", random_hex(4)));
        std::fs::create_dir_all(&d).unwrap();
        let mut data = vec![0u8; 24 << 20];
        use std::io::Read as _;
        std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut data).unwrap();
        std::fs::write(d.join("data"), &data).unwrap();
        parts.push(nix(&["nix-store", "--add", d.to_str().unwrap()]).trim().to_owned());
    }
    let list = parts.iter().map(|p| format!("(builtins.storePath \"{p}\")")).collect::<Vec<_>>().join(" ");
    let root = nix(&["nix-instantiate", "--read-write-mode", "--eval", "--json", "-E", &format!("builtins.toFile \"root-{}\" (toString [ {list} ])", random_hex(4))]);
    let root: String = serde_json::from_str(&root).unwrap();

    let cache = fl.dir.path().join("cache");
    let mut child = fl
        .cmd()
        .args(["cache", "push", cache.to_str().unwrap(), "--key", key.to_str().unwrap(), "--parallel", "2", &root])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once a few paths are out, while the rest are being written.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = std::fs::read_dir(&cache).map(|d| d.filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "narinfo")).count()).unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the push ended before it could be killed midway");
        assert!(Instant::now() < deadline, "the push wrote no narinfo in 2 minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let published = assert_consistent(&cache);
    assert!(published < 17, "the push finished before the kill ({published} narinfos): the test proves nothing; make the closure bigger");
    assert!(!cache.join(format!("{}.narinfo", &root[11..43])).exists(), "the root was published before its references");

    // Pushed again, it completes what is missing and Nix reads all of it.
    let r = push(&fl, &cache, &key, &[&root]);
    assert_eq!(r["pushed"].as_u64(), Some(17 - published as u64), "{r}");
    assert_eq!(assert_consistent(&cache), 17);
    let (ok, err, _) = substitute(fl.dir.path(), &cache, &public, &root);
    assert!(ok, "{err}");
}

#[test]
fn a_deployments_toplevel_is_pushed_and_substitutes() {
    let fl = Fl::new();
    let (key, public) = keygen(&fl, "deploy-1");
    let cache = fl.dir.path().join("cache");
    let r = fl.run(&["cache", "push", cache.to_str().unwrap(), "-f", "examples/webfleet/deployment.nix", "--on", "web1", "--key", key.to_str().unwrap(), "--json"]).ok().json();
    let built = fl.run(&["build", "-f", "examples/webfleet/deployment.nix", "--on", "web1", "--json"]).ok().json();
    let top = built["machines"][0]["toplevel"].as_str().unwrap().to_owned();
    let closure = nix(&["nix-store", "-qR", &top]);
    assert_eq!(r["paths"].as_u64(), Some(closure.lines().count() as u64), "{r}");
    let (ok, err, store) = substitute(fl.dir.path(), &cache, &public, &top);
    assert!(ok, "{err}");
    assert!(inside_of(&store, &top).join("manifest.json").exists());
}

#[test]
fn keygen_refuses_to_overwrite_a_key_or_follow_a_link() {
    let fl = Fl::new();
    let (key, _) = keygen(&fl, "keep-1");
    let before = std::fs::read(&key).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let again = fl.run(&["cache", "keygen", "keep-1", "--out", key.parent().unwrap().to_str().unwrap()]);
    assert_eq!(again.code(), 2);
    assert!(again.stderr().contains("exists already"), "{}", again.stderr());
    assert_eq!(std::fs::read(&key).unwrap(), before, "the key was overwritten");

    // A link planted where the secret would go is not followed.
    let dir = fl.dir.path().join("planted");
    std::fs::create_dir_all(&dir).unwrap();
    let victim = fl.dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("k.secret")).unwrap();
    let run = fl.run(&["cache", "keygen", "k", "--out", dir.to_str().unwrap()]);
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!dir.join("k.public").exists(), "half a key pair was left");
}

#[test]
fn a_bad_key_file_is_one_clear_error_without_key_material() {
    let fl = Fl::new();
    let (_, b) = closure("bad-key");
    let (good, public) = keygen(&fl, "bad-1");
    let cache = fl.dir.path().join("cache");
    let garbage = fl.dir.path().join("garbage.secret");
    std::fs::write(&garbage, "bad-1:c2VjcmV0LW1hdGVyaWFsLW5vdC1hLWtleQ==\n").unwrap();
    let public_file = good.with_extension("public");
    let missing = fl.dir.path().join("missing.secret");
    for (file, says) in [(&garbage, "is not a Nix secret key"), (&public_file, "is a public key"), (&missing, "cannot read the signing key")] {
        let run = fl.run(&["cache", "push", cache.to_str().unwrap(), "--key", file.to_str().unwrap(), &b]);
        assert_eq!(run.code(), 2);
        let err = run.stderr();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says) && err.contains(file.to_str().unwrap()) && err.contains("flotilla cache keygen"), "{err}");
        assert!(!err.contains("c2VjcmV0") && !err.contains(public.split(':').nth(1).unwrap().trim()), "key material printed: {err}");
        assert!(!cache.exists(), "something was written before the key was read");
    }
}

/// moto's server on a free port of 127.0.0.1 with its signature checking on, a user whose
/// access key may write S3, and a bucket `cache`: (server, access key, secret key).
fn moto() -> (common::KillOnDrop, u16, String, String) {
    let port = common::free_port();
    let server = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // The first four requests (the set-up below) go unauthenticated; every later one is
        // checked against the user's key, signature included.
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server is missing (pip install 'moto[server]'); run scripts/install-deps.sh");
    let server = common::KillOnDrop(server);
    let setup = format!(
        r#"
import boto3, json, time
kw = dict(endpoint_url="http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
for _ in range(200):
    try:
        iam = boto3.client("iam", **kw); iam.create_user(UserName="pusher"); break
    except Exception:
        time.sleep(0.1)
k = iam.create_access_key(UserName="pusher")["AccessKey"]
iam.put_user_policy(UserName="pusher", PolicyName="s3", PolicyDocument=json.dumps({{"Version": "2012-10-17", "Statement": [{{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}}]}}))
boto3.client("s3", **kw).create_bucket(Bucket="cache")
print(k["AccessKeyId"], k["SecretAccessKey"])
"#
    );
    let out = nix(&["python3", "-c", &setup]);
    let mut it = out.split_whitespace();
    let (ak, sk) = (it.next().unwrap().to_owned(), it.next().unwrap().to_owned());
    (server, port, ak, sk)
}

#[test]
fn an_s3_push_holds_a_cache_nix_reads() {
    let fl = Fl::new();
    let (key, public) = keygen(&fl, "s3-1");
    let (_, b) = closure("s3");
    let (_server, port, ak, sk) = moto();
    let url = format!("s3://cache/fleet?endpoint=http://127.0.0.1:{port}&region=us-east-1");
    let s3_push = |secret: &str| {
        fl.cmd()
            .env("AWS_ACCESS_KEY_ID", &ak)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("HOME", fl.dir.path())
            .args(["cache", "push", &url, "--key", key.to_str().unwrap(), "--json", &b])
            .output()
            .unwrap()
    };
    // A wrong secret: the server refuses the signature, said in one line without the secret.
    let out = s3_push("not-the-secret-key");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("403") && err.contains("SignatureDoesNotMatch") && !err.contains("not-the-secret-key"), "{err}");

    let out = s3_push(&sk);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["pushed"].as_u64(), Some(2), "{r}");
    let again: serde_json::Value = serde_json::from_slice(&s3_push(&sk).stdout).unwrap();
    assert_eq!((again["pushed"].as_u64(), again["skipped"].as_u64()), (Some(0), Some(2)), "our reader sees what was pushed: {again}");

    // The bucket, mirrored as it is into a directory, is a cache Nix substitutes from.
    let mirror = fl.dir.path().join("mirror");
    let fetch = format!(
        r#"
import boto3, os
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id="{ak}", aws_secret_access_key="{sk}")
# (no Prefix=: moto checks the signature of an encoded `/` in a query wrongly)
for o in s3.list_objects_v2(Bucket="cache")["Contents"]:
    dst = os.path.join("{mirror}", o["Key"][len("fleet/"):])
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    s3.download_file("cache", o["Key"], dst)
    print(o["Key"])
"#,
        mirror = mirror.display()
    );
    let listed = nix(&["python3", "-c", &fetch]);
    assert_eq!(listed.lines().count(), 5, "nix-cache-info, 2 narinfos, 2 NARs: {listed}");
    let (ok, err, _) = substitute(fl.dir.path(), &mirror, &public, &b);
    assert!(ok, "{err}");
}
