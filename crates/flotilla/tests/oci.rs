//! `flotilla image --format oci|docker-archive` (issue 16, the build half), checked by real
//! clients from Debian: skopeo reads the layout and copies it to a docker archive, umoci
//! unpacks it into a rootfs whose store paths hash to their NAR hashes, runc runs it inside
//! the test's own network namespace (the machine's page answers there, SIGTERM stops its
//! services), two builds are the same digests, and a rebuild after a one-path change writes
//! only that path's layer and the machine layer.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Fl, Fleet};

/// Fails loudly when a client the checks use is missing.
fn require_tools() {
    for (tool, arg) in [("skopeo", "--version"), ("umoci", "--version"), ("runc", "--version"), ("nix-store", "--version")] {
        let ok = Command::new(tool).arg(arg).output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok, "prerequisite missing: {tool}; run scripts/install-deps.sh (skopeo, umoci, runc)");
    }
}

fn deployment(page: &str, motd: &str, extra: &str) -> String {
    format!(
        r#"{{ meta.name = "ocitest"; machines.web = {{ pkgs, ... }}: let
    site = pkgs.runCommand "site" {{}} ''
      mkdir $out
      echo '{page}' > $out/index.html
    '';
  in {{
    packages = [ pkgs.busybox ];
    binsh = "${{pkgs.busybox}}/bin/sh";
    files."/etc/motd".text = "{motd}";
    files."/etc/web.conf" = {{ text = "private"; mode = "0640"; group = "www"; }};
    groups.www = {{}};
    users.www = {{ group = "www"; }};
    image.labels."org.example.team" = "data";
    services.httpd = {{
      command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "80" "-h" "${{site}}" ];
      healthCheck = {{ http = "http://127.0.0.1/"; interval = 1; retries = 3; timeout = 2; }};
    }};
    {extra}
  }}; }}
"#
    )
}

