//! The part of a cut that runs after the barrier: reads the frozen files (only their dirty
//! ranges, re-chunked against the base generation's chunks), builds the new tree blobs bottom
//! up, and packs everything new for upload.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use owsfs_fuse::{Freezer, Frozen};
use owsfs_journal::{DirtyState, InoMap};
use owsfs_store::{
    BlobId, BlobKind, BlobLoader, BlobRef, ChunkSpan, Content, FileContent, NodeKind, PackId,
    Store, Tree, TreeEntry,
};

use super::capture::{Capture, EntryCapture};
use super::packer::Packer;
use super::wal;
use owsfs_local::{Kind, LocalState, Totals, Update, decode_node, encode_node};

/// A database and where its WAL stood at the cut.
pub type SqlitePosition = owsfs_store::generation::SqliteState;

/// What a cut produced, ready to commit.
pub struct Built {
    pub root: BlobRef,
    pub access: Option<BlobRef>,
    pub update: Update,
    pub sqlite: Vec<SqlitePosition>,
    pub files: u64,
    pub dirs: u64,
    pub bytes_total: u64,
    pub bytes_new: u64,
    pub blobs_new: u64,
    pub packs_new: u64,
    pub bytes_read: u64,
    /// Every pack a blob made or deduplicated by this cut is in (a GC must not have
    /// condemned any of them when the generation is committed).
    pub packs_used: std::collections::HashSet<PackId>,
}

/// Loads tree and list blobs from the cache's state, or else from the store (verified).
pub struct Loader<'a> {
    pub local: &'a LocalState,
    pub store: &'a Store,
}

impl BlobLoader for Loader<'_> {
    fn load(&self, r: &BlobRef) -> owsfs_store::Result<Bytes> {
        if let Ok(Some(data)) = self.local.blob(&r.id.0)
            && BlobId::of(&data) == r.id
        {
            return Ok(Bytes::from(data));
        }
        owsfs_store::read_blob(self.store, r)
    }
}

/// Makes bytes `[start, end)` of a backing inode local before they are read (lazy
/// hydration).
pub type Fetch<'a> = dyn Fn(u64, u64, u64) -> io::Result<()> + 'a;

/// Reads the frozen files and builds the tree of the cut.
#[allow(clippy::too_many_arguments)]
pub fn build(
    store: &Store,
    local: &LocalState,
    root_fd: &impl AsFd,
    capture: &Capture,
    dirty: &DirtyState,
    frozen: &[Arc<Frozen>],
    freezer: &Freezer,
    inos: InoMap,
    previous_sqlite: &[SqlitePosition],
    fetch: &Fetch<'_>,
    access: &[u8],
) -> anyhow::Result<Built> {
    let loader = Loader { local, store };
    let mut packer = Packer::new(
        store,
        local,
        Update {
            replace_all_nodes: capture.full,
            ..Update::default()
        },
    );
    let mut contents: HashMap<u64, FileContent> = HashMap::new();
    let mut sqlite: BTreeMap<String, SqlitePosition> = BTreeMap::new();
    let mut bytes_read = 0u64;

    for f in frozen {
        let result = read_frozen(
            &mut packer,
            &loader,
            root_fd,
            f,
            dirty,
            inos,
            &mut sqlite,
            &mut bytes_read,
            fetch,
        );
        // Done with it either way: later writes need not save anything for this cut.
        freezer.finish(f);
        let content = result.with_context(|| format!("read /{}", f.path.display()))?;
        contents.insert(f.ino.0, content);
    }

    let (root, totals) = build_trees(&mut packer, &loader, local, capture, &contents)?;
    let access = if access.is_empty() {
        None
    } else {
        Some(packer.emit_as(BlobKind::Chunk, access, false)?)
    };
    packer.flush()?;

    // Positions of databases this cut did not read carry over while they still exist.
    for p in previous_sqlite {
        if !sqlite.contains_key(&p.path) && exists_after(capture, Path::new(&p.path)) {
            sqlite.insert(p.path.clone(), p.clone());
        }
    }
    Ok(Built {
        root,
        access,
        update: packer.update,
        sqlite: sqlite.into_values().collect(),
        files: totals.files,
        dirs: totals.dirs + 1,
        bytes_total: totals.bytes,
        bytes_new: packer.bytes_new,
        blobs_new: packer.blobs_new,
        packs_new: packer.packs_new,
        packs_used: packer.used,
        bytes_read,
    })
}

