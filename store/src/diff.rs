//! What changed between two trees. Subtrees with equal ids are skipped without being read, so
//! the cost grows with the difference, not with the size of the trees. Renames are reported
//! where they are obvious: an entry removed in one place and added in another with the same
//! content (a file's chunks, a directory's tree id, a symlink's target).

use serde::Serialize;

use crate::error::Result;
use crate::pack::BlobRef;
use crate::tree::{BlobLoader, Content, FileContent, NodeKind, Tree, TreeEntry, file_chunks};

/// The kind of a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Added,
    Removed,
    Modified,
    Renamed,
    /// Same path, another kind of node (a file became a directory...).
    TypeChanged,
}

impl Change {
    /// One letter, as `git diff --name-status` shows it.
    pub fn letter(self) -> char {
        match self {
            Change::Added => 'A',
            Change::Removed => 'D',
            Change::Modified => 'M',
            Change::Renamed => 'R',
            Change::TypeChanged => 'T',
        }
    }
}

/// One changed path. Paths are relative to the workspace root, `/`-separated; names that are
/// not UTF-8 are shown lossily.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiffEntry {
    pub path: String,
    pub change: Change,
    /// The node's kind (the new one for `type_changed`).
    pub kind: NodeKind,
    /// `renamed`: the old path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `type_changed`: the old kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_kind: Option<NodeKind>,
    /// What differs besides presence: `content`, `mode`, `owner`, `mtime`, `xattrs`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub what: Vec<&'static str>,
    /// Permission bits before and after, when they differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<(u32, u32)>,
    /// Size before and after (files and symlinks), when it differs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<(u64, u64)>,
}

/// Counts of what a diff read, to show that it skipped what was equal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DiffStats {
    /// Tree blobs read.
    pub trees_read: u64,
    /// Subtrees skipped because their ids were equal.
    pub subtrees_skipped: u64,
}

/// The changes from tree `a` to tree `b`, sorted by path.
pub fn diff_trees(
    loader: &dyn BlobLoader,
    a: &BlobRef,
    b: &BlobRef,
) -> Result<(Vec<DiffEntry>, DiffStats)> {
    let mut d = Differ {
        loader,
        out: Vec::new(),
        stats: DiffStats::default(),
    };
    if a.id != b.id {
        d.dirs("", a, b)?;
    } else {
        d.stats.subtrees_skipped += 1;
    }
    let mut out = pair_renames(d.out);
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok((out, d.stats))
}

struct Differ<'a> {
    loader: &'a dyn BlobLoader,
    out: Vec<(DiffEntry, Option<Key>)>,
    stats: DiffStats,
}

/// What a node holds, for rename pairing (empty files have none: too common to pair).
#[derive(Clone, PartialEq, Eq)]
enum Key {
    File(Vec<crate::ids::BlobId>),
    Dir(crate::ids::BlobId),
    Symlink(Vec<u8>),
}

fn join(dir: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if dir.is_empty() {
        name.into_owned()
    } else {
        format!("{dir}/{name}")
    }
}

