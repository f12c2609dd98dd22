//! `flotilla image --format oci|docker-archive` (issue 16, the build half), checked by real
//! clients from Debian: skopeo reads the layout and copies it to a docker archive, umoci
//! unpacks it into a rootfs whose store paths hash to their NAR hashes, runc runs it inside
//! the test's own network namespace (the machine's page answers there, SIGTERM stops its
//! services), two builds are the same digests, and a rebuild after a change of the toplevel
//! alone writes only the machine layer (which holds the toplevel).

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
fn two_builds_are_the_same_digest_and_a_toplevel_only_change_writes_only_the_machine_layer() {
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

    // /etc/motd is in the toplevel only, and the toplevel is in the machine layer: exactly one
    // layer changes, and every store layer is the same blob as before.
    let layer_digests = |tag: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&tool(&["skopeo", "inspect", &format!("oci:{}:{tag}", a.display())])).unwrap();
        v["Layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_owned()).collect()
    };
    let old = layer_digests(first["tag"].as_str().unwrap());
    std::fs::write(&file, deployment(&page, "two", "")).unwrap();
    let changed = image(&fl, &file, "oci", &a, &[]);
    assert_ne!(changed["manifestDigest"], first["manifestDigest"]);
    assert_ne!(changed["tag"], first["tag"], "a changed configuration gets a new tag");
    assert_eq!(changed["layers"], first["layers"]);
    assert_eq!(changed["layersWritten"].as_u64(), Some(1), "only the machine layer: {changed:#}");
    let new = layer_digests(changed["tag"].as_str().unwrap());
    assert_eq!(old[..old.len() - 1], new[..new.len() - 1], "the store layers are unchanged");
    assert_ne!(old.last(), new.last());
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
    // The rest on a deployment that evaluates (image.maxLayers is checked with the options).
    let file = fl.file("deployment.nix", &deployment("bad", "hi", ""));
    let r = fl.run(&["image", "-f", &file, "nosuch", "--format", "oci", "-o", &o]);
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("has no machine nosuch"), "{}", r.stderr());
    let r = fl.run(&["image", "-f", &file, "web", "--format", "oci", "-o", &o, "--label", "novalue"]);
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("--label \"novalue\"") && r.stderr().contains("KEY=VALUE"), "{}", r.stderr());
    // `--tag=-bad`: with a space clap would take `-bad` for an option and never ask valid_tag.
    for bad in ["--tag=-bad", "--tag=a/b"] {
        let r = fl.run(&["image", "-f", &file, "web", "--format", "oci", "-o", &o, bad]);
        assert_ne!(r.code(), 0);
        let tag = bad.trim_start_matches("--tag=");
        assert!(r.stderr().contains(&format!("--tag {tag:?}: a tag is up to 128 letters")), "{bad}: {}", r.stderr());
    }
    assert!(!out.exists(), "a refused image leaves nothing at -o");
    // More layers than registries take is refused when the deployment is evaluated.
    let file = fl.file("deployment.nix", &deployment("bad", "hi", "image.maxLayers = 128;"));
    let r = fl.run(&["image", "-f", &file, "web", "--format", "oci", "-o", &o]);
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("machine web: option `image.maxLayers` is 128") && r.stderr().contains("set it between 2 and 127"), "{}", r.stderr());
    assert!(!out.exists(), "a refused image leaves nothing at -o");
}

/// A rootful podman whose storage, run state, events and network config all live under the
/// test's tempdir (nothing in /var/lib/containers or /run/containers), with cgroupfs and file
/// events (this host has cgroup v1 and no systemd). Its containers are removed when dropped,
/// so a failing test leaves none running.
struct Podman {
    dir: PathBuf,
    conf: PathBuf,
    names: std::cell::RefCell<Vec<String>>,
}

