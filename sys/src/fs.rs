//! File calls that Linux has and other systems lack or spell otherwise.
//!
//! The core's inode table holds one descriptor per inode. On Linux it is an `O_PATH`
//! descriptor, which names an inode without opening it for I/O, and `/proc/self/fd/N`
//! reopens it, also when a mount covers its directory. On macOS the table holds plain
//! read-only descriptors (`O_SYMLINK` for a symlink, `O_NONBLOCK` so that a FIFO does not
//! block), and a reopen goes through the path `F_GETPATH` reports.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use rustix::fs::{Mode, OFlags};

/// Opens `name` in `dir` as a name for the inode, not for I/O. `flags` adds `NOFOLLOW`,
/// `DIRECTORY` or `CLOEXEC`.
#[cfg(target_os = "linux")]
pub fn open_path<P: rustix::path::Arg>(
    dir: impl AsFd,
    name: P,
    flags: OFlags,
) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, flags | OFlags::PATH, Mode::empty())
}
#[cfg(not(target_os = "linux"))]
pub fn open_path<P: rustix::path::Arg>(
    dir: impl AsFd,
    name: P,
    flags: OFlags,
) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, portable_path_flags(flags), Mode::empty())
}

/// The flags a system without `O_PATH` opens a name with: read-only, not blocking on a
/// FIFO, never taking a terminal as the daemon's controlling one, and on macOS `O_SYMLINK`
/// to hold a symlink itself where Linux says `O_NOFOLLOW`.
pub fn portable_path_flags(flags: OFlags) -> OFlags {
    let mut out = (flags | OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY)
        - OFlags::RDWR
        - OFlags::WRONLY;
    if flags.contains(OFlags::NOFOLLOW) {
        out = (out - OFlags::NOFOLLOW) | symlink_flag();
    }
    out
}

#[cfg(target_os = "macos")]
fn symlink_flag() -> OFlags {
    OFlags::from_bits_retain(libc::O_SYMLINK as _)
}
#[cfg(not(target_os = "macos"))]
fn symlink_flag() -> OFlags {
    OFlags::NOFOLLOW
}

/// The raw `open` flag for a name-only descriptor, as [`crate::handle::open`] takes it.
#[cfg(target_os = "linux")]
pub const O_PATH_RAW: i32 = libc::O_PATH;
#[cfg(not(target_os = "linux"))]
pub const O_PATH_RAW: i32 = libc::O_RDONLY;

/// Whether [`fd_path`] reaches a file whose directory a mount covers now (Linux's
/// `/proc/self/fd/N` does; a path from macOS's `F_GETPATH` leads into the mount). Adopting
/// a directory in place (`owsfs mount --adopt`) needs it.
#[cfg(target_os = "linux")]
pub const FD_PATH_REACHES_COVERED_FILES: bool = true;
#[cfg(not(target_os = "linux"))]
pub const FD_PATH_REACHES_COVERED_FILES: bool = false;

/// A path by which this process reaches the file a descriptor refers to, for the calls
/// that take a path.
#[cfg(target_os = "linux")]
pub fn fd_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    Ok(PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())))
}
#[cfg(target_os = "macos")]
pub fn fd_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: F_GETPATH writes at most PATH_MAX bytes, NUL included, into `buf`.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPATH, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&buf[..len])))
}
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub fn fd_path(_fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "this system cannot name a file by its descriptor",
    ))
}

/// `ESTALE` unless `a` and `b` are the same file: a path from `F_GETPATH` may name another
/// file by the time it is opened (a rename, an editor's save over it).
pub fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> rustix::io::Result<()> {
    let (x, y) = (rustix::fs::fstat(a)?, rustix::fs::fstat(b)?);
    if x.st_dev == y.st_dev && x.st_ino == y.st_ino {
        Ok(())
    } else {
        Err(rustix::io::Errno::STALE)
    }
}

