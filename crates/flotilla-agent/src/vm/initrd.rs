//! `flotilla-agent build-initrd`: the builder of a machine's initramfs derivation. It writes
//! `$out/initrd`, an uncompressed newc cpio archive holding `/init` (this very binary, which
//! runs stage 1 when started as `/init`), the kernel modules stage 1 needs to find the root
//! and the platform's devices with their dependencies (from the kernel's `modules.dep`), and
//! their load order in `/etc/flotilla/modules`.
//!
//! The archive must be reproducible, since it is a store path: entries sorted by name, every
//! mtime 1, owner 0:0, inode numbers given in order; nothing of the build's clock or paths
//! leaks in. It never reads anything but the kernel package and this binary.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The modules every VM needs: the virtio bus, disk, network and serial ports, and the
/// filesystems of a NoCloud seed (iso9660, vfat with the character sets of its defaults:
/// codepage 437, iocharset ascii, utf8).
pub const BASE_MODULES: &[&str] =
    &["ext4", "virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "isofs", "vfat", "nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859_1"];

/// Where the archive lists the modules to load, in load order (dependencies first).
pub const MODULES_LIST: &str = "etc/flotilla/modules";

/// Why the initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    /// The derivation's environment lacks a variable.
    #[error("the environment variable {0} is not set: build-initrd runs as the builder of a flotilla initrd derivation, which sets kernel, kernelModules and out")]
    Env(&'static str),
    /// The kernel package is not laid out as expected.
    #[error("the kernel package {kernel}: {why}; boot.kernel must be a kernel package with lib/modules/<version>/modules.dep (as pkgs.linux has)")]
    Kernel {
        /// The kernel package.
        kernel: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A module named in boot.kernelModules (or a base one) is not in the kernel.
    #[error("the kernel {kernel} has no module {module} (neither in modules.dep nor built in); remove it from boot.kernelModules or pick a kernel that has it")]
    UnknownModule {
        /// The kernel package.
        kernel: PathBuf,
        /// The module name.
        module: String,
    },
    /// Reading or writing a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> InitrdError {
    let what = what.into();
    move |source| InitrdError::Io { what, source }
}

/// The builder's entry point: reads `kernel`, `kernelModules` and `out` from the environment.
pub fn main_from_env() -> Result<(), InitrdError> {
    let kernel = PathBuf::from(std::env::var_os("kernel").ok_or(InitrdError::Env("kernel"))?);
    let extra = std::env::var("kernelModules").unwrap_or_default();
    let out = PathBuf::from(std::env::var_os("out").ok_or(InitrdError::Env("out"))?);
    let init = std::fs::read("/proc/self/exe").map_err(io_err("cannot read the agent's own binary (/proc/self/exe)"))?;
    let extra: Vec<&str> = extra.split_whitespace().collect();
    std::fs::create_dir_all(&out).map_err(io_err(format!("cannot create {}", out.display())))?;
    let path = out.join("initrd");
    let file = std::fs::File::create(&path).map_err(io_err(format!("cannot create {}", path.display())))?;
    let mut w = io::BufWriter::new(file);
    write_initrd(&kernel, &extra, &init, &mut w)?;
    w.flush().map_err(io_err(format!("cannot write {}", path.display())))?;
    // The kernel image beside it: a machine's closure then holds the image and the modules
    // its initramfs needs, not the kernel package with every module (about 100 MiB more to
    // copy into each VM's store).
    let image = kernel.join("bzImage");
    std::fs::copy(&image, out.join("bzImage")).map(drop).map_err(io_err(format!("cannot copy the kernel image {}", image.display())))
}

/// The kernel's module directory `lib/modules/<version>` (there must be exactly one).
pub fn module_dir(kernel: &Path) -> Result<PathBuf, InitrdError> {
    let base = kernel.join("lib/modules");
    let bad = |why: String| InitrdError::Kernel { kernel: kernel.to_owned(), why };
    let versions: Vec<PathBuf> = std::fs::read_dir(&base)
        .map_err(|e| bad(format!("cannot read {}: {e}", base.display())))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    match versions.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(bad(format!("{} holds no kernel version", base.display()))),
        _ => Err(bad(format!("{} holds {} kernel versions, not one", base.display(), versions.len()))),
    }
}

/// A module's name as the kernel knows it: the file's name without `.ko`, `-` read as `_`.
fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let base = COMPRESSED.iter().find_map(|c| base.strip_suffix(c)).unwrap_or(base);
    base.strip_suffix(".ko").unwrap_or(base).replace('-', "_")
}

