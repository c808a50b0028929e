//! Segment files: naming, the header, creation and removal.
//!
//! A segment is `DIR/NNNNNNNNNNNNNNNNNNNN.seg` (20-digit segment number) holding a 60-byte
//! header followed by records. New segments are written under a `.tmp` name and renamed into
//! place, so after a process crash a `.seg` file always has a whole header and first record.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::JournalError;
use crate::op::Seq;
use crate::record;
use crate::state::DirtyState;

pub(crate) const MAGIC: &[u8; 8] = b"OWSJRNL1";
/// Format version written in every header. Bump it for any change a version-1 reader would
/// misread; a reader refuses (rescans) any other version.
pub(crate) const VERSION: u32 = 1;
pub(crate) const BOOT_ID_LEN: usize = 36;
/// magic 8 | version 4 | segment 8 | boot id 36 | crc32c 4.
pub(crate) const HEADER_LEN: usize = 8 + 4 + 8 + BOOT_ID_LEN + 4;
const SEG_SUFFIX: &str = ".seg";
const TMP_SUFFIX: &str = ".seg.tmp";

/// The kernel's boot id as stored in segment headers: the 36-byte UUID string, NUL-padded
/// when a test supplies a shorter one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct BootId([u8; BOOT_ID_LEN]);

impl BootId {
    pub(crate) fn parse(id: &str) -> Result<BootId, JournalError> {
        let bytes = id.as_bytes();
        if bytes.len() > BOOT_ID_LEN {
            return Err(JournalError::InvalidBootId { id: id.to_owned() });
        }
        let mut b = [0; BOOT_ID_LEN];
        b[..bytes.len()].copy_from_slice(bytes);
        Ok(BootId(b))
    }

    /// `configured` if given, else the running kernel's boot id.
    pub(crate) fn resolve(configured: Option<&str>) -> Result<BootId, JournalError> {
        match configured {
            Some(id) => BootId::parse(id),
            None => BootId::parse(&owsfs_sys::process::boot_id()),
        }
    }
}

impl fmt::Display for BootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(BOOT_ID_LEN);
        f.write_str(&String::from_utf8_lossy(&self.0[..end]))
    }
}

impl fmt::Debug for BootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootId({self})")
    }
}

pub(crate) fn encode_header(segment: u64, boot: BootId) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&segment.to_le_bytes());
    h[20..56].copy_from_slice(&boot.0);
    let crc = crc32c::crc32c(&h[..56]);
    h[56..60].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks the header at the start of `buf` for segment `segment`; returns the boot id that
/// wrote it, or why it is unusable.
pub(crate) fn decode_header(buf: &[u8], segment: u64) -> Result<BootId, String> {
    if buf.len() < HEADER_LEN {
        return Err(format!(
            "file is {} bytes, shorter than the {HEADER_LEN}-byte header",
            buf.len()
        ));
    }
    let h = &buf[..HEADER_LEN];
    if &h[0..8] != MAGIC {
        return Err(format!(
            "bad magic {:?} (expected {:?})",
            String::from_utf8_lossy(&h[0..8]),
            String::from_utf8_lossy(MAGIC)
        ));
    }
    let stored = u32::from_le_bytes([h[56], h[57], h[58], h[59]]);
    let actual = crc32c::crc32c(&h[..56]);
    if stored != actual {
        return Err(format!(
            "header checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
        ));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != VERSION {
        return Err(format!(
            "unknown format version {version} (this build reads version {VERSION})"
        ));
    }
    let mut n = [0; 8];
    n.copy_from_slice(&h[12..20]);
    let n = u64::from_le_bytes(n);
    if n != segment {
        return Err(format!(
            "header names segment {n}, the file name says {segment}"
        ));
    }
    let mut boot = [0; BOOT_ID_LEN];
    boot.copy_from_slice(&h[20..56]);
    Ok(BootId(boot))
}

pub(crate) fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}{SEG_SUFFIX}"))
}