/// [`fd_path`] as a C string.
pub fn fd_cpath(fd: BorrowedFd<'_>) -> io::Result<CString> {
    use std::os::unix::ffi::OsStringExt;
    CString::new(fd_path(fd)?.into_os_string().into_vec()).map_err(io::Error::other)
}

/// Reopens descriptors for I/O. On Linux it holds `/proc/self/fd`, so that each reopen is a
/// one-component lookup.
pub struct Reopener {
    #[cfg(target_os = "linux")]
    proc_self_fd: OwnedFd,
}

impl Reopener {
    #[cfg(target_os = "linux")]
    pub fn new() -> io::Result<Reopener> {
        let proc_self_fd = rustix::fs::open(
            "/proc/self/fd",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("open /proc/self/fd: {e}"),
            )
        })?;
        Ok(Reopener { proc_self_fd })
    }
    #[cfg(not(target_os = "linux"))]
    pub fn new() -> io::Result<Reopener> {
        Ok(Reopener {})
    }

    /// Opens the file `fd` names again, with `flags` (and `mode`, for `O_CREAT`).
    #[cfg(target_os = "linux")]
    pub fn reopen(
        &self,
        fd: BorrowedFd<'_>,
        flags: OFlags,
        mode: Mode,
    ) -> rustix::io::Result<OwnedFd> {
        use std::os::fd::AsRawFd;
        rustix::fs::openat(
            &self.proc_self_fd,
            fd.as_raw_fd().to_string().as_str(),
            flags,
            mode,
        )
    }
    #[cfg(not(target_os = "linux"))]
    pub fn reopen(
        &self,
        fd: BorrowedFd<'_>,
        flags: OFlags,
        mode: Mode,
    ) -> rustix::io::Result<OwnedFd> {
        let path = fd_path(fd).map_err(|e| {
            rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::NOTSUP)
        })?;
        let again = rustix::fs::open(&path, flags | OFlags::NOFOLLOW, mode)?;
        same_file(fd, again.as_fd())?;
        Ok(again)
    }
}