/// The suffixes of compressed modules (nixpkgs' kernels ship `.ko.xz`): stage 1 hands them to
/// the kernel as they are, to decompress (`MODULE_INIT_COMPRESSED_FILE`).
pub const COMPRESSED: &[&str] = &[".xz", ".zst", ".gz"];

/// The modules to load for `wanted`, in load order (each after its dependencies), as paths
/// relative to the module directory. Built-in modules need nothing; an unknown one is an error
/// (`kernel` names the package in it).
pub fn select_modules(modules_dep: &str, builtin: &str, wanted: &[&str], kernel: &Path) -> Result<Vec<String>, InitrdError> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((file, rest)) = line.split_once(':') else { continue };
        deps.insert(module_name(file), (file.to_owned(), rest.split_whitespace().map(str::to_owned).collect()));
    }
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let by_file: BTreeMap<&str, &str> = deps.iter().map(|(name, (file, _))| (file.as_str(), name.as_str())).collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(name: &str, deps: &BTreeMap<String, (String, Vec<String>)>, by_file: &BTreeMap<&str, &str>, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        let Some((file, needs)) = deps.get(name) else { return };
        // modules.dep lists every dependency, the deepest last: modprobe loads from the end.
        for dep in needs.iter().rev() {
            if let Some(dep_name) = by_file.get(dep.as_str()) {
                visit(dep_name, deps, by_file, seen, order);
            }
        }
        order.push(file.clone());
    }
    for want in wanted {
        let name = module_name(want);
        if deps.contains_key(&name) {
            visit(&name, &deps, &by_file, &mut seen, &mut order);
        } else if !builtin.contains(&name) {
            return Err(InitrdError::UnknownModule { kernel: kernel.to_owned(), module: (*want).to_owned() });
        }
    }
    Ok(order)
}

/// Writes the initramfs of `kernel` with the base modules and `extra`, `/init` being `init`.
pub fn write_initrd(kernel: &Path, extra: &[&str], init: &[u8], out: &mut impl Write) -> Result<(), InitrdError> {
    let dir = module_dir(kernel)?;
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).map_err(|e| InitrdError::Kernel { kernel: kernel.to_owned(), why: format!("cannot read {}: {e}", dir.join(name).display()) });
    let dep = read("modules.dep")?;
    let builtin = read("modules.builtin").unwrap_or_default();
    let wanted: Vec<&str> = BASE_MODULES.iter().copied().chain(extra.iter().copied()).collect();
    let modules = select_modules(&dep, &builtin, &wanted, kernel)?;
    let version = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let mut archive = Archive::default();
    for d in ["dev", "etc", "etc/flotilla", "lib", "lib/modules", "newroot", "proc", "sys"] {
        archive.dir(d);
    }
    archive.node("dev/console", 0o020600, (5, 1));
    archive.file("init", 0o755, init.to_vec());
    let mut list = String::new();
    for module in &modules {
        let path = format!("lib/modules/{version}/{module}");
        let mut parent = Path::new(&path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            archive.dir(&p.to_string_lossy());
            parent = p.parent();
        }
        let bytes = std::fs::read(dir.join(module)).map_err(io_err(format!("cannot read {}", dir.join(module).display())))?;
        archive.file(&path, 0o644, bytes);
        list.push_str(&format!("/{path}\n"));
    }
    archive.file(MODULES_LIST, 0o644, list.into_bytes());
    archive.write(out).map_err(io_err("cannot write the initrd"))
}

