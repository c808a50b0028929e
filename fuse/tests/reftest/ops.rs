//! The operations of the reference tests and their generator.
//!
//! An operation is generated with path *selectors* ([`Sel`]): an existing name (any, a file,
//! a directory), a name from the alphabet `a`, `b`, `c` inside an existing directory, or a
//! fixed path of the alphabet at most three deep (mostly missing: the ENOENT and ENOTDIR
//! cases). Selectors are resolved against the model's tree just before the step runs
//! ([`Resolve`]), so most operations act on what exists, and names still collide often:
//! creates over existing names, renames onto existing targets and into subdirectories. Paths
//! never follow symlinks (a symlink in the middle of a path gives ENOTDIR, a data operation on
//! a symlink ELOOP), which keeps the model free of path resolution through links.
//!
//! A resolved [`Op`] prints (`Debug`) as a Rust expression: failures list the resolved
//! sequence, ready to paste into a regression test.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use proptest::prelude::*;
use proptest::sample::Index;

use crate::model::Model;
use crate::tree::{Kind, join};

/// Open-file slots: a file can stay open across operations (and be written after its name is
/// gone).
pub const SLOTS: usize = 2;

/// File mode bits, printed in octal.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mode(0o{:o})", self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameMode {
    Plain,
    NoReplace,
    Exchange,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    Any,
    /// XATTR_CREATE
    OnlyCreate,
    /// XATTR_REPLACE
    OnlyReplace,
}

/// One operation on paths of type `P`: `&'static str` once resolved, [`Sel`] as generated.
#[derive(Clone, Debug)]
pub enum Op<P = &'static str> {
    /// open(path, O_RDWR [| O_CREAT, mode] [| O_EXCL] [| O_TRUNC]), pwrite `len` bytes of
    /// `pattern(fill)` at `offset` (past the end: a hole), close.
    Write {
        path: P,
        create: Option<Mode>,
        excl: bool,
        trunc: bool,
        offset: u64,
        len: u32,
        fill: u8,
    },
    /// open(path, O_RDWR | O_CREAT [| O_EXCL], mode), close: `touch`.
    Create {
        path: P,
        mode: Mode,
        excl: bool,
    },
    /// truncate(2) (grow or shrink).
    Truncate {
        path: P,
        size: u64,
    },
    Mkdir {
        path: P,
        mode: Mode,
    },
    Rmdir {
        path: P,
    },
    Unlink {
        path: P,
    },
    Rename {
        from: P,
        to: P,
        mode: RenameMode,
    },
    /// link(from, to): a new name for an existing inode.
    Link {
        from: P,
        to: P,
    },
    Symlink {
        path: P,
        target: &'static str,
    },
    Chmod {
        path: P,
        mode: Mode,
    },
    SetMtime {
        path: P,
        secs: i64,
        nsecs: u32,
    },
    SetXattr {
        path: P,
        name: &'static str,
        value: &'static str,
        mode: XattrMode,
    },
    RemoveXattr {
        path: P,
        name: &'static str,
    },
    /// fsync of a file (opened read-only for it) or fsyncdir of a directory.
    Fsync {
        path: P,
        datasync: bool,
    },
    /// Opens an existing file O_RDWR into `slot` (nothing happens if the slot is taken).
    Open {
        slot: usize,
        path: P,
    },
    /// pwrite through the file open in `slot` (nothing happens if the slot is empty).
    WriteFh {
        slot: usize,
        offset: u64,
        len: u32,
        fill: u8,
    },
    /// ftruncate through the file open in `slot`.
    TruncateFh {
        slot: usize,
        size: u64,
    },
    FsyncFh {
        slot: usize,
    },
    Close {
        slot: usize,
    },
}

/// The bytes an op writes: never all zero, so holes and data are told apart.
pub fn pattern(fill: u8, len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (fill as u32).wrapping_mul(31).wrapping_add(i * 7 + 1) as u8)
        .collect()
}

const NAMES: [&str; 3] = ["a", "b", "c"];