impl Reopener {
    /// A name-only descriptor ([`open_path`]'s kind) of the file `fd` has open, also of one
    /// with no name.
    #[cfg(target_os = "linux")]
    pub fn name_only(&self, fd: BorrowedFd<'_>) -> rustix::io::Result<OwnedFd> {
        self.reopen(fd, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
    }
    #[cfg(not(target_os = "linux"))]
    pub fn name_only(&self, fd: BorrowedFd<'_>) -> rustix::io::Result<OwnedFd> {
        rustix::io::fcntl_dupfd_cloexec(fd, 0)
    }
}

/// Flushes every file of the filesystem that holds `fd`.
#[cfg(target_os = "linux")]
pub fn syncfs(fd: impl AsFd) -> rustix::io::Result<()> {
    rustix::fs::syncfs(fd)
}
#[cfg(not(target_os = "linux"))]
pub fn syncfs(fd: impl AsFd) -> rustix::io::Result<()> {
    syncfs_portable(fd)
}

/// Without `syncfs`: `sync()` starts writing every dirty file of the machine back (and on
/// Linux waits for it), and an fsync of `fd` waits for its own file.
pub fn syncfs_portable(fd: impl AsFd) -> rustix::io::Result<()> {
    rustix::fs::sync();
    rustix::fs::fsync(fd)
}

/// Flushes a file's data (and the metadata needed to read it back).
#[cfg(target_os = "linux")]
pub fn fdatasync(fd: impl AsFd) -> rustix::io::Result<()> {
    rustix::fs::fdatasync(fd)
}
#[cfg(not(target_os = "linux"))]
pub fn fdatasync(fd: impl AsFd) -> rustix::io::Result<()> {
    rustix::fs::fsync(fd)
}

/// Starts writing a range back without waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`):
/// a hint, so a system without it does nothing.
#[cfg(target_os = "linux")]
pub fn start_writeback(fd: impl AsFd, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor the caller holds.
    unsafe {
        libc::sync_file_range(
            fd.as_fd().as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}
#[cfg(not(target_os = "linux"))]
pub fn start_writeback(_fd: impl AsFd, _offset: u64, _len: u64) {}

/// Reserves disk space for a range without changing the file's size. Only an optimisation:
/// where the system cannot (or the filesystem refuses), nothing is reserved.
#[cfg(target_os = "linux")]
pub fn preallocate(fd: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    rustix::fs::fallocate(fd, rustix::fs::FallocateFlags::KEEP_SIZE, offset, len)
        .map_err(io::Error::from)
}
#[cfg(not(target_os = "linux"))]
pub fn preallocate(_fd: impl AsFd, _offset: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

/// The `fallocate` modes that move the bytes after the range (the FUSE request carries
/// Linux's values on every system).
#[cfg(target_os = "linux")]
pub const FALLOC_MOVES_DATA: i32 = libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE;
#[cfg(not(target_os = "linux"))]
pub const FALLOC_MOVES_DATA: i32 = 0x08 | 0x20;

/// `O_NOATIME` as an open flag for the backing files: nothing where the system lacks it.
#[cfg(target_os = "linux")]
pub const NOATIME: OFlags = OFlags::NOATIME;
#[cfg(not(target_os = "linux"))]
pub const NOATIME: OFlags = OFlags::empty();

/// `O_NOATIME` and `O_DIRECT` as the FUSE open flags carry them (0: never set).
#[cfg(target_os = "linux")]
pub const O_NOATIME_RAW: i32 = libc::O_NOATIME;
#[cfg(not(target_os = "linux"))]
pub const O_NOATIME_RAW: i32 = 0;
#[cfg(target_os = "linux")]
pub const O_DIRECT_RAW: i32 = libc::O_DIRECT;
#[cfg(not(target_os = "linux"))]
pub const O_DIRECT_RAW: i32 = 0;

/// The flags `renameat2` takes, as the FUSE rename request carries them: Linux's values, or
/// on macOS `renamex_np`'s (`RENAME_EXCL`, `RENAME_SWAP`), which rustix maps alike.
#[cfg(target_os = "linux")]
pub const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
#[cfg(target_os = "linux")]
pub const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;
#[cfg(not(target_os = "linux"))]
pub const RENAME_NOREPLACE: u32 = rustix::fs::RenameFlags::NOREPLACE.bits() as u32;
#[cfg(not(target_os = "linux"))]
pub const RENAME_EXCHANGE: u32 = rustix::fs::RenameFlags::EXCHANGE.bits() as u32;

/// Marks a directory no-atime for what is created under it (`chattr +A`).
#[cfg(target_os = "linux")]
pub fn set_noatime_inherited(dir: impl AsFd) -> rustix::io::Result<()> {
    let flags = rustix::fs::ioctl_getflags(&dir)?;
    if !flags.contains(rustix::fs::IFlags::NOATIME) {
        rustix::fs::ioctl_setflags(&dir, flags | rustix::fs::IFlags::NOATIME)?;
    }
    Ok(())
}
#[cfg(not(target_os = "linux"))]
pub fn set_noatime_inherited(_dir: impl AsFd) -> rustix::io::Result<()> {
    Err(rustix::io::Errno::NOTSUP)
}

/// Copies `len` bytes between two files at the given offsets, in the kernel where it can
/// (and by reflink where the filesystem shares extents). Returns the bytes copied, which
/// are fewer only at the end of `from`.
#[cfg(target_os = "linux")]
pub fn copy_range(
    from: impl AsFd,
    from_offset: u64,
    to: impl AsFd,
    to_offset: u64,
    len: usize,
) -> rustix::io::Result<usize> {
    let mut off_in = from_offset;
    let mut off_out = to_offset;
    rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), len)
}
#[cfg(not(target_os = "linux"))]
pub fn copy_range(
    from: impl AsFd,
    from_offset: u64,
    to: impl AsFd,
    to_offset: u64,
    len: usize,
) -> rustix::io::Result<usize> {
    copy_range_portable(from, from_offset, to, to_offset, len)
}

/// [`copy_range`] by reads and writes.
pub fn copy_range_portable(
    from: impl AsFd,
    from_offset: u64,
    to: impl AsFd,
    to_offset: u64,
    len: usize,
) -> rustix::io::Result<usize> {
    let mut buf = vec![0u8; len.min(1 << 20)];
    let mut done = 0usize;
    while done < len {
        let want = (len - done).min(buf.len());
        let n = rustix::io::pread(&from, &mut buf[..want], from_offset + done as u64)?;
        if n == 0 {
            break;
        }
        let mut written = 0;
        while written < n {
            written +=
                rustix::io::pwrite(&to, &buf[written..n], to_offset + (done + written) as u64)?;
        }
        done += n;
    }
    Ok(done)
}

/// Creates a file with no name in `dir` (`O_TMPFILE`), open with `flags`. The error is the
/// system's: `EOPNOTSUPP` (or `EISDIR`, `EINVAL` from older kernels) where the system or the
/// filesystem lacks `O_TMPFILE`; a caller that can do without makes a named file and removes
/// it (see [`unnamed_file_portable`]), since only it knows which names are free.
#[cfg(target_os = "linux")]
pub fn open_tmpfile(dir: impl AsFd, flags: OFlags, mode: Mode) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(dir, c".", flags | OFlags::TMPFILE, mode)
}
#[cfg(not(target_os = "linux"))]
pub fn open_tmpfile(_dir: impl AsFd, _flags: OFlags, _mode: Mode) -> rustix::io::Result<OwnedFd> {
    Err(rustix::io::Errno::OPNOTSUPP)
}

/// Makes a FIFO, socket or device node `name` in `dir`.
#[cfg(target_os = "linux")]
pub fn mknodat<P: rustix::path::Arg>(
    dir: impl AsFd,
    name: P,
    kind: rustix::fs::FileType,
    mode: Mode,
    dev: u64,
) -> rustix::io::Result<()> {
    rustix::fs::mknodat(dir, name, kind, mode, dev)
}
#[cfg(not(target_os = "linux"))]
pub fn mknodat<P: rustix::path::Arg>(
    dir: impl AsFd,
    name: P,
    kind: rustix::fs::FileType,
    mode: Mode,
    dev: u64,
) -> rustix::io::Result<()> {
    use std::os::fd::AsRawFd;
    let name = name.into_c_str()?;
    let full = libc::mode_t::try_from(kind.as_raw_mode() | mode.as_raw_mode())
        .map_err(|_| rustix::io::Errno::INVAL)?;
    // SAFETY: a valid descriptor and C string; plain integers otherwise.
    let r = unsafe {
        if kind == rustix::fs::FileType::Fifo {
            libc::mkfifoat(dir.as_fd().as_raw_fd(), name.as_ptr(), full)
        } else {
            libc::mknodat(
                dir.as_fd().as_raw_fd(),
                name.as_ptr(),
                full,
                dev as libc::dev_t,
            )
        }
    };
    if r == 0 {
        Ok(())
    } else {
        Err(rustix::io::Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ))
    }
}

