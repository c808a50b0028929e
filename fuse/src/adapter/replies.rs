//! How the adapter answers beyond translating: a create's reply in the open's I/O mode, the
//! kernel passthrough backing ids, the answers that wait for the store, and requests the
//! kernel sends again after a daemon died (FUSE_NOTIFY_RESEND).

use std::ffi::OsStr;
use std::io;

use fuser::{
    BackingId, Errno, FileHandle, FopenFlags, Generation, INodeNo, ReplyCreate, ReplyEmpty,
    ReplyEntry, Request,
};
use owsfs_journal::FuseIno;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use dashmap::DashMap;

use super::{AdapterOptions, FuseAdapter, errno, fuse_ino};
use crate::core::{Core, Entry, Handle, IoMode};
use crate::error::FsError;

impl FuseAdapter {
    pub fn new(core: Arc<Core>, opts: AdapterOptions) -> Self {
        FuseAdapter {
            core,
            opts,
            backing: DashMap::new(),
            ioctl_refused: AtomicBool::new(false),
        }
    }

    pub(super) fn reply_entry(&self, reply: ReplyEntry, entry: &Entry) {
        reply.entry_with_ttls(
            &self.opts.entry_ttl,
            &self.opts.attr_ttl,
            &entry.attr,
            Generation(u64::from(entry.generation)),
        );
    }

    /// The entry of `name` in `parent`, as a creation's answer (a resent one the dead daemon
    /// had done).
    pub(super) fn reply_lookup(&self, reply: ReplyEntry, parent: INodeNo, name: &OsStr) {
        match self.core.lookup(fuse_ino(parent), name) {
            Ok(entry) => self.reply_entry(reply, &entry),
            Err(e) => reply.error(errno(&self.core, "lookup", &e)),
        }
    }

    /// The reply to a create or a tmpfile: the entry and the open file, in its I/O mode.
    pub(super) fn reply_created(
        &self,
        reply: ReplyCreate,
        entry: &Entry,
        handle: &Handle,
        fh: u64,
    ) {
        let (ttl, attr) = (self.opts.entry_ttl, entry.attr);
        let generation = Generation(u64::from(entry.generation));
        match handle.mode() {
            IoMode::Passthrough => {
                match self.passthrough_backing(handle, |f| reply.open_backing(f)) {
                    Ok(backing) => reply.created_passthrough(
                        &ttl,
                        &attr,
                        generation,
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &backing.0,
                    ),
                    Err(err) => match self.demote(fh, &err) {
                        Ok(flags) => reply.created(&ttl, &attr, generation, FileHandle(fh), flags),
                        Err(e) => reply.error(errno(&self.core, "create", &e)),
                    },
                }
            }
            mode => reply.created(
                &ttl,
                &attr,
                generation,
                FileHandle(fh),
                self.open_flags(mode),
            ),
        }
    }

    /// Registers the passthrough backing file of an open, or says why it cannot.
    pub(super) fn passthrough_backing<'a>(
        &'a self,
        handle: &Handle,
        open_backing: impl FnOnce(&std::fs::File) -> io::Result<BackingId>,
    ) -> io::Result<dashmap::mapref::one::RefMut<'a, FuseIno, (BackingId, u32)>> {
        let mut entry = self
            .backing
            .entry(handle.ino)
            .or_try_insert_with(|| open_backing(&handle.file).map(|id| (id, 0)))?;
        entry.1 += 1;
        Ok(entry)
    }

    pub(super) fn release_backing(&self, ino: FuseIno) {
        if let dashmap::mapref::entry::Entry::Occupied(mut e) = self.backing.entry(ino) {
            e.get_mut().1 -= 1;
            if e.get().1 == 0 {
                // Dropping the id closes it in the kernel.
                e.remove();
            }
        }
    }

    /// Every write reaches the backing file before it is acknowledged and the kernel keeps
    /// POSIX locks itself, so close(2) has nothing to tell the daemon: no FLUSH requests.
    pub(super) fn open_flags(&self, mode: IoMode) -> FopenFlags {
        if self.opts.writeback_cache {
            // close(2) must push the file's dirty pages to the daemon (FLUSH), and the cache
            // stays valid across opens because the daemon is the only writer.
            return FopenFlags::FOPEN_KEEP_CACHE;
        }
        match mode {
            // Every change to a file's data goes through this page cache (the daemon is the
            // only writer of the backing files, and writers never coexist with passthrough),
            // so it stays valid from one open to the next.
            IoMode::Cached => FopenFlags::FOPEN_NOFLUSH | FopenFlags::FOPEN_KEEP_CACHE,
            IoMode::Passthrough => FopenFlags::FOPEN_NOFLUSH,
        }
    }

    /// The answer to a successful fsync: at once, or under `-o durability=strict` once the
    /// store holds everything written before it (from the durability thread, so no FUSE
    /// thread waits for the store).
    pub(super) fn ok_when_durable(&self, reply: ReplyEmpty) {
        match (&self.opts.durable, self.opts.strict) {
            (Some(durable), true) => durable.after_durable(false, move |r| match r {
                Ok(_) => reply.ok(),
                Err(errno) => reply.error(Errno::from_i32(errno)),
            }),
            _ => reply.ok(),
        }
    }

    /// A passthrough open the kernel refused: serve this and later opens through the daemon.
    pub(super) fn demote(&self, fh: u64, err: &io::Error) -> Result<FopenFlags, FsError> {
        tracing::warn!("kernel passthrough unavailable ({err}); serving reads through the daemon");
        self.core.disable_passthrough();
        match self.core.demote_passthrough(fh) {
            Ok(mode) => Ok(self.open_flags(mode)),
            Err(e) => {
                let _ = self.core.release(fh);
                Err(e)
            }
        }
    }
}

/// The kernel sends a request again (FUSE_NOTIFY_RESEND) with this bit in its unique id: an
/// earlier daemon of the connection read it and died before it answered, maybe after it had
/// done what was asked.
const FUSE_UNIQUE_RESEND: u64 = 1 << 63;

/// Whether `req` was sent before, to a daemon that died before it answered.
fn resent(req: &Request) -> bool {
    req.unique().0 & FUSE_UNIQUE_RESEND != 0
}

/// The request's number, without the bit that marks it sent again.
pub(super) fn unique_of(req: &Request) -> u64 {
    req.unique().0 & !FUSE_UNIQUE_RESEND
}

/// Whether `req`, a rename with `RENAME_EXCHANGE`, is sent again and `made` says the dead
/// daemon made the exchange (recorded in the node log before its answer).
pub(super) fn resent_exchange_made(req: &Request, made: impl FnOnce() -> bool) -> bool {
    let done = resent(req) && made();
    if done {
        tracing::info!(
            "a resent rename finds its exchange made by the daemon before: answered as done"
        );
    }
    done
}

/// Whether `e` is the second answer of a change the dead daemon made before it died: the
/// name a resent creation makes exists (`EEXIST`), the name a resent removal or rename
/// takes away is gone (`ENOENT`). The kernel checked the opposite just before it sent the
/// request (a negative or a positive dentry), so the change is taken for done.
pub(super) fn done_before(req: &Request, e: &FsError, errno: i32, op: &str) -> bool {
    let done = resent(req) && e.to_errno() == errno;
    if done {
        tracing::info!(
            "a resent {op} finds its change made by the daemon before: answered as done"
        );
    }
    done
}
