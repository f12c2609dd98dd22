//! The ssh test hosts themselves (`common::sshhost`), before any flotilla test relies on
//! them: reachable from the Fleet's namespace with the lab's key and strict host keys, sudo
//! as each user's rule says, separate from each other, and gone without a trace when dropped.

mod common;

use std::time::Duration;

use common::sshhost::{HostOpts, SshLab, SudoRule};
use common::{alive, Fleet};

#[test]
fn root_and_sudo_users_log_in_from_the_fleet_namespace() {
    let fleet = Fleet::new();
    let lab = SshLab::new(&fleet.ns);
    let alpha = lab.host(
        "alpha",
        HostOpts::default()
            .user("deploy", SudoRule::Passwordless)
            .user("guard", SudoRule::Password)
            .user("plain", SudoRule::None),
    );
    let beta = lab.host("beta", HostOpts::default());

    for host in [&alpha, &beta] {
        let id = lab.ssh(host, "root", "id -u").ok();
        assert_eq!(id.stdout().trim(), "0");
        assert_eq!(lab.ssh(host, "root", "hostname").ok().stdout().trim(), host.name());
    }
    // The same from a plain `ssh` with the options a test gives the platform.
    let mut argv = vec![
        "ssh".to_owned(),
        "-F".into(),
        "/dev/null".into(),
        "-i".into(),
        lab.identity_file().display().to_string(),
        "-o".into(),
        "BatchMode=yes".into(),
    ];
    argv.extend(lab.ssh_options());
    argv.extend([format!("root@{}", beta.address()), "id -u".into()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    assert_eq!(fleet.host(&argv).ok().stdout().trim(), "0");

    let deploy = lab.ssh(&alpha, "deploy", "id -un; sudo -n id -u").ok();
    assert_eq!(deploy.stdout(), "deploy\n0\n", "stderr: {}", deploy.stderr());

    let guard = lab.ssh(&alpha, "guard", "sudo -n true");
    assert_ne!(guard.code(), 0);
    assert!(guard.stderr().contains("a password is required"), "stderr: {}", guard.stderr());
    // With its password the Password rule does let it in.
    let with_password = lab
        .ssh(&alpha, "guard", &format!("echo {} | sudo -S -p '' id -u", common::sshhost::USER_PASSWORD))
        .ok();
    assert_eq!(with_password.stdout().trim(), "0", "stderr: {}", with_password.stderr());

    let plain = lab.ssh(&alpha, "plain", "sudo -n true");
    assert_ne!(plain.code(), 0, "a user without a sudo rule got root");
    assert_eq!(lab.ssh(&alpha, "plain", "id -un").ok().stdout().trim(), "plain");

    // Password logins are off: a client offering guard's right password, and no key, is
    // refused because the server offers only public keys (not for a network error), and is
    // never even asked for the password. The same client with the key gets in.
    password_login_is_refused_and_a_key_login_works(&fleet, &lab, &alpha);
}

/// Tries `guard@host` with its real password and no key, then `guard@host` with the lab's key.
fn password_login_is_refused_and_a_key_login_works(fleet: &Fleet, lab: &SshLab, host: &common::sshhost::SshHost) {
    let dir = tempfile::tempdir().unwrap();
    let asked = dir.path().join("asked");
    let askpass = dir.path().join("askpass");
    std::fs::write(&askpass, format!("#!/bin/sh\ntouch '{}'\necho '{}'\n", asked.display(), common::sshhost::USER_PASSWORD)).unwrap();
    std::fs::set_permissions(&askpass, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let login = |with_key: bool| {
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", fleet.ns))
            .args(["--", "ssh", "-F", "/dev/null", "-o", "ConnectTimeout=5", "-o", "NumberOfPasswordPrompts=1"])
            .args(lab.ssh_options())
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(std::process::Stdio::null());
        if with_key {
            c.args(["-o", "IdentitiesOnly=yes", "-i"]).arg(lab.identity_file());
        } else {
            c.args(["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password,keyboard-interactive"]);
        }
        c.arg(format!("guard@{}", host.address())).arg("id -un");
        common::Run(c.output().expect("nsenter runs ssh"))
    };
    let before = host.sshd_log().matches("Connection closed by authenticating user guard").count();
    let refused = login(false);
    assert_eq!(refused.code(), 255, "stdout: {}\nstderr: {}", refused.stdout(), refused.stderr());
    // The methods in parentheses are what sshd offers: "password" or "keyboard-interactive"
    // there would mean password logins are on.
    assert!(
        refused.stderr().contains("guard@") && refused.stderr().contains("Permission denied (publickey)."),
        "not refused for the method (a connection error?): {}",
        refused.stderr()
    );
    assert!(!asked.exists(), "ssh asked for a password: the host offered password logins");
    // sshd saw the login attempt and let it go unauthenticated. It writes that line once the
    // client has gone, which may be after ssh returned here: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut log = host.sshd_log();
    while log.matches("Connection closed by authenticating user guard").count() <= before {
        assert!(std::time::Instant::now() < deadline, "sshd log:\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(100));
        log = host.sshd_log();
    }
    assert!(!log.contains("Accepted password") && !log.contains("Accepted keyboard-interactive"), "sshd log:\n{log}");

    let with_key = login(true);
    assert_eq!((with_key.code(), with_key.stdout().trim()), (0, "guard"), "stderr: {}", with_key.stderr());
    assert!(!asked.exists(), "ssh asked for a password although the key works");
}

#[test]
fn hosts_do_not_share_files_and_see_each_other_on_the_bridge() {
    let fleet = Fleet::new();
    let lab = SshLab::new(&fleet.ns);
    let alpha = lab.host("alpha", HostOpts::default());
    let beta = lab.host("beta", HostOpts::default());

    lab.ssh(&alpha, "root", "echo alpha > /root/mine && echo t > /tmp/mine").ok();
    assert_eq!(std::fs::read_to_string(alpha.root().join("root/mine")).unwrap(), "alpha\n");
    assert!(!beta.root().join("root/mine").exists());
    assert_ne!(lab.ssh(&beta, "root", "test -e /root/mine || test -e /tmp/mine").code(), 0);
    // What the test writes into a host's root, the host sees.
    std::fs::write(beta.root().join("root/given"), "x").unwrap();
    lab.ssh(&beta, "root", "test -e /root/given").ok();

    // /usr is the machine's, read-only.
    assert_ne!(lab.ssh(&alpha, "root", "touch /usr/flotilla-test").code(), 0);
    assert!(!std::path::Path::new("/usr/flotilla-test").exists());
    // Each host its own PID namespace: its PID 1 is its init, not the machine's.
    assert_eq!(alpha.run(&["cat", "/proc/1/comm"]).ok().stdout().trim(), "sh");

    // None of a host's mounts shows on the machine.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for host in [&alpha, &beta] {
        assert!(
            !mounts.contains(&host.root().display().to_string()),
            "a host's mount leaked onto the machine:\n{mounts}"
        );
    }

    // The hosts reach each other over the lab's bridge.
    let to_beta = alpha.run(&["ssh-keyscan", "-T", "5", "-t", "ed25519", &beta.address()]).ok();
    assert!(to_beta.stdout().contains("ssh-ed25519"), "{}", to_beta.stderr());
}

#[test]
fn a_replaced_host_key_is_refused() {
    let fleet = Fleet::new();
    let lab = SshLab::new(&fleet.ns);
    let host = lab.host("alpha", HostOpts::default());

    host.restart_sshd();
    lab.ssh(&host, "root", "true").ok();

    lab.replace_host_key(&host);
    let r = lab.ssh(&host, "root", "true");
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("REMOTE HOST IDENTIFICATION HAS CHANGED"), "stderr: {}", r.stderr());
}

#[test]
fn orphans_are_reaped_and_everything_goes_with_the_host() {
    let fleet = Fleet::new();
    let lab = SshLab::new(&fleet.ns);
    let host = lab.host("alpha", HostOpts::default());

    // Orphans that exit are reaped by the host's PID 1, not left as zombies.
    lab.ssh(
        &host,
        "root",
        "for i in 1 2 3; do (sleep 0.1 &) ; done; setsid sh -c 'sleep 0.1 &' </dev/null >/dev/null 2>&1",
    )
    .ok();
    // Once every orphan has exited (a zombie's command line is empty), none is left a zombie.
    let zombies_or_sleepers = || {
        let zombies = host.run(&["sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status || true"]).ok().stdout();
        let sleepers: Vec<_> = host.processes().into_iter().filter(|(_, cmd)| cmd == "sleep 0.1").collect();
        (zombies, sleepers)
    };
    let start = std::time::Instant::now();
    while zombies_or_sleepers() != (String::new(), Vec::new()) {
        assert!(start.elapsed() < Duration::from_secs(30), "zombies inside the host: {:?}", zombies_or_sleepers());
        std::thread::sleep(Duration::from_millis(50));
    }

    // A daemon that double-forked away from its ssh session keeps running...
    lab.ssh(&host, "root", "setsid sleep 1000 </dev/null >/dev/null 2>&1 &").ok();
    let sleeper = wait_for(|| host.processes().into_iter().find(|(_, cmd)| cmd == "sleep 1000").map(|(pid, _)| pid));
    let init = host.init_pid();
    let netns = host.netns().to_owned();
    let root = host.root().to_path_buf();
    assert!(alive(sleeper) && alive(init));

    // ...until the host is dropped.
    drop(host);
    assert!(!alive(sleeper), "the daemon outlived its host");
    assert!(!alive(init), "the host's PID 1 outlived it");
    assert!(!root.exists(), "the host's directory is still there");
    assert!(!std::path::Path::new("/run/netns").join(&netns).exists());
    let port = fleet.host(&["ip", "link", "show", "flsshv2"]);
    assert_ne!(port.code(), 0, "the host's veth is still on the bridge");
}

/// Dropping a host returns only once every process of its PID namespace is gone, even one
/// whose parent is outside (as `SshHost::run` makes them) and does not reap it for a while:
/// the kernel keeps the namespace's PID 1 until then, so "nothing of the host runs" holds
/// when drop returns, not some time later.
#[test]
fn dropping_a_host_waits_until_its_pid_namespace_is_empty() {
    let fleet = Fleet::new();
    let lab = SshLab::new(&fleet.ns);
    let host = lab.host("alpha", HostOpts::default());
    let mut outside = std::process::Command::new("nsenter")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .arg("--target")
        .arg(host.init_pid().to_string())
        .args(["--mount", "--pid", "--root", "--wd", "--", "sleep", "1000"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("nsenter starts");
    let sleeper = wait_for(|| host.processes().into_iter().find(|(_, cmd)| cmd == "sleep 1000").map(|(pid, _)| pid));
    let init = host.init_pid();
    // Stopped, nsenter cannot reap its killed child, which keeps the namespace from ending.
    let signal = |sig: &str| assert!(std::process::Command::new("kill").args([sig, &outside.id().to_string()]).status().unwrap().success());
    signal("-STOP");
    let held = Duration::from_secs(3);
    let started = std::time::Instant::now();
    let resume = std::thread::spawn({
        let pid = outside.id().to_string();
        move || {
            std::thread::sleep(held);
            std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap();
        }
    });
    drop(host);
    let took = started.elapsed();
    let (init_alive, sleeper_alive) = (alive(init), alive(sleeper));
    resume.join().unwrap();
    let _ = outside.wait();
    assert!(!init_alive, "the host's PID 1 ({init}) was still there when drop returned, after {took:?}");
    assert!(!sleeper_alive, "a process of the host outlived it");
    assert!(took >= held, "drop returned after {took:?}, before the last process of the host was reaped");
}

#[test]
fn nothing_is_left_after_the_lab_is_dropped() {
    let fleet = Fleet::new();
    let lab = SshLab::new(&fleet.ns);
    let alpha = lab.host("alpha", HostOpts::default().user("deploy", SudoRule::Passwordless));
    let beta = lab.host("beta", HostOpts::default().nix());
    // What a deployment leaves: read-only directories owned by someone else, store paths.
    lab.ssh(&alpha, "deploy", "mkdir -p ~/ro/sub && touch ~/ro/sub/f && chmod -R a-w ~/ro").ok();
    lab.ssh(&beta, "root", "echo x > /tmp/f && nix-store --add /tmp/f").ok();
    let gone: Vec<_> = [&alpha, &beta]
        .iter()
        .map(|h| (h.netns().to_owned(), h.init_pid(), h.root().parent().unwrap().to_path_buf()))
        .collect();
    let lab_dir = lab.known_hosts().parent().unwrap().to_path_buf();

    // beta's mount namespace began with a copy of alpha's /run/netns mount; deleting alpha's
    // namespace must take that copy too, or beta would keep alpha's network alive. (Seen from
    // beta's `unshare`, in the same mount namespace but outside the chroot.)
    let status = std::fs::read_to_string(format!("/proc/{}/status", beta.init_pid())).unwrap();
    let unshare = status.lines().find_map(|l| l.strip_prefix("PPid:")).unwrap().trim().to_owned();
    let beta_mounts = || std::fs::read_to_string(format!("/proc/{unshare}/mountinfo")).unwrap();
    assert!(beta_mounts().contains(&gone[0].0));
    drop(alpha);
    assert!(
        !beta_mounts().contains(&gone[0].0),
        "beta still holds alpha's network namespace:\n{}",
        beta_mounts()
    );
    drop(beta);
    drop(lab);
    let netns = String::from_utf8(std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
    for (ns, init, dir) in &gone {
        assert!(
            !netns.lines().any(|l| l.split_whitespace().next() == Some(ns.as_str())),
            "{ns} is still in ip netns list"
        );
        assert!(!alive(*init), "a host's PID 1 ({init}) is still running");
        assert!(!dir.exists(), "{} is still there", dir.display());
    }
    assert!(!lab_dir.exists(), "the lab's directory is still there");
    assert_ne!(fleet.host(&["ip", "link", "show", "flsshbr0"]).code(), 0, "the bridge is still there");
    let links = fleet.host(&["ip", "-o", "link"]).ok().stdout();
    assert_eq!(links.lines().count(), 1, "the Fleet's namespace has more than lo:\n{links}");
}

#[test]
fn a_nix_host_has_a_store_of_its_own() {
    let fleet = Fleet::new();
    let lab = SshLab::new(&fleet.ns);
    let host = lab.host("nixy", HostOpts::default().nix());

    let verify = lab.ssh(&host, "root", "nix-store --verify --check-contents");
    assert_eq!(verify.code(), 0, "the host's store is not consistent:\n{}", verify.stderr());
    // A path added inside goes into the host's store, valid in its database, not this machine's.
    let nonce = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
    let added = lab
        .ssh(&host, "root", &format!("echo '{nonce}' > /tmp/own && p=$(nix-store --add /tmp/own) && nix-store --check-validity \"$p\" && echo \"$p\""))
        .ok()
        .stdout();
    let added = added.trim();
    assert!(added.starts_with("/nix/store/") && added.ends_with("-own"), "{added}");
    assert!(host.root().join(added.trim_start_matches('/')).is_file(), "{added} is not in the host's store");
    assert!(!std::path::Path::new(added).exists(), "{added} went into this machine's store");
    assert!(host.root().join("nix/var/nix/db/db.sqlite").exists());
    assert!(host.root().join("nix/store").is_dir());

    // A host without the option has no Nix at all, though this machine has.
    let plain = lab.host("plain", HostOpts::default());
    let none = lab.ssh(&plain, "root", "command -v nix-store nix nix-build; ls /usr/bin | grep -c ^nix; ls -A /nix");
    assert_eq!(none.stdout(), "0\n", "stderr: {}", none.stderr());
}

fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(t) = f() {
            return t;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out")
}