/// Builds the tree blobs of the rebuilt directories, deepest first: entries from the capture,
/// file contents from the files read (`contents`) or else the base generation, subtrees from
/// the directories just built or else the base generation. Returns the root and its totals.
fn build_trees(
    packer: &mut Packer<'_>,
    loader: &Loader<'_>,
    local: &LocalState,
    capture: &Capture,
    contents: &HashMap<u64, FileContent>,
) -> anyhow::Result<(BlobRef, Totals)> {
    // Trees, deepest directories first.
    let mut order: Vec<&PathBuf> = capture.dirs.keys().collect();
    order.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let mut built_dirs: HashMap<&Path, (BlobRef, Totals)> = HashMap::new();
    let mut known_totals: HashMap<BlobId, Totals> = HashMap::new();
    for path in order {
        let dir = &capture.dirs[path];
        let mut tree = Tree::default();
        let mut totals = Totals::default();
        for e in &dir.entries {
            let child = path.join(&e.name);
            let content = match e.stat.file_type() {
                libc::S_IFREG => {
                    totals.files += 1;
                    totals.bytes += e.stat.size;
                    let c = match contents.get(&e.stat.ino) {
                        Some(c) => {
                            let mut c = c.clone();
                            packer.resolve_content(&mut c)?;
                            c
                        }
                        None => match base_entry(local, e.stat.ino, Kind::File)? {
                            Some(TreeEntry {
                                content: Content::File(c),
                                ..
                            }) => c,
                            _ => bail!("/{}: neither read nor known to the cache", child.display()),
                        },
                    };
                    Content::File(c)
                }
                libc::S_IFDIR => {
                    let (r, below) = match built_dirs.get(child.as_path()) {
                        Some(built) => *built,
                        None => match base_entry(local, e.stat.ino, Kind::Dir)? {
                            Some(TreeEntry {
                                content: Content::Dir(r),
                                ..
                            }) => {
                                let t = subtree_totals(
                                    loader,
                                    &r,
                                    &mut known_totals,
                                    &mut packer.update,
                                )
                                .with_context(|| format!("count /{}", child.display()))?;
                                (r, t)
                            }
                            _ => bail!("/{}: directory neither listed nor known", child.display()),
                        },
                    };
                    totals.dirs += 1;
                    totals.add(below);
                    Content::Dir(r)
                }
                libc::S_IFLNK => Content::Symlink(e.symlink_target.clone().unwrap_or_default()),
                _ => Content::None,
            };
            let mut entry = tree_entry(e, content)?;
            // A hard-linked file keeps the key the base generation gave it: its names in
            // directories this cut did not rebuild still carry that key.
            if entry.link_key != 0
                && let Some(prev) = base_entry(local, e.stat.ino, Kind::File)?
                && prev.link_key != 0
            {
                entry.link_key = prev.link_key;
            }
            let kind_byte = match entry.kind {
                NodeKind::File => Some(Kind::File),
                NodeKind::Dir => Some(Kind::Dir),
                _ => None,
            };
            if let Some(k) = kind_byte {
                packer
                    .update
                    .nodes
                    .push((e.stat.ino, k, encode_node(&entry)?));
            }
            tree.entries.push(entry);
        }
        let blob = tree.encode()?;
        let r = packer.emit_as(BlobKind::Tree, &blob, !path.as_os_str().is_empty())?;
        packer.update.totals.push((r.id.0, totals));
        built_dirs.insert(path.as_path(), (r, totals));
    }
    let built = *built_dirs
        .get(Path::new(""))
        .context("the cut did not list the root")?;
    Ok(built)
}

