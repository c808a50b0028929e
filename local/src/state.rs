//! The cache's record of its base generation: `CACHE/state.db`, a SQLite database.
//!
//! - `meta`: format version, store, workspace (name and id), and the base generation: the
//!   newest durable generation whose content the backing directory holds, apart from what the
//!   journal marks dirty.
//! - `nodes`: for each backing inode in the base generation, the content the generation gives
//!   it (a file's chunk list, a directory's subtree). This is how a cut knows that a file it
//!   did not see change needs no reading, and where the unchanged chunks of a changed file are.
//! - `blobs`: tree and list blobs of the base generations, so a cut never fetches them.
//! - `chunks`: every chunk known to be in the store, for deduplication.
//! - `totals`: files, directories and bytes below each known tree, by tree id, so a
//!   generation's totals need only the directories the cut rebuilt.
//!
//! - `hyd_files`, `hyd_dirs`, `hyd_links`: lazy hydration (`src/hydrate/`): files whose
//!   bytes are not all local yet, directories whose entries are not made yet, hard links met
//!   while materializing. `hyd_old`, `hyd_warm`: a warm remount's older generation (what it
//!   gave each inode; the pending directories that still hold its entries). Written by the
//!   hydrator's own connection.
//!
//! One transaction per generation updates all of them, after the generation is durable and before
//! the journal forgets what the cut covered. A crash in between leaves an older base with a
//! journal that still covers everything since it: the next cut uploads a superset.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use rusqlite::{Connection, OptionalExtension, params};

/// Version of the `state.db` schema. Version 2 added lazy hydration: a version 1 owsfs would
/// take a file that is not fetched yet for data, so it must refuse a version 2 cache.
/// Version 3 added warm remounts (`hyd_old`, `hyd_warm`): a version 2 owsfs would take a
/// directory's entries of an older generation for the newer one's.
pub const STATE_VERSION: u32 = 3;

/// What a node of the cache state is. Only files and directories have rows: other kinds hold
/// no content the cache must know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    // The discriminants are the column's bytes, so even a stray `as` cast stores them right.
    File = b'f',
    Dir = b'd',
}

impl Kind {
    /// Its encoding in the `kind` column.
    pub fn byte(self) -> u8 {
        self as u8
    }

    pub fn from_byte(b: u8) -> Option<Kind> {
        match b {
            b'f' => Some(Kind::File),
            b'd' => Some(Kind::Dir),
            _ => None,
        }
    }
}

/// One `nodes` row: backing inode, kind, encoded tree entry.
pub type NodeRow = (u64, Kind, Vec<u8>);

/// `nodes`, in memory, shared by the sync agent (which commits generations) and the hydrator
/// (which adds the nodes it materializes). Last writer wins, as in the table.
#[derive(Default)]
pub struct NodeMap {
    map: parking_lot::RwLock<HashMap<u64, (Kind, Vec<u8>)>>,
    /// Nodes added since the running cut's capture: a commit that rewrites every node (a full
    /// walk) keeps them.
    late: parking_lot::Mutex<Option<Vec<NodeRow>>>,
}

impl NodeMap {
    pub fn get(&self, ino: u64) -> Option<(Kind, Vec<u8>)> {
        self.map.read().get(&ino).cloned()
    }

    pub fn kind(&self, ino: u64) -> Option<Kind> {
        self.map.read().get(&ino).map(|(k, _)| *k)
    }

    /// Adds nodes: `write` stores them in the table (its own transaction), under the map's lock
    /// so that a concurrent commit sees the rows and the map alike.
    pub fn add(
        &self,
        rows: Vec<NodeRow>,
        write: impl FnOnce(&[NodeRow]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut map = self.map.write();
        write(&rows)?;
        if let Some(late) = self.late.lock().as_mut() {
            late.extend(rows.iter().cloned());
        }
        for (ino, kind, content) in rows {
            map.insert(ino, (kind, content));
        }
        Ok(())
    }

    /// Called by the cut under the barrier, after its capture.
    pub fn mark_capture(&self) {
        *self.late.lock() = Some(Vec::new());
    }
}

/// The base generation the cache holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Base {
    pub generation: u64,
    pub epoch: u64,
    /// The root tree's reference, as the store crate encodes it (JSON).
    pub root: String,
}

/// What a tree holds, all levels below it: files, directories (not counting itself) and the
/// files' bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
}

impl Totals {
    pub fn add(&mut self, o: Totals) {
        self.files += o.files;
        self.dirs += o.dirs;
        self.bytes += o.bytes;
    }
}

