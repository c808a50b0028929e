//! Full restore of a tree into an empty directory, through the node writer (`crate::write`),
//! recording every restored inode for the cache state so the next cut knows what it need not
//! read.
//!
//! Order: the skeleton (directories, files sparse at their final size, symlinks, fifos and
//! devices), then file content grouped by pack (a pack from which many chunks are needed is
//! fetched whole, otherwise blob by blob; every blob is verified by hash before it is
//! written), then the extra names of hard-linked files, then attributes bottom up (files
//! first, then directories deepest first, so writing into a directory no longer moves its
//! times). Any error aborts: the caller discards the directory, nothing half-restored is
//! served.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use owsfs_store::{
    BlobLoader, BlobRef, ChunkSpan, Content, NodeKind, PackId, Store, Tree, TreeEntry,
};
use rustix::fs::{AtFlags, Mode, OFlags};

use crate::node::encode_node;
use crate::progress::Progress;
use crate::state::{Kind, Update};
use crate::write::{self, Created};

/// Restores the tree `root` into `dest` (an existing, empty directory). Tree and list blobs
/// come through `loader` (a cache's blobs first, then the store), chunks from `store`; both
/// verified. Returns the cache-state update that records what was restored.
pub fn restore(
    store: &Store,
    loader: &dyn BlobLoader,
    root: &BlobRef,
    dest: &Path,
    progress: &dyn Progress,
) -> anyhow::Result<Update> {
    let started = Instant::now();
    if std::fs::read_dir(dest)
        .with_context(|| format!("cannot list {}", dest.display()))?
        .next()
        .is_some()
    {
        bail!("{} is not empty", dest.display());
    }
    let is_root = rustix::process::geteuid().is_root();
    let mut update = Update {
        replace_all_nodes: true,
        ..Update::default()
    };
    let skel = skeleton(loader, root, dest, &mut update)?;
    progress.begin("restoring", skel.bytes_total, skel.files.len() as u64);
    contents(store, dest, &skel.files, &mut update, progress)?;
    for (first, other) in &skel.extra_links {
        std::fs::hard_link(dest.join(first), dest.join(other))
            .with_context(|| format!("link {}", other.display()))?;
    }
    // Attributes bottom up, and the cache state's nodes.
    for (path, e) in skel
        .files
        .iter()
        .map(|(p, e, _)| (p, e))
        .chain(skel.others.iter().map(|(p, e)| (p, e)))
    {
        let ino = set_attrs_at(dest, path, e, is_root)?;
        if e.kind == NodeKind::File {
            update.nodes.push((ino, Kind::File, encode_node(e)?));
        }
    }
    let mut dirs = skel.dirs;
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (path, e) in &dirs {
        let ino = set_attrs_at(dest, path, e, is_root)?;
        update.nodes.push((ino, Kind::Dir, encode_node(e)?));
    }
    progress.finish();
    tracing::info!(
        "restore: {} files, {} directories, {} bytes in {:.2}s",
        skel.files.len(),
        dirs.len(),
        skel.bytes_total,
        started.elapsed().as_secs_f64()
    );
    Ok(update)
}

/// What the walk made.
#[derive(Default)]
struct Skeleton {
    dirs: Vec<(PathBuf, TreeEntry)>,
    others: Vec<(PathBuf, TreeEntry)>,
    files: Vec<(PathBuf, TreeEntry, Vec<ChunkSpan>)>,
    extra_links: Vec<(PathBuf, PathBuf)>,
    bytes_total: u64,
}