/// What the unchanged tree `r` holds: from the cache's record, or else counted by loading its
/// trees (once; the counts are then recorded with the generation).
fn subtree_totals(
    loader: &Loader<'_>,
    r: &BlobRef,
    known: &mut HashMap<BlobId, Totals>,
    update: &mut Update,
) -> anyhow::Result<Totals> {
    if let Some(t) = known.get(&r.id) {
        return Ok(*t);
    }
    if let Some(t) = loader.local.totals(&r.id.0)? {
        known.insert(r.id, t);
        return Ok(t);
    }
    let tree = Tree::load(loader, r)?;
    let mut t = Totals::default();
    for e in &tree.entries {
        match &e.content {
            Content::File(_) => {
                t.files += 1;
                t.bytes += e.size;
            }
            Content::Dir(sub) => {
                t.dirs += 1;
                t.add(subtree_totals(loader, sub, known, update)?);
            }
            _ => {}
        }
    }
    known.insert(r.id, t);
    update.totals.push((r.id.0, t));
    Ok(t)
}

/// Whether `path` is in the new tree, as far as the rebuilt directories tell.
fn exists_after(capture: &Capture, path: &Path) -> bool {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return false;
    };
    match capture.dirs.get(dir) {
        Some(d) => d.entries.iter().any(|e| e.name == name),
        None => true,
    }
}

fn base_entry(local: &LocalState, ino: u64, kind: Kind) -> anyhow::Result<Option<TreeEntry>> {
    match local.node(ino) {
        Some((k, bytes)) if k == kind => Ok(Some(decode_node(&bytes)?)),
        _ => Ok(None),
    }
}

fn tree_entry(e: &EntryCapture, content: Content) -> anyhow::Result<TreeEntry> {
    let st = &e.stat;
    let kind = match st.file_type() {
        libc::S_IFREG => NodeKind::File,
        libc::S_IFDIR => NodeKind::Dir,
        libc::S_IFLNK => NodeKind::Symlink,
        libc::S_IFIFO => NodeKind::Fifo,
        libc::S_IFCHR => NodeKind::CharDev,
        libc::S_IFBLK => NodeKind::BlockDev,
        libc::S_IFSOCK => NodeKind::Socket,
        other => bail!("{:?}: unknown file type {other:o}", e.name),
    };
    let size = match kind {
        NodeKind::File => st.size,
        NodeKind::Symlink => e.symlink_target.as_ref().map_or(0, |t| t.len() as u64),
        _ => 0,
    };
    Ok(TreeEntry {
        name: e.name.as_bytes().to_vec(),
        kind,
        mode: st.mode & 0o7777,
        uid: st.uid,
        gid: st.gid,
        mtime_sec: st.mtime_sec,
        mtime_nsec: st.mtime_nsec,
        size,
        rdev: if matches!(kind, NodeKind::CharDev | NodeKind::BlockDev) {
            st.rdev
        } else {
            0
        },
        link_key: if kind == NodeKind::File && st.nlink > 1 {
            st.ino
        } else {
            0
        },
        xattrs: e.xattrs.clone(),
        content,
    })
}

