//! `flotilla image push` (issue 16, the push half) against a real registry: Debian's
//! `docker-registry` (the reference distribution server) started on 127.0.0.1 by each test
//! with its own storage and a free port, with or without htpasswd logins, and checked with
//! `skopeo` and the registry's own access log. Images are OCI layouts made with `umoci`, and
//! a machine's own image built and pushed in one `flotilla image --push`.
//! All registry traffic goes to 127.0.0.1.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Fails loudly when a tool the test uses is missing.
fn require_tools() {
    for (tool, arg) in [("docker-registry", "--version"), ("skopeo", "--version"), ("umoci", "--version"), ("htpasswd", "-h")] {
        let ran = Command::new(tool).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        assert!(ran, "prerequisite missing: {tool}; run scripts/install-deps.sh (docker-registry, skopeo, umoci, apache2-utils)");
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A registry on 127.0.0.1, killed on drop.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts one; with `login`, it asks for that user and password (htpasswd, a Basic
    /// challenge, no token service).
    fn start(login: Option<(&str, &str)>) -> Registry {
        require_tools();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let auth = match login {
            Some((user, pass)) => {
                let out = Command::new("htpasswd").args(["-Bbn", user, pass]).output().unwrap();
                assert!(out.status.success(), "htpasswd: {}", String::from_utf8_lossy(&out.stderr));
                std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
                format!("auth:\n  htpasswd:\n    realm: flotilla-test\n    path: {}\n", dir.path().join("htpasswd").display())
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("access.log")).unwrap();
        let err = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry").arg("serve").arg(dir.path().join("config.yml")).stdout(log).stderr(err).spawn().unwrap();
        let mut r = Registry { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!("docker-registry exited ({status}): {}", std::fs::read_to_string(r.dir.path().join("registry.log")).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "docker-registry did not listen on 127.0.0.1:{port} within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn reference(&self, repo_tag: &str) -> String {
        format!("docker://{}/{repo_tag}", self.host())
    }

    /// The request lines of the access log (`METHOD /path`), in order.
    fn requests(&self) -> Vec<String> {
        let mut text = String::new();
        std::fs::File::open(self.dir.path().join("access.log")).unwrap().read_to_string(&mut text).unwrap();
        text.lines().filter_map(|l| l.split('"').nth(1)).map(|r| r.rsplit_once(' ').map_or(r, |(m, _)| m).to_owned()).collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An OCI layout at `dir` with tag `v1`, one layer per file inserted.
fn layout(dir: &Path) {
    ok(Command::new("umoci").args(["init", "--layout"]).arg(dir));
    ok(Command::new("umoci").args(["new", "--image"]).arg(format!("{}:v1", dir.display())));
}

/// Adds a layer holding `/name` with `text` to the layout's `v1`.
fn add_layer(dir: &Path, name: &str, text: &str) {
    let src = dir.with_extension(format!("{name}.src"));
    std::fs::write(&src, text).unwrap();
    ok(Command::new("umoci").args(["insert", "--image"]).arg(format!("{}:v1", dir.display())).arg(&src).arg(format!("/{name}")));
}

/// The digest of the layout's one manifest.
fn layout_digest(dir: &Path) -> String {
    let index: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

/// `flotilla` with no auth file of this host's user in reach: HOME is an empty directory.
fn flotilla(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flotilla"));
    c.env("HOME", home).env("FLOTILLA_STATE", home.join("state.db")).env_remove("REGISTRY_AUTH_FILE").env_remove("XDG_RUNTIME_DIR").env_remove("XDG_CONFIG_HOME").env_remove("DOCKER_CONFIG");
    c
}

fn push(home: &Path, from: &Path, reference: &str) -> Output {
    run(flotilla(home).args(["image", "push", "--json", "--from"]).arg(from).arg(reference))
}

fn push_ok(home: &Path, from: &Path, reference: &str) -> Value {
    let out = push(home, from, reference);
    assert!(out.status.success(), "push failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("push --json printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn digests(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|b| b["digest"].as_str().unwrap().to_owned()).collect()
}

fn layers(skopeo_inspect: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(skopeo_inspect).unwrap();
    v["Layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_owned()).collect()
}

#[test]
fn pushed_image_is_read_and_pulled_back_by_skopeo_with_equal_digests() {
    let reg = Registry::start(None);
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    layout(&img);
    add_layer(&img, "hello", "hello from flotilla\n");
    add_layer(&img, "second", "a second layer\n");
    let report = push_ok(work.path(), &img, &reg.reference("team/web:v1"));
    let pushed = reg.requests();
    assert_eq!(report["digest"], layout_digest(&img));
    assert_eq!(digests(&report["uploaded"]).len(), 3, "config and two layers: {report}");

    let inspect = ok(Command::new("skopeo").args(["inspect", "--tls-verify=false", &reg.reference("team/web:v1")]));
    let v: Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["Digest"], report["digest"], "{inspect}");
    let back = work.path().join("back");
    ok(Command::new("skopeo").args(["copy", "--src-tls-verify=false", &reg.reference("team/web:v1")]).arg(format!("oci:{}:v1", back.display())));
    assert_eq!(layout_digest(&back), layout_digest(&img), "the image pulled back is the image pushed");
    let local = ok(Command::new("skopeo").arg("inspect").arg(format!("oci:{}:v1", img.display())));
    assert_eq!(layers(&inspect), layers(&local));
    // The manifest is put last: after every blob's commit.
    let reqs = pushed;
    let manifest_put = reqs.iter().rposition(|r| r.starts_with("PUT /v2/team/web/manifests/")).expect("a manifest PUT");
    let last_blob = reqs.iter().rposition(|r| r.starts_with("PUT /v2/team/web/blobs/uploads/")).expect("blob commits");
    assert!(last_blob < manifest_put && manifest_put == reqs.len() - 1, "{reqs:#?}");
}

#[test]
fn second_push_after_one_new_layer_uploads_only_that_layer_and_its_config() {
    let reg = Registry::start(None);
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    layout(&img);
    add_layer(&img, "base", "the base layer\n");
    add_layer(&img, "app", "the app layer\n");
    let first = push_ok(work.path(), &img, &reg.reference("web:v1"));
    let before = reg.requests().len();

    add_layer(&img, "change", "one more layer\n");
    let local = ok(Command::new("skopeo").arg("inspect").arg(format!("oci:{}:v1", img.display())));
    let new_layer = layers(&local).last().unwrap().clone();
    let second = push_ok(work.path(), &img, &reg.reference("web:v1"));
    let uploaded = digests(&second["uploaded"]);
    let config = uploaded.iter().find(|d| **d != new_layer).cloned();
    assert_eq!(uploaded.len(), 2, "only the new layer and the new config go up: {second}");
    assert!(uploaded.contains(&new_layer), "{second}");
    assert_eq!(second["uploaded"].as_array().unwrap().iter().filter(|b| b["media_type"].as_str().unwrap().contains("layer")).count(), 1, "{second}");
    assert_eq!(digests(&second["present"]), layers(&local)[..2].to_vec(), "the two old layers were in the registry");
    // The registry counts the same: one commit (PUT ?digest=) per uploaded blob.
    let commits: Vec<String> = reg.requests()[before..].iter().filter(|r| r.starts_with("PUT /v2/web/blobs/uploads/")).cloned().collect();
    assert_eq!(commits.len(), 2, "{commits:#?}");
    assert!(commits.iter().any(|c| c.ends_with(&format!("digest={new_layer}"))) && commits.iter().any(|c| c.ends_with(&format!("digest={}", config.clone().unwrap()))), "{commits:#?}");
    assert_ne!(first["digest"], second["digest"]);

    // Nothing changed: nothing goes up, the manifest is put again.
    let third = push_ok(work.path(), &img, &reg.reference("web:v1"));
    assert_eq!(digests(&third["uploaded"]).len(), 0, "{third}");
    let inspect = ok(Command::new("skopeo").args(["inspect", "--tls-verify=false", &reg.reference("web:v1")]));
    assert_eq!(serde_json::from_str::<Value>(&inspect).unwrap()["Digest"], second["digest"]);
}

/// An auth file as `skopeo login` writes it.
fn auth_file(dir: &Path, host: &str, user: &str, pass: &str) -> PathBuf {
    use base64_like::encode;
    let f = dir.join("auth.json");
    std::fs::write(&f, format!(r#"{{"auths":{{"{host}":{{"auth":"{}"}}}}}}"#, encode(format!("{user}:{pass}").as_bytes()))).unwrap();
    f
}

/// Base64 for the auth file, written here so the test does not lean on the code it tests.
mod base64_like {
    pub fn encode(b: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in b.chunks(3) {
            let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= c.len() {
                    s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }
}

#[test]
fn credentials_from_registry_auth_file_push_to_a_registry_with_logins() {
    let pass = "pw-Zq81-secret";
    let reg = Registry::start(Some(("alice", pass)));
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    layout(&img);
    add_layer(&img, "hello", "hello\n");
    let auth = auth_file(work.path(), &reg.host(), "alice", pass);
    let out = run(flotilla(work.path()).env("REGISTRY_AUTH_FILE", &auth).args(["image", "push", "--from"]).arg(&img).arg(reg.reference("private/web:v1")));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.contains(pass) && !stderr.contains(pass), "the password must never be printed:\n{stdout}{stderr}");
    let inspect = ok(Command::new("skopeo").args(["inspect", "--tls-verify=false", "--creds", &format!("alice:{pass}"), &reg.reference("private/web:v1")]));
    assert_eq!(serde_json::from_str::<Value>(&inspect).unwrap()["Digest"], layout_digest(&img));
    // Also from ~/.docker/config.json when REGISTRY_AUTH_FILE is not set.
    std::fs::create_dir_all(work.path().join(".docker")).unwrap();
    std::fs::rename(&auth, work.path().join(".docker/config.json")).unwrap();
    push_ok(work.path(), &img, &reg.reference("private/web:v2"));
}

#[test]
fn wrong_or_missing_login_is_one_clear_error_naming_the_registry_and_never_the_password() {
    let reg = Registry::start(Some(("alice", "the-right-one")));
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    layout(&img);
    add_layer(&img, "hello", "hello\n");
    let wrong = "wr0ng-Pa55-xyz";
    let auth = auth_file(work.path(), &reg.host(), "alice", wrong);
    let out = run(flotilla(work.path()).env("REGISTRY_AUTH_FILE", &auth).args(["-v", "image", "push", "--from"]).arg(&img).arg(reg.reference("web:v1")));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let host = reg.host();
    assert!(errors[0].contains(&format!("registry {host} refused the login of user alice")) && errors[0].contains(&format!("skopeo login {host}")) && errors[0].contains("auth.json"), "{stderr}");
    assert!(!stdout.contains(wrong) && !stderr.contains(wrong), "the password must never be printed:\n{stdout}{stderr}");

    // No auth file at all: says where it looked and how to log in.
    let out = run(flotilla(work.path()).args(["image", "push", "--from"]).arg(&img).arg(reg.reference("web:v1")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("registry {host} asks for a login")) && stderr.contains(".docker/config.json") && stderr.contains(&format!("skopeo login {host}")), "{stderr}");
    // Nothing was pushed.
    assert!(!reg.requests().iter().any(|r| r.starts_with("PUT") || r.starts_with("POST")), "{:#?}", reg.requests());
}

#[test]
fn unreachable_registry_is_one_clear_error() {
    require_tools();
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    layout(&img);
    add_layer(&img, "hello", "hello\n");
    let port = free_port();
    let out = push(work.path(), &img, &format!("docker://127.0.0.1:{port}/web:v1"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty(), "no report for a push that did not happen");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(&format!("registry 127.0.0.1:{port} is unreachable")) && errors[0].contains("that the registry is running"), "{stderr}");
}

#[test]
fn a_push_that_fails_midway_tags_nothing() {
    let reg = Registry::start(None);
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    layout(&img);
    add_layer(&img, "a", "first layer\n");
    add_layer(&img, "b", "second layer\n");
    // The second layer's blob is damaged on disk (same size, other bytes): its upload is
    // refused before its commit, and the manifest must not be put.
    let local = ok(Command::new("skopeo").arg("inspect").arg(format!("oci:{}:v1", img.display())));
    let second = layers(&local)[1].clone();
    let blob = img.join("blobs/sha256").join(second.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let out = push(work.path(), &img, &reg.reference("web:v1"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("blob {second} is not what its manifest says")) && stderr.contains("nothing was tagged"), "{stderr}");
    let reqs = reg.requests();
    assert!(!reqs.iter().any(|r| r.contains("/manifests/")), "no manifest may be put: {reqs:#?}");
    assert!(!reqs.iter().any(|r| r.ends_with(&format!("digest={second}"))), "the damaged blob is never committed: {reqs:#?}");
    let out = run(Command::new("skopeo").args(["inspect", "--tls-verify=false", &reg.reference("web:v1")]));
    assert!(!out.status.success(), "the tag must not exist after a failed push");
}

/// A web server machine whose `/etc/motd` is in its toplevel only.
fn machine_deployment(page: &str, motd: &str) -> String {
    format!(
        r#"{{ meta.name = "ocipush"; machines.web = {{ pkgs, ... }}: let
    site = pkgs.runCommand "site" {{}} ''
      mkdir $out
      echo '{page}' > $out/index.html
    '';
  in {{
    packages = [ pkgs.busybox ];
    files."/etc/motd".text = "{motd}";
    image.labels."org.example.team" = "data";
    services.httpd.command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "80" "-h" "${{site}}" ];
  }}; }}
"#
    )
}

fn layer_blobs(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().filter(|b| b["media_type"].as_str().unwrap().contains(".layer.")).map(|b| b["digest"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn image_push_of_a_machine_then_a_motd_change_uploads_exactly_one_layer() {
    let reg = Registry::start(None);
    let fl = common::Fl::new();
    let page = format!("page {}", common::random_hex(4));
    let file = fl.file("deployment.nix", &machine_deployment(&page, "one"));
    let layout = fl.dir.path().join("layout");
    let layout_s = layout.to_string_lossy().into_owned();
    let image_push = |tag: &str, build: &str| -> Value {
        let reference = reg.reference(&format!("web:{tag}"));
        fl.run(&["image", "-f", &file, "web", "--format", "oci", "-o", &layout_s, "--label", &format!("org.example.build={build}"), "--json", "--push", &reference]).ok().json()
    };

    let first = image_push("one", "1");
    let n = first["image"]["layers"].as_u64().unwrap() as usize;
    assert_eq!(first["push"]["digest"], first["image"]["manifestDigest"], "{first:#}");
    assert_eq!(layer_blobs(&first["push"]["uploaded"]).len(), n, "a fresh registry gets every layer: {first:#}");
    assert_eq!(digests(&first["push"]["uploaded"]).len(), n + 1, "and the config: {first:#}");
    let inspect: Value = serde_json::from_str(&ok(Command::new("skopeo").args(["inspect", "--tls-verify=false", &reg.reference("web:one")]))).unwrap();
    assert_eq!(inspect["Digest"], first["push"]["digest"]);
    assert_eq!(inspect["Labels"]["org.example.team"], "data", "image.labels: {inspect:#}");
    assert_eq!(inspect["Labels"]["org.example.build"], "1", "--label: {inspect:#}");
    assert_eq!(inspect["Labels"]["org.opencontainers.image.title"], "web", "{inspect:#}");
    let before = reg.requests().len();

    // Only the toplevel changes: one layer (the machine layer) and the config go up.
    std::fs::write(&file, machine_deployment(&page, "two")).unwrap();
    let second = image_push("two", "1");
    let new_layers = layers(&ok(Command::new("skopeo").args(["inspect", "--tls-verify=false", &reg.reference("web:two")])));
    let old_layers: Vec<String> = inspect["Layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_owned()).collect();
    assert_eq!(new_layers.len(), old_layers.len());
    assert_eq!(new_layers[..n - 1], old_layers[..n - 1], "every store layer is shared with the first image");
    assert_eq!(layer_blobs(&second["push"]["uploaded"]), vec![new_layers[n - 1].clone()], "exactly the machine layer is uploaded: {second:#}");
    assert_eq!(digests(&second["push"]["uploaded"]).len(), 2, "the machine layer and the config: {second:#}");
    assert_eq!(digests(&second["push"]["present"]), old_layers[..n - 1].to_vec(), "the registry had every store layer: {second:#}");
    // The registry's own log counts the same: one blob commit per uploaded blob.
    let commits: Vec<String> = reg.requests()[before..].iter().filter(|r| r.starts_with("PUT /v2/web/blobs/uploads/")).cloned().collect();
    assert_eq!(commits.len(), 2, "{commits:#?}");
    assert_eq!(commits.iter().filter(|c| c.ends_with(&format!("digest={}", new_layers[n - 1]))).count(), 1, "{commits:#?}");

    // Pulled back, it is the image pushed (skopeo would gzip uncompressed layers into an oci:
    // layout unless told not to).
    let back = fl.dir.path().join("back");
    ok(Command::new("skopeo").args(["copy", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers", &reg.reference("web:two")]).arg(format!("oci:{}:two", back.display())));
    assert_eq!(layout_digest(&back), second["image"]["manifestDigest"].as_str().unwrap());
    assert_eq!(layout_digest(&layout), second["push"]["digest"].as_str().unwrap());
}

#[test]
fn image_push_refuses_a_disk_format_and_a_bad_reference_before_building() {
    let reg = Registry::start(None);
    let fl = common::Fl::new();
    let file = fl.file("deployment.nix", &machine_deployment("refused", "hi"));
    let out = fl.dir.path().join("out");
    let o = out.to_string_lossy().into_owned();
    let r = fl.run(&["image", "-f", &file, "web", "--format", "qcow2", "-o", &o, "--push", &reg.reference("web:v1")]);
    assert_eq!(r.code(), 2, "{}", r.stderr());
    let errors: Vec<String> = r.stderr().lines().filter(|l| l.starts_with("error:")).map(str::to_owned).collect();
    assert_eq!(errors.len(), 1, "{}", r.stderr());
    assert!(errors[0].contains("--push takes an OCI image") && errors[0].contains("--format qcow2"), "{}", r.stderr());

    // A bad reference is refused before the deployment is even read: its file does not exist.
    let missing = fl.dir.path().join("no-such-deployment.nix").to_string_lossy().into_owned();
    for bad in ["docker://127.0.0.1/Web:v1", "oci:/tmp/x", &format!("docker://{}/web:-x", reg.host())] {
        let r = fl.run(&["image", "-f", &missing, "web", "--format", "oci", "-o", &o, "--push", bad]);
        assert_eq!(r.code(), 2, "{}", r.stderr());
        let errors: Vec<String> = r.stderr().lines().filter(|l| l.starts_with("error:")).map(str::to_owned).collect();
        assert_eq!(errors.len(), 1, "{}", r.stderr());
        assert!(errors[0].contains(&format!("image reference `{bad}`")) && errors[0].contains("docker://HOST[:PORT]/REPOSITORY"), "{}", r.stderr());
        assert!(!r.stderr().contains("no-such-deployment"), "the reference is checked first: {}", r.stderr());
        let r = fl.run(&["image", "-f", &file, "web", "--format", "oci", "-o", &o, "--push", bad]);
        assert_eq!(r.code(), 2, "{}", r.stderr());
        assert!(!r.stderr().contains("build"), "nothing is built: {}", r.stderr());
    }
    assert!(!out.exists(), "a refused push leaves nothing at -o");
    assert!(reg.requests().is_empty(), "nothing reached the registry: {:#?}", reg.requests());
}
