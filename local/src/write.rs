//! The one writer of nodes: how an entry of a tree from the store becomes a file, directory,
//! symlink or special file on the local disk. A node is made in three steps, each its own
//! function, so a caller can put other work between them: [`create`] (private mode, a file
//! sparse at its size), [`write_at`] (content, verified by the caller's read), then
//! [`set_attrs`] (xattrs, owner when root, mode, times) last, because writing into a file or
//! a directory moves its times. Full restores (`crate::restore`) and lazy hydration
//! (`owsfs-hydrate`) use it; exports and drills will.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use owsfs_store::{Content, NodeKind, TreeEntry};
use rustix::fs::{AtFlags, Mode, OFlags};

/// What [`create`] made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The node exists (attributes still to set).
    Made,
    /// Not made, and not an error: a socket (never stored with content), or a device or fifo
    /// the filesystem refused (logged).
    Skipped,
}

/// Creates entry `e` as `name` in `dir`, readable and writable only by its owner until
/// [`set_attrs`]: a directory empty, a file sparse at its size, a symlink with its target, a
/// fifo or device node. An existing name is an error (EEXIST).
pub fn create(dir: BorrowedFd<'_>, name: &OsStr, e: &TreeEntry) -> io::Result<Created> {
    match (&e.kind, &e.content) {
        (NodeKind::Dir, Content::Dir(_)) => {
            rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))?
        }
        (NodeKind::File, Content::File(_)) => {
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            rustix::fs::ftruncate(&fd, e.size)?;
        }
        (NodeKind::Symlink, Content::Symlink(target)) => {
            rustix::fs::symlinkat(OsStr::from_bytes(target), dir, name)?
        }
        (NodeKind::Fifo | NodeKind::CharDev | NodeKind::BlockDev, _) => {
            let kind = match e.kind {
                NodeKind::Fifo => rustix::fs::FileType::Fifo,
                NodeKind::CharDev => rustix::fs::FileType::CharacterDevice,
                _ => rustix::fs::FileType::BlockDevice,
            };
            if let Err(err) =
                owsfs_sys::fs::mknodat(dir, name, kind, Mode::from_raw_mode(0o600), e.rdev)
            {
                tracing::warn!("cannot make {}: {err}", String::from_utf8_lossy(&e.name));
                return Ok(Created::Skipped);
            }
        }
        (NodeKind::Socket, _) => {
            tracing::debug!("socket {} is not made", String::from_utf8_lossy(&e.name));
            return Ok(Created::Skipped);
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "entry {} has content that does not match its kind",
                    String::from_utf8_lossy(&e.name)
                ),
            ));
        }
    }
    Ok(Created::Made)
}

