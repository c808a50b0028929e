//! The part of a cut that runs under the write barrier: which directories must be rebuilt,
//! their listings with every entry's attributes, and the files whose content must be read
//! (frozen for copy-on-first-write). Everything here is metadata work: no file content is read
//! while writers wait, except 16 bytes of a database beside each `-shm` file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use owsfs_journal::{BackingIno, DirtyState, InoMap};
use rustix::fs::{AtFlags, OFlags};

/// Attributes of one node at the cut.
#[derive(Clone, Debug)]
pub struct NodeStat {
    /// Backing inode number.
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    pub rdev: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

impl NodeStat {
    fn of(st: &rustix::fs::Stat) -> NodeStat {
        NodeStat {
            ino: st.st_ino,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            nlink: st.st_nlink,
            rdev: st.st_rdev,
            mtime_sec: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec as u32,
        }
    }

    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// One entry of a rebuilt directory.
#[derive(Clone, Debug)]
pub struct EntryCapture {
    pub name: OsString,
    pub stat: NodeStat,
    pub symlink_target: Option<Vec<u8>>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A directory whose tree blob is rebuilt by this cut.
#[derive(Clone, Debug)]
pub struct DirCapture {
    pub entries: Vec<EntryCapture>,
}

/// What identity the previous generation gives a backing inode.
pub trait Known {
    /// The previous generation has this regular file's content (and nothing changed it).
    fn has_file(&self, ino: u64) -> bool;
    /// The previous generation has this directory's subtree.
    fn has_dir(&self, ino: u64) -> bool;
    /// This directory is not materialized yet (lazy hydration): its subtree is the previous
    /// generation's, and its backing directory is empty.
    fn pending_dir(&self, _ino: u64) -> bool {
        false
    }
}

/// The result of the barrier phase.
pub struct Capture {
    /// Rebuilt directories by path ("" is the root).
    pub dirs: BTreeMap<PathBuf, DirCapture>,
    /// Regular files whose content must be read: (backing ino, path, size at the cut).
    pub to_read: Vec<(BackingIno, PathBuf, u64)>,
    /// The walk covered the whole tree.
    pub full: bool,
}

/// Captures what the cut needs. `dirty` uses FUSE inode numbers; `inos` maps backing numbers
/// to them. With `full`, every directory is rebuilt (no usable previous
/// generation, or hard links whose other names could not be placed).
pub fn capture(
    root_fd: &impl AsFd,
    dirty: &DirtyState,
    known: &dyn Known,
    inos: InoMap,
    full: bool,
) -> anyhow::Result<Capture> {
    if !full {
        match capture_with(root_fd, dirty, known, inos, false)? {
            Some(c) => return Ok(c),
            None => tracing::info!(
                "cut: a written file has names outside the directories it touched; walking the \
                 whole tree"
            ),
        }
    }
    capture_with(root_fd, dirty, known, inos, true)?
        .context("a full walk found unplaced hard links")
}

fn capture_with(
    root_fd: &impl AsFd,
    dirty: &DirtyState,
    known: &dyn Known,
    inos: InoMap,
    full: bool,
) -> anyhow::Result<Option<Capture>> {
    // Seeds: dirty directories, and the directory of every dirty file at its known path.
    let mut rebuild: BTreeSet<PathBuf> = BTreeSet::new();
    rebuild.insert(PathBuf::new());
    for d in &dirty.dirs {
        add_with_ancestors(&mut rebuild, d);
    }
    for f in dirty.files.values() {
        if let Some(parent) = f.path.as_deref().and_then(Path::parent) {
            add_with_ancestors(&mut rebuild, parent);
        }
    }

    let mut out = Capture {
        dirs: BTreeMap::new(),
        to_read: Vec::new(),
        full,
    };
    // Names seen of each multiply-linked dirty file.
    let mut names_seen: HashMap<u64, u64> = HashMap::new();
    // Dirty files seen under any name.
    let mut seen = std::collections::HashSet::new();
    let mut multi: HashMap<u64, u64> = HashMap::new();
    let mut queued: std::collections::HashSet<u64> = std::collections::HashSet::new();

    // Top-down, so a directory found unknown on the way is listed too.
    let mut queue: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(path) = queue.pop() {
        let dir_fd = match open_dir(root_fd, &path) {
            Ok(fd) => fd,
            // A dirty path that no longer exists: its parent's listing says so.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !path.as_os_str().is_empty() => {
                continue;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("open directory {}", show(&path)));
            }
        };
        let mut entries = Vec::new();
        let names = list_names(&dir_fd).with_context(|| format!("list {}", show(&path)))?;
        for name in names {
            let st = match rustix::fs::statat(&dir_fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
            {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("stat {}", show(&path.join(&name))));
                }
            };
            let stat = NodeStat::of(&st);
            let child = path.join(&name);
            let kind = stat.file_type();
            let symlink_target = if kind == libc::S_IFLNK {
                Some(
                    rustix::fs::readlinkat(&dir_fd, name.as_os_str(), Vec::new())
                        .with_context(|| format!("readlink {}", show(&child)))?
                        .into_bytes(),
                )
            } else {
                None
            };
            // Of every kind of node: symlinks, FIFOs and devices carry xattrs too.
            let xattrs = read_xattrs(&dir_fd, Some(&name))
                .with_context(|| format!("xattrs of {}", show(&child)))?;
            if kind == libc::S_IFDIR {
                // A pending directory (lazy hydration) holds none of its entries yet: its
                // subtree is the base generation's, whatever the dirty state says of its
                // path (a change inside it materializes it first; its own attributes come
                // from this listing).
                if !known.pending_dir(stat.ino)
                    && (full || rebuild.contains(&child) || !known.has_dir(stat.ino))
                {
                    queue.push(child.clone());
                }
            } else if kind == libc::S_IFREG {
                let fino = inos.fuse(BackingIno(stat.ino));
                let is_dirty = dirty.files.contains_key(&fino);
                if is_dirty {
                    seen.insert(fino);
                }
                if is_dirty || !known.has_file(stat.ino) {
                    if stat.nlink > 1 && is_dirty {
                        *names_seen.entry(stat.ino).or_default() += 1;
                        multi.insert(stat.ino, stat.nlink);
                    }
                    // One read per inode, however many names it has here.
                    if queued.insert(stat.ino) {
                        out.to_read
                            .push((BackingIno(stat.ino), child.clone(), stat.size));
                    }
                }
            }
            entries.push(EntryCapture {
                name,
                stat,
                symlink_target,
                xattrs,
            });
        }
        entries.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        drop_sqlite_shm(&dir_fd, &mut entries);
        out.dirs.insert(path, DirCapture { entries });
    }
    // A written file with more names than were listed has a name in a directory this cut
    // would reuse unchanged, with stale content; so may one that lost the name it was known
    // by (`Op::Unplace`) and was not seen at all. Only a full walk places them.
    let missed_names = multi
        .iter()
        .any(|(ino, n)| names_seen.get(ino).copied().unwrap_or(0) < *n);
    let missed_unplaced = dirty
        .files
        .iter()
        .any(|(ino, f)| f.unplaced && !seen.contains(ino));
    if !full && (missed_names || missed_unplaced) {
        return Ok(None);
    }
    Ok(Some(out))
}