/// `fallocate(2)` with the mode bits a FUSE request carries (Linux's values). Elsewhere only
/// mode 0 (allocate, growing the file) is done; the others are `EOPNOTSUPP`.
#[cfg(target_os = "linux")]
pub fn fallocate(fd: impl AsFd, mode: i32, offset: u64, len: u64) -> rustix::io::Result<()> {
    let flags = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
    rustix::fs::fallocate(fd, flags, offset, len)
}
#[cfg(not(target_os = "linux"))]
pub fn fallocate(fd: impl AsFd, mode: i32, offset: u64, len: u64) -> rustix::io::Result<()> {
    if mode != 0 {
        return Err(rustix::io::Errno::OPNOTSUPP);
    }
    rustix::fs::fallocate(fd, rustix::fs::FallocateFlags::empty(), offset, len)
}

/// The major and minor numbers of a device number, as tar stores them.
#[cfg(target_os = "linux")]
pub fn dev_major_minor(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}
#[cfg(not(target_os = "linux"))]
pub fn dev_major_minor(dev: u64) -> (u32, u32) {
    dev_major_minor_bsd(dev)
}

/// The BSDs' and macOS's 32-bit device number: major in the top 8 bits, minor below.
pub fn dev_major_minor_bsd(dev: u64) -> (u32, u32) {
    (((dev >> 24) & 0xff) as u32, (dev & 0x00ff_ffff) as u32)
}

