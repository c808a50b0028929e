//! Repacking (`FORMAT.md`, "Repack"): a GC run moves the live blobs of packs that hold dead
//! ones into new packs (the deadest first, until the dead bytes left are within a bound) and
//! writes forward records for them; the old pack is then
//! referenced by nothing but forwarded blobs, so it is condemned like any unreferenced pack and
//! deleted a grace later. Stored trees never change: readers find a moved blob through the
//! forwards (`crate::forward`).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::backend::Store;
use crate::error::{Result, StoreError};
use crate::forward::{self, ForwardRecord, Moved};
use crate::ids::{BlobId, PackId};
use crate::pack::{
    BlobRef, Encoded, PACK_TARGET_SIZE, PackWriter, open_blob, read_pack, sealed_size,
};
use crate::progress::Progress;

/// The default share of dead bytes a store may keep in packs that also hold live blobs, as
/// a share of the live bytes (`GcOptions::max_unused`).
pub const DEFAULT_MAX_UNUSED: f64 = 0.10;

/// A live blob as a GC's mark found it: its id and length, whether trees name it where it is
/// (`direct`), and the other places they name it by (the packs it was moved from).
#[derive(Clone, Debug, Default)]
pub(crate) struct LiveBlob {
    pub id: BlobId,
    /// Plain length.
    pub len: u32,
    /// Bytes in the pack.
    pub stored: u32,
    pub direct: bool,
    pub moved_from: Vec<(PackId, u64)>,
}

/// What a mark found live: per pack, its live bytes and blobs (for the choice of packs to
/// repack), and every live blob by pack and offset (one table for the whole store).
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub packs: HashMap<PackId, (u64, u64)>,
    pub blobs: HashMap<(PackId, u64), LiveBlob>,
}

impl Live {
    /// Blob `at` is live; `from`: where trees name it, when that is not `at` (it moved).
    pub(crate) fn add(&mut self, at: &BlobRef, from: Option<(PackId, u64)>) {
        let b = self.blobs.entry((at.pack, at.offset)).or_default();
        if !b.direct && b.moved_from.is_empty() {
            b.id = at.id;
            b.len = at.len;
            b.stored = at.stored;
            let p = self.packs.entry(at.pack).or_default();
            p.0 += at.stored as u64;
            p.1 += 1;
        }
        match from {
            Some(f) => b.moved_from.push(f),
            None => b.direct = true,
        }
    }

    /// The live blobs of the packs `wanted`, by offset.
    fn of(&self, wanted: &HashSet<PackId>) -> HashMap<PackId, BTreeMap<u64, LiveBlob>> {
        let mut out: HashMap<PackId, BTreeMap<u64, LiveBlob>> = HashMap::new();
        for ((p, o), b) in &self.blobs {
            if wanted.contains(p) {
                out.entry(*p).or_default().insert(*o, b.clone());
            }
        }
        out
    }
}

/// A pack worth repacking: its size and its live blobs by offset.
#[derive(Clone, Debug)]
pub(crate) struct Candidate {
    pub pack: PackId,
    pub size: u64,
    pub live: BTreeMap<u64, LiveBlob>,
}

impl Candidate {
    pub(crate) fn live_bytes(&self) -> u64 {
        self.live.values().map(|b| b.stored as u64).sum()
    }
}

/// The live packs to repack (`sizes`: every pack's size; `live`: the live blobs of each, by
/// offset): the deadest first (by dead share), until the dead bytes left in live packs are at
/// most `max_unused` of the live bytes, and at most `budget` bytes of packs read.
pub(crate) fn candidates(
    sizes: &HashMap<PackId, u64>,
    live: &Live,
    budget: u64,
    max_unused: f64,
) -> Vec<Candidate> {
    // (pack, size, live bytes, live blobs)
    type Row = (PackId, u64, u64, u64);
    let mut all: Vec<Row> = live
        .packs
        .iter()
        .filter_map(|(p, (bytes, count))| Some((*p, *sizes.get(p)?, *bytes, *count)))
        .collect();
    let live_total: u64 = all.iter().map(|c| c.2).sum();
    // Dead: what a pack of only its live blobs would not hold (dead blobs and their index
    // entries; a pack's own header and trailer are not dead).
    let dead = |c: &Row| c.1.saturating_sub(sealed_size(c.3, c.2));
    let mut dead_total: u64 = all.iter().map(dead).sum();
    let allowed = (live_total as f64 * max_unused.max(0.0)) as u64;
    // Deadest share first; ties: the bigger dead first.
    all.sort_by(|a, b| {
        let share = |c: &Row| dead(c) as f64 / c.1.max(1) as f64;
        share(b).total_cmp(&share(a)).then(dead(b).cmp(&dead(a)))
    });
    let mut chosen: Vec<(PackId, u64)> = Vec::new();
    let mut read = 0u64;
    for c in &all {
        if dead_total <= allowed || dead(c) == 0 {
            break;
        }
        if read + c.1 > budget {
            continue;
        }
        read += c.1;
        dead_total -= dead(c);
        chosen.push((c.0, c.1));
    }
    let wanted: HashSet<PackId> = chosen.iter().map(|c| c.0).collect();
    let mut blobs = live.of(&wanted);
    chosen
        .into_iter()
        .map(|(pack, size)| Candidate {
            pack,
            size,
            live: blobs.remove(&pack).unwrap_or_default(),
        })
        .collect()
}

