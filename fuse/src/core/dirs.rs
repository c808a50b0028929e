//! Open directories: opendir, readdir (and the lookups of readdirplus), releasedir and
//! fsyncdir.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fuser::FileType;
use owsfs_journal::{BackingIno, FuseIno, NodeKind};
use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};

use super::{Core, Entry};
use crate::error::{Context, FsError, FsResult};
use crate::inode::Inode;
use crate::kind;

/// An open directory: its entries, read at opendir and again on rewind.
#[derive(Debug)]
pub(super) struct DirHandle {
    ino: FuseIno,
    /// The inode table's era of its listing: the root's listing is read again after a live
    /// rollback; other directories of an earlier era are stale.
    era: u64,
    /// Shared with the readdir replies in flight, which take entries from it without copies.
    entries: Arc<Vec<DirEntry>>,
    read_once: bool,
}

/// The entries of an open directory from some offset on, for one readdir reply. It shares
/// the listing with the handle: a reply takes the entries that fit and copies nothing, so a
/// directory of n entries costs O(n) over all its replies, not O(n²).
#[derive(Clone, Debug)]
pub struct DirEntries {
    entries: Arc<Vec<DirEntry>>,
    start: usize,
}

impl DirEntries {
    /// Each entry with the offset the kernel passes to continue after it.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &DirEntry)> {
        let start = self.start.min(self.entries.len());
        self.entries[start..]
            .iter()
            .enumerate()
            .map(move |(i, e)| ((start + i + 1) as u64, e))
    }

    /// How many entries are left from the offset on.
    pub fn len(&self) -> usize {
        self.entries.len().saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One directory entry, for readdir.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: FuseIno,
    pub kind: FileType,
    pub name: OsString,
}

impl Core {
    pub fn opendir(&self, ino: FuseIno) -> FsResult<u64> {
        let inode = self.inode(ino)?;
        if inode.kind != NodeKind::Dir {
            return Err(FsError::errno(libc::ENOTDIR, "opendir"));
        }
        self.materialize(&inode)?;
        let entries = self.read_dir_entries(&inode)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inodes.log_open(fh, &inode);
        self.dirs.insert(
            fh,
            Arc::new(Mutex::new(DirHandle {
                ino,
                era: self.inodes.era(),
                entries: Arc::new(entries),
                read_once: false,
            })),
        );
        Ok(fh)
    }

    /// Makes sure directory handle `fh` of directory `ino` is known: one an earlier daemon of
    /// the connection handed out is opened again (its listing read anew, so offsets go on
    /// from the same index: entries added or removed meanwhile may shift them).
    pub fn adopt_dir(&self, ino: FuseIno, fh: u64) -> FsResult<()> {
        if fh >= self.first_fh || self.dirs.contains_key(&fh) {
            return Ok(());
        }
        let inode = self.opened_inode(ino, fh)?;
        if inode.kind != NodeKind::Dir {
            return Err(FsError::errno(
                libc::EBADF,
                "directory handle of an earlier daemon",
            ));
        }
        let entries = self.read_dir_entries(&inode)?;
        self.dirs.entry(fh).or_insert_with(|| {
            Arc::new(Mutex::new(DirHandle {
                ino,
                era: self.inodes.era(),
                entries: Arc::new(entries),
                read_once: true,
            }))
        });
        Ok(())
    }

