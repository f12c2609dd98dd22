//! The agent as a VM's init. A VM boots the kernel with flotilla's initramfs, whose `/init`
//! is this binary: it runs stage 1 ([`stage1`]: modules, find and mount the root, switch to
//! it), then execs the root's agent as `init --root / --vm`, which prepares the machine
//! ([`prepare`]: the mounts an init makes, the root grown to its disk, the hostname and the
//! network from the kernel command line or a NoCloud seed) and then runs as `init` always
//! does, also answering deployers on the virtio-serial ports ([`virtio`]).
//!
//! A VM's PID 1 must never exit (the kernel panics and the VM hangs): every failure is said on
//! the console, prefixed so the platform can find it, and ends in power off.

pub mod initrd;
pub mod net;
pub mod seed;
pub mod stage1;
pub(crate) mod sys;
pub mod virtio;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The label the root filesystem has unless `root=LABEL=...` says otherwise.
pub const DEFAULT_ROOT_LABEL: &str = "flotilla-root";

/// Where stage 1 execs the root's agent from.
pub const SYSTEM_AGENT: &str = "/nix/var/flotilla/profiles/system/bin/flotilla-agent";

/// What the kernel command line tells flotilla.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `root=LABEL=<label>`.
    pub root_label: Option<String>,
    /// `flotilla.hostname=`.
    pub hostname: Option<String>,
    /// `flotilla.ip=<addr>/<prefix>`, as given.
    pub ip: Option<String>,
    /// `flotilla.gateway=`.
    pub gateway: Option<String>,
}

impl Cmdline {
    /// Reads the words of `/proc/cmdline` (no quoting: flotilla's values have no spaces).
    pub fn parse(line: &str) -> Cmdline {
        let mut c = Cmdline::default();
        for word in line.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else { continue };
            let value = Some(value.to_owned());
            match key {
                "root" => c.root_label = word["root=".len()..].strip_prefix("LABEL=").map(str::to_owned),
                "flotilla.hostname" => c.hostname = value,
                "flotilla.ip" => c.ip = value,
                "flotilla.gateway" => c.gateway = value,
                _ => {}
            }
        }
        c
    }

    /// The running kernel's command line.
    pub fn current() -> std::io::Result<Cmdline> {
        Ok(Cmdline::parse(&std::fs::read_to_string("/proc/cmdline")?))
    }
}

/// Set once this process is a VM's PID 1 (`init --vm`): only then does `PowerOff` power off.
static VM_INIT: AtomicBool = AtomicBool::new(false);
/// Set when a deployer asked for power off, so the stop that follows ends in it.
static POWER_OFF_ASKED: AtomicBool = AtomicBool::new(false);

/// Marks this process as a VM's init.
pub fn mark_vm_init() {
    VM_INIT.store(true, Ordering::SeqCst);
}

/// Whether this process is a VM's init.
pub fn is_vm_init() -> bool {
    VM_INIT.load(Ordering::SeqCst)
}

/// A deployer's `PowerOff`: stops the agent as SIGTERM does (every service stopped cleanly),
/// after which a VM's init powers off. `false` (and nothing done) outside a VM.
pub fn request_power_off() -> bool {
    if !is_vm_init() {
        return false;
    }
    POWER_OFF_ASKED.store(true, Ordering::SeqCst);
    if let Err(e) = sys::raise_terminate() {
        eprintln!("flotilla-agent: cannot stop itself to power off: {e}");
        return false;
    }
    true
}

