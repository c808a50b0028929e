//! A tree as observed (through the core, or on the backing directory), and its comparison
//! with the model.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::model::{Body, Id, Model, ROOT};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One node as observed.
#[derive(Clone, Debug)]
pub struct Node {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits (& 0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub size: u64,
    pub mtime: (i64, u32),
    /// `user.*` attributes only (the model makes no others).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// File content or symlink target.
    pub data: Vec<u8>,
    pub children: BTreeMap<OsString, Node>,
}

impl Node {
    /// Every node below this one (itself first), with its path relative to it.
    pub fn walk(&self) -> Vec<(String, &Node)> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), self)];
        while let Some((path, n)) = stack.pop() {
            for (name, c) in n.children.iter().rev() {
                stack.push((join(&path, &name.to_string_lossy()), c));
            }
            out.push((path, n));
        }
        out
    }
}

pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn show(path: &str) -> String {
    format!("/{path}")
}

/// The backing directory as the local file system shows it (std::fs, lstat, no symlink
/// followed).
pub fn disk_tree(root: &Path) -> Node {
    disk_node(root)
}

fn disk_node(p: &Path) -> Node {
    let md = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    };
    let mut children = BTreeMap::new();
    let data = match kind {
        Kind::File => std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())),
        Kind::Symlink => std::fs::read_link(p)
            .unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()))
            .into_os_string()
            .into_vec(),
        Kind::Dir => {
            for e in std::fs::read_dir(p).unwrap_or_else(|e| panic!("list {}: {e}", p.display())) {
                let e = e.expect("dir entry");
                children.insert(e.file_name(), disk_node(&e.path()));
            }
            Vec::new()
        }
        Kind::Other => Vec::new(),
    };
    Node {
        ino: md.ino(),
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        nlink: md.nlink(),
        size: md.size(),
        mtime: (md.mtime(), md.mtime_nsec() as u32),
        xattrs: if kind == Kind::Symlink {
            BTreeMap::new()
        } else {
            disk_xattrs(p)
        },
        data,
        children,
    }
}

fn disk_xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut names = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(p, &mut names[..])
        .unwrap_or_else(|e| panic!("listxattr {}: {e}", p.display()));
    names.truncate(n);
    let mut out = BTreeMap::new();
    for name in names.split(|b| *b == 0).filter(|s| s.starts_with(b"user.")) {
        let mut value = vec![0u8; 64 * 1024];
        let name_os = std::ffi::OsStr::from_bytes(name);
        let n = rustix::fs::lgetxattr(p, name_os, &mut value[..])
            .unwrap_or_else(|e| panic!("getxattr {}: {e}", p.display()));
        value.truncate(n);
        out.insert(name.to_vec(), value);
    }
    out
}

/// Compares an observed tree with the model: names, kinds, contents and sizes, link counts,
/// symlink targets, modes, `user.*` xattrs, mtimes the model knows, and inode identity (names
/// the model gives one inode have one inode number, different inodes different numbers, and
/// an inode keeps its number from one call to the next: `ids` carries it). `what` names the
/// observer in messages. The root's own mode and mtime are not compared. Owners are root's:
/// every operation is made by a root caller.
pub fn check(
    model: &Model,
    observed: &Node,
    what: &str,
    ids: &mut HashMap<Id, u64>,
) -> Result<(), String> {
    let mut errors = String::new();
    let mut inos: HashMap<u64, Id> = HashMap::new();
    check_node(model, ROOT, observed, "", ids, &mut inos, &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{what} differs from the model:\n{errors}"))
    }
}

fn check_node(
    model: &Model,
    id: Id,
    obs: &Node,
    path: &str,
    ids: &mut HashMap<Id, u64>,
    inos: &mut HashMap<u64, Id>,
    errors: &mut String,
) {
    let mut err = |msg: String| {
        let _ = writeln!(errors, "  {}: {msg}", show(path));
    };
    match ids.get(&id) {
        Some(ino) if *ino != obs.ino => err(format!(
            "inode {}, but this inode had (or another of its names has) {ino}",
            obs.ino
        )),
        Some(_) => {}
        None => {
            ids.insert(id, obs.ino);
        }
    }
    match inos.get(&obs.ino) {
        Some(other) if *other != id => err(format!(
            "inode {} is also another model inode's (a hard link that should not be)",
            obs.ino
        )),
        Some(_) => {}
        None => {
            inos.insert(obs.ino, id);
        }
    }
    let m = model.node(id);
    let kind = match m.body {
        Body::File(_) => Kind::File,
        Body::Dir(_) => Kind::Dir,
        Body::Symlink(_) => Kind::Symlink,
    };
    if kind != obs.kind {
        err(format!("kind {:?}, model {kind:?}", obs.kind));
        return;
    }
    if id != ROOT {
        if obs.mode != m.mode {
            err(format!("mode {:o}, model {:o}", obs.mode, m.mode));
        }
        if let Some(t) = m.mtime
            && t != obs.mtime
        {
            err(format!("mtime {:?}, model {t:?}", obs.mtime));
        }
    }
    // Every node is made by a caller that is root.
    if (obs.uid, obs.gid) != (0, 0) {
        err(format!("owner {}:{}, model 0:0", obs.uid, obs.gid));
    }
    let nlink = model.nlink(id);
    if obs.nlink != nlink {
        err(format!("nlink {}, model {nlink}", obs.nlink));
    }
    let xattrs: BTreeMap<Vec<u8>, Vec<u8>> = m
        .xattrs
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
        .collect();
    if obs.xattrs != xattrs {
        err(format!(
            "xattrs {:?}, model {:?}",
            show_xattrs(&obs.xattrs),
            show_xattrs(&xattrs)
        ));
    }
    match &m.body {
        Body::File(data) => {
            if obs.size != data.len() as u64 {
                err(format!("size {}, model {}", obs.size, data.len()));
            }
            if obs.data != *data {
                err(format!(
                    "content differs{} ({} bytes read, model {})",
                    first_difference(&obs.data, data),
                    obs.data.len(),
                    data.len()
                ));
            }
        }
        Body::Symlink(target) => {
            if obs.data != target.as_bytes() {
                err(format!(
                    "target {:?}, model {target:?}",
                    String::from_utf8_lossy(&obs.data)
                ));
            }
            if obs.size != target.len() as u64 {
                err(format!("size {}, model {}", obs.size, target.len()));
            }
        }
        Body::Dir(children) => {
            let names: Vec<String> = children.keys().cloned().collect();
            let seen: Vec<String> = obs
                .children
                .keys()
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            if names != seen {
                err(format!("entries {seen:?}, model {names:?}"));
            }
            for (name, cid) in children {
                if let Some(o) = obs.children.get(std::ffi::OsStr::new(name)) {
                    check_node(model, *cid, o, &join(path, name), ids, inos, errors);
                }
            }
        }
    }
}

pub fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(" at byte {i}"),
        None if a.len() != b.len() => format!(" in length ({} vs {})", a.len(), b.len()),
        None => String::new(),
    }
}

pub fn show_xattrs(x: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<(String, String)> {
    x.iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}