/// One entry of a newc archive.
struct Entry {
    mode: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

/// A newc cpio archive in the making: entries by name, so the output is sorted whatever the
/// order they were added in (a parent sorts before its children).
#[derive(Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    /// Adds a directory (mode 0755).
    pub fn dir(&mut self, name: &str) {
        self.entries.entry(name.to_owned()).or_insert(Entry { mode: 0o040755, rdev: (0, 0), data: Vec::new() });
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: Vec<u8>) {
        self.entries.insert(name.to_owned(), Entry { mode: 0o100000 | perm, rdev: (0, 0), data });
    }

    /// Adds a device node (`mode` with its type bits) with its major and minor numbers.
    pub fn node(&mut self, name: &str, mode: u32, rdev: (u32, u32)) {
        self.entries.insert(name.to_owned(), Entry { mode, rdev, data: Vec::new() });
    }

    /// Writes the archive and its trailer.
    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let mut ino = 0;
        for (name, e) in &self.entries {
            ino += 1;
            let nlink = if e.mode & 0o170000 == 0o040000 { 2 } else { 1 };
            header(out, ino, e.mode, nlink, e.data.len(), e.rdev, name)?;
            out.write_all(&e.data)?;
            pad(out, e.data.len())?;
        }
        header(out, 0, 0, 1, 0, (0, 0), "TRAILER!!!")
    }
}

