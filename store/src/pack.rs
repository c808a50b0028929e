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
/// The newest pack version: 2 when a blob in it is compressed (its index then records the
/// stored and the plain length of each blob), else 1, which every owsfs reads.
pub const PACK_VERSION: u32 = 2;
pub const HEADER_LEN: u64 = 16;
pub const TRAILER_LEN: u64 = 24;
/// Bytes of one version 1 index entry: kind u8, id [32], offset u64, len u32, codec u8.
pub const INDEX_ENTRY_LEN: usize = 46;
/// Bytes of one version 2 index entry: kind u8, id [32], offset u64, stored u32, len u32,
/// codec u8.
pub const INDEX_ENTRY_LEN_V2: usize = 50;
/// The size at which callers usually seal a pack.
pub const PACK_TARGET_SIZE: u64 = 16 << 20;
/// The zstd level of a store that does not say otherwise.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Blobs shorter than this are stored as they are: a zstd frame would not pay for itself.
pub const MIN_COMPRESS: usize = 128;

/// The size of a sealed version 1 pack (no compressed blob) of `blobs` blobs holding `bytes`
/// bytes in all: header, blobs, index (magic, count, entries, checksum) and trailer.
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

/// How a blob's bytes are stored in its pack. The blob's id is always the hash of its plain
/// bytes, so the codec never changes what deduplicates with what.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// The plain bytes.
    #[default]
    None = 0,
    /// One zstd frame that holds the plain bytes and their length.
    Zstd = 1,
}

impl Codec {
    pub fn from_u8(b: u8) -> Option<Codec> {
        match b {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }

    pub fn is_none(&self) -> bool {
        *self == Codec::None
    }
}

/// How a writer compresses the blobs it adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Off,
    /// zstd at this level (1 to 19; negative levels are zstd's fast modes).
    Zstd(i32),
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd(DEFAULT_ZSTD_LEVEL)
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    /// `off`, `zstd`, or a zstd level (`1`..=`19`, or `zstd:LEVEL`).
    fn from_str(s: &str) -> std::result::Result<Compression, String> {
        let level = match s.trim() {
            "off" | "none" | "0" => return Ok(Compression::Off),
            "zstd" | "on" => return Ok(Compression::default()),
            other => other.strip_prefix("zstd:").unwrap_or(other),
        };
        match level.parse::<i32>() {
            Ok(n) if (-7..=19).contains(&n) && n != 0 => Ok(Compression::Zstd(n)),
            _ => Err(format!(
                "{s:?} is not a compression: say off, zstd, or a zstd level from 1 (fastest) to 19 (smallest)"
            )),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Zstd(n) => write!(f, "zstd:{n}"),
        }
    }
}

/// A blob ready to be placed in a pack: its id, plain length, codec and stored bytes.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub kind: BlobKind,
    pub id: BlobId,
    pub len: u32,
    pub codec: Codec,
    pub stored: Bytes,
}