/// Every path of the alphabet, by depth (1, 2, 3).
fn paths() -> &'static [Vec<&'static str>; 3] {
    static PATHS: OnceLock<[Vec<&'static str>; 3]> = OnceLock::new();
    PATHS.get_or_init(|| {
        let d1: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
        let d2: Vec<String> = d1
            .iter()
            .flat_map(|p| NAMES.iter().map(move |n| format!("{p}/{n}")))
            .collect();
        let d3: Vec<String> = d2
            .iter()
            .flat_map(|p| NAMES.iter().map(move |n| format!("{p}/{n}")))
            .collect();
        let leak = |v: Vec<String>| -> Vec<&'static str> {
            v.into_iter()
                .map(|s| &*Box::leak(s.into_boxed_str()))
                .collect()
        };
        [leak(d1), leak(d2), leak(d3)]
    })
}

/// How a step picks a path, resolved against the model's tree when the step runs.
#[derive(Clone, Debug)]
pub enum Sel {
    /// Any existing name (or `a` when there is none).
    Existing(Index),
    /// An existing regular file (else any existing name).
    File(Index),
    /// An existing directory other than the root (else any existing name).
    Dir(Index),
    /// `name` in an existing directory (the root included).
    Child(Index, &'static str),
    /// A path of the alphabet, up to three deep.
    Fixed(&'static str),
}

/// A generated operation.
pub type Step = Op<Sel>;

fn fixed() -> impl Strategy<Value = Sel> {
    let [d1, d2, d3] = paths().clone();
    prop_oneof![
        4 => prop::sample::select(d1),
        4 => prop::sample::select(d2),
        2 => prop::sample::select(d3),
    ]
    .prop_map(Sel::Fixed)
}

fn name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(NAMES.to_vec())
}

fn existing() -> impl Strategy<Value = Sel> {
    any::<Index>().prop_map(Sel::Existing)
}

fn file() -> impl Strategy<Value = Sel> {
    any::<Index>().prop_map(Sel::File)
}

fn dir() -> impl Strategy<Value = Sel> {
    any::<Index>().prop_map(Sel::Dir)
}

fn child() -> impl Strategy<Value = Sel> {
    (any::<Index>(), name()).prop_map(|(i, n)| Sel::Child(i, n))
}

/// Where something new is made: mostly a fresh name somewhere, sometimes one that exists.
fn new_path() -> impl Strategy<Value = Sel> {
    prop_oneof![6 => child(), 1 => existing(), 1 => fixed()]
}

/// Something that should exist: mostly does.
fn some_path() -> impl Strategy<Value = Sel> {
    prop_oneof![5 => existing(), 1 => fixed()]
}

fn file_path() -> impl Strategy<Value = Sel> {
    prop_oneof![5 => file(), 1 => existing(), 1 => fixed()]
}

fn dir_path() -> impl Strategy<Value = Sel> {
    prop_oneof![5 => dir(), 1 => existing(), 1 => fixed()]
}

fn rename_from() -> impl Strategy<Value = Sel> {
    prop_oneof![3 => existing(), 2 => dir(), 2 => file(), 1 => fixed()]
}

fn rename_to() -> impl Strategy<Value = Sel> {
    prop_oneof![4 => child(), 2 => existing(), 1 => dir(), 1 => fixed()]
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![0u64, 1, 4095, 4096, 8191, 65536, 70000]),
        0u64..20_000,
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![0u64, 1, 4096, 5000, 100_000]),
        0u64..20_000,
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..64, 1u32..6000]
}

fn file_mode() -> impl Strategy<Value = Mode> {
    prop::sample::select(vec![0o644, 0o600, 0o755, 0o4755, 0o2755, 0o000]).prop_map(Mode)
}

fn dir_mode() -> impl Strategy<Value = Mode> {
    prop::sample::select(vec![0o755, 0o700, 0o1777, 0o2775]).prop_map(Mode)
}

fn any_mode() -> impl Strategy<Value = Mode> {
    prop::sample::select(vec![
        0o644, 0o600, 0o755, 0o700, 0o4755, 0o2775, 0o1777, 0o000,
    ])
    .prop_map(Mode)
}

fn slot() -> impl Strategy<Value = usize> {
    0..SLOTS
}

fn xattr_name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["user.a", "user.b"])
}

