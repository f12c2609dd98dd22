//! Real OpenSSH hosts on this machine for the `ssh` platform's tests, made and torn down by
//! the tests themselves.
//!
//! An [`SshLab`] is a bridge inside a [`super::Fleet`]'s network namespace plus a client key
//! and a `known_hosts` of its own. Each [`SshHost`] is a network namespace with a veth on
//! that bridge, a root directory of its own (the machine's `/usr` read-only, a private
//! `/etc`, `/var`, `/home`, `/nix`, ...) and a PID namespace whose PID 1 keeps an `sshd`
//! running and reaps orphans. Every mount is made inside the host's own mount namespace, so
//! nothing is visible on this machine and killing PID 1 takes all of it away.
//!
//! It is a test fixture, not a sandbox: root inside a host can leave its chroot. It must
//! never touch the machine's own network namespace, its `/etc` or its sshd, and never skip:
//! a missing prerequisite fails the test with what to install.

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{start_time, Run};

/// The bridge each lab makes inside its Fleet's namespace (one lab per Fleet).
const BRIDGE: &str = "flsshbr0";
/// The lab's /24: the bridge is .1, the hosts .2, .3, ...
const SUBNET: &str = "10.250.0";
/// The password of every user whose sudo rule is [`SudoRule::Password`].
pub const USER_PASSWORD: &str = "flotilla";
/// `USER_PASSWORD` hashed (`openssl passwd -6 -salt flotillasalt flotilla`).
const USER_PASSWORD_HASH: &str = "$6$flotillasalt$.cUM6o0wCEuj3v7tkNclZPa73JKGxg8k2rhvSucPOZuAhnyARwX3tHW9nf3V7DqXTQLBEJpjVGZ6l/X8B8Cn1/";
/// How long a host's sshd may take to accept; generous for a loaded CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a killed host's processes may take to be gone; generous for a loaded CI machine.
const KILL_TIMEOUT: Duration = Duration::from_secs(60);
/// The PATH of every command run inside a host.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static NEXT_HOST: AtomicU32 = AtomicU32::new(0);

/// What `sudo` lets an extra login user do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SudoRule {
    /// No sudoers entry: `sudo` refuses.
    None,
    /// `NOPASSWD: ALL`: `sudo -n` works.
    Passwordless,
    /// `ALL` with a password ([`USER_PASSWORD`]): `sudo -n` fails with "a password is required".
    Password,
}

/// How a host is made: its extra login users and whether it has Nix.
#[derive(Clone, Debug, Default)]
pub struct HostOpts {
    /// Login users besides root, each with its sudo rule.
    pub users: Vec<(String, SudoRule)>,
    /// Whether the host has Nix: its own store database (`nix-store --init`) and the
    /// machine's Nix commands. Without it `/usr/bin/nix*` are hidden and `/nix` is empty.
    pub nix: bool,
}

impl HostOpts {
    /// Adds a login user.
    pub fn user(mut self, name: &str, sudo: SudoRule) -> HostOpts {
        self.users.push((name.to_owned(), sudo));
        self
    }

    /// Gives the host Nix: the machine's Nix commands and a store database of its own.
    pub fn nix(mut self) -> HostOpts {
        self.nix = true;
        self
    }
}

/// A bridge in a Fleet's namespace, a client key and a `known_hosts`; hosts hang off it.
pub struct SshLab {
    inner: Arc<Lab>,
}

/// What a lab's hosts share with it; it goes when the lab and its last host are dropped.
struct Lab {
    fleet_ns: String,
    dir: tempfile::TempDir,
    /// The next host's last address byte.
    next: Mutex<u8>,
}

