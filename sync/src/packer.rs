//! The packer of a cut: deduplicates new blobs against the cut and the cache's chunk index,
//! encodes (hashes, compresses) chunks on every core, and uploads full packs.
//!
//! A chunk emitted by the chunker is not placed at once: it waits in a batch, and the chunker
//! gets a *provisional* ref (the right id and length, pack [`PROVISIONAL`]). When the batch
//! is large enough, or a ref must be final (a list or tree is about to be encoded), the batch
//! is encoded in parallel and placed in order; [`Packer::resolve`] then turns provisional
//! refs into final ones. No provisional ref ever reaches an encoded blob: trees and lists are
//! built from resolved refs only, and placing one checks it.

use std::collections::{HashMap, HashSet};

use owsfs_local::{LocalState, Update};
use owsfs_store::pack::{Encoded, PACK_TARGET_SIZE, encode_blobs, encode_known};
use owsfs_store::{
    BlobId, BlobKind, BlobRef, Compression, FileContent, PackId, PackWriter, Result, Store,
    StoreError,
};

/// The pack of a ref whose chunk is still waiting to be placed.
pub const PROVISIONAL: PackId = PackId([0; 32]);

/// Bytes of chunks that wait for encoding before a batch is encoded (bounds the memory of a
/// cut of a large file).
const BATCH_BYTES: usize = 8 << 20;

/// Packs new blobs and uploads full packs.
pub struct Packer<'a> {
    store: &'a Store,
    local: &'a LocalState,
    pack: PackWriter,
    compression: Compression,
    /// Blobs placed during this cut, by id (dedup within the cut).
    added: HashMap<BlobId, BlobRef>,
    /// Chunks waiting to be encoded and placed, in the order they came.
    pending: Vec<(BlobId, Vec<u8>)>,
    pending_ids: HashSet<BlobId>,
    pending_bytes: usize,
    pub update: Update,
    pub bytes_new: u64,
    pub blobs_new: u64,
    pub packs_new: u64,
    /// Every pack a blob of this cut is in (new or deduplicated).
    pub used: HashSet<PackId>,
}