fn xattr_value() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "1", "value", "a longer value of an attribute"])
}

fn xattr_mode() -> impl Strategy<Value = XattrMode> {
    use XattrMode::*;
    prop::sample::select(vec![Any, Any, OnlyCreate, OnlyReplace])
}

fn rename_mode() -> impl Strategy<Value = RenameMode> {
    use RenameMode::*;
    prop::sample::select(vec![Plain, Plain, Plain, Plain, NoReplace, Exchange])
}

fn mtime() -> impl Strategy<Value = (i64, u32)> {
    prop::sample::select(vec![
        (0i64, 0u32),
        (1_000_000_000, 0),
        (1_600_000_000, 123_456_789),
        (-86_400, 5),
    ])
}

fn symlink_target() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "../b", "/abs/target", "c/../a"])
}

fn write() -> impl Strategy<Value = Step> {
    let path = prop_oneof![4 => file(), 3 => child(), 1 => existing(), 1 => fixed()];
    let create = proptest::option::weighted(0.7, file_mode());
    let open = (path, create, any::<bool>(), prop::bool::weighted(0.2));
    (open, offset(), len(), any::<u8>()).prop_map(
        |((path, create, excl, trunc), offset, len, fill)| Op::Write {
            path,
            create,
            excl: excl && create.is_some(),
            trunc,
            offset,
            len,
            fill,
        },
    )
}

/// One operation, weighted towards the namespace changes that collide.
pub fn step() -> impl Strategy<Value = Step> {
    let unlink_path = prop_oneof![4 => file(), 2 => existing(), 1 => fixed()];
    prop_oneof![
        15 => write(),
        5 => (new_path(), file_mode(), any::<bool>())
            .prop_map(|(path, mode, excl)| Op::Create { path, mode, excl }),
        4 => (file_path(), size()).prop_map(|(path, size)| Op::Truncate { path, size }),
        10 => (new_path(), dir_mode()).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        5 => dir_path().prop_map(|path| Op::Rmdir { path }),
        5 => unlink_path.prop_map(|path| Op::Unlink { path }),
        14 => (rename_from(), rename_to(), rename_mode())
            .prop_map(|(from, to, mode)| Op::Rename { from, to, mode }),
        5 => (file_path(), new_path()).prop_map(|(from, to)| Op::Link { from, to }),
        3 => (new_path(), symlink_target())
            .prop_map(|(path, target)| Op::Symlink { path, target }),
        3 => (some_path(), any_mode()).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        // Set-group-id directories pass the bit on to new subdirectories.
        1 => (dir_path(), prop::sample::select(vec![0o2775, 0o3777]))
            .prop_map(|(path, mode)| Op::Chmod { path, mode: Mode(mode) }),
        3 => (some_path(), mtime())
            .prop_map(|(path, (secs, nsecs))| Op::SetMtime { path, secs, nsecs }),
        4 => (some_path(), xattr_name(), xattr_value(), xattr_mode())
            .prop_map(|(path, name, value, mode)| Op::SetXattr { path, name, value, mode }),
        2 => (some_path(), xattr_name()).prop_map(|(path, name)| Op::RemoveXattr { path, name }),
        2 => (some_path(), any::<bool>())
            .prop_map(|(path, datasync)| Op::Fsync { path, datasync }),
        3 => (slot(), file_path()).prop_map(|(slot, path)| Op::Open { slot, path }),
        4 => (slot(), offset(), len(), any::<u8>())
            .prop_map(|(slot, offset, len, fill)| Op::WriteFh { slot, offset, len, fill }),
        2 => (slot(), size()).prop_map(|(slot, size)| Op::TruncateFh { slot, size }),
        1 => slot().prop_map(|slot| Op::FsyncFh { slot }),
        2 => slot().prop_map(|slot| Op::Close { slot }),
    ]
}

/// A sequence of up to `max` steps.
pub fn steps(max: usize) -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(step(), 0..=max)
}

/// A path as a `&'static str` (so that resolved ops print as pasteable literals), each
/// distinct path leaked once.
fn intern(path: String) -> &'static str {
    static PATHS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut set = PATHS
        .get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = set.get(path.as_str()) {
        return p;
    }
    let p: &'static str = Box::leak(path.into_boxed_str());
    set.insert(p);
    p
}