thread_local! {
    /// Per thread: a compressor for one level, and its output buffer.
    #[allow(clippy::type_complexity)]
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Hashes and, when it saves enough, compresses a blob. Runs on any thread (a writer may
/// encode on several cores and place the results in order).
pub fn encode_blob(compression: Compression, kind: BlobKind, data: &[u8]) -> Encoded {
    encode_known(compression, kind, BlobId::of(data), data)
}

/// [`encode_blob`] of a blob whose id the caller has computed already.
pub fn encode_known(compression: Compression, kind: BlobKind, id: BlobId, data: &[u8]) -> Encoded {
    let (codec, stored) = match compress(compression, data) {
        Some(p) => (Codec::Zstd, p),
        None => (Codec::None, Bytes::copy_from_slice(data)),
    };
    encoded(kind, id, data.len(), codec, stored)
}

/// [`encode_known`] of bytes the caller gives away (a plain blob keeps them, no copy).
pub fn encode_owned(
    compression: Compression,
    kind: BlobKind,
    id: BlobId,
    data: Vec<u8>,
) -> Encoded {
    let len = data.len();
    let (codec, stored) = match compress(compression, &data) {
        Some(p) => (Codec::Zstd, p),
        None => (Codec::None, Bytes::from(data)),
    };
    encoded(kind, id, len, codec, stored)
}

fn encoded(kind: BlobKind, id: BlobId, len: usize, codec: Codec, stored: Bytes) -> Encoded {
    assert!(len <= u32::MAX as usize, "blob larger than 4 GiB");
    Encoded {
        kind,
        id,
        len: len as u32,
        codec,
        stored,
    }
}

/// The zstd frame of `data`, when compression is on and the frame saves at least 1/32 of the
/// blob: otherwise every later read would pay for decompression to save next to nothing.
fn compress(compression: Compression, data: &[u8]) -> Option<Bytes> {
    let Compression::Zstd(level) = compression else {
        return None;
    };
    if data.len() < MIN_COMPRESS {
        return None;
    }
    // zstd stops as soon as the frame would not fit: incompressible data costs little.
    let room = data.len() - data.len() / 32 - 1;
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _, _)| *l != level) {
            let mut z = zstd::bulk::Compressor::new(level).ok()?;
            // The frame records the plain length; no checksum (the id is the checksum).
            z.include_contentsize(true).ok()?;
            z.include_checksum(false).ok()?;
            *c = Some((level, z, Vec::new()));
        }
        let (_, z, out) = c.as_mut()?;
        if out.len() < room {
            out.resize(room, 0);
        }
        let n = z.compress_to_buffer(data, &mut out[..room]).ok()?;
        Some(Bytes::copy_from_slice(&out[..n]))
    })
}

/// Where a blob is: what trees and list blobs store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RefRepr", into = "RefRepr")]
pub struct BlobRef {
    pub id: BlobId,
    pub pack: PackId,
    /// Offset from the start of the pack object.
    pub offset: u64,
    /// The length of the plain bytes (what a file's offsets add up).
    pub len: u32,
    /// The length of the bytes in the pack (`len` when the codec is none).
    pub stored: u32,
    pub codec: Codec,
}

/// [`BlobRef`] in JSON: a plain blob's ref is written as it always was.
#[derive(Serialize, Deserialize)]
struct RefRepr {
    id: BlobId,
    pack: PackId,
    offset: u64,
    len: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stored: Option<u32>,
    #[serde(default, skip_serializing_if = "Codec::is_none")]
    codec: Codec,
}

impl TryFrom<RefRepr> for BlobRef {
    type Error = String;

    fn try_from(r: RefRepr) -> std::result::Result<BlobRef, String> {
        let stored = match (r.codec, r.stored) {
            (Codec::None, None) => r.len,
            (Codec::None, Some(s)) if s == r.len => r.len,
            (Codec::None, Some(s)) => {
                return Err(format!("a plain blob of {} bytes stored as {s}", r.len));
            }
            (_, Some(s)) => s,
            (c, None) => return Err(format!("a {c:?} blob without its stored length")),
        };
        Ok(BlobRef {
            id: r.id,
            pack: r.pack,
            offset: r.offset,
            len: r.len,
            stored,
            codec: r.codec,
        })
    }
}

impl From<BlobRef> for RefRepr {
    fn from(r: BlobRef) -> RefRepr {
        RefRepr {
            id: r.id,
            pack: r.pack,
            offset: r.offset,
            len: r.len,
            stored: (!r.codec.is_none()).then_some(r.stored),
            codec: r.codec,
        }
    }
}

impl BlobRef {
    /// A blob stored as it is.
    pub fn plain(id: BlobId, pack: PackId, offset: u64, len: u32) -> BlobRef {
        BlobRef {
            id,
            pack,
            offset,
            len,
            stored: len,
            codec: Codec::None,
        }
    }

    /// The byte range of the blob in its pack.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.end()
    }

    /// Where the blob's bytes end in its pack.
    pub fn end(&self) -> u64 {
        self.offset + self.stored as u64
    }

    /// Whether it names the same blob as `other` (wherever each is stored).
    pub fn same_blob(&self, other: &BlobRef) -> bool {
        self.id == other.id && self.len == other.len
    }
}