/// Writes all of `data` at `offset` of an open file.
pub fn write_at(file: &impl AsFd, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        match rustix::io::pwrite(file, &data[done..], offset + done as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Opens file `name` in `dir` for writing its content.
pub fn open_for_content(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Sets the attributes of entry `e`: xattrs (of any kind of node), owner (only as root:
/// otherwise the files are the caller's), mode (not of a symlink), and times (mtime; atime
/// the same). `name: None` sets them on `dir` itself.
pub fn set_attrs(
    dir: BorrowedFd<'_>,
    name: Option<&OsStr>,
    e: &TreeEntry,
    is_root: bool,
) -> io::Result<()> {
    let uid = Some(rustix::fs::Uid::from_raw(e.uid));
    let gid = Some(rustix::fs::Gid::from_raw(e.gid));
    let mode = Mode::from_raw_mode(e.mode);
    let mtime = rustix::fs::Timespec {
        tv_sec: e.mtime_sec,
        tv_nsec: e.mtime_nsec as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: mtime,
        last_modification: mtime,
    };
    let Some(name) = name else {
        set_xattrs(dir, e)?;
        if is_root {
            rustix::fs::fchown(dir, uid, gid)?;
        }
        rustix::fs::fchmod(dir, mode)?;
        return rustix::fs::futimens(dir, &times).map_err(Into::into);
    };
    if !e.xattrs.is_empty() {
        let node = owsfs_sys::fs::open_path(dir, name, OFlags::NOFOLLOW | OFlags::CLOEXEC)?;
        for (k, v) in &e.xattrs {
            owsfs_sys::xattr::set(
                node.as_fd(),
                OsStr::from_bytes(k),
                v,
                rustix::fs::XattrFlags::empty(),
            )?;
        }
    }
    if is_root {
        rustix::fs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)?;
    }
    if e.kind != NodeKind::Symlink {
        rustix::fs::chmodat(dir, name, mode, AtFlags::empty())?;
    }
    rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// Removes the xattrs of `name` in `dir` that `e` does not have (in the `user.` and
/// `trusted.` namespaces, and POSIX ACLs: the others are the system's), for an entry kept
/// from an older generation.
pub fn drop_other_xattrs(dir: BorrowedFd<'_>, name: &OsStr, e: &TreeEntry) -> io::Result<()> {
    let node = owsfs_sys::fs::open_path(dir, name, OFlags::NOFOLLOW | OFlags::CLOEXEC)?;
    let mut buf = vec![0u8; 64 << 10];
    let n = match owsfs_sys::xattr::list(node.as_fd(), &mut buf) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for k in buf[..n].split(|b| *b == 0).filter(|k| !k.is_empty()) {
        if owsfs_sys::fs::xattr_is_content(k) && !e.xattrs.iter().any(|(x, _)| &x[..] == k) {
            owsfs_sys::xattr::remove(node.as_fd(), OsStr::from_bytes(k))?;
        }
    }
    Ok(())
}

fn set_xattrs(fd: BorrowedFd<'_>, e: &TreeEntry) -> io::Result<()> {
    for (k, v) in &e.xattrs {
        rustix::fs::fsetxattr(fd, OsStr::from_bytes(k), v, rustix::fs::XattrFlags::empty())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use owsfs_store::FileContent;

    use super::*;

    fn entry(name: &str, kind: NodeKind, content: Content) -> TreeEntry {
        TreeEntry {
            name: name.as_bytes().to_vec(),
            kind,
            mode: 0o640,
            uid: 0,
            gid: 0,
            mtime_sec: 1_600_000_000,
            mtime_nsec: 5,
            size: 0,
            rdev: 0,
            link_key: 0,
            xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
            content,
        }
    }

    #[test]
    fn makes_each_kind_and_sets_attributes_last() {
        let d = tempfile::tempdir().unwrap();
        let dir =
            rustix::fs::open(d.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let mut f = entry("f", NodeKind::File, Content::File(FileContent::Empty));
        f.size = 10;
        assert_eq!(
            create(dir.as_fd(), OsStr::new("f"), &f).unwrap(),
            Created::Made
        );
        let fd = open_for_content(dir.as_fd(), OsStr::new("f")).unwrap();
        write_at(&fd, 3, b"abc").unwrap();
        set_attrs(dir.as_fd(), Some(OsStr::new("f")), &f, false).unwrap();
        let m = std::fs::metadata(d.path().join("f")).unwrap();
        assert_eq!(
            (m.len(), m.mode() & 0o7777, m.mtime()),
            (10, 0o640, 1_600_000_000)
        );
        assert_eq!(&std::fs::read(d.path().join("f")).unwrap()[3..6], b"abc");

        // A symlink's xattrs land on the symlink (Linux allows no `user.` ones there).
        let mut l = entry("l", NodeKind::Symlink, Content::Symlink(b"f".to_vec()));
        l.xattrs = vec![(b"trusted.k".to_vec(), b"v".to_vec())];
        create(dir.as_fd(), OsStr::new("l"), &l).unwrap();
        set_attrs(dir.as_fd(), Some(OsStr::new("l")), &l, false).unwrap();
        assert_eq!(
            std::fs::read_link(d.path().join("l")).unwrap(),
            OsStr::new("f")
        );
        let mut v = [0u8; 8];
        let n = rustix::fs::lgetxattr(d.path().join("l"), "trusted.k", &mut v).unwrap();
        assert_eq!(&v[..n], b"v");
        assert_eq!(
            rustix::fs::getxattr(d.path().join("f"), "trusted.k", &mut v).unwrap_err(),
            owsfs_sys::fs::no_xattr(),
            "not on its target"
        );

        let p = entry("p", NodeKind::Fifo, Content::None);
        create(dir.as_fd(), OsStr::new("p"), &p).unwrap();
        assert!(
            std::fs::metadata(d.path().join("p"))
                .unwrap()
                .file_type()
                .is_fifo()
        );

        let s = entry("s", NodeKind::Socket, Content::None);
        assert_eq!(
            create(dir.as_fd(), OsStr::new("s"), &s).unwrap(),
            Created::Skipped
        );

        let bad = entry("x", NodeKind::Dir, Content::None);
        assert!(create(dir.as_fd(), OsStr::new("x"), &bad).is_err());
        assert!(
            create(dir.as_fd(), OsStr::new("f"), &f).is_err(),
            "an existing name is never overwritten"
        );
    }

    /// An entry kept from an older generation loses the xattrs and the POSIX ACL the new
    /// generation's entry does not have (an ACL left behind could still grant access).
    #[test]
    fn drop_other_xattrs_drops_acls_too() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        // user::rw- user:4242:r-- group::r-- mask::r-- other::---
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 4242),
            (4, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&perm.to_le_bytes());
            acl.extend_from_slice(&id.to_le_bytes());
        }
        if rustix::fs::setxattr(
            &p,
            "system.posix_acl_access",
            &acl,
            rustix::fs::XattrFlags::empty(),
        )
        .is_err()
        {
            return; // a filesystem without ACLs
        }
        rustix::fs::setxattr(&p, "user.gone", b"v", rustix::fs::XattrFlags::empty()).unwrap();
        let dir =
            rustix::fs::open(d.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let mut e = entry("f", NodeKind::File, Content::File(FileContent::Empty));
        e.xattrs.clear();
        drop_other_xattrs(dir.as_fd(), OsStr::new("f"), &e).unwrap();
        let mut buf = vec![0u8; 1024];
        let n = rustix::fs::listxattr(&p, &mut buf).unwrap();
        assert!(
            !buf[..n]
                .split(|b| *b == 0)
                .any(|k| k.starts_with(b"system.posix_acl") || k == b"user.gone"),
            "left: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
}
