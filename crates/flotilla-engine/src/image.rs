//! `flotilla image`: a machine's disk image, built by Nix as `images.<machine>.<format>` of
//! eval.nix (builder `flotilla-agent build-image`), so it is cached and substitutable like any
//! build, then placed where the user asked. Nothing is provisioned or recorded: an image is
//! an artifact of the configuration, not a machine.

use std::path::{Path, PathBuf};

use flotilla_model::{MachineName, Platform};
use flotilla_nix::{EvalArgs, NixError, Toplevel};
use serde::{Deserialize, Serialize};

use crate::{Engine, EngineError, EngineEvent, Evaluated, Listener, Result};

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// The ext4 filesystem itself (`.img`, sparse).
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

impl ImageFormat {
    /// The name eval.nix and the builder use.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Gce => "gce",
        }
    }
}

/// What the builder records in `$out/nix-support/image.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageInfo {
    file: String,
    toplevel: String,
    kernel: Option<String>,
    initrd: Option<String>,
    kernel_params: String,
}

/// A built image, placed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReport {
    /// The machine.
    pub machine: MachineName,
    /// The format.
    pub format: ImageFormat,
    /// Where the image file is now.
    pub path: PathBuf,
    /// The image in the store.
    pub store_path: String,
    /// The machine's toplevel the image holds.
    pub toplevel: String,
    /// The kernel, in the host store.
    pub kernel: String,
    /// The initramfs, in the host store.
    pub initrd: String,
    /// The kernel command line that boots the image.
    pub kernel_params: String,
    /// A `qemu-system-x86_64` command line that boots it.
    pub qemu_command: String,
}

/// Quotes a word for a POSIX shell when it needs it.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+%".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// How many of a failed build's last log lines its error carries.
const LOG_TAIL: usize = 15;

