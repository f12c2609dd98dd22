//! Stage 1 of a VM's boot: the initramfs's `/init` (this binary, started by the kernel as PID 1
//! with no arguments). It mounts /dev, /proc and /sys, loads the modules the initramfs lists,
//! waits for the root filesystem by its ext4 label, mounts it, switches to it (`MS_MOVE` of
//! the root then `chroot`, as `switch_root` does) and execs the root's agent as
//! `init --root / --vm`.
//!
//! Any failure is one `flotilla stage1: ...` line on the console and power off after 2 s, so
//! the platform sees why and no VM hangs.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{initrd::MODULES_LIST, sys, Cmdline, DEFAULT_ROOT_LABEL, SYSTEM_AGENT};
use flotilla_protocol::layout::BOOTSTRAP_AGENT;

/// How long stage 1 waits for the root disk to appear.
const ROOT_WAIT: Duration = Duration::from_secs(10);

/// Whether this process is stage 1: the kernel ran it as `/init`, or as `init` with pid 1.
pub fn is_stage1(argv0: &str) -> bool {
    argv0 == "/init" || (Path::new(argv0).file_name().is_some_and(|n| n == "init") && std::process::id() == 1)
}

/// Runs stage 1; never returns (it execs stage 2, or powers off).
pub fn run() -> ! {
    let e = match boot() {
        Ok(e) => e,
        Err(e) => e,
    };
    super::fail("flotilla stage1", &e)
}

/// Everything up to the exec; returns why it stopped.
fn boot() -> Result<String, String> {
    for (fstype, target) in [("devtmpfs", "/dev"), ("proc", "/proc"), ("sysfs", "/sys")] {
        let _ = std::fs::create_dir_all(target);
        sys::mount(fstype, Path::new(target), Some(fstype), libc::MS_NOSUID, None).map_err(|e| format!("cannot mount {fstype} on {target}: {e}"))?;
    }
    let list = std::fs::read_to_string(format!("/{MODULES_LIST}")).map_err(|e| format!("cannot read /{MODULES_LIST}: {e} (was the initramfs made by flotilla-agent build-initrd?)"))?;
    for module in list.lines().filter(|l| !l.trim().is_empty()) {
        let file = std::fs::File::open(module).map_err(|e| format!("cannot open the module {module}: {e}"))?;
        let compressed = super::initrd::COMPRESSED.iter().any(|c| module.ends_with(c));
        sys::load_module(&file, compressed).map_err(|e| match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) if compressed => {
                format!("cannot load the module {module}: the kernel cannot decompress modules itself (CONFIG_MODULE_DECOMPRESS); use a kernel whose modules are uncompressed or that can")
            }
            _ => format!("cannot load the module {module}: {e}"),
        })?;
    }
    let cmdline = Cmdline::current().map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    let label = cmdline.root_label.unwrap_or_else(|| DEFAULT_ROOT_LABEL.to_owned());
    let device = wait_for_label(&label, ROOT_WAIT)?;
    let newroot = Path::new("/newroot");
    let _ = std::fs::create_dir_all(newroot);
    sys::mount(&device.to_string_lossy(), newroot, Some("ext4"), 0, None).map_err(|e| format!("cannot mount the root {} (label {label}) as ext4: {e}", device.display()))?;
    for m in ["/dev", "/proc", "/sys"] {
        let target = newroot.join(&m[1..]);
        let _ = std::fs::create_dir_all(&target);
        sys::mount(m, &target, None, libc::MS_MOVE, None).map_err(|e| format!("cannot move {m} to the root: {e}"))?;
    }
    // Free the initramfs's memory: its files are in RAM until deleted. The running binary's
    // pages stay while it runs.
    for d in ["/init", "/lib", "/etc"] {
        let p = Path::new(d);
        let _ = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
    }
    std::env::set_current_dir(newroot).map_err(|e| format!("cannot enter /newroot: {e}"))?;
    sys::mount(".", Path::new("/"), None, libc::MS_MOVE, None).map_err(|e| format!("cannot move the root to /: {e}"))?;
    std::os::unix::fs::chroot(".").map_err(|e| format!("cannot chroot into the root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot enter the new /: {e}"))?;
    // Checked only now: the profile's links are absolute, so they resolve inside the root.
    // The system's agent when a generation was switched in; else the bootstrap agent the
    // qemu platform puts on a new machine's disk, as a local container runs it.
    let agent = [SYSTEM_AGENT, BOOTSTRAP_AGENT].into_iter().find(|a| Path::new(a).exists()).ok_or_else(|| {
        format!("the root {} (label {label}) has neither {SYSTEM_AGENT} nor {BOOTSTRAP_AGENT}: it holds no flotilla system (build its image with `flotilla image`)", device.display())
    })?;
    let e = std::process::Command::new(agent).arg0(agent).args(["init", "--root", "/", "--vm"]).env("PATH", "/run/current-system/sw/bin:/nix/var/flotilla/profiles/system/sw/bin").exec();
    Err(format!("cannot run {agent}: {e}"))
}

/// The block devices the kernel knows, as their /dev nodes.
pub(crate) fn block_devices() -> Vec<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/block").into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names.into_iter().map(|n| Path::new("/dev").join(n)).collect()
}

/// The first `len` bytes of a device (fewer if it is smaller).
pub(crate) fn read_head(dev: &Path, len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut buf = Vec::with_capacity(len);
    std::fs::File::open(dev)?.take(len as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The ext4 (ext2/3) label of a filesystem's first bytes: magic 0xEF53 at 1024+56, the
/// volume name at 1024+120.
pub fn ext4_label(head: &[u8]) -> Option<String> {
    if head.get(1080..1082) != Some(&[0x53, 0xef]) {
        return None;
    }
    let name = head.get(1144..1160)?;
    Some(String::from_utf8_lossy(&name[..name.iter().position(|b| *b == 0).unwrap_or(16)]).into_owned())
}

/// Polls the block devices until one holds an ext4 filesystem labelled `label`.
fn wait_for_label(label: &str, patience: Duration) -> Result<PathBuf, String> {
    let deadline = Instant::now() + patience;
    loop {
        let mut seen = Vec::new();
        for dev in block_devices() {
            match read_head(&dev, 2048).ok().as_deref().and_then(ext4_label) {
                Some(l) if l == label => return Ok(dev),
                Some(l) => seen.push(format!("{} (ext4 labelled {l:?})", dev.display())),
                None => seen.push(dev.display().to_string()),
            }
        }
        if Instant::now() > deadline {
            let seen = if seen.is_empty() { "none".to_owned() } else { seen.join(", ") };
            return Err(format!(
                "no root filesystem labelled {label:?} appeared within {} s (block devices: {seen}); attach the machine's disk image, or give root=LABEL=<its label> on the kernel command line",
                patience.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_label_is_read_from_the_superblock() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
        let made = std::process::Command::new("mkfs.ext4").args(["-q", "-F", "-L", "flotilla-root"]).arg(&img).status().expect("mkfs.ext4 (e2fsprogs)");
        assert!(made.success());
        assert_eq!(ext4_label(&read_head(&img, 2048).unwrap()).as_deref(), Some("flotilla-root"));
        assert_eq!(ext4_label(&[0u8; 2048]), None);
    }
}
