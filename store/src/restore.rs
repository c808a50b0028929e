//! Restoring a generation into a local directory, and a local cache of tree and list blobs.
//!
//! Order: the skeleton (directories, files at their final size, symlinks, special files),
//! then file contents grouped by pack (each pack fetched once, a few at a time, every blob
//! verified), then hard links, then metadata bottom-up (xattrs, owner when root, mode,
//! mtime; directories last, deepest first, so writing into them does not move their mtime).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use rustix::fs::{AtFlags, CWD, FileType, Mode, Timestamps, XattrFlags};

use crate::backend::Store;
use crate::error::{Result, StoreError};
use crate::generation::GenerationRecord;
use crate::ids::{BlobId, PackId};
use crate::pack::{BlobRef, ParsedPack, read_blob, read_pack, verify_blob};
use crate::tree::{BlobLoader, Content, NodeKind, Tree, TreeEntry, file_chunks};

/// Packs fetched at the same time.
pub const RESTORE_PARALLEL_PACKS: usize = 4;

/// Where a restore stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreProgress {
    pub phase: RestorePhase,
    pub files_total: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub packs_total: u64,
    pub packs_done: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestorePhase {
    #[default]
    Skeleton,
    Contents,
    Links,
    Metadata,
    Done,
}

/// A local directory cache of verified tree and list blobs: `dir/<2 hex>/<64 hex>`.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    pub fn new(dir: impl Into<PathBuf>) -> Result<BlobCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| {
            StoreError::io(format!("cannot create blob cache {}", dir.display()), e)
        })?;
        Ok(BlobCache { dir })
    }

    fn path(&self, id: &BlobId) -> PathBuf {
        let h = id.to_hex();
        self.dir.join(&h[..2]).join(h)
    }

    /// The cached blob, verified; a cached copy that fails verification is removed.
    pub fn get(&self, id: &BlobId) -> Option<Bytes> {
        let p = self.path(id);
        let b = std::fs::read(&p).ok()?;
        if BlobId::of(&b) != *id {
            tracing::warn!("cached blob {} is corrupt; removing it", p.display());
            let _ = std::fs::remove_file(&p);
            return None;
        }
        Some(Bytes::from(b))
    }

    /// Stores a verified blob (write to a temporary name, then rename).
    pub fn put(&self, id: &BlobId, data: &[u8]) -> Result<()> {
        let p = self.path(id);
        let ctx = |e| StoreError::io(format!("cannot write cached blob {}", p.display()), e);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(ctx)?;
        }
        let tmp = p.with_extension(format!("tmp{}", hex::encode(rand::random::<[u8; 6]>())));
        let r = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            std::fs::rename(&tmp, &p)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r.map_err(ctx)
    }
}

/// A loader that consults a [`BlobCache`] before the inner loader, and fills it.
pub struct CachedLoader<'a> {
    pub cache: &'a BlobCache,
    pub inner: &'a dyn BlobLoader,
}

impl BlobLoader for CachedLoader<'_> {
    fn load(&self, r: &BlobRef) -> Result<Bytes> {
        if let Some(b) = self.cache.get(&r.id) {
            return Ok(b);
        }
        let b = self.inner.load(r)?;
        if let Err(e) = self.cache.put(&r.id, &b) {
            tracing::warn!("{e}");
        }
        Ok(b)
    }
}

struct Node {
    path: PathBuf,
    entry: TreeEntry,
    depth: usize,
}

fn io_at(what: &str, path: &Path) -> impl Fn(std::io::Error) -> StoreError {
    let m = format!("restore: cannot {what} {}", path.display());
    move |e| StoreError::io(m.clone(), e)
}