/// A file with no name made the portable way: created under `name` in `dir` with
/// `O_EXCL`, then unlinked.
pub fn unnamed_file_portable(
    dir: impl AsFd,
    name: &std::ffi::OsStr,
    flags: OFlags,
    mode: Mode,
) -> rustix::io::Result<OwnedFd> {
    let fd = rustix::fs::openat(&dir, name, flags | OFlags::CREATE | OFlags::EXCL, mode)?;
    rustix::fs::unlinkat(&dir, name, rustix::fs::AtFlags::empty())?;
    Ok(fd)
}

/// Changes the owner of the file `fd` names, a symlink itself included.
#[cfg(target_os = "linux")]
pub fn chown_fd(
    fd: impl AsFd,
    uid: Option<rustix::fs::Uid>,
    gid: Option<rustix::fs::Gid>,
) -> rustix::io::Result<()> {
    use rustix::fs::AtFlags;
    rustix::fs::chownat(
        fd,
        c"",
        uid,
        gid,
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
}
#[cfg(not(target_os = "linux"))]
pub fn chown_fd(
    fd: impl AsFd,
    uid: Option<rustix::fs::Uid>,
    gid: Option<rustix::fs::Gid>,
) -> rustix::io::Result<()> {
    // Without O_PATH the descriptor is open (O_SYMLINK for a symlink): fchown reaches it.
    rustix::fs::fchown(fd, uid, gid)
}

/// Sets the times of the file `fd` names.
#[cfg(target_os = "linux")]
pub fn utimens_fd(fd: impl AsFd, times: &rustix::fs::Timestamps) -> rustix::io::Result<()> {
    rustix::fs::utimensat(fd, c"", times, rustix::fs::AtFlags::EMPTY_PATH)
}
#[cfg(not(target_os = "linux"))]
pub fn utimens_fd(fd: impl AsFd, times: &rustix::fs::Timestamps) -> rustix::io::Result<()> {
    rustix::fs::futimens(fd, times)
}

/// Gives the file `fd` names another name, `name` in `dir`. Linking by descriptor needs
/// CAP_DAC_READ_SEARCH; where it is refused, the descriptor's `/proc/self/fd` path (which
/// names the file itself) is linked instead.
#[cfg(target_os = "linux")]
pub fn link_fd<P: rustix::path::Arg + Copy>(
    fd: impl AsFd,
    dir: impl AsFd,
    name: P,
) -> rustix::io::Result<()> {
    use rustix::fs::AtFlags;
    match rustix::fs::linkat(&fd, c"", &dir, name, AtFlags::EMPTY_PATH) {
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM) => {
            let path = fd_cpath(fd.as_fd()).map_err(|_| rustix::io::Errno::BADF)?;
            rustix::fs::linkat(
                rustix::fs::CWD,
                path.as_c_str(),
                dir,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
        r => r,
    }
}
#[cfg(not(target_os = "linux"))]
pub fn link_fd<P: rustix::path::Arg + Copy>(
    fd: impl AsFd,
    dir: impl AsFd,
    name: P,
) -> rustix::io::Result<()> {
    let path = fd_path(fd.as_fd())
        .map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::NOTSUP))?;
    rustix::fs::linkat(
        rustix::fs::CWD,
        &path,
        dir,
        name,
        rustix::fs::AtFlags::empty(),
    )
}

/// A pipe whose ends close on exec.
#[cfg(target_os = "linux")]
pub fn pipe_cloexec() -> rustix::io::Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
}
#[cfg(not(target_os = "linux"))]
pub fn pipe_cloexec() -> rustix::io::Result<(OwnedFd, OwnedFd)> {
    pipe_cloexec_portable()
}

