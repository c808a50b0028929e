//! Attributes: getattr, setattr (mode, owner, size, times), access and statfs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use owsfs_journal::{FuseIno, NodeKind, Op};
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

use super::{Caller, Core};
use crate::error::{Context, FsError, FsResult};
use crate::inode::ROOT_INO;
use crate::kind;

/// What changes in `setattr`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSpec>,
    pub mtime: Option<TimeSpec>,
    pub fh: Option<u64>,
    /// The caller lacks CAP_FSETID: a truncate clears the set-id bits.
    pub kill_suidgid: bool,
}

/// A time to set, or "now".
#[derive(Clone, Copy, Debug)]
pub enum TimeSpec {
    Now,
    At(SystemTime),
}

impl Core {
    pub fn getattr(&self, ino: FuseIno) -> FsResult<FileAttr> {
        self.stats.count(&self.stats.getattrs);
        let inode = self.inode(ino)?;
        let st = rustix::fs::fstat(&inode.fd).ctx("getattr")?;
        Ok(self.attr(&st))
    }

    pub fn setattr(&self, ino: FuseIno, set: SetAttr) -> FsResult<FileAttr> {
        self.stats.count(&self.stats.setattrs);
        let inode = self.inode(ino)?;
        let handle = match set.fh {
            Some(fh) => self.handles.get(&fh).map(|h| Arc::clone(h.value())),
            None => None,
        };
        let is_dir = inode.kind == NodeKind::Dir;
        let _barrier = if set.size.is_some() {
            self.data_mutation()?
        } else {
            self.mutation()?
        };
        if set.mode.is_some()
            || set.uid.is_some()
            || set.gid.is_some()
            || set.atime.is_some()
            || set.mtime.is_some()
        {
            let dir = if is_dir {
                self.path_of(ino).or_else(|| Some(PathBuf::new()))
            } else {
                None
            };
            if is_dir {
                self.journal.append(Op::Meta { ino, dir })?;
            } else {
                self.journal_file_op(ino, Op::Meta { ino, dir: None })?;
            }
        }
        // Every record before the first change: a setattr whose record failed changes nothing.
        if let Some(size) = set.size {
            self.journal_file_op(ino, Op::Truncate { ino, size })?;
        }
        if let Some(mode) = set.mode {
            let mode = Mode::from_raw_mode(mode & 0o7777);
            match &handle {
                Some(h) => rustix::fs::fchmod(&h.file, mode).ctx("chmod")?,
                None if inode.kind == NodeKind::Symlink => {
                    return Err(FsError::errno(libc::EOPNOTSUPP, "chmod of a symlink"));
                }
                None => rustix::fs::chmodat(
                    rustix::fs::CWD,
                    Self::proc_path(&inode.fd).as_c_str(),
                    mode,
                    AtFlags::empty(),
                )
                .ctx("chmod")?,
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            owsfs_sys::fs::chown_fd(
                &inode.fd,
                set.uid.map(rustix::fs::Uid::from_raw),
                set.gid.map(rustix::fs::Gid::from_raw),
            )
            .ctx("chown")?;
        }
        if let Some(size) = set.size {
            self.fetch_if_frozen(ino, size)?;
            self.hyd_truncate(ino, size);
            self.freeze_before_change(ino, size, u64::MAX, &inode)?;
            let reopened;
            let file = match &handle {
                Some(h) => &h.file,
                None => {
                    reopened = self.reopen(&inode, OFlags::WRONLY | OFlags::CLOEXEC)?;
                    &reopened
                }
            };
            file.set_len(size).ctx("truncate")?;
            if set.kill_suidgid && set.mode.is_none() {
                self.kill_suidgid(ino, file)?;
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = Timestamps {
                last_access: timespec(set.atime),
                last_modification: timespec(set.mtime),
            };
            match &handle {
                Some(h) => rustix::fs::futimens(&h.file, &times).ctx("utimens")?,
                None => owsfs_sys::fs::utimens_fd(&inode.fd, &times).ctx("utimens")?,
            }
        }
        let st = rustix::fs::fstat(&inode.fd).ctx("setattr stat")?;
        Ok(self.attr(&st))
    }

    /// access(2): checked against the mode bits as the kernel would (it normally checks
    /// itself, with default_permissions).
    pub fn access(&self, ino: FuseIno, mask: i32, caller: Caller) -> FsResult<()> {
        let attr = self.getattr(ino)?;
        if mask == libc::F_OK {
            return Ok(());
        }
        let perm = attr.perm as i32;
        let granted = if caller.uid == 0 {
            let any_x = perm & 0o111 != 0 || attr.kind == FileType::Directory;
            libc::R_OK | libc::W_OK | if any_x { libc::X_OK } else { 0 }
        } else if caller.uid == attr.uid {
            (perm >> 6) & 7
        } else if caller.gid == attr.gid {
            (perm >> 3) & 7
        } else {
            perm & 7
        };
        if mask & !granted != 0 {
            return Err(FsError::errno(libc::EACCES, "access"));
        }
        Ok(())
    }

    pub fn statfs(&self) -> FsResult<rustix::fs::StatVfs> {
        let root = self.inode(ROOT_INO)?;
        rustix::fs::fstatvfs(&root.fd).ctx("statfs")
    }

    pub(super) fn attr(&self, st: &rustix::fs::Stat) -> FileAttr {
        let kind = kind::to_fuser(kind::of_mode(st.st_mode));
        FileAttr {
            ino: INodeNo(self.ino_of(st).0),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec as i64),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec as i64),
            crtime: UNIX_EPOCH,
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            // An orphan's one name is in the orphanage: none in the workspace.
            nlink: (st.st_nlink as u32).saturating_sub(u32::from(self.is_orphan(self.ino_of(st)))),
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn timespec(t: Option<TimeSpec>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(TimeSpec::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(TimeSpec::At(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as _,
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos() as i64;
                if nsec > 0 {
                    secs -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timespec {
                    tv_sec: secs,
                    tv_nsec: nsec as _,
                }
            }
        },
    }
}