/// What a repack did: the forward records written (by the pack they are for), the packs
/// written, and the bytes read and moved.
#[derive(Debug, Default)]
pub(crate) struct Repacked {
    pub forwards: Vec<PackId>,
    pub packs_written: u64,
    pub bytes_read: u64,
    pub bytes_moved: u64,
}

/// Moves the live blobs of `cands` into new packs (each old pack read whole, its index checked
/// and every live blob verified against its id), uploads the new packs, then writes the
/// forward records: one per pack trees name the moved blobs by (the old pack itself, or the
/// packs a blob was moved from before, so a blob stays one hop from where trees name it). A
/// crash before a forward is written leaves new packs nothing references (garbage for a later
/// run); after, the forward is correct whatever follows.
pub(crate) fn repack(
    store: &Store,
    cands: &[Candidate],
    progress: &dyn Progress,
) -> Result<Repacked> {
    let mut done = Repacked::default();
    let total: u64 = cands.iter().map(|c| c.size).sum();
    progress.begin("repacking", total, cands.len() as u64);
    let mut writer = PackWriter::new();
    let mut pending: BTreeMap<PackId, Vec<Moved>> = BTreeMap::new();
    for (i, c) in cands.iter().enumerate() {
        let pack = read_pack(store, c.pack)?;
        done.bytes_read += c.size;
        let by_offset: HashMap<u64, _> = pack.entries().iter().map(|e| (e.offset, *e)).collect();
        for (&offset, blob) in &c.live {
            let (id, len) = (blob.id, blob.len);
            let e = by_offset
                .get(&offset)
                .filter(|e| e.id == id && e.len == len)
                .ok_or_else(|| {
                    StoreError::corrupt(
                        c.pack.key(),
                        format!("blob {id} at offset {offset} is not in the pack's index"),
                    )
                })?;
            // The stored bytes move as they are (compressed or not), checked first.
            let at = pack.entry_ref(e);
            let stored = pack.stored(&at)?;
            open_blob(&at, stored.clone())?;
            if writer.len() + stored.len() as u64 > PACK_TARGET_SIZE && !writer.is_empty() {
                let (id, bytes) = std::mem::take(&mut writer).seal();
                store.put(&id.key(), bytes)?;
                done.packs_written += 1;
            }
            let to = writer.add_encoded(&Encoded {
                kind: e.kind,
                id,
                len,
                codec: e.codec,
                stored,
            });
            done.bytes_moved += len as u64;
            let here = blob.direct.then_some((c.pack, offset));
            for &(named, named_offset) in here.iter().chain(&blob.moved_from) {
                pending.entry(named).or_default().push(Moved {
                    id,
                    offset: named_offset,
                    len,
                    to: to.pack,
                    to_offset: to.offset,
                });
            }
        }
        progress.update(done.bytes_read, i as u64 + 1);
    }
    if !writer.is_empty() {
        let (id, bytes) = writer.seal();
        store.put(&id.key(), bytes)?;
        done.packs_written += 1;
    }
    fail::fail_point!("repack-before-forwards");
    for (pack, moved) in pending {
        forward::write(
            store,
            &ForwardRecord {
                pack,
                time_unix_ms: store.clock().unix_ms(),
                moved,
            },
        )?;
        done.forwards.push(pack);
    }
    progress.finish();
    Ok(done)
}