fn parse_segment_name(name: &OsStr) -> Option<u64> {
    let digits = name.to_str()?.strip_suffix(SEG_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments in `dir`, oldest first.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let list_err = |e| JournalError::io("list journal directory", dir, e);
    let mut segs = Vec::new();
    for entry in fs::read_dir(dir).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        if let Some(n) = parse_segment_name(&entry.file_name()) {
            segs.push((n, entry.path()));
        }
    }
    segs.sort_unstable_by_key(|&(n, _)| n);
    Ok(segs)
}

/// Removes `.seg.tmp` files left by a crash while a segment was being created.
pub(crate) fn remove_temporaries(dir: &Path) -> Result<(), JournalError> {
    let list_err = |e| JournalError::io("list journal directory", dir, e);
    for entry in fs::read_dir(dir).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(TMP_SUFFIX))
        {
            let path = entry.path();
            fs::remove_file(&path)
                .map_err(|e| JournalError::io("remove unfinished segment", path, e))?;
            // Crash window: some leftovers removed, others not yet.
            fail::fail_point!("journal-open-cleanup-midway");
        }
    }
    Ok(())
}

/// Creates segment `n` holding the header and a Snapshot of `state` as of `seq`, and returns
/// it opened for appending with its length. It is written under a temporary name and renamed,
/// so a crash leaves either no segment `n` or a whole one. Nothing is synced: see FORMAT.md
/// for why that is enough. `before_rename` names the fail point between the write and the
/// rename (the caller's crash window: FORMAT.md, "Crash windows and their fail points").
pub(crate) fn create_segment(
    dir: &Path,
    n: u64,
    boot: BootId,
    seq: Seq,
    state: &DirtyState,
    before_rename: &str,
) -> Result<(File, u64), JournalError> {
    let mut buf = encode_header(n, boot).to_vec();
    record::encode_snapshot(&mut buf, seq, state)?;
    let path = segment_path(dir, n);
    let tmp = dir.join(format!("{n:020}{TMP_SUFFIX}"));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(JournalError::io("remove unfinished segment", tmp, e)),
    }
    let mut file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| JournalError::io("create segment", &tmp, e))?;
    let written = file
        .write_all(&buf)
        .map_err(|e| JournalError::io("write segment snapshot to", &tmp, e))
        .and_then(|()| {
            fail::fail_point!(before_rename);
            fs::rename(&tmp, &path)
                .map_err(|e| JournalError::io("rename new segment into", &path, e))
        });
    if let Err(e) = written {
        // Give the space back at once (a full disk is the usual cause); the current segment
        // stays in use.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((file, buf.len() as u64))
}

/// Appends a batch of encoded records to the segment with one `write_all`.
///
/// The fail point `journal-batch-torn` is a crash part way through that write. Reaching it
/// takes a lookup in the fail point registry (`fail::list`, empty unless a test configured
/// a point), and only when it is configured is the batch written in two parts: up to the
/// middle of the record around the batch's middle, the point, then the rest.
pub(crate) fn append_records(file: &File, bytes: &[u8]) -> io::Result<()> {
    let mut file = file;
    if fail::list()
        .iter()
        .any(|(name, _)| name == "journal-batch-torn")
    {
        let torn = torn_len(bytes);
        file.write_all(&bytes[..torn])?;
        fail::fail_point!("journal-batch-torn");
        return file.write_all(&bytes[torn..]);
    }
    file.write_all(bytes)
}

/// A length of `batch` (whole records) that ends inside a record: in the middle of the one
/// that holds the batch's middle byte. The records before it are whole, it is torn.
pub(crate) fn torn_len(batch: &[u8]) -> usize {
    let middle = batch.len() / 2;
    let mut start = 0;
    while start + 8 <= batch.len() {
        let len = u32::from_le_bytes([
            batch[start],
            batch[start + 1],
            batch[start + 2],
            batch[start + 3],
        ]) as usize;
        let end = start + 8 + len;
        if end > middle || end >= batch.len() {
            return start + (end.min(batch.len()) - start) / 2;
        }
        start = end;
    }
    middle
}