impl Podman {
    fn new(dir: &Path) -> Podman {
        let ok = Command::new("podman").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok, "prerequisite missing: podman; run scripts/install-deps.sh");
        let dir = dir.join("podman");
        std::fs::create_dir_all(dir.join("cni")).unwrap();
        let conf = dir.join("containers.conf");
        let d = dir.display();
        // Rootful podman raises a container's open files and processes to its own defaults,
        // which fails where the test runs under lower hard limits without CAP_SYS_RESOURCE (a
        // CI container): give it the test's own, processes no more than pid_max (podman's own
        // processes run with that much at most here; above it runc's setrlimit is refused).
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let hard = |what: &str, words: usize| {
            let l = limits.lines().find(|l| l.starts_with(what)).unwrap_or_else(|| panic!("{what} in /proc/self/limits"));
            l.split_whitespace().nth(words + 1).unwrap().to_owned()
        };
        let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
        let nproc = hard("Max processes", 2).parse::<u64>().map_or(pid_max, |n| n.min(pid_max));
        let nofile = hard("Max open files", 3);
        // No process limit through the pids controller (podman's default is 2048): where
        // /sys/fs/cgroup is a cgroup2 hierarchy with no controllers in it (a Debian 12 root
        // whose kernel holds the controllers in v1 hierarchies), runc cannot write `pids.max`.
        std::fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\npids_limit = 0\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{d}/events.log\"\ntmp_dir = \"{d}/tmp\"\nvolume_path = \"{d}/volumes\"\nstatic_dir = \"{d}/libpod\"\n[network]\nnetwork_config_dir = \"{d}/cni\"\n"
            ),
        )
        .unwrap();
        Podman { dir, conf, names: Default::default() }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &self.conf)
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        c
    }

    /// `podman ARGS`: its output (stdout, stderr) and exit status.
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let o = self.cmd(args).output().expect("podman runs");
        (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "`podman {}` failed:\n{out}{err}", args.join(" "));
        out
    }

    /// Copies the layout's image `tag` into this podman's storage with skopeo (`podman pull
    /// oci:DIR` names the image after the directory, which a tempdir's capitals make invalid),
    /// and returns its name there.
    fn load(&self, layout: &Path, tag: &str) -> String {
        let image = format!("localhost/flotilla-test:{tag}");
        let store = format!("containers-storage:[vfs@{}+{}]{image}", self.dir.join("root").display(), self.dir.join("run").display());
        tool(&["skopeo", "copy", "--quiet", &format!("oci:{}:{tag}", layout.display()), &store]);
        image
    }

    /// A container name, removed with the others on drop.
    fn name(&self) -> String {
        let n = format!("flotilla-oci-{}", common::random_hex(4));
        self.names.borrow_mut().push(n.clone());
        n
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for n in self.names.borrow().iter() {
            let _ = self.cmd(&["rm", "--force", "--time", "0", n]).output();
        }
        // The layers podman unpacked into its vfs storage belong to root: leave the tempdir
        // removable and nothing mounted.
        let _ = self.cmd(&["system", "reset", "--force"]).output();
    }
}

/// Zombies whose parent is `pid` (its children in state Z), from /proc.
fn zombies_of(pid: i32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else { continue };
        let f: Vec<&str> = tail.split_whitespace().collect();
        if f.len() > 1 && f[0] == "Z" && f[1].parse::<i32>().ok() == Some(pid) {
            out.push(format!("{head})"));
        }
    }
    out
}

