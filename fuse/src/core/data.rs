//! Open files: open and the kernel I/O mode of each open, read, write, flush, fsync,
//! fallocate, lseek, copy_file_range and release.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use owsfs_journal::{FuseIno, NodeKind, Op};
use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};

use super::Core;
use crate::error::{Context, FsError, FsResult};
use crate::inode::Inode;

/// How long an open for writing waits for the RELEASE of passthrough readers that may
/// already have closed, before it is refused with ETXTBSY.
const PASSTHROUGH_RELEASE_WAIT: Duration = Duration::from_millis(200);

/// How the kernel serves an open file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// Reads and writes go through the daemon and the kernel page cache.
    Cached,
    /// Read-only: the kernel reads the backing file directly (FUSE passthrough). While such
    /// an open exists, the kernel accepts only passthrough opens of the inode, so writers are
    /// refused (ETXTBSY) until the readers close.
    Passthrough,
}

/// An open file.
#[derive(Debug)]
pub struct Handle {
    pub ino: FuseIno,
    pub file: File,
    mode: Mutex<IoMode>,
    /// The inode table's era at the open: a handle of an earlier era is stale.
    pub(super) era: u64,
}

impl Handle {
    pub fn mode(&self) -> IoMode {
        *self.mode.lock()
    }
}

impl Core {
    /// Opens a file; the result says whether the kernel should serve it by passthrough.
    /// `kill_suidgid`: an unprivileged O_TRUNC, which clears the set-id bits.
    pub fn open(
        &self,
        ino: FuseIno,
        flags: i32,
        kill_suidgid: bool,
    ) -> FsResult<(Arc<Handle>, u64)> {
        self.stats.count(&self.stats.opens);
        let inode = self.inode(ino)?;
        if inode.kind == NodeKind::Dir {
            return Err(FsError::errno(libc::EISDIR, "open of a directory"));
        }
        let write = writable(flags);
        if write && self.stopped.get().is_some() {
            return Err(FsError::errno(libc::EROFS, "writes stopped"));
        }
        // Recorded even once everything is local: the access list orders the next holder's
        // prefetch.
        if let Some(h) = self.hydrate.get() {
            h.opened(self.inodes.backing_ino(ino), self.path_of(ino).as_deref());
        }
        let _barrier = (flags & libc::O_TRUNC != 0)
            .then(|| self.data_mutation())
            .transpose()?;
        // The mode is settled first: an open the kernel would refuse must change nothing.
        // A file that is not wholly local is read through the daemon, which fetches.
        let mode = self.reserve_mode(&inode, write, !self.whole(ino))?;
        let opened = (|| {
            // Without FUSE_ATOMIC_O_TRUNC the kernel truncates by SETATTR and strips O_TRUNC
            // from OPEN; should one arrive anyway, it is journaled and honoured like Linux
            // does (even for a read-only open).
            if flags & libc::O_TRUNC != 0 {
                self.journal_file_op(ino, Op::Truncate { ino, size: 0 })?;
                self.fetch_if_frozen(ino, 0)?;
                self.hyd_truncate(ino, 0);
                self.freeze_before_change(ino, 0, u64::MAX, &inode)?;
            }
            let file = self.reopen(&inode, backing_open_flags(flags))?;
            if kill_suidgid && flags & libc::O_TRUNC != 0 {
                self.kill_suidgid(ino, &file)?;
            }
            Ok(file)
        })();
        match opened {
            Ok(file) => Ok(self.insert_handle(&inode, file, mode)),
            Err(e) => {
                self.unreserve_mode(&inode, mode);
                Err(e)
            }
        }
    }

    /// Counts an open of `inode` in the I/O mode it gets: passthrough for a reader when no
    /// cached open exists (and passthrough is on); cached otherwise. A writer while passthrough
    /// readers are open is refused: the kernel would only take a passthrough open, and writes
    /// must reach the daemon.
    pub(super) fn reserve_mode(
        &self,
        inode: &Inode,
        write: bool,
        cached: bool,
    ) -> FsResult<IoMode> {
        let mut open = inode.open.lock();
        if write && open.passthrough > 0 {
            // close(2) returns before its RELEASE reaches us, so a reader that just closed may
            // still be counted: give its RELEASE a moment before refusing the writer.
            let deadline = std::time::Instant::now() + PASSTHROUGH_RELEASE_WAIT;
            while open.passthrough > 0
                && !inode
                    .passthrough_gone
                    .wait_until(&mut open, deadline)
                    .timed_out()
            {}
        }
        if !write && !cached && open.cached == 0 && self.passthrough_enabled() {
            open.passthrough += 1;
            Ok(IoMode::Passthrough)
        } else if open.passthrough > 0 {
            Err(FsError::errno(
                libc::ETXTBSY,
                "open for writing while read by passthrough",
            ))
        } else {
            open.cached += 1;
            Ok(IoMode::Cached)
        }
    }