pub struct LocalState {
    conn: Connection,
    /// `nodes`, in memory: kind and encoded content.
    nodes: std::sync::Arc<NodeMap>,
    /// Packs a GC condemned: `chunk` never answers with a blob in one of them.
    condemned: std::collections::HashSet<owsfs_store::PackId>,
}

/// The hydration tables (created by [`LocalState::open`], used by `src/hydrate/`).
pub const HYDRATION_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS hyd_files (ino INTEGER PRIMARY KEY, handle BLOB NOT NULL,
                                          node BLOB NOT NULL, valid_end INTEGER NOT NULL,
                                          present BLOB NOT NULL);
    CREATE TABLE IF NOT EXISTS hyd_dirs (ino INTEGER PRIMARY KEY, handle BLOB NOT NULL,
                                         node BLOB NOT NULL);
    CREATE TABLE IF NOT EXISTS hyd_links (key INTEGER PRIMARY KEY, handle BLOB NOT NULL);
    CREATE TABLE IF NOT EXISTS hyd_old (ino INTEGER PRIMARY KEY, state INTEGER NOT NULL,
                                        node BLOB NOT NULL, valid_end INTEGER, present BLOB);
    CREATE TABLE IF NOT EXISTS hyd_warm (ino INTEGER PRIMARY KEY, same INTEGER NOT NULL,
                                         trust BLOB);";

/// Changes of one generation.
#[derive(Debug, Default)]
pub struct Update {
    pub nodes: Vec<NodeRow>,
    pub blobs: Vec<([u8; 32], Vec<u8>)>,
    pub chunks: Vec<([u8; 32], Vec<u8>)>,
    pub totals: Vec<([u8; 32], Totals)>,
    /// Forget every node not in `nodes` (after a walk of the whole tree).
    pub replace_all_nodes: bool,
}

impl LocalState {
    /// The inodes lazy hydration tracks (partial files, pending directories, a warm remount's
    /// old entries): their backing attributes say nothing about local changes.
    pub fn hydration_inos(&self) -> anyhow::Result<std::collections::HashSet<u64>> {
        let mut out = std::collections::HashSet::new();
        for table in ["hyd_files", "hyd_dirs", "hyd_old", "hyd_warm"] {
            let mut stmt = self.conn.prepare(&format!("SELECT ino FROM {table}"))?;
            for ino in stmt.query_map([], |r| r.get::<_, i64>(0))? {
                out.insert(ino? as u64);
            }
        }
        Ok(out)
    }

