//! Repacking (`FORMAT.md`, "Repack"): a GC run moves the live blobs of packs that are mostly
//! dead into new packs and writes a forward record for each old pack; the old pack is then
//! referenced by nothing but forwarded blobs, so it is condemned like any unreferenced pack and
//! deleted a grace later. Stored trees never change: readers find a moved blob through the
//! forwards (`crate::forward`).

use std::collections::{BTreeMap, HashMap};

use crate::backend::Store;
use crate::error::{Result, StoreError};
use crate::forward::{self, ForwardRecord, Moved};
use crate::ids::{BlobId, PackId};
use crate::pack::{PACK_TARGET_SIZE, PackWriter, read_pack};
use crate::progress::Progress;

/// A pack is repacked when less than this share of its bytes is live...
pub const REPACK_LIVE_BELOW: f64 = 0.5;
/// ...and at least this many of its bytes are dead (the default of
/// `GcOptions::repack_min_dead`).
pub const REPACK_MIN_DEAD: u64 = 1 << 20;

/// A pack worth repacking: its size and its live blobs by offset.
#[derive(Clone, Debug)]
pub(crate) struct Candidate {
    pub pack: PackId,
    pub size: u64,
    pub live: BTreeMap<u64, (BlobId, u32)>,
}

impl Candidate {
    pub(crate) fn live_bytes(&self) -> u64 {
        self.live.values().map(|(_, l)| *l as u64).sum()
    }
}

/// The live packs (`sizes`: every pack's size; `live`: the live blobs of each, by offset)
/// that are mostly dead (less than half live, at least `min_dead` bytes dead), the deadest
/// first, up to `budget` bytes of packs to read.
pub(crate) fn candidates(
    sizes: &HashMap<PackId, u64>,
    live: &HashMap<PackId, HashMap<u64, (BlobId, u32)>>,
    budget: u64,
    min_dead: u64,
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = live
        .iter()
        .filter_map(|(p, blobs)| {
            let size = *sizes.get(p)?;
            let live: u64 = blobs.values().map(|(_, l)| *l as u64).sum();
            let dead = size.saturating_sub(live);
            ((live as f64) < size as f64 * REPACK_LIVE_BELOW && dead >= min_dead.max(1)).then(
                || Candidate {
                    pack: *p,
                    size,
                    live: blobs.iter().map(|(o, v)| (*o, *v)).collect(),
                },
            )
        })
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.size - c.live_bytes()));
    let mut read = 0u64;
    out.retain(|c| {
        read += c.size;
        read <= budget
    });
    out
}

/// What a repack did: per old pack, where its live blobs went; and the bytes moved.
#[derive(Debug, Default)]
pub(crate) struct Repacked {
    pub forwards: Vec<(PackId, Vec<Moved>)>,
    pub packs_written: u64,
    pub bytes_read: u64,
    pub bytes_moved: u64,
}

/// Moves the live blobs of `cands` into new packs (each old pack read whole, its index checked
/// and every live blob verified against its id), uploads the new packs, then writes one
/// forward record per old pack. A crash before a forward is written leaves new packs nothing
/// references (garbage for a later run); after, the forward is correct whatever follows.
pub(crate) fn repack(
    store: &Store,
    cands: &[Candidate],
    progress: &dyn Progress,
) -> Result<Repacked> {
    let mut done = Repacked::default();
    let total: u64 = cands.iter().map(|c| c.size).sum();
    progress.begin("repacking", total, cands.len() as u64);
    let mut writer = PackWriter::new();
    let mut pending: Vec<(PackId, Vec<Moved>)> = Vec::new();
    for (i, c) in cands.iter().enumerate() {
        let pack = read_pack(store, c.pack)?;
        done.bytes_read += c.size;
        let by_offset: HashMap<u64, _> = pack.entries().iter().map(|e| (e.offset, *e)).collect();
        let mut moved = Vec::with_capacity(c.live.len());
        for (&offset, &(id, len)) in &c.live {
            let e = by_offset
                .get(&offset)
                .filter(|e| e.id == id && e.len == len)
                .ok_or_else(|| {
                    StoreError::corrupt(
                        c.pack.key(),
                        format!("blob {id} at offset {offset} is not in the pack's index"),
                    )
                })?;
            let data = pack.entry_blob(e)?;
            if writer.len() + data.len() as u64 > PACK_TARGET_SIZE && !writer.is_empty() {
                let (id, bytes) = std::mem::take(&mut writer).seal();
                store.put(&id.key(), bytes)?;
                done.packs_written += 1;
            }
            let to = writer.add(e.kind, &data);
            done.bytes_moved += len as u64;
            moved.push(Moved {
                id,
                offset,
                len,
                to: to.pack,
                to_offset: to.offset,
            });
        }
        pending.push((c.pack, moved));
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
                moved: moved.clone(),
            },
        )?;
        done.forwards.push((pack, moved));
    }
    progress.finish();
    Ok(done)
}