#[test]
fn the_image_runs_under_rootful_podman_in_the_tests_namespace_reaps_orphans_and_stops_cleanly() {
    require_tools();
    let fleet = Fleet::new();
    let page = format!("served by podman {}", common::random_hex(4));
    // A service that leaves orphans behind, one a second: `sh -c 'sleep 1 &'` exits at once
    // and its sleep is re-parented to the container's PID 1, the agent, which must reap it.
    let forker = r#"services.forker.command = [ "${pkgs.busybox}/bin/sh" "-c" "while true; do ${pkgs.busybox}/bin/sh -c '${pkgs.busybox}/bin/sleep 1 &'; ${pkgs.busybox}/bin/sleep 1; done" ];"#;
    let file = fleet.fl.file("deployment.nix", &deployment(&page, "hi", forker));
    let dir = fleet.fl.dir.path().join("layout");
    image(&fleet.fl, &file, "oci", &dir, &["--tag", "run"]);
    let podman = Podman::new(fleet.fl.dir.path());
    let img = podman.load(&dir, "run");
    let name = podman.name();
    // The container joins the test's own network namespace: no CNI bridge on the host.
    podman.ok(&["run", "--detach", "--name", &name, "--network", &format!("ns:/run/netns/{}", fleet.ns), &img]);
    let logs = || {
        let (_, out, err) = podman.run(&["logs", &name]);
        format!("{out}{err}")
    };
    let got = fleet.http_get("http://127.0.0.1/");
    assert_eq!(got.as_deref().map(str::trim), Some(page.as_str()), "the machine's page from the podman container; it said:\n{}", logs());

    let pid: i32 = podman.ok(&["inspect", "--format", "{{.State.Pid}}", &name]).trim().parse().expect("the container's pid");
    let top = podman.ok(&["top", &name, "pid", "args"]);
    assert!(top.contains("httpd") && top.contains("sleep"), "httpd and the forker run under the agent:\n{top}");
    // Orphans come and go every second; a few seconds in, none is left a zombie.
    std::thread::sleep(Duration::from_secs(4));
    let mut zombies = zombies_of(pid);
    if !zombies.is_empty() {
        // One may be between its exit and the reaper's waitpid: look again.
        std::thread::sleep(Duration::from_millis(500));
        zombies.retain(|z| zombies_of(pid).contains(z));
    }
    assert!(zombies.is_empty(), "the agent as PID 1 left zombies: {zombies:?}");

    let start = Instant::now();
    podman.ok(&["stop", "--time", "10", &name]);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "podman stop took {took:?}: the agent did not stop on SIGTERM within the timeout; it said:\n{}", logs());
    let code = podman.ok(&["inspect", "--format", "{{.State.ExitCode}}", &name]);
    assert_eq!(code.trim(), "0", "the agent exits 0 on SIGTERM; it said:\n{}", logs());
    assert!(logs().contains("stopping services"), "{}", logs());
    assert!(fleet.host(&["curl", "-sS", "--max-time", "2", "http://127.0.0.1/"]).code() != 0, "nothing answers once the container stopped");
}

#[test]
fn image_entrypoint_runs_that_one_program_with_the_machines_etc() {
    require_tools();
    let fl = Fl::new();
    let extra = r#"image.entrypoint = [ "${pkgs.busybox}/bin/sh" "-c" "echo entrypoint ran; ${pkgs.busybox}/bin/cat /etc/motd; exit 7" ];"#;
    let file = fl.file("deployment.nix", &deployment("unused", "motd of the machine", extra));
    let dir = fl.dir.path().join("layout");
    let report = image(&fl, &file, "oci", &dir, &["--tag", "one"]);
    assert_eq!(report["entrypoint"][1], "-c", "{report:#}");
    let podman = Podman::new(fl.dir.path());
    let img = podman.load(&dir, "one");
    let name = podman.name();
    // No network at all: the program needs none. An agent started instead would not exit:
    // podman kills the container after 60 s.
    let (code, out, err) = podman.run(&["run", "--name", &name, "--network", "none", "--timeout", "60", &img]);
    assert_eq!(code, 7, "the entrypoint's exit status is the container's:\n{out}{err}");
    assert!(out.contains("entrypoint ran"), "{out}{err}");
    assert!(out.contains("motd of the machine"), "the machine's /etc/motd is in the image:\n{out}{err}");
    assert!(!out.contains("flotilla-agent"), "the agent did not run:\n{out}{err}");
}
