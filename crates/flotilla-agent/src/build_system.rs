//! `flotilla-agent build-system`: the builder of every toplevel derivation. It runs inside a
//! Nix build, turns the machine's checked system config into the toplevel directory, and
//! must write nothing outside `$out` (Nix finds the closure by scanning what it writes).
//!
//! Layout of a toplevel:
//! - `manifest.json`: `{ "flotillaManifest": 1, "agent": …, "system": SystemConfig }`
//! - `etc/<path>`: the `/etc` entries (text written here; `source` linked to its store path)
//! - `sw/bin/<name>`: links to every package's `bin/` entries, first package winning
//! - `bin/flotilla-agent`: link to the agent that built it, which will activate it
//! - for a machine with `boot.kernel`, as NixOS toplevels have them: `kernel` (link to the
//!   kernel's `bzImage`), `initrd` (link to the initramfs derivation's `initrd`) and
//!   `kernel-params` (`boot.kernelParams` joined by spaces), so whoever boots a generation
//!   (the qemu platform, a disk image) boots that generation's kernel

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use flotilla_model::{etc_relative, SystemConfig};
use serde::{Deserialize, Serialize};

/// The manifest format version written to `manifest.json`.
pub const MANIFEST_VERSION: u32 = 1;

/// `manifest.json` of a toplevel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    /// Format version; an agent refuses versions it does not know.
    pub flotilla_manifest: u32,
    /// The agent's store path.
    pub agent: String,
    /// The system.
    pub system: SystemConfig,
}

/// What can go wrong building a toplevel.
#[derive(Debug)]
pub struct BuildError(String);

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BuildError {
    let path = path.to_owned();
    move |e| BuildError(format!("{what} {}: {e}", path.display()))
}

/// Builds the toplevel at `out` from the manifest JSON in `manifest_json`. `initrd` is the
/// initramfs derivation's output, given when the machine has a kernel.
pub fn build(manifest_json: &str, agent: &str, initrd: Option<&str>, out: &Path) -> Result<Manifest, BuildError> {
    let system: SystemConfig = serde_json::from_str(manifest_json)
        .map_err(|e| BuildError(format!("the system config passed by flotilla is not valid: {e}")))?;
    fs::create_dir_all(out).map_err(io_err("cannot create", out))?;

    // /etc entries.
    let etc = out.join("etc");
    for (path, file) in &system.system.files {
        let rel = etc_relative(path)
            .ok_or_else(|| BuildError(format!("files.\"{path}\" is not under /etc")))?;
        let dest = etc.join(rel);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
        }
        match (&file.text, &file.source) {
            (Some(text), None) => fs::write(&dest, text).map_err(io_err("cannot write", &dest))?,
            (None, Some(source)) => symlink(source, &dest).map_err(io_err("cannot link", &dest))?,
            _ => return Err(BuildError(format!("files.\"{path}\" needs exactly one of text and source"))),
        }
    }

    // The PATH: a symlink farm over the packages' bin directories.
    let bin = out.join("sw/bin");
    fs::create_dir_all(&bin).map_err(io_err("cannot create", &bin))?;
    let mut seen: BTreeMap<std::ffi::OsString, PathBuf> = BTreeMap::new();
    for pkg in &system.system.packages {
        let pkg_bin = Path::new(pkg).join("bin");
        let entries = match fs::read_dir(&pkg_bin) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(BuildError(format!("cannot read {}: {e}", pkg_bin.display()))),
        };
        let mut names: Vec<_> = entries
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err("cannot list", &pkg_bin))?;
        names.sort();
        for name in names {
            let target = pkg_bin.join(&name);
            if let Some(first) = seen.get(&name) {
                eprintln!("flotilla-agent: sw/bin/{}: keeping {} over {}", name.to_string_lossy(), first.display(), target.display());
                continue;
            }
            let link = bin.join(&name);
            symlink(&target, &link).map_err(io_err("cannot link", &link))?;
            seen.insert(name, target);
        }
    }

    let agent_link = out.join("bin");
    fs::create_dir_all(&agent_link).map_err(io_err("cannot create", &agent_link))?;
    let agent_link = agent_link.join("flotilla-agent");
    symlink(agent, &agent_link).map_err(io_err("cannot link", &agent_link))?;

    if let Some(kernel) = &system.system.boot.kernel {
        let initrd = initrd.ok_or_else(|| BuildError("the machine has boot.kernel but flotilla passed no $initrd: eval.nix and this agent disagree".into()))?;
        let link = out.join("kernel");
        symlink(Path::new(kernel).join("bzImage"), &link).map_err(io_err("cannot link", &link))?;
        let link = out.join("initrd");
        symlink(Path::new(initrd).join("initrd"), &link).map_err(io_err("cannot link", &link))?;
        let params = out.join("kernel-params");
        fs::write(&params, system.system.boot.kernel_params.join(" ")).map_err(io_err("cannot write", &params))?;
    }

    let manifest = Manifest { flotilla_manifest: MANIFEST_VERSION, agent: agent.to_owned(), system };
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    let path = out.join("manifest.json");
    fs::write(&path, json + "\n").map_err(io_err("cannot write", &path))?;
    Ok(manifest)
}

/// Entry point inside a Nix build: reads `$manifestPath`, `$agent` and `$out`.
pub fn main_from_env() -> Result<(), BuildError> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| {
            BuildError(format!("${name} is not set: `flotilla-agent build-system` runs as the builder of a flotilla toplevel derivation"))
        })
    };
    let manifest_path = var("manifestPath")?;
    let json = fs::read_to_string(&manifest_path).map_err(|e| BuildError(format!("cannot read {manifest_path}: {e}")))?;
    let initrd = std::env::var("initrd").ok();
    build(&json, &var("agent")?, initrd.as_deref(), Path::new(&var("out")?))?;
    Ok(())
}
