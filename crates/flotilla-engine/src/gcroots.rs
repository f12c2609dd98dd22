//! GC roots for built toplevels, so `nix-store --gc` keeps what flotilla built.
//!
//! Roots live in the state's data directory on this host (`flotilla_state::data_dir`:
//! `<data dir>/gcroots/<deployment>/<machine>`) and are
//! registered with Nix as indirect roots (`/nix/var/nix/gcroots/auto/`), as `nix-store
//! --add-root --indirect` does. Removing a deployment's directory releases its roots; Nix
//! drops the dangling registrations itself.

use std::path::{Path, PathBuf};

use flotilla_store::StorePath;

use crate::{EngineError, Result};

/// Nix's directory of automatically registered indirect roots.
fn auto_dir() -> PathBuf {
    let state = std::env::var_os("NIX_STATE_DIR").map(PathBuf::from).unwrap_or_else(|| "/nix/var/nix".into());
    state.join("gcroots/auto")
}

/// The roots of one deployment.
pub struct Roots {
    dir: PathBuf,
}

impl Roots {
    /// The roots of `deployment` for the state DB at `state_db`.
    pub fn new(state_db: &Path, deployment: &str) -> Roots {
        Roots { dir: flotilla_state::data_dir(state_db).join("gcroots").join(deployment) }
    }

    /// Points `machine`'s root at `out` (which may not exist yet) and registers it.
    pub fn set(&self, machine: &str, out: &StorePath) -> Result<()> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| EngineError::Io { what, path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io("cannot create", &self.dir))?;
        let link = std::path::absolute(self.dir.join(machine)).map_err(io("cannot resolve", &self.dir))?;
        let target = out.to_absolute();
        if std::fs::read_link(&link).ok().as_deref() != Some(Path::new(&target)) {
            let tmp = link.with_extension("tmp");
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&target, &tmp).map_err(io("cannot create", &tmp))?;
            std::fs::rename(&tmp, &link).map_err(io("cannot replace", &link))?;
        }

        let auto = auto_dir();
        std::fs::create_dir_all(&auto).map_err(io("cannot create", &auto))?;
        let reg = auto.join(registration_name(&link));
        if std::fs::read_link(&reg).ok().as_deref() != Some(link.as_path()) {
            let _ = std::fs::remove_file(&reg);
            std::os::unix::fs::symlink(&link, &reg).map_err(io("cannot register GC root", &reg))?;
        }
        Ok(())
    }

    /// Releases one machine's root.
    pub fn remove(&self, machine: &str) {
        let link = self.dir.join(machine);
        if let Ok(abs) = std::path::absolute(&link) {
            let _ = std::fs::remove_file(auto_dir().join(registration_name(&abs)));
        }
        let _ = std::fs::remove_file(link);
    }

    /// Releases every root of the deployment.
    pub fn remove_all(&self) -> Result<()> {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if let Ok(link) = std::path::absolute(e.path()) {
                    let _ = std::fs::remove_file(auto_dir().join(registration_name(&link)));
                }
            }
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(EngineError::Io { what: "cannot remove", path: self.dir.clone(), source }),
        }
    }
}

/// A stable file name for the registration of `link` (FNV-1a of its path).
fn registration_name(link: &Path) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in link.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
    }
    format!("flotilla-{h:016x}")
}
