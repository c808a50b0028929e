//! Extended attributes of the file a name-only descriptor ([`crate::fs::open_path`]) names,
//! whatever its kind, a symlink included (never its target). On Linux the descriptor is
//! `O_PATH`, which the `f*xattr` calls refuse, so they go by its `/proc/self/fd/N` path
//! (which names the node itself). Elsewhere the descriptor is open (`O_SYMLINK` for a
//! symlink on macOS), and the `f*xattr` calls take it.

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;

use rustix::fs::XattrFlags;
use rustix::io::{Errno, Result};

#[cfg(target_os = "linux")]
fn path(fd: BorrowedFd<'_>) -> Result<std::ffi::CString> {
    crate::fs::fd_cpath(fd).map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))
}

/// The value of `name` into `buf`, or its size when `buf` is empty.
#[cfg(target_os = "linux")]
pub fn get(fd: BorrowedFd<'_>, name: &OsStr, buf: &mut [u8]) -> Result<usize> {
    let p = path(fd)?;
    if buf.is_empty() {
        rustix::fs::getxattr_query(p.as_c_str(), name)
    } else {
        rustix::fs::getxattr(p.as_c_str(), name, buf)
    }
}
#[cfg(not(target_os = "linux"))]
pub fn get(fd: BorrowedFd<'_>, name: &OsStr, buf: &mut [u8]) -> Result<usize> {
    if buf.is_empty() {
        rustix::fs::fgetxattr_query(fd, name)
    } else {
        rustix::fs::fgetxattr(fd, name, buf)
    }
}

/// The names, NUL-terminated, into `buf`, or their size when `buf` is empty.
#[cfg(target_os = "linux")]
pub fn list(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize> {
    let p = path(fd)?;
    if buf.is_empty() {
        rustix::fs::listxattr_query(p.as_c_str())
    } else {
        rustix::fs::listxattr(p.as_c_str(), buf)
    }
}
#[cfg(not(target_os = "linux"))]
pub fn list(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize> {
    if buf.is_empty() {
        rustix::fs::flistxattr_query(fd)
    } else {
        rustix::fs::flistxattr(fd, buf)
    }
}

/// Sets `name` to `value`.
#[cfg(target_os = "linux")]
pub fn set(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: XattrFlags) -> Result<()> {
    rustix::fs::setxattr(path(fd)?.as_c_str(), name, value, flags)
}
#[cfg(not(target_os = "linux"))]
pub fn set(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: XattrFlags) -> Result<()> {
    rustix::fs::fsetxattr(fd, name, value, flags)
}

/// Removes `name`.
#[cfg(target_os = "linux")]
pub fn remove(fd: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    rustix::fs::removexattr(path(fd)?.as_c_str(), name)
}
#[cfg(not(target_os = "linux"))]
pub fn remove(fd: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    rustix::fs::fremovexattr(fd, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::OFlags;
    use std::os::fd::AsFd;

    #[test]
    fn a_symlinks_own_attributes_not_its_targets() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", d.path().join("l")).unwrap();
        let dir = std::fs::File::open(d.path()).unwrap();
        let f = crate::fs::open_path(&dir, "f", OFlags::NOFOLLOW | OFlags::CLOEXEC).unwrap();
        let l = crate::fs::open_path(&dir, "l", OFlags::NOFOLLOW | OFlags::CLOEXEC).unwrap();
        let name = OsStr::new("user.k");
        set(f.as_fd(), name, b"v", XattrFlags::empty()).unwrap();
        assert_eq!(get(f.as_fd(), name, &mut []).unwrap(), 1);
        let mut buf = [0u8; 8];
        assert_eq!(get(f.as_fd(), name, &mut buf).unwrap(), 1);
        assert_eq!(&buf[..1], b"v");
        let n = list(f.as_fd(), &mut [0u8; 64]).unwrap();
        assert_eq!(n, b"user.k\0".len());
        // The symlink has none of its own (Linux allows `trusted.` only, as root).
        assert_eq!(
            get(l.as_fd(), name, &mut buf).unwrap_err(),
            crate::fs::no_xattr()
        );
        remove(f.as_fd(), name).unwrap();
        assert_eq!(
            get(f.as_fd(), name, &mut buf).unwrap_err(),
            crate::fs::no_xattr()
        );
    }
}
