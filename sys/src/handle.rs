//! File handles (`name_to_handle_at`, `open_by_handle_at`): how lazy hydration names a
//! backing inode across renames and daemon restarts. A handle carries the inode's generation,
//! so one whose inode was freed (and its number perhaps reused) fails with ESTALE rather than
//! opening another file. Opening by handle needs CAP_DAC_READ_SEARCH.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

/// Whether this system names inodes by handle. Where it does not (macOS), lazy hydration
/// is off: a workspace is restored in full before it is served.
#[cfg(target_os = "linux")]
pub const SUPPORTED: bool = true;
#[cfg(not(target_os = "linux"))]
pub const SUPPORTED: bool = false;

/// The handle of `name` in `dir` (`""`: `dir` itself; a symlink is not followed), as
/// `[handle_type: i32 LE][f_handle bytes]`.
#[cfg(target_os = "linux")]
pub fn of(dir: BorrowedFd<'_>, name: &Path) -> io::Result<Vec<u8>> {
    linux::of(dir, name)
}
#[cfg(not(target_os = "linux"))]
pub fn of(_dir: BorrowedFd<'_>, _name: &Path) -> io::Result<Vec<u8>> {
    Err(unsupported())
}

/// Opens the inode a handle names. `mount` is any descriptor on the backing filesystem.
#[cfg(target_os = "linux")]
pub fn open(mount: BorrowedFd<'_>, handle: &[u8], flags: i32) -> io::Result<OwnedFd> {
    linux::open(mount, handle, flags)
}
#[cfg(not(target_os = "linux"))]
pub fn open(_mount: BorrowedFd<'_>, _handle: &[u8], _flags: i32) -> io::Result<OwnedFd> {
    Err(unsupported())
}

#[cfg(not(target_os = "linux"))]
fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "file handles (open_by_handle_at) are Linux-only",
    )
}

#[cfg(target_os = "linux")]
mod linux {
    /// Largest handle the kernel hands out (MAX_HANDLE_SZ).
    const MAX_HANDLE: usize = 128;
    const HEADER: usize = std::mem::size_of::<libc::file_handle>();

    use super::*;
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;

    pub(super) fn of(dir: BorrowedFd<'_>, name: &Path) -> io::Result<Vec<u8>> {
        let name = CString::new(name.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let flags = if name.as_bytes().is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
        // u64 storage keeps the header aligned.
        let mut buf = vec![0u64; (HEADER + MAX_HANDLE).div_ceil(8)];
        let fh = buf.as_mut_ptr().cast::<libc::file_handle>();
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `buf` is aligned for `file_handle` and holds the header plus MAX_HANDLE bytes,
        // which `handle_bytes` announces; `name` is a valid C string; the kernel writes no more.
        let r = unsafe {
            (*fh).handle_bytes = MAX_HANDLE as libc::c_uint;
            libc::name_to_handle_at(dir.as_raw_fd(), name.as_ptr(), fh, &mut mount_id, flags)
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the call succeeded, so the header is initialised and `handle_bytes` bytes of
        // handle follow it inside `buf`.
        let (len, kind) = unsafe { ((*fh).handle_bytes as usize, (*fh).handle_type) };
        let bytes =
            // SAFETY: as above; `buf` is at least HEADER + MAX_HANDLE bytes and len <= MAX_HANDLE.
            unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>().add(HEADER), len.min(MAX_HANDLE)) };
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(bytes);
        Ok(out)
    }

    pub(super) fn open(mount: BorrowedFd<'_>, handle: &[u8], flags: i32) -> io::Result<OwnedFd> {
        if handle.len() < 4 || handle.len() - 4 > MAX_HANDLE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed file handle",
            ));
        }
        let kind = i32::from_le_bytes([handle[0], handle[1], handle[2], handle[3]]);
        let data = &handle[4..];
        let mut buf = vec![0u64; (HEADER + MAX_HANDLE).div_ceil(8)];
        let fh = buf.as_mut_ptr().cast::<libc::file_handle>();
        // SAFETY: `buf` is aligned and large enough for the header and `data` (checked above).
        let fd = unsafe {
            (*fh).handle_bytes = data.len() as libc::c_uint;
            (*fh).handle_type = kind;
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                buf.as_mut_ptr().cast::<u8>().add(HEADER),
                data.len(),
            );
            libc::open_by_handle_at(mount.as_raw_fd(), fh, flags | libc::O_CLOEXEC)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_handle_follows_renames_and_goes_stale_with_its_inode() {
        if !rustix::process::geteuid().is_root() {
            return; // open_by_handle_at needs CAP_DAC_READ_SEARCH
        }
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::File::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("a"), b"x").unwrap();
        let h = of(root.as_fd(), Path::new("a")).unwrap();
        std::fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
        let fd = open(root.as_fd(), &h, libc::O_RDONLY).unwrap();
        let ino = std::fs::File::from(fd).metadata().unwrap().ino();
        assert_eq!(ino, std::fs::metadata(dir.path().join("b")).unwrap().ino());
        std::fs::remove_file(dir.path().join("b")).unwrap();
        let err = open(root.as_fd(), &h, libc::O_RDONLY).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESTALE));
        let root_h = of(root.as_fd(), Path::new("")).unwrap();
        assert!(open(root.as_fd(), &root_h, libc::O_RDONLY | libc::O_DIRECTORY).is_ok());
    }
}
