//! `flotilla-agent build-oci-root`: the builder of a machine's OCI "machine layer"
//! (`ociRoots.<machine>` in eval.nix). It stages what a machine the agent manages holds after
//! its first deploy, except the store itself: the agent's registry of the closure (so the
//! agent in the container knows every path valid, NAR hashes and all), generation 1 linked as
//! activation links it, and `/etc` with the system's files, users and groups placed by the
//! agent's own activation code ([`crate::users::apply`], [`crate::etc::apply`]), with their
//! records, so the agent started as the container's init finds them its own and an image whose
//! entrypoint is one program finds `/etc` as the machine would have it.
//!
//! The store paths are not copied: the deployer streams them into the image's other layers.
//! Nix canonicalises the output's modes and owners, so the builder lists every staged entry's
//! mode and owner in `nix-support/oci-root.json`, with the closure and its references; the
//! deployer's tar writer takes them from there. It writes nothing outside `$out` and its build
//! directory.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

use flotilla_protocol::PathInfo;
use flotilla_store::StorePath;
use serde::Serialize;

use super::{io_err, parse_closure, ImageError, MOUNT_POINTS};
use crate::build_system::Manifest;
use crate::machine::MachineRoot;

/// One staged entry as the layer must hold it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the root, `/`-separated, no leading slash.
    pub path: String,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// A closure path and its references, for the deployer's layering.
#[derive(Debug, Clone, Serialize)]
pub struct ClosurePath {
    /// The path.
    pub path: String,
    /// Its direct references.
    pub references: Vec<String>,
}

/// `nix-support/oci-root.json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RootInfo {
    /// The machine's toplevel.
    pub toplevel: String,
    /// The agent's store path (the default entrypoint).
    pub agent: String,
    /// The image's store paths: the toplevel's closure and the agent's.
    pub closure: Vec<ClosurePath>,
    /// Every entry under `root/`, sorted by path, with the mode and owner it must have.
    pub entries: Vec<Entry>,
}

/// Stages the machine root into `out/root` and writes `out/nix-support/oci-root.json`.
pub fn build(toplevel: &StorePath, agent: &StorePath, closure: &[(StorePath, Vec<StorePath>)], scratch: &Path, out: &Path) -> Result<RootInfo, ImageError> {
    let root_dir = out.join("root");
    let root = MachineRoot::new(&root_dir);
    root.prepare().map_err(io_err("cannot prepare", &root_dir))?;
    for (path, references) in closure {
        let host = PathBuf::from(path.to_absolute());
        let digest = flotilla_store::hash_path(&host).map_err(|e| ImageError::Io { what: "cannot read", path: host.clone(), source: std::io::Error::other(e.to_string()) })?;
        root.register(&PathInfo { path: path.clone(), references: references.clone(), nar_hash: digest.hash, nar_size: digest.size }, false)?;
    }
    let profiles = root.profiles_dir();
    let link = profiles.join("system-1-link");
    symlink(toplevel.to_absolute(), &link).map_err(io_err("cannot link", &link))?;
    let system = profiles.join("system");
    symlink("system-1-link", &system).map_err(io_err("cannot link", &system))?;

    let manifest_path = PathBuf::from(toplevel.to_absolute()).join("manifest.json");
    let text = fs::read_to_string(&manifest_path).map_err(io_err("cannot read", &manifest_path))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| ImageError::Setup(format!("{}: {e}", manifest_path.display())))?;
    let sys = &manifest.system.system;

    // Activation reads a file's `source` from the machine's store: while /etc is placed, the
    // staged store is the build's own (the closure is in it), then an empty directory again.
    let store = root.store_dir();
    fs::remove_dir(&store).map_err(io_err("cannot remove", &store))?;
    symlink(flotilla_store::STORE_DIR, &store).map_err(io_err("cannot link", &store))?;
    // Nix's sandbox refuses a setuid or setgid mode (and the output could not keep one): the
    // files are staged without the special bits, and their declared modes listed below.
    let staged_files: BTreeMap<String, flotilla_model::FileSpec> = sys
        .files
        .iter()
        .map(|(path, f)| {
            let mut f = f.clone();
            if let Some(m) = f.mode.as_deref().and_then(|m| u32::from_str_radix(m, 8).ok()) {
                f.mode = Some(format!("{:04o}", m & 0o777));
            }
            (path.clone(), f)
        })
        .collect();
    let placed = (|| {
        crate::users::apply(&root, &sys.users, &sys.groups, false)?;
        // Owners are not set here (the builder is not root): they are listed for the layer.
        crate::etc::apply(&root, &toplevel.to_absolute(), &staged_files, &|_, _| None, false)
    })();
    fs::remove_file(&store).map_err(io_err("cannot remove", &store))?;
    fs::create_dir(&store).map_err(io_err("cannot create", &store))?;
    placed.map_err(|e| ImageError::Setup(format!("cannot place the machine's /etc: {e}")))?;
    for (dir, mode) in MOUNT_POINTS {
        let d = root_dir.join(dir);
        fs::create_dir_all(&d).map_err(io_err("cannot create", &d))?;
        fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(*mode)).map_err(io_err("cannot set the mode of", &d))?;
    }

    // A copied file's owner, group and declared mode, as the layer must hold them.
    let mut owners: BTreeMap<String, (u32, u32, Option<u32>)> = BTreeMap::new();
    for (path, f) in &sys.files {
        if let Some(mode) = &f.mode {
            let id = |name: &str, user: bool| {
                crate::users::lookup_id(&root, name, user).ok_or_else(|| {
                    let what = if user { "user" } else { "group" };
                    ImageError::Setup(format!(
                        "files.\"{path}\": its {what} `{name}` is not in the image's /etc/{}; declare it (`{what}s.{name} = {{ }};`) or give the file an owner the machine has",
                        if user { "passwd" } else { "group" }
                    ))
                })
            };
            let declared = u32::from_str_radix(mode, 8).map_err(|_| ImageError::Setup(format!("files.\"{path}\": its mode \"{mode}\" is not octal")))?;
            owners.insert(path.trim_start_matches('/').to_owned(), (id(&f.user, true)?, id(&f.group, false)?, Some(declared & 0o7777)));
        }
    }
    let mut entries = Vec::new();
    list(&root_dir, "", &owners, &mut entries)?;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let _ = scratch;
    let info = RootInfo {
        toplevel: toplevel.to_absolute(),
        agent: agent.to_absolute(),
        closure: closure.iter().map(|(p, r)| ClosurePath { path: p.to_absolute(), references: r.iter().map(StorePath::to_absolute).collect() }).collect(),
        entries,
    };
    let dir = out.join("nix-support");
    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let path = dir.join("oci-root.json");
    fs::write(&path, serde_json::to_string_pretty(&info).expect("serialises") + "\n").map_err(io_err("cannot write", &path))?;
    Ok(info)
}

