//! The dirty state: what changed since the last generation, as a join of journaled ops.
//!
//! Live state and replayed state are both built by [`DirtyState::apply`], so replaying the
//! journal gives the live state by construction.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::JournalError;
use crate::extent::ExtentSet;
use crate::ino::{BackingIno, InoMap};
use crate::op::{Ino, NodeKind, Op};
use crate::serde_path;

/// What may have changed in one inode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirtyFile {
    /// Last known path (None: unlinked or unknown).
    #[serde(serialize_with = "serde_path::opt_path")]
    pub path: Option<PathBuf>,
    /// Byte ranges that may differ from the last generation.
    pub extents: ExtentSet,
    /// Smallest size it was truncated to (everything from there to EOF is dirty).
    pub truncated_to: Option<u64>,
    /// Created in this window: the whole file is new.
    pub created: bool,
    /// Attributes/xattrs changed.
    pub meta: bool,
    /// A name of the file went while it had others (`Op::Unplace`): where it is now is not
    /// known here, so the next cut walks the whole tree to find it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unplaced: bool,
}

/// Every file and directory that may differ from the last generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirtyState {
    /// Dirty inodes (regular files; directories are tracked by path in `dirs`).
    pub files: BTreeMap<Ino, DirtyFile>,
    /// Directories whose listing or own attributes changed.
    #[serde(serialize_with = "serde_path::path_set")]
    pub dirs: BTreeSet<PathBuf>,
}

/// `p` is `prefix` or lies below it, comparing whole components (`a/b` is under `a`, `ab`
/// is not).
fn under(p: &Path, prefix: &Path) -> bool {
    p.starts_with(prefix)
}

/// `p` (which is under `from`) moved to the same place under `to`.
fn rebase(p: &Path, from: &Path, to: &Path) -> PathBuf {
    match p.strip_prefix(from) {
        // Joining an empty rest would add a trailing '/'.
        Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
        Ok(rest) => to.join(rest),
        Err(_) => p.to_path_buf(),
    }
}

