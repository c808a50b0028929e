//! Copy-on-first-write freezing of the files a cut covers.
//!
//! A cut takes the write barrier, notes the journal position and registers every file whose
//! content it must upload here, with its path and size at the cut. The barrier is then
//! released and the workload goes on while the uploader reads the files. To let the uploader
//! see each file exactly as it was at the cut:
//!
//! - a change of data (write, truncate, fallocate, copy_file_range) to a frozen file that the
//!   uploader has not finished first saves the bytes it overwrites (below the cut size) into a
//!   side file; the uploader's reads overlay those saved bytes on the live file;
//! - removing or renaming a name of a frozen file first opens the file (a *pin*), so the
//!   uploader reads it through that descriptor rather than its (now stale) path;
//! - renaming a directory while frozen files are unread waits until the uploader has read
//!   them, since their paths at the cut run through it.
//!
//! Together these keep the invariant the uploader relies on: an unread, unpinned frozen file
//! is still reachable at its path at the cut.
//!
//! Locking: a writer saves under the file's lock and then writes after releasing it; the
//! uploader reads live bytes and overlays saved ones under the same lock. A range a writer is
//! changing is therefore either saved (and the overlay wins) or not yet touched.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use owsfs_journal::{BackingIno, ExtentSet, NodeKind};
use parking_lot::{Condvar, Mutex};
use rustix::fs::{AtFlags, Mode, OFlags};

use crate::kind;

/// One file frozen by a cut.
pub struct Frozen {
    pub ino: BackingIno,
    /// Path at the cut, relative to the backing root.
    pub path: PathBuf,
    /// Size at the cut: bytes at or past it are not part of the cut.
    pub size: u64,
    inner: Mutex<FrozenInner>,
}

#[derive(Default)]
struct FrozenInner {
    /// Open descriptor, taken when a name of the file was about to be removed or renamed.
    pinned: Option<File>,
    /// Ranges whose bytes at the cut are in `side` (same offsets).
    saved: ExtentSet,
    side: Option<File>,
    /// The uploader has read everything it needs: changes need no saving any more.
    done: bool,
}

/// The set of frozen files of the cut in flight (at most one cut is in flight).
pub struct Freezer {
    active: AtomicBool,
    files: Mutex<HashMap<BackingIno, Arc<Frozen>>>,
    /// Number of frozen files not yet done; directory renames wait for it to reach 0.
    unread: Mutex<usize>,
    all_read: Condvar,
    /// Where side files go (a directory on the same filesystem as the cache).
    side_dir: PathBuf,
    side_seq: AtomicU64,
    /// Bytes saved by copy-on-first-write since start (for statistics).
    pub saved_bytes: AtomicU64,
}

impl Freezer {
    pub fn new(side_dir: &Path) -> Freezer {
        Freezer {
            active: AtomicBool::new(false),
            files: Mutex::new(HashMap::new()),
            unread: Mutex::new(0),
            all_read: Condvar::new(),
            side_dir: side_dir.to_path_buf(),
            side_seq: AtomicU64::new(0),
            saved_bytes: AtomicU64::new(0),
        }
    }

    /// Registers the files of a new cut. Must be called with the write barrier held, and only
    /// when the previous cut's files are all [`Freezer::finish`]ed.
    pub fn freeze(
        &self,
        files: impl IntoIterator<Item = (BackingIno, PathBuf, u64)>,
    ) -> Vec<Arc<Frozen>> {
        let mut map = self.files.lock();
        map.clear();
        let mut out = Vec::new();
        for (ino, path, size) in files {
            let f = Arc::new(Frozen {
                ino,
                path,
                size,
                inner: Mutex::new(FrozenInner::default()),
            });
            map.insert(ino, Arc::clone(&f));
            out.push(f);
        }
        *self.unread.lock() = map.len();
        self.active.store(!map.is_empty(), Ordering::Release);
        out
    }

    /// The uploader is done with `f` (read, or the cut was abandoned): its saved bytes and pin
    /// are dropped and later changes need no saving.
    pub fn finish(&self, f: &Frozen) {
        let mut inner = f.inner.lock();
        if inner.done {
            return;
        }
        inner.done = true;
        inner.pinned = None;
        inner.side = None;
        inner.saved = ExtentSet::new();
        drop(inner);
        let mut unread = self.unread.lock();
        *unread = unread.saturating_sub(1);
        if *unread == 0 {
            self.active.store(false, Ordering::Release);
            self.files.lock().clear();
            self.all_read.notify_all();
        }
    }

    /// Abandons the cut in flight: every frozen file is finished.
    pub fn finish_all(&self) {
        let files: Vec<Arc<Frozen>> = self.files.lock().values().cloned().collect();
        for f in files {
            self.finish(&f);
        }
    }