/// Reads one frozen file: only the dirty ranges when the base generation has its chunks.
#[allow(clippy::too_many_arguments)]
fn read_frozen(
    packer: &mut Packer<'_>,
    loader: &Loader<'_>,
    root_fd: &impl AsFd,
    f: &Frozen,
    dirty: &DirtyState,
    inos: InoMap,
    sqlite: &mut BTreeMap<String, SqlitePosition>,
    bytes_read: &mut u64,
    fetch: &Fetch<'_>,
) -> anyhow::Result<FileContent> {
    let mut opened: Option<File> = None;
    let mut read_at = |off: u64, buf: &mut [u8]| -> io::Result<()> {
        // Bytes not fetched yet are the base generation's: fetched into the live file first.
        fetch(f.ino.0, off, off + buf.len() as u64)?;
        let n = f.read_at(root_fd, &mut opened, buf, off)?;
        *bytes_read += n as u64;
        if n < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read past the cut size at {off}"),
            ));
        }
        Ok(())
    };

    let d = dirty.files.get(&inos.fuse(f.ino));
    let base = match loader.local.node(f.ino.0) {
        Some((Kind::File, bytes)) if !d.is_some_and(|d| d.created) => {
            match decode_node(&bytes)?.content {
                Content::File(c) => Some(c),
                _ => None,
            }
        }
        _ => None,
    };
    let (old, old_len): (Vec<ChunkSpan>, u64) = match &base {
        Some(c) => {
            let spans = owsfs_store::tree::file_chunks(loader, c)?;
            let len = spans.last().map_or(0, |s| s.end());
            (spans, len)
        }
        None => (Vec::new(), 0),
    };
    let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
    if base.is_some() {
        if let Some(d) = d {
            ranges.extend(d.extents.iter().map(|(s, e)| s..e));
            if let Some(t) = d.truncated_to {
                ranges.push(t..u64::MAX);
            }
        }
        // Bytes past the base's end are new whatever the journal says: a journal that lost a
        // record (damage) must not leave a commit that can never be encoded.
        if f.size > old_len {
            ranges.push(old_len..f.size);
        }
        ranges = normalize(ranges, f.size);
    }
    // Chunks are encoded in batches on every core: their refs stay provisional until a list
    // blob or the tree needs them final.
    let mut emit = |data: &[u8]| packer.chunk(data);
    let spans =
        owsfs_store::chunk::rechunk(&old, old_len, f.size, &ranges, &mut read_at, &mut emit)?;
    let mut refs: Vec<BlobRef> = spans.iter().map(|s| s.r).collect();
    if refs.len() > owsfs_store::tree::MAX_INLINE_CHUNKS {
        for r in refs.iter_mut() {
            *r = packer.resolve(*r)?;
        }
    }
    let content = owsfs_store::tree::build_file_content_with(refs, &mut |k, b| packer.emit(k, b))?;

    // SQLite: a WAL's position, and a database's page count.
    let name = f.path.file_name().map(|n| n.as_bytes()).unwrap_or_default();
    if let Some(db) = name.strip_suffix(b"-wal") {
        let db_path = f.path.with_file_name(std::ffi::OsStr::from_bytes(db));
        let mut bytes = vec![0u8; f.size as usize];
        fetch(f.ino.0, 0, f.size)?;
        let mut opened2: Option<File> = None;
        let n = f.read_at(root_fd, &mut opened2, &mut bytes, 0)?;
        bytes.truncate(n);
        let key = db_path.to_string_lossy().into_owned();
        let entry = sqlite.entry(key.clone()).or_insert(SqlitePosition {
            path: key,
            wal: None,
        });
        entry.wal = wal::parse(&bytes);
    } else if f.size >= 100 {
        let mut head = [0u8; 100];
        fetch(f.ino.0, 0, 100)?;
        let mut opened2: Option<File> = None;
        if f.read_at(root_fd, &mut opened2, &mut head, 0)? == 100 && wal::db_pages(&head).is_some()
        {
            let key = f.path.to_string_lossy().into_owned();
            sqlite.entry(key.clone()).or_insert(SqlitePosition {
                path: key,
                wal: None,
            });
        }
    }
    Ok(content)
}

/// Sorted, coalesced ranges clipped to `len`.
fn normalize(mut r: Vec<std::ops::Range<u64>>, len: u64) -> Vec<std::ops::Range<u64>> {
    r.retain(|x| x.start < x.end.min(len));
    for x in r.iter_mut() {
        x.end = x.end.min(len);
    }
    r.sort_by_key(|x| x.start);
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for x in r {
        match out.last_mut() {
            Some(last) if x.start <= last.end => last.end = last.end.max(x.end),
            _ => out.push(x),
        }
    }
    out
}
