//! The two kinds of inode number. The kernel's (FUSE) numbers are what the mount shows and
//! what the journal's records name; the backing file system's are what `stat(2)` of a backing
//! file says, and what `state.db` and the hydration state name. They differ only at the root:
//! the backing root's number is shown as 1, and a backing inode numbered 1 (impossible on
//! ext4, possible elsewhere) takes the root's number. [`InoMap`] is the one place that knows.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An inode number as the kernel knows it (FUSE): the workspace root is 1. Also the key of
/// the journal's records and dirty state.
#[derive(
    Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize,
)]
#[serde(transparent)]
#[repr(transparent)]
pub struct FuseIno(pub u64);

impl FuseIno {
    /// The workspace root.
    pub const ROOT: FuseIno = FuseIno(1);
}

/// An inode number of the backing file system, as `stat(2)` of a backing file gives it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
#[repr(transparent)]
pub struct BackingIno(pub u64);

impl fmt::Display for FuseIno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for BackingIno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The mapping between the two kinds: the backing root's number and 1 swap places, every
/// other number is the same in both. A bijection, so hard links share one number and the
/// numbers are stable across remounts of a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InoMap {
    root: BackingIno,
}

impl InoMap {
    /// The mapping of a backing directory whose root has backing number `root`.
    pub fn new(root: BackingIno) -> InoMap {
        InoMap { root }
    }

    /// The backing number of the root.
    pub fn root(&self) -> BackingIno {
        self.root
    }

    /// The kernel's number of a backing inode.
    pub fn fuse(&self, ino: BackingIno) -> FuseIno {
        if ino == self.root {
            FuseIno::ROOT
        } else if ino.0 == FuseIno::ROOT.0 {
            FuseIno(self.root.0)
        } else {
            FuseIno(ino.0)
        }
    }

    /// The backing number of an inode the kernel knows (the inverse of [`InoMap::fuse`]).
    pub fn backing(&self, ino: FuseIno) -> BackingIno {
        if ino == FuseIno::ROOT {
            self.root
        } else if ino.0 == self.root.0 {
            BackingIno(FuseIno::ROOT.0)
        } else {
            BackingIno(ino.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_and_one_swap_and_the_mapping_is_its_own_inverse() {
        let map = InoMap::new(BackingIno(2));
        assert_eq!(map.fuse(BackingIno(2)), FuseIno::ROOT);
        assert_eq!(map.fuse(BackingIno(1)), FuseIno(2));
        assert_eq!(map.fuse(BackingIno(77)), FuseIno(77));
        assert_eq!(map.backing(FuseIno::ROOT), BackingIno(2));
        assert_eq!(map.backing(FuseIno(2)), BackingIno(1));
        assert_eq!(map.backing(FuseIno(77)), BackingIno(77));
        for root in [1, 2, 77, u64::MAX] {
            let map = InoMap::new(BackingIno(root));
            assert_eq!(map.fuse(map.root()), FuseIno::ROOT);
            for n in [0, 1, 2, 3, 77, root, u64::MAX] {
                assert_eq!(map.backing(map.fuse(BackingIno(n))), BackingIno(n));
                assert_eq!(map.fuse(map.backing(FuseIno(n))), FuseIno(n));
            }
        }
    }

    #[test]
    fn serialized_as_the_bare_number() {
        assert_eq!(serde_json::to_string(&FuseIno(7)).unwrap(), "7");
        assert_eq!(serde_json::to_string(&BackingIno(7)).unwrap(), "7");
        assert_eq!(format!("{} {}", FuseIno(7), BackingIno(8)), "7 8");
    }
}