impl Sel {
    fn resolve(&self, model: &Model) -> &'static str {
        let names = model.paths();
        let of = |kind: Option<Kind>| -> Vec<String> {
            names
                .iter()
                .filter(|(_, k)| kind.is_none_or(|kind| *k == kind))
                .map(|(p, _)| p.clone())
                .collect()
        };
        let pick = |list: Vec<String>, i: &Index| -> Option<String> {
            (!list.is_empty()).then(|| list[i.index(list.len())].clone())
        };
        let path = match self {
            Sel::Fixed(p) => return p,
            Sel::Existing(i) => pick(of(None), i),
            Sel::File(i) => pick(of(Some(Kind::File)), i).or_else(|| pick(of(None), i)),
            Sel::Dir(i) => pick(of(Some(Kind::Dir)), i).or_else(|| pick(of(None), i)),
            Sel::Child(i, name) => {
                let mut dirs = vec![String::new()];
                dirs.extend(of(Some(Kind::Dir)));
                pick(dirs, i).map(|d| join(&d, name))
            }
        };
        intern(path.unwrap_or_else(|| "a".into()))
    }
}

/// What becomes an operation on the model's current tree: a generated [`Step`], or an [`Op`]
/// as it is (regression tests).
pub trait Resolve: std::fmt::Debug {
    fn resolve(&self, model: &Model) -> Op;
}

impl Resolve for Step {
    fn resolve(&self, model: &Model) -> Op {
        self.clone().map(|s| s.resolve(model))
    }
}

impl Resolve for Op {
    fn resolve(&self, _: &Model) -> Op {
        self.clone()
    }
}

impl<P> Op<P> {
    /// The same operation with every path mapped.
    pub fn map<Q>(self, mut f: impl FnMut(P) -> Q) -> Op<Q> {
        match self {
            Op::Write {
                path,
                create,
                excl,
                trunc,
                offset,
                len,
                fill,
            } => Op::Write {
                path: f(path),
                create,
                excl,
                trunc,
                offset,
                len,
                fill,
            },
            Op::Create { path, mode, excl } => Op::Create {
                path: f(path),
                mode,
                excl,
            },
            Op::Truncate { path, size } => Op::Truncate {
                path: f(path),
                size,
            },
            Op::Mkdir { path, mode } => Op::Mkdir {
                path: f(path),
                mode,
            },
            Op::Rmdir { path } => Op::Rmdir { path: f(path) },
            Op::Unlink { path } => Op::Unlink { path: f(path) },
            Op::Rename { from, to, mode } => {
                let from = f(from);
                Op::Rename {
                    from,
                    to: f(to),
                    mode,
                }
            }
            Op::Link { from, to } => {
                let from = f(from);
                Op::Link { from, to: f(to) }
            }
            Op::Symlink { path, target } => Op::Symlink {
                path: f(path),
                target,
            },
            Op::Chmod { path, mode } => Op::Chmod {
                path: f(path),
                mode,
            },
            Op::SetMtime { path, secs, nsecs } => Op::SetMtime {
                path: f(path),
                secs,
                nsecs,
            },
            Op::SetXattr {
                path,
                name,
                value,
                mode,
            } => Op::SetXattr {
                path: f(path),
                name,
                value,
                mode,
            },
            Op::RemoveXattr { path, name } => Op::RemoveXattr {
                path: f(path),
                name,
            },
            Op::Fsync { path, datasync } => Op::Fsync {
                path: f(path),
                datasync,
            },
            Op::Open { slot, path } => Op::Open {
                slot,
                path: f(path),
            },
            Op::WriteFh {
                slot,
                offset,
                len,
                fill,
            } => Op::WriteFh {
                slot,
                offset,
                len,
                fill,
            },
            Op::TruncateFh { slot, size } => Op::TruncateFh { slot, size },
            Op::FsyncFh { slot } => Op::FsyncFh { slot },
            Op::Close { slot } => Op::Close { slot },
        }
    }
}
