//! The `local` platform: each machine is a container of Linux namespaces on this host.
//!
//! A machine's data lives beside the state DB, in `machines/<deployment>/<machine>/`: `root/`
//! (its whole filesystem, with its own `/nix/store`), `console.log` and `pid.json`, written
//! by the launcher (`flotilla-agent container`) while the machine runs.
//!
//! Networking: a bridge per deployment (`flb-<id>`, holding the subnet's first address) in
//! the network namespace flotilla runs in, and per machine a named network namespace
//! (`/run/netns/flotilla-<id>-<machine>`) with `eth0` on a veth pair whose other end
//! (`flv-<hash>`) is a port of the bridge. The namespace outlives stops and starts, the way
//! a VM keeps its NIC; `destroy` deletes it, which deletes the veth pair with it. `<id>`
//! is a hash of the state DB's path and the deployment's name, so two state DBs (two users,
//! parallel tests) never share a name.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_model::LocalPlatform;
use serde_json::Value;

use std::os::fd::AsRawFd as _;

use flotilla_protocol::layout::{self, records, PidFile};
use flotilla_store::StorePath;

mod plan;
pub use plan::plan_facts;

use super::{bridge, sys, BootGeneration, Context, Machine, MachineState, PlatformError, Transport};
use crate::facts::Subnet;
use crate::remote::RemoteError;

/// How long a stopping machine's agent gets to stop its services before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a starting machine's agent gets to answer.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The port the reachability probe sends its SYN to (discard): either answer, a connection or
/// a refusal, comes from the machine's own network stack.
const REACH_PORT: u16 = 9;
/// How long the machine's address gets to answer the reachability probe.
const REACH_TIMEOUT: Duration = Duration::from_secs(6);

/// A local namespace container.
#[derive(Debug, Clone)]
pub struct LocalMachine {
    name: String,
    dir: PathBuf,
    agent: PathBuf,
    net: Net,
    forwards: Vec<(u16, u16)>,
}

/// A machine's place on its deployment's bridge.
#[derive(Debug, Clone)]
struct Net {
    bridge: String,
    netns: String,
    veth: String,
    ip: Ipv4Addr,
    subnet: Subnet,
}

impl LocalMachine {
    /// The container for machine `name`, from its checked platform options and its facts
    /// (`ip` and `subnet`, planned before provisioning).
    pub fn new(ctx: &Context, name: &str, spec: &LocalPlatform, facts: &BTreeMap<String, Value>) -> Result<LocalMachine, PlatformError> {
        let (ip, subnet) = bridge::place(name, &spec.subnet, facts)?;
        let state = ctx.state_path.to_string_lossy();
        let id = bridge::deployment_id(ctx);
        Ok(LocalMachine {
            name: name.to_owned(),
            dir: ctx.machines_dir().join(name),
            agent: ctx.agent.clone(),
            net: Net {
                bridge: bridge::name(ctx),
                netns: format!("flotilla-{id}-{name}"),
                veth: format!("flv-{}", bridge::short_hash(&[&state, &ctx.deployment, name])),
                ip,
                subnet,
            },
            forwards: spec.forward_ports.iter().map(|f| (f.host, f.guest)).collect(),
        })
    }

    /// The machine's root directory on this host.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The deployment's bridge.
    pub fn bridge(&self) -> &str {
        &self.net.bridge
    }

    /// The machine's named network namespace.
    pub fn netns(&self) -> &str {
        &self.net.netns
    }

    /// The host end of the machine's veth pair.
    pub fn veth(&self) -> &str {
        &self.net.veth
    }

    fn err(&self, message: impl Into<String>) -> PlatformError {
        PlatformError::failed(&self.name, message)
    }

    /// flotilla refuses, for the machine's sake (the message says why and the fix).
    fn refused(&self, message: impl Into<String>) -> PlatformError {
        PlatformError::refused(&self.name, message)
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("pid.json")
    }

    fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.net.netns)
    }

    /// The running container's processes, if it runs.
    fn running(&self) -> Option<PidFile> {
        let pids: PidFile = serde_json::from_slice(&fs::read(self.pidfile()).ok()?).ok()?;
        flotilla_proc::is_running(pids.init, pids.init_start_time).then_some(pids)
    }

    fn ip(&self, args: &[&str]) -> Result<String, PlatformError> {
        bridge::ip(&self.name, args)
    }

    fn link_exists(&self, name: &str) -> bool {
        bridge::link_exists(name)
    }

    /// Creates the machine's network namespace and veth pair if missing, and puts back what
    /// the machine (or anyone) changed of the platform's own plumbing: links up, the
    /// address, the default route, the veth on the bridge. The namespace outlives the
    /// machine's processes, so a release that downed `eth0` would otherwise keep it down
    /// across rollbacks, reboots and redeploys. Returns what it restored.
    fn ensure_network(&self) -> Result<Vec<String>, PlatformError> {
        // Machines are provisioned in parallel; the first makes the bridge, the rest wait.
        let _one_at_a_time = bridge::NETWORK.lock().unwrap_or_else(|p| p.into_inner());
        let n = &self.net;
        let made_bridge = bridge::ensure(&self.name, &n.bridge, &n.subnet)?;
        let ns = n.netns.as_str();
        let fresh_ns = !self.netns_path().exists();
        let made_veth = fresh_ns || !self.link_exists(&n.veth);
        let made = (|| {
            if fresh_ns {
                let _ = self.ip(&["link", "del", &n.veth]);
                self.ip(&["netns", "add", ns])?;
            }
            if made_veth {
                // The namespace is kept when only the pair is gone (a running machine deleted
                // its eth0): its processes live in that namespace, not in a new one.
                let _ = self.ip(&["link", "del", &n.veth]);
                self.ip(&["link", "add", &n.veth, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
            }
            let mut restored = Vec::new();
            for (what, fix) in self.plumbing_faults()? {
                self.ip(&fix.iter().map(String::as_str).collect::<Vec<_>>())?;
                restored.push(what);
            }
            if !restored.is_empty() {
                // This host marked the address unreachable while it was cut off, and would go
                // on failing connections until that entry times out: ask again now.
                let _ = self.ip(&["neigh", "del", &n.ip.to_string(), "dev", &n.bridge]);
            }
            Ok(restored)
        })();
        match made {
            Ok(restored) if !made_veth => Ok(restored),
            // What a fresh pair lacks is being made, not restored.
            Ok(_) if fresh_ns => Ok(Vec::new()),
            Ok(_) => Ok(vec!["its veth pair is gone".into()]),
            Err(e) => {
                if fresh_ns {
                    let _ = self.ip(&["netns", "del", ns]);
                }
                if made_veth {
                    let _ = self.ip(&["link", "del", &n.veth]);
                }
                if made_bridge {
                    let _ = self.ip(&["link", "del", &n.bridge]);
                }
                Err(e)
            }
        }
    }

    /// What of the platform's plumbing is not as it should be, each with the `ip` command
    /// that puts it back (each is idempotent). Read with `ip -j`, so a name or an address
    /// is compared as a field, not found in text.
    fn plumbing_faults(&self) -> Result<Vec<(String, Vec<String>)>, PlatformError> {
        self.faults_in(&self.look()?)
    }

    /// The machine's plumbing as it is now, in two `ip` processes whatever the fleet's size:
    /// the bridge and the veth on the host's side, the links and default routes inside.
    fn look(&self) -> Result<Seen, PlatformError> {
        let n = &self.net;
        let by_name = |docs: &[Value]| -> BTreeMap<String, Value> {
            docs.iter().flat_map(|d| d.as_array().cloned().unwrap_or_default()).filter_map(|l| Some((l["ifname"].as_str()?.to_owned(), l))).collect()
        };
        let host = bridge::ip_batch(&self.name, None, &[format!("addr show dev {}", n.bridge), format!("addr show dev {}", n.veth)])?;
        let inside = bridge::ip_batch(&self.name, Some(&n.netns), &["addr show".to_owned(), "route show default".to_owned()])?;
        let routes = inside.iter().flat_map(|d| d.as_array().cloned().unwrap_or_default()).filter(|r| r.get("dst").is_some()).collect();
        Ok(Seen { host: by_name(&host), inside: by_name(&inside), routes })
    }

    /// [`LocalMachine::plumbing_faults`] in what [`LocalMachine::look`] saw.
    fn faults_in(&self, seen: &Seen) -> Result<Vec<(String, Vec<String>)>, PlatformError> {
        let n = &self.net;
        let ns = n.netns.clone();
        let cidr = format!("{}/{}", n.ip, n.subnet.prefix);
        let gateway = n.subnet.gateway().to_string();
        let link = |netns: Option<&str>, dev: &str| -> Result<Option<Value>, PlatformError> {
            Ok(if netns.is_some() { seen.inside.get(dev) } else { seen.host.get(dev) }.cloned())
        };
        let up = |l: &Value| l["flags"].as_array().is_some_and(|f| f.iter().any(|f| f == "UP"));
        let has_addr = |l: &Value, ip: &str, prefix: u8| {
            l["addr_info"].as_array().is_some_and(|a| a.iter().any(|a| a["family"] == "inet" && a["local"] == ip && a["prefixlen"] == prefix))
        };
        let cmd = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        let mut faults = Vec::new();

        let bridge = link(None, &n.bridge)?.ok_or_else(|| self.err(format!("the deployment's bridge {} is gone", n.bridge)))?;
        if !has_addr(&bridge, &gateway, n.subnet.prefix) {
            faults.push((format!("bridge {} lacks its address {gateway}", n.bridge), cmd(&["addr", "replace", &format!("{gateway}/{}", n.subnet.prefix), "dev", &n.bridge])));
        }
        if !up(&bridge) {
            faults.push((format!("bridge {} is down", n.bridge), cmd(&["link", "set", &n.bridge, "up"])));
        }
        let veth = link(None, &n.veth)?.ok_or_else(|| self.err(format!("its veth {} is gone", n.veth)))?;
        if veth["master"] != n.bridge.as_str() || !up(&veth) {
            faults.push((format!("its veth {} is down or off the bridge", n.veth), cmd(&["link", "set", &n.veth, "master", &n.bridge, "up"])));
        }
        let lo = link(Some(&ns), "lo")?;
        if !lo.as_ref().is_some_and(up) {
            faults.push(("its lo is down".into(), cmd(&["-n", &ns, "link", "set", "lo", "up"])));
        }
        let eth0 = link(Some(&ns), "eth0")?.ok_or_else(|| self.err(format!("its eth0 is gone from network namespace {ns}")))?;
        if !has_addr(&eth0, &n.ip.to_string(), n.subnet.prefix) {
            faults.push((format!("its eth0 lacks its address {cidr}"), cmd(&["-n", &ns, "addr", "replace", &cidr, "dev", "eth0"])));
        }
        let eth0_down = !up(&eth0);
        if eth0_down {
            faults.push(("its eth0 is down".into(), cmd(&["-n", &ns, "link", "set", "eth0", "up"])));
        }
        // A link going down takes its routes with it: the route is put back after the link.
        let routes = &seen.routes;
        if eth0_down || !routes.iter().any(|r| r["gateway"] == gateway.as_str() && r["dev"] == "eth0") {
            faults.push((format!("its default route via {gateway} is gone"), cmd(&["-n", &ns, "route", "replace", "default", "via", &gateway, "dev", "eth0"])));
        }
        Ok(faults)
    }

    /// Deletes the machine's network namespace (and with it the veth pair), and the bridge
    /// when no port is left on it.
    fn remove_network(&self) -> Result<(), PlatformError> {
        // Machines are destroyed in parallel; the last one out removes the bridge.
        let _one_at_a_time = bridge::NETWORK.lock().unwrap_or_else(|p| p.into_inner());
        let n = &self.net;
        if self.netns_path().exists() {
            self.ip(&["netns", "del", &n.netns])?;
        }
        // Deleting the namespace deletes the veth's peer, and the kernel then removes this end
        // by itself, asynchronously: it may vanish between the look and the delete.
        if self.link_exists(&n.veth) {
            if let Err(e) = self.ip(&["link", "del", &n.veth]) {
                if self.link_exists(&n.veth) {
                    return Err(e);
                }
            }
        }
        bridge::remove_if_unused(&self.name, &n.bridge)
    }

    /// Lays out an empty root and puts the bootstrap agent in it (refreshed at every start,
    /// so a machine that never activated a system runs the deployer's agent).
    fn prepare_root(&self) -> Result<(), PlatformError> {
        let root = self.root();
        let io = |what: &str, p: &Path, e: std::io::Error| self.err(format!("cannot {what} {}: {e}", p.display()));
        // The machine's directory (and `machines/<deployment>` above it) is root's alone, so
        // no user of this host reaches into the machine's files; `root/` itself stays 0755,
        // as it is the machine's `/`, which its own users must be able to enter.
        {
            use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(|e| io("create", &self.dir, e))?;
            // One an older flotilla made 0755 is made private too, through the directory itself.
            let dir = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY).open(&self.dir).map_err(|e| io("open", &self.dir, e))?;
            let mode = dir.metadata().map_err(|e| io("read", &self.dir, e))?.permissions().mode();
            if mode & 0o077 != 0 {
                dir.set_permissions(fs::Permissions::from_mode(0o700)).map_err(|e| io("make private", &self.dir, e))?;
            }
        }
        let bootstrap = layout::under(&root, layout::BOOTSTRAP_AGENT);
        let bin = bootstrap.parent().expect("the bootstrap agent is in a directory");
        for p in ["nix/store", "etc", "var/log", "run", "tmp", "proc", "dev", "root", "bin"].iter().map(|d| root.join(d)).chain([bin.to_owned()]) {
            fs::create_dir_all(&p).map_err(|e| io("create", &p, e))?;
        }
        let dest = bootstrap.clone();
        let tmp = bin.join(".flotilla-agent.new");
        fs::copy(&self.agent, &tmp).map_err(|e| io("copy the agent to", &tmp, e))?;
        fs::rename(&tmp, &dest).map_err(|e| io("install", &dest, e))?;
        Ok(())
    }

    fn launch(&self) -> Result<(), PlatformError> {
        self.run_launcher(false)
    }

    /// Runs the launcher: for a new container, or with `adopt` for the running one whose
    /// monitor died (a new monitor takes over its forwards and its pidfile).
    fn run_launcher(&self, adopt: bool) -> Result<(), PlatformError> {
        let mut cmd = Command::new(&self.agent);
        cmd.arg("container");
        if adopt {
            cmd.arg("--adopt");
        }
        cmd
            .arg("--root")
            .arg(self.root())
            .args(["--hostname", &self.name])
            .arg("--netns")
            .arg(self.netns_path())
            .arg("--pidfile")
            .arg(self.pidfile())
            .arg("--console")
            .arg(self.dir.join("console.log"));
        for (host, guest) in &self.forwards {
            cmd.arg("--forward").arg(format!("{host}:{}:{guest}", self.net.ip));
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.err(format!("cannot run the agent {} ({e})", self.agent.display())))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            let why = why.trim().trim_start_matches("flotilla-agent: ");
            let what = if adopt { "cannot start a new monitor for the container" } else { "cannot start the container" };
            return Err(self.err(format!("{what}: {why}")));
        }
        Ok(())
    }

    /// Waits until the agent answers, or the container died, or time is up.
    fn wait_for_agent(&self) -> Result<(), PlatformError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let Some(pids) = self.running() else {
                return Err(self.err(format!("the container stopped while starting; see {}", self.dir.join("console.log").display())));
            };
            if agent_socket(pids.init).is_ok_and(|fd| std::os::unix::net::UnixStream::connect(fd_path(&fd)).is_ok()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                // Never leave a machine running that was reported as failed to start.
                sys::kill(pids.init, sys::SIGKILL);
                return Err(self.err(format!(
                    "the agent did not answer within {}s, so the container was stopped again; see {}",
                    START_TIMEOUT.as_secs(),
                    self.dir.join("console.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the running container's monitor (which relays its port forwards) is alive: it
    /// holds the machine's `pid.lock` for its whole life, which a reused pid cannot fake.
    fn monitor_alive(&self) -> bool {
        fs::File::open(self.dir.join("pid.lock")).is_ok_and(|f| sys::locked_by_another(&f))
    }

    /// Puts back what a running machine lost of the platform's plumbing: its network as
    /// [`LocalMachine::ensure_network`] makes it, and a monitor relaying its port forwards.
    /// Returns what was restored, as the user should read it.
    fn restore_running(&self) -> Result<Option<String>, PlatformError> {
        self.restore_running_seen(None)
    }

    /// [`LocalMachine::restore_running`], with what a look just now saw, if one did.
    fn restore_running_seen(&self, seen: Option<&Seen>) -> Result<Option<String>, PlatformError> {
        if self.running().is_none() {
            return Ok(None);
        }
        if !self.netns_path().exists() {
            return Err(self.err(format!(
                "its network namespace {} is gone while it runs, so its network cannot be restored in place; reboot it (flotilla reboot --on {})",
                self.netns_path().display(),
                self.name
            )));
        }
        // A look that changes nothing first, outside the lock the machines' network changes
        // take one at a time: a fleet whose plumbing is as made (the usual redeploy) is looked
        // at in parallel, and only a machine with something to repair waits for the lock.
        let looked;
        let seen = match seen {
            Some(s) => Some(s),
            None => {
                looked = self.look().ok();
                looked.as_ref()
            }
        };
        let as_made = seen.is_some_and(|s| s.host.contains_key(&self.net.veth) && self.faults_in(s).is_ok_and(|faults| faults.is_empty()));
        let mut found = if as_made { Vec::new() } else { self.ensure_network()? };
        if !self.monitor_alive() {
            self.run_launcher(true)?;
            found.push("its container monitor was gone (its port forwards with it)".into());
        }
        Ok((!found.is_empty()).then(|| format!("restored its plumbing ({})", found.join("; "))))
    }

    /// Refuses a machine whose network namespace holds another address than its facts say
    /// (its `platform.address` or `platform.subnet` changed): moving a machine is a rebuild.
    fn check_address(&self, seen: &Seen) -> Result<(), PlatformError> {
        let want = format!("{}/{}", self.net.ip, self.net.subnet.prefix);
        let have = seen.inside.get("eth0").and_then(|l| l["addr_info"].as_array()?.iter().find(|a| a["family"] == "inet").map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"])));
        match have {
            Some(have) if have != want => Err(self.refused(format!(
                "it has address {have} but its options now give it {want} (`platform.address` or `platform.subnet` changed); a machine cannot move: run `flotilla destroy --on {}` and deploy again",
                self.name
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses to go on while a container monitor still holds the machine's lock although no
    /// pidfile names it (someone removed the file): deleting its root under it would leave
    /// its processes running with nothing to reach them.
    /// A monitor that just removed its pidfile still holds the lock until it has exited: it
    /// is given [`MONITOR_EXIT`] to do so (a fleet stopped at once keeps many exiting together).
    fn check_no_monitor(&self) -> Result<(), PlatformError> {
        let lock = self.dir.join("pid.lock");
        let deadline = Instant::now() + MONITOR_EXIT;
        let held = |f: &fs::File| {
            while sys::locked_by_another(f) {
                if Instant::now() > deadline {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        };
        match fs::File::open(&lock) {
            Ok(f) if held(&f) => Err(self.refused(format!(
                "its container still runs but {} is gone; find its monitor with `fuser {}`, stop it (kill -TERM PID), and destroy again",
                self.pidfile().display(),
                lock.display()
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses to delete a root something is still mounted under.
    fn check_unmounted(&self) -> Result<(), PlatformError> {
        let root = self.root();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = root.to_string_lossy();
        if let Some(line) = mounts.lines().find(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&*prefix))) {
            let at = line.split(' ').nth(4).unwrap_or("");
            return Err(self.refused(format!("{at} is still mounted; unmount it (umount -l {at}) and destroy again")));
        }
        Ok(())
    }
}

/// How long a container monitor that removed its pidfile may take to exit and release its lock.
const MONITOR_EXIT: Duration = Duration::from_secs(10);

/// A machine's plumbing as `ip` showed it (see [`LocalMachine::look`]): links by name on the
/// host's side and in its namespace, and the namespace's default routes.
struct Seen {
    host: BTreeMap<String, Value>,
    inside: BTreeMap<String, Value>,
    routes: Vec<Value>,
}

/// The agent's socket of a running container, through its init's view of the filesystem
/// (its `/run` is a tmpfs the host cannot otherwise see), as users read it.
fn socket(init: u32) -> PathBuf {
    layout::under(Path::new(&format!("/proc/{init}/root")), layout::SOCKET)
}

/// The agent's socket of a running container, opened (`O_PATH`) as the machine sees it: a
/// link a service planted on the way (`/run` → somewhere of the host's) resolves inside the
/// machine, never on the host.
fn agent_socket(init: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    sys::open_beneath(Path::new(&format!("/proc/{init}/root")), Path::new(layout::relative(layout::SOCKET)), libc::O_PATH, sys::Resolve::InRoot)
}

/// A path naming what `fd` is open on, for the std calls that take a path: what they look
/// up below it is found in that directory, whatever happened to its path since.
fn fd_path(fd: &std::os::fd::OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

impl Machine for LocalMachine {
    fn name(&self) -> &str {
        &self.name
    }

    fn state(&self) -> MachineState {
        if self.running().is_some() {
            MachineState::Running
        } else if layout::under(&self.root(), layout::BOOTSTRAP_AGENT).exists() {
            MachineState::Stopped
        } else {
            MachineState::Missing
        }
    }

    fn provision(&self) -> Result<Option<String>, PlatformError> {
        // One look serves both the address check and the plumbing's.
        let seen = if self.netns_path().exists() { self.look().ok() } else { None };
        if let Some(seen) = &seen {
            self.check_address(seen)?;
        }
        match self.state() {
            MachineState::Running => self.restore_running_seen(seen.as_ref()),
            MachineState::Unreachable | MachineState::Unusable => Ok(None),
            MachineState::Stopped => self.start().map(|()| Some("started".into())),
            MachineState::Missing => {
                let made = self.prepare_root().and_then(|()| self.start());
                if let Err(e) = made {
                    // Nothing half-made stays: a machine that never started (missing, so nothing
                    // of it runs) is removed whole, or the user is told what is left.
                    return Err(match self.destroy() {
                        Err(cleanup) => e.and(&format!(
                            "; removing what was made failed too ({}); run `flotilla destroy --on {}`",
                            cleanup.message(),
                            self.name
                        )),
                        Ok(()) => e,
                    });
                }
                Ok(Some("started".into()))
            }
        }
    }

    fn start(&self) -> Result<(), PlatformError> {
        if self.running().is_some() {
            return self.restore_running().map(drop);
        }
        if !crate::procfs::is_root() {
            return Err(self.refused("the local platform makes namespaces, a veth pair and a bridge, which needs root; run flotilla as root"));
        }
        if !self.root().exists() {
            return Err(self.err("it does not exist; deploy it (flotilla deploy) to create it"));
        }
        let _ = fs::remove_file(self.pidfile());
        self.prepare_root()?;
        self.ensure_network()?; // what it restores is as it should be after any start
        self.launch()?;
        self.wait_for_agent()
    }

    fn stop(&self) -> Result<(), PlatformError> {
        let Some(pids) = self.running() else { return Ok(()) };
        sys::kill(pids.init, sys::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut killed = false;
        // Init is named by pid and start time; the monitor by the pidfile it removes when
        // init has gone (its pid alone could be reused).
        let init_alive = || flotilla_proc::is_running(pids.init, pids.init_start_time);
        let monitor_alive = || self.pidfile().exists() && flotilla_proc::alive(pids.monitor);
        while init_alive() || (monitor_alive() && Instant::now() < deadline + Duration::from_secs(2)) {
            if Instant::now() > deadline && !killed {
                // The agent did not stop its services in time: end the whole namespace.
                sys::kill(pids.init, sys::SIGKILL);
                killed = true;
            } else if Instant::now() > deadline + Duration::from_secs(10) {
                return Err(self.err(format!("its processes (init pid {}) did not exit even after SIGKILL", pids.init)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_file(self.pidfile());
        Ok(())
    }

    fn destroy(&self) -> Result<(), PlatformError> {
        self.stop()?;
        self.check_no_monitor()?;
        self.remove_network()?;
        if self.dir.exists() {
            self.check_unmounted()?;
            fs::remove_dir_all(&self.dir).map_err(|e| self.err(format!("cannot remove {}: {e}", self.dir.display())))?;
        }
        if let Some(parent) = self.dir.parent() {
            let _ = fs::remove_dir(parent); // the deployment's directory, once empty
        }
        Ok(())
    }

    fn restore(&self) -> Result<Option<String>, PlatformError> {
        self.restore_running()
    }

    fn problems(&self) -> Vec<String> {
        if self.running().is_none() || !crate::procfs::is_root() {
            return Vec::new(); // a stopped machine's plumbing is restored when it starts
        }
        let mut problems = match self.plumbing_faults() {
            Ok(faults) => faults.into_iter().map(|(what, _)| what).collect(),
            Err(e) => vec![e.into_message()],
        };
        if !self.monitor_alive() {
            problems.push(if self.forwards.is_empty() {
                "its container monitor is gone".to_owned()
            } else {
                "its container monitor is gone, and its port forwards with it".to_owned()
            });
        }
        if !problems.is_empty() {
            problems.push(format!("`flotilla start --on {}` restores the platform's plumbing", self.name));
        }
        problems
    }

    /// A TCP connection from the deployer's network namespace to the machine's address on the
    /// bridge: the path its users, its port forwards and the other machines take. Only the
    /// machine's own network stack can answer a SYN to its address (accepting or refusing, as
    /// the probed port has a listener or not), so an answer proves its link, address and
    /// neighbour resolution; no listener is opened in the machine for it.
    fn check_reachable(&self) -> Result<(), String> {
        let addr = std::net::SocketAddr::from((self.net.ip, REACH_PORT));
        let deadline = Instant::now() + REACH_TIMEOUT;
        loop {
            let error = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(format!("{} does not answer on the deployment's bridge ({error})", self.net.ip));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The agent's unix socket, opened below the container's root as the machine sees it.
    fn transport(&self) -> Result<Transport, RemoteError> {
        let pids = self.running().ok_or_else(|| RemoteError::Connect {
            socket: layout::under(&self.root(), layout::SOCKET),
            source: std::io::Error::new(std::io::ErrorKind::NotConnected, "the machine is not running"),
        })?;
        let shown = socket(pids.init);
        let connect_err = |source| RemoteError::Connect { socket: shown.clone(), source };
        let opened = agent_socket(pids.init).map_err(connect_err)?;
        let stream = std::os::unix::net::UnixStream::connect(fd_path(&opened)).map_err(connect_err)?;
        let reader = stream.try_clone().map_err(connect_err)?;
        Ok(Transport::new(reader, stream))
    }

    fn set_boot_generation(&self, to: Option<u64>) -> Result<BootGeneration, PlatformError> {
        if self.running().is_some() {
            return Err(self.refused("it is running; `flotilla rollback` switches a running machine through its agent"));
        }
        let root = self.root();
        let opened = |rel: &str| {
            sys::open_beneath(&root, Path::new(rel), libc::O_RDONLY | libc::O_DIRECTORY, sys::Resolve::NoLinks)
                .map_err(|e| self.err(format!("cannot open {rel} in its root {} without following a link: {e}", root.display())))
        };
        let profiles = opened(layout::relative(layout::PROFILES))?;
        let state = opened(layout::relative(layout::STATE_DIR))?;
        let (profiles_at, state_at) = (fd_path(&profiles), fd_path(&state));
        let link = |name: &str| fs::read_link(profiles_at.join(name)).ok().map(|t| t.to_string_lossy().into_owned());
        let mut generations: BTreeMap<u64, StorePath> = BTreeMap::new();
        for e in fs::read_dir(&profiles_at).map_err(|e| self.err(format!("cannot list its generations: {e}")))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("system-").and_then(|r| r.strip_suffix("-link")).and_then(|n| n.parse().ok()) else { continue };
            if let Some(top) = link(&name).and_then(|t| StorePath::parse(&t).ok()) {
                generations.insert(n, top);
            }
        }
        let current: Option<u64> = link("system").and_then(|t| t.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok());
        let failed: BTreeMap<u64, String> = sys::open_beneath(&state_at, Path::new(records::FAILED), libc::O_RDONLY, sys::Resolve::NoLinks)
            .ok()
            .and_then(|fd| serde_json::from_reader(fs::File::from(fd)).ok())
            .unwrap_or_default();
        // A generation not yet kept when the machine stopped: its agent would have returned
        // to the one its record names, and so does a rollback without `--to`.
        let pending_previous: Option<u64> = sys::open_beneath(&state_at, Path::new(records::PENDING), libc::O_RDONLY, sys::Resolve::NoLinks)
            .ok()
            .and_then(|fd| serde_json::from_reader::<_, Value>(fs::File::from(fd)).ok())
            .and_then(|record| record.get("previous_generation")?.as_u64());
        let listed = || generations.keys().map(u64::to_string).collect::<Vec<_>>().join(", ");
        let target = match to.or(pending_previous) {
            Some(n) if generations.contains_key(&n) => n,
            Some(n) => return Err(self.err(format!("it has no generation {n}; its generations: {}", listed()))),
            None => *generations
                .keys()
                .rev()
                .find(|n| current.is_none_or(|c| **n < c) && !failed.contains_key(n))
                .ok_or_else(|| self.err(format!("it has no good generation before the current one to roll back to; its generations: {}", listed())))?,
        };
        // One rename inside the directory opened above: the profile is the old link or the new.
        let tmp = profiles_at.join(".system.flotilla-tmp");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("system-{target}-link"), &tmp)
            .and_then(|()| fs::rename(&tmp, profiles_at.join("system")))
            .map_err(|e| self.err(format!("cannot switch its system profile to generation {target}: {e}")))?;
        // A generation that awaited confirmation when it stopped is what this replaces.
        match fs::remove_file(state_at.join(records::PENDING)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.err(format!("switched its profile to generation {target}, but cannot remove its {}, whose record would undo that at the next start: {e}", records::PENDING))),
        }
        Ok(BootGeneration { from: current, to: target, toplevel: generations[&target].clone() })
    }

    fn command(&self, argv: &[String], tty: bool) -> Result<Command, PlatformError> {
        let pids = self.running().ok_or_else(|| self.err("it is not running; start it with `flotilla start`"))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", pids.init))
            .args(["--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd", "--"])
            .args(argv)
            .env_clear()
            .env("PATH", "/run/current-system/sw/bin:/bin")
            .env("HOME", "/root")
            .env("USER", "root")
            .env("LOGNAME", "root");
        if tty {
            cmd.env("TERM", std::env::var("TERM").unwrap_or_else(|_| "xterm".into()));
        }
        Ok(cmd)
    }

    /// Read from the machine's root on this host by the deployer's agent, so the logs of a
    /// stopped machine can be read too.
    fn logs(&self, service: Option<&str>, lines: usize, follow: bool) -> Result<Command, PlatformError> {
        let mut cmd = Command::new(&self.agent);
        cmd.arg("logs").arg("--root").arg(self.root()).args(super::logs_args(service, lines, follow));
        Ok(cmd)
    }

    fn console_log(&self) -> Option<PathBuf> {
        Some(self.dir.join("console.log"))
    }

    fn resources(&self) -> BTreeMap<String, String> {
        let mut r = BTreeMap::new();
        r.insert("root".into(), self.root().display().to_string());
        r.insert("console".into(), self.dir.join("console.log").display().to_string());
        r.insert("netns".into(), self.net.netns.clone());
        r.insert("veth".into(), self.net.veth.clone());
        r.insert("bridge".into(), self.net.bridge.clone());
        if let Some(p) = self.running() {
            r.insert("init_pid".into(), p.init.to_string());
            r.insert("monitor_pid".into(), p.monitor.to_string());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limits_and_differ_per_state_db() {
        let spec = LocalPlatform { address: None, subnet: "10.231.0.0/24".into(), forward_ports: vec![] };
        let facts: BTreeMap<String, Value> = [("ip".to_owned(), Value::from("10.231.0.2"))].into();
        let ctx = |p: &str| Context { state_path: PathBuf::from(p), deployment: "webfleet".into(), agent: PathBuf::from("/a") };
        let a = LocalMachine::new(&ctx("/a/state.db"), "web1", &spec, &facts).unwrap();
        let b = LocalMachine::new(&ctx("/b/state.db"), "web1", &spec, &facts).unwrap();
        assert!(a.bridge().len() <= 15 && a.veth().len() <= 15, "{} {}", a.bridge(), a.veth());
        assert_ne!(a.bridge(), b.bridge());
        assert_ne!(a.veth(), b.veth());
        assert_eq!(a.root(), PathBuf::from("/a/machines/webfleet/web1/root"));
    }

    #[test]
    fn a_machine_without_an_address_cannot_be_made() {
        let spec = LocalPlatform { address: None, subnet: "10.231.0.0/24".into(), forward_ports: vec![] };
        let ctx = Context { state_path: PathBuf::from("/s/state.db"), deployment: "d".into(), agent: PathBuf::from("/a") };
        let e = LocalMachine::new(&ctx, "web1", &spec, &BTreeMap::new()).unwrap_err();
        assert!(e.to_string().starts_with("machine web1: it has no address yet"), "{e}");
    }
}