impl SshLab {
    /// Makes the bridge (10.250.0.1/24) inside `fleet_ns` and a client key pair.
    pub fn new(fleet_ns: &str) -> SshLab {
        require_ssh_prerequisites(false);
        let dir = tempfile::Builder::new().prefix("flsshlab-").tempdir().unwrap();
        let key = dir.path().join("id_ed25519");
        checked(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "flotilla-test-client", "-f"])
                .arg(&key),
            "ssh-keygen for the lab's client key",
        );
        fs::write(dir.path().join("known_hosts"), "").unwrap();
        let lab = SshLab {
            inner: Arc::new(Lab {
                fleet_ns: fleet_ns.to_owned(),
                dir,
                next: Mutex::new(2),
            }),
        };
        in_netns(fleet_ns, &["ip", "link", "add", BRIDGE, "type", "bridge"]);
        in_netns(fleet_ns, &["ip", "addr", "add", &format!("{SUBNET}.1/24"), "dev", BRIDGE]);
        in_netns(fleet_ns, &["ip", "link", "set", BRIDGE, "up"]);
        lab
    }

    /// Starts a host and returns once its sshd accepts the lab's key.
    pub fn host(&self, name: &str, opts: HostOpts) -> SshHost {
        SshHost::start(&self.inner, name, opts)
    }

    /// The client's private key.
    pub fn identity_file(&self) -> PathBuf {
        self.inner.identity_file()
    }

    /// The `known_hosts` that lists every host's key.
    pub fn known_hosts(&self) -> PathBuf {
        self.inner.known_hosts()
    }

    /// The ssh arguments that make a client check host keys against this lab's `known_hosts`
    /// only and strictly: the platform's `sshOptions` in a test.
    pub fn ssh_options(&self) -> Vec<String> {
        self.inner.ssh_options()
    }

    /// The whole `ssh` command line for `user@host` with the lab's key, without the remote
    /// command; run it inside the Fleet's namespace.
    pub fn ssh_argv(&self, host: &SshHost, user: &str) -> Vec<String> {
        self.inner.ssh_argv(&host.address(), user)
    }

    /// Runs `command` (one shell line) on `host` as `user` over ssh, from inside the Fleet's
    /// namespace.
    pub fn ssh(&self, host: &SshHost, user: &str, command: &str) -> Run {
        self.inner.ssh(&host.address(), user, command)
    }

    /// Gives `host` a new host key and restarts its sshd, leaving `known_hosts` with the old
    /// key: the next strict connection fails as if a machine had been replaced.
    pub fn replace_host_key(&self, host: &SshHost) {
        let key = host.root.join("etc/ssh/ssh_host_ed25519_key");
        let _ = fs::remove_file(&key);
        let _ = fs::remove_file(key.with_extension("pub"));
        let new = host_key(&host.root);
        host.stop_sshd();
        // The strict client would refuse the new key, so wait until sshd offers it.
        let start = Instant::now();
        loop {
            let scan = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.inner.fleet_ns))
                .args(["--", "ssh-keyscan", "-T", "2", "-t", "ed25519", &host.address()])
                .output()
                .expect("ssh-keyscan runs");
            if String::from_utf8_lossy(&scan.stdout).contains(&new) {
                return;
            }
            assert!(
                start.elapsed() < START_TIMEOUT,
                "{}'s sshd did not come back with its new key\nsshd log:\n{}",
                host.name,
                host.sshd_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Lab {
    fn identity_file(&self) -> PathBuf {
        self.dir.path().join("id_ed25519")
    }

    fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    fn ssh_options(&self) -> Vec<String> {
        [
            "-o",
            &format!("UserKnownHostsFile={}", self.known_hosts().display()),
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn ssh_argv(&self, address: &str, user: &str) -> Vec<String> {
        // -F /dev/null: whatever ~/.ssh/config the machine's root has must not change the test.
        let mut argv: Vec<String> = ["ssh", "-F", "/dev/null", "-i"].map(str::to_owned).to_vec();
        argv.push(self.identity_file().display().to_string());
        argv.extend(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"].map(str::to_owned));
        argv.extend(self.ssh_options());
        argv.push(format!("{user}@{address}"));
        argv
    }

    fn ssh(&self, address: &str, user: &str, command: &str) -> Run {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.fleet_ns))
            .arg("--")
            .args(self.ssh_argv(address, user))
            .arg(command)
            .stdin(Stdio::null());
        Run(c.output().expect("nsenter runs ssh"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The Fleet may be gone already, and its namespace with the bridge.
        if Path::new("/run/netns").join(&self.fleet_ns).exists() {
            let _ = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.fleet_ns))
                .args(["--", "ip", "link", "del", BRIDGE])
                .output();
        }
    }
}

/// One running host: its namespaces, its root directory and its sshd.
pub struct SshHost {
    lab: Arc<Lab>,
    name: String,
    /// The host's network namespace, `flssh-<pid>-<n>`.
    netns: String,
    /// Last byte of the host's address.
    index: u8,
    dir: tempfile::TempDir,
    root: PathBuf,
    /// `unshare`, the parent of the host's PID 1.
    unshare: Option<Child>,
    /// The host's PID 1 as this machine numbers it, with its start time.
    init: (u32, u64),
    /// The host's PID namespace (`pid:[inode]`), to see that none of its processes is left.
    pid_ns: Option<PathBuf>,
}

impl SshHost {
    fn start(lab: &Arc<Lab>, name: &str, opts: HostOpts) -> SshHost {
        require_ssh_prerequisites(opts.nix);
        // It becomes the hostname and goes into /etc/hosts and a shell line.
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "a host's name is letters, digits and '-': {name:?}"
        );
        let began = Instant::now();
        let index = {
            let mut next = lab.next.lock().unwrap();
            assert!(*next < 255, "a lab has room for 253 hosts");
            *next += 1;
            *next - 1
        };
        let netns = format!("flssh-{}-{}", std::process::id(), NEXT_HOST.fetch_add(1, Ordering::Relaxed));
        let dir = tempfile::Builder::new().prefix("flsshhost-").tempdir().unwrap();
        let root = dir.path().join("root");
        let mut host = SshHost {
            lab: Arc::clone(lab),
            name: name.to_owned(),
            netns,
            index,
            dir,
            root,
            unshare: None,
            init: (0, 0),
            pid_ns: None,
        };

        let host_pub = host.make_root(&opts);
        host.make_usr(&opts);
        // One append of one line: hosts may start from several threads at once.
        append(&lab.known_hosts(), &format!("{} {}\n", host.address(), host_pub));
        host.make_network();
        host.spawn_init();
        host.wait_for_sshd();
        if opts.nix {
            // Debian's nix-store, seen through the /usr overlay, makes /nix/var/nix/db and
            // /nix/store under the host's own empty /nix. Only once sshd answers: before, PID 1
            // may not have chrooted yet, and `run` would reach this machine's own /nix.
            let init = host.run(&["nix-store", "--init"]);
            assert_eq!(init.code(), 0, "nix-store --init inside {name} failed:\n{}", init.stderr());
            assert!(host.root().join("nix/var/nix/db").is_dir(), "nix-store --init made no database under {}", host.root().display());
        }
        eprintln!("sshhost: {name} at {} up in {:.2?}", host.address(), began.elapsed());
        host
    }

    /// The host's name (also its hostname).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the lab's bridge, e.g. `10.250.0.2`.
    pub fn address(&self) -> String {
        format!("{SUBNET}.{}", self.index)
    }

    /// The host's `/` as a directory on this machine, to look at what a deployment left.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host's network namespace's name.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The host's PID 1 as this machine numbers it.
    pub fn init_pid(&self) -> u32 {
        self.init.0
    }

    /// The processes of the host's PID namespace as this machine numbers them, each with its
    /// command line.
    pub fn processes(&self) -> Vec<(u32, String)> {
        processes_in_pid_ns(self.pid_ns.as_ref().expect("a started host has a PID namespace"))
    }

    /// What sshd wrote to stderr (`-e`), for a failing test to print.
    pub fn sshd_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Runs `argv` as root inside the host: its namespaces, its root, a clean environment.
    pub fn run(&self, argv: &[&str]) -> Run {
        let mut c = Command::new("nsenter");
        c.env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .arg("--target")
            .arg(self.init.0.to_string())
            .args(["--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd", "--"])
            .args(argv)
            .stdin(Stdio::null());
        Run(c.output().expect("nsenter runs"))
    }

    /// Kills the host's sshd (its PID 1 starts a new one) and waits until it accepts again.
    pub fn restart_sshd(&self) {
        self.stop_sshd();
        self.wait_for_sshd();
    }

    /// Kills the host: its PID 1, and with it every process inside and its mounts; returns
    /// once none of them is left. Idempotent.
    pub fn kill(&mut self) {
        let Some(mut unshare) = self.unshare.take() else { return };
        // Named by pid and start time: if it died by itself unshare may have reaped it.
        if start_time(self.init.0) == Some(self.init.1) {
            let _ = Command::new("kill").args(["-KILL", &self.init.0.to_string()]).status();
        }
        // Not unshare itself: it reaps PID 1 only once the kernel has ended, and someone has
        // reaped, every other process of the namespace (even one `nsenter` put there from
        // outside), so unshare exiting is the host being gone. Killing it instead would return
        // while the namespace is still being torn down.
        let start = Instant::now();
        let left = loop {
            let exited = unshare.try_wait().ok().flatten().is_some();
            let left = self.pid_ns.as_ref().map(|ns| processes_in_pid_ns(ns)).unwrap_or_default();
            if exited && left.is_empty() {
                return;
            }
            if start.elapsed() > KILL_TIMEOUT {
                break left;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = unshare.kill();
        let _ = unshare.wait();
        if !std::thread::panicking() {
            panic!("{}'s processes were still there {KILL_TIMEOUT:?} after its PID 1 was killed: {left:?}", self.name);
        }
    }

    /// Terminates the running sshd and waits until PID 1 has started the next one.
    fn stop_sshd(&self) {
        let pid_file = self.root.join("run/sshd.pid");
        let old = fs::read_to_string(&pid_file).unwrap_or_default();
        let r = self.run(&["sh", "-c", "kill $(cat /run/sshd.pid)"]);
        assert_eq!(r.code(), 0, "cannot stop {}'s sshd: {}", self.name, r.stderr());
        let start = Instant::now();
        loop {
            let now = fs::read_to_string(&pid_file).unwrap_or_default();
            if !now.is_empty() && now != old {
                return;
            }
            assert!(
                start.elapsed() < START_TIMEOUT,
                "{}'s sshd did not restart\nsshd log:\n{}",
                self.name,
                self.sshd_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Builds the root directory; returns the host's public key line (`ssh-ed25519 AAAA...`).
    fn make_root(&self, opts: &HostOpts) -> String {
        let root = &self.root;
        for d in [
            "usr",
            "etc",
            "var/log",
            "var/lib",
            "var/tmp",
            "home",
            "run/sshd",
            "nix",
            "dev",
            "proc",
            "root/.ssh",
            "tmp",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::set_permissions(root.join("var/tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::set_permissions(root.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
        // sshd records logins for a session with a terminal, and logs an error when it cannot.
        for f in ["var/log/lastlog", "var/log/wtmp", "var/log/btmp", "run/utmp"] {
            fs::write(root.join(f), "").unwrap();
        }
        // Debian 12 has merged /usr: /bin, /sbin and /lib are symlinks into it, so the
        // read-only /usr overlay brings every program and library.
        for (link, to) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
            std::os::unix::fs::symlink(to, root.join(link)).unwrap();
        }

        // What glibc (users, NSS, the dynamic linker), PAM, sudo and sshd read from /etc.
        let etc = root.join("etc");
        let mut copy = vec![
            "passwd",
            "group",
            "shadow",
            "gshadow",
            "nsswitch.conf",
            "pam.d",
            "security",
            "login.defs",
            "ld.so.cache",
            "ld.so.conf",
            "ld.so.conf.d",
            "environment",
            "default",
            "ssh/moduli",
        ];
        if opts.nix {
            copy.push("nix");
        }
        fs::create_dir_all(etc.join("ssh")).unwrap();
        for what in copy.into_iter().filter(|w| Path::new("/etc").join(w).exists()) {
            checked(
                Command::new("cp").arg("-a").arg(Path::new("/etc").join(what)).arg(etc.join(what)),
                "copying /etc into a host",
            );
        }
        fs::write(etc.join("hostname"), format!("{}\n", self.name)).unwrap();
        // sudo looks its own hostname up.
        fs::write(etc.join("hosts"), format!("127.0.0.1 localhost\n127.0.1.1 {}\n", self.name)).unwrap();
        fs::write(etc.join("ssh/sshd_config"), self.sshd_config()).unwrap();
        let host_pub = host_key(root);

        let client_pub = fs::read_to_string(self.lab.identity_file().with_extension("pub")).unwrap();
        fs::write(root.join("root/.ssh/authorized_keys"), &client_pub).unwrap();

        fs::write(
            etc.join("sudoers"),
            "Defaults env_reset\nDefaults secure_path=\"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\"\nroot ALL=(ALL:ALL) ALL\n@includedir /etc/sudoers.d\n",
        )
        .unwrap();
        fs::set_permissions(etc.join("sudoers"), fs::Permissions::from_mode(0o440)).unwrap();
        fs::create_dir_all(etc.join("sudoers.d")).unwrap();
        // The day of the last password change: 0 would mean "must change it now".
        let today = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 86400;
        for (i, (user, sudo)) in opts.users.iter().enumerate() {
            let id = 2000 + i as u32;
            // `*`, not `!`: sshd refuses a locked account even for a key.
            let password = if *sudo == SudoRule::Password { USER_PASSWORD_HASH } else { "*" };
            append(&etc.join("passwd"), &format!("{user}:x:{id}:{id}::/home/{user}:/bin/sh\n"));
            append(&etc.join("shadow"), &format!("{user}:{password}:{today}:0:99999:7:::\n"));
            append(&etc.join("group"), &format!("{user}:x:{id}:\n"));
            append(&etc.join("gshadow"), &format!("{user}:!::\n"));
            let home = root.join("home").join(user);
            fs::create_dir_all(home.join(".ssh")).unwrap();
            fs::write(home.join(".ssh/authorized_keys"), &client_pub).unwrap();
            for p in [home.clone(), home.join(".ssh"), home.join(".ssh/authorized_keys")] {
                chown(&p, Some(id), Some(id)).unwrap();
            }
            let rule = match sudo {
                SudoRule::None => continue,
                SudoRule::Passwordless => format!("{user} ALL=(ALL) NOPASSWD: ALL\n"),
                SudoRule::Password => format!("{user} ALL=(ALL) ALL\n"),
            };
            let file = etc.join("sudoers.d").join(user);
            fs::write(&file, rule).unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(0o440)).unwrap();
        }
        host_pub
    }

    /// The layer over the machine's `/usr` that hides Nix's commands on a host without Nix:
    /// Debian's nix-bin is installed here for the tests, but a host that answers
    /// `nix-store --version` is not a host without Nix.
    fn make_usr(&self, opts: &HostOpts) {
        let hidden = self.dir.path().join("usr-hidden/bin");
        fs::create_dir_all(&hidden).unwrap();
        if opts.nix {
            return;
        }
        for entry in fs::read_dir("/usr/bin").unwrap().flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name == "nix" || name.starts_with("nix-") {
                // A 0:0 character device in an upper layer is overlayfs's whiteout: the file is gone.
                checked(
                    Command::new("mknod").arg(hidden.join(&*name)).args(["c", "0", "0"]),
                    "mknod for an overlayfs whiteout",
                );
            }
        }
    }

    fn sshd_config(&self) -> String {
        format!(
            "# Written by tests/common/sshhost.rs.\n\
             ListenAddress {}\n\
             Port 22\n\
             HostKey /etc/ssh/ssh_host_ed25519_key\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             AuthorizedKeysFile .ssh/authorized_keys\n\
             PidFile /run/sshd.pid\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             LogLevel VERBOSE\n\
             Subsystem sftp /usr/lib/openssh/sftp-server\n",
            self.address()
        )
    }

    /// The network namespace, `lo` and `eth0` on the lab's bridge.
    fn make_network(&self) {
        let made = Command::new("ip").args(["netns", "add", &self.netns]).output().unwrap();
        assert!(
            made.status.success(),
            "cannot create the host's network namespace {}: {}",
            self.netns,
            String::from_utf8_lossy(&made.stderr)
        );
        let fleet = &self.lab.fleet_ns;
        // The bridge's end lives in the Fleet's namespace, where only this lab names veths.
        let port = format!("flsshv{}", self.index);
        in_netns(
            fleet,
            &["ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &self.netns],
        );
        in_netns(fleet, &["ip", "link", "set", &port, "master", BRIDGE, "up"]);
        in_netns(&self.netns, &["ip", "link", "set", "lo", "up"]);
        in_netns(&self.netns, &["ip", "addr", "add", &format!("{}/24", self.address()), "dev", "eth0"]);
        in_netns(&self.netns, &["ip", "link", "set", "eth0", "up"]);
        in_netns(&self.netns, &["ip", "route", "add", "default", "via", &format!("{SUBNET}.1")]);
    }

    /// Starts PID 1: new mount, PID, UTS and IPC namespaces, the mounts, then the chroot.
    fn spawn_init(&mut self) {
        let root = shell_quote(&self.root.display().to_string());
        let hidden = self.dir.path().join("usr-hidden");
        // overlayfs takes `:` and `,` as separators in its options.
        assert!(
            !hidden.display().to_string().contains([':', ',']),
            "the temp dir's path {} cannot be an overlayfs layer",
            hidden.display()
        );
        let hidden = shell_quote(&hidden.display().to_string());
        // Propagation private: the mounts below never show on the machine. The namespace's
        // copies of the machine's `/run/netns/*` mounts do not keep other tests' network
        // namespaces alive: `ip netns del` unlinks the file, and the kernel then detaches
        // the mounts on it in every mount namespace.
        //
        // /usr is an overlay with no upper directory, so read-only: the machine's /usr under
        // the host's own layer of hidden files.
        //
        // PID 1 restarts sshd whenever it exits (restart_sshd, replace_host_key) and, while
        // it waits for sshd or sleep, dash's wait reaps any child: orphans too.
        let setup = format!(
            "set -e\n\
             mount -t overlay overlay -o lowerdir={hidden}:/usr {root}/usr\n\
             mount --rbind /dev {root}/dev\n\
             mount -t proc proc {root}/proc\n\
             hostname {name}\n\
             exec chroot {root} /bin/sh -c 'while :; do /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config; sleep 0.2; done'\n",
            name = shell_quote(&self.name),
        );
        let log = fs::File::create(self.dir.path().join("sshd.log")).unwrap();
        let unshare = Command::new("nsenter")
            .env_clear()
            .env("PATH", PATH)
            .arg(format!("--net=/run/netns/{}", self.netns))
            .args([
                "--",
                "unshare",
                "--mount",
                "--pid",
                "--uts",
                "--ipc",
                "--fork",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &setup,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nsenter starts");
        let parent = unshare.id();
        self.unshare = Some(unshare);
        // PID 1 is unshare's only child.
        let start = Instant::now();
        let init = loop {
            let children = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()) {
                if let Some(started) = start_time(pid) {
                    break (pid, started);
                }
            }
            let exited = self.unshare.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && start.elapsed() < START_TIMEOUT,
                "{}'s PID 1 did not start ({exited:?})\nlog:\n{}",
                self.name,
                self.sshd_log()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        self.init = init;
        self.pid_ns = fs::read_link(format!("/proc/{}/ns/pid", init.0)).ok();
        assert!(self.pid_ns.is_some(), "cannot read {}'s PID namespace", self.name);
    }

    /// Polls with the real client, strictly checking the host key, until root gets in.
    fn wait_for_sshd(&self) {
        let start = Instant::now();
        loop {
            let r = self.lab.ssh(&self.address(), "root", "true");
            if r.code() == 0 {
                return;
            }
            assert!(
                start_time(self.init.0) == Some(self.init.1),
                "{}'s PID 1 has died\nlog:\n{}",
                self.name,
                self.sshd_log()
            );
            assert!(
                start.elapsed() < START_TIMEOUT,
                "{}'s sshd does not accept root with the lab's key after {START_TIMEOUT:?}\nlast ssh: {}\nsshd log:\n{}",
                self.name,
                r.stderr(),
                self.sshd_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        self.kill();
        // The kernel tears a deleted network namespace down later, in the background, and its
        // veth's other end with it: delete the pair now, so it is gone when drop returns.
        if Path::new("/run/netns").join(&self.lab.fleet_ns).exists() {
            let port = format!("flsshv{}", self.index);
            let _ = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.lab.fleet_ns))
                .args(["--", "ip", "link", "del", &port])
                .output();
        }
        if Path::new("/run/netns").join(&self.netns).exists() {
            let _ = Command::new("ip").args(["netns", "del", &self.netns]).output();
        }
        // A deployment leaves read-only store directories behind; TempDir then removes the rest.
        make_writable(self.dir.path());
    }
}

/// Fails loudly, naming the package, when something a host needs is missing.
pub fn require_ssh_prerequisites(nix: bool) {
    super::require_container_prerequisites();
    let mut needed = vec![
        ("/usr/sbin/sshd", "openssh-server"),
        ("/usr/bin/ssh", "openssh-client"),
        ("/usr/bin/ssh-keygen", "openssh-client"),
        ("/usr/bin/ssh-keyscan", "openssh-client"),
        ("/usr/bin/sudo", "sudo"),
        ("/usr/bin/unshare", "util-linux"),
        ("/usr/sbin/chroot", "coreutils"),
        ("/usr/bin/mknod", "coreutils"),
    ];
    if nix {
        needed.push(("/usr/bin/nix-store", "nix-bin"));
    }
    for (path, package) in needed {
        assert!(
            Path::new(path).exists(),
            "prerequisite missing: {path} (Debian: {package}); run scripts/install-deps.sh"
        );
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    assert!(
        passwd.lines().any(|l| l.starts_with("sshd:")),
        "prerequisite missing: the user sshd in /etc/passwd, for sshd's privilege separation (Debian: openssh-server makes it); run scripts/install-deps.sh"
    );
    assert!(
        fs::read_link("/bin").is_ok_and(|t| t == Path::new("usr/bin")),
        "the ssh test hosts need a merged /usr (/bin -> usr/bin), as Debian 12 has"
    );
}

/// The processes whose PID namespace is `ns` (a `pid:[inode]` link target), with their
/// command lines.
fn processes_in_pid_ns(ns: &Path) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if fs::read_link(entry.path().join("ns/pid")).is_ok_and(|n| n == ns) {
            let cmd = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).split('\0').filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ");
            found.push((pid, cmd));
        }
    }
    found
}

/// Makes an ed25519 host key under `root`/etc/ssh; returns the public key without comment.
fn host_key(root: &Path) -> String {
    let key = root.join("etc/ssh/ssh_host_ed25519_key");
    checked(
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"]).arg(&key),
        "ssh-keygen for a host key",
    );
    let public = fs::read_to_string(key.with_extension("pub")).unwrap();
    public.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// Runs `argv` inside the named network namespace; panics with its stderr on failure.
fn in_netns(ns: &str, argv: &[&str]) -> Output {
    checked(
        Command::new("nsenter").arg(format!("--net=/run/netns/{ns}")).arg("--").args(argv),
        &format!("`{}` in {ns}", argv.join(" ")),
    )
}

#[track_caller]
fn checked(c: &mut Command, what: &str) -> Output {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(out.status.success(), "{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

fn append(file: &Path, text: &str) {
    let mut f = fs::OpenOptions::new().append(true).open(file).unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Gives the owner write access to every directory under `dir`, never following symlinks.
fn make_writable(dir: &Path) {
    let Ok(meta) = fs::symlink_metadata(dir) else { return };
    if !meta.is_dir() {
        return;
    }
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(meta.permissions().mode() | 0o700));
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        make_writable(&entry.path());
    }
}
