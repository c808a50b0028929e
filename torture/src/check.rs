//! The checker: what a tree holds ([`capture`]), and whether it is the workload's state after
//! some prefix of its operations ([`prefix`]).

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
#[cfg(test)]
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::model::{Found, Model, Seen, is_sqlite};
use crate::workload::{Cfg, Gen, apply, in_flight, read_db};

/// Reads the tree under `root`: every name, each file's hash, each database's transactions.
/// `scratch` is a directory the databases are copied to for the check.
pub fn capture(root: &Path, scratch: &Path) -> Result<Found> {
    let mut found = Found::default();
    walk(root, root, &mut found)?;
    let dbs: Vec<String> = std::fs::read_dir(root)
        .with_context(|| format!("read_dir {}", root.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_sqlite(n) && n.ends_with(".sqlite"))
        .collect();
    for name in dbs {
        let rows = read_db(root, &name, scratch);
        found.dbs.insert(name, rows);
    }
    Ok(found)
}

fn walk(root: &Path, dir: &Path, found: &mut Found) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("read_dir {}", dir.display()))? {
        let e = e.with_context(|| format!("read_dir {}", dir.display()))?;
        let p = e.path();
        let rel = p
            .strip_prefix(root)
            .expect("under the root")
            .to_string_lossy()
            .into_owned();
        if is_sqlite(&rel) {
            continue;
        }
        let md = std::fs::symlink_metadata(&p).with_context(|| format!("lstat {}", p.display()))?;
        let seen = if md.is_dir() {
            walk(root, &p, found)?;
            Seen::Dir
        } else if md.file_type().is_symlink() {
            Seen::Symlink(
                std::fs::read_link(&p)
                    .with_context(|| format!("readlink {}", p.display()))?
                    .to_string_lossy()
                    .into_owned(),
            )
        } else {
            let data = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
            Seen::File {
                hash: blake3::hash(&data),
                len: data.len() as u64,
                ino: md.ino(),
            }
        };
        found.paths.insert(rel, seen);
    }
    Ok(())
}

/// The model after the first `ops` operations of the workload.
pub fn model_after(cfg: &Cfg, ops: u64) -> Model {
    let mut g = Gen::new(cfg);
    let mut m = Model::new();
    for j in 0..ops {
        let op = g.next(&m);
        apply(&mut m, j, &op);
    }
    m
}

/// The verdict on a tree.
#[derive(Debug)]
pub enum Verdict {
    /// The state after this many operations (the next one perhaps in part).
    Prefix(u64),
    /// The state of a prefix shorter than `lo`: completed or synced operations were lost.
    Lost { prefix: u64, lo: u64 },
    /// No prefix matches: the closest, with its differences.
    Inconsistent {
        closest: u64,
        differences: Vec<String>,
    },
}

/// Replays the workload and looks for a prefix of `lo..=hi` operations that `found` shows.
pub fn prefix(found: &Found, cfg: &Cfg, lo: u64, hi: u64) -> Verdict {
    let mut g = Gen::new(cfg);
    let mut m = Model::new();
    let mut closest: Option<(u64, Vec<String>)> = None;
    let mut earlier = None;
    for j in 0..=hi {
        let op = g.next(&m);
        let d = crate::model::differences(found, &m, &in_flight(&m, j, &op));
        if d.is_empty() {
            if j >= lo {
                return Verdict::Prefix(j);
            }
            earlier = Some(j);
        } else if j >= lo && closest.as_ref().is_none_or(|(_, c)| d.len() <= c.len()) {
            closest = Some((j, d));
        }
        apply(&mut m, j, &op);
    }
    if let Some(p) = earlier {
        return Verdict::Lost { prefix: p, lo };
    }
    let (closest, differences) = closest.unwrap_or((lo, vec!["no prefix in range".into()]));
    Verdict::Inconsistent {
        closest,
        differences,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Runner;

    fn run(dir: &Path, cfg: &Cfg, ops: u64) {
        Runner {
            mount: dir.to_path_buf(),
            owsfs: "/nonexistent".into(),
            log: dir.with_extension("log"),
            cfg: cfg.clone(),
            max_ops: ops,
            pause: Duration::ZERO,
        }
        .run()
        .expect("the workload on a plain directory");
    }

    /// The workload on a plain directory is found at exactly its length; a shorter run is
    /// reported lost when more had completed; a changed tree is inconsistent.
    #[test]
    fn the_checker_finds_prefixes_and_catches_damage() {
        let t = tempfile::tempdir().unwrap();
        let cfg = Cfg {
            seed: 7,
            max_big: 256 << 10,
            sync_weight: 0,
        };
        let (full, short) = (t.path().join("full"), t.path().join("short"));
        std::fs::create_dir(&full).unwrap();
        std::fs::create_dir(&short).unwrap();
        run(&full, &cfg, 400);
        run(&short, &cfg, 150);
        let scratch = t.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let found = capture(&full, &scratch).unwrap();
        assert!(matches!(
            prefix(&found, &cfg, 400, 400),
            Verdict::Prefix(400)
        ));
        let found = capture(&short, &scratch).unwrap();
        // The first prefix that matches: 149 with operation 149 allowed in part, or 150.
        assert!(matches!(
            prefix(&found, &cfg, 0, 400),
            Verdict::Prefix(149 | 150)
        ));
        assert!(matches!(
            prefix(&found, &cfg, 300, 400),
            Verdict::Lost { prefix: 150, .. }
        ));
        // One byte of one file changed.
        let mut found = capture(&full, &scratch).unwrap();
        let (path, seen) = found
            .paths
            .iter_mut()
            .find(|(_, s)| matches!(s, Seen::File { len, .. } if *len > 0))
            .expect("a file");
        let path = path.clone();
        if let Seen::File { hash, .. } = seen {
            *hash = blake3::hash(b"something else");
        }
        match prefix(&found, &cfg, 0, 400) {
            Verdict::Inconsistent { differences, .. } => {
                assert!(
                    differences.iter().any(|d| d.starts_with(&path)),
                    "{differences:?}"
                )
            }
            v => panic!("a damaged file went unnoticed: {v:?}"),
        }
        // A committed transaction missing from a database.
        let mut found = capture(&full, &scratch).unwrap();
        let rows = found
            .dbs
            .values_mut()
            .find_map(|r| r.as_mut().ok().filter(|r| r.len() > 1))
            .expect("a database with transactions");
        let first = *rows.keys().next().unwrap();
        rows.remove(&first);
        assert!(matches!(
            prefix(&found, &cfg, 400, 400),
            Verdict::Inconsistent { .. }
        ));
    }
}
