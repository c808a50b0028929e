//! The workload's model: what the tree must hold after each completed operation. The
//! workload applies each operation to the real mount and, once it returned, to the model; the
//! checker replays the same operations (the generator is deterministic) and compares what a
//! restore or a remount shows with the model after some prefix of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A SQLite database's contents as the checker reads them: per transaction (the operation
/// index that committed it), its rows and the total length of their values.
pub type DbRows = BTreeMap<u64, (u64, u64)>;

/// One name in the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    /// A regular file: its inode in [`Model::inodes`] (hard links share one).
    File(u64),
    Symlink(String),
}

/// A database the workload writes with SQL transactions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Db {
    pub wal: bool,
    pub rows: DbRows,
}

/// The tree the workload must have produced.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub paths: BTreeMap<String, Node>,
    pub inodes: HashMap<u64, Vec<u8>>,
    pub dbs: BTreeMap<String, Db>,
    next_ino: u64,
    /// Hashes of the inodes' data, computed when first compared.
    hashes: std::cell::RefCell<HashMap<u64, blake3::Hash>>,
}

/// Is `path` a SQLite file (a database or one of its companions)? Those are compared through
/// SQL, not byte by byte.
pub fn is_sqlite(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("db") && name.contains(".sqlite")
}

/// Deterministic bytes for a write: `len` bytes from `seed`. Half of them compress well
/// (repeated runs), half do not, so a content-defined chunker sees both.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(4) {
            let run = (x >> 8) as usize % 64;
            out.extend(std::iter::repeat_n(
                (x >> 16) as u8,
                run.min(len - out.len()),
            ));
        } else {
            let n = 8.min(len - out.len());
            out.extend_from_slice(&x.to_le_bytes()[..n]);
        }
    }
    out
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

impl Model {
    pub fn new() -> Model {
        Model::default()
    }

    pub fn file(&self, path: &str) -> Option<&Vec<u8>> {
        match self.paths.get(path) {
            Some(Node::File(ino)) => self.inodes.get(ino),
            _ => None,
        }
    }

    /// The names of the inode that `path` names (itself included), for a file.
    pub fn aliases(&self, path: &str) -> Vec<String> {
        match self.paths.get(path) {
            Some(Node::File(ino)) => self
                .paths
                .iter()
                .filter(|(_, n)| **n == Node::File(*ino))
                .map(|(p, _)| p.clone())
                .collect(),
            _ => vec![path.to_string()],
        }
    }

    /// The children of directory `dir` ("" is the root).
    pub fn children(&self, dir: &str) -> impl Iterator<Item = (&String, &Node)> {
        let dir = dir.to_string();
        self.paths.iter().filter(move |(p, _)| parent(p) == dir)
    }

    /// The hash of an inode's data.
    pub fn hash(&self, ino: u64) -> blake3::Hash {
        *self
            .hashes
            .borrow_mut()
            .entry(ino)
            .or_insert_with(|| blake3::hash(&self.inodes[&ino]))
    }

    pub fn create(&mut self, path: &str, data: Vec<u8>) {
        if let Some(Node::File(ino)) = self.paths.get(path) {
            self.hashes.get_mut().remove(ino);
            self.inodes.insert(*ino, data);
            return;
        }
        self.next_ino += 1;
        self.inodes.insert(self.next_ino, data);
        self.paths
            .insert(path.to_string(), Node::File(self.next_ino));
    }

    pub fn data_mut(&mut self, path: &str) -> &mut Vec<u8> {
        let Some(Node::File(ino)) = self.paths.get(path) else {
            panic!("model: {path} is not a file");
        };
        self.hashes.get_mut().remove(ino);
        self.inodes.get_mut(ino).expect("inode")
    }

    pub fn mkdir(&mut self, path: &str) {
        self.paths.insert(path.to_string(), Node::Dir);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.paths
            .insert(path.to_string(), Node::Symlink(target.to_string()));
    }

    pub fn link(&mut self, from: &str, to: &str) {
        let n = self.paths.get(from).cloned().expect("link source");
        self.paths.insert(to.to_string(), n);
    }

    /// Removes a name; an inode goes with its last name.
    pub fn remove(&mut self, path: &str) {
        if let Some(Node::File(ino)) = self.paths.remove(path)
            && !self.paths.values().any(|n| *n == Node::File(ino))
        {
            self.inodes.remove(&ino);
            self.hashes.get_mut().remove(&ino);
        }
    }

    /// rename(2) of a file or symlink over a file, a symlink or nothing.
    pub fn rename(&mut self, from: &str, to: &str) {
        let n = self.paths.remove(from).expect("rename source");
        self.remove(to);
        self.paths.insert(to.to_string(), n);
    }

    /// rename(2) of a directory to a new name: every name below it moves.
    pub fn move_dir(&mut self, from: &str, to: &str) {
        let prefix = format!("{from}/");
        let moved: Vec<String> = self
            .paths
            .keys()
            .filter(|p| *p == from || p.starts_with(&prefix))
            .cloned()
            .collect();
        for p in moved {
            let n = self.paths.remove(&p).expect("moved");
            self.paths.insert(format!("{to}{}", &p[from.len()..]), n);
        }
    }
}

/// What a directory tree shows for one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Dir,
    File {
        hash: blake3::Hash,
        len: u64,
        ino: u64,
    },
    Symlink(String),
}