/// [`pipe_cloexec`] in two steps (another thread's fork in between may inherit the ends).
pub fn pipe_cloexec_portable() -> rustix::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe()?;
    for fd in [&r, &w] {
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
    }
    Ok((r, w))
}

/// The error an extended attribute that is not there gives: ENODATA on Linux, ENOATTR on
/// macOS and the BSDs.
#[cfg(target_os = "linux")]
pub const NO_XATTR_RAW: i32 = libc::ENODATA;
#[cfg(not(target_os = "linux"))]
pub const NO_XATTR_RAW: i32 = libc::ENOATTR;

/// [`NO_XATTR_RAW`] as rustix's error.
pub fn no_xattr() -> rustix::io::Errno {
    rustix::io::Errno::from_raw_os_error(NO_XATTR_RAW)
}

/// Whether the kernel can serve reads and writes of an open file from a backing file
/// itself (FUSE passthrough, Linux 6.9). Elsewhere every read goes through the daemon.
#[cfg(target_os = "linux")]
pub const KERNEL_PASSTHROUGH: bool = true;
#[cfg(not(target_os = "linux"))]
pub const KERNEL_PASSTHROUGH: bool = false;

/// The fuse module's switch of FUSE over io_uring (Linux 6.14; off until root turns it on).
#[cfg(target_os = "linux")]
const FUSE_URING_SWITCH: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the kernel offers FUSE over io_uring (Linux 6.14): the fuse module's
/// `enable_uring` parameter is Y. Elsewhere, never.
#[cfg(target_os = "linux")]
pub fn fuse_uring_enabled() -> bool {
    std::fs::read_to_string(FUSE_URING_SWITCH).is_ok_and(|v| v.trim() == "Y")
}
#[cfg(not(target_os = "linux"))]
pub fn fuse_uring_enabled() -> bool {
    false
}

/// Turns FUSE over io_uring on (root): false where the kernel has none (before 6.14, or
/// not Linux), an error where it may not be turned on.
#[cfg(target_os = "linux")]
pub fn turn_fuse_uring_on() -> std::io::Result<bool> {
    if !std::path::Path::new(FUSE_URING_SWITCH).exists() {
        return Ok(false);
    }
    std::fs::write(FUSE_URING_SWITCH, "Y")?;
    Ok(true)
}
#[cfg(not(target_os = "linux"))]
pub fn turn_fuse_uring_on() -> std::io::Result<bool> {
    Ok(false)
}

/// Aborts the FUSE connection of the mount at `mountpoint` (`/sys/fs/fuse/connections/N/abort`,
/// mounting fusectl there if it is not): every request waiting for its daemon fails at once.
/// For tests that must not wait for good on a daemon that stopped answering.
#[cfg(target_os = "linux")]
pub fn abort_fuse_connection(mountpoint: &std::path::Path) -> std::io::Result<()> {
    let device = crate::mount::device_of(mountpoint)?;
    let minor = device.rsplit(':').next().unwrap_or(&device);
    let dir = std::path::Path::new("/sys/fs/fuse/connections");
    if !dir.join(minor).exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(dir)
            .status();
    }
    std::fs::write(dir.join(minor).join("abort"), "1")
}
#[cfg(not(target_os = "linux"))]
pub fn abort_fuse_connection(_mountpoint: &std::path::Path) -> std::io::Result<()> {
    Err(std::io::Error::other("no FUSE connections to abort here"))
}

/// Whether an extended attribute belongs to the file's content as a workspace keeps it (and
/// a kept entry loses it when the newer generation lacks it): on Linux the `user.` and
/// `trusted.` namespaces and POSIX ACLs, the other namespaces being the system's; macOS
/// has no namespaces, and keeps all but its own `com.apple.system.` names.
#[cfg(target_os = "linux")]
pub fn xattr_is_content(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name.starts_with(b"trusted.")
        || name.starts_with(b"system.posix_acl_")
}
#[cfg(not(target_os = "linux"))]
pub fn xattr_is_content(name: &[u8]) -> bool {
    !name.starts_with(b"com.apple.system.")
}