    pub fn open(path: &Path) -> anyhow::Result<LocalState> {
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the cache state {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS nodes (ino INTEGER PRIMARY KEY, kind INTEGER NOT NULL,
                                               content BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS blobs (id BLOB PRIMARY KEY, data BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS chunks (id BLOB PRIMARY KEY, loc BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS totals (id BLOB PRIMARY KEY, files INTEGER NOT NULL,
                                                dirs INTEGER NOT NULL, bytes INTEGER NOT NULL);",
        )
        .with_context(|| format!("cannot create the tables of {}", path.display()))?;
        conn.execute_batch(HYDRATION_SCHEMA)
            .with_context(|| format!("cannot create the tables of {}", path.display()))?;
        let state = LocalState {
            conn,
            nodes: Default::default(),
            condemned: Default::default(),
        };
        match state.meta("version")? {
            None => state.set_meta("version", &STATE_VERSION.to_string())?,
            Some(v) if v == STATE_VERSION.to_string() => {}
            // Versions 1 and 2 lacked tables that are empty now.
            Some(v) if v == "1" || v == "2" => {
                state.set_meta("version", &STATE_VERSION.to_string())?
            }
            Some(v) => bail!(
                "{} has state version {v}; this owsfs understands version {STATE_VERSION}: \
                 upgrade owsfs or mount on a new cache",
                path.display()
            ),
        }
        {
            let mut stmt = state.conn.prepare("SELECT ino, kind, content FROM nodes")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u8,
                    r.get(2)?,
                ))
            })?;
            let mut map = state.nodes.map.write();
            for row in rows {
                let (ino, kind, content) = row?;
                let kind = Kind::from_byte(kind).with_context(|| {
                    format!(
                        "{}: node {ino} has an unknown kind {kind}: the cache state is damaged; \
                         mount on a new cache",
                        path.display()
                    )
                })?;
                map.insert(ino, (kind, content));
            }
        }
        Ok(state)
    }

    pub fn meta(&self, key: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Sets several meta keys in one transaction: all of them or none.
    pub fn set_metas(&mut self, pairs: &[(&str, &str)]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        for (key, value) in pairs {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The cache passes to workspace `name`, in which it last held the lease at `epoch` (a
    /// commit of that epoch is its own: `lease_epoch`); a recover that made it is done.
    pub fn belong_to(&mut self, name: &str, epoch: u64) -> anyhow::Result<()> {
        self.set_metas(&[
            ("workspace", name),
            ("lease_epoch", &epoch.to_string()),
            ("recovering_as", ""),
        ])
    }

    pub fn base(&self) -> anyhow::Result<Option<Base>> {
        let Some(g) = self.meta("base_generation")? else {
            return Ok(None);
        };
        Ok(Some(Base {
            generation: g.parse().context("base_generation")?,
            epoch: self
                .meta("base_epoch")?
                .unwrap_or_default()
                .parse()
                .unwrap_or(0),
            root: self.meta("base_root")?.unwrap_or_default(),
        }))
    }

    pub fn node(&self, ino: u64) -> Option<(Kind, Vec<u8>)> {
        self.nodes.get(ino)
    }

    pub fn node_kind(&self, ino: u64) -> Option<Kind> {
        self.nodes.kind(ino)
    }

    /// The in-memory nodes, for the hydrator.
    pub fn node_map(&self) -> std::sync::Arc<NodeMap> {
        std::sync::Arc::clone(&self.nodes)
    }

    #[cfg(test)]
    pub fn node_count(&self) -> usize {
        self.nodes.map.read().len()
    }

    /// Makes the cache a lazy copy of generation `base`: no node, nothing fetched, the root
    /// directory (backing inode `root_ino`, file handle `root_handle`) to be materialized from
    /// `root_node` (the root's entry, holding its tree). One transaction, so a crash leaves
    /// the old base or the new one.
    ///
    /// `warm`: the backing directory holds the (clean) base generation the cache had, whose
    /// entries stay where they are as old material: every node of it, whole, partial or
    /// pending, moves to `hyd_old`, and each directory, when materialized, keeps what did not
    /// change (`src/hydrate/`). Otherwise the backing directory's old entries go when the
    /// root is materialized.
    pub fn lazy_restore(
        &mut self,
        base: &Base,
        root: (u64, &[u8], &[u8]),
        totals: Totals,
        warm: bool,
    ) -> anyhow::Result<()> {
        let (root_ino, root_handle, root_node) = root;
        let old_root = self.meta("base_root")?;
        let mut map = self.nodes.map.write();
        let tx = self.conn.transaction()?;
        if warm {
            // The root's old material: a materialized root holds the old base's root tree; a
            // root still pending holds what its warm row says (or nothing).
            let root_pending: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM hyd_dirs WHERE ino = ?1)",
                [root_ino as i64],
                |r| r.get(0),
            )?;
            let same_root = old_root.as_deref() == Some(base.root.as_str());
            if root_pending {
                if !same_root {
                    tx.execute(
                        "UPDATE hyd_warm SET same = 0 WHERE ino = ?1",
                        [root_ino as i64],
                    )?;
                }
            } else {
                tx.execute(
                    "INSERT OR REPLACE INTO hyd_warm (ino, same, trust) VALUES (?1, ?2, NULL)",
                    params![root_ino as i64, same_root as i64],
                )?;
            }
            // Later states win: a partial file or a pending directory also has a node row.
            tx.execute_batch(
                "INSERT OR REPLACE INTO hyd_old (ino, state, node, valid_end, present)
                     SELECT ino, 0, content, NULL, NULL FROM nodes;
                 INSERT OR REPLACE INTO hyd_old (ino, state, node, valid_end, present)
                     SELECT ino, 1, node, valid_end, present FROM hyd_files;
                 INSERT OR REPLACE INTO hyd_old (ino, state, node, valid_end, present)
                     SELECT ino, 2, node, NULL, NULL FROM hyd_dirs;",
            )?;
        } else {
            tx.execute_batch("DELETE FROM hyd_old; DELETE FROM hyd_warm;")?;
        }
        tx.execute_batch(
            "DELETE FROM nodes; DELETE FROM hyd_files; DELETE FROM hyd_dirs;
             DELETE FROM hyd_links; DELETE FROM meta WHERE key IN ('pending', 'rollback');",
        )?;
        tx.execute(
            "INSERT INTO hyd_dirs (ino, handle, node) VALUES (?1, ?2, ?3)",
            params![root_ino as i64, root_handle, root_node],
        )?;
        {
            let mut meta = put_base(&tx, base)?;
            meta.execute(params!["hyd_total_files", totals.files.to_string()])?;
            meta.execute(params!["hyd_total_bytes", totals.bytes.to_string()])?;
            meta.execute(params!["hyd_missing_files", totals.files.to_string()])?;
            meta.execute(params!["hyd_missing_bytes", totals.bytes.to_string()])?;
            meta.execute(params!["hyd_generation", base.generation.to_string()])?;
        }
        // Crash window: nothing of the transaction is in the file yet.
        fail::fail_point!("lazy-restore-before-commit");
        tx.commit()?;
        map.clear();
        Ok(())
    }

    pub fn blob(&self, id: &[u8; 32]) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row("SELECT data FROM blobs WHERE id = ?1", [&id[..]], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Where blob `id` is in the store, for deduplication: never in a pack a GC condemned
    /// ([`LocalState::set_condemned`]), and `None` for a row that does not decode or names
    /// another blob.
    pub fn chunk(&self, id: &[u8; 32]) -> anyhow::Result<Option<owsfs_store::BlobRef>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT loc FROM chunks WHERE id = ?1")?;
        let loc: Option<Vec<u8>> = stmt.query_row([&id[..]], |r| r.get(0)).optional()?;
        Ok(loc
            .and_then(|l| serde_json::from_slice::<owsfs_store::BlobRef>(&l).ok())
            .filter(|r| r.id.0 == *id && !self.condemned.contains(&r.pack)))
    }

    /// The packs a GC condemned (`owsfs_store::gc::GcWatch`): deduplication avoids them.
    pub fn set_condemned(&mut self, packs: std::collections::HashSet<owsfs_store::PackId>) {
        self.condemned = packs;
    }

    /// Forgets the base generation and the deduplication index: the next cut reads every
    /// file and references nothing it did not upload itself (the base's packs may be gone).
    /// Bytes that are not local yet (lazy hydration) can then not be read.
    pub fn forget_base(&mut self) -> anyhow::Result<()> {
        let mut map = self.nodes.map.write();
        let tx = self.conn.transaction()?;
        tx.execute_batch(
            "DELETE FROM nodes; DELETE FROM chunks;
             DELETE FROM meta WHERE key IN ('base_generation', 'base_epoch', 'base_root', 'pending');",
        )?;
        tx.commit()?;
        map.clear();
        Ok(())
    }

    /// Drops from the deduplication index every blob in one of `packs` (condemned by a GC: a
    /// later blob of the same content is uploaded anew).
    pub fn purge_chunks(
        &self,
        packs: &std::collections::HashSet<owsfs_store::PackId>,
    ) -> anyhow::Result<u64> {
        if packs.is_empty() {
            return Ok(0);
        }
        let mut gone: Vec<Vec<u8>> = Vec::new();
        {
            let mut stmt = self.conn.prepare("SELECT id, loc FROM chunks")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let loc: Vec<u8> = row.get(1)?;
                if serde_json::from_slice::<owsfs_store::BlobRef>(&loc)
                    .is_ok_and(|r| packs.contains(&r.pack))
                {
                    gone.push(row.get(0)?);
                }
            }
        }
        let tx = self.conn.unchecked_transaction()?;
        {
            let mut del = tx.prepare("DELETE FROM chunks WHERE id = ?1")?;
            for id in &gone {
                del.execute([id])?;
            }
        }
        tx.commit()?;
        Ok(gone.len() as u64)
    }

    /// Forgets the whole deduplication index (GC runs were missed: any pack may be gone).
    pub fn forget_chunks(&self) -> anyhow::Result<()> {
        self.conn.execute("DELETE FROM chunks", [])?;
        Ok(())
    }

    pub fn totals(&self, id: &[u8; 32]) -> anyhow::Result<Option<Totals>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT files, dirs, bytes FROM totals WHERE id = ?1")?;
        Ok(stmt
            .query_row([&id[..]], |r| {
                Ok(Totals {
                    files: r.get::<_, i64>(0)? as u64,
                    dirs: r.get::<_, i64>(1)? as u64,
                    bytes: r.get::<_, i64>(2)? as u64,
                })
            })
            .optional()?)
    }

    /// Records a new base generation and its changes, in one transaction.
    pub fn commit(&mut self, base: &Base, update: Update) -> anyhow::Result<()> {
        // Held across the transaction: the hydrator adds nodes under it too.
        let mut map = self.nodes.map.write();
        let late = self.nodes.late.lock().take().unwrap_or_default();
        let tx = self.conn.transaction()?;
        if update.replace_all_nodes {
            tx.execute("DELETE FROM nodes", [])?;
        }
        {
            let mut put_node = tx.prepare_cached(
                "INSERT OR REPLACE INTO nodes (ino, kind, content) VALUES (?1, ?2, ?3)",
            )?;
            for (ino, kind, content) in &update.nodes {
                put_node.execute(params![*ino as i64, kind.byte() as i64, content])?;
            }
            // Materialized after the capture: a full walk did not see them.
            if update.replace_all_nodes {
                for (ino, kind, content) in &late {
                    put_node.execute(params![*ino as i64, kind.byte() as i64, content])?;
                }
            }
            let mut put_blob =
                tx.prepare_cached("INSERT OR IGNORE INTO blobs (id, data) VALUES (?1, ?2)")?;
            for (id, data) in &update.blobs {
                put_blob.execute(params![&id[..], data])?;
            }
            let mut put_chunk =
                tx.prepare_cached("INSERT OR REPLACE INTO chunks (id, loc) VALUES (?1, ?2)")?;
            for (id, loc) in &update.chunks {
                put_chunk.execute(params![&id[..], loc])?;
            }
            let mut put_totals = tx.prepare_cached(
                "INSERT OR IGNORE INTO totals (id, files, dirs, bytes) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (id, t) in &update.totals {
                put_totals.execute(params![
                    &id[..],
                    t.files as i64,
                    t.dirs as i64,
                    t.bytes as i64
                ])?;
            }
            put_base(&tx, base)?;
            tx.execute("DELETE FROM meta WHERE key = 'pending'", [])?;
        }
        tx.commit()?;
        if update.replace_all_nodes {
            map.clear();
        }
        for (ino, kind, content) in update.nodes {
            map.insert(ino, (kind, content));
        }
        if update.replace_all_nodes {
            for (ino, kind, content) in late {
                map.insert(ino, (kind, content));
            }
        }
        Ok(())
    }
}

