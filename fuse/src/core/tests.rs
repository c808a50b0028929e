//! The fixture the core's unit tests share, a counting allocator for the tests that check
//! what a call allocates, and tests of the core as a whole.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;

use owsfs_journal::{Journal, JournalOptions};

use super::{Caller, Core, CoreOptions};
use crate::inode::ROOT_INO;

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) backing: PathBuf,
    pub(super) core: Core,
}

pub(super) const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    umask: 0,
};

pub(super) fn fixture(passthrough: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    let (journal, _) = Journal::open(
        &dir.path().join("journal"),
        &backing,
        JournalOptions::default(),
    )
    .unwrap();
    let core = Core::new(
        &backing,
        Arc::new(journal),
        CoreOptions {
            passthrough,
            ..CoreOptions::default()
        },
    )
    .unwrap();
    Fixture {
        _dir: dir,
        backing,
        core,
    }
}

pub(super) fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Counts, per thread, the bytes allocated, and among them those allocated zero-filled
/// (`vec![0; n]` asks for those), so tests can check what a call allocates.
struct CountingAlloc;

thread_local! {
    static ZEROED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static ALLOCATED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn count(cell: &'static std::thread::LocalKey<std::cell::Cell<usize>>, n: usize) {
    let _ = cell.try_with(|c| c.set(c.get() + n));
}

// SAFETY: every method forwards to the system allocator with the caller's arguments,
// which uphold GlobalAlloc's contract; the counter is a const-initialized thread local
// without a destructor, so counting allocates nothing.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count(&ALLOCATED, layout.size());
        // SAFETY: forwarded as is (see the impl).
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count(&ALLOCATED, layout.size());
        count(&ZEROED, layout.size());
        // SAFETY: forwarded as is (see the impl).
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded as is (see the impl).
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        count(&ALLOCATED, new_size.saturating_sub(layout.size()));
        // SAFETY: forwarded as is (see the impl).
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

pub(super) fn zeroed_bytes() -> usize {
    ZEROED.with(|z| z.get())
}

pub(super) fn allocated_bytes() -> usize {
    ALLOCATED.with(|a| a.get())
}

/// Copy-on-first-write side files go on the cache's file system (beside the backing
/// directory), not to $TMPDIR.
#[test]
fn side_files_go_beside_the_backing_directory() {
    let f = fixture(false);
    std::fs::write(f.backing.join("frozen"), vec![1u8; 8192]).unwrap();
    let ino = f.core.lookup(ROOT_INO, name("frozen")).unwrap().ino();
    let bino = f.core.backing_ino(ino);
    let _frozen = f
        .core
        .freezer()
        .freeze([(bino, PathBuf::from("frozen"), 8192)]);
    let (_, fh) = f.core.open(ino, libc::O_WRONLY, false).unwrap();
    f.core.write(fh, 0, b"changed", false).unwrap();
    let side = f
        .core
        .freezer()
        .side_file_path(bino)
        .expect("the write saved the old bytes in a side file");
    let cache = std::fs::canonicalize(f._dir.path()).unwrap();
    assert!(
        side.starts_with(&cache) && !side.starts_with(&f.backing),
        "side file {} is not beside the backing directory {}",
        side.display(),
        f.backing.display()
    );
    assert_eq!(f.core.freezer().side_dir(), cache);
    f.core.release(fh).unwrap();
}

/// After the tree below the root is replaced (a live rollback), everything from before is
/// stale: inodes, open files, open directories answer ESTALE (a close succeeds), and the root
/// serves the new tree.
#[test]
fn a_replaced_tree_makes_everything_from_before_stale() {
    let f = fixture(false);
    std::fs::create_dir(f.backing.join("dir")).unwrap();
    std::fs::write(f.backing.join("dir/old"), b"old").unwrap();
    std::fs::write(f.backing.join("file"), b"before").unwrap();
    let dir = f.core.lookup(ROOT_INO, name("dir")).unwrap().ino();
    let file = f.core.lookup(ROOT_INO, name("file")).unwrap().ino();
    let (_, fh) = f.core.open(file, libc::O_RDWR, false).unwrap();
    let dh = f.core.opendir(dir).unwrap();
    let root_dh = f.core.opendir(ROOT_INO).unwrap();
    assert_eq!(f.core.read(fh, 0, 100).unwrap(), b"before");

    // The rollback: the old entries go aside, the new tree takes their place.
    let aside = f._dir.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    {
        let _held = f.core.hold_requests();
        std::fs::rename(f.backing.join("dir"), aside.join("dir")).unwrap();
        std::fs::rename(f.backing.join("file"), aside.join("file")).unwrap();
        std::fs::write(f.backing.join("file"), b"after").unwrap();
        let mut names = f.core.replaced_tree();
        names.sort();
        assert_eq!(names, vec![name("dir"), name("file")]);
    }
    assert_eq!(f.core.era(), 1);

    let estale = |r: crate::FsResult<()>| {
        assert_eq!(r.map_err(|e| e.to_errno()), Err(libc::ESTALE));
    };
    estale(f.core.read(fh, 0, 100).map(|_| ()));
    estale(f.core.write(fh, 0, b"lost", false).map(|_| ()));
    estale(f.core.getattr(file).map(|_| ()));
    estale(f.core.lookup(dir, name("old")).map(|_| ()));
    estale(f.core.readdir(dh, 0).map(|_| ()));
    estale(f.core.mkdir(dir, name("new"), 0o755, ROOT).map(|_| ()));
    f.core.flush(fh).unwrap();
    f.core.release(fh).unwrap();
    f.core.releasedir(dh);
    assert_eq!(
        std::fs::read(aside.join("file")).unwrap(),
        b"before",
        "a write through a stale handle changed nothing"
    );

    // The root serves the new tree, an open listing of it included.
    let listing: Vec<_> = f
        .core
        .readdir(root_dh, 0)
        .unwrap()
        .iter()
        .map(|(_, e)| e.name.clone())
        .collect();
    assert!(listing.iter().any(|n| n == "file"), "{listing:?}");
    assert!(!listing.iter().any(|n| n == "dir"), "{listing:?}");
    f.core.releasedir(root_dh);
    let new = f.core.lookup(ROOT_INO, name("file")).unwrap().ino();
    assert_ne!(new, file);
    let (_, fh) = f.core.open(new, libc::O_RDONLY, false).unwrap();
    assert_eq!(f.core.read(fh, 0, 100).unwrap(), b"after");
    f.core.release(fh).unwrap();
    f.core.getattr(ROOT_INO).unwrap();
    // The kernel forgets the old inodes in time; they leave the table then.
    f.core.forget(file, 1);
    f.core.forget(dir, 1);
    assert_eq!(f.core.inode_count(), 2);
}

/// The core of the daemon of `incarnation` of one kernel connection, over `dir`/backing.
fn daemon_core(dir: &std::path::Path, incarnation: u16) -> Core {
    let backing = dir.join("backing");
    let (journal, _) =
        Journal::open(&dir.join("journal"), &backing, JournalOptions::default()).unwrap();
    Core::new(
        &backing,
        Arc::new(journal),
        CoreOptions {
            succession: Some(super::Succession {
                node_log: dir.join("nodes"),
                orphans: dir.join("orphans"),
                incarnation,
            }),
            ..CoreOptions::default()
        },
    )
    .unwrap()
}

/// A core of the same connection after the daemon before it died: the inodes, open files and
/// open directories the kernel still refers to are served, by the numbers the dead core handed
/// out; other numbers stay unknown.
#[test]
fn a_successor_serves_what_the_kernel_holds_of_a_dead_core() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    let core = |incarnation: u16| daemon_core(dir.path(), incarnation);
    let first = core(0);
    let d = first.mkdir(ROOT_INO, name("d"), 0o755, ROOT).unwrap().ino();
    std::fs::write(backing.join("d/f"), b"hello").unwrap();
    let f = first.lookup(d, name("f")).unwrap();
    let (_, fh) = first.open(f.ino(), libc::O_RDWR, false).unwrap();
    let dh = first.opendir(d).unwrap();
    assert_eq!(first.readdir(dh, 0).unwrap().len(), 3);
    std::fs::write(backing.join("gone"), b"").unwrap();
    let gone = first.lookup(ROOT_INO, name("gone")).unwrap().ino();
    // A file removed while open (an orphan), and one replaced by a rename while open.
    std::fs::write(backing.join("removed"), b"removed while open").unwrap();
    let removed = first.lookup(ROOT_INO, name("removed")).unwrap();
    let (_, removed_fh) = first.open(removed.ino(), libc::O_RDONLY, false).unwrap();
    first.unlink(ROOT_INO, name("removed")).unwrap();
    assert_eq!(
        first.getattr(removed.ino()).unwrap().nlink,
        0,
        "no name in the workspace"
    );
    std::fs::write(backing.join("old"), b"replaced while open").unwrap();
    std::fs::write(backing.join("new"), b"the replacement").unwrap();
    let replaced = first.lookup(ROOT_INO, name("old")).unwrap();
    let (_, replaced_fh) = first.open(replaced.ino(), libc::O_RDONLY, false).unwrap();
    first
        .rename(ROOT_INO, name("new"), ROOT_INO, name("old"), 0)
        .unwrap();
    // A file removed and closed leaves nothing behind.
    std::fs::write(backing.join("closed"), b"").unwrap();
    let closed = first.lookup(ROOT_INO, name("closed")).unwrap();
    let (_, closed_fh) = first.open(closed.ino(), libc::O_RDONLY, false).unwrap();
    first.unlink(ROOT_INO, name("closed")).unwrap();
    first.release(closed_fh).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("orphans"))
            .unwrap()
            .count(),
        2
    );
    drop(first); // its descriptors close, as at its death
    std::fs::remove_file(backing.join("gone")).unwrap();

    let second = core(1);
    assert_eq!(second.getattr(f.ino()).unwrap().size, 5);
    // The open file, read and written through the handle the dead core handed out.
    second.adopt_handle(f.ino(), fh).unwrap();
    assert_eq!(second.read(fh, 0, 10).unwrap(), b"hello");
    second.write(fh, 5, b" world", false).unwrap();
    assert_eq!(std::fs::read(backing.join("d/f")).unwrap(), b"hello world");
    // The open directory goes on from where its listing was.
    second.adopt_dir(d, dh).unwrap();
    assert_eq!(second.readdir(dh, 1).unwrap().len(), 2);
    // The kernel forgets more than this core counted: fine.
    second.forget(f.ino(), 7);
    assert_eq!(second.getattr(f.ino()).unwrap().size, 11, "opened again");
    // A removed inode is stale; a number nobody handed out is unknown; a handle of this core
    // that it does not know is refused, one of the dead core that was never used is released.
    assert_eq!(second.getattr(gone).unwrap_err().to_errno(), libc::ESTALE);
    assert_eq!(
        second
            .getattr(crate::FuseIno(999_999))
            .unwrap_err()
            .to_errno(),
        libc::ESTALE
    );
    let (_, new_fh) = second.open(f.ino(), libc::O_RDONLY, false).unwrap();
    assert!(
        new_fh > fh,
        "this core's handles are numbered above the dead one's"
    );
    assert_eq!(
        second.release(new_fh + 1).unwrap_err().to_errno(),
        libc::EBADF
    );
    second.release(fh).unwrap();
    second.release(fh + 100).unwrap();
    second.release(new_fh).unwrap();
    second.releasedir(dh);

    // The orphans' contents outlived the core that had them open.
    second.adopt_handle(removed.ino(), removed_fh).unwrap();
    assert_eq!(
        second.read(removed_fh, 0, 100).unwrap(),
        b"removed while open"
    );
    assert_eq!(second.getattr(removed.ino()).unwrap().nlink, 0);
    second.adopt_handle(replaced.ino(), replaced_fh).unwrap();
    assert_eq!(
        second.read(replaced_fh, 0, 100).unwrap(),
        b"replaced while open"
    );
    assert_eq!(
        std::fs::read(backing.join("old")).unwrap(),
        b"the replacement"
    );

    // A third core knows what both handed out.
    drop(second);
    let third = core(2);
    assert_eq!(third.getattr(d).unwrap().kind, fuser::FileType::Directory);
    assert_eq!(third.getattr(f.ino()).unwrap().size, 11);
}