/// A tree as found on disk: every name but SQLite's files, and each database's contents (or
/// the reason it could not be read, `integrity_check` included).
#[derive(Debug, Default)]
pub struct Found {
    pub paths: BTreeMap<String, Seen>,
    pub dbs: BTreeMap<String, Result<DbRows, String>>,
}

/// Names that an operation may have changed in part when it was cut short: compared with
/// neither the state before it nor the one after.
#[derive(Debug, Default)]
pub struct InFlight {
    pub paths: BTreeSet<String>,
    pub prefixes: Vec<String>,
    /// A database and its rows once the transaction committed.
    pub db: Option<(String, DbRows)>,
}

impl InFlight {
    fn covers(&self, path: &str) -> bool {
        self.paths.contains(path)
            || self
                .prefixes
                .iter()
                .any(|p| path == p || path.starts_with(&format!("{p}/")))
    }
}

/// The differences between what was found and the model, ignoring what `inflight` covers;
/// empty when they agree.
pub fn differences(found: &Found, model: &Model, inflight: &InFlight) -> Vec<String> {
    let mut out = Vec::new();
    let want: BTreeMap<&String, &Node> = model.paths.iter().collect();
    for (p, n) in &want {
        if inflight.covers(p) {
            continue;
        }
        match (n, found.paths.get(*p)) {
            (_, None) => out.push(format!("{p}: missing")),
            (Node::Dir, Some(Seen::Dir)) => {}
            (Node::Symlink(t), Some(Seen::Symlink(s))) if t == s => {}
            (Node::File(ino), Some(Seen::File { hash, len, .. })) => {
                let data = &model.inodes[ino];
                if *len != data.len() as u64 || *hash != model.hash(*ino) {
                    out.push(format!(
                        "{p}: content differs ({len} bytes, want {})",
                        data.len()
                    ));
                }
            }
            (n, Some(s)) => out.push(format!("{p}: is {s:?}, want {n:?}")),
        }
    }
    for p in found.paths.keys() {
        if !want.contains_key(p) && !inflight.covers(p) {
            out.push(format!("{p}: should not exist"));
        }
    }
    // Hard links: names of one model inode share one inode, names of two do not.
    let mut by_model: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut by_found: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (p, n) in &want {
        if let (Node::File(m), Some(Seen::File { ino, .. })) = (n, found.paths.get(*p))
            && !inflight.covers(p)
        {
            by_model.entry(*m).or_default().insert(*ino);
            by_found.entry(*ino).or_default().insert(*m);
        }
    }
    for (m, inos) in &by_model {
        if inos.len() > 1 {
            out.push(format!(
                "model inode {m}: its names are {} inodes",
                inos.len()
            ));
        }
    }
    for (ino, ms) in &by_found {
        if ms.len() > 1 {
            out.push(format!("inode {ino} holds {} model inodes", ms.len()));
        }
    }
    let names: BTreeSet<&String> = model.dbs.keys().chain(found.dbs.keys()).collect();
    for name in names {
        let want = model.dbs.get(name).map(|d| &d.rows);
        let alt = inflight
            .db
            .as_ref()
            .filter(|(n, _)| n == name)
            .map(|(_, r)| r);
        match found.dbs.get(name) {
            Some(Err(e)) => out.push(format!("{name}: {e}")),
            Some(Ok(rows)) => {
                let ok = want.is_some_and(|w| w == rows)
                    || alt.is_some_and(|a| a == rows)
                    || (want.is_none() && rows.is_empty());
                if !ok {
                    out.push(format!(
                        "{name}: transactions {:?}, want {:?}{}",
                        rows.keys().collect::<Vec<_>>(),
                        want.map(|w| w.keys().collect::<Vec<_>>()),
                        alt.map(|a| format!(" or {:?}", a.keys().collect::<Vec<_>>()))
                            .unwrap_or_default()
                    ));
                }
            }
            None if want.is_some_and(|w| !w.is_empty()) => {
                out.push(format!("{name}: database missing"))
            }
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_renames_and_links() {
        let mut m = Model::new();
        m.mkdir("d1");
        m.create("d1/f1", b"a".to_vec());
        m.link("d1/f1", "f2");
        m.move_dir("d1", "d2");
        assert!(m.paths.contains_key("d2/f1") && !m.paths.contains_key("d1/f1"));
        assert_eq!(m.aliases("f2"), vec!["d2/f1".to_string(), "f2".to_string()]);
        m.data_mut("f2").push(b'b');
        assert_eq!(m.file("d2/f1").unwrap(), b"ab");
        m.create("f3", b"c".to_vec());
        m.rename("f3", "f2");
        assert_eq!(m.file("d2/f1").unwrap(), b"ab");
        assert_eq!(m.file("f2").unwrap(), b"c");
        m.remove("d2/f1");
        assert_eq!(m.inodes.len(), 1);
    }

    #[test]
    fn differences_name_what_is_wrong() {
        let mut m = Model::new();
        m.create("a", b"x".to_vec());
        m.mkdir("d");
        let mut f = Found::default();
        f.paths.insert(
            "a".into(),
            Seen::File {
                hash: blake3::hash(b"y"),
                len: 1,
                ino: 1,
            },
        );
        f.paths.insert("e".into(), Seen::Dir);
        let d = differences(&f, &m, &InFlight::default());
        assert_eq!(d.len(), 3, "{d:?}");
        let inflight = InFlight {
            paths: ["a".to_string(), "d".to_string(), "e".to_string()].into(),
            ..Default::default()
        };
        assert!(differences(&f, &m, &inflight).is_empty());
    }
}
