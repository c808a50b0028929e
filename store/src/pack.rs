//! Packs: many blobs in one object, with an index and a trailer (layout in `FORMAT.md`).
//! A pack's id is random and chosen when it is started, so every blob has its final
//! location ([`BlobRef`]) the moment it is added: a tree can point at blobs in its own,
//! not yet sealed, pack.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::Store;
use crate::error::{Result, StoreError};
use crate::ids::{BlobId, PackId};

pub const PACK_MAGIC: &[u8; 8] = b"OWSPACK\0";
pub const INDEX_MAGIC: &[u8; 8] = b"OWSPIDX\0";
pub const END_MAGIC: &[u8; 8] = b"OWSPEND\0";
pub const PACK_VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 16;
pub const TRAILER_LEN: u64 = 24;
/// Bytes of one index entry: kind u8, id [32], offset u64, len u32, compression u8.
pub const INDEX_ENTRY_LEN: usize = 46;
/// The size at which callers usually seal a pack.
pub const PACK_TARGET_SIZE: u64 = 16 << 20;

/// The size of a sealed pack of `blobs` blobs holding `bytes` bytes in all: header, blobs,
/// index (magic, count, entries, checksum) and trailer.
pub fn sealed_size(blobs: u64, bytes: u64) -> u64 {
    HEADER_LEN + bytes + 16 + blobs * INDEX_ENTRY_LEN as u64 + TRAILER_LEN
}

/// What a blob holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlobKind {
    Chunk = 1,
    Tree = 2,
    List = 3,
}

impl BlobKind {
    fn from_u8(b: u8) -> Option<BlobKind> {
        match b {
            1 => Some(BlobKind::Chunk),
            2 => Some(BlobKind::Tree),
            3 => Some(BlobKind::List),
            _ => None,
        }
    }
}

/// Where a blob is: what trees and list blobs store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    pub id: BlobId,
    pub pack: PackId,
    /// Offset from the start of the pack object.
    pub offset: u64,
    pub len: u32,
}

impl BlobRef {
    /// The byte range of the blob in its pack.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.len as u64
    }
}

/// One entry of a pack's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub kind: BlobKind,
    pub id: BlobId,
    pub offset: u64,
    pub len: u32,
    pub compression: u8,
}

/// Builds one pack in memory.
#[derive(Debug)]
pub struct PackWriter {
    id: PackId,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl PackWriter {
    /// Starts a pack with a fresh random id.
    pub fn new() -> PackWriter {
        PackWriter::with_id(PackId::random())
    }

    pub fn with_id(id: PackId) -> PackWriter {
        let mut buf = Vec::with_capacity(1 << 20);
        buf.extend_from_slice(PACK_MAGIC);
        buf.extend_from_slice(&PACK_VERSION.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        PackWriter {
            id,
            buf,
            entries: Vec::new(),
        }
    }

    pub fn id(&self) -> PackId {
        self.id
    }

    /// Appends a blob; its location is final.
    pub fn add(&mut self, kind: BlobKind, data: &[u8]) -> BlobRef {
        let id = BlobId::of(data);
        let offset = self.buf.len() as u64;
        assert!(data.len() <= u32::MAX as usize, "blob larger than 4 GiB");
        let len = data.len() as u32;
        self.buf.extend_from_slice(data);
        self.entries.push(PackEntry {
            kind,
            id,
            offset,
            len,
            compression: 0,
        });
        BlobRef {
            id,
            pack: self.id,
            offset,
            len,
        }
    }

    /// Bytes of blobs and header so far (the sealed pack adds the index and trailer).
    pub fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    /// No blob added yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn blob_count(&self) -> usize {
        self.entries.len()
    }

    /// Finishes the pack: appends index and trailer.
    pub fn seal(self) -> (PackId, Bytes) {
        let mut buf = self.buf;
        let index_offset = buf.len() as u64;
        let start = buf.len();
        buf.extend_from_slice(INDEX_MAGIC);
        buf.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            buf.push(e.kind as u8);
            buf.extend_from_slice(e.id.as_bytes());
            buf.extend_from_slice(&e.offset.to_le_bytes());
            buf.extend_from_slice(&e.len.to_le_bytes());
            buf.push(e.compression);
        }
        let crc = crc32c::crc32c(&buf[start..]);
        let index_len = (buf.len() - start) as u32;
        buf.extend_from_slice(&crc.to_le_bytes());
        let t = buf.len();
        buf.extend_from_slice(&index_offset.to_le_bytes());
        buf.extend_from_slice(&index_len.to_le_bytes());
        let tcrc = crc32c::crc32c(&buf[t..]);
        buf.extend_from_slice(&tcrc.to_le_bytes());
        buf.extend_from_slice(END_MAGIC);
        (self.id, Bytes::from(buf))
    }
}