/// Allocates disk space for `[offset, offset + len)` of `file` without changing its size
/// (`FALLOC_FL_KEEP_SIZE`): later writes into that range need no free space, and readers
/// see nothing of it.
pub(crate) fn preallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    owsfs_sys::fs::preallocate(file, offset, len)
}

/// Removes every segment numbered below `n`. They are superseded by the snapshot at the start
/// of segment `n`, so a failure only wastes space and is logged, not returned.
pub(crate) fn remove_segments_before(dir: &Path, n: u64) {
    let segs = match list_segments(dir) {
        Ok(segs) => segs,
        Err(e) => {
            tracing::warn!("journal: could not remove old segments: {e}");
            return;
        }
    };
    for (m, path) in segs.into_iter().filter(|&(m, _)| m < n) {
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(
                "journal: could not remove old segment {m} ({}): {e}; it is superseded by \
                 segment {n} and can be deleted by hand",
                path.display()
            );
        }
    }
}

/// fsync of a directory, so that creations, renames and removals in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| JournalError::io("fsync journal directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_is_60_bytes() {
        let boot = BootId::parse("4f3c2d6e-0000-4000-8000-123456789abc").unwrap();
        let h = encode_header(7, boot);
        assert_eq!(h.len(), 60);
        assert_eq!(decode_header(&h, 7).unwrap(), boot);
        assert!(
            decode_header(&h, 8)
                .unwrap_err()
                .contains("file name says 8")
        );
    }

    #[test]
    fn header_damage_is_reported() {
        let boot = BootId::parse("b").unwrap();
        let h = encode_header(1, boot);
        assert!(decode_header(&h[..59], 1).unwrap_err().contains("shorter"));
        let mut bad = h;
        bad[0] = b'X';
        assert!(decode_header(&bad, 1).unwrap_err().contains("magic"));
        let mut bad = h;
        bad[30] ^= 1;
        assert!(decode_header(&bad, 1).unwrap_err().contains("checksum"));
        let mut v2 = h;
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&v2[..56]);
        v2[56..60].copy_from_slice(&crc.to_le_bytes());
        assert!(
            decode_header(&v2, 1)
                .unwrap_err()
                .contains("unknown format version 2")
        );
    }

    #[test]
    fn boot_ids() {
        assert!(BootId::parse(&"x".repeat(37)).is_err());
        assert_eq!(BootId::parse("abc").unwrap().to_string(), "abc");
        assert_ne!(BootId::parse("a").unwrap(), BootId::parse("b").unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(BootId::resolve(None).unwrap().to_string().len(), 36);
    }

    #[test]
    fn a_torn_batch_ends_inside_the_record_at_its_middle() {
        let mut batch = Vec::new();
        let mut ends = Vec::new();
        for len in [100, 7, 300, 20] {
            record::encode_op(
                &mut batch,
                1,
                &crate::op::Op::Touch {
                    ino: crate::FuseIno(1),
                    path: Some(PathBuf::from("x".repeat(len))),
                },
            )
            .unwrap();
            ends.push(batch.len());
        }
        let torn = torn_len(&batch);
        // The middle byte is in the third record, which is cut in its middle.
        assert!(ends[1] <= batch.len() / 2 && batch.len() / 2 < ends[2]);
        assert_eq!(torn, ends[1] + (ends[2] - ends[1]) / 2);
        let one = &batch[..ends[0]];
        assert!(torn_len(one) > 0 && torn_len(one) < one.len());
    }

    #[test]
    fn names() {
        let p = segment_path(Path::new("/j"), 42);
        assert_eq!(p, Path::new("/j/00000000000000000042.seg"));
        assert_eq!(parse_segment_name(p.file_name().unwrap()), Some(42));
        for bad in [
            "42.seg",
            "00000000000000000042.seg.tmp",
            "0000000000000000004x.seg",
            "CLEAN",
        ] {
            assert_eq!(parse_segment_name(OsStr::new(bad)), None, "{bad}");
        }
    }
}
