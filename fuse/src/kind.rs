//! Node kinds. The core's kind of a node is [`NodeKind`] (the journal's, which its `Create`
//! records carry); this is the one place that converts it from what the backing file system
//! says (a `stat` mode, a directory entry's type) and to and from what the kernel is told
//! (`fuser::FileType`).

use fuser::FileType;
use owsfs_journal::NodeKind;

/// The kind of a backing node by its file type. A type the file system does not tell (a
/// directory entry's `DT_UNKNOWN`) counts as a regular file.
pub(crate) fn of_type(t: rustix::fs::FileType) -> NodeKind {
    use rustix::fs::FileType as T;
    match t {
        T::Directory => NodeKind::Dir,
        T::Symlink => NodeKind::Symlink,
        T::Fifo => NodeKind::Fifo,
        T::Socket => NodeKind::Socket,
        T::CharacterDevice => NodeKind::CharDev,
        T::BlockDevice => NodeKind::BlockDev,
        T::RegularFile | T::Unknown => NodeKind::File,
    }
}

/// The kind of a backing node by the `st_mode` of its `stat`.
pub(crate) fn of_mode(mode: u32) -> NodeKind {
    of_type(rustix::fs::FileType::from_raw_mode(mode))
}

/// The kind as the kernel is told it.
pub(crate) fn to_fuser(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDev => FileType::CharDevice,
        NodeKind::BlockDev => FileType::BlockDevice,
        NodeKind::File => FileType::RegularFile,
    }
}

/// The kind of a node whose attributes the kernel was told (the inverse of [`to_fuser`]).
pub(crate) fn of_fuser(kind: FileType) -> NodeKind {
    match kind {
        FileType::Directory => NodeKind::Dir,
        FileType::Symlink => NodeKind::Symlink,
        FileType::NamedPipe => NodeKind::Fifo,
        FileType::Socket => NodeKind::Socket,
        FileType::CharDevice => NodeKind::CharDev,
        FileType::BlockDevice => NodeKind::BlockDev,
        FileType::RegularFile => NodeKind::File,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_kernel_types_map_one_to_one() {
        let all = [
            (libc::S_IFREG, NodeKind::File),
            (libc::S_IFDIR, NodeKind::Dir),
            (libc::S_IFLNK, NodeKind::Symlink),
            (libc::S_IFIFO, NodeKind::Fifo),
            (libc::S_IFSOCK, NodeKind::Socket),
            (libc::S_IFCHR, NodeKind::CharDev),
            (libc::S_IFBLK, NodeKind::BlockDev),
        ];
        for (mode, kind) in all {
            assert_eq!(of_mode(mode | 0o644), kind);
            assert_eq!(of_fuser(to_fuser(kind)), kind);
        }
        assert_eq!(of_mode(0), NodeKind::File, "no type bits: a regular file");
        assert_eq!(of_type(rustix::fs::FileType::Unknown), NodeKind::File);
    }
}
