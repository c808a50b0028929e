//! The range arithmetic of hydration, as free functions with property tests against byte-map
//! models: what a file still misses, which chunks a range needs, which bytes a newer
//! generation left unchanged, and how adjacent chunks of one pack coalesce into one read.

use std::ops::Range;

use owsfs_journal::ExtentSet;
use owsfs_store::{BlobRef, ChunkSpan};

/// Bytes of `[0, end)` that `present` does not hold.
pub fn missing_below(present: &ExtentSet, end: u64) -> u64 {
    let held: u64 = present
        .iter()
        .map(|(s, e)| e.min(end).saturating_sub(s))
        .sum();
    end - held.min(end)
}

/// Whether `present` holds every byte of `[0, end)`.
pub fn whole_below(present: &ExtentSet, end: u64) -> bool {
    present.gaps(0, end).is_empty()
}

/// The bytes in both sets.
pub fn intersect(a: &ExtentSet, b: &ExtentSet) -> ExtentSet {
    let mut out = ExtentSet::new();
    for (s, e) in a.iter() {
        let mut at = s;
        for (gs, ge) in b.gaps(s, e) {
            if gs > at {
                out.insert(at, gs);
            }
            at = ge;
        }
        if at < e {
            out.insert(at, e);
        }
    }
    out
}

/// `set` cut at `end`.
pub fn clip(set: &ExtentSet, end: u64) -> ExtentSet {
    let mut out = ExtentSet::new();
    for (s, e) in set.iter() {
        if s < end {
            out.insert(s, e.min(end));
        }
    }
    out
}

/// The byte ranges where two chunkings of a file hold the same chunk at the same offset
/// (both span lists sorted by offset, as a file's chunks are).
pub fn same_chunks(a: &[ChunkSpan], b: &[ChunkSpan]) -> ExtentSet {
    let mut same = ExtentSet::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (&a[i], &b[j]);
        if x.offset == y.offset {
            if x.r.id == y.r.id && x.r.len == y.r.len {
                same.insert(x.offset, x.end());
            }
            i += 1;
            j += 1;
        } else if x.offset < y.offset {
            i += 1;
        } else {
            j += 1;
        }
    }
    same
}

/// The chunks of `spans` (sorted by offset) that overlap `[start, end)` and miss a byte of
/// `present` below `valid_end` (bytes from `valid_end` on never come from the store), in
/// order, until `budget` bytes of chunks are taken; `budget` is lowered by what is taken.
pub fn missing_chunks(
    spans: &[ChunkSpan],
    start: u64,
    end: u64,
    valid_end: u64,
    present: &ExtentSet,
    budget: &mut u64,
) -> Vec<ChunkSpan> {
    let mut out = Vec::new();
    for s in spans {
        if *budget == 0 || s.offset >= end {
            break;
        }
        if s.end() <= start {
            continue;
        }
        let clip_end = s.end().min(valid_end);
        if s.offset < clip_end && !present.gaps(s.offset, clip_end).is_empty() {
            out.push(*s);
            *budget = budget.saturating_sub(s.r.len as u64);
        }
    }
    out
}

