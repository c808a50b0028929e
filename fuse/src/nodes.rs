//! The node log (`CACHE/nodes`): the backing file handle of every inode the daemon hands the
//! kernel, appended as it enters the inode table, so that the daemon that takes over a live
//! connection after this one died can open the inodes the kernel still refers to by node id.
//!
//! The kernel names inodes by node id (the backing inode number) and keeps them as long as it
//! likes; the daemon that handed them out held a descriptor of each, which died with it. A node
//! id alone does not open a file, but its backing file handle does (`open_by_handle_at`), and
//! the handle carries the backing inode's generation, so a number reused by another file since
//! opens nothing (ESTALE).
//!
//! It also has the daemon's file and directory handles (`open` records, and `closed` at their
//! release): a handle an earlier daemon gave out is opened again on the very file it was
//! given out for, and never on another file that took its node id since (that would send one
//! program's writes into another's file).
//!
//! Format (version 2), all integers little-endian:
//! - header, 16 bytes: `OWSFSNOD`, version `u32`, CRC-32C `u32` of the 12 bytes before it;
//! - records: length `u32` of the body, the body, CRC-32C `u32` of the length and the body.
//!   The body's first byte is its kind:
//!   - 0, node: FUSE inode number `u64`, then the backing handle's bytes;
//!   - 1, open: file or directory handle `u64`, FUSE inode number `u64`, then the backing
//!     handle's bytes of the inode it was opened on;
//!   - 2, closed: the handle `u64`, released;
//!   - 3, done: the `unique` `u64` of a request whose change is made but not yet answered
//!     (a `rename` with `RENAME_EXCHANGE`, which cannot tell from the tree that it was done:
//!     sent again to the next daemon, it is answered without swapping the names back).
//!
//! Version 1 (an earlier owsfs, which `owsfs restart` may replace) is read too: its records
//! are the node body without the kind byte, and it has no open records.
//!
//! A record is one `write(2)`, so a killed daemon leaves whole records (the file is not
//! synced: it matters only while the kernel connection lives, which a machine crash ends).
//! A torn or damaged tail ends the reading; what it held is opened as stale. Nothing else
//! reads the file, and a mount that starts a new connection starts a new file.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use owsfs_journal::FuseIno;
use parking_lot::Mutex;

const MAGIC: &[u8; 8] = b"OWSFSNOD";
const VERSION: u32 = 2;
/// A handle is at most `MAX_HANDLE_SZ` (128) bytes.
const MAX_BODY: usize = 1 + 8 + 8 + 128;

const NODE: u8 = 0;
const OPEN: u8 = 1;
const CLOSED: u8 = 2;
const DONE: u8 = 3;

/// What a log holds: each node id's newest backing handle, and the handles still open with
/// the inode and backing handle each was opened on.
#[derive(Debug, Default)]
pub struct Logged {
    pub nodes: HashMap<FuseIno, Box<[u8]>>,
    pub opens: HashMap<u64, (FuseIno, Box<[u8]>)>,
    /// Requests (by `unique`, without the resend bit) whose change was made.
    pub done: std::collections::HashSet<u64>,
}

/// The open log, appended to by the inode table.
pub struct NodeLog {
    path: PathBuf,
    file: Mutex<File>,
    /// Records in the file: when it passes twice what the table holds, the file is written
    /// again from the table ([`NodeLog::rewrite`]).
    records: std::sync::atomic::AtomicUsize,
}

