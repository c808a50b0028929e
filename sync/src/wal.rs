//! SQLite write-ahead log parsing: the position a generation records for each database.
//!
//! Format (sqlite.org/fileformat2.html#walformat): a 32-byte header (magic, version, page
//! size, checkpoint sequence, two salts, a checksum of the first 24 bytes), then frames of a
//! 24-byte header (page number, database size in pages for a commit frame or 0, the two salts,
//! a cumulative checksum) and one page. A frame is valid when its salts match the header's and
//! its checksum continues the chain; SQLite replays frames up to the last valid commit frame.

pub use owsfs_store::generation::WalPosition;

const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;
const HEADER: usize = 32;
const FRAME_HEADER: usize = 24;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing from `s`.
fn checksum(big_endian: bool, data: &[u8], s: (u32, u32)) -> (u32, u32) {
    let (mut s0, mut s1) = s;
    for pair in data.chunks_exact(8) {
        let word = |b: &[u8]| {
            let a = [b[0], b[1], b[2], b[3]];
            if big_endian {
                u32::from_be_bytes(a)
            } else {
                u32::from_le_bytes(a)
            }
        };
        s0 = s0.wrapping_add(word(&pair[0..4])).wrapping_add(s1);
        s1 = s1.wrapping_add(word(&pair[4..8])).wrapping_add(s0);
    }
    (s0, s1)
}

/// Parses a WAL file's bytes. Returns None when the header is missing or invalid (an empty
/// or reset WAL): SQLite then ignores the file.
pub fn parse(wal: &[u8]) -> Option<WalPosition> {
    if wal.len() < HEADER {
        return None;
    }
    let magic = be32(wal, 0);
    let big_endian = match magic {
        MAGIC_BE => true,
        MAGIC_LE => false,
        _ => return None,
    };
    let page_size = be32(wal, 8);
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return None;
    }
    let (salt1, salt2) = (be32(wal, 16), be32(wal, 20));
    let mut s = checksum(big_endian, &wal[..24], (0, 0));
    if s != (be32(wal, 24), be32(wal, 28)) {
        return None;
    }
    let mut pos = WalPosition {
        last_commit_frame: 0,
        frames_valid: 0,
        salt1,
        salt2,
        checkpoint_seq: be32(wal, 12),
        page_size,
        db_pages: 0,
    };
    let frame_len = FRAME_HEADER + page_size as usize;
    let mut at = HEADER;
    let mut n = 0u32;
    while at + frame_len <= wal.len() {
        let fh = &wal[at..at + FRAME_HEADER];
        if be32(fh, 8) != salt1 || be32(fh, 12) != salt2 || be32(fh, 0) == 0 {
            break;
        }
        s = checksum(big_endian, &fh[..8], s);
        s = checksum(big_endian, &wal[at + FRAME_HEADER..at + frame_len], s);
        if s != (be32(fh, 16), be32(fh, 20)) {
            break;
        }
        n += 1;
        pos.frames_valid = n;
        let commit = be32(fh, 4);
        if commit != 0 {
            pos.last_commit_frame = n;
            pos.db_pages = commit;
        }
        at += frame_len;
    }
    Some(pos)
}

/// A database file's page count from its header (offset 28), when the header is SQLite's.
pub fn db_pages(head: &[u8]) -> Option<u32> {
    if head.len() < 32 || &head[..16] != b"SQLite format 3\0" {
        return None;
    }
    Some(be32(head, 28))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a WAL the way SQLite writes one (native little-endian checksums).
    fn wal(frames: &[(u32, u32)], page_size: u32) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(&MAGIC_LE.to_be_bytes());
        w.extend_from_slice(&3007000u32.to_be_bytes());
        w.extend_from_slice(&page_size.to_be_bytes());
        w.extend_from_slice(&7u32.to_be_bytes());
        w.extend_from_slice(&0x1111u32.to_be_bytes());
        w.extend_from_slice(&0x2222u32.to_be_bytes());
        let mut s = checksum(false, &w[..24], (0, 0));
        w.extend_from_slice(&s.0.to_be_bytes());
        w.extend_from_slice(&s.1.to_be_bytes());
        for (i, &(page, commit)) in frames.iter().enumerate() {
            let mut fh = Vec::new();
            fh.extend_from_slice(&page.to_be_bytes());
            fh.extend_from_slice(&commit.to_be_bytes());
            fh.extend_from_slice(&0x1111u32.to_be_bytes());
            fh.extend_from_slice(&0x2222u32.to_be_bytes());
            let data = vec![i as u8; page_size as usize];
            s = checksum(false, &fh[..8], s);
            s = checksum(false, &data, s);
            fh.extend_from_slice(&s.0.to_be_bytes());
            fh.extend_from_slice(&s.1.to_be_bytes());
            w.extend_from_slice(&fh);
            w.extend_from_slice(&data);
        }
        w
    }

    #[test]
    fn finds_the_last_commit_frame_and_stops_at_damage() {
        let w = wal(&[(1, 0), (2, 5), (3, 0), (4, 6), (5, 0)], 512);
        let p = parse(&w).unwrap();
        assert_eq!((p.last_commit_frame, p.frames_valid, p.db_pages), (4, 5, 6));
        assert_eq!((p.salt1, p.salt2, p.checkpoint_seq), (0x1111, 0x2222, 7));
        // A flipped byte in frame 4's page breaks the chain there.
        let mut bad = w.clone();
        bad[HEADER + 3 * (FRAME_HEADER + 512) + FRAME_HEADER + 9] ^= 1;
        let p = parse(&bad).unwrap();
        assert_eq!((p.last_commit_frame, p.frames_valid, p.db_pages), (2, 3, 5));
        // A torn last frame is not counted.
        let p = parse(&w[..w.len() - 100]).unwrap();
        assert_eq!((p.last_commit_frame, p.frames_valid), (4, 4));
        assert!(parse(&w[..20]).is_none());
        let mut bad_header = w.clone();
        bad_header[13] ^= 1;
        assert!(parse(&bad_header).is_none());
    }
}