    /// Counts an open of `inode` gone. Saturating: an inode opened again for a daemon that
    /// took over the connection may have left the table and come back (a FORGET of more
    /// than it counted) while a file the dead daemon opened stayed open, so its counts start
    /// without that open.
    fn unreserve_mode(&self, inode: &Inode, mode: IoMode) {
        let mut open = inode.open.lock();
        match mode {
            IoMode::Cached => open.cached = open.cached.saturating_sub(1),
            IoMode::Passthrough => {
                open.passthrough = open.passthrough.saturating_sub(1);
                if open.passthrough == 0 {
                    inode.passthrough_gone.notify_all();
                }
            }
        }
        let closed = open.cached == 0 && open.passthrough == 0;
        drop(open);
        if closed {
            self.orphan_closed(inode);
        }
    }

    pub(super) fn insert_handle(
        &self,
        inode: &Inode,
        file: File,
        mode: IoMode,
    ) -> (Arc<Handle>, u64) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inodes.log_open(fh, inode);
        let handle = Arc::new(Handle {
            ino: inode.ino,
            file,
            mode: Mutex::new(mode),
            era: inode.era,
        });
        self.handles.insert(fh, Arc::clone(&handle));
        (handle, fh)
    }

    /// Makes sure file handle `fh` of inode `ino` is known. One an earlier daemon of the
    /// connection handed out (it died or was replaced while the file stayed open) is opened
    /// again, read-write where the backing file allows (the open's flags died with that
    /// daemon; the kernel checks each request against them itself), served through the
    /// daemon, and known by the same number from then on.
    pub fn adopt_handle(&self, ino: FuseIno, fh: u64) -> FsResult<()> {
        if fh >= self.first_fh || self.handles.contains_key(&fh) {
            return Ok(());
        }
        let inode = self.opened_inode(ino, fh)?;
        if inode.kind != NodeKind::File {
            return Err(FsError::errno(
                libc::EBADF,
                "file handle of an earlier daemon",
            ));
        }
        let file = match self.reopen(&inode, OFlags::RDWR | OFlags::CLOEXEC) {
            Ok(f) => f,
            Err(_) => self.reopen(&inode, OFlags::RDONLY | OFlags::CLOEXEC)?,
        };
        let mode = self.reserve_mode(&inode, false, true)?;
        match self.handles.entry(fh) {
            dashmap::mapref::entry::Entry::Occupied(_) => self.unreserve_mode(&inode, mode),
            dashmap::mapref::entry::Entry::Vacant(e) => {
                tracing::debug!(
                    "file handle {fh:#x} of inode {ino}, of an earlier daemon, opened again"
                );
                e.insert(Arc::new(Handle {
                    ino,
                    file,
                    mode: Mutex::new(mode),
                    era: inode.era,
                }));
            }
        }
        Ok(())
    }

    /// Inode `ino`, for a handle `fh` of an earlier daemon: the file that handle was opened
    /// on, or ESTALE when that file is gone and another took its number (the kernel holds
    /// both under one node id then, and the handle's writes must not reach the other).
    pub(super) fn opened_inode(&self, ino: FuseIno, fh: u64) -> FsResult<Arc<Inode>> {
        let inode = self.inode(ino)?;
        match self.inodes.opened_on(fh) {
            Some(on) if inode.handle.as_deref() != Some(&on[..]) => {
                tracing::info!(
                    "handle {fh:#x} of an earlier daemon was opened on a file that is gone; \
                     inode {ino} is another file now"
                );
                Err(FsError::errno(
                    libc::ESTALE,
                    "handle of an earlier daemon, on a file removed since",
                ))
            }
            _ => Ok(inode),
        }
    }

    /// The kernel refused passthrough for this open: serve it through the daemon instead, if
    /// no other passthrough open of the inode is alive (the kernel would refuse a cached one).
    pub fn demote_passthrough(&self, fh: u64) -> FsResult<IoMode> {
        let handle = self.handle(fh)?;
        let inode = self.inode(handle.ino)?;
        let mut open = inode.open.lock();
        let mut mode = handle.mode.lock();
        if *mode == IoMode::Passthrough {
            if open.passthrough > 1 {
                return Err(FsError::errno(
                    libc::EIO,
                    "passthrough refused while other passthrough opens exist",
                ));
            }
            open.passthrough -= 1;
            open.cached += 1;
            *mode = IoMode::Cached;
            inode.passthrough_gone.notify_all();
        }
        Ok(*mode)
    }

    /// Closes a file handle; returns the mode it had.
    pub fn release(&self, fh: u64) -> FsResult<IoMode> {
        self.inodes.log_closed(fh);
        let Some((_, handle)) = self.handles.remove(&fh) else {
            if fh < self.first_fh {
                // Opened by an earlier daemon of the connection, and never used since.
                return Ok(IoMode::Cached);
            }
            return Err(FsError::errno(libc::EBADF, "release of unknown handle"));
        };
        let mode = handle.mode();
        if let Some(inode) = self.inodes.get(handle.ino) {
            self.unreserve_mode(&inode, mode);
        }
        Ok(mode)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        self.read_then(fh, offset, size, <[u8]>::to_vec)
    }

    /// Reads, and hands the bytes to `reply` (which sends them to the kernel) before a direct
    /// write of the file may go on: bytes read before such a write reach the page cache before
    /// the write invalidates it.
    pub fn read_then<R>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> FsResult<R> {
        let handle = self.handle(fh)?;
        self.fetch(handle.ino, offset, offset.saturating_add(size as u64))?;
        let inode = self.inodes.get(handle.ino);
        let _no_direct_write = inode.as_ref().map(|i| i.direct_io.read());
        let buf = read_at_most(&handle.file, offset, size as usize).ctx("read")?;
        self.stats.count(&self.stats.reads);
        self.stats.add(&self.stats.read_bytes, buf.len() as u64);
        Ok(reply(&buf))
    }

    /// [`Core::write`] of the kernel's page writeback (`FUSE_WRITE_CACHE`): the backpressure
    /// hook is told, so a cut's syncfs waiting for these pages is not held up by them.
    pub fn write_pages(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill_suidgid: bool,
    ) -> FsResult<u32> {
        super::PAGE_WRITEBACK.with(|w| w.set(true));
        let r = self.write(fh, offset, data, kill_suidgid);
        super::PAGE_WRITEBACK.with(|w| w.set(false));
        r
    }

    /// Writes `data` at `offset`. `kill_suidgid`: the writer lacks CAP_FSETID, so the set-id
    /// bits go, as a local filesystem would do (the kernel leaves this to us, which spares a
    /// `security.capability` lookup per write).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suidgid: bool) -> FsResult<u32> {
        self.write_locked(fh, offset, data, kill_suidgid, false)
            .map(|(_, n)| n)
    }

    /// [`Core::write`] of a direct write: one whose request says `O_DIRECT` (the descriptor's
    /// flags at the time) and is not page writeback. It bypassed the kernel's page cache,
    /// which dropped the range before sending it but not after, when it was asynchronous, and
    /// readers may have cached the old bytes meanwhile (a local filesystem drops them at
    /// completion). So the write waits for reads in flight to reply, and once the bytes are
    /// in the backing file, the kernel is told to drop that range.
    pub fn write_direct(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill_suidgid: bool,
    ) -> FsResult<u32> {
        let (ino, n) = self.write_locked(fh, offset, data, kill_suidgid, true)?;
        // After the barrier and the inode's lock are released: dropping pages can wait for
        // other requests.
        self.pages_changed(ino, offset, u64::from(n));
        Ok(n)
    }

    fn write_locked(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill_suidgid: bool,
        direct: bool,
    ) -> FsResult<(FuseIno, u32)> {
        let handle = self.handle(fh)?;
        // Bytes around the written ones keep coming from the store: whole chunks are local
        // before the write (and before a frozen file saves its old bytes).
        self.fetch(handle.ino, offset, offset.saturating_add(data.len() as u64))?;
        let _barrier = self.data_mutation()?;
        // Recorded before anything changes, set-id bits included: a write whose record
        // failed changes nothing.
        self.journal_file_op(
            handle.ino,
            Op::Write {
                ino: handle.ino,
                offset,
                len: data.len() as u64,
            },
        )?;
        if kill_suidgid {
            self.kill_suidgid(handle.ino, &handle.file)?;
        }
        self.freeze_before_change_fd(handle.ino, offset, offset + data.len() as u64, &handle.file)?;
        // A direct write waits for reads in flight, until they have replied.
        let inode = direct.then(|| self.inodes.get(handle.ino)).flatten();
        let excl = inode.as_ref().map(|i| i.direct_io.write());
        let mut done = 0;
        while done < data.len() {
            match handle.file.write_at(&data[done..], offset + done as u64) {
                Ok(0) => return Err(FsError::errno(libc::EIO, "write wrote nothing")),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Out of space part way: like write(2), report what was written (the caller
                // retries the rest and gets the error then).
                Err(_) if done > 0 => break,
                Err(e) => return Err(FsError::io("write", e)),
            }
        }
        drop(excl);
        self.stats.count(&self.stats.writes);
        self.stats.add(&self.stats.write_bytes, done as u64);
        Ok((handle.ino, done as u32))
    }

    /// close(2) of one descriptor of an open file. Every write already reached the backing
    /// file, which is local, so there is nothing to push; the handle must exist.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh) {
            // Nothing to push either: its writes were committed before the rollback.
            Err(e) if e.to_errno() == libc::ESTALE => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Clears set-user-id, and set-group-id when group-executable, like the VFS does when an
    /// unprivileged process writes or truncates.
    pub(super) fn kill_suidgid(&self, ino: FuseIno, fd: &impl std::os::fd::AsFd) -> FsResult<()> {
        let st = rustix::fs::fstat(fd).ctx("stat for set-id bits")?;
        let mut mode = st.st_mode & 0o7777;
        mode &= !libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            mode &= !libc::S_ISGID;
        }
        if mode != st.st_mode & 0o7777 {
            self.journal_file_op(ino, Op::Meta { ino, dir: None })?;
            rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).ctx("clear set-id bits")?;
            self.attrs_changed(ino);
        }
        Ok(())
    }

    pub fn fsync(&self, ino: FuseIno, fh: u64, datasync: bool) -> FsResult<()> {
        self.stats.count(&self.stats.fsyncs);
        self.journal_fsync(ino);
        let handle = self.handle(fh)?;
        if datasync {
            owsfs_sys::fs::fdatasync(&handle.file).ctx("fdatasync")
        } else {
            rustix::fs::fsync(&handle.file).ctx("fsync")
        }
    }

    /// Notes an fsync in the journal. The record changes no dirty state and precedes no
    /// mutation, so failing to write it (a full disk) must not fail the fsync itself.
    pub(super) fn journal_fsync(&self, ino: FuseIno) {
        if let Err(e) = self.journal.append(Op::Fsync { ino }) {
            tracing::debug!("fsync of inode {ino} not recorded: {e}");
        }
    }

    /// `kill_suidgid`: the caller is unprivileged, and like a write (as `vfs_fallocate` does on
    /// a local filesystem) any fallocate clears the set-id bits; the kernel leaves it to us.
    pub fn fallocate(
        &self,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
        kill_suidgid: bool,
    ) -> FsResult<()> {
        let handle = self.handle(fh)?;
        // Collapsing or inserting a range moves every byte after it.
        let len = if mode & owsfs_sys::fs::FALLOC_MOVES_DATA != 0 {
            u64::MAX - offset
        } else {
            len
        };
        // Bytes it keeps (or moves) must be local first.
        self.fetch(handle.ino, offset, offset.saturating_add(len))?;
        let _barrier = self.data_mutation()?;
        self.freeze_before_change_fd(handle.ino, offset, offset.saturating_add(len), &handle.file)?;
        self.journal_file_op(
            handle.ino,
            Op::Write {
                ino: handle.ino,
                offset,
                len,
            },
        )?;
        if kill_suidgid {
            self.kill_suidgid(handle.ino, &handle.file)?;
        }
        owsfs_sys::fs::fallocate(&handle.file, mode, offset, len).ctx("fallocate")
    }

    /// SEEK_DATA and SEEK_HOLE (the kernel answers the other whences itself).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let handle = self.handle(fh)?;
        if matches!(whence, libc::SEEK_DATA | libc::SEEK_HOLE) && !self.whole(handle.ino) {
            // Holes of a file still being fetched are not the file's holes: the whole file
            // counts as data, which lseek(2) allows.
            let size = rustix::fs::fstat(&handle.file).ctx("lseek stat")?.st_size as u64;
            let offset = offset as u64;
            if offset >= size {
                return Err(FsError::errno(libc::ENXIO, "lseek past the end"));
            }
            return Ok(if whence == libc::SEEK_DATA {
                offset
            } else {
                size
            } as i64);
        }
        let pos = match whence {
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
            libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
            libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
            libc::SEEK_CUR => rustix::fs::SeekFrom::Current(offset),
            _ => return Err(FsError::errno(libc::EINVAL, "lseek whence")),
        };
        let at = rustix::fs::seek(&handle.file, pos).ctx("lseek")?;
        Ok(at as i64)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> FsResult<u32> {
        let src = self.handle(fh_in)?;
        let dst = self.handle(fh_out)?;
        let len = len.min(u32::MAX as u64 & !0xfff);
        self.fetch(src.ino, offset_in, offset_in.saturating_add(len))?;
        self.fetch(dst.ino, offset_out, offset_out.saturating_add(len))?;
        let _barrier = self.data_mutation()?;
        self.freeze_before_change_fd(
            dst.ino,
            offset_out,
            offset_out.saturating_add(len),
            &dst.file,
        )?;
        self.journal_file_op(
            dst.ino,
            Op::Write {
                ino: dst.ino,
                offset: offset_out,
                len,
            },
        )?;
        let n =
            owsfs_sys::fs::copy_range(&src.file, offset_in, &dst.file, offset_out, len as usize)
                .ctx("copy_file_range")?;
        self.stats.count(&self.stats.writes);
        self.stats.add(&self.stats.write_bytes, n as u64);
        Ok(n as u32)
    }
}