/// A file an earlier daemon opened, removed through a successor that never saw it (the kernel
/// had its name, so no lookup came first), stays in the orphanage: its backing inode is not
/// freed while the program has it open. Found by a restart loop under SQLite, whose shared
/// memory file is removed while mapped: a file tar made then took its number, and the shared
/// memory's pages were written into it.
#[test]
fn a_successor_keeps_a_file_removed_that_only_an_earlier_daemon_saw() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    let first = daemon_core(dir.path(), 0);
    std::fs::write(backing.join("shm"), b"mapped").unwrap();
    let shm = first.lookup(ROOT_INO, name("shm")).unwrap().ino();
    let (_, fh) = first.open(shm, libc::O_RDWR, false).unwrap();
    drop(first);

    let second = daemon_core(dir.path(), 1);
    second.unlink(ROOT_INO, name("shm")).unwrap();
    assert!(!backing.join("shm").exists());
    let orphans = std::fs::read_dir(dir.path().join("orphans"))
        .unwrap()
        .count();
    assert_eq!(orphans, 1, "kept for the program that has it open");
    second.adopt_handle(shm, fh).unwrap();
    second.write(fh, 0, b"still ", false).unwrap();
    assert_eq!(second.read(fh, 0, 100).unwrap(), b"still ");
    // The kernel forgets it once the program closed it: the orphan goes.
    second.release(fh).unwrap();
    second.forget(shm, 1);
    let orphans = std::fs::read_dir(dir.path().join("orphans"))
        .unwrap()
        .count();
    assert_eq!(orphans, 0);
}

