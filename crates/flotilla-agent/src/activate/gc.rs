//! Garbage: what no generation, no running system and not the running agent needs. On a
//! machine with Nix of its own the agent also keeps a Nix GC root for each of those in
//! `/nix/var/nix/gcroots/flotilla/`, so that Nix's collector never deletes them; collection
//! refuses while a generation awaits confirmation (it needs the one before it).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use flotilla_store::StorePath;

use super::Agent;
use crate::error::{io_err, AgentError};
use crate::machine::{agent_store_path, symlink_atomic};

impl Agent {
    /// Keeps a Nix GC root for each generation (`system-<N>`), the running system (`running`)
    /// and the agent's own store path (`agent`) in `/nix/var/nix/gcroots/flotilla/` when the
    /// machine has Nix, and no other but the deployer's (`built-<machine>`: a system its host
    /// built, which the deployer replaces); says what went wrong, if anything did.
    pub(super) fn sync_gc_roots(&self) -> Option<String> {
        if !self.root.has_nix() {
            return None;
        }
        let dir = self.root.nix_gcroots_dir();
        let synced = (|| -> io::Result<()> {
            let mut want: BTreeMap<String, StorePath> = BTreeMap::new();
            for g in self.generations().map_err(io::Error::other)? {
                want.insert(format!("system-{}", g.number), g.toplevel);
            }
            want.extend(self.running_system().map(|t| ("running".to_owned(), t)));
            want.extend(agent_store_path(&self.root).map(|a| ("agent".to_owned(), a)));
            fs::create_dir_all(&dir)?;
            for e in fs::read_dir(&dir)?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !want.contains_key(&name) && !name.starts_with(flotilla_protocol::layout::BUILT_ROOT_PREFIX) {
                    fs::remove_file(e.path())?;
                }
            }
            for (name, target) in &want {
                symlink_atomic(Path::new(&target.to_absolute()), &dir.join(name))?;
            }
            Ok(())
        })();
        synced.err().map(|e| format!("cannot keep the Nix GC roots in {}, so Nix's garbage collector may delete what a generation needs: {e}", dir.display()))
    }

    /// Removes every store path no generation, no running system and not the running agent
    /// needs (the last matters where a systemd unit starts the agent from its store path).
    /// Paths of the machine's Nix are only unregistered: see [`crate::machine::MachineRoot::collect_garbage`].
    /// Returns the paths deleted and their NAR bytes.
    pub fn collect_garbage(&self) -> Result<(u64, u64), AgentError> {
        self.refuse_while_pending("collect garbage")?;
        let mut roots: Vec<StorePath> = self.generations()?.into_iter().map(|g| g.toplevel).collect();
        roots.extend(self.running_system());
        roots.extend(agent_store_path(&self.root));
        let live = self.root.closure(&roots);
        let collected = self.root.collect_garbage(&live).map_err(io_err("cannot collect garbage"))?;
        if collected.released > 0 {
            eprintln!("flotilla-agent: garbage collection left {} paths on disk for the machine's Nix to collect", collected.released);
        }
        Ok((collected.deleted, collected.bytes))
    }
}