fn header_of(version: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    let crc = crc32c::crc32c(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A record of `kind` whose body goes on with `parts`.
fn record(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut r = Vec::with_capacity(4 + len + 4);
    r.extend_from_slice(&(len as u32).to_le_bytes());
    r.push(kind);
    for p in parts {
        r.extend_from_slice(p);
    }
    let crc = crc32c::crc32c(&r);
    r.extend_from_slice(&crc.to_le_bytes());
    r
}

fn node_record(ino: FuseIno, handle: &[u8]) -> Vec<u8> {
    record(NODE, &[&ino.0.to_le_bytes(), handle])
}

fn open_record(fh: u64, ino: FuseIno, handle: &[u8]) -> Vec<u8> {
    record(OPEN, &[&fh.to_le_bytes(), &ino.0.to_le_bytes(), handle])
}

fn u64_at(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Reads a log. A missing file reads as empty; a file of another format is an error.
pub fn read(path: &Path) -> std::io::Result<Logged> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Logged::default()),
        Err(e) => return Err(e),
    };
    let version = match bytes.get(..16) {
        Some(h) if h == header_of(VERSION) => VERSION,
        Some(h) if h == header_of(1) => 1,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is not a version 1 or {VERSION} node log",
                    path.display()
                ),
            ));
        }
    };
    let mut logged = Logged::default();
    let mut at = 16;
    while at + 4 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        if !(8..=MAX_BODY).contains(&len) || at + 4 + len + 4 > bytes.len() {
            break;
        }
        let body = &bytes[at + 4..at + 4 + len];
        let crc = u32::from_le_bytes(
            bytes[at + 4 + len..at + 8 + len]
                .try_into()
                .expect("4 bytes"),
        );
        if crc32c::crc32c(&bytes[at..at + 4 + len]) != crc {
            break;
        }
        let (kind, rest) = if version == 1 {
            (NODE, body)
        } else {
            (body[0], &body[1..])
        };
        match kind {
            NODE if rest.len() >= 8 => {
                let handle = rest[8..].to_vec().into_boxed_slice();
                logged.nodes.insert(FuseIno(u64_at(rest)), handle);
            }
            OPEN if rest.len() >= 16 => {
                let handle = rest[16..].to_vec().into_boxed_slice();
                let ino = FuseIno(u64_at(&rest[8..]));
                logged.opens.insert(u64_at(rest), (ino, handle));
            }
            CLOSED if rest.len() == 8 => {
                logged.opens.remove(&u64_at(rest));
            }
            DONE if rest.len() == 8 => {
                logged.done.insert(u64_at(rest));
            }
            _ => break,
        }
        at += 8 + len;
    }
    if at != bytes.len() {
        tracing::warn!(
            "{}: {} bytes after the last whole record were not read",
            path.display(),
            bytes.len() - at
        );
    }
    Ok(logged)
}

