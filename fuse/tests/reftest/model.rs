//! The reference model: an in-memory tree of inodes that decides what each operation should
//! do (its outcome, Ok or the errno, and its effect) by Linux rules, with no file system under
//! it. Hard links share an inode; an inode whose last name is gone lives on while a slot has
//! it open.

use std::collections::{BTreeMap, HashMap};

use crate::ops::{Op, RenameMode, SLOTS, XattrMode, pattern};
use crate::tree::{Kind, join};

pub type Id = usize;
pub const ROOT: Id = 0;

#[derive(Clone, Debug)]
pub enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<String, Id>),
    Symlink(String),
}

#[derive(Clone, Debug)]
pub struct Inode {
    pub body: Body,
    /// Permission bits (& 0o7777).
    pub mode: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// The modification time, when it is known: set by SetMtime, forgotten by anything that
    /// changes it to "now" (which the model does not predict, and tests never compare).
    pub mtime: Option<(i64, u32)>,
    /// Names of a file or symlink (directories: see [`Model::nlink`]).
    pub links: u32,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir(_))
    }
}

#[derive(Clone, Debug)]
pub struct Model {
    pub nodes: HashMap<Id, Inode>,
    next: Id,
    /// The inode open in each slot.
    pub handles: [Option<Id>; SLOTS],
}

type Res<T = ()> = Result<T, i32>;

fn comps(path: &str) -> Vec<&str> {
    path.split('/').collect()
}

impl Default for Model {
    fn default() -> Self {
        let root = Inode {
            body: Body::Dir(BTreeMap::new()),
            mode: 0o755,
            xattrs: BTreeMap::new(),
            mtime: None,
            links: 1,
        };
        Model {
            nodes: HashMap::from([(ROOT, root)]),
            next: ROOT + 1,
            handles: [None; SLOTS],
        }
    }
}

impl Model {
    pub fn node(&self, id: Id) -> &Inode {
        &self.nodes[&id]
    }

    fn node_mut(&mut self, id: Id) -> &mut Inode {
        self.nodes.get_mut(&id).expect("model inode")
    }

    pub fn children(&self, id: Id) -> &BTreeMap<String, Id> {
        match &self.node(id).body {
            Body::Dir(c) => c,
            _ => panic!("model: {id} is not a directory"),
        }
    }

    fn children_mut(&mut self, id: Id) -> &mut BTreeMap<String, Id> {
        match &mut self.node_mut(id).body {
            Body::Dir(c) => c,
            _ => panic!("model: {id} is not a directory"),
        }
    }

    /// Link count as stat(2) reports it: a directory has its name, its "." and the ".." of
    /// each subdirectory.
    pub fn nlink(&self, id: Id) -> u64 {
        match &self.node(id).body {
            Body::Dir(c) => 2 + c.values().filter(|i| self.node(**i).is_dir()).count() as u64,
            _ => self.node(id).links as u64,
        }
    }

    fn new_inode(&mut self, body: Body, mode: u32) -> Id {
        let id = self.next;
        self.next += 1;
        let links = 1;
        self.nodes.insert(
            id,
            Inode {
                body,
                mode,
                xattrs: BTreeMap::new(),
                mtime: None,
                links,
            },
        );
        id
    }