impl<'a> Packer<'a> {
    pub fn new(store: &'a Store, local: &'a LocalState, update: Update) -> Packer<'a> {
        Packer {
            store,
            local,
            pack: store.pack_writer(),
            compression: store.compression(),
            added: HashMap::new(),
            pending: Vec::new(),
            pending_ids: HashSet::new(),
            pending_bytes: 0,
            update,
            bytes_new: 0,
            blobs_new: 0,
            packs_new: 0,
            used: HashSet::new(),
        }
    }

    /// A chunk of file content: its ref may be provisional until [`Packer::resolve`].
    pub fn chunk(&mut self, data: &[u8]) -> Result<BlobRef> {
        let id = BlobId::of(data);
        if let Some(r) = self.known(id, true) {
            return Ok(r);
        }
        let len = data.len() as u32;
        if self.pending_ids.insert(id) {
            self.pending.push((id, data.to_vec()));
            self.pending_bytes += data.len();
            if self.pending_bytes >= BATCH_BYTES {
                self.settle()?;
                return Ok(self.added[&id]);
            }
        }
        Ok(BlobRef::plain(id, PROVISIONAL, 0, len))
    }

    /// A tree or list blob (or any blob that must have its final ref now).
    pub fn emit(&mut self, kind: BlobKind, data: &[u8]) -> Result<BlobRef> {
        self.emit_as(kind, data, true)
    }

    /// `compress`: false for the blobs that JSON records name (the root tree, the access
    /// list): they stay plain, so that an owsfs that predates compression reads the record
    /// and its root, and then refuses the compressed trees below it with "upgrade owsfs".
    pub fn emit_as(&mut self, kind: BlobKind, data: &[u8], compress: bool) -> Result<BlobRef> {
        let id = BlobId::of(data);
        if let Some(r) = self.known(id, compress) {
            return Ok(r);
        }
        if self.pending_ids.contains(&id) {
            self.settle()?;
            if let Some(r) = self.known(id, compress) {
                return Ok(r);
            }
        }
        if kind != BlobKind::Chunk {
            check_final(kind, data)?;
        }
        let c = if compress {
            self.compression
        } else {
            Compression::Off
        };
        let e = encode_known(c, kind, id, data);
        self.place(&e, (kind != BlobKind::Chunk).then_some(data))
    }

    /// A copy of blob `id` this cut may use: one placed by it, or one the cache knows of. A
    /// plain copy may stand for a compressed one, not the other way round.
    fn known(&mut self, id: BlobId, compress: bool) -> Option<BlobRef> {
        let fits = |r: &BlobRef| compress || r.codec.is_none();
        if let Some(r) = self.added.get(&id).filter(|r| fits(r)) {
            return Some(*r);
        }
        if let Ok(Some(r)) = self.local.chunk(&id.0)
            && fits(&r)
        {
            self.added.insert(id, r);
            self.used.insert(r.pack);
            return Some(r);
        }
        None
    }

    /// Encodes the waiting chunks on every core and places them in the order they came.
    pub fn settle(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending);
        self.pending_ids.clear();
        self.pending_bytes = 0;
        for e in encode_blobs(self.compression, BlobKind::Chunk, &batch) {
            self.place(&e, None)?;
        }
        Ok(())
    }

    /// The final ref of `r` (placing the waiting chunks first when it is provisional).
    pub fn resolve(&mut self, r: BlobRef) -> Result<BlobRef> {
        if r.pack != PROVISIONAL {
            return Ok(r);
        }
        self.settle()?;
        self.added.get(&r.id).copied().ok_or_else(|| {
            StoreError::Invalid(format!("chunk {} of this cut was never placed", r.id))
        })
    }

    /// [`Packer::resolve`] of every ref of a file's content.
    pub fn resolve_content(&mut self, c: &mut FileContent) -> Result<()> {
        match c {
            FileContent::Empty => {}
            FileContent::Chunks(refs) => {
                for r in refs.iter_mut() {
                    *r = self.resolve(*r)?;
                }
            }
            FileContent::List(lists) => {
                for l in lists.iter_mut() {
                    l.blob = self.resolve(l.blob)?;
                }
            }
        }
        Ok(())
    }

    fn place(&mut self, e: &Encoded, plain: Option<&[u8]>) -> Result<BlobRef> {
        let r = self.pack.add_encoded(e);
        self.added.insert(e.id, r);
        self.used.insert(r.pack);
        self.bytes_new += e.len as u64;
        self.blobs_new += 1;
        self.update.chunks.push((
            e.id.0,
            serde_json::to_vec(&r)
                .map_err(|err| StoreError::corrupt("blob ref", err.to_string()))?,
        ));
        if let Some(data) = plain {
            self.update.blobs.push((e.id.0, data.to_vec()));
        }
        if self.pack.len() >= PACK_TARGET_SIZE {
            self.seal_pack()?;
        }
        Ok(r)
    }

    /// Places the waiting chunks and uploads the pack being filled.
    pub fn flush(&mut self) -> Result<()> {
        self.settle()?;
        self.seal_pack()
    }

    /// Uploads the pack being filled (when it holds anything).
    fn seal_pack(&mut self) -> Result<()> {
        if self.pack.is_empty() {
            return Ok(());
        }
        let pack = std::mem::replace(&mut self.pack, self.store.pack_writer());
        let (id, bytes) = pack.seal();
        self.store.put(&id.key(), bytes)?;
        self.packs_new += 1;
        Ok(())
    }
}

/// Refuses a tree or list blob that names a provisional ref (a bug in the cut).
fn check_final(kind: BlobKind, data: &[u8]) -> Result<()> {
    let refs: Vec<BlobRef> = match kind {
        BlobKind::List => owsfs_store::tree::decode_list("new list blob", data)?,
        BlobKind::Tree => owsfs_store::Tree::decode("new tree blob", data)?
            .entries
            .iter()
            .flat_map(|e| e.content.refs().copied().collect::<Vec<_>>())
            .collect(),
        BlobKind::Chunk => Vec::new(),
    };
    if refs.iter().any(|r| r.pack == PROVISIONAL) {
        return Err(StoreError::Invalid(format!(
            "a new {kind:?} blob names a chunk not placed yet"
        )));
    }
    Ok(())
}
