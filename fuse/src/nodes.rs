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
//! Format (version 1), all integers little-endian:
//! - header, 16 bytes: `OWSFSNOD`, version `u32`, CRC-32C `u32` of the 12 bytes before it;
//! - records: length `u32` of the body, body = FUSE inode number `u64` then the handle's
//!   bytes, CRC-32C `u32` of the length and the body.
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
const VERSION: u32 = 1;
/// A handle is at most `MAX_HANDLE_SZ` (128) bytes.
const MAX_BODY: usize = 8 + 128;

/// The open log, appended to by the inode table.
pub struct NodeLog {
    path: PathBuf,
    file: Mutex<File>,
    /// Records in the file: when it passes twice what the table holds, the file is written
    /// again from the table ([`NodeLog::rewrite`]).
    records: std::sync::atomic::AtomicUsize,
}

fn header() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn record(ino: FuseIno, handle: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(4 + 8 + handle.len() + 4);
    r.extend_from_slice(&((8 + handle.len()) as u32).to_le_bytes());
    r.extend_from_slice(&ino.0.to_le_bytes());
    r.extend_from_slice(handle);
    let crc = crc32c::crc32c(&r);
    r.extend_from_slice(&crc.to_le_bytes());
    r
}

/// Reads a log: each node id's newest handle. A missing file reads as empty; a file of
/// another format is an error.
pub fn read(path: &Path) -> std::io::Result<HashMap<FuseIno, Box<[u8]>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e),
    };
    if bytes.len() < 16 || bytes[..16] != header() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a version {VERSION} node log", path.display()),
        ));
    }
    let mut nodes = HashMap::new();
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
        let ino = FuseIno(u64::from_le_bytes(body[..8].try_into().expect("8 bytes")));
        nodes.insert(ino, body[8..].to_vec().into_boxed_slice());
        at += 8 + len;
    }
    if at != bytes.len() {
        tracing::warn!(
            "{}: {} bytes after the last whole record were not read",
            path.display(),
            bytes.len() - at
        );
    }
    Ok(nodes)
}

impl NodeLog {
    /// Starts the log at `path` with `nodes` in it (none for a new connection), replacing
    /// what was there.
    pub fn create<'a>(
        path: &Path,
        nodes: impl IntoIterator<Item = (FuseIno, &'a [u8])>,
    ) -> std::io::Result<NodeLog> {
        let (file, records) = write_new(path, nodes)?;
        Ok(NodeLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            records: std::sync::atomic::AtomicUsize::new(records),
        })
    }

    /// Records that the kernel was handed inode `ino`, of backing handle `handle`. Returns
    /// how many records the file holds. A failed write is logged: the inode then goes stale
    /// only if this daemon dies while the kernel holds it.
    pub fn append(&self, ino: FuseIno, handle: &[u8]) -> usize {
        let r = record(ino, handle);
        let mut file = self.file.lock();
        if let Err(e) = file.write_all(&r) {
            tracing::warn!("node log {}: {e}", self.path.display());
        }
        self.records
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// Writes the file again with `nodes` only. `nodes` is called with the log locked, so
    /// that an inode appended meanwhile is in it or appended to the new file.
    pub fn rewrite<I>(&self, nodes: impl FnOnce() -> I)
    where
        I: IntoIterator<Item = (FuseIno, Box<[u8]>)>,
    {
        let mut file = self.file.lock();
        let all: Vec<(FuseIno, Box<[u8]>)> = nodes().into_iter().collect();
        match write_new(&self.path, all.iter().map(|(i, h)| (*i, &h[..]))) {
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
fn write_new<'a>(
    path: &Path,
    nodes: impl IntoIterator<Item = (FuseIno, &'a [u8])>,
) -> std::io::Result<(File, usize)> {
    let tmp = path.with_extension("new");
    let mut buf = header().to_vec();
    let mut records = 0;
    for (ino, handle) in nodes {
        buf.extend_from_slice(&record(ino, handle));
        records += 1;
    }
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
        let log = NodeLog::create(&path, [(FuseIno(5), &b"five"[..])]).unwrap();
        assert_eq!(log.append(FuseIno(7), b"seven"), 2);
        log.append(FuseIno(5), b"five again");
        let nodes = read(&path).unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(&*nodes[&FuseIno(5)], b"five again");
        assert_eq!(&*nodes[&FuseIno(7)], b"seven");

        // A torn record (a partial write), and a damaged one: reading stops before them.
        let mut bytes = std::fs::read(&path).unwrap();
        let whole = bytes.len();
        bytes.extend_from_slice(&record(FuseIno(9), b"nine")[..7]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&path).unwrap().len(), 2);
        bytes.truncate(whole);
        let mut bad = record(FuseIno(9), b"nine");
        bad[10] ^= 1;
        bytes.extend_from_slice(&bad);
        std::fs::write(&path, &bytes).unwrap();
        assert!(!read(&path).unwrap().contains_key(&FuseIno(9)));

        // Rewritten from what is asked for; another format is refused; none is empty.
        log.rewrite(|| vec![(FuseIno(7), b"seven".to_vec().into_boxed_slice())]);
        assert_eq!(read(&path).unwrap().len(), 1);
        std::fs::write(&path, b"OWSFSNOD\x02\0\0\0\0\0\0\0").unwrap();
        assert!(read(&path).is_err());
        assert!(read(&dir.path().join("none")).unwrap().is_empty());
    }
}