impl DirtyState {
    /// Folds one op into the state. Every update only adds dirtiness (a union of extents,
    /// the minimum of truncate sizes, flags set, dirs added) except path bookkeeping, which
    /// follows the namespace; see FORMAT.md ("Dirty state") for the exact rules.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Touch { ino, path } => {
                self.files.entry(*ino).or_default().path = path.clone();
            }
            Op::Create { ino, kind, path } => {
                self.mark_parent(path);
                match kind {
                    NodeKind::Dir => {
                        self.dirs.insert(path.clone());
                    }
                    NodeKind::File => {
                        // A reused inode number keeps its old flags: harmless, since
                        // `created` already makes the whole file dirty.
                        let f = self.files.entry(*ino).or_default();
                        f.path = Some(path.clone());
                        f.created = true;
                    }
                    // Other nodes have no content; the parent's listing covers them.
                    _ => {}
                }
            }
            // Records are intents: the operation may then fail (ENOTEMPTY, a full disk...), so
            // neither of these forgets a place where a dirty file may still be. An rmdir that
            // succeeds leaves nothing live below the path; one that fails leaves every path
            // below it true. An unlinked file's parent stays marked, so if the unlink failed,
            // the cut finds the file there by its inode.
            Op::Remove { ino, path, dir } => {
                self.mark_parent(path);
                if !*dir
                    && let Some(f) = self.files.get_mut(ino)
                    && f.path.as_deref() == Some(path.as_path())
                {
                    f.path = None;
                }
            }
            Op::Rename { from, to, exchange } => {
                self.mark_parent(from);
                self.mark_parent(to);
                // rename(a, a) is a no-op and renaming a directory into itself fails with
                // EINVAL; the record is only an intent, so such a rename moves nothing.
                if under(from, to) || under(to, from) {
                    return;
                }
                // The paths move to where the rename puts them, and every directory that held
                // a moved path stays marked: if the rename failed, the cut lists the old places
                // and finds the files there (a superset either way). Paths below `to` are not
                // forgotten: a rename succeeds over an empty directory only.
                let mut old = self.places_under(from);
                if *exchange {
                    old.extend(self.places_under(to));
                }
                if *exchange {
                    self.rewrite_paths(|p| {
                        if under(p, from) {
                            Some(rebase(p, from, to))
                        } else if under(p, to) {
                            Some(rebase(p, to, from))
                        } else {
                            None
                        }
                    });
                } else {
                    self.rewrite_paths(|p| under(p, from).then(|| rebase(p, from, to)));
                }
                self.dirs.extend(old);
            }
            Op::Link { ino, path } => {
                self.mark_parent(path);
                let f = self.files.entry(*ino).or_default();
                f.meta = true;
                if f.path.is_none() {
                    f.path = Some(path.clone());
                }
            }
            Op::Write { ino, offset, len } => {
                let f = self.files.entry(*ino).or_default();
                f.extents.insert(*offset, offset.saturating_add(*len));
            }
            Op::Truncate { ino, size } => {
                let f = self.files.entry(*ino).or_default();
                f.truncated_to = Some(f.truncated_to.map_or(*size, |t| t.min(*size)));
            }
            Op::Meta { ino, dir } => match dir {
                Some(p) => {
                    self.dirs.insert(p.clone());
                }
                None => self.files.entry(*ino).or_default().meta = true,
            },
            Op::Fsync { .. } => {}
            // A dirty file could lose changes in a name the cut does not list; a clean one
            // would keep a stale hard-link key in it (the generation would show one name with
            // the key of several). Either way the next cut must find the other names.
            Op::Unplace { ino } => {
                self.files.entry(*ino).or_default().unplaced = true;
            }
        }
    }

    /// Nothing is dirty.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty()
    }

    /// Sum of the dirty extents' lengths (created files and truncations not counted beyond
    /// their extents).
    pub fn dirty_bytes(&self) -> u64 {
        self.files.values().map(|f| f.extents.total_len()).sum()
    }

    /// The state that makes everything under `backing_root` dirty: every directory (the root
    /// is "") and every regular file as created with extent `[0, size)`. Symlinks are not
    /// followed; other node kinds are covered by their (dirty) parent directory. Used when
    /// the journal cannot be trusted.
    pub fn rescan(backing_root: &Path) -> Result<DirtyState, JournalError> {
        rescan_excluding(backing_root, None)
    }

    fn mark_parent(&mut self, path: &Path) {
        if let Some(parent) = path.parent() {
            self.dirs.insert(parent.to_path_buf());
        }
    }

    /// The directories at or below `prefix` that hold a dirty file or are dirty themselves.
    fn places_under(&self, prefix: &Path) -> Vec<PathBuf> {
        let files = self
            .files
            .values()
            .filter_map(|f| f.path.as_deref())
            .filter(|p| under(p, prefix))
            .filter_map(|p| p.parent().map(Path::to_path_buf));
        let dirs = self.dirs.iter().filter(|d| under(d, prefix)).cloned();
        files.chain(dirs).collect()
    }

    /// Replaces every file and dir path for which `map` returns a new one, in one pass.
    fn rewrite_paths(&mut self, map: impl Fn(&Path) -> Option<PathBuf>) {
        for f in self.files.values_mut() {
            if let Some(new) = f.path.as_deref().and_then(&map) {
                f.path = Some(new);
            }
        }
        let dirs = std::mem::take(&mut self.dirs);
        self.dirs = dirs.into_iter().map(|d| map(&d).unwrap_or(d)).collect();
    }
}

