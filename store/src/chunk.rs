//! Content-defined chunking (FastCDC 2020) of whole files, and incremental re-chunking of a
//! changed file that reads and emits only the chunks around the changes while producing
//! exactly the chunks whole-file chunking would.
//!
//! A FastCDC cut decision starting at offset `a` reads bytes `[a, min(b + 1, a + MAX))`
//! where `b` is the cut (the hash includes the byte at the cut position), and depends on the
//! remaining length when fewer than `MAX` bytes remain. [`rechunk`] reuses an old chunk only
//! when both are provably the same in the new file; everything else is chunked again.

use std::io::{self, Read};
use std::ops::Range;

use crate::error::{Result, StoreError};
use crate::pack::BlobRef;
use crate::tree::ChunkSpan;

/// Smallest chunk (except a file's last). Changing these constants changes chunk ids.
pub const MIN_CHUNK: usize = 16 * 1024;
/// Target average chunk size (a power of two).
pub const AVG_CHUNK: usize = 64 * 1024;
/// Largest chunk.
pub const MAX_CHUNK: usize = 256 * 1024;

/// The length of the chunk starting at `buf[0]`. `buf` must hold `MAX_CHUNK` bytes, or
/// everything up to the end of the file.
pub fn cut(buf: &[u8]) -> usize {
    if buf.is_empty() {
        return 0;
    }
    let c = fastcdc::v2020::FastCDC::new(buf, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
    c.cut(0, buf.len()).1
}

/// Chunk boundaries of an in-memory buffer (the reference chunking).
pub fn chunk_ranges(data: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + MAX_CHUNK).min(data.len());
        let n = cut(&data[pos..end]);
        out.push(pos..pos + n);
        pos += n;
    }
    out
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Chunks a whole file from a reader; `emit` stores each chunk (or finds it stored).
/// `what` names the file in errors.
pub fn chunk_reader(
    what: &str,
    r: &mut dyn Read,
    emit: &mut dyn FnMut(&[u8]) -> Result<BlobRef>,
) -> Result<Vec<ChunkSpan>> {
    let mut buf = vec![0u8; 2 * MAX_CHUNK];
    let mut have = 0; // valid bytes in buf
    let mut start = 0; // first unconsumed byte in buf
    let mut eof = false;
    let mut offset = 0u64;
    let mut out = Vec::new();
    loop {
        if !eof && have - start < MAX_CHUNK {
            buf.copy_within(start..have, 0);
            have -= start;
            start = 0;
            let n = read_full(r, &mut buf[have..])
                .map_err(|e| StoreError::io(format!("cannot read {what}"), e))?;
            if n < buf.len() - have {
                eof = true;
            }
            have += n;
        }
        if start == have {
            break;
        }
        let end = (start + MAX_CHUNK).min(have);
        let n = cut(&buf[start..end]);
        let r = emit(&buf[start..start + n])?;
        out.push(ChunkSpan { r, offset });
        offset += n as u64;
        start += n;
    }
    Ok(out)
}

/// A window over the new file content, so consecutive cuts do not re-read bytes.
struct Window<'a> {
    read_at: &'a mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    start: u64,
    buf: Vec<u8>,
    file_len: u64,
    bytes_read: u64,
}

impl Window<'_> {
    /// Bytes `[pos, min(pos + MAX_CHUNK, file_len))`.
    fn get(&mut self, pos: u64) -> io::Result<&[u8]> {
        let want_end = (pos + MAX_CHUNK as u64).min(self.file_len);
        let have_end = self.start + self.buf.len() as u64;
        if pos < self.start || pos > have_end {
            self.start = pos;
            self.buf.clear();
        } else {
            self.buf.drain(..(pos - self.start) as usize);
            self.start = pos;
        }
        let have_end = self.start + self.buf.len() as u64;
        if have_end < want_end {
            let old = self.buf.len();
            self.buf.resize((want_end - self.start) as usize, 0);
            (self.read_at)(have_end, &mut self.buf[old..])?;
            self.bytes_read += want_end - have_end;
        }
        Ok(&self.buf[..(want_end - pos) as usize])
    }
}

/// Sorted, disjoint byte ranges; answers "is this range free of changes".
struct Changes<'a> {
    dirty: &'a [Range<u64>],
    /// Bytes at and after this offset may differ (the shorter length).
    common: u64,
}