    fn read_dir_entries(&self, inode: &Inode) -> FsResult<Vec<DirEntry>> {
        // The inode's descriptor is O_PATH, which cannot list: open the directory itself.
        let fd = crate::openat_noatime(
            &inode.fd,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )
        .ctx("opendir")?;
        let mut dir = rustix::fs::Dir::new(fd).ctx("opendir")?;
        let mut entries = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.ctx("readdir")?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
            let kind = kind::to_fuser(kind::of_type(entry.file_type()));
            entries.push(DirEntry {
                ino: self.inodes.fuse_ino(BackingIno(entry.ino())),
                kind,
                name,
            });
        }
        Ok(entries)
    }

    /// The entries of an open directory from index `offset` on; offset 0 after a first read
    /// is a rewind and rereads the directory.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<DirEntries> {
        let dh = self
            .dirs
            .get(&fh)
            .map(|d| Arc::clone(d.value()))
            .ok_or_else(|| FsError::errno(libc::EBADF, "directory handle not known"))?;
        let mut dh = dh.lock();
        let era = self.inodes.era();
        if (offset == 0 && dh.read_once) || dh.era != era {
            let inode = self.inode(dh.ino)?;
            self.materialize(&inode)?;
            dh.entries = Arc::new(self.read_dir_entries(&inode)?);
            dh.era = era;
        }
        dh.read_once = true;
        Ok(DirEntries {
            entries: Arc::clone(&dh.entries),
            start: usize::try_from(offset).unwrap_or(usize::MAX),
        })
    }

    /// Looks up one entry for readdirplus (counts a kernel reference). At the inode budget it
    /// does not wait for room: the entry is then listed without its lookup (ENFILE).
    pub fn readdirplus_entry(&self, dir_ino: FuseIno, name: &OsStr) -> FsResult<Entry> {
        let dir = self.inode(dir_ino)?;
        self.materialize(&dir)?;
        self.lookup_waiting(&dir, name, false)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(&fh);
        self.inodes.log_closed(fh);
    }

    pub fn fsyncdir(&self, ino: FuseIno, datasync: bool) -> FsResult<()> {
        self.stats.count(&self.stats.fsyncs);
        self.journal_fsync(ino);
        let inode = self.inode(ino)?;
        let fd = rustix::fs::openat(
            &inode.fd,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx("fsyncdir open")?;
        if datasync {
            owsfs_sys::fs::fdatasync(&fd).ctx("fsyncdir")
        } else {
            rustix::fs::fsync(&fd).ctx("fsyncdir")
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::core::tests::{allocated_bytes, fixture};
    use crate::inode::ROOT_INO;

    #[test]
    fn readdir_lists_and_rewinds() {
        let f = fixture(true);
        for n in ["a", "b", "c"] {
            std::fs::write(f.backing.join(n), n).unwrap();
        }
        let fh = f.core.opendir(ROOT_INO).unwrap();
        let all = f.core.readdir(fh, 0).unwrap();
        let mut names: Vec<_> = all
            .iter()
            .map(|(_, e)| e.name.to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![".", "..", "a", "b", "c"]);
        let offsets: Vec<u64> = all.iter().map(|(next, _)| next).collect();
        assert_eq!(
            offsets,
            vec![1, 2, 3, 4, 5],
            "each entry says where to go on"
        );
        let rest = f.core.readdir(fh, 3).unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(
            rest.iter().map(|(next, _)| next).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert!(f.core.readdir(fh, 99).unwrap().is_empty());
        std::fs::write(f.backing.join("d"), b"d").unwrap();
        assert_eq!(f.core.readdir(fh, 0).unwrap().len(), 6, "offset 0 rereads");
        f.core.releasedir(fh);
    }

    /// A readdir reply takes its entries from the open directory's listing without copying
    /// the rest of it: a listing of n entries costs O(n) over all its replies, not O(n²).
    #[test]
    fn readdir_copies_no_entries() {
        let f = fixture(false);
        for i in 0..5000 {
            std::fs::write(f.backing.join(format!("entry-{i:05}")), b"").unwrap();
        }
        let fh = f.core.opendir(ROOT_INO).unwrap();
        let before = allocated_bytes();
        let rest = f.core.readdir(fh, 100).unwrap();
        let allocated = allocated_bytes() - before;
        assert!(
            allocated < 1024,
            "readdir at offset 100 allocated {allocated} bytes for {} entries",
            rest.len()
        );
        assert_eq!(rest.len(), 5002 - 100);
        f.core.releasedir(fh);
    }
}
