//! Pack forwards: where the live blobs of a repacked pack went (`FORMAT.md`, "Repack").
//!
//! Trees and lists name blobs by pack and offset, and stored trees never change, so a GC that
//! moves the live blobs of a mostly-dead pack into a new pack writes a forward record for the
//! old one: each moved blob, by its old offset, with its new pack and offset. Once the old pack
//! is gone, a read of a blob in it finds the blob through the forwards ([`locate`]); the bytes
//! are verified against the blob's id as always. Records are only ever added, never changed:
//! a blob repacked again gets a newer record under the pack the trees name, and the newest
//! record naming a blob wins, so a blob is one hop from where trees name it. A reader whose
//! cached forwards sent it to a pack a later repack emptied reads the forwards again.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::Store;
use crate::error::{Result, StoreError};
use crate::generation::{seal_json, unseal_json};
use crate::ids::{BlobId, PackId};
use crate::pack::BlobRef;

pub const FORWARD_VERSION: u64 = 1;

/// How many forwards a read follows (a pack repacked, its new pack repacked in turn, ...).
pub const MAX_HOPS: usize = 8;

/// A forward record `forwards/<hex[0..2]>/<pack hex>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRecord {
    /// The repacked pack.
    pub pack: PackId,
    /// When it was written (the GC's clock).
    pub time_unix_ms: u64,
    pub moved: Vec<Moved>,
}

/// One blob of a repacked pack and where it is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    pub id: BlobId,
    /// Its offset in the repacked pack.
    pub offset: u64,
    pub len: u32,
    pub to: PackId,
    pub to_offset: u64,
}

/// The forwards of one pack: moved blobs by their old offset.
#[derive(Clone, Debug, Default)]
pub struct Forwarded {
    by_offset: HashMap<u64, BlobRef>,
    /// The keys of the records.
    pub keys: Vec<String>,
}

impl Forwarded {
    /// Where blob `r` (in the forwarded pack) went, if a record names it.
    pub fn next(&self, r: &BlobRef) -> Option<BlobRef> {
        self.by_offset
            .get(&r.offset)
            .filter(|to| to.same_blob(r))
            // A repack copies a blob's stored bytes as they are: codec and stored length
            // stay the ref's.
            .map(|to| BlobRef {
                pack: to.pack,
                offset: to.offset,
                ..*r
            })
    }

    /// The packs its blobs went to.
    pub fn targets(&self) -> impl Iterator<Item = PackId> + '_ {
        self.by_offset.values().map(|r| r.pack)
    }

    /// Adds a record; records are added in key order (oldest first), and where two name the
    /// same blob (it was repacked again, or two GCs repacked it at once) the newest wins.
    fn add(&mut self, key: String, rec: &ForwardRecord) {
        for m in &rec.moved {
            self.by_offset
                .insert(m.offset, BlobRef::plain(m.id, m.to, m.to_offset, m.len));
        }
        self.keys.push(key);
    }
}

/// The key prefix of pack `p`'s forwards.
pub fn prefix(p: &PackId) -> String {
    let h = p.to_hex();
    format!("forwards/{}/{h}/", &h[..2])
}

/// Writes a forward record (create-if-absent: a name is never reused).
pub fn write(store: &Store, rec: &ForwardRecord) -> Result<String> {
    let key = format!(
        "{}{:020}-{:016x}",
        prefix(&rec.pack),
        rec.time_unix_ms,
        rand::random::<u64>()
    );
    store.put_if_absent(
        &key,
        seal_json("owsfs-forward", FORWARD_VERSION, "forward", rec)?,
    )?;
    Ok(key)
}

fn read_record(store: &Store, key: &str) -> Result<Option<ForwardRecord>> {
    match store.get(key) {
        Ok(b) => unseal_json("owsfs-forward", FORWARD_VERSION, key, &b).map(Some),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Pack `p`'s forwards, read from the store (empty when it has none).
pub fn read(store: &Store, p: &PackId) -> Result<Forwarded> {
    let mut f = Forwarded::default();
    for key in store.list(&prefix(p))? {
        if let Some(rec) = read_record(store, &key)? {
            if rec.pack != *p {
                return Err(StoreError::corrupt(&key, "the record names another pack"));
            }
            f.add(key, &rec);
        }
    }
    Ok(f)
}

/// Every forward of the store, by pack (for a GC's mark).
pub fn read_all(store: &Store) -> Result<HashMap<PackId, Forwarded>> {
    let mut out: HashMap<PackId, Forwarded> = HashMap::new();
    for key in store.list("forwards/")? {
        let Some(rec) = read_record(store, &key)? else {
            continue;
        };
        if !key.starts_with(&prefix(&rec.pack)) {
            return Err(StoreError::corrupt(&key, "the record names another pack"));
        }
        out.entry(rec.pack).or_default().add(key, &rec);
    }
    Ok(out)
}

/// Where blob `r` went, its pack being gone: the next location the forwards give, or `None`
/// when none names it. Forwards read once are kept by the store; a miss, or `fresh`, reads
/// them again (a later GC may have added some).
pub fn locate(store: &Store, r: &BlobRef, fresh: bool) -> Result<Option<BlobRef>> {
    if !fresh
        && let Some(f) = store.forwards_cached(&r.pack)
        && let Some(to) = f.next(r)
    {
        return Ok(Some(to));
    }
    let f = Arc::new(read(store, &r.pack)?);
    let to = f.next(r);
    store.cache_forwards(r.pack, f);
    Ok(to)
}

/// Follows the forwards of `r` to the end of the chain, given what GC read
/// (`forwards`): the final location, and every pack whose forwards were used on the way.
pub fn resolve(forwards: &HashMap<PackId, Forwarded>, r: &BlobRef) -> (BlobRef, Vec<PackId>) {
    let mut cur = *r;
    let mut via = Vec::new();
    for _ in 0..MAX_HOPS {
        match forwards.get(&cur.pack).and_then(|f| f.next(&cur)) {
            Some(next) => {
                via.push(cur.pack);
                cur = next;
            }
            None => break,
        }
    }
    (cur, via)
}