impl Differ<'_> {
    fn load(&mut self, r: &BlobRef) -> Result<Tree> {
        self.stats.trees_read += 1;
        Tree::load(self.loader, r)
    }

    fn dirs(&mut self, path: &str, a: &BlobRef, b: &BlobRef) -> Result<()> {
        let (ta, tb) = (self.load(a)?, self.load(b)?);
        let (mut i, mut j) = (0, 0);
        while i < ta.entries.len() || j < tb.entries.len() {
            let ea = ta.entries.get(i);
            let eb = tb.entries.get(j);
            match (ea, eb) {
                (Some(x), Some(y)) if x.name == y.name => {
                    self.both(&join(path, &x.name), x, y)?;
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x.name < y.name => {
                    self.one(join(path, &x.name), x, Change::Removed)?;
                    i += 1;
                }
                (Some(x), None) => {
                    self.one(join(path, &x.name), x, Change::Removed)?;
                    i += 1;
                }
                (_, Some(y)) => {
                    self.one(join(path, &y.name), y, Change::Added)?;
                    j += 1;
                }
                (None, None) => unreachable!("the loop runs while one side has entries"),
            }
        }
        Ok(())
    }

    fn one(&mut self, path: String, e: &TreeEntry, change: Change) -> Result<()> {
        let key = self.key(e)?;
        self.out.push((
            DiffEntry {
                path,
                change,
                kind: e.kind,
                from: None,
                old_kind: None,
                what: Vec::new(),
                mode: None,
                size: None,
            },
            key,
        ));
        Ok(())
    }

    fn key(&self, e: &TreeEntry) -> Result<Option<Key>> {
        Ok(match &e.content {
            Content::Dir(r) => Some(Key::Dir(r.id)),
            Content::Symlink(t) => Some(Key::Symlink(t.clone())),
            Content::File(FileContent::Empty) | Content::None => None,
            Content::File(f) => Some(Key::File(
                file_chunks(self.loader, f)?
                    .iter()
                    .map(|s| s.r.id)
                    .collect(),
            )),
        })
    }

    fn both(&mut self, path: &str, x: &TreeEntry, y: &TreeEntry) -> Result<()> {
        if x.kind != y.kind {
            self.out.push((
                DiffEntry {
                    path: path.to_string(),
                    change: Change::TypeChanged,
                    kind: y.kind,
                    from: None,
                    old_kind: Some(x.kind),
                    what: Vec::new(),
                    mode: None,
                    size: None,
                },
                None,
            ));
            return Ok(());
        }
        let mut what = Vec::new();
        if let (Content::Dir(a), Content::Dir(b)) = (&x.content, &y.content) {
            if a.id == b.id {
                self.stats.subtrees_skipped += 1;
            } else {
                self.dirs(path, a, b)?;
            }
        } else if !self.same_content(x, y)? {
            what.push("content");
        }
        if x.mode != y.mode {
            what.push("mode");
        }
        if (x.uid, x.gid) != (y.uid, y.gid) {
            what.push("owner");
        }
        // A directory's mtime moves with every change inside it: its entries say more.
        if x.kind != NodeKind::Dir && (x.mtime_sec, x.mtime_nsec) != (y.mtime_sec, y.mtime_nsec) {
            what.push("mtime");
        }
        if x.xattrs != y.xattrs {
            what.push("xattrs");
        }
        if !what.is_empty() {
            self.out.push((
                DiffEntry {
                    path: path.to_string(),
                    change: Change::Modified,
                    kind: y.kind,
                    from: None,
                    old_kind: None,
                    what,
                    mode: (x.mode != y.mode).then_some((x.mode, y.mode)),
                    size: (x.size != y.size).then_some((x.size, y.size)),
                },
                None,
            ));
        }
        Ok(())
    }

    /// Same bytes: compared by chunk ids (list blobs are read only when their ids differ,
    /// since the same chunks may sit in other packs).
    fn same_content(&self, x: &TreeEntry, y: &TreeEntry) -> Result<bool> {
        if x.size != y.size || x.rdev != y.rdev {
            return Ok(false);
        }
        let ids = |c: &[crate::tree::ChunkSpan]| c.iter().map(|s| s.r.id).collect::<Vec<_>>();
        Ok(match (&x.content, &y.content) {
            (Content::Symlink(a), Content::Symlink(b)) => a == b,
            (Content::File(a), Content::File(b)) => match (a, b) {
                (FileContent::Empty, FileContent::Empty) => true,
                (FileContent::Chunks(p), FileContent::Chunks(q)) => {
                    p.len() == q.len() && p.iter().zip(q).all(|(u, v)| u.id == v.id)
                }
                (FileContent::List(p), FileContent::List(q))
                    if p.len() == q.len()
                        && p.iter().zip(q).all(|(u, v)| u.blob.id == v.blob.id) =>
                {
                    true
                }
                _ => ids(&file_chunks(self.loader, a)?) == ids(&file_chunks(self.loader, b)?),
            },
            _ => true,
        })
    }
}