/// One entry of a pack's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub kind: BlobKind,
    pub id: BlobId,
    pub offset: u64,
    /// Plain length.
    pub len: u32,
    /// Bytes in the pack.
    pub stored: u32,
    pub codec: Codec,
}

/// Builds one pack in memory.
#[derive(Debug)]
pub struct PackWriter {
    id: PackId,
    /// The blobs' stored bytes, kept as they came (no copy until the pack is sealed).
    blobs: Vec<Bytes>,
    /// Bytes of header and blobs so far.
    len: u64,
    entries: Vec<PackEntry>,
    compression: Compression,
}

impl Default for PackWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl PackWriter {
    /// Starts a pack with a fresh random id, storing blobs as they are.
    pub fn new() -> PackWriter {
        PackWriter::with_id(PackId::random())
    }

    /// Starts a pack with a fresh random id, compressing blobs as `compression` says.
    pub fn compressing(compression: Compression) -> PackWriter {
        PackWriter {
            compression,
            ..PackWriter::new()
        }
    }

    pub fn with_id(id: PackId) -> PackWriter {
        PackWriter {
            id,
            blobs: Vec::new(),
            len: HEADER_LEN,
            entries: Vec::new(),
            compression: Compression::Off,
        }
    }

    pub fn id(&self) -> PackId {
        self.id
    }

    /// Appends a blob (compressed if that pays); its location is final.
    pub fn add(&mut self, kind: BlobKind, data: &[u8]) -> BlobRef {
        let e = encode_blob(self.compression, kind, data);
        self.add_encoded(&e)
    }

    /// Appends a blob encoded by [`encode_blob`], or copied as it was stored elsewhere.
    pub fn add_encoded(&mut self, e: &Encoded) -> BlobRef {
        let offset = self.len;
        assert!(
            e.stored.len() <= u32::MAX as usize,
            "blob larger than 4 GiB"
        );
        let stored = e.stored.len() as u32;
        self.blobs.push(e.stored.clone());
        self.len += stored as u64;
        self.entries.push(PackEntry {
            kind: e.kind,
            id: e.id,
            offset,
            len: e.len,
            stored,
            codec: e.codec,
        });
        BlobRef {
            id: e.id,
            pack: self.id,
            offset,
            len: e.len,
            stored,
            codec: e.codec,
        }
    }

