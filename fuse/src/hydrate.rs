//! The hook for content that is not local yet (lazy hydration). The daemon implements it over
//! the object store; the core calls it before it serves anything that needs the missing bytes
//! or entries, by backing inode number.

use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;

use owsfs_journal::BackingIno;

/// What the core asks of lazy hydration.
pub trait Hydrate: Send + Sync {
    /// Anything may still be missing. When false the core skips every other call.
    fn active(&self) -> bool;
    /// Directory `ino` has not been materialized yet (its entries are not in the backing
    /// directory).
    fn dir_pending(&self, ino: BackingIno) -> bool;
    /// Creates directory `ino`'s entries (called with the write barrier held shared).
    fn materialize(&self, ino: BackingIno, dir: BorrowedFd<'_>) -> io::Result<()>;
    /// Makes `[start, end)` of file `ino` local: every chunk that overlaps it is fetched and
    /// written into the backing file. Blocks until then; fails (EIO) when the store cannot
    /// deliver, never leaving zeros that look like data.
    fn fetch(&self, ino: BackingIno, start: u64, end: u64) -> io::Result<()>;
    /// File `ino` is wholly local (or not a lazily restored file at all).
    fn whole(&self, ino: BackingIno) -> bool;
    /// File `ino` is about to be truncated to `size`: bytes from there on never come from
    /// the store again.
    fn truncate(&self, ino: BackingIno, size: u64);
    /// Inode `ino` was just created: any state of an earlier inode with that number is gone.
    fn created(&self, ino: BackingIno);
    /// The last name of file `ino` was removed.
    fn removed(&self, ino: BackingIno);
    /// File `ino` was opened (for the access set that orders the next holder's prefetch).
    fn opened(&self, ino: BackingIno, path: Option<&Path>);
}
