//! `flotilla-agent uninstall` on a temporary root standing for an ssh host that had a life
//! before flotilla: accounts, /etc files, a store path nobody registered and one its own Nix
//! had. A real agent gets a system the way a deployer sends one (AddPaths, Activate and
//! PutKeys over its socket), so the agent's records are the ones it writes; then uninstall
//! must leave exactly the host's things.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::Machine;
use flotilla_model::{FileSpec, GroupSpec, SystemConfig, SystemOptions, UserSpec};
use flotilla_protocol::{client_handshake, ActivationGoal, Compression, Connection, KeyUpload, PathInfo, Request, Response};
use flotilla_store::StorePath;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\nhost:x:1500:1500:a host user:/home/host:/bin/sh\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\nwheel:x:10:host\nhost:x:1500:\n";
const SHADOW: &str = "root:*:19000:0:99999:7:::\nhost:!:19000:0:99999:7:::\n";
const GSHADOW: &str = "root:*::\nwheel:!:host:host\nhost:!::\n";

/// A store path name with a made-up hash (`n` picks it).
fn store_path(n: usize, name: &str) -> StorePath {
    let alphabet = flotilla_store::NIX_BASE32_CHARS;
    let hash: String = (0..32).map(|i| alphabet[(n * 7 + i * 3) % 32] as char).collect();
    StorePath::from_base_name(&format!("{hash}-{name}")).unwrap()
}