fn tool(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", argv[0]));
    assert!(out.status.success(), "`{}` failed:\n{}{}", argv.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `flotilla image FILE web --format FORMAT -o OUT ARGS --json`: its report.
fn image(fl: &Fl, file: &str, format: &str, out: &Path, args: &[&str]) -> serde_json::Value {
    let out = out.to_string_lossy();
    fl.run(&[&["image", "-f", file, "web", "--format", format, "-o", &out, "--json"], args].concat()).ok().json()
}

#[test]
fn skopeo_and_umoci_accept_the_layout_and_its_store_paths_hash_to_their_nar_hashes() {
    require_tools();
    let fl = Fl::new();
    let file = fl.file("deployment.nix", &deployment(&format!("page {}", common::random_hex(4)), "hi", ""));
    let dir = fl.dir.path().join("layout");
    let report = image(&fl, &file, "oci", &dir, &["--label", "org.example.build=42", "--tag", "v1"]);
    assert_eq!(report["tag"], "v1");

    let inspect: serde_json::Value = serde_json::from_str(&tool(&["skopeo", "inspect", &format!("oci:{}:v1", dir.display())])).unwrap();
    assert_eq!(inspect["Digest"], report["manifestDigest"]);
    let labels = &inspect["Labels"];
    assert_eq!(labels["org.example.team"], "data", "image.labels: {inspect:#}");
    assert_eq!(labels["org.example.build"], "42", "--label: {inspect:#}");
    assert_eq!(labels["org.opencontainers.image.title"], "web");
    assert_eq!(inspect["Created"], "1970-01-01T00:00:01Z");
    let raw: serde_json::Value = serde_json::from_str(&tool(&["skopeo", "inspect", "--raw", &format!("oci:{}:v1", dir.display())])).unwrap();
    assert_eq!(raw["annotations"]["org.opencontainers.image.title"], "web", "{raw:#}");
    assert_eq!(raw["annotations"]["org.opencontainers.image.created"], "1970-01-01T00:00:01Z");
    assert_eq!(raw["layers"].as_array().unwrap().len() as u64, report["layers"].as_u64().unwrap());

    // skopeo copies it to a docker archive; flotilla's own docker archive is read by skopeo too.
    let copied = fl.dir.path().join("copied.tar");
    tool(&["skopeo", "copy", &format!("oci:{}:v1", dir.display()), &format!("docker-archive:{}:web:v1", copied.display())]);
    let archive = fl.dir.path().join("web.tar");
    let arch = image(&fl, &file, "docker-archive", &archive, &[]);
    let from_archive: serde_json::Value = serde_json::from_str(&tool(&["skopeo", "inspect", &format!("docker-archive:{}", archive.display())])).unwrap();
    assert_eq!(from_archive["Layers"].as_array().unwrap().len() as u64, arch["layers"].as_u64().unwrap(), "{from_archive:#}");
    assert_eq!(from_archive["Labels"]["org.example.team"], "data");

    // umoci unpacks a rootfs whose store paths are the very store paths.
    let bundle = fl.dir.path().join("bundle");
    tool(&["umoci", "unpack", "--image", &format!("{}:v1", dir.display()), &bundle.to_string_lossy()]);
    let rootfs = bundle.join("rootfs");
    let toplevel = report["toplevel"].as_str().unwrap();
    let closure = tool(&["nix-store", "--query", "--requisites", toplevel]);
    let mut checked = 0;
    for p in closure.lines() {
        let want = tool(&["nix-store", "--query", "--hash", p]).trim().to_owned();
        let got = flotilla_store::hash_path(&rootfs.join(p.trim_start_matches('/'))).unwrap_or_else(|e| panic!("{p} in the unpacked image: {e}"));
        assert_eq!(got.hash.to_string(), want, "{p} in the image differs from the store");
        checked += 1;
    }
    assert!(checked >= 3, "the closure of {toplevel} has {checked} paths");
    // /etc as activation places it, owners and modes included.
    use std::os::unix::fs::MetadataExt;
    let conf = std::fs::symlink_metadata(rootfs.join("etc/web.conf")).unwrap();
    assert_eq!(conf.mode() & 0o7777, 0o640);
    let www_gid = std::fs::read_to_string(rootfs.join("etc/group")).unwrap().lines().find(|l| l.starts_with("www:")).and_then(|l| l.split(':').nth(2).map(|g| g.parse::<u32>().unwrap())).expect("group www in the image's /etc/group");
    assert_eq!((conf.uid(), conf.gid()), (0, www_gid));
    assert_eq!(std::fs::read_link(rootfs.join("nix/var/flotilla/profiles/system-1-link")).unwrap(), Path::new(toplevel));
    assert!(rootfs.join("nix/var/flotilla/db").join(toplevel.trim_start_matches("/nix/store/")).is_file(), "the agent's registry holds the toplevel");
}

#[test]
fn two_builds_are_the_same_digest_and_a_one_path_change_writes_one_store_layer() {
    require_tools();
    let fl = Fl::new();
    let page = format!("page {}", common::random_hex(4));
    let file = fl.file("deployment.nix", &deployment(&page, "one", ""));
    let (a, b) = (fl.dir.path().join("a"), fl.dir.path().join("b"));
    let first = image(&fl, &file, "oci", &a, &[]);
    let second = image(&fl, &file, "oci", &b, &[]);
    assert_eq!(first["manifestDigest"], second["manifestDigest"], "two builds of one closure differ");
    assert_eq!(first["layersWritten"], first["layers"]);
    let blobs = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d.join("blobs/sha256")).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    assert_eq!(blobs(&a), blobs(&b));
    // The tag is the toplevel's hash.
    assert!(first["toplevel"].as_str().unwrap().contains(first["tag"].as_str().unwrap()));

    // The same build again into the same layout writes no layer.
    let again = image(&fl, &file, "oci", &a, &[]);
    assert_eq!((again["manifestDigest"].clone(), again["layersWritten"].as_u64()), (first["manifestDigest"].clone(), Some(0)));

    // /etc/motd is in the toplevel only: the toplevel's layer and the machine layer change.
    std::fs::write(&file, deployment(&page, "two", "")).unwrap();
    let changed = image(&fl, &file, "oci", &a, &[]);
    assert_ne!(changed["manifestDigest"], first["manifestDigest"]);
    assert_ne!(changed["tag"], first["tag"], "a changed configuration gets a new tag");
    assert_eq!(changed["layers"], first["layers"]);
    assert_eq!(changed["layersWritten"].as_u64(), Some(2), "one store layer and the machine layer: {changed:#}");
}

#[test]
fn the_image_runs_under_runc_in_the_tests_namespace_and_sigterm_stops_its_services() {
    require_tools();
    let fleet = Fleet::new();
    let page = format!("served from the image {}", common::random_hex(4));
    let file = fleet.fl.file("deployment.nix", &deployment(&page, "hi", ""));
    let dir = fleet.fl.dir.path().join("layout");
    let report = image(&fleet.fl, &file, "oci", &dir, &["--tag", "run"]);
    assert_eq!(report["entrypoint"][1], "init");
    let bundle = fleet.fl.dir.path().join("bundle");
    tool(&["umoci", "unpack", "--image", &format!("{}:run", dir.display()), &bundle.to_string_lossy()]);
    // umoci's config gives the container its own network namespace and only three
    // capabilities; podman and docker give their defaults (the agent sets a service's user and
    // groups), and the container shares the test's namespace so the test can reach it.
    let cfg_path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["linux"]["namespaces"].as_array_mut().unwrap().retain(|n| n["type"] != "network");
    cfg["process"]["terminal"] = false.into();
    let caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"];
    for set in ["bounding", "effective", "permitted"] {
        cfg["process"]["capabilities"][set] = serde_json::json!(caps);
    }
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();

    let id = format!("flotilla-oci-{}", common::random_hex(4));
    struct Container(String);
    impl Drop for Container {
        fn drop(&mut self) {
            let _ = Command::new("runc").args(["delete", "--force", &self.0]).output();
        }
    }
    let log = std::fs::File::create(fleet.fl.dir.path().join("container.log")).unwrap();
    let mut run = fleet.in_ns_command(&["runc", "run", "--bundle", &bundle.to_string_lossy(), &id]);
    run.stdout(log.try_clone().unwrap()).stderr(log);
    let mut child = run.spawn().expect("runc runs");
    let _container = Container(id.clone());
    let got = fleet.http_get("http://127.0.0.1/");
    let said = || std::fs::read_to_string(fleet.fl.dir.path().join("container.log")).unwrap_or_default();
    assert_eq!(got.as_deref().map(str::trim), Some(page.as_str()), "the machine's page from the container; it said:\n{}", said());
    let ps = tool(&["runc", "ps", &id]);
    assert!(ps.contains("httpd"), "httpd runs under the agent:\n{ps}");

    tool(&["runc", "kill", &id, "TERM"]);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "the container did not stop within 15 s of SIGTERM; it said:\n{}", said());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "the agent as init exits 0 on SIGTERM: {status}; it said:\n{}", said());
    assert!(said().contains("stopping services"), "{}", said());
    assert!(fleet.host(&["curl", "-sS", "--max-time", "2", "http://127.0.0.1/"]).code() != 0, "nothing answers once the container stopped");
}

#[test]
fn bad_input_is_one_clear_error_and_writes_nothing() {
    let fl = Fl::new();
    let file = fl.file("deployment.nix", &deployment("bad", "hi", "image.maxLayers = 1;"));
    let out: PathBuf = fl.dir.path().join("out");
    let o = out.to_string_lossy().into_owned();
    let r = fl.run(&["image", "-f", &file, "web", "--format", "oci", "-o", &o]);
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("machine web: option `image.maxLayers` is 1") && r.stderr().contains("at least 2"), "{}", r.stderr());
    let r = fl.run(&["image", "-f", &file, "nosuch", "--format", "oci", "-o", &o]);
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("has no machine nosuch"), "{}", r.stderr());
    let r = fl.run(&["image", "-f", &file, "web", "--format", "oci", "-o", &o, "--label", "novalue"]);
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("--label \"novalue\"") && r.stderr().contains("KEY=VALUE"), "{}", r.stderr());
    let r = fl.run(&["image", "-f", &file, "web", "--format", "oci", "-o", &o, "--tag", "-bad"]);
    assert_ne!(r.code(), 0);
    assert!(!out.exists(), "a refused image leaves nothing at -o");
}
