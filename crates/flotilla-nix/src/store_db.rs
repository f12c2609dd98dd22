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

/// What Nix's database says of one valid path: what a narinfo needs besides where its NAR is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRow {
    /// The path, its references, NAR hash and size.
    pub info: PathInfo,
    /// The derivation that built it (a full path), when recorded.
    pub deriver: Option<String>,
    /// Its content address (`CA:` of a narinfo), when it has one.
    pub ca: Option<String>,
    /// Signatures Nix holds for it (`<key name>:<base64>`), e.g. from the cache it came from.
    pub sigs: Vec<String>,
}

/// A read-only connection to the host's Nix database, kept open for many look-ups (a binary
/// cache serving the store asks once per narinfo request it has not answered before).
pub struct StoreDb {
    conn: Connection,
}

impl StoreDb {
    /// Opens Nix's database read-only.
    pub fn open() -> Result<StoreDb, String> {
        let path = db_path();
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| format!("cannot open Nix's database {}: {e}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| e.to_string())?;
        Ok(StoreDb { conn })
    }

    /// The valid path whose hash part is `hash_part` (32 nix-base32 characters), if any. One
    /// indexed range scan on `ValidPaths.path`: the names of `/nix/store/<hash>-...` sort
    /// between `<hash>-` and `<hash>.`.
    pub fn by_hash_part(&self, hash_part: &str) -> Result<Option<StoreRow>, String> {
        if hash_part.len() != flotilla_store::HASH_LEN || !hash_part.bytes().all(|b| flotilla_store::NIX_BASE32_CHARS.contains(&b)) {
            return Ok(None);
        }
        let lo = format!("{}/{hash_part}-", flotilla_store::STORE_DIR);
        let hi = format!("{}/{hash_part}.", flotilla_store::STORE_DIR);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT v.path, v.hash, v.narSize, v.deriver, v.ca, v.sigs,
                        (SELECT group_concat(p.path, ' ') FROM Refs f JOIN ValidPaths p ON p.id = f.reference WHERE f.referrer = v.id)
                 FROM ValidPaths v WHERE v.path > ?1 AND v.path < ?2 LIMIT 1",
            )
            .map_err(|e| e.to_string())?;
        let mut rows = stmt.query([&lo, &hi]).map_err(|e| e.to_string())?;
        let Some(row) = rows.next().map_err(|e| e.to_string())? else { return Ok(None) };
        let get = |i: usize| row.get::<_, Option<String>>(i).map_err(|e| e.to_string());
        let path = get(0)?.ok_or("a ValidPaths row without a path")?;
        let path = StorePath::parse(&path).map_err(|e| e.to_string())?;
        let nar_hash = NarHash::parse(&get(1)?.unwrap_or_default()).map_err(|e| format!("{path}: {e}"))?;
        let nar_size = row
            .get::<_, Option<i64>>(2)
            .map_err(|e| e.to_string())?
            .and_then(|s| u64::try_from(s).ok())
            .ok_or_else(|| format!("{path}: no NAR size recorded"))?;
        let references = get(6)?
            .unwrap_or_default()
            .split_whitespace()
            .map(|p| StorePath::parse(p).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(Some(StoreRow {
            info: PathInfo { path, references, nar_hash, nar_size },
            deriver: non_empty(get(3)?),
            ca: non_empty(get(4)?),
            sigs: get(5)?.unwrap_or_default().split_whitespace().map(str::to_owned).collect(),
        }))
    }
}
