//! The one place that calls `owsfs_fuse::Core`: a path-level driver that does what the kernel
//! would (look up each component, call the operation on the parent and name, forget what it
//! looked up), and observes the whole tree through the core. If a `Core` signature changes,
//! this file is what changes.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use owsfs_fuse::fuser::{FileAttr, FileType};
use owsfs_fuse::{Caller, Core, CoreOptions, FsError, FuseIno, SetAttr, TimeSpec, XattrReply};

/// The root's inode number, as the harness keeps inode numbers (bare).
const ROOT_INO: u64 = owsfs_fuse::ROOT_INO.0;
use owsfs_journal::Journal;

use crate::ops::{Mode, Op, RenameMode, SLOTS, XattrMode, pattern};
use crate::tree::{Kind, Node};

const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    umask: 0,
};
/// Largest read asked of the core at once.
const READ_SIZE: u32 = 128 * 1024;

type Res<T = ()> = Result<T, i32>;

fn errno(e: FsError) -> i32 {
    e.to_errno()
}

/// What the driver needs of an entry's attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub size: u64,
    pub mtime: (i64, u32),
}

fn kind(k: FileType) -> Kind {
    match k {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

fn unix(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}

fn time(secs: i64, nsecs: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

impl From<&FileAttr> for Attr {
    fn from(a: &FileAttr) -> Self {
        Attr {
            ino: a.ino.0,
            kind: kind(a.kind),
            mode: a.perm as u32 & 0o7777,
            uid: a.uid,
            gid: a.gid,
            nlink: a.nlink as u64,
            size: a.size,
            mtime: unix(a.mtime),
        }
    }
}

/// A `Core` over a backing directory, driven by paths.
pub struct CoreFs {
    core: Core,
    /// Kernel references taken by the current operation: (inode, is a directory).
    refs: Vec<(u64, bool)>,
    /// References to directories, kept across operations: the kernel's dentry cache keeps a
    /// directory while it has a name (a cached or open child pins its parents), and the core
    /// relies on that to know the paths of the inodes below.
    dirs: HashMap<u64, u64>,
    /// (file handle, inode) open in each slot; the inode's reference is kept while open.
    open: [Option<(u64, u64)>; SLOTS],
}

impl CoreFs {
    pub fn new(backing: &Path, journal: Arc<Journal>) -> CoreFs {
        let core = Core::new(backing, journal, CoreOptions::default()).expect("open the core");
        CoreFs {
            core,
            refs: Vec::new(),
            dirs: HashMap::new(),
            open: [None; SLOTS],
        }
    }

    fn counted(&mut self, a: &FileAttr) -> Attr {
        self.refs.push((a.ino.0, a.kind == FileType::Directory));
        Attr::from(a)
    }

    /// The end of an operation, as the kernel settles it: files are forgotten (at once, where
    /// the kernel would eventually; so their inodes leave the table and numbers get reused),
    /// unless open; directories stay known until they are removed.
    fn forget_refs(&mut self) {
        for (ino, dir) in std::mem::take(&mut self.refs) {
            if dir {
                *self.dirs.entry(ino).or_default() += 1;
            } else {
                self.core.forget(FuseIno(ino), 1);
            }
        }
        let gone: Vec<u64> = self
            .dirs
            .keys()
            .copied()
            .filter(|ino| self.getattr(*ino).is_ok_and(|a| a.nlink == 0))
            .collect();
        for ino in gone {
            if let Some(n) = self.dirs.remove(&ino) {
                self.core.forget(FuseIno(ino), n);
            }
        }
    }

    /// Closes every open slot (as at the end of a process).
    pub fn close_all(&mut self) {
        for slot in 0..SLOTS {
            self.close(slot);
        }
    }

    fn close(&mut self, slot: usize) {
        if let Some((fh, ino)) = self.open[slot].take() {
            self.core.release(fh).expect("release an open file");
            self.core.forget(FuseIno(ino), 1);
        }
    }

    pub fn lookup(&mut self, parent: u64, name: &OsStr) -> Res<Attr> {
        let e = self.core.lookup(FuseIno(parent), name).map_err(errno)?;
        Ok(self.counted(&e.attr))
    }

    pub fn getattr(&self, ino: u64) -> Res<Attr> {
        self.core
            .getattr(FuseIno(ino))
            .map(|a| Attr::from(&a))
            .map_err(errno)
    }

    /// Every component looked up from the root.
    fn resolve(&mut self, path: &str) -> Res<Attr> {
        let mut attr = self.getattr(ROOT_INO)?;
        for c in path.split('/') {
            attr = self.lookup(attr.ino, OsStr::new(c))?;
        }
        Ok(attr)
    }

    /// The parent directory's inode and the last component. Like the kernel's path walk, a
    /// parent that is not a directory is ENOTDIR before the core is asked anything.
    fn resolve_parent<'p>(&mut self, path: &'p str) -> Res<(u64, &'p OsStr)> {
        let (dir, name) = match path.rsplit_once('/') {
            Some((dir, name)) => (self.resolve(dir)?, name),
            None => (self.getattr(ROOT_INO)?, path),
        };
        if dir.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        Ok((dir.ino, OsStr::new(name)))
    }

    /// The names in a directory, with the kind and inode readdir gives (no "." and "..").
    pub fn list_dir(&self, ino: u64) -> Res<Vec<(OsString, Kind, u64)>> {
        let fh = self.core.opendir(FuseIno(ino)).map_err(errno)?;
        let entries = self.core.readdir(fh, 0).map_err(errno);
        self.core.releasedir(fh);
        Ok(entries?
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.name != "." && e.name != "..")
            .map(|e| (e.name.clone(), kind(e.kind), e.ino.0))
            .collect())
    }

    fn read_fh(&self, fh: u64) -> Res<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let chunk = self
                .core
                .read(fh, out.len() as u64, READ_SIZE)
                .map_err(errno)?;
            let n = chunk.len();
            out.extend_from_slice(&chunk);
            if n < READ_SIZE as usize {
                return Ok(out);
            }
        }
    }

    /// The whole content of a file, through an open of its own.
    pub fn read_all(&self, ino: u64) -> Res<Vec<u8>> {
        let (_, fh) = self
            .core
            .open(FuseIno(ino), libc::O_RDONLY, false)
            .map_err(errno)?;
        let data = self.read_fh(fh);
        self.core.release(fh).map_err(errno)?;
        data
    }

    pub fn readlink(&self, ino: u64) -> Res<Vec<u8>> {
        self.core.readlink(FuseIno(ino)).map_err(errno)
    }

    /// The `user.*` attributes, by listxattr and getxattr (each asked for its size first).
    pub fn xattrs(&self, ino: u64) -> Res<BTreeMap<Vec<u8>, Vec<u8>>> {
        let size = match self.core.listxattr(FuseIno(ino), 0).map_err(errno)? {
            XattrReply::Size(n) => n,
            XattrReply::Data(_) => panic!("listxattr of size 0 gave data"),
        };
        let mut out = BTreeMap::new();
        if size == 0 {
            return Ok(out);
        }
        let names = match self.core.listxattr(FuseIno(ino), size).map_err(errno)? {
            XattrReply::Data(d) => d,
            XattrReply::Size(_) => panic!("listxattr gave a size"),
        };
        for name in names.split(|b| *b == 0).filter(|n| n.starts_with(b"user.")) {
            let name = OsStr::from_bytes(name);
            let len = match self.core.getxattr(FuseIno(ino), name, 0).map_err(errno)? {
                XattrReply::Size(n) => n,
                XattrReply::Data(_) => panic!("getxattr of size 0 gave data"),
            };
            let value = if len == 0 {
                Vec::new()
            } else {
                match self.core.getxattr(FuseIno(ino), name, len).map_err(errno)? {
                    XattrReply::Data(d) => d,
                    XattrReply::Size(_) => panic!("getxattr gave a size"),
                }
            };
            out.insert(name.as_bytes().to_vec(), value);
        }
        Ok(out)
    }

    /// Content of the file open in `slot`, read through its handle (None: the slot is empty).
    pub fn read_slot(&self, slot: usize) -> Option<Res<Vec<u8>>> {
        self.open[slot].map(|(fh, _)| self.read_fh(fh))
    }

    /// The whole tree as the core shows it: readdir, then lookup and getattr of each name
    /// (checked against each other), read, readlink, listxattr/getxattr.
    pub fn observe(&mut self) -> Result<Node, String> {
        let root = self
            .getattr(ROOT_INO)
            .map_err(|e| format!("getattr /: {e}"))?;
        let r = self.observe_node(root, "");
        self.forget_refs();
        r
    }

    fn observe_node(&mut self, attr: Attr, path: &str) -> Result<Node, String> {
        let fail = |what: &str, e: i32| {
            format!(
                "core: {what} /{path}: {}",
                std::io::Error::from_raw_os_error(e)
            )
        };
        let mut children = BTreeMap::new();
        let data = match attr.kind {
            Kind::Dir => {
                for (name, k, ino) in self.list_dir(attr.ino).map_err(|e| fail("readdir", e))? {
                    let child = crate::tree::join(path, &name.to_string_lossy());
                    let a = self
                        .lookup(attr.ino, &name)
                        .map_err(|e| fail(&format!("lookup of {child} listed in"), e))?;
                    let g = self.getattr(a.ino).map_err(|e| fail("getattr", e))?;
                    if a != g || a.ino != ino || a.kind != k {
                        return Err(format!(
                            "core: /{child}: readdir says ({k:?}, {ino}), lookup {a:?}, getattr {g:?}"
                        ));
                    }
                    children.insert(name, self.observe_node(a, &child)?);
                }
                Vec::new()
            }
            Kind::File => self.read_all(attr.ino).map_err(|e| fail("read", e))?,
            Kind::Symlink => self.readlink(attr.ino).map_err(|e| fail("readlink", e))?,
            Kind::Other => Vec::new(),
        };
        Ok(Node {
            ino: attr.ino,
            kind: attr.kind,
            mode: attr.mode,
            uid: attr.uid,
            gid: attr.gid,
            nlink: attr.nlink,
            size: attr.size,
            mtime: attr.mtime,
            xattrs: self.xattrs(attr.ino).map_err(|e| fail("xattrs", e))?,
            data,
            children,
        })
    }

    /// Performs `op` through the core; Ok or the errno the core answered.
    pub fn apply(&mut self, op: &Op) -> Res {
        let r = self.apply_inner(op);
        self.forget_refs();
        r
    }

    fn open_rdwr(&mut self, attr: Attr) -> Res<u64> {
        let (_, fh) = self
            .core
            .open(FuseIno(attr.ino), libc::O_RDWR, false)
            .map_err(errno)?;
        Ok(fh)
    }

    /// open(2) of `path` for reading and writing, as the kernel serves it: CREATE when the
    /// name is missing and `create` is set, else OPEN of the inode found (O_EXCL refused
    /// first); O_TRUNC of an existing file by SETATTR on the open file (no atomic O_TRUNC).
    fn open_path(
        &mut self,
        path: &str,
        create: Option<Mode>,
        excl: bool,
        trunc: bool,
    ) -> Res<(u64, u64)> {
        let (dir, name) = self.resolve_parent(path)?;
        match (self.lookup(dir, name), create) {
            (Err(libc::ENOENT), Some(mode)) => {
                let flags = libc::O_RDWR | libc::O_CREAT | if excl { libc::O_EXCL } else { 0 };
                let (e, _, fh) = self
                    .core
                    .create(FuseIno(dir), name, mode.0, flags, ROOT)
                    .map_err(errno)?;
                self.refs
                    .push((e.attr.ino.0, e.attr.kind == FileType::Directory));
                Ok((e.attr.ino.0, fh))
            }
            (Err(e), _) => Err(e),
            (Ok(_), Some(_)) if excl => Err(libc::EEXIST),
            (Ok(a), _) => {
                let fh = self.open_rdwr(a)?;
                if trunc
                    && let Err(e) = self.setattr(
                        a.ino,
                        SetAttr {
                            size: Some(0),
                            fh: Some(fh),
                            ..SetAttr::default()
                        },
                    )
                {
                    let _ = self.core.release(fh);
                    return Err(e);
                }
                Ok((a.ino, fh))
            }
        }
    }

    fn apply_inner(&mut self, op: &Op) -> Res {
        match *op {
            Op::Write {
                path,
                create,
                excl,
                trunc,
                offset,
                len,
                fill,
            } => {
                let (ino, fh) = self.open_path(path, create, excl, trunc)?;
                let written = self.core.write(fh, offset, &pattern(fill, len), false);
                self.core.release(fh).map_err(errno)?;
                match written.map_err(errno)? {
                    n if n == len => Ok(()),
                    n => panic!("short write of {n} bytes of {len} to inode {ino}"),
                }
            }
            Op::Create { path, mode, excl } => {
                let (_, fh) = self.open_path(path, Some(mode), excl, false)?;
                self.core.release(fh).map(|_| ()).map_err(errno)
            }
            Op::Truncate { path, size } => {
                let a = self.resolve(path)?;
                self.setattr(
                    a.ino,
                    SetAttr {
                        size: Some(size),
                        ..SetAttr::default()
                    },
                )
            }
            Op::Mkdir { path, mode } => {
                let (dir, name) = self.resolve_parent(path)?;
                let e = self
                    .core
                    .mkdir(FuseIno(dir), name, mode.0, ROOT)
                    .map_err(errno)?;
                self.refs
                    .push((e.attr.ino.0, e.attr.kind == FileType::Directory));
                Ok(())
            }
            Op::Rmdir { path } => {
                let (dir, name) = self.resolve_parent(path)?;
                self.core.rmdir(FuseIno(dir), name).map_err(errno)
            }
            Op::Unlink { path } => {
                let (dir, name) = self.resolve_parent(path)?;
                self.core.unlink(FuseIno(dir), name).map_err(errno)
            }
            Op::Rename { from, to, mode } => {
                let (fdir, fname) = self.resolve_parent(from)?;
                let (tdir, tname) = self.resolve_parent(to)?;
                let flags = match mode {
                    RenameMode::Plain => 0,
                    RenameMode::NoReplace => owsfs_sys::fs::RENAME_NOREPLACE,
                    RenameMode::Exchange => owsfs_sys::fs::RENAME_EXCHANGE,
                };
                self.core
                    .rename(FuseIno(fdir), fname, FuseIno(tdir), tname, flags)
                    .map_err(errno)
            }
            Op::Link { from, to } => {
                let a = self.resolve(from)?;
                let (dir, name) = self.resolve_parent(to)?;
                let e = self
                    .core
                    .link(FuseIno(a.ino), FuseIno(dir), name)
                    .map_err(errno)?;
                self.refs
                    .push((e.attr.ino.0, e.attr.kind == FileType::Directory));
                Ok(())
            }
            Op::Symlink { path, target } => {
                let (dir, name) = self.resolve_parent(path)?;
                let e = self
                    .core
                    .symlink(FuseIno(dir), name, Path::new(target), ROOT)
                    .map_err(errno)?;
                self.refs
                    .push((e.attr.ino.0, e.attr.kind == FileType::Directory));
                Ok(())
            }
            Op::Chmod { path, mode } => {
                let a = self.resolve(path)?;
                self.setattr(
                    a.ino,
                    SetAttr {
                        mode: Some(mode.0),
                        ..SetAttr::default()
                    },
                )
            }
            Op::SetMtime { path, secs, nsecs } => {
                let a = self.resolve(path)?;
                self.setattr(
                    a.ino,
                    SetAttr {
                        mtime: Some(TimeSpec::At(time(secs, nsecs))),
                        ..SetAttr::default()
                    },
                )
            }
            Op::SetXattr {
                path,
                name,
                value,
                mode,
            } => {
                let a = self.resolve(path)?;
                let flags = match mode {
                    XattrMode::Any => 0,
                    XattrMode::OnlyCreate => libc::XATTR_CREATE,
                    XattrMode::OnlyReplace => libc::XATTR_REPLACE,
                };
                self.core
                    .setxattr(
                        FuseIno(a.ino),
                        OsStr::new(name),
                        value.as_bytes(),
                        flags,
                        None,
                    )
                    .map_err(errno)
            }
            Op::RemoveXattr { path, name } => {
                let a = self.resolve(path)?;
                self.core
                    .removexattr(FuseIno(a.ino), OsStr::new(name))
                    .map_err(errno)
            }
            Op::Fsync { path, datasync } => {
                let a = self.resolve(path)?;
                if a.kind == Kind::Dir {
                    return self.core.fsyncdir(FuseIno(a.ino), datasync).map_err(errno);
                }
                let (_, fh) = self
                    .core
                    .open(FuseIno(a.ino), libc::O_RDONLY, false)
                    .map_err(errno)?;
                let r = self.core.fsync(FuseIno(a.ino), fh, datasync).map_err(errno);
                self.core.release(fh).map_err(errno)?;
                r
            }
            Op::Open { slot, path } => {
                if self.open[slot].is_some() {
                    return Ok(());
                }
                let a = self.resolve(path)?;
                let fh = self.open_rdwr(a)?;
                // The open file keeps the reference its lookup took.
                let (ino, _) = self.refs.pop().expect("the file's own reference");
                self.open[slot] = Some((fh, ino));
                Ok(())
            }
            Op::WriteFh {
                slot,
                offset,
                len,
                fill,
            } => {
                let Some((fh, _)) = self.open[slot] else {
                    return Ok(());
                };
                let n = self
                    .core
                    .write(fh, offset, &pattern(fill, len), false)
                    .map_err(errno)?;
                assert_eq!(n, len, "short write");
                Ok(())
            }
            Op::TruncateFh { slot, size } => {
                let Some((fh, ino)) = self.open[slot] else {
                    return Ok(());
                };
                self.setattr(
                    ino,
                    SetAttr {
                        size: Some(size),
                        fh: Some(fh),
                        ..SetAttr::default()
                    },
                )
            }
            Op::FsyncFh { slot } => {
                let Some((fh, ino)) = self.open[slot] else {
                    return Ok(());
                };
                self.core.fsync(FuseIno(ino), fh, false).map_err(errno)
            }
            Op::Close { slot } => {
                self.close(slot);
                Ok(())
            }
        }
    }

    fn setattr(&self, ino: u64, set: SetAttr) -> Res {
        self.core
            .setattr(FuseIno(ino), set)
            .map(|_| ())
            .map_err(errno)
    }
}
