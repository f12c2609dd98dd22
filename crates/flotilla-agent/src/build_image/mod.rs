//! `flotilla-agent build-image`: the builder of a machine's disk image derivation
//! (`images.<machine>.<format>` in eval.nix). It runs inside a Nix build and writes nothing
//! outside `$out` and its build directory.
//!
//! The image is an ext4 filesystem labelled `flotilla-root` holding what a machine the agent
//! manages holds after its first deploy: the toplevel's closure in /nix/store, received
//! through the agent's own [`MachineRoot::receive`] (so the registry under
//! /nix/var/flotilla/db is exactly what a deploy writes, NAR hashes and all), generation 1
//! switched in as activation links it, and empty mount points. `mkfs.ext4 -d` makes the
//! filesystem from the staged tree without root or a loop device; `qemu-img convert` makes
//! the other formats; `gce` is `disk.raw` in a `.tar.gz`, as that cloud's image import wants.
//!
//! Building twice gives the same bytes. What makes that so, because each was seen to differ:
//! - the filesystem UUID and directory hash seed are derived from the toplevel's hash;
//! - `E2FSPROGS_FAKE_TIME` fixes the superblock's times, `MKE2FS_CONFIG` points nowhere so
//!   the host's /etc/mke2fs.conf (outside a sandbox) cannot change the defaults;
//! - every staged entry has mtime 1 (the store's own time), and the ctimes, atimes and owners
//!   (the build user) that `mke2fs -d` copies from the staged files are rewritten afterwards
//!   ([`ext4`]): every file in the image is root's;
//! - qemu's vdi writer puts two random UUIDs in the header (image, last snapshot) and its
//!   vmdk writer a random content id (`CID=`) in the descriptor: both are replaced by values
//!   derived from the toplevel's hash (the vdi header and the vmdk descriptor carry no
//!   checksum over them);
//! - the gce tar has one member with mtime 0, owner 0, and is compressed from a pipe
//!   with no name, its header's time zeroed.
//!
//! What it does not control: `mke2fs -d` numbers inodes in the order the build directory's
//! filesystem lists the staged directories, so builds on two hosts whose build directories
//! lie on different kinds of filesystem may differ in inode numbers.

mod ext4;
pub mod oci_root;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{symlink, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_protocol::PathInfo;
use flotilla_store::{NarHash, StorePath};

use crate::machine::MachineRoot;

/// The ext4 label the initramfs finds the root by (`root=LABEL=flotilla-root`).
pub const ROOT_LABEL: &str = "flotilla-root";

/// The time every file in the image has (the store's own: Nix sets mtime 1).
const FIXED_TIME: u32 = 1;

/// Empty directories a booted system mounts things on or expects, with their modes.
pub(crate) const MOUNT_POINTS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("etc", 0o755),
    ("var", 0o755),
    ("root", 0o700),
];

/// A disk image format `flotilla image` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The filesystem itself, sparse.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
    /// VirtualBox.
    Vdi,
    /// VMware.
    Vmdk,
    /// `disk.raw` in a `.tar.gz`, for Google Compute Engine's image import.
    Gce,
}

impl Format {
    /// Parses a format name as eval.nix passes it.
    pub fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vdi" => Format::Vdi,
            "vmdk" => Format::Vmdk,
            "gce" => Format::Gce,
            _ => return None,
        })
    }

    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vdi => "vdi",
            Format::Vmdk => "vmdk",
            Format::Gce => "gce",
        }
    }

    /// The image file's extension.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "img",
            Format::Gce => "tar.gz",
            other => other.name(),
        }
    }
}

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The derivation was not made by this flotilla's eval.nix.
    #[error("{0}")]
    Setup(String),
    /// Filesystem trouble in the build.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A tool (mkfs.ext4, qemu-img, gzip) failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The program.
        tool: String,
        /// Its exit status.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// Receiving the closure into the staged root failed.
    #[error("cannot stage the closure: {0}")]
    Receive(#[from] crate::machine::ReceiveError),
}

pub(crate) fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io { what, path: path.to_owned(), source }
}