/// Checks that `data` is the blob `r` names; the error names the pack object and the blob.
pub fn verify_blob(r: &BlobRef, data: &[u8]) -> Result<()> {
    if data.len() != r.len as usize {
        return Err(StoreError::Corrupt {
            object: r.pack.key(),
            blob: Some(r.id),
            what: format!("expected {} bytes, found {}", r.len, data.len()),
        });
    }
    let got = BlobId::of(data);
    if got != r.id {
        return Err(StoreError::Corrupt {
            object: r.pack.key(),
            blob: Some(r.id),
            what: format!("bytes at offset {} hash to {got}", r.offset),
        });
    }
    Ok(())
}

/// Reads one blob with a range GET and verifies it. A blob whose pack a GC repacked is read
/// where the pack's forwards say it went (`crate::forward`).
pub fn read_blob(store: &Store, r: &BlobRef) -> Result<Bytes> {
    match read_blob_via(store, r, false) {
        // Forwards read earlier may point at a pack a later repack emptied: read them again.
        Err(e) if e.is_not_found() => read_blob_via(store, r, true).map_err(|again| {
            // A corrupt or unreachable blob is that, not "missing".
            if again.is_not_found() { e } else { again }
        }),
        done => done,
    }
}

/// [`read_blob`], with the forwards cached (`fresh`: read again from the store).
fn read_blob_via(store: &Store, r: &BlobRef, fresh: bool) -> Result<Bytes> {
    let mut at = *r;
    for _ in 0..=crate::forward::MAX_HOPS {
        match store.get_range(&at.pack.key(), at.range()) {
            Ok(data) => {
                verify_blob(&at, &data)?;
                return Ok(data);
            }
            Err(e) if e.is_not_found() => match crate::forward::locate(store, &at, fresh)? {
                Some(next) => at = next,
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::corrupt(
        r.pack.key(),
        format!(
            "blob {} is forwarded more than {} times",
            r.id,
            crate::forward::MAX_HOPS
        ),
    ))
}

/// Reads a run of blobs that lie back to back in one pack with a single range GET, and
/// verifies every blob before any is returned: one corrupt blob fails the whole run, with an
/// error naming the pack and that blob. The result holds the blobs in the order of `run`.
///
/// `run` must be adjacent blobs of one pack (each starting where the previous one ends);
/// anything else is refused with `Invalid` before a request is made. The caller bounds the
/// run's size. An empty run reads nothing.
pub fn read_blob_run(store: &Store, run: &[BlobRef]) -> Result<Vec<Bytes>> {
    read_run_hops(store, run, 0)
}

/// [`read_blob_run`], `hops` forwards down.
fn read_run_hops(store: &Store, run: &[BlobRef], hops: usize) -> Result<Vec<Bytes>> {
    let Some(first) = run.first() else {
        return Ok(Vec::new());
    };
    let mut end = first.offset;
    for r in run {
        if r.pack != first.pack {
            return Err(StoreError::Invalid(format!(
                "a blob run must stay in one pack: blob {} is in {}, the run started in {}",
                r.id,
                r.pack.key(),
                first.pack.key()
            )));
        }
        if r.offset != end {
            return Err(StoreError::Invalid(format!(
                "blobs of a run must be adjacent: blob {} starts at offset {} of {}, the previous one ends at {end}",
                r.id,
                r.offset,
                r.pack.key()
            )));
        }
        end = end.checked_add(r.len as u64).ok_or_else(|| {
            StoreError::Invalid(format!(
                "blob {} at offset {} of {} ends past 2^64",
                r.id,
                r.offset,
                r.pack.key()
            ))
        })?;
    }
    let data = match store.get_range(&first.pack.key(), first.offset..end) {
        Ok(d) => d,
        // A repacked pack: where its forwards say, in runs of blobs that stayed adjacent.
        Err(e) if e.is_not_found() && hops < crate::forward::MAX_HOPS => {
            let mut moved = Vec::with_capacity(run.len());
            for r in run {
                match crate::forward::locate(store, r, false)? {
                    Some(to) => moved.push(to),
                    None => return Err(e),
                }
            }
            let mut out = Vec::with_capacity(run.len());
            let mut i = 0;
            while i < moved.len() {
                let mut j = i + 1;
                while j < moved.len()
                    && moved[j].pack == moved[i].pack
                    && moved[j].offset == moved[j - 1].offset + moved[j - 1].len as u64
                {
                    j += 1;
                }
                match read_run_hops(store, &moved[i..j], hops + 1) {
                    Ok(b) => out.extend(b),
                    // Stale forwards: blob by blob, reading them again.
                    Err(e) if e.is_not_found() => {
                        for r in &run[i..j] {
                            out.push(read_blob(store, r)?);
                        }
                    }
                    Err(e) => return Err(e),
                }
                i = j;
            }
            return Ok(out);
        }
        Err(e) => return Err(e),
    };
    run.iter()
        .map(|r| {
            let lo = (r.offset - first.offset) as usize;
            let b = data.slice(lo..lo + r.len as usize);
            verify_blob(r, &b)?;
            Ok(b)
        })
        .collect()
}

/// A whole pack whose trailer and index have been checked.
#[derive(Debug, Clone)]
pub struct ParsedPack {
    pub id: PackId,
    data: Bytes,
    entries: Vec<PackEntry>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl ParsedPack {
    /// Parses a pack object, checking header, trailer, index checksum and entry bounds.
    pub fn parse(id: PackId, data: Bytes) -> Result<ParsedPack> {
        let bad = |what: String| StoreError::corrupt(id.key(), what);
        let n = data.len() as u64;
        if n < HEADER_LEN + TRAILER_LEN {
            return Err(bad(format!("{n} bytes is too short for a pack")));
        }
        if &data[..8] != PACK_MAGIC {
            return Err(bad("bad pack magic".into()));
        }
        let version = u32_at(&data, 8);
        if version != PACK_VERSION {
            if version > PACK_VERSION {
                return Err(StoreError::UnsupportedVersion {
                    object: id.key(),
                    found: version as u64,
                    supported: PACK_VERSION as u64,
                });
            }
            return Err(bad(format!("unknown pack version {version}")));
        }
        if u32_at(&data, 12) != 0 {
            return Err(bad("unknown pack flags".into()));
        }
        let t = (n - TRAILER_LEN) as usize;
        if &data[t + 16..t + 24] != END_MAGIC {
            return Err(bad("bad trailer magic (truncated pack?)".into()));
        }
        if crc32c::crc32c(&data[t..t + 12]) != u32_at(&data, t + 12) {
            return Err(bad("trailer checksum mismatch".into()));
        }
        let index_offset = u64_at(&data, t);
        let index_len = u32_at(&data, t + 8) as u64;
        if index_offset < HEADER_LEN || index_offset + index_len + 4 != t as u64 {
            return Err(bad("trailer points outside the pack".into()));
        }
        let io = index_offset as usize;
        let idx = &data[io..io + index_len as usize];
        if crc32c::crc32c(idx) != u32_at(&data, io + index_len as usize) {
            return Err(bad("index checksum mismatch".into()));
        }
        if idx.len() < 12 || &idx[..8] != INDEX_MAGIC {
            return Err(bad("bad index magic".into()));
        }
        let count = u32_at(idx, 8) as usize;
        if idx.len() != 12 + count * INDEX_ENTRY_LEN {
            return Err(bad("index length does not match its count".into()));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let e = &idx[12 + i * INDEX_ENTRY_LEN..12 + (i + 1) * INDEX_ENTRY_LEN];
            let kind = BlobKind::from_u8(e[0]).ok_or_else(|| bad(format!("blob kind {}", e[0])))?;
            let mut bid = [0u8; 32];
            bid.copy_from_slice(&e[1..33]);
            let offset = u64_at(e, 33);
            let len = u32_at(e, 41);
            let compression = e[45];
            if compression != 0 {
                return Err(bad(format!("unknown compression {compression}")));
            }
            if offset < HEADER_LEN || offset + len as u64 > index_offset {
                return Err(bad(format!("index entry {i} points outside the blob area")));
            }
            entries.push(PackEntry {
                kind,
                id: BlobId(bid),
                offset,
                len,
                compression,
            });
        }
        Ok(ParsedPack { id, data, entries })
    }

    pub fn entries(&self) -> &[PackEntry] {
        &self.entries
    }

    /// The verified bytes of the blob at `offset`/`len` (a [`BlobRef`] into this pack).
    pub fn blob(&self, r: &BlobRef) -> Result<Bytes> {
        let end = r.offset + r.len as u64;
        if r.pack != self.id || end > self.data.len() as u64 {
            return Err(StoreError::Corrupt {
                object: self.id.key(),
                blob: Some(r.id),
                what: "reference points outside the pack".into(),
            });
        }
        let b = self.data.slice(r.offset as usize..end as usize);
        verify_blob(r, &b)?;
        Ok(b)
    }

    /// The verified bytes of an index entry.
    pub fn entry_blob(&self, e: &PackEntry) -> Result<Bytes> {
        self.blob(&BlobRef {
            id: e.id,
            pack: self.id,
            offset: e.offset,
            len: e.len,
        })
    }
}

/// Fetches a whole pack and parses it.
pub fn read_pack(store: &Store, id: PackId) -> Result<ParsedPack> {
    let data = store.get(&id.key())?;
    ParsedPack::parse(id, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sealed_size_is_the_size_of_a_sealed_pack() {
        let (_, b, refs) = sample();
        let bytes: u64 = refs.iter().map(|r| r.len as u64).sum();
        assert_eq!(sealed_size(refs.len() as u64, bytes), b.len() as u64);
        assert_eq!(sealed_size(0, 0), PackWriter::new().seal().1.len() as u64);
    }

    fn sample() -> (PackId, Bytes, Vec<BlobRef>) {
        let mut w = PackWriter::new();
        let refs = vec![
            w.add(BlobKind::Chunk, b"first chunk"),
            w.add(BlobKind::Tree, b"a tree"),
            w.add(BlobKind::List, b""),
            w.add(BlobKind::Chunk, &[7u8; 1000]),
        ];
        let (id, b) = w.seal();
        (id, b, refs)
    }

    #[test]
    fn round_trip() {
        let (id, b, refs) = sample();
        let p = ParsedPack::parse(id, b.clone()).unwrap();
        assert_eq!(p.entries().len(), 4);
        for (r, e) in refs.iter().zip(p.entries()) {
            assert_eq!(r.offset, e.offset);
            assert_eq!(r.id, e.id);
            assert_eq!(BlobId::of(&p.blob(r).unwrap()), r.id);
            assert_eq!(
                &b[r.range().start as usize..r.range().end as usize],
                &p.blob(r).unwrap()[..]
            );
        }
        assert_eq!(p.entries()[1].kind, BlobKind::Tree);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let (id, b, refs) = sample();
        for i in 0..b.len() {
            let mut c = b.to_vec();
            c[i] ^= 0x40;
            let c = Bytes::from(c);
            // Either the structure is refused, or the blob covering the byte fails its hash.
            match ParsedPack::parse(id, c) {
                Err(e) => {
                    assert!(e.to_string().contains(&id.key()), "{e}");
                }
                Ok(p) => {
                    let hit = refs.iter().find(|r| r.range().contains(&(i as u64)));
                    let r = hit.unwrap_or_else(|| panic!("byte {i} flipped unnoticed"));
                    let e = p.blob(r).unwrap_err();
                    assert!(e.is_corrupt());
                    let m = e.to_string();
                    assert!(m.contains(&id.key()) && m.contains(&r.id.to_hex()), "{m}");
                }
            }
        }
    }

    #[test]
    fn truncation_is_detected() {
        let (id, b, _) = sample();
        for n in [0, 10, 16, b.len() / 2, b.len() - 1] {
            assert!(ParsedPack::parse(id, b.slice(..n)).is_err());
        }
    }

    fn stored(data: &[&[u8]]) -> (Store, PackId, Vec<BlobRef>) {
        let store = Store::open(
            &format!("memory://pack-{:x}", rand::random::<u64>()),
            crate::StoreOptions::default(),
        )
        .unwrap();
        let mut w = PackWriter::new();
        let refs: Vec<_> = data.iter().map(|d| w.add(BlobKind::Chunk, d)).collect();
        let (id, b) = w.seal();
        store.put(&id.key(), b).unwrap();
        (store, id, refs)
    }

    #[test]
    fn a_blob_run_is_one_request_and_every_blob_is_verified() {
        let blobs: [&[u8]; 4] = [b"one", b"", b"three", &[9u8; 5000]];
        let (store, _, refs) = stored(&blobs);
        let before = store.stats_snapshot().gets;
        let got = read_blob_run(&store, &refs).unwrap();
        assert_eq!(store.stats_snapshot().gets, before + 1);
        assert_eq!(got.len(), blobs.len());
        for (g, b) in got.iter().zip(blobs) {
            assert_eq!(&g[..], b);
        }
        // A sub-run, and a single blob, read the same bytes.
        let mid = read_blob_run(&store, &refs[1..3]).unwrap();
        assert_eq!((&mid[0][..], &mid[1][..]), (&b""[..], &b"three"[..]));
        assert_eq!(
            read_blob_run(&store, &refs[3..]).unwrap()[0],
            read_blob(&store, &refs[3]).unwrap()
        );
        // An empty run asks the store nothing.
        let before = store.stats_snapshot().requests();
        assert!(read_blob_run(&store, &[]).unwrap().is_empty());
        assert_eq!(store.stats_snapshot().requests(), before);
    }

    #[test]
    fn a_corrupt_blob_fails_its_run_naming_pack_and_blob() {
        let (store, id, refs) = stored(&[b"first blob", b"second blob", b"third blob"]);
        let mut b = store.get(&id.key()).unwrap().to_vec();
        b[refs[1].offset as usize + 3] ^= 0x20;
        store.put(&id.key(), Bytes::from(b)).unwrap();
        let e = read_blob_run(&store, &refs).unwrap_err();
        let m = e.to_string();
        assert!(
            matches!(e, StoreError::Corrupt { blob: Some(b), .. } if b == refs[1].id),
            "{m}"
        );
        assert!(
            m.contains(&id.key()) && m.contains(&refs[1].id.to_hex()),
            "{m}"
        );
        // The blobs around it are still readable on their own.
        assert_eq!(
            &read_blob_run(&store, &refs[..1]).unwrap()[0][..],
            b"first blob"
        );
        assert_eq!(&read_blob(&store, &refs[2]).unwrap()[..], b"third blob");
    }

    #[test]
    fn a_run_past_the_end_of_its_pack_is_corrupt() {
        let (store, id, refs) = stored(&[b"aaaa", b"bbbb"]);
        let mut long = refs.clone();
        long.push(BlobRef {
            id: BlobId::of(b"cccc"),
            pack: id,
            offset: refs[1].offset + 4,
            len: 1 << 20,
        });
        let e = read_blob_run(&store, &long).unwrap_err();
        assert!(e.is_corrupt() && e.to_string().contains(&id.key()), "{e}");
    }

    #[test]
    fn runs_across_packs_or_with_gaps_are_refused_before_any_request() {
        let (store, _, refs) = stored(&[b"aaaa", b"bbbb", b"cccc"]);
        let (_, other, other_refs) = stored(&[b"aaaa", b"bbbb"]);
        let before = store.stats_snapshot().requests();
        let refused = |run: &[BlobRef], what: &str| {
            let e = read_blob_run(&store, run).unwrap_err();
            assert!(matches!(e, StoreError::Invalid(_)), "{e}");
            assert!(e.to_string().contains(what), "{e}");
        };
        // The next pack's blob at exactly the offset where the run ends.
        let mut across = refs[..1].to_vec();
        across.push(BlobRef {
            pack: other,
            ..other_refs[1]
        });
        assert_eq!(across[1].offset, across[0].offset + across[0].len as u64);
        refused(&across, "one pack");
        refused(&[refs[0], refs[2]], "adjacent");
        refused(&[refs[1], refs[0]], "adjacent");
        refused(&[refs[0], refs[0]], "adjacent");
        let huge = BlobRef {
            offset: u64::MAX - 1,
            len: 4,
            ..refs[0]
        };
        refused(&[huge], "2^64");
        assert_eq!(store.stats_snapshot().requests(), before);
    }

    proptest! {
        #[test]
        fn any_blobs_round_trip(blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let mut w = PackWriter::new();
            let refs: Vec<_> = blobs.iter().map(|b| w.add(BlobKind::Chunk, b)).collect();
            let (id, data) = w.seal();
            let p = ParsedPack::parse(id, data).unwrap();
            for (r, b) in refs.iter().zip(&blobs) {
                prop_assert_eq!(&p.blob(r).unwrap()[..], &b[..]);
            }
        }
    }
}