fn header(out: &mut impl Write, ino: u32, mode: u32, nlink: u32, size: usize, rdev: (u32, u32), name: &str) -> io::Result<()> {
    let size = u32::try_from(size).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB, more than cpio holds")))?;
    let mtime = if name == "TRAILER!!!" { 0 } else { 1 };
    let fields = [ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
    let mut h = String::with_capacity(110);
    h.push_str("070701");
    for f in fields {
        h.push_str(&format!("{f:08x}"));
    }
    out.write_all(h.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, 110 + name.len() + 1)
}

fn pad(out: &mut impl Write, len: usize) -> io::Result<()> {
    out.write_all(&[0u8; 3][..(4 - len % 4) % 4])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake kernel package: a modules.dep with a chain and the module files.
    fn fake_kernel() -> tempfile::TempDir {
        let k = tempfile::tempdir().unwrap();
        let dir = k.path().join("lib/modules/6.1.0-test");
        std::fs::create_dir_all(&dir).unwrap();
        let mut dep = String::new();
        for (file, needs) in [
            ("kernel/drivers/virtio/virtio.ko", ""),
            ("kernel/drivers/virtio/virtio_ring.ko", ""),
            ("kernel/drivers/virtio/virtio_pci.ko", "kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko"),
            ("kernel/drivers/block/virtio_blk.ko", "kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko"),
            ("kernel/drivers/net/failover.ko", ""),
            ("kernel/drivers/net/net_failover.ko", "kernel/drivers/net/failover.ko"),
            ("kernel/drivers/net/virtio_net.ko", "kernel/drivers/net/net_failover.ko kernel/drivers/net/failover.ko kernel/drivers/virtio/virtio.ko"),
            ("kernel/drivers/char/virtio_console.ko", "kernel/drivers/virtio/virtio.ko"),
            ("kernel/drivers/cdrom/cdrom.ko", ""),
            ("kernel/fs/isofs/isofs.ko", "kernel/drivers/cdrom/cdrom.ko"),
            ("kernel/fs/fat/fat.ko", ""),
            ("kernel/fs/fat/vfat.ko", "kernel/fs/fat/fat.ko"),
            ("kernel/fs/nls/nls_cp437.ko", ""),
            ("kernel/fs/nls/nls_ascii.ko", ""),
            ("kernel/fs/nls/nls_iso8859-1.ko", ""),
            ("kernel/fs/nls/nls_utf8.ko", ""),
            ("kernel/fs/nls/nls_koi8-r.ko", ""),
        ] {
            dep.push_str(&format!("{file}: {needs}\n"));
            let path = dir.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, format!("module {file}")).unwrap();
        }
        std::fs::write(dir.join("modules.dep"), dep).unwrap();
        std::fs::write(dir.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        k
    }

    fn build(kernel: &Path, extra: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        write_initrd(kernel, extra, b"#!init", &mut out).unwrap();
        out
    }

    #[test]
    fn module_names_drop_the_compression_suffix_nixpkgs_kernels_have() {
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko.xz"), "ext4");
        assert_eq!(module_name("kernel/drivers/virtio/virtio-pci.ko.zst"), "virtio_pci");
        assert_eq!(module_name("kernel/fs/fat/vfat.ko"), "vfat");
    }

    #[test]
    fn initrd_is_read_back_by_cpio_and_lists_its_modules() {
        let k = fake_kernel();
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("initrd");
        std::fs::write(&archive, build(k.path(), &["ext4"])).unwrap();
        let listed = std::process::Command::new("cpio").arg("-t").arg("-F").arg(&archive).output().expect("cpio (Debian's cpio package; scripts/install-deps.sh installs it)");
        assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
        let names = String::from_utf8_lossy(&listed.stdout);
        for want in ["init", "dev/console", "etc/flotilla/modules", "lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_pci.ko", "lib/modules/6.1.0-test/kernel/fs/nls/nls_iso8859-1.ko"] {
            assert!(names.lines().any(|l| l == want), "{want} missing from:\n{names}");
        }
        assert!(!names.contains("koi8"), "a module nobody asked for is in:\n{names}");
        // Extracted, the files hold what was put in.
        let x = dir.path().join("x");
        std::fs::create_dir(&x).unwrap();
        let extracted = std::process::Command::new("cpio").args(["-i", "-d", "--quiet", "-F"]).arg(&archive).current_dir(&x).status().unwrap();
        assert!(extracted.success());
        assert_eq!(std::fs::read(x.join("init")).unwrap(), b"#!init");
        let list = std::fs::read_to_string(x.join(MODULES_LIST)).unwrap();
        assert!(list.lines().all(|l| x.join(l.trim_start_matches('/')).is_file()), "{list}");
    }

    #[test]
    fn initrd_is_reproducible() {
        let k = fake_kernel();
        assert_eq!(build(k.path(), &["virtio_blk"]), build(k.path(), &["virtio_blk"]));
    }

    #[test]
    fn initrd_modules_load_after_their_dependencies() {
        let k = fake_kernel();
        let dep = std::fs::read_to_string(k.path().join("lib/modules/6.1.0-test/modules.dep")).unwrap();
        let order = select_modules(&dep, "", &["virtio_net", "vfat", "isofs"], k.path()).unwrap();
        let at = |m: &str| order.iter().position(|f| f.ends_with(&format!("/{m}.ko"))).unwrap_or_else(|| panic!("{m} not in {order:?}"));
        assert!(at("failover") < at("net_failover") && at("net_failover") < at("virtio_net"), "{order:?}");
        assert!(at("virtio") < at("virtio_net") && at("fat") < at("vfat") && at("cdrom") < at("isofs"), "{order:?}");
        assert_eq!(order.len(), 8, "each module once: {order:?}");
    }

    #[test]
    fn initrd_refuses_a_module_the_kernel_lacks() {
        let k = fake_kernel();
        let mut out = Vec::new();
        let e = write_initrd(k.path(), &["no_such_mod"], b"", &mut out).unwrap_err().to_string();
        assert!(e.contains("no module no_such_mod") && e.contains("boot.kernelModules"), "{e}");
    }
}