/// The end of a VM's init once its services stopped: flush, make the root read-only so the
/// filesystem is clean, power off. Never returns.
pub fn power_off(root: &Path) -> ! {
    eprintln!("flotilla-agent: powering off");
    sys::sync();
    for m in ["/tmp", "/run", "/dev/shm", "/dev/pts"] {
        let _ = sys::umount(Path::new(m), libc::MNT_DETACH);
    }
    if let Err(e) = sys::mount("none", root, None, libc::MS_REMOUNT | libc::MS_RDONLY, None) {
        eprintln!("flotilla-agent: cannot make {} read-only before power off: {e}", root.display());
    }
    sys::sync();
    let e = sys::power_off();
    eprintln!("flotilla-agent: power off failed: {e}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Says why a VM's init cannot go on, on its console, and powers off after 2 s (so the line
/// reaches the platform). `prefix` is `flotilla stage1` or `flotilla-agent`.
pub fn fail(prefix: &str, why: &str) -> ! {
    eprintln!("{prefix}: {why}");
    std::thread::sleep(Duration::from_secs(2));
    sys::sync();
    let e = sys::power_off();
    eprintln!("{prefix}: power off failed: {e}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Why stage 2 could not prepare the machine.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct PrepareError {
    what: String,
    source: std::io::Error,
}

fn step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PrepareError {
    let what = what.into();
    move |source| PrepareError { what, source }
}

/// Stage 2's set-up, before the agent runs as `init` does: the mounts, the root grown, the
/// hostname and the network (from the command line, else a NoCloud seed).
pub fn prepare(root: &Path) -> Result<(), PrepareError> {
    mark_vm_init();
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    for (what, target, fstype, flags, data) in [
        ("devpts", "dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"),
        ("tmpfs", "run", "tmpfs", nosuid, "mode=755"),
        ("tmpfs", "tmp", "tmpfs", nosuid, "mode=1777"),
        ("tmpfs", "dev/shm", "tmpfs", nosuid, "mode=1777"),
    ] {
        let target = root.join(target);
        std::fs::create_dir_all(&target).map_err(step(format!("cannot create {}", target.display())))?;
        sys::mount(what, &target, Some(fstype), flags, Some(data)).map_err(step(format!("cannot mount {fstype} on {}", target.display())))?;
    }
    if let Err(e) = grow_root(root) {
        eprintln!("flotilla-agent: the root filesystem keeps its size: {e}");
    }
    let cmdline = Cmdline::current().map_err(step("cannot read /proc/cmdline"))?;
    let seed = if cmdline.hostname.is_none() || cmdline.ip.is_none() { seed::read(&root.join("run/flotilla/seed")) } else { None };
    let hostname = cmdline.hostname.clone().or_else(|| seed.as_ref().and_then(|s| s.hostname.clone()));
    if let Some(name) = &hostname {
        sys::set_hostname(name).map_err(step(format!("cannot set the hostname {name:?}")))?;
    }
    sys::configure_interface("lo", None).map_err(step("cannot bring up lo"))?;
    // As in a local container: unprivileged services may bind port 80, so one machine
    // description runs the same on every platform.
    std::fs::write(root.join("proc/sys/net/ipv4/ip_unprivileged_port_start"), b"0").map_err(step("cannot set net.ipv4.ip_unprivileged_port_start to 0"))?;
    // The command line is the platform's, and a machine it cannot configure must not run; a
    // seed is the user's, and a bad one leaves the machine up without a network, said on the
    // console, rather than powered off with no way in.
    let from_seed = cmdline.ip.is_none();
    let network = match net::Network::choose(&cmdline, seed.as_ref().and_then(|s| s.network.as_ref())) {
        Ok(n) => n,
        Err(e) if from_seed => {
            eprintln!("flotilla-agent: the seed's network-config is not usable, so the machine has no network: {e}");
            None
        }
        Err(e) => return Err(PrepareError { what: "the network configuration".into(), source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e) }),
    };
    if let Some(network) = network {
        match network.apply() {
            Ok(()) => eprintln!("flotilla-agent: network {network}"),
            Err(e) if from_seed => eprintln!("flotilla-agent: cannot configure the seed's network ({network}): {e}"),
            Err(e) => return Err(step(format!("cannot configure the network ({network})"))(e)),
        }
    }
    eprintln!("flotilla-agent: this machine is {}", sys::hostname().unwrap_or_default());
    Ok(())
}

/// Grows the root ext4 to its device's size (a disk made larger than its image).
fn grow_root(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata(root)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sectors: u64 = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))?.trim().parse().map_err(|_| std::io::Error::other("an unreadable device size"))?;
    let dir = std::fs::File::open(root)?;
    let block = sys::block_size(root)?;
    let blocks = sectors * 512 / block;
    match sys::ext4_resize(&dir, blocks) {
        Ok(()) => Ok(()),
        Err(e) => Err(std::io::Error::new(e.kind(), format!("resizing to {blocks} blocks of {block} bytes: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_reads_flotillas_words_and_skips_the_rest() {
        let c = Cmdline::parse("console=ttyS0 root=LABEL=my-root flotilla.hostname=web1 flotilla.ip=10.0.0.2/24 flotilla.gateway=10.0.0.1 quiet\n");
        assert_eq!(
            c,
            Cmdline { root_label: Some("my-root".into()), hostname: Some("web1".into()), ip: Some("10.0.0.2/24".into()), gateway: Some("10.0.0.1".into()) }
        );
        assert_eq!(Cmdline::parse("root=/dev/vda").root_label, None);
    }
}
