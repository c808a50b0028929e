//! The inode budget: each inode the kernel knows holds a descriptor, so the table is kept
//! under the daemon's open file limit. Past the high-water mark a reaper thread asks the
//! kernel to forget names down to the low-water mark; at the budget, new inodes fail with
//! ENFILE.

use std::sync::atomic::Ordering;
use std::time::Duration;

use std::sync::Arc;

use crossbeam_channel::{Receiver, select};
use owsfs_journal::FuseIno;

use super::{Core, InodeInvalidator, Invalidator};
use crate::error::{FsError, FsResult};

/// How long a direct write waits for the kernel to drop the pages it changed.
const PAGE_DROP_WAIT: Duration = Duration::from_millis(100);

/// One range of pages to drop, and who waits for it.
pub(super) struct PageDrop {
    ino: FuseIno,
    offset: i64,
    len: i64,
    done: crossbeam_channel::Sender<()>,
}

impl Core {
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// How many inodes may be cached by the kernel at once (see `CoreOptions::inode_budget`).
    pub fn inode_budget(&self) -> usize {
        self.inode_budget
    }

    /// Where the reaper starts asking the kernel to forget (80% of the budget), and where it
    /// stops (70%). Both leave room for bursts, since the kernel forgets asynchronously.
    fn high_water(&self) -> usize {
        self.inode_budget / 10 * 8
    }

    fn low_water(&self) -> usize {
        self.inode_budget / 10 * 7
    }

    /// Installs the ways to ask the kernel to drop names, and stale attributes and pages
    /// (once).
    pub fn set_invalidators(&self, names: Invalidator, inodes: InodeInvalidator) {
        let _ = self.invalidate.set(names);
        let _ = self.invalidate_inode.set(inodes);
    }

    /// The daemon changed attributes of `ino` that the kernel caches for the attribute TTL and
    /// would not ask for again (a mode after an unprivileged write: the kernel marks only the
    /// times and size stale, so `statx(STATX_MODE)` kept the old set-id bits for an hour).
    /// Safe inside a request: dropping attributes takes no lock a request may hold.
    pub(super) fn attrs_changed(&self, ino: FuseIno) {
        self.invalidate_inode(ino, -1, 0);
    }