/// A handle of an earlier daemon is served on the file it was opened on or not at all: when
/// the node id it comes with names another file now, the request fails (ESTALE) and the
/// other file is untouched.
#[test]
fn a_handle_of_an_earlier_daemon_never_reaches_another_file() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    let first = daemon_core(dir.path(), 0);
    std::fs::write(backing.join("a"), b"a").unwrap();
    std::fs::write(backing.join("b"), b"b").unwrap();
    let a = first.lookup(ROOT_INO, name("a")).unwrap().ino();
    let b = first.lookup(ROOT_INO, name("b")).unwrap().ino();
    let (_, fh_a) = first.open(a, libc::O_RDWR, false).unwrap();
    let (_, fh_b) = first.open(b, libc::O_RDWR, false).unwrap();
    drop(first);

    let second = daemon_core(dir.path(), 1);
    // As if b's number were the one a's handle came with (the kernel holds a removed file
    // and the file that took its number under one node id).
    assert_eq!(
        second.adopt_handle(b, fh_a).unwrap_err().to_errno(),
        libc::ESTALE
    );
    assert!(second.write(fh_a, 0, b"x", false).is_err());
    assert_eq!(std::fs::read(backing.join("b")).unwrap(), b"b");
    // Its own handle is served; a released one is forgotten by the next daemon.
    second.adopt_handle(b, fh_b).unwrap();
    second.write(fh_b, 1, b"+", false).unwrap();
    second.release(fh_b).unwrap();
    drop(second);
    let third = daemon_core(dir.path(), 2);
    third.adopt_handle(a, fh_a).unwrap();
    assert_eq!(third.read(fh_a, 0, 10).unwrap(), b"a");
    assert_eq!(std::fs::read(backing.join("b")).unwrap(), b"b+");
    assert!(third.inodes.opened_on(fh_b).is_none(), "released");
}