/// [`DirtyState::rescan`], skipping the directory with `(dev, ino)` = `exclude` (the journal
/// directory, when it lies inside the backing directory).
pub(crate) fn rescan_excluding(
    backing_root: &Path,
    exclude: Option<(u64, u64)>,
) -> Result<DirtyState, JournalError> {
    let rescan_err = |path: &Path, source: io::Error| JournalError::Rescan {
        path: path.to_path_buf(),
        source,
    };
    // The state names files by the kernel's inode numbers.
    let root_md = fs::metadata(backing_root).map_err(|e| rescan_err(backing_root, e))?;
    let inos = InoMap::new(BackingIno(root_md.ino()));
    let mut state = DirtyState::default();
    state.dirs.insert(PathBuf::new());
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = backing_root.join(&rel);
        let read = match fs::read_dir(&abs) {
            Ok(read) => read,
            // Removed since its parent was listed (the backing dir may be in use).
            Err(e) if e.kind() == io::ErrorKind::NotFound && !rel.as_os_str().is_empty() => {
                continue;
            }
            Err(e) => return Err(rescan_err(&abs, e)),
        };
        let mut entries = Vec::new();
        for entry in read {
            let entry = entry.map_err(|e| rescan_err(&abs, e))?;
            entries.push(entry);
        }
        // Sorted so that the first name of a hard-linked file is deterministic.
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = rel.join(entry.file_name());
            // DirEntry::metadata is lstat: symlinks are not followed.
            let md = match entry.metadata() {
                Ok(md) => md,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(rescan_err(&entry.path(), e)),
            };
            if md.is_dir() {
                if exclude == Some((md.dev(), md.ino())) {
                    continue;
                }
                state.dirs.insert(path.clone());
                stack.push(path);
            } else if md.is_file() {
                state
                    .files
                    .entry(inos.fuse(BackingIno(md.ino())))
                    .or_insert_with(|| DirtyFile {
                        path: Some(path),
                        extents: std::iter::once((0, md.len())).collect(),
                        truncated_to: None,
                        created: true,
                        meta: false,
                        unplaced: false,
                    });
            }
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ino::FuseIno;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn dirs(list: &[&str]) -> BTreeSet<PathBuf> {
        list.iter().map(|s| p(s)).collect()
    }

    fn applied(ops: &[Op]) -> DirtyState {
        let mut s = DirtyState::default();
        for op in ops {
            s.apply(op);
        }
        s
    }

    fn create_file(ino: u64, path: &str) -> Op {
        Op::Create {
            ino: FuseIno(ino),
            kind: NodeKind::File,
            path: p(path),
        }
    }

    fn mkdir(ino: u64, path: &str) -> Op {
        Op::Create {
            ino: FuseIno(ino),
            kind: NodeKind::Dir,
            path: p(path),
        }
    }

    fn rename(from: &str, to: &str, exchange: bool) -> Op {
        Op::Rename {
            from: p(from),
            to: p(to),
            exchange,
        }
    }

    fn path_of(s: &DirtyState, ino: u64) -> Option<PathBuf> {
        s.files[&FuseIno(ino)].path.clone()
    }

    #[test]
    fn touch_creates_entry_and_sets_path() {
        let mut s = applied(&[Op::Touch {
            ino: FuseIno(7),
            path: Some(p("a/x")),
        }]);
        assert_eq!(path_of(&s, 7), Some(p("a/x")));
        assert!(!s.files[&FuseIno(7)].created);
        assert!(s.dirs.is_empty());
        s.apply(&Op::Touch {
            ino: FuseIno(7),
            path: None,
        });
        assert_eq!(path_of(&s, 7), None);
    }

    #[test]
    fn create_file_dir_and_others() {
        let s = applied(&[
            mkdir(1, "d"),
            create_file(2, "d/f"),
            Op::Create {
                ino: FuseIno(3),
                kind: NodeKind::Symlink,
                path: p("e/l"),
            },
            Op::Create {
                ino: FuseIno(4),
                kind: NodeKind::Fifo,
                path: p("top"),
            },
        ]);
        assert_eq!(s.dirs, dirs(&["", "d", "e"]));
        assert_eq!(s.files.len(), 1);
        let f = &s.files[&FuseIno(2)];
        assert!(f.created);
        assert_eq!(f.path, Some(p("d/f")));
    }

    #[test]
    fn remove_file_forgets_matching_path_only() {
        let mut s = applied(&[
            create_file(1, "a/x"),
            Op::Link {
                ino: FuseIno(1),
                path: p("b/y"),
            },
        ]);
        // Unlinking another name of the inode keeps the known path.
        s.apply(&Op::Remove {
            ino: FuseIno(1),
            path: p("b/y"),
            dir: false,
        });
        assert_eq!(path_of(&s, 1), Some(p("a/x")));
        s.apply(&Op::Remove {
            ino: FuseIno(1),
            path: p("a/x"),
            dir: false,
        });
        assert_eq!(path_of(&s, 1), None);
        assert!(
            s.files[&FuseIno(1)].created,
            "content flags survive an unlink"
        );
        assert_eq!(s.dirs, dirs(&["a", "b"]));
        // Removing a file with no entry does not make one.
        s.apply(&Op::Remove {
            ino: FuseIno(9),
            path: p("c/z"),
            dir: false,
        });
        assert!(!s.files.contains_key(&FuseIno(9)));
        assert!(s.dirs.contains(&p("c")));
    }

    /// An rmdir is an intent: if it fails (ENOTEMPTY), the files below are still there, so
    /// their paths are kept. (The data loss this prevents: `d/x` written, `rmdir d` refused,
    /// and the next generation kept the old `d/x`.)
    #[test]
    fn rmdir_keeps_the_paths_below_it() {
        let mut s = applied(&[
            mkdir(1, "a"),
            mkdir(2, "a/b"),
            mkdir(3, "ab"),
            create_file(4, "a/b/f"),
            create_file(5, "ab/f"),
        ]);
        s.apply(&Op::Remove {
            ino: FuseIno(1),
            path: p("a"),
            dir: true,
        });
        assert_eq!(s.dirs, dirs(&["", "a", "a/b", "ab"]));
        assert_eq!(path_of(&s, 4), Some(p("a/b/f")));
        assert_eq!(path_of(&s, 5), Some(p("ab/f")));
    }

    #[test]
    fn rename_file_marks_both_parents() {
        let mut s = applied(&[create_file(1, "a/x")]);
        s.dirs.clear();
        s.apply(&rename("a/x", "b/y", false));
        assert_eq!(path_of(&s, 1), Some(p("b/y")));
        assert_eq!(s.dirs, dirs(&["a", "b"]));
    }

    #[test]
    fn rename_dir_moves_nested_dirty_entries() {
        let mut s = applied(&[
            mkdir(1, "src"),
            mkdir(2, "src/sub"),
            mkdir(3, "src/sub/deep"),
            create_file(4, "src/sub/deep/f"),
            create_file(5, "src/g"),
            mkdir(6, "srcx"),
            create_file(7, "srcx/h"),
        ]);
        s.apply(&Op::Write {
            ino: FuseIno(4),
            offset: 0,
            len: 10,
        });
        s.apply(&rename("src", "dst/moved", false));
        // The old places stay marked: had the rename failed, the files would be there.
        assert_eq!(
            s.dirs,
            dirs(&[
                "",
                "dst",
                "dst/moved",
                "dst/moved/sub",
                "dst/moved/sub/deep",
                "src",
                "src/sub",
                "src/sub/deep",
                "srcx"
            ])
        );
        assert_eq!(path_of(&s, 4), Some(p("dst/moved/sub/deep/f")));
        assert_eq!(path_of(&s, 5), Some(p("dst/moved/g")));
        assert_eq!(
            path_of(&s, 7),
            Some(p("srcx/h")),
            "'srcx' is not under 'src'"
        );
        assert_eq!(s.files[&FuseIno(4)].extents.total_len(), 10);
    }

    /// A rename over a directory succeeds only if it is empty; if it was not, the rename
    /// failed and the target's files are where they were: nothing below it is forgotten.
    #[test]
    fn rename_over_existing_target_keeps_target_entries() {
        let mut s = applied(&[
            mkdir(1, "old"),
            create_file(2, "old/f"),
            mkdir(3, "old/d"),
            mkdir(4, "new"),
            create_file(5, "new/f"),
            create_file(6, "x"),
            create_file(7, "y"),
        ]);
        s.apply(&rename("new", "old", false));
        assert_eq!(path_of(&s, 2), Some(p("old/f")));
        assert_eq!(path_of(&s, 5), Some(p("old/f")));
        assert_eq!(s.dirs, dirs(&["", "new", "old", "old/d"]));
        // Overwriting a file: the replaced one keeps the name it had (its parent is listed).
        s.apply(&rename("x", "y", false));
        assert_eq!(path_of(&s, 6), Some(p("y")));
        assert_eq!(path_of(&s, 7), Some(p("y")));
    }

    #[test]
    fn rename_exchange_swaps_prefixes_in_one_pass() {
        let mut s = applied(&[
            mkdir(1, "a"),
            mkdir(2, "a/in"),
            create_file(3, "a/in/f"),
            mkdir(4, "b"),
            create_file(5, "b/g"),
        ]);
        s.apply(&rename("a", "b", true));
        assert_eq!(path_of(&s, 3), Some(p("b/in/f")));
        assert_eq!(path_of(&s, 5), Some(p("a/g")));
        assert_eq!(s.dirs, dirs(&["", "a", "a/in", "b", "b/in"]));
        // Exchanging two files.
        let mut s = applied(&[create_file(1, "d/x"), create_file(2, "e/y")]);
        s.apply(&rename("d/x", "e/y", true));
        assert_eq!(path_of(&s, 1), Some(p("e/y")));
        assert_eq!(path_of(&s, 2), Some(p("d/x")));
    }

    #[test]
    fn rename_onto_itself_or_into_itself_moves_nothing() {
        let before = applied(&[mkdir(1, "a"), create_file(2, "a/f")]);
        for (from, to) in [("a", "a"), ("a", "a/b"), ("a/f", "a")] {
            let mut s = before.clone();
            s.apply(&rename(from, to, false));
            assert_eq!(s.files, before.files, "{from} -> {to}");
            assert!(s.dirs.is_superset(&before.dirs), "{from} -> {to}");
        }
    }

    #[test]
    fn link_sets_meta_and_path_if_unknown() {
        let mut s = applied(&[Op::Link {
            ino: FuseIno(1),
            path: p("d/l1"),
        }]);
        assert_eq!(path_of(&s, 1), Some(p("d/l1")));
        assert!(s.files[&FuseIno(1)].meta);
        s.apply(&Op::Link {
            ino: FuseIno(1),
            path: p("e/l2"),
        });
        assert_eq!(path_of(&s, 1), Some(p("d/l1")), "a known path is kept");
        assert_eq!(s.dirs, dirs(&["d", "e"]));
    }

    #[test]
    fn write_unions_extents_and_zero_len_makes_entry() {
        let s = applied(&[
            Op::Write {
                ino: FuseIno(1),
                offset: 10,
                len: 5,
            },
            Op::Write {
                ino: FuseIno(1),
                offset: 0,
                len: 10,
            },
            Op::Write {
                ino: FuseIno(2),
                offset: 100,
                len: 0,
            },
            Op::Write {
                ino: FuseIno(3),
                offset: u64::MAX - 1,
                len: 10,
            },
        ]);
        assert_eq!(
            s.files[&FuseIno(1)].extents.iter().collect::<Vec<_>>(),
            vec![(0, 15)]
        );
        assert!(s.files[&FuseIno(2)].extents.is_empty());
        assert_eq!(
            s.files[&FuseIno(3)].extents.total_len(),
            1,
            "saturates at u64::MAX"
        );
        assert_eq!(s.dirty_bytes(), 16);
    }

    #[test]
    fn truncate_keeps_minimum_and_extents() {
        let s = applied(&[
            Op::Write {
                ino: FuseIno(1),
                offset: 0,
                len: 100,
            },
            Op::Truncate {
                ino: FuseIno(1),
                size: 50,
            },
            Op::Truncate {
                ino: FuseIno(1),
                size: 80,
            },
        ]);
        assert_eq!(s.files[&FuseIno(1)].truncated_to, Some(50));
        assert_eq!(s.files[&FuseIno(1)].extents.total_len(), 100);
    }

    #[test]
    fn meta_on_dir_and_file() {
        let s = applied(&[
            Op::Meta {
                ino: FuseIno(1),
                dir: Some(p("d")),
            },
            Op::Meta {
                ino: FuseIno(2),
                dir: None,
            },
        ]);
        assert_eq!(s.dirs, dirs(&["d"]));
        assert!(!s.files.contains_key(&FuseIno(1)));
        assert!(s.files[&FuseIno(2)].meta);
    }

    #[test]
    fn fsync_changes_nothing() {
        assert_eq!(
            applied(&[Op::Fsync { ino: FuseIno(1) }]),
            DirtyState::default()
        );
    }

    #[test]
    fn rescan_walks_without_following_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::write(r.join("a/b/f"), b"hello").unwrap();
        fs::write(r.join("top"), b"").unwrap();
        fs::hard_link(r.join("top"), r.join("a/zlink")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("a/out")).unwrap();
        let s = DirtyState::rescan(r).unwrap();
        assert_eq!(s.dirs, dirs(&["", "a", "a/b"]));
        assert_eq!(s.files.len(), 2);
        let f_ino = fs::metadata(r.join("a/b/f")).unwrap().ino();
        let f = &s.files[&FuseIno(f_ino)];
        assert_eq!(f.path, Some(p("a/b/f")));
        assert!(f.created);
        assert_eq!(f.extents.iter().collect::<Vec<_>>(), vec![(0, 5)]);
        let top_ino = fs::metadata(r.join("top")).unwrap().ino();
        // Both names are found; the first in walk order is kept.
        assert!(s.files[&FuseIno(top_ino)].path.is_some());
        assert!(s.files[&FuseIno(top_ino)].extents.is_empty());
    }

    #[test]
    fn serializes_paths_as_strings() {
        let s = applied(&[
            create_file(1, "d/f"),
            Op::Truncate {
                ino: FuseIno(1),
                size: 3,
            },
        ]);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["dirs"], serde_json::json!(["d"]));
        assert_eq!(json["files"]["1"]["path"], "d/f");
        assert_eq!(json["files"]["1"]["truncated_to"], 3);
    }
}