    /// Every name in the tree (the root excepted), sorted, with its kind.
    pub fn paths(&self) -> Vec<(String, Kind)> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), ROOT)];
        while let Some((path, dir)) = stack.pop() {
            for (name, id) in self.children(dir) {
                let p = join(&path, name);
                let kind = match self.node(*id).body {
                    Body::File(_) => Kind::File,
                    Body::Dir(_) => {
                        stack.push((p.clone(), *id));
                        Kind::Dir
                    }
                    Body::Symlink(_) => Kind::Symlink,
                };
                out.push((p, kind));
            }
        }
        out.sort();
        out
    }

    /// Walks every component; a component below a non-directory is ENOTDIR.
    fn resolve(&self, comps: &[&str]) -> Res<Id> {
        let mut cur = ROOT;
        for c in comps {
            match &self.node(cur).body {
                Body::Dir(ch) => cur = *ch.get(*c).ok_or(libc::ENOENT)?,
                _ => return Err(libc::ENOTDIR),
            }
        }
        Ok(cur)
    }

    pub fn lookup(&self, path: &str) -> Res<Id> {
        self.resolve(&comps(path))
    }

    /// The directory that would hold `path` exists.
    pub fn parent_exists(&self, path: &str) -> bool {
        self.parent(path).is_ok()
    }

    /// The directory holding the last component, and that component.
    fn parent<'p>(&self, path: &'p str) -> Res<(Id, &'p str)> {
        let c = comps(path);
        let (last, init) = c.split_last().expect("paths are not empty");
        let dir = self.resolve(init)?;
        if !self.node(dir).is_dir() {
            return Err(libc::ENOTDIR);
        }
        Ok((dir, last))
    }

    fn child(&self, dir: Id, name: &str) -> Option<Id> {
        self.children(dir).get(name).copied()
    }

    /// The directory's listing changed: its mtime is "now".
    fn touch_dir(&mut self, dir: Id) {
        self.node_mut(dir).mtime = None;
    }

    /// Drops one name of `id`; the inode goes once nothing names or holds it.
    fn drop_name(&mut self, id: Id) {
        let n = self.node_mut(id);
        if n.is_dir() {
            n.links = 0;
        } else {
            n.links -= 1;
        }
        self.collect(id);
    }

    fn collect(&mut self, id: Id) {
        if self.node(id).links == 0 && !self.handles.contains(&Some(id)) {
            self.nodes.remove(&id);
        }
    }

    fn write_at(&mut self, id: Id, offset: u64, bytes: &[u8]) {
        let n = self.node_mut(id);
        if let Body::File(data) = &mut n.body {
            let end = offset as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[offset as usize..end].copy_from_slice(bytes);
        }
        n.mtime = None;
    }

    fn truncate(&mut self, id: Id, size: u64) {
        let n = self.node_mut(id);
        if let Body::File(data) = &mut n.body {
            data.resize(size as usize, 0);
        }
        n.mtime = None;
    }

    /// The errno of opening `id` for I/O: a directory or a symlink cannot be.
    fn openable(&self, id: Id) -> Res {
        match self.node(id).body {
            Body::File(_) => Ok(()),
            Body::Dir(_) => Err(libc::EISDIR),
            Body::Symlink(_) => Err(libc::ELOOP),
        }
    }

    /// Applies `op` and returns the outcome Linux gives (as the core over a local file system
    /// must).
    pub fn apply(&mut self, op: &Op) -> Res {
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
                let (dir, name) = self.parent(path)?;
                let id = match (self.child(dir, name), create) {
                    (None, None) => return Err(libc::ENOENT),
                    (None, Some(mode)) => {
                        let id = self.new_inode(Body::File(Vec::new()), mode.0 & 0o7777);
                        self.children_mut(dir).insert(name.into(), id);
                        self.touch_dir(dir);
                        id
                    }
                    (Some(_), Some(_)) if excl => return Err(libc::EEXIST),
                    (Some(id), _) => {
                        self.openable(id)?;
                        if trunc {
                            self.truncate(id, 0);
                        }
                        id
                    }
                };
                self.write_at(id, offset, &pattern(fill, len));
                Ok(())
            }
            Op::Create { path, mode, excl } => {
                let (dir, name) = self.parent(path)?;
                match self.child(dir, name) {
                    Some(_) if excl => Err(libc::EEXIST),
                    Some(id) => self.openable(id),
                    None => {
                        let id = self.new_inode(Body::File(Vec::new()), mode.0 & 0o7777);
                        self.children_mut(dir).insert(name.into(), id);
                        self.touch_dir(dir);
                        Ok(())
                    }
                }
            }
            Op::Truncate { path, size } => {
                let id = self.lookup(path)?;
                self.openable(id)?;
                self.truncate(id, size);
                Ok(())
            }
            Op::Mkdir { path, mode } => {
                let (dir, name) = self.parent(path)?;
                if self.child(dir, name).is_some() {
                    return Err(libc::EEXIST);
                }
                // mkdir(2) keeps only the permission and sticky bits; a set-group-id parent
                // passes its bit on.
                let mode = (mode.0 & 0o1777) | (self.node(dir).mode & libc::S_ISGID);
                let id = self.new_inode(Body::Dir(BTreeMap::new()), mode);
                self.children_mut(dir).insert(name.into(), id);
                self.touch_dir(dir);
                Ok(())
            }
            Op::Rmdir { path } => {
                let (dir, name) = self.parent(path)?;
                let id = self.child(dir, name).ok_or(libc::ENOENT)?;
                match &self.node(id).body {
                    Body::Dir(c) if !c.is_empty() => return Err(libc::ENOTEMPTY),
                    Body::Dir(_) => {}
                    _ => return Err(libc::ENOTDIR),
                }
                self.children_mut(dir).remove(name);
                self.touch_dir(dir);
                self.drop_name(id);
                Ok(())
            }
            Op::Unlink { path } => {
                let (dir, name) = self.parent(path)?;
                let id = self.child(dir, name).ok_or(libc::ENOENT)?;
                if self.node(id).is_dir() {
                    return Err(libc::EISDIR);
                }
                self.children_mut(dir).remove(name);
                self.touch_dir(dir);
                self.drop_name(id);
                Ok(())
            }
            Op::Rename { from, to, mode } => self.rename(from, to, mode),
            Op::Link { from, to } => {
                let id = self.lookup(from)?;
                let (dir, name) = self.parent(to)?;
                if self.child(dir, name).is_some() {
                    return Err(libc::EEXIST);
                }
                if self.node(id).is_dir() {
                    return Err(libc::EPERM);
                }
                self.node_mut(id).links += 1;
                self.children_mut(dir).insert(name.into(), id);
                self.touch_dir(dir);
                Ok(())
            }
            Op::Symlink { path, target } => {
                let (dir, name) = self.parent(path)?;
                if self.child(dir, name).is_some() {
                    return Err(libc::EEXIST);
                }
                let id = self.new_inode(Body::Symlink(target.into()), 0o777);
                self.children_mut(dir).insert(name.into(), id);
                self.touch_dir(dir);
                Ok(())
            }
            Op::Chmod { path, mode } => {
                let id = self.lookup(path)?;
                if matches!(self.node(id).body, Body::Symlink(_)) {
                    return Err(libc::EOPNOTSUPP);
                }
                self.node_mut(id).mode = mode.0 & 0o7777;
                Ok(())
            }
            Op::SetMtime { path, secs, nsecs } => {
                let id = self.lookup(path)?;
                self.node_mut(id).mtime = Some((secs, nsecs));
                Ok(())
            }
            Op::SetXattr {
                path,
                name,
                value,
                mode,
            } => {
                let id = self.lookup(path)?;
                // The model's names are `user.` ones, which Linux refuses on a symlink.
                if matches!(self.node(id).body, Body::Symlink(_)) {
                    return Err(libc::EPERM);
                }
                let exists = self.node(id).xattrs.contains_key(name);
                match mode {
                    XattrMode::OnlyCreate if exists => return Err(libc::EEXIST),
                    XattrMode::OnlyReplace if !exists => return Err(owsfs_sys::fs::NO_XATTR_RAW),
                    _ => {}
                }
                self.node_mut(id)
                    .xattrs
                    .insert(name.into(), value.as_bytes().to_vec());
                Ok(())
            }
            Op::RemoveXattr { path, name } => {
                let id = self.lookup(path)?;
                if matches!(self.node(id).body, Body::Symlink(_)) {
                    return Err(libc::EPERM);
                }
                self.node_mut(id)
                    .xattrs
                    .remove(name)
                    .map(|_| ())
                    .ok_or(owsfs_sys::fs::NO_XATTR_RAW)
            }
            Op::Fsync { path, .. } => {
                let id = self.lookup(path)?;
                match self.node(id).body {
                    Body::Dir(_) => Ok(()),
                    _ => self.openable(id),
                }
            }
            Op::Open { slot, path } => {
                if self.handles[slot].is_some() {
                    return Ok(());
                }
                let id = self.lookup(path)?;
                self.openable(id)?;
                self.handles[slot] = Some(id);
                Ok(())
            }
            Op::WriteFh {
                slot,
                offset,
                len,
                fill,
            } => {
                if let Some(id) = self.handles[slot] {
                    self.write_at(id, offset, &pattern(fill, len));
                }
                Ok(())
            }
            Op::TruncateFh { slot, size } => {
                if let Some(id) = self.handles[slot] {
                    self.truncate(id, size);
                }
                Ok(())
            }
            Op::FsyncFh { .. } => Ok(()),
            Op::Close { slot } => {
                if let Some(id) = self.handles[slot].take() {
                    self.collect(id);
                }
                Ok(())
            }
        }
    }

    /// rename(2)/renameat2(2), with the checks in the order Linux makes them
    /// (`do_renameat2`, then `vfs_rename`, then the file system's emptiness check).
    fn rename(&mut self, from: &str, to: &str, mode: RenameMode) -> Res {
        let (fdir, fname) = self.parent(from)?;
        let (tdir, tname) = self.parent(to)?;
        let src = self.child(fdir, fname).ok_or(libc::ENOENT)?;
        let dst = self.child(tdir, tname);
        if mode == RenameMode::NoReplace && dst.is_some() {
            return Err(libc::EEXIST);
        }
        if mode == RenameMode::Exchange && dst.is_none() {
            return Err(libc::ENOENT);
        }
        // The source may not be an ancestor of the target, nor the target of the source.
        let (f, t) = (comps(from), comps(to));
        if t.len() > f.len() && t.starts_with(&f) {
            return Err(libc::EINVAL);
        }
        if f.len() > t.len() && f.starts_with(&t) {
            return Err(if mode == RenameMode::Exchange {
                libc::EINVAL
            } else {
                libc::ENOTEMPTY
            });
        }
        // Two names of one inode (or one name twice): nothing to do, and success.
        if dst == Some(src) {
            return Ok(());
        }
        let src_dir = self.node(src).is_dir();
        if mode == RenameMode::Exchange {
            let dst = dst.expect("checked above");
            self.children_mut(fdir).insert(fname.into(), dst);
            self.children_mut(tdir).insert(tname.into(), src);
            for id in [fdir, tdir, src, dst] {
                self.touch_dir_or_moved(id);
            }
            return Ok(());
        }
        if let Some(dst) = dst {
            match (src_dir, &self.node(dst).body) {
                (true, Body::Dir(c)) if !c.is_empty() => return Err(libc::ENOTEMPTY),
                (true, Body::Dir(_)) | (false, Body::File(_) | Body::Symlink(_)) => {}
                (true, _) => return Err(libc::ENOTDIR),
                (false, Body::Dir(_)) => return Err(libc::EISDIR),
            }
            self.drop_name(dst);
        }
        self.children_mut(fdir).remove(fname);
        self.children_mut(tdir).insert(tname.into(), src);
        for id in [fdir, tdir, src] {
            self.touch_dir_or_moved(id);
        }
        Ok(())
    }

    /// After a rename: the parents' mtimes are "now"; a moved directory's may be too (its
    /// ".." changed), so it is not predicted either.
    fn touch_dir_or_moved(&mut self, id: Id) {
        if self.node(id).is_dir() {
            self.touch_dir(id);
        }
    }
}
