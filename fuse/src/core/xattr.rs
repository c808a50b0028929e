//! Extended attributes: getxattr, listxattr, setxattr and removexattr.

use std::ffi::{CString, OsStr};
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
    fn xattr_path(&self, inode: &Inode, name: Option<&OsStr>) -> FsResult<CString> {
        // The inode's descriptor is O_PATH, so its /proc path reaches the node itself, a
        // symlink too (whose `user.` names the backing filesystem then refuses, as Linux does).
        // Without FUSE_POSIX_ACL the kernel would not enforce POSIX ACLs, so storing them
        // would only pretend.
        if let Some(name) = name
            && name.as_bytes().starts_with(b"system.posix_acl_")
            && !self.posix_acl_enabled()
        {
            return Err(FsError::errno(libc::EOPNOTSUPP, "POSIX ACLs"));
        }
        Ok(Self::proc_path(&inode.fd))
    }

    pub fn getxattr(&self, ino: FuseIno, name: &OsStr, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(ino)?;
        let path = self.xattr_path(&inode, Some(name))?;
        if size == 0 {
            let n = rustix::fs::getxattr_query(path.as_c_str(), name).ctx("getxattr")?;
            return Ok(XattrReply::Size(n as u32));
        }
        let mut buf = vec![0u8; size as usize];
        let n = rustix::fs::getxattr(path.as_c_str(), name, &mut buf[..]).ctx("getxattr")?;
        buf.truncate(n);
        Ok(XattrReply::Data(buf))
    }

    pub fn listxattr(&self, ino: FuseIno, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(ino)?;
        let path = Self::proc_path(&inode.fd);
        let mut buf = vec![0u8; if size == 0 { 64 * 1024 } else { size as usize }];
        let n = rustix::fs::listxattr(path.as_c_str(), &mut buf[..]).ctx("listxattr")?;
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
        let path = self.xattr_path(&inode, Some(name))?;
        let _barrier = self.mutation()?;
        self.journal_meta(&inode)?;
        rustix::fs::setxattr(
            path.as_c_str(),
            name,
            value,
            rustix::fs::XattrFlags::from_bits_retain(flags as u32),
        )
        .ctx("setxattr")?;
        if let Some(groups) = kill_sgid_unless_in {
            let st = rustix::fs::fstat(&inode.fd).ctx("stat after setxattr")?;
            if st.st_mode & libc::S_ISGID != 0 && !groups.contains(&st.st_gid) {
                let mode = st.st_mode & 0o7777 & !libc::S_ISGID;
                rustix::fs::chmod(path.as_c_str(), rustix::fs::Mode::from_raw_mode(mode))
                    .ctx("clear set-group-id")?;
                self.attrs_changed(ino);
            }
        }
        Ok(())
    }

    pub fn removexattr(&self, ino: FuseIno, name: &OsStr) -> FsResult<()> {
        let inode = self.inode(ino)?;
        let path = self.xattr_path(&inode, Some(name))?;
        let _barrier = self.mutation()?;
        self.journal_meta(&inode)?;
        rustix::fs::removexattr(path.as_c_str(), name).ctx("removexattr")
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