/// What the builder is given (its derivation's environment).
#[derive(Debug, Clone)]
pub struct Request {
    /// The format to make.
    pub format: Format,
    /// The machine's toplevel.
    pub toplevel: StorePath,
    /// The closure's paths and their references, as exportReferencesGraph lists them.
    pub closure: Vec<(StorePath, Vec<StorePath>)>,
    /// The e2fsprogs package (`bin/mkfs.ext4`).
    pub e2fsprogs: PathBuf,
    /// The qemu-utils package (`bin/qemu-img`).
    pub qemu_utils: PathBuf,
    /// The gzip package (`bin/gzip`), for `gce`.
    pub gzip: Option<PathBuf>,
    /// The filesystem's size in MiB; `None` computes it.
    pub size_mib: Option<u64>,
    /// `boot.kernelParams`, joined by spaces.
    pub kernel_params: String,
    /// Where scratch files go (the build directory).
    pub scratch: PathBuf,
    /// `$out`.
    pub out: PathBuf,
}

/// Parses exportReferencesGraph's file: per path, its line, its deriver's, the number of
/// references, then one line each.
pub fn parse_closure(text: &str) -> Result<Vec<(StorePath, Vec<StorePath>)>, String> {
    let mut lines = text.lines();
    let mut out = Vec::new();
    while let Some(path) = lines.next() {
        if path.is_empty() {
            continue;
        }
        let path = StorePath::parse(path).map_err(|e| format!("{path}: {e}"))?;
        let _deriver = lines.next().ok_or("the file ends after a path")?;
        let n: usize = lines.next().and_then(|n| n.parse().ok()).ok_or("a path has no reference count")?;
        let refs = (0..n)
            .map(|_| lines.next().ok_or_else(|| "the file ends in a path's references".to_owned()).and_then(|r| StorePath::parse(r).map_err(|e| format!("{r}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        out.push((path, refs));
    }
    Ok(out)
}

/// The closure ordered references first (each path after every path it refers to).
fn references_first(closure: &[(StorePath, Vec<StorePath>)]) -> Vec<(StorePath, Vec<StorePath>)> {
    let by_path: BTreeMap<&StorePath, &Vec<StorePath>> = closure.iter().map(|(p, r)| (p, r)).collect();
    let mut done: BTreeSet<&StorePath> = BTreeSet::new();
    let mut out = Vec::new();
    fn visit<'a>(p: &'a StorePath, by_path: &BTreeMap<&'a StorePath, &'a Vec<StorePath>>, done: &mut BTreeSet<&'a StorePath>, out: &mut Vec<(StorePath, Vec<StorePath>)>) {
        if !done.insert(p) {
            return;
        }
        let Some(refs) = by_path.get(p) else { return };
        for r in refs.iter() {
            if r != p {
                visit(r, by_path, done, out);
            }
        }
        out.push((p.clone(), (*refs).clone()));
    }
    for p in by_path.keys() {
        visit(p, &by_path, &mut done, &mut out);
    }
    out
}

/// A UUID (version 4 form) derived from the toplevel's hash and a purpose, so each image of
/// one toplevel has the same ones and two toplevels' images never share them.
pub fn derived_uuid(toplevel: &StorePath, purpose: &str) -> [u8; 16] {
    let digest = NarHash::digest(format!("flotilla image {purpose} {}", toplevel.hash_part()).as_bytes());
    let mut u = [0u8; 16];
    u.copy_from_slice(&digest.as_bytes()[..16]);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// The image file's name: the machine's toplevel hash in it, so a changed configuration
/// never reuses an old image's name.
pub fn file_name(toplevel: &StorePath, format: Format) -> String {
    let machine = toplevel.name().strip_prefix("flotilla-system-").unwrap_or(toplevel.name());
    format!("{machine}-{}.{}", toplevel.hash_part(), format.extension())
}

/// Stages the machine's root at `root`: the closure received as a deploy receives it,
/// generation 1, mount points; every entry's times fixed.
pub fn stage(root_dir: &Path, toplevel: &StorePath, closure: &[(StorePath, Vec<StorePath>)]) -> Result<(), ImageError> {
    let root = MachineRoot::new(root_dir);
    root.prepare().map_err(io_err("cannot prepare", root_dir))?;
    let ordered = references_first(closure);
    let mut infos = Vec::with_capacity(ordered.len());
    for (path, references) in &ordered {
        let host = PathBuf::from(path.to_absolute());
        let digest = flotilla_store::hash_path(&host).map_err(|e| ImageError::Io { what: "cannot read", path: host.clone(), source: io::Error::other(e.to_string()) })?;
        infos.push(PathInfo { path: path.clone(), references: references.clone(), nar_hash: digest.hash, nar_size: digest.size });
    }
    // The NARs stream through a socket pair into the agent's receive, exactly as from a
    // deployer.
    let (mut reader, mut writer) = std::os::unix::net::UnixStream::pair().map_err(io_err("cannot make a socket pair in", root_dir))?;
    let sender_infos = infos.clone();
    let sender = std::thread::spawn(move || -> Result<(), String> {
        for info in &sender_infos {
            flotilla_store::encode_path(Path::new(&info.path.to_absolute()), &mut writer).map_err(|e| format!("cannot read {}: {e}", info.path))?;
        }
        let _ = writer.shutdown(std::net::Shutdown::Write);
        Ok(())
    });
    let no_nix = |_: &[String], _: &Path| -> io::Result<(bool, String)> { Err(io::Error::other("a staged image root registers with no Nix")) };
    let received = root.receive(&infos, &mut reader, &no_nix);
    // On an error the sender must not block on a full socket.
    let _ = reader.shutdown(std::net::Shutdown::Both);
    drop(reader);
    let sent = sender.join().unwrap_or_else(|_| Err("the NAR sender panicked".into()));
    received?;
    sent.map_err(ImageError::Setup)?;

    // Generation 1, linked as activation links a new one.
    let profiles = root.profiles_dir();
    let link = profiles.join("system-1-link");
    symlink(toplevel.to_absolute(), &link).map_err(io_err("cannot link", &link))?;
    let system = profiles.join("system");
    symlink("system-1-link", &system).map_err(io_err("cannot link", &system))?;

    for (dir, mode) in MOUNT_POINTS {
        let d = root_dir.join(dir);
        fs::create_dir_all(&d).map_err(io_err("cannot create", &d))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(*mode)).map_err(io_err("cannot set the mode of", &d))?;
    }
    fix_times(root_dir)
}

/// Sets atime and mtime of everything under `dir` (links themselves, not their targets).
fn fix_times(dir: &Path) -> Result<(), ImageError> {
    let mut todo = vec![dir.to_owned()];
    while let Some(p) = todo.pop() {
        let meta = fs::symlink_metadata(&p).map_err(io_err("cannot stat", &p))?;
        if meta.is_dir() {
            for e in fs::read_dir(&p).map_err(io_err("cannot list", &p))? {
                todo.push(e.map_err(io_err("cannot list", &p))?.path());
            }
        }
        set_times(&p).map_err(io_err("cannot set the times of", &p))?;
    }
    Ok(())
}

#[allow(unsafe_code)]
fn set_times(p: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let t = libc::timespec { tv_sec: libc::time_t::from(FIXED_TIME as i32), tv_nsec: 0 };
    let times = [t, t];
    // SAFETY: `c` is a NUL-terminated path and `times` two valid timespecs; AT_SYMLINK_NOFOLLOW
    // sets a link's own times.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The staged tree's size on an ext4 with 4 KiB blocks, and its number of entries.
fn usage(dir: &Path) -> Result<(u64, u64), ImageError> {
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut todo = vec![dir.to_owned()];
    while let Some(p) = todo.pop() {
        let meta = fs::symlink_metadata(&p).map_err(io_err("cannot stat", &p))?;
        entries += 1;
        if meta.is_dir() {
            bytes += 4096;
            for e in fs::read_dir(&p).map_err(io_err("cannot list", &p))? {
                todo.push(e.map_err(io_err("cannot list", &p))?.path());
            }
        } else if meta.is_file() || meta.len() > 59 {
            bytes += meta.len().div_ceil(4096) * 4096;
        }
    }
    Ok((bytes, entries))
}

/// The filesystem's size in MiB: what the closure takes plus 30 %, plus 64 MiB (the journal
/// and room to boot); the VM grows it to its disk at boot.
pub fn computed_size_mib(used_bytes: u64) -> u64 {
    (used_bytes * 13 / 10).div_ceil(1 << 20) + 64
}

fn run(tool: &Path, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Result<(), ImageError> {
    let mut cmd = Command::new(tool);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().map_err(io_err("cannot run", tool))?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            tool: tool.display().to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Builds the image into `req.out`; returns the image file's path.
pub fn build(req: &Request) -> Result<PathBuf, ImageError> {
    let root = req.scratch.join("root");
    stage(&root, &req.toplevel, &req.closure)?;
    let (used, entries) = usage(&root)?;
    let size_mib = req.size_mib.unwrap_or_else(|| computed_size_mib(used));
    let needed_mib = used.div_ceil(1 << 20);
    if size_mib < needed_mib {
        return Err(ImageError::Setup(format!(
            "`image.size` is {size_mib} MiB, less than the {needed_mib} MiB the system's closure takes; raise it, or unset it to have it computed ({} MiB here)",
            computed_size_mib(used)
        )));
    }

    let raw = req.scratch.join("disk.raw");
    let file = File::create(&raw).map_err(io_err("cannot create", &raw))?;
    file.set_len(size_mib << 20).map_err(io_err("cannot size", &raw))?;
    drop(file);
    let uuid = uuid_string(&derived_uuid(&req.toplevel, "filesystem"));
    let seed = uuid_string(&derived_uuid(&req.toplevel, "hash-seed"));
    // Inodes for every staged entry with room to grow, at least mke2fs's own default.
    let inodes = (entries * 13 / 10 + 1024).max((size_mib << 20) / 16384);
    let mkfs = req.e2fsprogs.join("bin/mkfs.ext4");
    let args: Vec<std::ffi::OsString> = vec![
        "-q".into(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-b".into(),
        "4096".into(),
        "-N".into(),
        inodes.to_string().into(),
        "-L".into(),
        ROOT_LABEL.into(),
        "-U".into(),
        uuid.into(),
        "-E".into(),
        format!("hash_seed={seed},root_owner=0:0,lazy_itable_init=0").into(),
        "-d".into(),
        root.clone().into(),
        raw.clone().into(),
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let fake_time = FIXED_TIME.to_string();
    run(&mkfs, &args, &[("E2FSPROGS_FAKE_TIME", &fake_time), ("MKE2FS_CONFIG", "/nonexistent/mke2fs.conf")])?;
    let f = fs::OpenOptions::new().read(true).write(true).open(&raw).map_err(io_err("cannot open", &raw))?;
    ext4::normalise_inodes(&f, FIXED_TIME).map_err(io_err("cannot fix the inode times of", &raw))?;
    f.sync_all().map_err(io_err("cannot write", &raw))?;
    drop(f);

    fs::create_dir_all(&req.out).map_err(io_err("cannot create", &req.out))?;
    let image = req.out.join(file_name(&req.toplevel, req.format));
    let qemu_img = req.qemu_utils.join("bin/qemu-img");
    match req.format {
        Format::Raw => {
            // Sparse, as `qemu-img convert` writes it (a plain copy would fill the holes).
            convert(&qemu_img, &raw, "raw", &image)?;
        }
        Format::Qcow2 | Format::Vdi | Format::Vmdk => {
            convert(&qemu_img, &raw, req.format.name(), &image)?;
            match req.format {
                Format::Vdi => fix_vdi(&image, &req.toplevel)?,
                Format::Vmdk => fix_vmdk(&image, &req.toplevel)?,
                _ => {}
            }
        }
        Format::Gce => {
            let gzip = req.gzip.as_ref().ok_or_else(|| ImageError::Setup("a gce image needs $gzip (the package set's gzip); eval.nix passes it".into()))?;
            let tar = req.scratch.join("disk.tar");
            write_tar(&raw, "disk.raw", &tar)?;
            gzip_file(&gzip.join("bin/gzip"), &tar, &image)?;
        }
    }
    write_info(req, &image)?;
    Ok(image)
}

fn convert(qemu_img: &Path, raw: &Path, format: &str, image: &Path) -> Result<(), ImageError> {
    run(qemu_img, &["convert".as_ref(), "-f".as_ref(), "raw".as_ref(), "-O".as_ref(), format.as_ref(), raw.as_os_str(), image.as_os_str()], &[])
}

/// qemu's vdi header: `uuid_image` at 0x188 and `uuid_last_snap` at 0x198, random as qemu
/// writes them.
fn fix_vdi(image: &Path, toplevel: &StorePath) -> Result<(), ImageError> {
    let f = fs::OpenOptions::new().read(true).write(true).open(image).map_err(io_err("cannot open", image))?;
    let mut magic = [0u8; 4];
    f.read_exact_at(&mut magic, 0x40).map_err(io_err("cannot read", image))?;
    if u32::from_le_bytes(magic) != 0xbeda_107f {
        return Err(ImageError::Setup(format!("{} has no VDI signature where qemu-img writes it", image.display())));
    }
    f.write_all_at(&derived_uuid(toplevel, "vdi-image"), 0x188).map_err(io_err("cannot write", image))?;
    f.write_all_at(&derived_uuid(toplevel, "vdi-last-snapshot"), 0x198).map_err(io_err("cannot write", image))?;
    Ok(())
}

/// qemu's vmdk descriptor (at sector 1 of a monolithicSparse file): `CID=<8 hex>`, random as
/// qemu writes it, replaced in place by as many hex digits from the toplevel's hash.
fn fix_vmdk(image: &Path, toplevel: &StorePath) -> Result<(), ImageError> {
    let f = fs::OpenOptions::new().read(true).write(true).open(image).map_err(io_err("cannot open", image))?;
    let no_cid = || ImageError::Setup(format!("{} has no `CID=` line in the descriptor qemu-img writes", image.display()));
    // The sparse extent header names the descriptor's place and size, in sectors.
    let mut header = [0u8; 44];
    f.read_exact_at(&mut header, 0).map_err(io_err("cannot read", image))?;
    let sectors = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let (offset, size) = (sectors(28) * 512, sectors(36) * 512);
    if &header[..4] != b"KDMV" || offset == 0 || size == 0 || size > 1 << 20 {
        return Err(no_cid());
    }
    let mut desc = vec![0u8; size as usize];
    f.read_exact_at(&mut desc, offset).map_err(io_err("cannot read", image))?;
    let text_len = desc.iter().position(|b| *b == 0).unwrap_or(desc.len());
    let text = &desc[..text_len];
    // qemu prints the CID with `%x`: 1 to 8 digits, as its random value has leading zeros.
    let start = text.windows(5).position(|w| w == b"\nCID=").map(|i| i + 5).ok_or_else(no_cid)?;
    let end = text[start..].iter().position(|b| *b == b'\n').map(|e| start + e).ok_or_else(no_cid)?;
    let u = derived_uuid(toplevel, "vmdk-cid");
    let cid = format!("{:02x}{:02x}{:02x}{:02x}", u[0], u[1], u[2], u[3]);
    let mut fixed = Vec::with_capacity(desc.len());
    fixed.extend_from_slice(&text[..start]);
    fixed.extend_from_slice(cid.as_bytes());
    fixed.extend_from_slice(&text[end..]);
    if fixed.len() > desc.len() {
        return Err(ImageError::Setup(format!("{}: the descriptor has no room for an 8-digit CID", image.display())));
    }
    // The rest of the descriptor's sectors are zeros, as qemu leaves them.
    fixed.resize(desc.len(), 0);
    f.write_all_at(&fixed, offset).map_err(io_err("cannot write", image))?;
    Ok(())
}

/// A ustar archive of one file `name` (mode 0644, owner 0, mtime 0).
fn write_tar(src: &Path, name: &str, dest: &Path) -> Result<(), ImageError> {
    let mut input = File::open(src).map_err(io_err("cannot open", src))?;
    let size = input.metadata().map_err(io_err("cannot stat", src))?.size();
    let mut header = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
    put(&mut header, 0, name.as_bytes());
    put(&mut header, 100, b"0000644\0");
    put(&mut header, 108, b"0000000\0");
    put(&mut header, 116, b"0000000\0");
    put(&mut header, 124, format!("{size:011o}\0").as_bytes());
    put(&mut header, 136, b"00000000000\0");
    put(&mut header, 156, b"0");
    put(&mut header, 257, b"ustar\0");
    put(&mut header, 263, b"00");
    put(&mut header, 148, b"        ");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    put(&mut header, 148, format!("{sum:06o}\0 ").as_bytes());
    let out = File::create(dest).map_err(io_err("cannot create", dest))?;
    let mut out = io::BufWriter::new(out);
    out.write_all(&header).map_err(io_err("cannot write", dest))?;
    let copied = io::copy(&mut input, &mut out).map_err(io_err("cannot write", dest))?;
    let pad = (512 - copied % 512) % 512;
    out.write_all(&vec![0u8; pad as usize + 1024]).map_err(io_err("cannot write", dest))?;
    out.flush().map_err(io_err("cannot write", dest))?;
    Ok(())
}

fn gzip_file(gzip: &Path, src: &Path, dest: &Path) -> Result<(), ImageError> {
    let input = File::open(src).map_err(io_err("cannot open", src))?;
    let output = File::create(dest).map_err(io_err("cannot create", dest))?;
    // From a pipe, gzip stores no file name; busybox's knows no `-n`, so the header's time is
    // zeroed here rather than asked of whichever gzip the package set has.
    let out = Command::new(gzip).arg("-c").stdin(input).stdout(output).output().map_err(io_err("cannot run", gzip))?;
    if !out.status.success() {
        return Err(ImageError::Tool { tool: gzip.display().to_string(), status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    let f = fs::OpenOptions::new().read(true).write(true).open(dest).map_err(io_err("cannot open", dest))?;
    let mut header = [0u8; 4];
    f.read_exact_at(&mut header, 0).map_err(io_err("cannot read", dest))?;
    if header[..3] != [0x1f, 0x8b, 8] || header[3] & 0x02 != 0 {
        return Err(ImageError::Setup(format!("{} is not a plain gzip stream (or its header has a checksum)", gzip.display())));
    }
    f.write_all_at(&[0u8; 4], 4).map_err(io_err("cannot write", dest))?;
    Ok(())
}

/// `$out/nix-support/image.json`: what the image is and how to boot it.
fn write_info(req: &Request, image: &Path) -> Result<(), ImageError> {
    let top = req.toplevel.to_absolute();
    let link = |name: &str| fs::read_link(Path::new(&top).join(name)).ok().map(|p| p.display().to_string());
    let mut cmdline = format!("console=ttyS0 root=LABEL={ROOT_LABEL}");
    if !req.kernel_params.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&req.kernel_params);
    }
    let info = serde_json::json!({
        "format": req.format.name(),
        "file": image.file_name().map(|n| n.to_string_lossy().into_owned()),
        "toplevel": top,
        "kernel": link("kernel"),
        "initrd": link("initrd"),
        "kernelParams": cmdline,
    });
    let dir = req.out.join("nix-support");
    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let path = dir.join("image.json");
    fs::write(&path, serde_json::to_string_pretty(&info).expect("serialises") + "\n").map_err(io_err("cannot write", &path))
}

/// Entry point inside a Nix build: reads the derivation's environment (see eval.nix).
pub fn main_from_env() -> Result<(), ImageError> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| ImageError::Setup(format!("${name} is not set: `flotilla-agent build-image` runs as the builder of a flotilla image derivation")))
    };
    let format = var("format")?;
    let format = Format::parse(&format).ok_or_else(|| ImageError::Setup(format!("$format is {format:?}; it is one of raw, qcow2, vdi, vmdk, gce")))?;
    let toplevel = var("toplevel")?;
    let toplevel = StorePath::parse(&toplevel).map_err(|e| ImageError::Setup(format!("$toplevel {toplevel}: {e}")))?;
    let scratch = std::env::current_dir().map_err(io_err("cannot find", Path::new(".")))?;
    let closure_file = scratch.join("closure");
    let text = fs::read_to_string(&closure_file).map_err(io_err("cannot read", &closure_file))?;
    let closure = parse_closure(&text).map_err(|e| ImageError::Setup(format!("{}: {e}", closure_file.display())))?;
    let size = var("size")?;
    let size_mib = if size.is_empty() {
        None
    } else {
        Some(size.parse().map_err(|_| ImageError::Setup(format!("$size is {size:?}, not a number of MiB")))?)
    };
    let req = Request {
        format,
        toplevel,
        closure,
        e2fsprogs: var("e2fsprogs")?.into(),
        qemu_utils: var("qemuUtils")?.into(),
        gzip: std::env::var("gzip").ok().filter(|g| !g.is_empty()).map(PathBuf::from),
        size_mib,
        kernel_params: std::env::var("kernelParams").unwrap_or_default(),
        scratch,
        out: var("out")?.into(),
    };
    build(&req)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(s: &str) -> StorePath {
        StorePath::parse(&format!("/nix/store/{s}")).unwrap()
    }

    /// A vmdk as qemu-img writes it, its CID line then set to `cid` (qemu prints its random
    /// CID with `%x`, so one in sixteen has fewer than 8 digits).
    fn vmdk_with_cid(dir: &Path, name: &str, cid: &str) -> PathBuf {
        // The descriptor names its own file: the same name, in a directory of its own.
        let dir = dir.join(name);
        fs::create_dir(&dir).unwrap();
        let raw = dir.join("disk.raw");
        File::create(&raw).unwrap().set_len(1 << 20).unwrap();
        let image = dir.join("disk.vmdk");
        let out = Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "vmdk"]).arg(&raw).arg(&image).output();
        let out = out.expect("prerequisite missing: qemu-img (Debian: qemu-utils); run scripts/install-deps.sh");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // In place: the descriptor's text is followed by zeros up to its sectors' end.
        let mut bytes = fs::read(&image).unwrap();
        let at = bytes.windows(5).position(|w| w == b"\nCID=").unwrap() + 5;
        let end = at + bytes[at..].iter().position(|b| *b == b'\n').unwrap();
        let text_end = at + bytes[at..].iter().position(|b| *b == 0).unwrap();
        let mut text = cid.as_bytes().to_vec();
        text.extend_from_slice(&bytes[end..text_end]);
        assert!(at + text.len() <= text_end + 8, "no room in the descriptor");
        bytes[at..text_end.max(at + text.len())].fill(0);
        bytes[at..at + text.len()].copy_from_slice(&text);
        fs::write(&image, &bytes).unwrap();
        image
    }

    #[test]
    fn a_vmdk_cid_qemu_printed_short_is_fixed_to_the_same_bytes_as_a_long_one() {
        let dir = tempfile::tempdir().unwrap();
        let top = sp("00000000000000000000000000000000-flotilla-system-vm1");
        let short = vmdk_with_cid(dir.path(), "short", "9abcdef");
        let long = vmdk_with_cid(dir.path(), "long", "19abcdef");
        fix_vmdk(&short, &top).unwrap();
        fix_vmdk(&long, &top).unwrap();
        let (a, b) = (fs::read(&short).unwrap(), fs::read(&long).unwrap());
        assert!(a == b, "the two fixed images differ");
        let check = Command::new("qemu-img").args(["check", "-f", "vmdk"]).arg(&short).output().unwrap();
        assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
        let text = String::from_utf8_lossy(&a);
        let cid = text.split("\nCID=").nth(1).and_then(|r| r.split('\n').next()).unwrap();
        assert_eq!(cid.len(), 8, "{cid}");
    }

    #[test]
    fn closure_file_parses_and_orders_references_first() {
        let a = "00000000000000000000000000000000-a";
        let b = "11111111111111111111111111111111-b";
        let text = format!("/nix/store/{a}\n\n2\n/nix/store/{a}\n/nix/store/{b}\n/nix/store/{b}\n/nix/store/x.drv\n0\n");
        let c = parse_closure(&text).unwrap();
        assert_eq!(c, vec![(sp(a), vec![sp(a), sp(b)]), (sp(b), vec![])]);
        let ordered: Vec<StorePath> = references_first(&c).into_iter().map(|(p, _)| p).collect();
        assert_eq!(ordered, vec![sp(b), sp(a)]);
        assert!(parse_closure(&format!("/nix/store/{a}\n\n3\n/nix/store/{a}\n")).is_err());
    }

    #[test]
    fn names_and_ids_follow_the_toplevel() {
        let t = sp("0123456789abcdfghijklmnpqrsvwxyz-flotilla-system-web1");
        assert_eq!(file_name(&t, Format::Gce), "web1-0123456789abcdfghijklmnpqrsvwxyz.tar.gz");
        assert_eq!(file_name(&t, Format::Raw), "web1-0123456789abcdfghijklmnpqrsvwxyz.img");
        let u = derived_uuid(&t, "filesystem");
        assert_eq!(u, derived_uuid(&t, "filesystem"));
        assert_ne!(u, derived_uuid(&t, "hash-seed"));
        assert_ne!(u, derived_uuid(&sp("1123456789abcdfghijklmnpqrsvwxyz-flotilla-system-web1"), "filesystem"));
        assert_eq!(uuid_string(&u).len(), 36);
        assert_eq!(computed_size_mib(10 << 20), 13 + 64);
    }
}