fn list(dir: &Path, rel: &str, owners: &BTreeMap<String, (u32, u32, Option<u32>)>, out: &mut Vec<Entry>) -> Result<(), ImageError> {
    for e in fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let e = e.map_err(io_err("cannot list", dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        let meta = fs::symlink_metadata(e.path()).map_err(io_err("cannot stat", &e.path()))?;
        let (uid, gid, declared) = owners.get(&path).copied().unwrap_or((0, 0, None));
        let mode = match declared {
            Some(m) if meta.is_file() => m,
            _ => meta.mode() & 0o7777,
        };
        out.push(Entry { path: path.clone(), mode, uid, gid });
        if meta.is_dir() {
            list(&e.path(), &path, owners, out)?;
        }
    }
    Ok(())
}

/// Entry point inside a Nix build: reads the derivation's environment (see eval.nix).
pub fn main_from_env() -> Result<(), ImageError> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| ImageError::Setup(format!("${name} is not set: `flotilla-agent build-oci-root` runs as the builder of a flotilla OCI root derivation")))
    };
    let parse = |name: &str| -> Result<StorePath, ImageError> {
        let v = var(name)?;
        StorePath::parse(&v).map_err(|e| ImageError::Setup(format!("${name} {v}: {e}")))
    };
    let toplevel = parse("toplevel")?;
    let agent = parse("agent")?;
    let scratch = std::env::current_dir().map_err(io_err("cannot find", Path::new(".")))?;
    let mut closure: BTreeMap<StorePath, Vec<StorePath>> = BTreeMap::new();
    for name in ["closure", "agentClosure"] {
        let file = scratch.join(name);
        let text = fs::read_to_string(&file).map_err(io_err("cannot read", &file))?;
        closure.extend(parse_closure(&text).map_err(|e| ImageError::Setup(format!("{}: {e}", file.display())))?);
    }
    let closure: Vec<(StorePath, Vec<StorePath>)> = closure.into_iter().collect();
    let out: PathBuf = var("out")?.into();
    build(&toplevel, &agent, &closure, &scratch, &out)?;
    Ok(())
}