fn add_with_ancestors(set: &mut BTreeSet<PathBuf>, dir: &Path) {
    let mut p = Some(dir);
    while let Some(d) = p {
        if !set.insert(d.to_path_buf()) {
            break;
        }
        p = d.parent();
    }
}

fn show(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "/".into()
    } else {
        format!("/{}", p.display())
    }
}

fn open_dir(root: &impl AsFd, path: &Path) -> io::Result<OwnedFd> {
    let p: &Path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    Ok(owsfs_fuse::openat_noatime(
        root,
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
    )?)
}

fn list_names(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    let fd = rustix::io::dup(dir)?;
    let mut d = rustix::fs::Dir::new(fd)?;
    let mut names = Vec::new();
    while let Some(entry) = d.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        names.push(OsStr::from_bytes(name).to_os_string());
    }
    Ok(names)
}

/// Extended attributes of `name` in `dir` (or of `dir` itself), sorted by name.
fn read_xattrs(dir: &impl AsFd, name: Option<&OsStr>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let fd: OwnedFd = match name {
        Some(n) => owsfs_sys::fs::open_path(dir, n, OFlags::NOFOLLOW | OFlags::CLOEXEC)?,
        None => rustix::io::dup(dir)?,
    };
    let mut buf = vec![0u8; 4096];
    let n = loop {
        match owsfs_sys::xattr::list(fd.as_fd(), &mut buf) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for xname in buf[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let mut value = vec![0u8; 256];
        let len = loop {
            match owsfs_sys::xattr::get(fd.as_fd(), OsStr::from_bytes(xname), &mut value) {
                Ok(len) => break len,
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 16, 0),
                Err(e) if e == owsfs_sys::fs::no_xattr() => break usize::MAX,
                Err(e) => return Err(e.into()),
            };
            if value.len() > 64 << 20 {
                return Err(io::Error::other("xattr value too large"));
            }
        };
        if len == usize::MAX {
            continue;
        }
        value.truncate(len);
        out.push((xname.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

/// SQLite's `-shm` file is derived state (rebuilt from the database and its WAL on open), so
/// it is not stored: drops `X-shm` when `X` beside it is a SQLite database.
fn drop_sqlite_shm(dir: &OwnedFd, entries: &mut Vec<EntryCapture>) {
    let names: BTreeSet<Vec<u8>> = entries
        .iter()
        .filter(|e| e.stat.file_type() == libc::S_IFREG)
        .map(|e| e.name.as_bytes().to_vec())
        .collect();
    entries.retain(|e| {
        let n = e.name.as_bytes();
        let Some(db) = n.strip_suffix(b"-shm") else {
            return true;
        };
        if e.stat.file_type() != libc::S_IFREG || !names.contains(db) {
            return true;
        }
        !is_sqlite(dir, OsStr::from_bytes(db))
    });
}

/// The file starts with SQLite's header string.
pub fn is_sqlite(dir: &impl AsFd, name: &OsStr) -> bool {
    let Ok(fd) = owsfs_fuse::openat_noatime(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
    ) else {
        return false;
    };
    let f = File::from(fd);
    let mut head = [0u8; 16];
    matches!(f.read_at(&mut head, 0), Ok(16)) && &head == b"SQLite format 3\0"
}