/// Reads up to `size` bytes at `offset` (fewer only at end of file) into a new buffer. The
/// bytes go straight into the buffer's spare capacity (`rustix::buffer::spare_capacity`
/// extends its length by what each `pread` filled), so the buffer is never zeroed first:
/// a read costs its copy, not a memset of up to 1 MiB as well.
fn read_at_most(file: &File, offset: u64, size: usize) -> rustix::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(size);
    while buf.len() < size {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

pub(super) fn writable(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

/// Flags for opening the backing file of an open(2) with `flags`. O_APPEND is dropped because
/// the kernel supplies the offset of every write (and pwrite ignores it under O_APPEND);
/// O_SYNC/O_DSYNC because the kernel sends fsync after such writes; O_DIRECT because the
/// kernel aligns nothing for us. Writers get O_RDWR so shared mappings can be read back.
pub(super) fn backing_open_flags(flags: i32) -> OFlags {
    let mut out = if writable(flags) {
        OFlags::RDWR
    } else {
        OFlags::RDONLY
    };
    out |= OFlags::CLOEXEC;
    if flags & libc::O_TRUNC != 0 {
        out |= OFlags::TRUNC;
    }
    if flags & owsfs_sys::fs::O_NOATIME_RAW != 0 {
        out |= owsfs_sys::fs::NOATIME;
    }
    if flags & libc::O_EXCL != 0 {
        out |= OFlags::EXCL;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use crate::core::IoMode;
    use crate::core::tests::{ROOT, fixture, name, zeroed_bytes};
    use crate::inode::ROOT_INO;

    #[test]
    fn create_write_read_and_the_journal_sees_it() {
        let f = fixture(true);
        let d = f.core.mkdir(ROOT_INO, name("d"), 0o755, ROOT).unwrap();
        let dino = d.ino();
        let (e, h, fh) = f
            .core
            .create(dino, name("x"), 0o644, libc::O_RDWR, ROOT)
            .unwrap();
        assert_eq!(
            h.mode(),
            IoMode::Cached,
            "a writer is served through the cache"
        );
        assert_eq!(f.core.write(fh, 10, b"hello", false).unwrap(), 5);
        assert_eq!(f.core.read(fh, 10, 100).unwrap(), b"hello");
        f.core.fsync(e.ino(), fh, false).unwrap();
        assert_eq!(f.core.release(fh).unwrap(), IoMode::Cached);
        assert_eq!(
            std::fs::read(f.backing.join("d/x")).unwrap()[10..],
            *b"hello"
        );

        let dirty = f.core.journal().dirty();
        let file = &dirty.files[&e.ino()];
        assert_eq!(file.path.as_deref(), Some(Path::new("d/x")));
        assert!(file.created);
        assert_eq!(file.extents.iter().collect::<Vec<_>>(), vec![(10, 15)]);
        assert!(dirty.dirs.contains(Path::new("")) && dirty.dirs.contains(Path::new("d")));
        // The inode number is the backing file's.
        let ino = std::fs::metadata(f.backing.join("d/x")).unwrap().ino();
        assert_eq!(e.ino().0, ino);
    }

    #[test]
    fn io_modes_never_mix_passthrough_and_cached_opens() {
        let f = fixture(true);
        std::fs::write(f.backing.join("a"), b"abc").unwrap();
        let ino = f.core.lookup(ROOT_INO, name("a")).unwrap().ino();
        let (r1, fh1) = f.core.open(ino, libc::O_RDONLY, false).unwrap();
        assert_eq!(r1.mode(), IoMode::Passthrough);
        // A writer while a passthrough reader is open is refused, and changes nothing.
        assert_eq!(
            f.core
                .open(ino, libc::O_RDWR | libc::O_TRUNC, false)
                .unwrap_err()
                .to_errno(),
            libc::ETXTBSY
        );
        assert_eq!(std::fs::read(f.backing.join("a")).unwrap(), b"abc");
        f.core.release(fh1).unwrap();
        // Once the reader is gone, the writer opens; readers then share the cached mode.
        let (w, fhw) = f.core.open(ino, libc::O_WRONLY, false).unwrap();
        assert_eq!(w.mode(), IoMode::Cached);
        let (r, fhr) = f.core.open(ino, libc::O_RDONLY, false).unwrap();
        assert_eq!(r.mode(), IoMode::Cached);
        f.core.release(fhw).unwrap();
        f.core.release(fhr).unwrap();
        // A refused passthrough is demoted to the cache.
        let (r, fh) = f.core.open(ino, libc::O_RDONLY, false).unwrap();
        assert_eq!(r.mode(), IoMode::Passthrough);
        assert_eq!(f.core.demote_passthrough(fh).unwrap(), IoMode::Cached);
        f.core.release(fh).unwrap();
        // With passthrough off (the default), everything is cached and nothing is refused.
        let g = fixture(false);
        std::fs::write(g.backing.join("a"), b"abc").unwrap();
        let ino = g.core.lookup(ROOT_INO, name("a")).unwrap().ino();
        let (r, _) = g.core.open(ino, libc::O_RDONLY, false).unwrap();
        assert_eq!(r.mode(), IoMode::Cached);
        let (w, _) = g.core.open(ino, libc::O_RDWR, false).unwrap();
        assert_eq!(w.mode(), IoMode::Cached);
    }

    /// A read fills a buffer that was never zeroed, and returns what the file has: all of
    /// it in the middle, fewer bytes at the end, none past it.
    #[test]
    fn reads_do_not_zero_their_buffer() {
        let f = fixture(false);
        let content: Vec<u8> = (0..(1 << 20) + 5).map(|i| (i % 251) as u8).collect();
        std::fs::write(f.backing.join("big"), &content).unwrap();
        let ino = f.core.lookup(ROOT_INO, name("big")).unwrap().ino();
        let (_, fh) = f.core.open(ino, libc::O_RDONLY, false).unwrap();
        let before = zeroed_bytes();
        let data = f.core.read(fh, 0, 1 << 20).unwrap();
        assert!(
            zeroed_bytes() - before < 4096,
            "a 1 MiB read zero-filled {} bytes",
            zeroed_bytes() - before
        );
        assert!(data == content[..1 << 20]);
        assert_eq!(f.core.read(fh, 1 << 20, 4096).unwrap(), content[1 << 20..]);
        assert_eq!(f.core.read(fh, 1000, 7).unwrap(), content[1000..1007]);
        assert!(f.core.read(fh, 2 << 20, 4096).unwrap().is_empty());
        assert!(f.core.read(fh, 0, 0).unwrap().is_empty());
        f.core.release(fh).unwrap();
    }
}