/// Pairs a removed entry with an added one of the same kind and content into a rename (the
/// first candidate with the same base name, else the first one).
fn pair_renames(changes: Vec<(DiffEntry, Option<Key>)>) -> Vec<DiffEntry> {
    let mut added: Vec<(usize, Key)> = Vec::new();
    for (i, (e, k)) in changes.iter().enumerate() {
        if e.change == Change::Added
            && let Some(k) = k
        {
            added.push((i, k.clone()));
        }
    }
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let mut taken = vec![false; changes.len()];
    let mut renamed_from: Vec<Option<String>> = vec![None; changes.len()];
    for (i, (e, k)) in changes.iter().enumerate() {
        let (Change::Removed, Some(k)) = (e.change, k) else {
            continue;
        };
        let fits =
            |&&(j, ref kj): &&(usize, Key)| !taken[j] && kj == k && changes[j].0.kind == e.kind;
        let pick = added
            .iter()
            .filter(fits)
            .find(|(j, _)| base(&changes[*j].0.path) == base(&e.path))
            .or_else(|| added.iter().find(fits))
            .map(|(j, _)| *j);
        if let Some(j) = pick {
            taken[j] = true;
            taken[i] = true;
            renamed_from[j] = Some(e.path.clone());
        }
    }
    let mut out = Vec::new();
    for (i, (mut e, _)) in changes.into_iter().enumerate() {
        if let Some(from) = renamed_from[i].take() {
            e.change = Change::Renamed;
            e.from = Some(from);
            out.push(e);
        } else if !taken[i] {
            out.push(e);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, HashMap};

    use bytes::Bytes;

    use super::*;
    use crate::error::StoreError;
    use crate::ids::{BlobId, PackId};

    /// Blobs by id, counting loads.
    #[derive(Default)]
    struct Mem {
        blobs: RefCell<HashMap<BlobId, Bytes>>,
        loads: RefCell<u64>,
    }

    impl BlobLoader for Mem {
        fn load(&self, r: &BlobRef) -> Result<Bytes> {
            *self.loads.borrow_mut() += 1;
            self.blobs
                .borrow()
                .get(&r.id)
                .cloned()
                .ok_or_else(|| StoreError::corrupt("mem", "missing"))
        }
    }

    impl Mem {
        fn put(&self, b: Vec<u8>) -> BlobRef {
            let id = BlobId::of(&b);
            let r = BlobRef::plain(id, PackId([0; 32]), 16, b.len() as u32);
            self.blobs.borrow_mut().insert(id, Bytes::from(b));
            r
        }

        /// A tree from `path → spec`: `d` a directory, `l:TARGET` a symlink, `f:TEXT` a file
        /// (one chunk per `|`-separated part), `m:MODE:TEXT` a file with a mode.
        fn tree(&self, spec: &[(&str, &str)]) -> BlobRef {
            let mut m: BTreeMap<String, String> = BTreeMap::new();
            for (p, s) in spec {
                m.insert(p.to_string(), s.to_string());
            }
            self.dir("", &m)
        }

        fn dir(&self, prefix: &str, m: &BTreeMap<String, String>) -> BlobRef {
            let mut entries = Vec::new();
            for (p, s) in m {
                let Some(rest) = p.strip_prefix(prefix) else {
                    continue;
                };
                if rest.is_empty() || rest.contains('/') {
                    continue;
                }
                let mut e = TreeEntry {
                    name: rest.as_bytes().to_vec(),
                    kind: NodeKind::File,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    mtime_sec: 1,
                    mtime_nsec: 0,
                    size: 0,
                    rdev: 0,
                    link_key: 0,
                    xattrs: vec![],
                    content: Content::File(FileContent::Empty),
                };
                let mut text = s.as_str();
                if let Some(r) = s.strip_prefix("m:") {
                    let (mode, t) = r.split_once(':').unwrap();
                    e.mode = u32::from_str_radix(mode, 8).unwrap();
                    text = t;
                }
                if text == "d" {
                    e.kind = NodeKind::Dir;
                    e.content = Content::Dir(self.dir(&format!("{p}/"), m));
                } else if let Some(t) = text.strip_prefix("l:") {
                    e.kind = NodeKind::Symlink;
                    e.size = t.len() as u64;
                    e.content = Content::Symlink(t.as_bytes().to_vec());
                } else if let Some(t) = text.strip_prefix("f:") {
                    let chunks: Vec<BlobRef> = t
                        .split('|')
                        .filter(|c| !c.is_empty())
                        .map(|c| self.put(c.as_bytes().to_vec()))
                        .collect();
                    e.size = chunks.iter().map(|c| c.len as u64).sum();
                    if !chunks.is_empty() {
                        e.content = Content::File(FileContent::Chunks(chunks));
                    }
                }
                entries.push(e);
            }
            self.put(Tree { entries }.encode().unwrap())
        }
    }

    fn names(d: &[DiffEntry]) -> Vec<String> {
        d.iter()
            .map(|e| match &e.from {
                Some(f) => format!("{} {f} -> {}", e.change.letter(), e.path),
                None => format!("{} {} {}", e.change.letter(), e.path, e.what.join(",")),
            })
            .map(|s| s.trim_end().to_string())
            .collect()
    }

    #[test]
    fn changes_renames_and_kinds() {
        let m = Mem::default();
        let a = m.tree(&[
            ("src", "d"),
            ("src/a.rs", "f:fn a|()"),
            ("src/b.rs", "f:fn b"),
            ("src/gone.rs", "f:bye"),
            ("docs", "d"),
            ("docs/x.md", "f:x"),
            ("run.sh", "m:644:f:echo"),
            ("link", "l:src"),
            ("thing", "f:was a file"),
        ]);
        let b = m.tree(&[
            ("src", "d"),
            ("src/a.rs", "f:fn a|(x)"),
            ("src/b2.rs", "f:fn b"),
            ("manual", "d"),
            ("manual/x.md", "f:x"),
            ("run.sh", "m:755:f:echo"),
            ("link", "l:lib"),
            ("thing", "d"),
            ("new.txt", "f:hello"),
        ]);
        let (d, _) = diff_trees(&m, &a, &b).unwrap();
        assert_eq!(
            names(&d),
            [
                "M link content",
                "R docs -> manual",
                "A new.txt",
                "M run.sh mode",
                "M src/a.rs content",
                "R src/b.rs -> src/b2.rs",
                "D src/gone.rs",
                "T thing",
            ]
        );
        let run = d.iter().find(|e| e.path == "run.sh").unwrap();
        assert_eq!(run.mode, Some((0o644, 0o755)));
        let t = d.iter().find(|e| e.path == "thing").unwrap();
        assert_eq!((t.old_kind, t.kind), (Some(NodeKind::File), NodeKind::Dir));
        let json = serde_json::to_string(t).unwrap();
        assert!(json.contains(r#""change":"type_changed""#), "{json}");
        assert!(json.contains(r#""old_kind":"file""#), "{json}");
        // Nothing against itself, without reading a tree.
        let (same, stats) = diff_trees(&m, &a, &a).unwrap();
        assert!(same.is_empty());
        assert_eq!(stats.trees_read, 0);
    }

    #[test]
    fn equal_subtrees_are_not_read() {
        let m = Mem::default();
        // 50 directories of 20 files; one file differs.
        let mut spec: Vec<(String, String)> = Vec::new();
        for d in 0..50 {
            spec.push((format!("d{d:02}"), "d".into()));
            for f in 0..20 {
                spec.push((format!("d{d:02}/f{f:02}"), format!("f:{d}-{f}")));
            }
        }
        let a_spec: Vec<(&str, &str)> =
            spec.iter().map(|(p, s)| (p.as_str(), s.as_str())).collect();
        let a = m.tree(&a_spec);
        let mut b_spec = a_spec.clone();
        let i = b_spec.iter().position(|(p, _)| *p == "d17/f03").unwrap();
        b_spec[i].1 = "f:changed";
        let b = m.tree(&b_spec);
        *m.loads.borrow_mut() = 0;
        let (d, stats) = diff_trees(&m, &a, &b).unwrap();
        assert_eq!(names(&d), ["M d17/f03 content"]);
        // Two roots and the two d17s; the other 49 pairs were skipped by id.
        assert_eq!(stats.trees_read, 4);
        assert_eq!(stats.subtrees_skipped, 49);
        assert_eq!(*m.loads.borrow(), 4);
    }
}
