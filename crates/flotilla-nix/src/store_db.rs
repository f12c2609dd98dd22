//! Reading the local Nix store's own database (`/nix/var/nix/db/db.sqlite`) for path metadata,
//! read-only, in-process. It answers what `nix path-info --recursive` answers (validity, NAR
//! hash and size, references) without a process spawn, which is most of a no-op redeploy's
//! cost. Its `ValidPaths`/`Refs` schema has been stable across Nix 2.x (schema 10); when the
//! file cannot be opened or read (another layout, no permission) callers fall back to `nix`.

use std::path::PathBuf;

use flotilla_store::{NarHash, StorePath};
use rusqlite::{Connection, OpenFlags};

use crate::PathInfo;

/// Where Nix keeps its database: `$NIX_STATE_DIR/db/db.sqlite`, by default under /nix/var/nix.
fn db_path() -> PathBuf {
    let state = std::env::var_os("NIX_STATE_DIR").map_or_else(|| PathBuf::from("/nix/var/nix"), PathBuf::from);
    state.join("db/db.sqlite")
}

/// The closure of `roots` with each path's metadata, in no particular order; `Ok(None)` when
/// some root is not valid. `Err` means the database could not be read: ask Nix instead.
pub(crate) fn closure(roots: &[StorePath]) -> Result<Option<Vec<PathInfo>>, String> {
    let conn = Connection::open_with_flags(db_path(), OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| e.to_string())?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| e.to_string())?;
    // One read transaction: Nix may be registering paths meanwhile.
    let tx = conn.unchecked_transaction().map_err(|e| e.to_string())?;
    tx.execute_batch("CREATE TEMP TABLE roots (path TEXT PRIMARY KEY)").map_err(|e| e.to_string())?;
    {
        let mut insert = tx.prepare("INSERT OR IGNORE INTO roots VALUES (?1)").map_err(|e| e.to_string())?;
        for r in roots {
            insert.execute([r.to_absolute()]).map_err(|e| e.to_string())?;
        }
    }
    let valid: i64 = tx
        .query_row("SELECT count(*) FROM ValidPaths v JOIN roots r ON r.path = v.path", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    let wanted: i64 = tx.query_row("SELECT count(*) FROM roots", [], |r| r.get(0)).map_err(|e| e.to_string())?;
    if valid != wanted {
        return Ok(None);
    }
    let mut stmt = tx
        .prepare(
            "WITH RECURSIVE closure(id) AS (
                 SELECT v.id FROM ValidPaths v JOIN roots r ON r.path = v.path
                 UNION
                 SELECT f.reference FROM Refs f JOIN closure c ON f.referrer = c.id
             )
             SELECT v.path, v.hash, v.narSize,
                    (SELECT group_concat(p.path, ' ') FROM Refs f JOIN ValidPaths p ON p.id = f.reference WHERE f.referrer = v.id)
             FROM ValidPaths v JOIN closure c ON c.id = v.id",
        )
        .map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<i64>>(2)?, r.get::<_, Option<String>>(3)?)))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for row in rows {
        let (path, hash, size, refs) = row.map_err(|e| e.to_string())?;
        let path = StorePath::parse(&path).map_err(|e| e.to_string())?;
        let nar_hash = NarHash::parse(&hash).map_err(|e| format!("{path}: {e}"))?;
        let nar_size = size.and_then(|s| u64::try_from(s).ok()).ok_or_else(|| format!("{path}: no NAR size recorded"))?;
        let references = refs
            .unwrap_or_default()
            .split_whitespace()
            .map(|p| StorePath::parse(p).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(PathInfo { path, references, nar_hash, nar_size });
    }
    Ok(Some(out))
}