/// Walks the trees and makes every node (files sparse, attributes not set yet).
fn skeleton(
    loader: &dyn BlobLoader,
    root: &BlobRef,
    dest: &Path,
    update: &mut Update,
) -> anyhow::Result<Skeleton> {
    let mut skel = Skeleton::default();
    let mut links: HashMap<u64, PathBuf> = HashMap::new();
    let mut stack: Vec<(PathBuf, BlobRef)> = vec![(PathBuf::new(), *root)];
    while let Some((rel, r)) = stack.pop() {
        let bytes = loader.load(&r)?;
        update.blobs.push((r.id.0, bytes.to_vec()));
        update.chunks.push((r.id.0, serde_json::to_vec(&r)?));
        let tree = Tree::decode(&format!("tree {} in {}", r.id, r.pack.key()), &bytes)?;
        let dir = open_dir(&dest.join(&rel))?;
        for e in tree.entries {
            let name = OsStr::from_bytes(&e.name).to_os_string();
            let path = rel.join(&name);
            if let (NodeKind::File, Content::File(c)) = (&e.kind, &e.content) {
                if e.link_key != 0 {
                    if let Some(first) = links.get(&e.link_key) {
                        skel.extra_links.push((first.clone(), path));
                        continue;
                    }
                    links.insert(e.link_key, path.clone());
                }
                let spans = owsfs_store::tree::file_chunks(loader, c)?;
                let covered = spans.last().map_or(0, |s| s.end());
                if covered != e.size {
                    bail!(
                        "tree {}: /{} has size {} but its chunks cover {covered} bytes",
                        r.id,
                        path.display(),
                        e.size
                    );
                }
                if let owsfs_store::FileContent::List(lists) = c {
                    for l in lists {
                        if let Ok(b) = loader.load(&l.blob) {
                            update.blobs.push((l.blob.id.0, b.to_vec()));
                            update
                                .chunks
                                .push((l.blob.id.0, serde_json::to_vec(&l.blob)?));
                        }
                    }
                }
                write::create(dir.as_fd(), &name, &e)
                    .with_context(|| format!("create /{}", path.display()))?;
                skel.bytes_total += e.size;
                skel.files.push((path, e, spans));
                continue;
            }
            let made = write::create(dir.as_fd(), &name, &e)
                .with_context(|| format!("tree {}: make /{}", r.id, path.display()))?;
            match (&e.kind, &e.content) {
                (NodeKind::Dir, Content::Dir(sub)) => {
                    stack.push((path.clone(), *sub));
                    skel.dirs.push((path, e));
                }
                _ if made == Created::Made => skel.others.push((path, e)),
                _ => {}
            }
        }
    }
    Ok(skel)
}

/// Writes every file's content, grouped by pack.
fn contents(
    store: &Store,
    dest: &Path,
    files: &[(PathBuf, TreeEntry, Vec<ChunkSpan>)],
    update: &mut Update,
    progress: &dyn Progress,
) -> anyhow::Result<()> {
    let mut by_pack: BTreeMap<PackId, Vec<(usize, ChunkSpan)>> = BTreeMap::new();
    for (i, (_, _, spans)) in files.iter().enumerate() {
        for s in spans {
            by_pack.entry(s.r.pack).or_default().push((i, *s));
            update.chunks.push((s.r.id.0, serde_json::to_vec(&s.r)?));
        }
    }
    let mut open: HashMap<usize, OwnedFd> = HashMap::new();
    let mut left: Vec<u64> = files.iter().map(|(_, e, _)| e.size).collect();
    let (mut bytes, mut done_files) = (0u64, files.iter().filter(|f| f.1.size == 0).count());
    for (pack, wants) in by_pack {
        let whole = if wants.len() >= 8 {
            Some(owsfs_store::read_pack(store, pack)?)
        } else {
            None
        };
        for (i, span) in wants {
            let data = match &whole {
                Some(p) => p.blob(&span.r)?,
                None => owsfs_store::read_blob(store, &span.r)?,
            };
            let fd = match open.entry(i) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let abs = dest.join(&files[i].0);
                    v.insert(
                        write::open_for_content(rustix::fs::CWD, abs.as_os_str())
                            .with_context(|| format!("open {}", abs.display()))?,
                    )
                }
            };
            write::write_at(fd, span.offset, &data)
                .with_context(|| format!("write /{}", files[i].0.display()))?;
            bytes += data.len() as u64;
            left[i] = left[i].saturating_sub(data.len() as u64);
            if left[i] == 0 {
                done_files += 1;
                open.remove(&i);
            }
        }
        progress.update(bytes, done_files as u64);
    }
    Ok(())
}

fn open_dir(path: &Path) -> anyhow::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("open {}", path.display()))
}

/// Sets the attributes of `rel` (below `dest`) and returns its inode number.
fn set_attrs_at(dest: &Path, rel: &Path, e: &TreeEntry, is_root: bool) -> anyhow::Result<u64> {
    let abs = dest.join(rel);
    let parent = abs.parent().unwrap_or(dest);
    let name = abs.file_name().context("a restored path without a name")?;
    let dir = open_dir(parent)?;
    write::set_attrs(dir.as_fd(), Some(name), e, is_root)
        .with_context(|| format!("set attributes of {}", abs.display()))?;
    Ok(rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?.st_ino)
}