    /// Backing inode `ino` is frozen by the running cut.
    pub fn is_frozen(&self, ino: BackingIno) -> bool {
        self.get(ino).is_some()
    }

    fn get(&self, ino: BackingIno) -> Option<Arc<Frozen>> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        self.files.lock().get(&ino).cloned()
    }

    /// Before bytes `[start, end)` of backing inode `ino` change (end = u64::MAX for a truncate): saves the
    /// bytes at the cut that are not saved yet. `open` gives a readable descriptor of the file.
    pub fn before_change(
        &self,
        ino: BackingIno,
        start: u64,
        end: u64,
        open: impl FnOnce() -> io::Result<File>,
    ) -> io::Result<()> {
        let Some(f) = self.get(ino) else {
            return Ok(());
        };
        let mut inner = f.inner.lock();
        let end = end.min(f.size);
        if inner.done || start >= end {
            return Ok(());
        }
        let missing = uncovered(&inner.saved, start, end);
        if missing.is_empty() {
            return Ok(());
        }
        let live = match &inner.pinned {
            Some(p) => p.try_clone()?,
            None => open()?,
        };
        if inner.side.is_none() {
            inner.side = Some(self.new_side_file(f.ino)?);
        }
        let mut buf = vec![0u8; 1 << 20];
        for (s, e) in missing {
            let mut off = s;
            while off < e {
                let want = ((e - off) as usize).min(buf.len());
                let n = read_full_at(&live, &mut buf[..want], off)?;
                if let Some(side) = &inner.side {
                    side.write_all_at(&buf[..n], off)?;
                }
                if n < want {
                    // The live file is shorter than the cut size: it was truncated and
                    // extended through a path that saved nothing, which cannot happen while
                    // frozen; record what exists.
                    break;
                }
                off += n as u64;
            }
            inner.saved.insert(s, e);
            self.saved_bytes.fetch_add(e - s, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Before the name `name` in directory `dir` is removed, replaced or moved: pins a frozen
    /// regular file. A directory that moves (`moves`: a rename source, either side of an
    /// exchange) waits until every frozen file has been read; one that is removed or replaced
    /// is empty and has nothing frozen below it.
    pub fn before_name_change(
        &self,
        dir: &impl AsFd,
        name: &std::ffi::OsStr,
        moves: bool,
    ) -> io::Result<()> {
        if !self.active.load(Ordering::Acquire) {
            return Ok(());
        }
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match kind::of_mode(st.st_mode) {
            NodeKind::Dir => {
                if moves {
                    self.wait_all_read();
                }
                return Ok(());
            }
            NodeKind::File => {}
            _ => return Ok(()),
        }
        let Some(f) = self.get(BackingIno(st.st_ino)) else {
            return Ok(());
        };
        let mut inner = f.inner.lock();
        if inner.done || inner.pinned.is_some() {
            return Ok(());
        }
        let fd: OwnedFd = crate::openat_noatime(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        )?;
        inner.pinned = Some(File::from(fd));
        Ok(())
    }

    /// A new side file in `side_dir`, with no name: `O_TMPFILE`, or where the file system
    /// lacks it, a file removed at once (only the descriptor is needed).
    fn new_side_file(&self, ino: BackingIno) -> io::Result<File> {
        let dir = rustix::fs::open(
            &self.side_dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        match owsfs_sys::fs::open_tmpfile(
            &dir,
            OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => return Ok(File::from(fd)),
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL,
            ) => {}
            Err(e) => return Err(e.into()),
        }
        let n = self.side_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.side_dir.join(format!("cow-{ino}-{n}"));
        let side = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let _ = std::fs::remove_file(&path);
        Ok(side)
    }

    /// Where the side file of `ino` lives (as `/proc/self/fd` says), if it has one.
    #[cfg(test)]
    pub(crate) fn side_file_path(&self, ino: BackingIno) -> Option<PathBuf> {
        use std::os::fd::AsFd;
        let f = self.files.lock().get(&ino).cloned()?;
        let inner = f.inner.lock();
        let path = owsfs_sys::fs::fd_path(inner.side.as_ref()?.as_fd()).ok()?;
        Some(std::fs::read_link(&path).unwrap_or(path))
    }

    /// Where side files go.
    pub fn side_dir(&self) -> &Path {
        &self.side_dir
    }

    fn wait_all_read(&self) {
        let mut unread = self.unread.lock();
        while *unread > 0 {
            // A bounded wait, re-checked: the uploader always finishes or abandons.
            self.all_read
                .wait_for(&mut unread, Duration::from_millis(100));
        }
    }
}

impl Frozen {
    /// Reads the file's bytes as of the cut at `offset` (stops at the cut size). `root` is
    /// the backing root, against which the path at the cut is opened.
    pub fn read_at(
        &self,
        root: &impl AsFd,
        opened: &mut Option<File>,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(self.size - offset) as usize;
        let buf = &mut buf[..len];
        let inner = self.inner.lock();
        if inner.done {
            return Err(io::Error::other(format!(
                "{}: frozen file read after it was finished",
                self.path.display()
            )));
        }
        let n = match &inner.pinned {
            Some(p) => read_full_at(p, buf, offset)?,
            None => {
                if opened.is_none() {
                    *opened = Some(self.open_at_cut_path(root)?);
                }
                match opened {
                    Some(f) => read_full_at(f, buf, offset)?,
                    None => 0,
                }
            }
        };
        let end = offset + len as u64;
        if let Some(side) = &inner.side {
            for (s, e) in inner.saved.iter() {
                let (s, e) = (s.max(offset), e.min(end));
                if s < e {
                    let at = (s - offset) as usize;
                    read_full_at(side, &mut buf[at..at + (e - s) as usize], s)?;
                }
            }
        }
        // Every byte below the cut size existed at the cut: what the live file no longer
        // has was saved by the truncate that dropped it.
        if n < len && !uncovered(&inner.saved, offset + n as u64, end).is_empty() {
            return Err(io::Error::other(format!(
                "{}: shorter than at the cut ({} < {} bytes) and the difference was not saved",
                self.path.display(),
                offset + n as u64,
                self.size
            )));
        }
        Ok(len)
    }

    fn open_at_cut_path(&self, root: &impl AsFd) -> io::Result<File> {
        let fd = crate::openat_noatime(
            root,
            &self.path,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        )?;
        let st = rustix::fs::fstat(&fd)?;
        // By the invariant above the path still names the file; check rather than trust.
        if BackingIno(st.st_ino) != self.ino {
            return Err(io::Error::other(format!(
                "{}: no longer the frozen file (inode {} instead of {})",
                self.path.display(),
                st.st_ino,
                self.ino
            )));
        }
        Ok(File::from(fd))
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The parts of `[start, end)` not covered by `set`.
fn uncovered(set: &ExtentSet, start: u64, end: u64) -> Vec<(u64, u64)> {
    set.gaps(start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(content: &[u8]) -> (tempfile::TempDir, File, Freezer, Arc<Frozen>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, content).unwrap();
        let st = std::fs::metadata(&path).unwrap();
        let root = File::open(dir.path()).unwrap();
        let fz = Freezer::new(dir.path());
        use std::os::unix::fs::MetadataExt;
        let frozen = fz.freeze([(
            BackingIno(st.ino()),
            PathBuf::from("f"),
            content.len() as u64,
        )]);
        (dir, root, fz, Arc::clone(&frozen[0]))
    }

    fn read_all(f: &Frozen, root: &File) -> Vec<u8> {
        let mut opened = None;
        let mut buf = vec![0u8; f.size as usize + 10];
        let n = f.read_at(root, &mut opened, &mut buf, 0).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn overwrite_truncate_and_rename_keep_the_cut_content() {
        let original: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (dir, root, fz, f) = setup(&original);
        let path = dir.path().join("f");
        let live = || File::open(&path);
        // Overwrite in the middle.
        fz.before_change(f.ino, 1000, 3000, live).unwrap();
        let w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        w.write_all_at(&[0xAA; 2000], 1000).unwrap();
        assert_eq!(read_all(&f, &root), original);
        // Truncate to 10 bytes, then extend.
        fz.before_change(f.ino, 10, u64::MAX, live).unwrap();
        w.set_len(10).unwrap();
        w.write_all_at(&[1; 50], 200_000).unwrap();
        assert_eq!(read_all(&f, &root), original);
        // Rename away (pinned), then a new file takes the old name.
        fz.before_name_change(&root, std::ffi::OsStr::new("f"), true)
            .unwrap();
        std::fs::rename(&path, dir.path().join("g")).unwrap();
        std::fs::write(&path, b"other").unwrap();
        assert_eq!(read_all(&f, &root), original);
        fz.finish(&f);
        // Finished: no more saving.
        fz.before_change(f.ino, 0, 5, || File::open(dir.path().join("g")))
            .unwrap();
        // The truncate saved only what the overwrite had not.
        assert_eq!(fz.saved_bytes.load(Ordering::Relaxed), 99_990);
    }

    #[test]
    fn uncovered_ranges() {
        let mut s = ExtentSet::new();
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(uncovered(&s, 0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(uncovered(&s, 12, 18), vec![]);
        assert_eq!(uncovered(&s, 15, 35), vec![(20, 30)]);
    }
}