/// Whether a file can be named and opened by a handle that survives renames and daemon
/// restarts (see [`crate::handle`]).
pub const HANDLES: bool = crate::handle::SUPPORTED;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn the_portable_copy_copies_a_range_and_stops_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = std::fs::File::create_new(dir.path().join("a")).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).unwrap();
        let b = std::fs::File::create_new(dir.path().join("b")).unwrap();
        let n = copy_range_portable(&a, 100, &b, 7, 2_500_000).unwrap();
        assert_eq!(n, 2_500_000);
        let got = std::fs::read(dir.path().join("b")).unwrap();
        assert_eq!(&got[7..], &data[100..2_500_100]);
        assert_eq!(&got[..7], &[0u8; 7]);
        let n = copy_range_portable(&a, 2_999_990, &b, 0, 100).unwrap();
        assert_eq!(n, 10, "stops at the end of the source");
        // The kernel's copy agrees.
        let c = std::fs::File::create_new(dir.path().join("c")).unwrap();
        assert_eq!(copy_range(&a, 100, &c, 7, 2_500_000).unwrap(), 2_500_000);
        assert_eq!(std::fs::read(dir.path().join("c")).unwrap(), got);
    }

    #[test]
    fn the_portable_syncfs_and_unnamed_file_work() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::File::open(dir.path()).unwrap();
        syncfs_portable(&d).unwrap();
        syncfs(&d).unwrap();
        let fd = unnamed_file_portable(
            &d,
            std::ffi::OsStr::new("x"),
            OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .unwrap();
        rustix::io::write(&fd, b"hello").unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no name left"
        );
        assert!(
            open_tmpfile(&d, OFlags::RDWR, Mode::from_raw_mode(0o600)).is_ok()
                || !cfg!(target_os = "linux")
        );
        assert_eq!(dev_major_minor_bsd(0x0c00_0003), (12, 3));
        let a = std::fs::File::open(dir.path()).unwrap();
        same_file(a.as_fd(), d.as_fd()).unwrap();
        assert_eq!(
            same_file(a.as_fd(), fd.as_fd()),
            Err(rustix::io::Errno::STALE)
        );
        fdatasync(&fd).unwrap();
        let (r, w) = pipe_cloexec_portable().unwrap();
        rustix::io::write(&w, b"x").unwrap();
        let mut b = [0u8; 1];
        assert_eq!(rustix::io::read(&r, &mut b).unwrap(), 1);
        let flags = rustix::io::fcntl_getfd(&r).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        assert_eq!(
            rustix::fs::getxattr(dir.path(), "user.none", &mut [0u8; 4]).unwrap_err(),
            no_xattr()
        );
    }

    #[test]
    fn a_portable_path_descriptor_reopens_through_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"abc").unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("l")).unwrap();
        let d = std::fs::File::open(dir.path()).unwrap();
        // What macOS opens with, minus O_SYMLINK (Linux refuses a symlink with NOFOLLOW).
        let flags = portable_path_flags(OFlags::CLOEXEC);
        assert!(flags.contains(OFlags::NONBLOCK) && !flags.contains(OFlags::NOFOLLOW));
        let fd = rustix::fs::openat(&d, "f", flags, Mode::empty()).unwrap();
        let again = Reopener::new()
            .unwrap()
            .reopen(fd.as_fd(), OFlags::RDONLY, Mode::empty())
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(fd_path(again.as_fd()).unwrap()).unwrap(),
            "abc"
        );
        let fd = open_path(&d, "l", OFlags::NOFOLLOW | OFlags::CLOEXEC).unwrap();
        assert!(
            fd_cpath(fd.as_fd())
                .unwrap()
                .as_bytes()
                .starts_with(b"/proc/self/fd/")
        );
    }
}