/// Splits `refs` into runs that one ranged read can fetch: blobs of one pack, each starting
/// where the previous ends, at most `max_run` bytes from the first's start (a run always holds
/// at least one blob).
pub fn runs(refs: &[BlobRef], max_run: u64) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut k = 0;
    while k < refs.len() {
        let first = refs[k];
        let mut end = first.end();
        let mut j = k + 1;
        while j < refs.len() {
            let r = refs[j];
            if r.pack != first.pack || r.offset != end || end - first.offset >= max_run {
                break;
            }
            end = r.end();
            j += 1;
        }
        out.push(k..j);
        k = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use owsfs_store::{BlobId, PackId};
    use proptest::prelude::*;

    use super::*;

    /// Files of at most this many bytes: the models are byte maps.
    const LEN: u64 = 256;

    fn set_of(ranges: &[(u64, u64)]) -> ExtentSet {
        let mut s = ExtentSet::new();
        for &(a, b) in ranges {
            let (a, b) = (a.min(b), a.max(b));
            if a < b {
                s.insert(a, b);
            }
        }
        s
    }

    fn bytes_of(s: &ExtentSet) -> Vec<bool> {
        let mut v = vec![false; LEN as usize];
        for (a, b) in s.iter() {
            for x in a..b.min(LEN) {
                v[x as usize] = true;
            }
        }
        v
    }

    fn ranges() -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((0..LEN, 0..LEN), 0..8)
    }

    /// Chunk lengths covering a file, with ids from a small alphabet (so equal chunks occur).
    fn chunking() -> impl Strategy<Value = Vec<(u32, u8)>> {
        prop::collection::vec((1u32..40, 0u8..3), 0..10)
    }

    fn spans(chunks: &[(u32, u8)], pack: u8) -> Vec<ChunkSpan> {
        let mut at = 0;
        chunks
            .iter()
            .map(|&(len, id)| {
                let s = ChunkSpan {
                    r: BlobRef::plain(BlobId([id; 32]), PackId([pack; 32]), at, len),
                    offset: at,
                };
                at += len as u64;
                s
            })
            .collect()
    }

    fn cases() -> ProptestConfig {
        let cases = std::env::var("OWSFS_PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256);
        ProptestConfig::with_cases(cases)
    }

    proptest! {
        #![proptest_config(cases())]

        #[test]
        fn missing_and_whole_count_absent_bytes(r in ranges(), end in 0..LEN) {
            let s = set_of(&r);
            let held = bytes_of(&s);
            let absent = held[..end as usize].iter().filter(|b| !**b).count() as u64;
            prop_assert_eq!(missing_below(&s, end), absent);
            prop_assert_eq!(whole_below(&s, end), absent == 0);
        }

        #[test]
        fn intersect_and_clip_match_byte_maps(a in ranges(), b in ranges(), end in 0..LEN) {
            let (sa, sb) = (set_of(&a), set_of(&b));
            let (ba, bb) = (bytes_of(&sa), bytes_of(&sb));
            let both: Vec<bool> = ba.iter().zip(&bb).map(|(x, y)| *x && *y).collect();
            prop_assert_eq!(bytes_of(&intersect(&sa, &sb)), both);
            let cut: Vec<bool> = ba.iter().enumerate().map(|(i, x)| *x && (i as u64) < end).collect();
            prop_assert_eq!(bytes_of(&clip(&sa, end)), cut);
        }

        #[test]
        fn same_chunks_are_equal_chunks_at_equal_offsets(a in chunking(), b in chunking()) {
            let (sa, sb) = (spans(&a, 1), spans(&b, 1));
            let same = bytes_of(&same_chunks(&sa, &sb));
            let mut want = vec![false; LEN as usize];
            for x in &sa {
                if sb.iter().any(|y| y.offset == x.offset && y.r.id == x.r.id && y.r.len == x.r.len) {
                    for i in x.offset..x.end().min(LEN) {
                        want[i as usize] = true;
                    }
                }
            }
            prop_assert_eq!(same, want);
        }

        #[test]
        fn missing_chunks_are_the_overlapping_ones_with_a_hole(
            c in chunking(), present in ranges(), start in 0..LEN, len in 0..LEN,
            valid_end in 0..LEN, limit in 1u64..200,
        ) {
            let sp = spans(&c, 1);
            let p = set_of(&present);
            let held = bytes_of(&p);
            let end = start + len;
            let mut budget = limit;
            let got = missing_chunks(&sp, start, end, valid_end, &p, &mut budget);
            // The model: every chunk overlapping the range with an absent byte below
            // valid_end, in order, until the budget is spent.
            let mut want = Vec::new();
            let mut left = limit;
            for s in &sp {
                if left == 0 {
                    break;
                }
                let overlaps = s.offset < end && s.end() > start;
                let hole = (s.offset..s.end().min(valid_end)).any(|i| i >= LEN || !held[i as usize]);
                if overlaps && hole {
                    want.push(*s);
                    left = left.saturating_sub(s.r.len as u64);
                }
            }
            prop_assert_eq!(got, want);
            prop_assert_eq!(budget, left);
        }

        #[test]
        fn runs_are_maximal_contiguous_and_bounded(
            c in chunking(), split in prop::collection::vec(any::<bool>(), 0..10), max_run in 1u64..100,
        ) {
            // Blobs in one or two packs; a `split` moves the rest to a gap or another pack.
            let mut refs: Vec<BlobRef> = spans(&c, 1).into_iter().map(|s| s.r).collect();
            for (i, cut) in split.iter().enumerate() {
                if *cut && i < refs.len() {
                    for r in refs[i..].iter_mut() {
                        if i % 2 == 0 { r.offset += 1 } else { r.pack = PackId([2; 32]) }
                    }
                }
            }
            let rs = runs(&refs, max_run);
            // A partition of the blobs, in order.
            let flat: Vec<usize> = rs.iter().flat_map(|r| r.clone()).collect();
            prop_assert_eq!(flat, (0..refs.len()).collect::<Vec<_>>());
            for r in &rs {
                prop_assert!(!r.is_empty());
                let first = refs[r.start];
                for w in refs[r.clone()].windows(2) {
                    prop_assert!(w[1].pack == first.pack && w[1].offset == w[0].end());
                }
                // Every blob but the first starts within max_run of the run's start.
                for b in &refs[r.start + 1..r.end] {
                    prop_assert!(b.offset - first.offset < max_run);
                }
                // Maximal: the next blob could not have joined.
                if r.end < refs.len() {
                    let last = refs[r.end - 1];
                    let next = refs[r.end];
                    let end = last.end();
                    prop_assert!(next.pack != first.pack || next.offset != end || end - first.offset >= max_run);
                }
            }
        }
    }
}
