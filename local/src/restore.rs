//! Full restore of a generation into an empty backing directory, recording every restored
//! inode in the cache state so the next cut knows what it need not read.
//!
//! Order: the skeleton (directories, files at their final size, symlinks, fifos and devices),
//! then file content grouped by pack (a pack from which many chunks are needed is fetched
//! whole, otherwise blob by blob; every blob is verified by hash), then extra hard links,
//! then metadata bottom up (xattrs, owner, mode, mtime; directories last, deepest first).
//! Any error aborts: the caller discards the directory, nothing half-restored is served.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use owsfs_store::{
    BlobLoader, BlobRef, ChunkSpan, Content, NodeKind, PackId, Store, Tree, TreeEntry,
};

use crate::node::encode_node;
use crate::state::Update;

/// Progress of a restore, for logs and a progress line.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub files: u64,
    pub files_total: u64,
    pub bytes: u64,
    pub bytes_total: u64,
}

/// Restores the tree `root` into `dest` (an existing, empty directory).
pub fn restore(
    store: &Store,
    loader: &dyn BlobLoader,
    root: &BlobRef,
    dest: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> anyhow::Result<Update> {
    let started = Instant::now();
    let mut update = Update {
        replace_all_nodes: true,
        ..Update::default()
    };
    // 1. Walk the trees and make the skeleton.
    let mut dirs: Vec<(PathBuf, TreeEntry)> = Vec::new();
    let mut others: Vec<(PathBuf, TreeEntry)> = Vec::new();
    let mut files: Vec<(PathBuf, TreeEntry, Vec<ChunkSpan>)> = Vec::new();
    let mut links: HashMap<u64, PathBuf> = HashMap::new();
    let mut extra_links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut stack: Vec<(PathBuf, BlobRef)> = vec![(PathBuf::new(), *root)];
    let mut prog = Progress::default();
    while let Some((rel, r)) = stack.pop() {
        let bytes = loader.load(&r)?;
        update.blobs.push((r.id.0, bytes.to_vec()));
        update.chunks.push((r.id.0, serde_json::to_vec(&r)?));
        let tree = Tree::decode(&format!("tree {} in {}", r.id, r.pack.key()), &bytes)?;
        for e in tree.entries {
            let path = rel.join(OsStr::from_bytes(&e.name));
            let abs = dest.join(&path);
            match (&e.kind, &e.content) {
                (NodeKind::Dir, Content::Dir(sub)) => {
                    fs::create_dir(&abs).with_context(|| format!("mkdir {}", abs.display()))?;
                    stack.push((path.clone(), *sub));
                    dirs.push((path, e));
                }
                (NodeKind::File, Content::File(c)) => {
                    if e.link_key != 0
                        && let Some(first) = links.get(&e.link_key)
                    {
                        extra_links.push((first.clone(), path));
                        continue;
                    }
                    if e.link_key != 0 {
                        links.insert(e.link_key, path.clone());
                    }
                    let f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&abs)
                        .with_context(|| format!("create {}", abs.display()))?;
                    f.set_len(e.size)?;
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
                    prog.files_total += 1;
                    prog.bytes_total += e.size;
                    files.push((path, e, spans));
                }
                (NodeKind::Symlink, Content::Symlink(target)) => {
                    std::os::unix::fs::symlink(OsStr::from_bytes(target), &abs)
                        .with_context(|| format!("symlink {}", abs.display()))?;
                    others.push((path, e));
                }
                (NodeKind::Fifo | NodeKind::CharDev | NodeKind::BlockDev, _) => {
                    let kind = match e.kind {
                        NodeKind::Fifo => rustix::fs::FileType::Fifo,
                        NodeKind::CharDev => rustix::fs::FileType::CharacterDevice,
                        _ => rustix::fs::FileType::BlockDevice,
                    };
                    match rustix::fs::mknodat(
                        rustix::fs::CWD,
                        &abs,
                        kind,
                        rustix::fs::Mode::from_raw_mode(0o600),
                        e.rdev,
                    ) {
                        Ok(()) => others.push((path, e)),
                        Err(err) => {
                            tracing::warn!("restore: cannot make {}: {err}", abs.display())
                        }
                    }
                }
                (NodeKind::Socket, _) => {
                    tracing::warn!("restore: socket /{} is not restored", path.display());
                }
                _ => bail!(
                    "tree {}: entry /{} has content that does not match its kind",
                    r.id,
                    path.display()
                ),
            }
        }
    }
    progress(&prog);

    // 2. Content, grouped by pack.
    let mut by_pack: BTreeMap<PackId, Vec<(usize, ChunkSpan)>> = BTreeMap::new();
    for (i, (_, _, spans)) in files.iter().enumerate() {
        for s in spans {
            by_pack.entry(s.r.pack).or_default().push((i, *s));
            update.chunks.push((s.r.id.0, serde_json::to_vec(&s.r)?));
        }
    }
    let mut open: HashMap<usize, File> = HashMap::new();
    let mut done_per_file: Vec<u64> = vec![0; files.len()];
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
            let f = match open.entry(i) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let abs = dest.join(&files[i].0);
                    v.insert(
                        OpenOptions::new()
                            .write(true)
                            .open(&abs)
                            .with_context(|| format!("open {}", abs.display()))?,
                    )
                }
            };
            f.write_all_at(&data, span.offset)?;
            prog.bytes += data.len() as u64;
            done_per_file[i] += data.len() as u64;
            if done_per_file[i] == files[i].1.size {
                prog.files += 1;
                open.remove(&i);
            }
        }
        progress(&prog);
    }
    drop(open);
    prog.files = prog.files_total;
    progress(&prog);

    // 3. Extra names of hard-linked files.
    for (first, other) in &extra_links {
        fs::hard_link(dest.join(first), dest.join(other))
            .with_context(|| format!("link {}", other.display()))?;
    }

    // 4. Metadata bottom up, and the cache state's nodes.
    let is_root = rustix::process::geteuid().is_root();
    for (path, e) in files
        .iter()
        .map(|(p, e, _)| (p, e))
        .chain(others.iter().map(|(p, e)| (p, e)))
    {
        set_meta(&dest.join(path), e, is_root)?;
        if e.kind == NodeKind::File {
            let ino = fs::symlink_metadata(dest.join(path))?.ino();
            update.nodes.push((ino, b'f', encode_node(e)?));
        }
    }
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (path, e) in &dirs {
        set_meta(&dest.join(path), e, is_root)?;
        let ino = fs::symlink_metadata(dest.join(path))?.ino();
        update.nodes.push((ino, b'd', encode_node(e)?));
    }
    tracing::info!(
        "restore: {} files, {} directories, {} bytes in {:.2}s",
        prog.files_total,
        dirs.len(),
        prog.bytes_total,
        started.elapsed().as_secs_f64()
    );
    Ok(update)
}

fn set_meta(abs: &Path, e: &TreeEntry, is_root: bool) -> anyhow::Result<()> {
    let ctx = || format!("set attributes of {}", abs.display());
    for (name, value) in &e.xattrs {
        rustix::fs::lsetxattr(
            abs,
            OsStr::from_bytes(name),
            value,
            rustix::fs::XattrFlags::empty(),
        )
        .with_context(ctx)?;
    }
    if is_root {
        rustix::fs::chownat(
            rustix::fs::CWD,
            abs,
            Some(rustix::fs::Uid::from_raw(e.uid)),
            Some(rustix::fs::Gid::from_raw(e.gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .with_context(ctx)?;
    }
    if e.kind != NodeKind::Symlink {
        rustix::fs::chmodat(
            rustix::fs::CWD,
            abs,
            rustix::fs::Mode::from_raw_mode(e.mode),
            rustix::fs::AtFlags::empty(),
        )
        .with_context(ctx)?;
    }
    let mtime = rustix::fs::Timespec {
        tv_sec: e.mtime_sec,
        tv_nsec: e.mtime_nsec as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        abs,
        &rustix::fs::Timestamps {
            last_access: mtime,
            last_modification: mtime,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .with_context(ctx)?;
    Ok(())
}
