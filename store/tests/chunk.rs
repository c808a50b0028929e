//! Incremental re-chunking equals whole-file chunking, and costs only the changed chunks.

use std::cell::Cell;
use std::io;
use std::ops::Range;

use owsfs_store::chunk::{MAX_CHUNK, chunk_ranges, chunk_reader, rechunk, rechunk_with_stats};
use owsfs_store::pack::BlobRef;
use owsfs_store::tree::ChunkSpan;
use owsfs_store::{BlobId, PackId, Result};
use proptest::prelude::*;

fn fill(seed: u64, len: usize, low_entropy: bool) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            if low_entropy && (i / 100_000) % 2 == 0 {
                return (i % 7) as u8;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn emit_ref(d: &[u8]) -> Result<BlobRef> {
    Ok(BlobRef::plain(
        BlobId::of(d),
        PackId::default(),
        0,
        d.len() as u32,
    ))
}

fn spans_of(data: &[u8]) -> Vec<ChunkSpan> {
    chunk_ranges(data)
        .into_iter()
        .map(|r| ChunkSpan {
            r: emit_ref(&data[r.clone()]).unwrap(),
            offset: r.start as u64,
        })
        .collect()
}

fn ranges_of(changed: &[bool], below: usize) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, &c) in changed[..below].iter().enumerate() {
        if c {
            match out.last_mut() {
                Some(r) if r.end == i as u64 => r.end += 1,
                _ => out.push(i as u64..i as u64 + 1),
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Edit {
    Overwrite { at: f64, len: usize, seed: u64 },
    Append { len: usize, seed: u64 },
    Truncate { to: f64 },
}

fn arb_edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (0.0..1.0f64, 1usize..40_000, any::<u64>()).prop_map(|(at, len, seed)| Edit::Overwrite { at, len, seed }),
        1 => (1usize..300_000, any::<u64>()).prop_map(|(len, seed)| Edit::Append { len, seed }),
        1 => (0.0..1.0f64).prop_map(|to| Edit::Truncate { to }),
    ]
}

fn check(old: &[u8], edits: &[Edit]) {
    let mut new = old.to_vec();
    let mut changed = vec![false; old.len()];
    for e in edits {
        match e {
            Edit::Overwrite { at, len, seed } => {
                let at = (at * new.len() as f64) as usize;
                let bytes = fill(*seed, *len, false);
                if new.len() < at + len {
                    new.resize(at + len, 0);
                    changed.resize(at + len, true);
                }
                new[at..at + len].copy_from_slice(&bytes);
                changed[at..at + len].iter_mut().for_each(|c| *c = true);
            }
            Edit::Append { len, seed } => {
                new.extend(fill(*seed, *len, false));
                changed.resize(new.len(), true);
            }
            Edit::Truncate { to } => {
                let to = (to * new.len() as f64) as usize;
                new.truncate(to);
                changed.truncate(to);
            }
        }
    }
    let common = old.len().min(new.len());
    let dirty = ranges_of(&changed, common);
    let old_spans = spans_of(old);
    let got = rechunk(
        &old_spans,
        old.len() as u64,
        new.len() as u64,
        &dirty,
        &mut |off, buf| {
            buf.copy_from_slice(&new[off as usize..off as usize + buf.len()]);
            Ok(())
        },
        &mut emit_ref,
    )
    .unwrap();
    assert_eq!(got, spans_of(&new), "edits {edits:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn rechunk_equals_whole_file_chunking(
        seed in any::<u64>(),
        len in 0usize..1_500_000,
        low in any::<bool>(),
        edits in proptest::collection::vec(arb_edit(), 0..4),
    ) {
        let old = fill(seed, len, low);
        check(&old, &edits);
    }
}

#[test]
fn rechunk_edge_cases() {
    let old = fill(1, 1_000_000, false);
    check(&old, &[]);
    check(&old, &[Edit::Truncate { to: 0.0 }]);
    check(
        &[],
        &[Edit::Append {
            len: 500_000,
            seed: 2,
        }],
    );
    check(
        &old,
        &[Edit::Overwrite {
            at: 0.0,
            len: 1,
            seed: 3,
        }],
    );
    check(
        &old,
        &[Edit::Overwrite {
            at: 0.999999,
            len: 1,
            seed: 3,
        }],
    );
    let zeros = vec![0u8; 2_000_000];
    check(
        &zeros,
        &[Edit::Overwrite {
            at: 0.5,
            len: 10,
            seed: 4,
        }],
    );
    check(&zeros, &[Edit::Append { len: 10, seed: 4 }]);
    check(&zeros, &[Edit::Truncate { to: 0.7 }]);
}

#[test]
fn small_overwrite_in_a_large_file_costs_about_one_chunk() {
    let len = 64 << 20;
    let old = fill(42, len, false);
    let old_spans = spans_of(&old);
    let mut new = old.clone();
    let at = 40_000_000;
    new[at..at + 4096].copy_from_slice(&fill(9, 4096, false));
    let emitted = Cell::new(0);
    let dirty: Vec<Range<u64>> = std::iter::once(at as u64..at as u64 + 4096).collect();
    let (got, stats) = rechunk_with_stats(
        &old_spans,
        len as u64,
        len as u64,
        &dirty,
        &mut |off, buf| {
            buf.copy_from_slice(&new[off as usize..off as usize + buf.len()]);
            Ok(())
        },
        &mut |d| {
            emitted.set(emitted.get() + 1);
            emit_ref(d)
        },
    )
    .unwrap();
    assert_eq!(got, spans_of(&new));
    assert!(emitted.get() <= 3, "emitted {}", emitted.get());
    assert!(
        stats.bytes_read <= 4 * MAX_CHUNK as u64,
        "read {} bytes",
        stats.bytes_read
    );
    let changed = got.iter().filter(|s| !old_spans.contains(s)).count();
    assert!(changed <= 2, "{changed} chunks differ");
}

#[test]
fn chunk_reader_matches_reference() {
    struct Dribble<'a>(&'a [u8]);
    impl io::Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(10_007);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    for len in [0, 1, 20_000, 3_000_000] {
        let data = fill(len as u64, len, len > 1_000_000);
        let got = chunk_reader("test", &mut Dribble(&data), &mut emit_ref).unwrap();
        assert_eq!(got, spans_of(&data));
    }
}