impl NodeLog {
    /// Starts the log at `path` with what `logged` holds (nothing for a new connection),
    /// replacing what was there.
    pub fn create(path: &Path, logged: &Logged) -> std::io::Result<NodeLog> {
        let (file, records) = write_new(path, logged)?;
        Ok(NodeLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            records: std::sync::atomic::AtomicUsize::new(records),
        })
    }

    /// Appends one record; returns how many the file holds. A failed write is logged: what
    /// it said is lost only if this daemon dies while the kernel holds the inode or handle.
    fn append_record(&self, r: &[u8]) -> usize {
        let mut file = self.file.lock();
        if let Err(e) = file.write_all(r) {
            tracing::warn!("node log {}: {e}", self.path.display());
        }
        self.records
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// Records that the kernel was handed inode `ino`, of backing handle `handle`.
    pub fn append(&self, ino: FuseIno, handle: &[u8]) -> usize {
        self.append_record(&node_record(ino, handle))
    }

    /// Records that handle `fh` was opened on inode `ino`, of backing handle `handle`.
    pub fn append_open(&self, fh: u64, ino: FuseIno, handle: &[u8]) -> usize {
        self.append_record(&open_record(fh, ino, handle))
    }

    /// Records that handle `fh` was released.
    pub fn append_closed(&self, fh: u64) -> usize {
        self.append_record(&record(CLOSED, &[&fh.to_le_bytes()]))
    }

    /// Records that the change of request `unique` is made.
    pub fn append_done(&self, unique: u64) -> usize {
        self.append_record(&record(DONE, &[&unique.to_le_bytes()]))
    }

    /// Writes the file again with what `logged` returns only. It is called with the log
    /// locked, so that a record appended meanwhile is in it or appended to the new file.
    pub fn rewrite(&self, logged: impl FnOnce() -> Logged) {
        let mut file = self.file.lock();
        match write_new(&self.path, &logged()) {
            Ok((new, records)) => {
                *file = new;
                self.records
                    .store(records, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => tracing::warn!("node log {}: not rewritten: {e}", self.path.display()),
        }
    }
}

/// Writes a new log beside `path` and renames it over `path`; returns it open at its end
/// (appends are serialized by [`NodeLog`]'s lock).
fn write_new(path: &Path, logged: &Logged) -> std::io::Result<(File, usize)> {
    let tmp = path.with_extension("new");
    let mut buf = header_of(VERSION).to_vec();
    for (ino, handle) in &logged.nodes {
        buf.extend_from_slice(&node_record(*ino, handle));
    }
    for (fh, (ino, handle)) in &logged.opens {
        buf.extend_from_slice(&open_record(*fh, *ino, handle));
    }
    for unique in &logged.done {
        buf.extend_from_slice(&record(DONE, &[&unique.to_le_bytes()]));
    }
    let records = logged.nodes.len() + logged.opens.len() + logged.done.len();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&buf)?;
    std::fs::rename(&tmp, path)?;
    Ok((file, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodes");
        let mut first = Logged::default();
        first
            .nodes
            .insert(FuseIno(5), b"five".to_vec().into_boxed_slice());
        let log = NodeLog::create(&path, &first).unwrap();
        assert_eq!(log.append(FuseIno(7), b"seven"), 2);
        log.append(FuseIno(5), b"five again");
        log.append_open(1 << 48 | 3, FuseIno(7), b"seven");
        log.append_open(1 << 48 | 4, FuseIno(5), b"five again");
        log.append_closed(1 << 48 | 4);
        log.append_done(77);
        let logged = read(&path).unwrap();
        assert!(logged.done.contains(&77));
        assert_eq!(logged.nodes.len(), 2);
        assert_eq!(&*logged.nodes[&FuseIno(5)], b"five again");
        assert_eq!(&*logged.nodes[&FuseIno(7)], b"seven");
        assert_eq!(logged.opens.len(), 1, "the closed handle is gone");
        let (ino, handle) = &logged.opens[&(1 << 48 | 3)];
        assert_eq!((*ino, &**handle), (FuseIno(7), &b"seven"[..]));

        // A torn record (a partial write), and a damaged one: reading stops before them.
        let mut bytes = std::fs::read(&path).unwrap();
        let whole = bytes.len();
        bytes.extend_from_slice(&node_record(FuseIno(9), b"nine")[..7]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&path).unwrap().nodes.len(), 2);
        bytes.truncate(whole);
        let mut bad = node_record(FuseIno(9), b"nine");
        bad[10] ^= 1;
        bytes.extend_from_slice(&bad);
        std::fs::write(&path, &bytes).unwrap();
        assert!(!read(&path).unwrap().nodes.contains_key(&FuseIno(9)));

        // Rewritten from what is asked for; another format is refused; none is empty.
        log.rewrite(|| {
            let mut l = Logged::default();
            l.nodes
                .insert(FuseIno(7), b"seven".to_vec().into_boxed_slice());
            l.opens
                .insert(9, (FuseIno(7), b"seven".to_vec().into_boxed_slice()));
            l
        });
        let logged = read(&path).unwrap();
        assert_eq!((logged.nodes.len(), logged.opens.len()), (1, 1));
        std::fs::write(&path, b"OWSFSNOD\x03\0\0\0\0\0\0\0").unwrap();
        assert!(read(&path).is_err());
        assert!(read(&dir.path().join("none")).unwrap().nodes.is_empty());
    }

    /// A log an earlier owsfs wrote (version 1: node records without a kind) is read.
    #[test]
    fn a_version_1_log_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodes");
        let mut bytes = header_of(1).to_vec();
        let mut r = Vec::new();
        r.extend_from_slice(&12u32.to_le_bytes());
        r.extend_from_slice(&5u64.to_le_bytes());
        r.extend_from_slice(b"five");
        let crc = crc32c::crc32c(&r);
        r.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&r);
        std::fs::write(&path, &bytes).unwrap();
        let logged = read(&path).unwrap();
        assert_eq!(&*logged.nodes[&FuseIno(5)], b"five");
        assert!(logged.opens.is_empty());
    }
}