/// Writes the host's own files: what uninstall must leave as it finds them.
fn host_files(m: &Machine) {
    fs::create_dir_all(m.path("/etc")).unwrap();
    for (file, text, mode) in [("/etc/passwd", PASSWD, 0o644), ("/etc/group", GROUP, 0o644), ("/etc/shadow", SHADOW, 0o640), ("/etc/gshadow", GSHADOW, 0o640)] {
        fs::write(m.path(file), text).unwrap();
        fs::set_permissions(m.path(file), fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::write(m.path("/etc/unrelated.conf"), "the host's\n").unwrap();
    fs::write(m.path("/etc/motd"), "the host's motd\n").unwrap();
    let unregistered = m.path(&store_path(90, "unregistered").to_absolute());
    fs::create_dir_all(&unregistered).unwrap();
    fs::write(unregistered.join("file"), "nobody registered this").unwrap();
}

/// A path the host's own Nix had: registered as foreign, as an agent that found it would.
fn foreign_path(m: &Machine) -> PathBuf {
    let p = store_path(91, "foreign");
    let dir = m.path(&p.to_absolute());
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("file"), "the host's Nix made this").unwrap();
    let digest = flotilla_store::hash_path(&dir).unwrap();
    let registration = serde_json::json!({ "narHash": digest.hash.to_string(), "narSize": digest.size, "references": [], "foreign": true });
    fs::create_dir_all(m.path("/nix/var/flotilla/db")).unwrap();
    fs::write(m.path("/nix/var/flotilla/db").join(p.base_name()), registration.to_string()).unwrap();
    dir
}

/// The system: a linked /etc entry beside the host's motd, a copied one, a user in a host
/// group, a group of its own.
fn system() -> SystemConfig {
    let link = FileSpec { text: Some("flotilla's motd\n".into()), source: None, mode: None, user: "root".into(), group: "root".into(), allow_setuid: false };
    let copy = FileSpec { text: Some("setting = 1\n".into()), source: None, mode: Some("0640".into()), user: "svc".into(), group: "svc".into(), allow_setuid: false };
    let svc = UserSpec { uid: None, group: None, extra_groups: vec!["wheel".into()], home: "/var/empty".into(), shell: "/bin/false".into(), description: "a service".into() };
    SystemConfig {
        name: "box".into(),
        system: SystemOptions {
            files: BTreeMap::from([("/etc/banner".into(), link), ("/etc/app/app.conf".into(), copy)]),
            users: BTreeMap::from([("svc".into(), svc)]),
            groups: BTreeMap::from([("extra".into(), GroupSpec { gid: None })]),
            ..SystemOptions::default()
        },
        keys: BTreeMap::new(),
    }
}

fn info(staging: &Path, p: &StorePath, references: Vec<StorePath>) -> PathInfo {
    let digest = flotilla_store::hash_path(&staging.join(p.base_name())).unwrap();
    PathInfo { path: p.clone(), references, nar_hash: digest.hash, nar_size: digest.size }
}

/// Deploys [`system`] to the agent on `m` as a deployer would; returns the agent's and the
/// toplevel's store paths. The agent's store path holds the real agent binary only when
/// `real_agent` (hashing 30 MiB of debug build takes a while).
fn deploy(m: &Machine, real_agent: bool) -> (StorePath, StorePath) {
    let staging = tempfile::tempdir().unwrap();
    let agent = store_path(1, "flotilla-agent");
    let agent_dir = staging.path().join(agent.base_name());
    fs::create_dir_all(agent_dir.join("bin")).unwrap();
    if real_agent {
        fs::copy(common::agent_bin(), agent_dir.join("bin/flotilla-agent")).unwrap();
    } else {
        fs::write(agent_dir.join("bin/flotilla-agent"), "#!/bin/sh\n").unwrap();
    }
    let toplevel = store_path(2, "flotilla-system-box");
    let json = serde_json::to_string(&system()).unwrap();
    flotilla_agent::build_system::build(&json, &format!("{}/bin/flotilla-agent", agent.to_absolute()), None, &staging.path().join(toplevel.base_name())).unwrap();
    let paths = vec![info(staging.path(), &agent, vec![]), info(staging.path(), &toplevel, vec![agent.clone()])];

    let mut conn = Connection::connect_unix(&m.socket()).unwrap();
    client_handshake(&mut conn, "uninstall test").unwrap();
    conn.send(&Request::AddPaths { paths: paths.clone(), compression: Compression::None }).unwrap();
    {
        let mut writer = conn.bulk_writer(Compression::None).unwrap();
        for p in &paths {
            flotilla_store::encode_path(&staging.path().join(p.path.base_name()), &mut writer).unwrap();
        }
        writer.finish().unwrap();
    }
    assert!(matches!(conn.wait_response(|_| {}).unwrap(), Response::PathsAdded { paths: 2, .. }));
    let activate = Request::Activate { toplevel: toplevel.clone(), goal: ActivationGoal::Switch, confirm_within_secs: None, check_timeout_secs: None };
    match conn.call(&activate, |_| {}).unwrap() {
        Response::Activated { generation: 1, .. } => {}
        other => panic!("activation: {other:?}"),
    }
    let key = KeyUpload { name: "token".into(), dest_dir: "/run/keys".into(), user: "svc".into(), group: "svc".into(), mode: 0o400, data: b"secret".to_vec() };
    assert!(matches!(conn.call(&Request::PutKeys { put: vec![key], remove: vec![], switching_to: None }, |_| {}).unwrap(), Response::KeysPut { .. }));
    conn.goodbye().unwrap();
    (agent, toplevel)
}

fn read(m: &Machine, file: &str) -> String {
    fs::read_to_string(m.path(file)).unwrap()
}

#[test]
fn uninstall_removes_exactly_what_the_agent_placed() {
    let m = Machine::new();
    host_files(&m);
    let foreign = foreign_path(&m);
    m.start();
    let (agent, toplevel) = deploy(&m, true);

    // What the agent placed, as it placed it.
    assert!(fs::read_link(m.path("/etc/banner")).unwrap().starts_with("/nix/store/"));
    assert_eq!(read(&m, "/etc/motd"), "the host's motd\n", "a file the system does not declare is not touched");
    assert_eq!(read(&m, "/etc/app/app.conf"), "setting = 1\n");
    assert!(read(&m, "/etc/passwd").contains("\nsvc:x:"));
    assert!(read(&m, "/etc/group").contains("wheel:x:10:host,svc\n"));
    assert!(read(&m, "/etc/group").contains("\nextra:x:"));
    assert_eq!(read(&m, "/run/keys/token"), "secret");
    // An administrator gave the agent's user a password and its group a gshadow line.
    fs::write(m.path("/etc/shadow"), format!("{SHADOW}svc:$6$x:19001:0:99999:7:::\n")).unwrap();
    fs::write(m.path("/etc/gshadow"), format!("{GSHADOW}svc:!::\n").replace("wheel:!:host:host", "wheel:!:host:host,svc")).unwrap();

    // Not while the agent runs: it would put everything back.
    let refused = m.run("uninstall", &["--yes"]).expect(1);
    assert!(refused.stderr().contains("flotilla-agent stop"), "{}", refused.stderr());
    assert!(m.path("/etc/app/app.conf").exists(), "nothing was removed");
    assert!(m.run("uninstall", &[]).expect(2).stderr().contains("--yes"));
    assert_eq!(m.run("stop", &[]).expect(0).stdout(), "stopped\n");

    // Run by the agent binary in the store it removes, as on a host.
    let own_binary = m.path(&agent.to_absolute()).join("bin/flotilla-agent");
    let run = m.run_bin(&own_binary, "uninstall", &["--yes"]).expect(0);
    let out = run.stdout();
    let root = m.root().display().to_string();
    for line in [
        format!("removed key token ({root}/run/keys/token)"),
        format!("removed {root}/run/keys (the empty key directory)"),
        format!("removed {root}/etc/app/app.conf"),
        format!("removed {root}/etc/banner"),
        format!("removed {root}/run/current-system"),
        format!("removed user svc (from {root}/etc/passwd, {root}/etc/shadow)"),
        format!("removed group svc (from {root}/etc/group, {root}/etc/gshadow)"),
        format!("removed group extra (from {root}/etc/group)"),
        format!("removed {root}{}", toplevel.to_absolute()),
        format!("kept {}: it was in the host's Nix store before flotilla", foreign.display()),
        format!("removed {root}/nix/var/flotilla"),
        format!("removed {root}/var/log/flotilla"),
        format!("removed {root}/run/flotilla"),
        format!("removed {root}{}", agent.to_absolute()),
    ] {
        assert!(out.lines().any(|l| l == line), "no line {line:?} in:\n{out}");
    }
    assert!(out.ends_with("uninstalled: 14 removed, 1 kept, 0 failed\n"), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    let last_path = lines.iter().rposition(|l| l.contains(agent.base_name())).unwrap();
    assert_eq!(last_path, lines.len() - 2, "the running binary's store path goes last:\n{out}");

    // The host is as it was.
    for (file, text, mode) in [("/etc/passwd", PASSWD, 0o644), ("/etc/group", GROUP, 0o644), ("/etc/shadow", SHADOW, 0o640), ("/etc/gshadow", GSHADOW, 0o640)] {
        assert_eq!(read(&m, file), text, "{file}");
        assert_eq!(fs::metadata(m.path(file)).unwrap().mode() & 0o7777, mode, "{file} keeps its mode");
    }
    assert_eq!(read(&m, "/etc/motd"), "the host's motd\n");
    assert!(!m.path("/etc/banner").exists());
    assert_eq!(read(&m, "/etc/unrelated.conf"), "the host's\n");
    let mut store: Vec<String> = fs::read_dir(m.path("/nix/store")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    store.sort();
    let mut expected = vec![store_path(90, "unregistered").base_name().to_string(), store_path(91, "foreign").base_name().to_string()];
    expected.sort();
    assert_eq!(store, expected, "only the host's store paths are left");
    assert_eq!(read(&m, &format!("{}/file", store_path(90, "unregistered").to_absolute())), "nobody registered this");
    for gone in ["/nix/var/flotilla", "/var/log/flotilla", "/run/flotilla", "/run/keys", "/run/current-system", "/etc/app/app.conf"] {
        assert!(fs::symlink_metadata(m.path(gone)).is_err(), "{gone} is left");
    }
}

#[test]
fn a_host_without_nix_loses_nix_and_one_with_nix_keeps_its_store() {
    for host_has_nix in [false, true] {
        let m = Machine::new();
        fs::create_dir_all(m.path("/etc")).unwrap();
        fs::write(m.path("/etc/passwd"), PASSWD).unwrap();
        fs::write(m.path("/etc/group"), GROUP).unwrap();
        if host_has_nix {
            fs::create_dir_all(m.path("/nix/var/nix/db")).unwrap();
        }
        m.start();
        deploy(&m, false);
        m.run("stop", &[]).expect(0);
        let out = m.run("uninstall", &["--yes"]).expect(0).stdout();
        if host_has_nix {
            assert!(m.path("/nix/store").is_dir(), "{out}");
            assert!(m.path("/nix/var/nix/db").is_dir(), "/nix/var/nix is never touched");
            assert!(!out.contains("(empty"), "{out}");
        } else {
            assert!(!m.path("/nix").exists(), "{out}");
            assert!(out.contains("(empty, and the host has no Nix of its own)"), "{out}");
        }
        assert_eq!(read(&m, "/etc/passwd"), PASSWD);
    }
}

#[test]
fn what_changed_since_the_agent_placed_it_is_kept() {
    let m = Machine::new();
    host_files(&m);
    m.start();
    let (_, toplevel) = deploy(&m, false);
    m.run("stop", &[]).expect(0);
    // An administrator replaced the link with a file of their own, and the copied file with a
    // link.
    fs::remove_file(m.path("/etc/banner")).unwrap();
    fs::write(m.path("/etc/banner"), "the admin's banner\n").unwrap();
    fs::remove_file(m.path("/etc/app/app.conf")).unwrap();
    std::os::unix::fs::symlink("/etc/unrelated.conf", m.path("/etc/app/app.conf")).unwrap();

    let out = m.run("uninstall", &["--yes"]).expect(0).stdout();
    let root = m.root().display();
    assert!(out.contains(&format!("kept {root}/etc/banner: the agent placed a link into /nix/store there and it is something else now")), "{out}");
    assert!(out.contains(&format!("kept {root}/etc/app/app.conf: the agent placed a regular file there and it is something else now")), "{out}");
    assert_eq!(read(&m, "/etc/banner"), "the admin's banner\n");
    assert!(fs::symlink_metadata(m.path("/etc/app/app.conf")).unwrap().file_type().is_symlink());
    assert!(!m.path(&toplevel.to_absolute()).exists());
}

#[test]
fn a_bin_sh_into_the_agents_store_stops_uninstall_before_it_removes_anything() {
    let m = Machine::new();
    host_files(&m);
    m.start();
    let (agent, _) = deploy(&m, false);
    m.run("stop", &[]).expect(0);
    fs::create_dir_all(m.path("/bin")).unwrap();
    std::os::unix::fs::symlink(format!("{}/bin/flotilla-agent", agent.to_absolute()), m.path("/bin/sh")).unwrap();
    let err = m.run("uninstall", &["--yes"]).expect(1).stderr();
    assert!(err.contains("/bin/sh links to") && err.contains("nothing was removed"), "{err}");
    assert!(m.path("/nix/var/flotilla/db").is_dir());
    assert!(m.path("/etc/app/app.conf").exists());
}