    /// The daemon changed bytes `offset..offset + len` of `ino` behind the kernel's page cache
    /// (a direct write): the kernel drops those pages and the attributes before the write is
    /// answered. Dropping a page waits for whoever holds it locked, which can be a request not
    /// served yet (a readahead), or the very request this thread serves (a buffered write the
    /// kernel sent with `O_DIRECT` still set, after a short direct write). So the pages are
    /// dropped by a thread of their own, and the write waits for it at most
    /// [`PAGE_DROP_WAIT`]: never on a lock of its own, never holding the request threads.
    pub(super) fn pages_changed(&self, ino: FuseIno, offset: u64, len: u64) {
        let Some(invalidate) = self.invalidate_inode.get() else {
            return;
        };
        if len == 0 {
            return;
        }
        let dropper = self.page_dropper.get_or_init(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<PageDrop>();
            let invalidate = Arc::clone(invalidate);
            let spawned = std::thread::Builder::new()
                .name("owsfs-pages".into())
                .spawn(move || {
                    for d in rx {
                        if let Err(e) = invalidate(d.ino, d.offset, d.len) {
                            tracing::debug!("pages of inode {} not dropped: {e}", d.ino);
                        }
                        let _ = d.done.send(());
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start the page dropper: {e}");
            }
            tx
        });
        let (done, dropped) = crossbeam_channel::bounded(1);
        let drop = PageDrop {
            ino,
            offset: offset.min(i64::MAX as u64) as i64,
            len: len.min(i64::MAX as u64) as i64,
            done,
        };
        if dropper.send(drop).is_ok() && dropped.recv_timeout(PAGE_DROP_WAIT).is_err() {
            tracing::debug!("pages of inode {ino} still being dropped after a direct write");
        }
    }

    fn invalidate_inode(&self, ino: FuseIno, offset: i64, len: i64) {
        if let Some(invalidate) = self.invalidate_inode.get()
            && let Err(e) = invalidate(ino, offset, len)
        {
            // ENOENT: the kernel holds no such inode, so nothing of it is cached.
            tracing::debug!("inode {ino} not invalidated: {e}");
        }
    }

    fn kick_reaper(&self) {
        // Kicks coalesce: one pending is enough.
        let _ = self.reaper_kick.0.try_send(());
    }

    /// The reaper's loop: whenever the inode table passes its high-water mark, ask the kernel
    /// to drop the least recently used names until it is back under the low-water mark. Runs
    /// on its own thread, never inside a request (the kernel takes directory locks to drop a
    /// name, which a request in flight may hold). Waits in one `select!` on the kicks (sent
    /// when the table passes the mark) and `stop`, whose sender is dropped to stop it.
    pub fn run_reaper(&self, stop: &Receiver<()>) {
        let kicks = &self.reaper_kick.1;
        loop {
            select! {
                recv(stop) -> _ => return,
                recv(kicks) -> _ => {}
            }
            let cached = self.inodes.len();
            if cached < self.high_water() {
                continue;
            }
            let Some(invalidate) = self.invalidate.get() else {
                continue;
            };
            let excess = cached - self.low_water();
            for (parent, name) in self.inodes.eviction_candidates(excess) {
                // A name already gone or a busy entry is simply skipped.
                let _ = invalidate(parent, &name);
            }
        }
    }

    /// When the inode table is full, waits a moment for the kernel's FORGETs: the reaper's
    /// invalidations make the kernel send them, and other threads serve them, but under load
    /// they can lag behind a burst of new names (over a second was seen while the whole test
    /// suite ran on two CPUs). Bounded, so open files beyond the budget still fail soon with
    /// ENFILE. Called before any barrier is taken.
    pub(super) fn wait_for_inode_room(&self) {
        if self.inodes.len() < self.inode_budget {
            return;
        }
        // No event says the kernel forgot an inode: the count is looked at every 5 ms.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while self.inodes.len() >= self.inode_budget && std::time::Instant::now() < deadline {
            self.kick_reaper();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Admits one more inode into the table, or refuses it (ENFILE) at the budget; past the
    /// high-water mark it wakes the reaper.
    pub(super) fn admit_new_inode(&self) -> FsResult<()> {
        let cached = self.inodes.len();
        if cached >= self.high_water() {
            self.kick_reaper();
        }
        if cached >= self.inode_budget {
            if !self.budget_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the kernel holds {} inodes, the most this daemon's open file limit allows; \
                     new names fail with ENFILE until it forgets some (raise fs.nr_open and the \
                     hard `ulimit -n`, or `echo 2 > /proc/sys/vm/drop_caches`)",
                    self.inodes.len()
                );
            }
            return Err(FsError::errno(
                libc::ENFILE,
                "inode descriptor budget exhausted",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use owsfs_journal::{Journal, JournalOptions};

    use crate::core::tests::name;
    use crate::core::{Core, CoreOptions};
    use crate::inode::ROOT_INO;

    #[test]
    fn the_inode_budget_bounds_descriptors_and_recovers_after_forget() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        std::fs::create_dir(&backing).unwrap();
        for i in 0..4 {
            std::fs::write(backing.join(format!("f{i}")), b"x").unwrap();
        }
        let (journal, _) = Journal::open(
            &dir.path().join("journal"),
            &backing,
            JournalOptions::default(),
        )
        .unwrap();
        // The root counts as one: room for two more.
        let opts = CoreOptions {
            inode_budget: 3,
            ..CoreOptions::default()
        };
        let core = Core::new(&backing, Arc::new(journal), opts).unwrap();
        let a = core.lookup(ROOT_INO, name("f0")).unwrap().ino();
        core.lookup(ROOT_INO, name("f1")).unwrap();
        assert_eq!(
            core.lookup(ROOT_INO, name("f2")).unwrap_err().to_errno(),
            libc::ENFILE
        );
        // Known inodes are still found; a forgotten one makes room.
        core.lookup(ROOT_INO, name("f0")).unwrap();
        core.forget(a, 2);
        core.lookup(ROOT_INO, name("f2")).unwrap();
    }
}