impl Changes<'_> {
    fn clean(&self, r: Range<u64>) -> bool {
        if r.end > self.common {
            return false;
        }
        // First dirty range that ends after r.start.
        let i = self.dirty.partition_point(|d| d.end <= r.start);
        self.dirty.get(i).is_none_or(|d| d.start >= r.end)
    }
}

/// Statistics of one [`rechunk`] call.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RechunkStats {
    pub bytes_read: u64,
    pub chunks_reused: u64,
    pub chunks_emitted: u64,
}

/// Re-chunks a changed file. `old` are the chunks of the previous version (length
/// `old_len`); `dirty` lists, in new-file coordinates, sorted and disjoint, every byte range
/// that may differ from the old version (below `min(old_len, new_len)`; bytes past `old_len`
/// are always treated as new). `read_at` reads the new content. The result equals
/// whole-file chunking of the new content: same boundaries, same ids.
pub fn rechunk(
    old: &[ChunkSpan],
    old_len: u64,
    new_len: u64,
    dirty: &[Range<u64>],
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    emit: &mut dyn FnMut(&[u8]) -> Result<BlobRef>,
) -> Result<Vec<ChunkSpan>> {
    rechunk_with_stats(old, old_len, new_len, dirty, read_at, emit).map(|(v, _)| v)
}

/// [`rechunk`], also returning what it read and reused.
pub fn rechunk_with_stats(
    old: &[ChunkSpan],
    old_len: u64,
    new_len: u64,
    dirty: &[Range<u64>],
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    emit: &mut dyn FnMut(&[u8]) -> Result<BlobRef>,
) -> Result<(Vec<ChunkSpan>, RechunkStats)> {
    let mut expect = 0u64;
    for s in old {
        if s.offset != expect || s.r.len == 0 {
            return Err(StoreError::Invalid(format!(
                "rechunk: old chunks are not contiguous at offset {expect}"
            )));
        }
        expect = s.end();
    }
    if expect != old_len {
        return Err(StoreError::Invalid(format!(
            "rechunk: old chunks cover {expect} bytes, old length is {old_len}"
        )));
    }
    for w in dirty.windows(2) {
        if w[0].end > w[1].start {
            return Err(StoreError::Invalid(
                "rechunk: dirty ranges overlap or are unsorted".into(),
            ));
        }
    }
    let changes = Changes {
        dirty,
        common: old_len.min(new_len),
    };
    let max = MAX_CHUNK as u64;
    // Can the old chunk [a, b) be taken as is at new position a?
    let reusable = |s: &ChunkSpan| -> bool {
        let (a, b) = (s.offset, s.end());
        if old_len == new_len {
            // Same remaining length: the decision reads [a, min(b + 1, a + MAX, len)).
            let need = (b + 1).min(a + max).min(new_len);
            changes.clean(a..need)
        } else {
            // Different remaining length: reusable only where both versions have at least
            // MAX bytes left, so the length cannot affect the decision.
            a + max <= old_len.min(new_len) && changes.clean(a..(b + 1).min(a + max))
        }
    };
    let mut win = Window {
        read_at,
        start: 0,
        buf: Vec::new(),
        file_len: new_len,
        bytes_read: 0,
    };
    let mut stats = RechunkStats::default();
    let mut out = Vec::with_capacity(old.len() + 2);
    let mut pos = 0u64;
    let mut i = 0usize; // old chunk that starts at pos, if i < old.len() && old[i].offset == pos
    while pos < new_len {
        if i < old.len() && old[i].offset == pos && reusable(&old[i]) {
            out.push(old[i]);
            pos = old[i].end();
            i += 1;
            stats.chunks_reused += 1;
            continue;
        }
        let data = win
            .get(pos)
            .map_err(|e| StoreError::io(format!("rechunk: cannot read at offset {pos}"), e))?;
        let n = cut(data);
        let r = emit(&data[..n])?;
        debug_assert_eq!(r.len as usize, n);
        out.push(ChunkSpan { r, offset: pos });
        stats.chunks_emitted += 1;
        pos += n as u64;
        i = old.partition_point(|s| s.offset < pos);
    }
    stats.bytes_read = win.bytes_read;
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_matches_the_fastcdc_iterator() {
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let ours = chunk_ranges(&data);
        let theirs: Vec<_> = fastcdc::v2020::FastCDC::new(&data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
            .map(|c| c.offset..c.offset + c.length)
            .collect();
        assert_eq!(ours, theirs);
        assert!(ours.len() > 10);
    }
}