impl Engine {
    /// Builds one artifact of `machine` with Nix, `attr` of eval.nix (a disk image, an OCI
    /// image's machine layer), unless its output is there already, and returns the output.
    /// `what` names it in the error when it does not build.
    pub(crate) fn build_artifact(&self, ev: &Evaluated, machine: &MachineName, attr: &str, what: &str, agent: &Path, listen: Listener<'_>) -> Result<PathBuf> {
        let args = EvalArgs {
            deployment: &ev.file,
            facts_json: serde_json::to_string(&ev.facts).expect("facts serialise"),
            agent: Some(agent),
            only: vec![machine.to_string()],
        };
        let drv: Toplevel = serde_json::from_value(self.nix.eval_json(attr, &args, true)?)
            .map_err(|e| NixError::Output { command: format!("eval.nix {attr}"), detail: e.to_string() })?;
        let out = PathBuf::from(drv.out.to_absolute());
        if !self.nix.is_valid(&drv.out)? {
            self.nix.check_build_setup()?;
            // The builder's last words, for the error when it fails: Nix's own error names
            // only the derivation and the exit status, and the log shows only with --verbose.
            let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
            let outcome = self.nix.realise(std::slice::from_ref(&drv.drv), &ev.builders, &mut |line| {
                if !line.starts_with("error:") && !line.trim().is_empty() {
                    if tail.len() == LOG_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line.to_owned());
                }
                listen(&EngineEvent::NixLog { line: line.to_owned() })
            })?;
            for note in &outcome.notes {
                listen(&EngineEvent::Note { message: note.clone() });
            }
            if !self.nix.is_valid(&drv.out)? {
                let why = outcome.errors.join("\n");
                let mut message = format!("machine {machine}: {what} did not build: {}", why.trim().strip_prefix("error: ").unwrap_or(why.trim()));
                if !tail.is_empty() {
                    message.push_str("\nthe build's last lines:");
                    for line in &tail {
                        message.push_str("\n  ");
                        message.push_str(line);
                    }
                }
                return Err(EngineError::Config(vec![message]));
            }
        }
        Ok(out)
    }

    /// Builds `machine`'s disk image in `format` with Nix and copies it to `output` (a file,
    /// or a directory to put it in; `None`: the current directory). The copy is written under
    /// a temporary name beside its destination and renamed, so no half-written image is left.
    pub fn image(&self, ev: &Evaluated, machine: &MachineName, format: ImageFormat, agent: &Path, output: Option<&Path>, listen: Listener<'_>) -> Result<ImageReport> {
        let cfg = ev.machines.get(machine).ok_or_else(|| {
            EngineError::Config(vec![format!(
                "deployment {} has no machine {machine}; its machines: {}",
                ev.name,
                ev.machines.keys().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
            )])
        })?;
        if cfg.system.boot.kernel.is_none() {
            return Err(EngineError::Config(vec![format!(
                "machine {machine}: option `boot.kernel` is not set, and a disk image boots the machine's own kernel; set `boot.kernel = pkgs.linux;` in its configuration"
            )]));
        }
        crate::check_agent(agent)?;
        let out = self.build_artifact(ev, machine, &format!("images.{machine}.{}", format.as_str()), &format!("the {} image", format.as_str()), agent, listen)?;
        let info_path = out.join("nix-support/image.json");
        let info: ImageInfo = std::fs::read(&info_path)
            .map_err(|source| EngineError::Io { what: "cannot read", path: info_path.clone(), source })
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| EngineError::Io { what: "cannot parse", path: info_path.clone(), source: std::io::Error::other(e) }))?;
        let built = out.join(&info.file);
        let dest = destination(output, &info.file)?;
        place(&built, &dest)?;

        let kernel = info.kernel.unwrap_or_default();
        let initrd = info.initrd.unwrap_or_default();
        let memory = match &cfg.platform {
            Platform::Qemu(q) => q.memory,
            _ => 512,
        };
        let drive = match format {
            // The tar is for the cloud; QEMU boots the disk.raw inside it.
            ImageFormat::Gce => "file=disk.raw,format=raw,if=virtio".to_owned(),
            f => format!("file={},format={},if=virtio", dest.display(), f.as_str()),
        };
        let words = [
            "qemu-system-x86_64".to_owned(),
            "-M".into(),
            "pc".into(),
            "-accel".into(),
            "kvm".into(),
            "-accel".into(),
            "tcg".into(),
            "-m".into(),
            memory.to_string(),
            // No default devices: QEMU's default NIC is an e1000, which the cloud kernel lacks.
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "mon:stdio".into(),
            "-netdev".into(),
            "user,id=net0".into(),
            "-device".into(),
            "virtio-net-pci,netdev=net0".into(),
            "-kernel".into(),
            kernel.clone(),
            "-initrd".into(),
            initrd.clone(),
            "-append".into(),
            info.kernel_params.clone(),
            "-drive".into(),
            drive,
        ];
        let mut qemu_command = words.iter().map(|w| shell_word(w)).collect::<Vec<_>>().join(" ");
        if format == ImageFormat::Gce {
            qemu_command = format!("tar -xzf {} disk.raw && {qemu_command}", shell_word(&dest.display().to_string()));
        }
        Ok(ImageReport {
            machine: machine.clone(),
            format,
            path: dest,
            store_path: out.display().to_string(),
            toplevel: info.toplevel,
            kernel,
            initrd,
            kernel_params: info.kernel_params,
            qemu_command,
        })
    }
}

/// Where the image goes: `output` itself, or `output/<file>` when it is a directory, or
/// `./<file>` without it.
fn destination(output: Option<&Path>, file: &str) -> Result<PathBuf> {
    let dest = match output {
        Some(o) if o.is_dir() => o.join(file),
        Some(o) => o.to_owned(),
        None => PathBuf::from(file),
    };
    std::path::absolute(&dest).map_err(|source| EngineError::Io { what: "cannot resolve", path: dest.clone(), source })
}

/// Copies `from` to `to` through a temporary file in `to`'s directory, created exclusively
/// (never through a link someone left there), then renamed over `to`.
fn place(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = to.parent().unwrap_or(Path::new("/"));
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.flotilla-{}", std::process::id()));
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| EngineError::Io { what, path, source }
    };
    let copy = || -> std::io::Result<()> {
        let mut src = std::fs::File::open(from)?;
        let mut dst = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        std::io::copy(&mut src, &mut dst)?;
        dst.sync_all()
    };
    if let Err(e) = copy() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("cannot write", &tmp)(e));
    }
    std::fs::rename(&tmp, to).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io("cannot move the image to", to)(e)
    })
}