    /// Bytes of blobs and header so far (the sealed pack adds the index and trailer).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// No blob added yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn blob_count(&self) -> usize {
        self.entries.len()
    }

    /// Finishes the pack: appends index and trailer. A pack without a compressed blob is a
    /// version 1 pack, byte for byte what earlier versions wrote.
    pub fn seal(self) -> (PackId, Bytes) {
        let v2 = self.entries.iter().any(|e| !e.codec.is_none());
        let entry_len = if v2 {
            INDEX_ENTRY_LEN_V2
        } else {
            INDEX_ENTRY_LEN
        };
        let mut buf =
            Vec::with_capacity(self.len as usize + 16 + self.entries.len() * entry_len + 24);
        buf.extend_from_slice(PACK_MAGIC);
        buf.extend_from_slice(&(if v2 { 2u32 } else { 1 }).to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        for b in &self.blobs {
            buf.extend_from_slice(b);
        }
        let index_offset = buf.len() as u64;
        let start = buf.len();
        buf.extend_from_slice(INDEX_MAGIC);
        buf.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            buf.push(e.kind as u8);
            buf.extend_from_slice(e.id.as_bytes());
            buf.extend_from_slice(&e.offset.to_le_bytes());
            buf.extend_from_slice(&e.stored.to_le_bytes());
            if v2 {
                buf.extend_from_slice(&e.len.to_le_bytes());
            }
            buf.push(e.codec as u8);
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

/// Turns the stored bytes of the blob `r` into its plain bytes, and checks them: the stored
/// length, the codec's frame and its plain length, and the hash. The error names the pack
/// object and the blob; bytes that fail are never returned.
pub fn open_blob(r: &BlobRef, stored: Bytes) -> Result<Bytes> {
    let bad = |what: String| StoreError::Corrupt {
        object: r.pack.key(),
        blob: Some(r.id),
        what,
    };
    if stored.len() != r.stored as usize {
        return Err(bad(format!(
            "expected {} stored bytes, found {}",
            r.stored,
            stored.len()
        )));
    }
    let data = match r.codec {
        Codec::None => stored,
        Codec::Zstd => {
            let plain = zstd::bulk::decompress(&stored, r.len as usize).map_err(|e| {
                bad(format!(
                    "the zstd frame at offset {} does not decompress to {} bytes: {e}",
                    r.offset, r.len
                ))
            })?;
            Bytes::from(plain)
        }
    };
    if data.len() != r.len as usize {
        return Err(bad(format!(
            "expected {} bytes, found {}",
            r.len,
            data.len()
        )));
    }
    let got = BlobId::of(&data);
    if got != r.id {
        return Err(bad(format!("bytes at offset {} hash to {got}", r.offset)));
    }
    Ok(data)
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
            Ok(data) => return open_blob(&at, data),
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
        end = end.checked_add(r.stored as u64).ok_or_else(|| {
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
                    && moved[j].offset == moved[j - 1].end()
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
            open_blob(r, data.slice(lo..lo + r.stored as usize))
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
        if version > PACK_VERSION {
            return Err(StoreError::UnsupportedVersion {
                object: id.key(),
                found: version as u64,
                supported: PACK_VERSION as u64,
            });
        }
        if version == 0 {
            return Err(bad(format!("unknown pack version {version}")));
        }
        let entry_len = if version == 1 {
            INDEX_ENTRY_LEN
        } else {
            INDEX_ENTRY_LEN_V2
        };
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
        if idx.len() != 12 + count * entry_len {
            return Err(bad("index length does not match its count".into()));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let e = &idx[12 + i * entry_len..12 + (i + 1) * entry_len];
            let kind = BlobKind::from_u8(e[0]).ok_or_else(|| bad(format!("blob kind {}", e[0])))?;
            let mut bid = [0u8; 32];
            bid.copy_from_slice(&e[1..33]);
            let offset = u64_at(e, 33);
            let stored = u32_at(e, 41);
            let (len, codec_byte) = if version == 1 {
                (stored, e[45])
            } else {
                (u32_at(e, 45), e[49])
            };
            let codec = match Codec::from_u8(codec_byte) {
                Some(c) if version > 1 || c.is_none() => c,
                _ => {
                    return Err(bad(format!(
                        "unknown codec {codec_byte} in index entry {i}"
                    )));
                }
            };
            if codec.is_none() && stored != len {
                return Err(bad(format!(
                    "index entry {i} stores {stored} plain bytes as {len}"
                )));
            }
            if offset < HEADER_LEN || offset + stored as u64 > index_offset {
                return Err(bad(format!("index entry {i} points outside the blob area")));
            }
            entries.push(PackEntry {
                kind,
                id: BlobId(bid),
                offset,
                len,
                stored,
                codec,
            });
        }
        Ok(ParsedPack { id, data, entries })
    }

    pub fn entries(&self) -> &[PackEntry] {
        &self.entries
    }

    /// The verified plain bytes of the blob `r` names in this pack.
    pub fn blob(&self, r: &BlobRef) -> Result<Bytes> {
        open_blob(r, self.stored(r)?)
    }

    /// The bytes of the blob `r` as they are stored in this pack, unverified (a copy into
    /// another pack keeps them as they are; [`open_blob`] checks them).
    pub fn stored(&self, r: &BlobRef) -> Result<Bytes> {
        let end = r.end();
        if r.pack != self.id || end > self.data.len() as u64 {
            return Err(StoreError::Corrupt {
                object: self.id.key(),
                blob: Some(r.id),
                what: "reference points outside the pack".into(),
            });
        }
        Ok(self.data.slice(r.offset as usize..end as usize))
    }

    /// The ref of an index entry.
    pub fn entry_ref(&self, e: &PackEntry) -> BlobRef {
        BlobRef {
            id: e.id,
            pack: self.id,
            offset: e.offset,
            len: e.len,
            stored: e.stored,
            codec: e.codec,
        }
    }

    /// The verified plain bytes of an index entry.
    pub fn entry_blob(&self, e: &PackEntry) -> Result<Bytes> {
        self.blob(&self.entry_ref(e))
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
        long.push(BlobRef::plain(
            BlobId::of(b"cccc"),
            id,
            refs[1].offset + 4,
            1 << 20,
        ));
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
        assert_eq!(across[1].offset, across[0].end());
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

    /// Text that compresses, noise that does not, and a blob too small to try.
    fn mixed() -> Vec<Vec<u8>> {
        let text: Vec<u8> = (0..2000)
            .flat_map(|i| format!("line {i}: the quick brown fox\n").into_bytes())
            .collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        vec![text, noise, b"tiny".to_vec(), vec![0u8; 300_000]]
    }

    #[test]
    fn compression_pays_where_it_can_and_every_blob_reads_back() {
        let blobs = mixed();
        let mut w = PackWriter::compressing(Compression::default());
        let refs: Vec<_> = blobs.iter().map(|b| w.add(BlobKind::Chunk, b)).collect();
        let codecs: Vec<_> = refs.iter().map(|r| r.codec).collect();
        assert_eq!(codecs, [Codec::Zstd, Codec::None, Codec::None, Codec::Zstd]);
        assert!(refs[0].stored * 5 < refs[0].len, "{:?}", refs[0]);
        assert_eq!(refs[1].stored, refs[1].len);
        for (r, b) in refs.iter().zip(&blobs) {
            assert_eq!((r.len as usize, r.id), (b.len(), BlobId::of(b)));
        }
        let (id, data) = w.seal();
        assert_eq!(
            u32_at(&data, 8),
            2,
            "a pack with a compressed blob is version 2"
        );
        let p = ParsedPack::parse(id, data.clone()).unwrap();
        for ((r, e), b) in refs.iter().zip(p.entries()).zip(&blobs) {
            assert_eq!(p.entry_ref(e), *r);
            assert_eq!(&p.blob(r).unwrap()[..], &b[..]);
        }
        // Through the store: one blob, and a run across compressed and plain ones.
        let store = Store::open(
            &format!("memory://packz-{:x}", rand::random::<u64>()),
            crate::StoreOptions::default(),
        )
        .unwrap();
        store.put(&id.key(), data).unwrap();
        assert_eq!(&read_blob(&store, &refs[3]).unwrap()[..], &blobs[3][..]);
        let run = read_blob_run(&store, &refs).unwrap();
        for (g, b) in run.iter().zip(&blobs) {
            assert_eq!(&g[..], &b[..]);
        }
    }

    #[test]
    fn a_pack_without_compressed_blobs_is_what_version_1_wrote() {
        let blobs = mixed();
        let mut off = PackWriter::with_id(PackId([5; 32]));
        let mut on = PackWriter {
            compression: Compression::default(),
            ..PackWriter::with_id(PackId([5; 32]))
        };
        // Only blobs compression leaves alone.
        for b in &blobs[1..3] {
            off.add(BlobKind::Chunk, b);
            on.add(BlobKind::Chunk, b);
        }
        let (_, a) = off.seal();
        let (_, b) = on.seal();
        assert_eq!(a, b);
        assert_eq!(u32_at(&a, 8), 1);
        assert_eq!(a.len() as u64, sealed_size(2, (blobs[1].len() + 4) as u64));
    }

    #[test]
    fn a_damaged_compressed_blob_is_never_served() {
        let blobs = mixed();
        let mut w = PackWriter::compressing(Compression::Zstd(1));
        let r = w.add(BlobKind::Chunk, &blobs[0]);
        let (id, data) = w.seal();
        // Truncated, extended, or a ref that claims another plain length.
        let stored = data.slice(r.offset as usize..r.end() as usize);
        assert!(
            open_blob(&r, stored.slice(..stored.len() - 1))
                .unwrap_err()
                .is_corrupt()
        );
        let short = BlobRef {
            len: r.len - 1,
            ..r
        };
        assert!(open_blob(&short, stored.clone()).unwrap_err().is_corrupt());
        let long = BlobRef {
            len: r.len + 1,
            ..r
        };
        assert!(open_blob(&long, stored.clone()).unwrap_err().is_corrupt());
        // Every flipped bit fails, or (a bit zstd does not read) gives the very bytes.
        let mut same = 0;
        for i in r.range() {
            for bit in [0x01u8, 0x80] {
                let mut c = data.to_vec();
                c[i as usize] ^= bit;
                let p = ParsedPack::parse(id, Bytes::from(c)).unwrap();
                match p.blob(&r) {
                    Ok(b) => {
                        assert_eq!(&b[..], &blobs[0][..]);
                        same += 1;
                    }
                    Err(e) => {
                        let m = e.to_string();
                        assert!(e.is_corrupt() && m.contains(&id.key()), "{m}");
                    }
                }
            }
        }
        assert!(same <= 8, "{same}");
    }

    #[test]
    fn compression_settings_parse_and_refuse_nonsense() {
        for (s, want) in [
            ("off", Compression::Off),
            ("zstd", Compression::Zstd(DEFAULT_ZSTD_LEVEL)),
            ("19", Compression::Zstd(19)),
            ("zstd:1", Compression::Zstd(1)),
            ("-3", Compression::Zstd(-3)),
        ] {
            assert_eq!(s.parse::<Compression>().unwrap(), want, "{s}");
            assert_eq!(want.to_string().parse::<Compression>().unwrap(), want);
        }
        for s in ["20", "lz4", "", "zstd:x"] {
            let e = s.parse::<Compression>().unwrap_err();
            assert!(e.contains("not a compression"), "{e}");
        }
    }

    #[test]
    fn a_plain_ref_is_written_as_before_and_a_compressed_one_round_trips() {
        let plain = BlobRef::plain(BlobId::of(b"x"), PackId([1; 32]), 16, 1);
        let j = serde_json::to_string(&plain).unwrap();
        assert!(!j.contains("codec") && !j.contains("stored"), "{j}");
        assert_eq!(serde_json::from_str::<BlobRef>(&j).unwrap(), plain);
        let packed = BlobRef {
            stored: 700,
            codec: Codec::Zstd,
            len: 5000,
            ..plain
        };
        let j = serde_json::to_string(&packed).unwrap();
        assert!(
            j.contains(r#""codec":"zstd""#) && j.contains(r#""stored":700"#),
            "{j}"
        );
        assert_eq!(serde_json::from_str::<BlobRef>(&j).unwrap(), packed);
        // A compressed ref must say how much it stores; a plain one must not disagree.
        let no_stored = j.replace(r#""stored":700,"#, "");
        assert!(
            serde_json::from_str::<BlobRef>(&no_stored).is_err(),
            "{no_stored}"
        );
        let plain_j = serde_json::to_string(&plain).unwrap();
        let lying = plain_j.replace(r#""len":1"#, r#""len":1,"stored":9"#);
        assert!(serde_json::from_str::<BlobRef>(&lying).is_err(), "{lying}");
    }

    proptest! {
        #[test]
        fn any_blobs_round_trip(
            blobs in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..3000), 0..20),
            level in proptest::option::of(1i32..6),
        ) {
            let mut w = PackWriter::compressing(level.map_or(Compression::Off, Compression::Zstd));
            let refs: Vec<_> = blobs.iter().map(|b| w.add(BlobKind::Chunk, b)).collect();
            let (id, data) = w.seal();
            let p = ParsedPack::parse(id, data).unwrap();
            for (r, b) in refs.iter().zip(&blobs) {
                prop_assert_eq!(&p.blob(r).unwrap()[..], &b[..]);
            }
        }
    }
}
