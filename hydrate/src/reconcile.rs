//! After a crash: what a damaged journal may have lost, found from the backing files
//! themselves.
//!
//! A torn tail is cut at the last whole record. A crash tears only the batch being written,
//! whose operations had not been performed yet, so nothing is lost. Damage (a segment cut short
//! on disk, a bad sector at the end) looks the same but drops records of operations that were
//! performed: the next commit would not know those files changed and would keep their old
//! chunks, so the store would silently miss changes the mount shows (found by the torture
//! harness). A segment cut exactly at a record boundary even looks like a clean end. So after
//! every unclean shutdown, every file and directory that is not dirty in the journal but whose
//! attributes differ from the base generation's node (size, mtime, mode, owner), or that has
//! no node, is journaled as changed before the mount serves: the next commit reads it again.
//! It costs one walk of the backing directory with a `stat` per name, at mounts after a crash
//! only (not after a clean unmount, nor after a rescan, which made everything dirty). Files
//! fetched whole by lazy hydration since the last commit have a new mtime and are read again
//! too (their chunks deduplicate: nothing is uploaded). What hydration still tracks (partial
//! files, pending directories, a warm remount's old entries) is left alone: a write journaled
//! for a partial file would be taken for local bytes. It runs before the cache is matched with
//! the store, against the cache's own base, so what it finds counts as unsynced changes.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use owsfs_journal::{BackingIno, InoMap};
use owsfs_journal::{Journal, NodeKind as JNodeKind, Op};
use owsfs_local::{Kind, LocalState, decode_node};
use owsfs_store::TreeEntry;

/// Whether `md` (the backing file) still has the base node `e`'s attributes, and they can be
/// trusted: a file whose mtime is not older than `racy_ns` (the base's cut, less a margin for
/// the clock's tick) may have changed again in the same tick without a new mtime, as git's
/// "racily clean" index entries; it is read again.
fn same(e: &TreeEntry, md: &fs::Metadata, is_file: bool, racy_ns: i128) -> bool {
    let mtime_ns = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
    (!is_file || (mtime_ns < racy_ns && e.size == md.size()))
        && e.mtime_sec == md.mtime()
        && i64::from(e.mtime_nsec) == md.mtime_nsec()
        && e.mode == md.mode() & 0o7777
        && e.uid == md.uid()
        && e.gid == md.gid()
}

/// Journals every file and directory under `backing` that differs from the base generation.
/// Returns how many names it journaled, and the first few of them.
///
/// With `torn` (replay cut a torn tail), a file the journal has dirty is read again whole as
/// well: the records lost with the tail may have held more of its ranges.
pub fn after_crash(
    backing: &Path,
    local: &LocalState,
    journal: &Journal,
    torn: bool,
) -> anyhow::Result<(usize, Vec<String>)> {
    if local.base()?.is_none() {
        // No base: the next commit reads everything anyway.
        return Ok((0, Vec::new()));
    }
    let root_md = fs::metadata(backing).with_context(|| format!("stat {}", backing.display()))?;
    // Only after a torn tail, which shows damage: after a plain crash the journal holds a
    // record of every change, and a re-read file would make the journal dirty (a cache whose
    // workspace moved on elsewhere would then be set aside for nothing). Without the base's
    // cut time (a cache from before it was kept), every mtime is trusted.
    let racy_ns = local
        .meta("base_cut_unix_ms")?
        .and_then(|v| v.parse::<i128>().ok())
        .filter(|_| torn)
        .map_or(i128::MAX, |ms| (ms - 1000) * 1_000_000);
    let inos = InoMap::new(BackingIno(root_md.ino()));
    let node = |ino: u64, kind: Kind| -> Option<TreeEntry> {
        match local.node(ino) {
            Some((k, bytes)) if k == kind => decode_node(&bytes).ok(),
            _ => None,
        }
    };
    // What the journal already has needs nothing more; what hydration tracks (partial files,
    // pending directories) differs from its node by design, and a write journaled for it
    // would be taken for local bytes.
    let dirty = journal.dirty();
    let hydrating = local.hydration_inos()?;
    let mut changed = 0;
    let mut names: Vec<String> = Vec::new();
    let mut note = |p: &Path| {
        if names.len() < 5 {
            names.push(format!("/{}", p.display()));
        }
    };
    let append = |op: Op| -> anyhow::Result<()> {
        journal
            .append(op)
            .context("cannot journal a change found after a torn tail")?;
        Ok(())
    };
    // The root is not compared: a lazily restored cache makes it with a time of its own. A
    // name created there without a record is found by its own check below (and marks the
    // root); only a removal from the root whose record was lost goes unseen.
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = backing.join(&rel);
        let entries = fs::read_dir(&abs).with_context(|| format!("read {}", abs.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("read {}", abs.display()))?;
            let path = rel.join(entry.file_name());
            let md = match entry.metadata() {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
            };
            let ino = inos.fuse(BackingIno(md.ino()));
            if hydrating.contains(&md.ino()) {
                if md.is_dir() {
                    stack.push(path);
                }
                continue;
            }
            if md.is_dir() {
                if !dirty.dirs.contains(&path)
                    && node(md.ino(), Kind::Dir).is_none_or(|e| !same(&e, &md, false, racy_ns))
                {
                    append(Op::Meta {
                        ino,
                        dir: Some(path.clone()),
                    })?;
                    note(&path);
                    changed += 1;
                }
                stack.push(path);
            } else if md.is_file() && dirty.files.contains_key(&ino) {
                if torn {
                    append(Op::Write {
                        ino,
                        offset: 0,
                        len: md.size(),
                    })?;
                    note(&path);
                    changed += 1;
                }
            } else if md.is_file() {
                match node(md.ino(), Kind::File) {
                    Some(e) if same(&e, &md, true, racy_ns) => {}
                    Some(e) => {
                        append(Op::Touch {
                            ino,
                            path: Some(path.clone()),
                        })?;
                        append(Op::Write {
                            ino,
                            offset: 0,
                            len: md.size().max(e.size),
                        })?;
                        append(Op::Meta { ino, dir: None })?;
                        note(&path);
                        changed += 1;
                    }
                    None => {
                        append(Op::Create {
                            ino,
                            kind: JNodeKind::File,
                            path: path.clone(),
                        })?;
                        append(Op::Write {
                            ino,
                            offset: 0,
                            len: md.size(),
                        })?;
                        note(&path);
                        changed += 1;
                    }
                }
            }
        }
    }
    Ok((changed, names))
}