/// Writes the base generation's meta rows; returns the meta upsert for more.
fn put_base<'t>(
    tx: &'t rusqlite::Transaction<'_>,
    base: &Base,
) -> anyhow::Result<rusqlite::CachedStatement<'t>> {
    let mut meta = tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?;
    meta.execute(params!["base_generation", base.generation.to_string()])?;
    meta.execute(params!["base_epoch", base.epoch.to_string()])?;
    meta.execute(params!["base_root", base.root])?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_survives_reopen_and_replace_all_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut s = LocalState::open(&path).unwrap();
        assert_eq!(s.base().unwrap(), None);
        let loc = owsfs_store::BlobRef::plain(
            owsfs_store::BlobId([2; 32]),
            owsfs_store::PackId([9; 32]),
            16,
            4,
        );
        let base = Base {
            generation: 3,
            epoch: 1,
            root: "r".into(),
        };
        s.commit(
            &base,
            Update {
                nodes: vec![
                    (5, Kind::File, b"c5".to_vec()),
                    (6, Kind::Dir, b"c6".to_vec()),
                ],
                blobs: vec![([1; 32], b"tree".to_vec())],
                chunks: vec![([2; 32], serde_json::to_vec(&loc).unwrap())],
                totals: vec![(
                    [3; 32],
                    Totals {
                        files: 1,
                        dirs: 2,
                        bytes: 3,
                    },
                )],
                replace_all_nodes: false,
            },
        )
        .unwrap();
        drop(s);
        let mut s = LocalState::open(&path).unwrap();
        assert_eq!(s.base().unwrap(), Some(base.clone()));
        assert_eq!(s.node(5), Some((Kind::File, b"c5".to_vec())));
        assert_eq!(s.blob(&[1; 32]).unwrap(), Some(b"tree".to_vec()));
        assert_eq!(s.chunk(&[2; 32]).unwrap(), Some(loc));
        // A pack a GC condemned is not offered for deduplication.
        s.set_condemned([loc.pack].into_iter().collect());
        assert_eq!(s.chunk(&[2; 32]).unwrap(), None);
        s.set_condemned(Default::default());
        assert_eq!(
            s.purge_chunks(&[loc.pack].into_iter().collect()).unwrap(),
            1
        );
        assert_eq!(s.chunk(&[2; 32]).unwrap(), None);
        assert_eq!(s.totals(&[3; 32]).unwrap().map(|t| t.bytes), Some(3));
        s.commit(
            &base,
            Update {
                nodes: vec![(7, Kind::File, b"c7".to_vec())],
                replace_all_nodes: true,
                ..Update::default()
            },
        )
        .unwrap();
        assert_eq!(s.node(5), None);
        assert_eq!(s.node_count(), 1);
    }
}