fn rx(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// Restores `gen` into the empty directory `dest`. On error `dest` holds a partial tree that
/// the caller discards.
pub fn restore(
    store: &Store,
    generation: &GenerationRecord,
    dest: &Path,
    progress: &(dyn Fn(RestoreProgress) + Sync),
) -> Result<()> {
    restore_with(store, store, generation, dest, progress)
}

/// [`restore`] with tree and list blobs loaded through `loader` (e.g. a [`CachedLoader`]).
pub fn restore_with(
    store: &Store,
    loader: &dyn BlobLoader,
    generation: &GenerationRecord,
    dest: &Path,
    progress: &(dyn Fn(RestoreProgress) + Sync),
) -> Result<()> {
    let mut rd = std::fs::read_dir(dest).map_err(io_at("open destination", dest))?;
    if rd.next().is_some() {
        return Err(StoreError::Invalid(format!(
            "restore destination {} is not empty",
            dest.display()
        )));
    }
    let Some(root) = generation.root else {
        return Err(StoreError::Invalid(format!(
            "generation {} of {} is a fence record and has no tree",
            generation.number, generation.workspace
        )));
    };
    let mut prog = RestoreProgress::default();
    progress(prog);

    // Walk the trees; create the skeleton on the way.
    let is_root = rustix::process::geteuid().is_root();
    let root_tree = Tree::load(loader, &root)?;
    let mut nodes: Vec<Node> = Vec::new();
    let mut stack = vec![(dest.to_path_buf(), root_tree, 1usize)];
    let mut primaries: HashMap<u64, PathBuf> = HashMap::new();
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    // (file path, file offset, blob) of every chunk to write, grouped later by pack.
    let mut writes: Vec<(usize, u64, BlobRef)> = Vec::new();
    let mut file_paths: Vec<PathBuf> = Vec::new();
    while let Some((dir, tree, depth)) = stack.pop() {
        for e in tree.entries {
            let path = dir.join(OsStr::from_bytes(&e.name));
            match (&e.kind, &e.content) {
                (NodeKind::Dir, Content::Dir(r)) => {
                    std::fs::create_dir(&path).map_err(io_at("create directory", &path))?;
                    stack.push((path.clone(), Tree::load(loader, r)?, depth + 1));
                }
                (NodeKind::File, Content::File(fc)) => {
                    if e.link_key != 0 {
                        if let Some(p) = primaries.get(&e.link_key) {
                            links.push((p.clone(), path));
                            continue;
                        }
                        primaries.insert(e.link_key, path.clone());
                    }
                    let f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map_err(io_at("create file", &path))?;
                    f.set_len(e.size).map_err(io_at("size file", &path))?;
                    let idx = file_paths.len();
                    file_paths.push(path.clone());
                    for s in file_chunks(loader, fc)? {
                        writes.push((idx, s.offset, s.r));
                    }
                    prog.files_total += 1;
                    prog.bytes_total += e.size;
                }
                (NodeKind::Symlink, Content::Symlink(t)) => {
                    std::os::unix::fs::symlink(OsStr::from_bytes(t), &path)
                        .map_err(io_at("create symlink", &path))?;
                }
                (kind, _) => {
                    let ft = match kind {
                        NodeKind::Fifo => FileType::Fifo,
                        NodeKind::CharDev => FileType::CharacterDevice,
                        NodeKind::BlockDev => FileType::BlockDevice,
                        _ => FileType::Socket,
                    };
                    match rustix::fs::mknodat(CWD, &path, ft, Mode::from_raw_mode(0o600), e.rdev) {
                        Ok(()) => {}
                        Err(err) if !is_root && err == rustix::io::Errno::PERM => {
                            tracing::warn!(
                                "restore: skipping {} ({kind:?}): creating it needs root",
                                path.display()
                            );
                            continue;
                        }
                        Err(err) => return Err(io_at("create node", &path)(rx(err))),
                    }
                }
            }
            nodes.push(Node {
                path,
                entry: e,
                depth,
            });
        }
    }

    // Contents, grouped by pack.
    let mut by_pack: HashMap<PackId, Vec<(usize, u64, BlobRef)>> = HashMap::new();
    for w in writes {
        by_pack.entry(w.2.pack).or_default().push(w);
    }
    let packs: Vec<_> = by_pack.into_iter().collect();
    prog.phase = RestorePhase::Contents;
    prog.packs_total = packs.len() as u64;
    progress(prog);
    let next = AtomicU64::new(0);
    let done_packs = AtomicU64::new(0);
    let done_bytes = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let first_err: Mutex<Option<StoreError>> = Mutex::new(None);
    let base = prog;
    std::thread::scope(|sc| {
        for _ in 0..RESTORE_PARALLEL_PACKS.min(packs.len()) {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Relaxed) as usize;
                    if i >= packs.len() || stop.load(Relaxed) {
                        return;
                    }
                    let (pack, items) = &packs[i];
                    match restore_pack(store, *pack, items, &file_paths) {
                        Ok(n) => {
                            let p = RestoreProgress {
                                packs_done: done_packs.fetch_add(1, Relaxed) + 1,
                                bytes_done: done_bytes.fetch_add(n, Relaxed) + n,
                                ..base
                            };
                            progress(p);
                        }
                        Err(e) => {
                            stop.store(true, Relaxed);
                            if let Ok(mut g) = first_err.lock() {
                                g.get_or_insert(e);
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    prog.packs_done = done_packs.load(Relaxed);
    prog.bytes_done = done_bytes.load(Relaxed);

    prog.phase = RestorePhase::Links;
    progress(prog);
    for (from, to) in &links {
        std::fs::hard_link(from, to).map_err(io_at("create hard link", to))?;
    }

    prog.phase = RestorePhase::Metadata;
    progress(prog);
    // Non-directories first, then directories deepest first.
    nodes.sort_by_key(|n| (n.entry.kind == NodeKind::Dir, std::cmp::Reverse(n.depth)));
    for n in &nodes {
        apply_metadata(&n.path, &n.entry, is_root)?;
    }
    prog.phase = RestorePhase::Done;
    progress(prog);
    Ok(())
}

/// Writes the blobs of one pack; returns the bytes written.
fn restore_pack(
    store: &Store,
    pack: PackId,
    items: &[(usize, u64, BlobRef)],
    files: &[PathBuf],
) -> Result<u64> {
    let mut unique: HashMap<BlobId, BlobRef> = HashMap::new();
    for (_, _, r) in items {
        unique.insert(r.id, *r);
    }
    let needed: u64 = unique.values().map(|r| r.len as u64).sum();
    let extent = unique
        .values()
        .map(|r| r.offset + r.len as u64)
        .max()
        .unwrap_or(0);
    // Fetch the whole pack when a good part of it is needed, else range reads.
    let whole: Option<ParsedPack> = if needed * 4 > extent {
        Some(read_pack(store, pack)?)
    } else {
        None
    };
    let mut blobs: HashMap<BlobId, Bytes> = HashMap::new();
    for r in unique.values() {
        let b = match &whole {
            Some(p) => p.blob(r)?,
            None => read_blob(store, r)?,
        };
        verify_blob(r, &b)?;
        blobs.insert(r.id, b);
    }
    let mut open: HashMap<usize, File> = HashMap::new();
    let mut written = 0u64;
    for (fi, off, r) in items {
        let path = &files[*fi];
        let f = match open.entry(*fi) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(
                OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io_at("open file", path))?,
            ),
        };
        let b = &blobs[&r.id];
        f.write_all_at(b, *off).map_err(io_at("write file", path))?;
        written += b.len() as u64;
    }
    Ok(written)
}

fn apply_metadata(path: &Path, e: &TreeEntry, is_root: bool) -> Result<()> {
    for (name, value) in &e.xattrs {
        rustix::fs::lsetxattr(path, OsStr::from_bytes(name), value, XattrFlags::empty())
            .map_err(|err| io_at("set xattr on", path)(rx(err)))?;
    }
    if is_root {
        rustix::fs::chownat(
            CWD,
            path,
            Some(rustix::fs::Uid::from_raw(e.uid)),
            Some(rustix::fs::Gid::from_raw(e.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|err| io_at("chown", path)(rx(err)))?;
    }
    if e.kind != NodeKind::Symlink {
        rustix::fs::chmodat(CWD, path, Mode::from_raw_mode(e.mode), AtFlags::empty())
            .map_err(|err| io_at("chmod", path)(rx(err)))?;
    }
    let ts = rustix::fs::Timespec {
        tv_sec: e.mtime_sec,
        tv_nsec: e.mtime_nsec as _,
    };
    let times = Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|err| io_at("set times of", path)(rx(err)))?;
    Ok(())
}
