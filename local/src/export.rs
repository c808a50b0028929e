//! A tree as a tar archive (POSIX pax): what `owsfs export REF FILE.tar[.zst]` writes.
//!
//! Entries come in tree order, parents before children. Files carry their mode, owner, mtime
//! and `user.*`-style xattrs (`SCHILY.xattr.NAME` pax records, as GNU tar and bsdtar read
//! them); the second and later names of a hard-linked file are hard-link entries to the
//! first; fifos and devices are kept (sockets cannot be archived and are left out, as a
//! restore leaves them out). Every blob is verified by hash as it is read.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use owsfs_store::tree::file_chunks;
use owsfs_store::{BlobLoader, BlobRef, ChunkSpan, Content, NodeKind, Tree, TreeEntry};

use crate::progress::Progress;

/// Totals of an export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exported {
    pub entries: u64,
    pub bytes: u64,
    pub sockets_skipped: u64,
}

/// Writes tree `root` to `out` as a tar archive, and finishes the archive.
pub fn export_tar(
    loader: &dyn BlobLoader,
    root: &BlobRef,
    out: &mut dyn Write,
    total_bytes: u64,
    progress: &dyn Progress,
) -> anyhow::Result<Exported> {
    let mut b = tar::Builder::new(out);
    let mut x = Exporter {
        loader,
        links: HashMap::new(),
        done: Exported::default(),
        progress,
    };
    progress.begin("exporting", total_bytes, 0);
    let r = x.dir(&mut b, &PathBuf::new(), root);
    progress.finish();
    r?;
    b.finish().context("cannot finish the archive")?;
    Ok(x.done)
}

struct Exporter<'a> {
    loader: &'a dyn BlobLoader,
    /// Hard-link key → the first path written.
    links: HashMap<u64, PathBuf>,
    done: Exported,
    progress: &'a dyn Progress,
}

impl Exporter<'_> {
    fn dir<W: Write>(
        &mut self,
        b: &mut tar::Builder<W>,
        path: &std::path::Path,
        r: &BlobRef,
    ) -> anyhow::Result<()> {
        let tree = Tree::load(self.loader, r)?;
        for e in &tree.entries {
            let p = path.join(OsStr::from_bytes(&e.name));
            self.entry(b, &p, e)
                .with_context(|| format!("cannot archive {}", p.display()))?;
            if let Content::Dir(sub) = &e.content {
                self.dir(b, &p, sub)?;
            }
        }
        Ok(())
    }

    fn entry<W: Write>(
        &mut self,
        b: &mut tar::Builder<W>,
        p: &std::path::Path,
        e: &TreeEntry,
    ) -> anyhow::Result<()> {
        if e.kind == NodeKind::Socket {
            self.done.sockets_skipped += 1;
            return Ok(());
        }
        let mut h = tar::Header::new_ustar();
        h.set_mode(e.mode);
        h.set_uid(e.uid.into());
        h.set_gid(e.gid.into());
        h.set_mtime(e.mtime_sec.max(0) as u64);
        h.set_size(0);
        let mut pax: Vec<(String, Vec<u8>)> = e
            .xattrs
            .iter()
            .filter_map(|(k, v)| {
                std::str::from_utf8(k)
                    .ok()
                    .map(|k| (format!("SCHILY.xattr.{k}"), v.clone()))
            })
            .collect();
        if e.mtime_nsec != 0 {
            pax.push((
                "mtime".into(),
                format!("{}.{:09}", e.mtime_sec, e.mtime_nsec).into_bytes(),
            ));
        }
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        self.done.entries += 1;
        if e.link_key != 0 {
            if let Some(first) = self.links.get(&e.link_key) {
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, p, first)?;
                return Ok(());
            }
            self.links.insert(e.link_key, p.to_path_buf());
        }
        match (&e.kind, &e.content) {
            (NodeKind::Dir, _) => {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, p, std::io::empty())?;
            }
            (NodeKind::Symlink, Content::Symlink(target)) => {
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, p, OsStr::from_bytes(target))?;
            }
            (NodeKind::File, Content::File(f)) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(e.size);
                let spans = file_chunks(self.loader, f)?;
                let reader = Chunks {
                    loader: self.loader,
                    spans: spans.into_iter(),
                    cur: Bytes::new(),
                };
                b.append_data(&mut h, p, reader)?;
                self.done.bytes += e.size;
                self.progress.update(self.done.bytes, self.done.entries);
            }
            (NodeKind::Fifo, _) => {
                h.set_entry_type(tar::EntryType::Fifo);
                b.append_data(&mut h, p, std::io::empty())?;
            }
            (NodeKind::CharDev | NodeKind::BlockDev, _) => {
                h.set_entry_type(if e.kind == NodeKind::CharDev {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                let (major, minor) = owsfs_sys::fs::dev_major_minor(e.rdev);
                h.set_device_major(major)?;
                h.set_device_minor(minor)?;
                b.append_data(&mut h, p, std::io::empty())?;
            }
            (kind, _) => anyhow::bail!("a {kind:?} entry with the wrong content"),
        }
        Ok(())
    }
}

/// A file's bytes as a reader: chunk after chunk, each verified when loaded.
struct Chunks<'a> {
    loader: &'a dyn BlobLoader,
    spans: std::vec::IntoIter<ChunkSpan>,
    cur: Bytes,
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            let Some(s) = self.spans.next() else {
                return Ok(0);
            };
            self.cur = self.loader.load(&s.r).map_err(std::io::Error::other)?;
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}
