//! Extended attributes: getxattr, listxattr, setxattr and removexattr.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use owsfs_journal::{FuseIno, NodeKind, Op};

use super::Core;
use crate::error::{Context, FsError, FsResult};
use crate::inode::Inode;

/// The answer to getxattr/listxattr: the size asked for, or the bytes.
#[derive(Debug)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

impl Core {
    /// Without FUSE_POSIX_ACL the kernel would not enforce POSIX ACLs, so storing them would
    /// only pretend.
    fn check_xattr_name(&self, name: &OsStr) -> FsResult<()> {
        if name.as_bytes().starts_with(b"system.posix_acl_") && !self.posix_acl_enabled() {
            return Err(FsError::errno(libc::EOPNOTSUPP, "POSIX ACLs"));
        }
        Ok(())
    }

    // The inode's descriptor names the node itself, a symlink too (whose `user.` names the
    // backing filesystem then refuses, as Linux does): `owsfs_sys::xattr` reaches it.
    pub fn getxattr(&self, ino: FuseIno, name: &OsStr, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(ino)?;
        self.check_xattr_name(name)?;
        let mut buf = vec![0u8; size as usize];
        let n = owsfs_sys::xattr::get(inode.fd.as_fd(), name, &mut buf).ctx("getxattr")?;
        if size == 0 {
            return Ok(XattrReply::Size(n as u32));
        }
        buf.truncate(n);
        Ok(XattrReply::Data(buf))
    }

    pub fn listxattr(&self, ino: FuseIno, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(ino)?;
        let mut buf = vec![0u8; if size == 0 { 64 * 1024 } else { size as usize }];
        let n = owsfs_sys::xattr::list(inode.fd.as_fd(), &mut buf).ctx("listxattr")?;
        buf.truncate(n);
        Ok(if size == 0 {
            XattrReply::Size(n as u32)
        } else {
            XattrReply::Data(buf)
        })
    }

    /// `kill_sgid_unless_in`: the groups of an unprivileged caller; setting the access ACL
    /// of a file whose group is not among them clears its set-group-id bit, as the VFS does
    /// (the daemon sets it as root, which would keep the bit).
    pub fn setxattr(
        &self,
        ino: FuseIno,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        kill_sgid_unless_in: Option<&[u32]>,
    ) -> FsResult<()> {
        let inode = self.inode(ino)?;
        self.check_xattr_name(name)?;
        let _barrier = self.mutation()?;
        self.journal_meta(&inode)?;
        owsfs_sys::xattr::set(
            inode.fd.as_fd(),
            name,
            value,
            rustix::fs::XattrFlags::from_bits_retain(flags as u32),
        )
        .ctx("setxattr")?;
        if let Some(groups) = kill_sgid_unless_in {
            let st = rustix::fs::fstat(&inode.fd).ctx("stat after setxattr")?;
            if st.st_mode & libc::S_ISGID != 0 && !groups.contains(&st.st_gid) {
                let mode = st.st_mode & 0o7777 & !libc::S_ISGID;
                let path = Self::proc_path(&inode.fd);
                rustix::fs::chmod(path.as_c_str(), rustix::fs::Mode::from_raw_mode(mode))
                    .ctx("clear set-group-id")?;
                self.attrs_changed(ino);
            }
        }
        Ok(())
    }

    pub fn removexattr(&self, ino: FuseIno, name: &OsStr) -> FsResult<()> {
        let inode = self.inode(ino)?;
        self.check_xattr_name(name)?;
        let _barrier = self.mutation()?;
        self.journal_meta(&inode)?;
        owsfs_sys::xattr::remove(inode.fd.as_fd(), name).ctx("removexattr")
    }

    fn journal_meta(&self, inode: &Inode) -> FsResult<()> {
        if inode.kind == NodeKind::Dir {
            self.journal.append(Op::Meta {
                ino: inode.ino,
                dir: Some(self.path_of(inode.ino).unwrap_or_default()),
            })?;
            Ok(())
        } else {
            self.journal_file_op(
                inode.ino,
                Op::Meta {
                    ino: inode.ino,
                    dir: None,
                },
            )
        }
    }
}
