//! The packer of a cut: deduplicates new blobs against the cut and the cache's chunk index,
//! encodes (hashes, compresses) chunks on the other cores, and uploads full packs.
//!
//! A chunk emitted by the chunker is not placed at once: it joins a batch, and the chunker
//! gets a *provisional* ref (the right id and length, pack [`PROVISIONAL`]). Full batches go
//! to encoder threads (one per core but the chunker's) while the chunker reads on; the
//! encoded chunks are placed in the order they came, whenever the chunker next emits, and all
//! of them when a ref must be final (a list or tree is about to be encoded, or the pack is
//! sealed).
//! [`Packer::resolve`] turns provisional refs into final ones. No provisional ref ever reaches
//! an encoded blob: trees and lists are built from resolved refs only, and placing one checks
//! it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use owsfs_local::{LocalState, Update};
use owsfs_store::pack::{Encoded, PACK_TARGET_SIZE, encode_known, encode_owned};
use owsfs_store::{
    BlobId, BlobKind, BlobRef, Compression, FileContent, PackId, PackWriter, Result, Store,
    StoreError,
};

/// The pack of a ref whose chunk is still waiting to be placed.
pub const PROVISIONAL: PackId = PackId([0; 32]);

/// Bytes of chunks in a batch handed to an encoder thread.
const BATCH_BYTES: usize = 1 << 20;

/// Packs uploaded at once by one cut.
const MAX_UPLOADS: usize = 2;

/// Batches at most in the encoders' hands per encoder thread (bounds the memory of a cut of a
/// large file: the chunker waits for the oldest batch beyond this).
const IN_FLIGHT_PER_THREAD: u64 = 4;

type Batch = Vec<(BlobId, Vec<u8>)>;

/// Encoder threads: batches in by number, encoded batches out by number.
struct Encoders {
    jobs: Option<Sender<(u64, Batch)>>,
    done: Receiver<(u64, Vec<Encoded>)>,
    threads: Vec<JoinHandle<()>>,
    /// The number of the next batch to send, and of the next to place.
    sent: u64,
    placed: u64,
    /// Encoded batches that came back before an older one.
    early: BTreeMap<u64, Vec<Encoded>>,
}

impl Encoders {
    fn start(compression: Compression) -> Encoders {
        // One core stays the chunker's: it is the cut's critical path.
        let n = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_sub(1)
            .max(1);
        let (jobs, rx) = crossbeam_channel::unbounded::<(u64, Batch)>();
        let (tx, done) = crossbeam_channel::unbounded();
        let threads = (0..n)
            .map(|i| {
                let (rx, tx) = (rx.clone(), tx.clone());
                std::thread::Builder::new()
                    .name(format!("owsfs-encode-{i}"))
                    .spawn(move || {
                        for (seq, batch) in rx {
                            let out = batch
                                .into_iter()
                                .map(|(id, data)| {
                                    encode_owned(compression, BlobKind::Chunk, id, data)
                                })
                                .collect();
                            if tx.send((seq, out)).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("cannot start an encoder thread")
            })
            .collect();
        Encoders {
            jobs: Some(jobs),
            done,
            threads,
            sent: 0,
            placed: 0,
            early: BTreeMap::new(),
        }
    }

    fn in_flight(&self) -> u64 {
        self.sent - self.placed
    }

    fn send(&mut self, batch: Batch) {
        let jobs = self.jobs.as_ref().expect("encoders running");
        jobs.send((self.sent, batch))
            .expect("encoder threads alive");
        self.sent += 1;
    }

    /// The next batch in order: `None` when none is out, or (not `wait`) it is not back yet.
    fn next(&mut self, wait: bool) -> Option<Vec<Encoded>> {
        loop {
            if let Some(b) = self.early.remove(&self.placed) {
                self.placed += 1;
                return Some(b);
            }
            if self.in_flight() == 0 {
                return None;
            }
            let got = if wait {
                self.done.recv().ok()
            } else {
                self.done.try_recv().ok()
            };
            let (seq, b) = got?;
            self.early.insert(seq, b);
        }
    }
}

impl Drop for Encoders {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Packs new blobs and uploads full packs.
pub struct Packer<'a> {
    store: &'a Store,
    local: &'a LocalState,
    pack: PackWriter,
    compression: Compression,
    /// Blobs placed during this cut, by id (dedup within the cut).
    added: HashMap<BlobId, BlobRef>,
    /// Chunks gathered for the next batch, in the order they came.
    batch: Batch,
    batch_bytes: usize,
    /// Every chunk in a batch not placed yet.
    pending_ids: HashSet<BlobId>,
    /// Started with the first batch (none when nothing is compressed).
    encoders: Option<Encoders>,
    /// Packs being uploaded while the cut goes on (oldest first).
    uploads: std::collections::VecDeque<JoinHandle<Result<()>>>,
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
            batch: Vec::new(),
            batch_bytes: 0,
            pending_ids: HashSet::new(),
            encoders: None,
            uploads: Default::default(),
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
        if self.compression == Compression::Off {
            // Nothing to spread over cores: a copy.
            let e = encode_known(Compression::Off, BlobKind::Chunk, id, data);
            return self.place(&e, None);
        }
        if self.pending_ids.insert(id) {
            self.batch.push((id, data.to_vec()));
            self.batch_bytes += data.len();
            if self.batch_bytes >= BATCH_BYTES {
                self.send_batch();
            }
            self.place_ready()?;
        }
        Ok(BlobRef::plain(id, PROVISIONAL, 0, data.len() as u32))
    }

    /// Hands the gathered chunks to the encoders.
    fn send_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let c = self.compression;
        self.encoders
            .get_or_insert_with(|| Encoders::start(c))
            .send(batch);
    }

    /// Places the encoded batches that are back, in order; waits for the oldest while too many
    /// are out.
    fn place_ready(&mut self) -> Result<()> {
        loop {
            let Some(enc) = self.encoders.as_mut() else {
                return Ok(());
            };
            let cap = IN_FLIGHT_PER_THREAD * enc.threads.len() as u64;
            let wait = enc.in_flight() > cap;
            let Some(done) = enc.next(wait) else {
                return Ok(());
            };
            for e in &done {
                self.pending_ids.remove(&e.id);
                self.place(e, None)?;
            }
        }
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

    /// Encodes every waiting chunk and places it (in the order they came).
    pub fn settle(&mut self) -> Result<()> {
        self.send_batch();
        while let Some(done) = self.encoders.as_mut().and_then(|enc| enc.next(true)) {
            for e in &done {
                self.pending_ids.remove(&e.id);
                self.place(e, None)?;
            }
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

    /// Places the waiting chunks, uploads the pack being filled, and waits until every pack
    /// of the cut is in the store.
    pub fn flush(&mut self) -> Result<()> {
        self.settle()?;
        self.seal_pack()?;
        while !self.uploads.is_empty() {
            self.wait_upload()?;
        }
        Ok(())
    }

    /// Waits for the oldest upload.
    fn wait_upload(&mut self) -> Result<()> {
        match self.uploads.pop_front() {
            Some(t) => t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            None => Ok(()),
        }
    }

    /// Uploads the pack being filled (when it holds anything).
    fn seal_pack(&mut self) -> Result<()> {
        if self.pack.is_empty() {
            return Ok(());
        }
        let pack = std::mem::replace(&mut self.pack, self.store.pack_writer());
        let id = pack.id();
        // The upload runs beside the cut (the commit record is written only after `flush`
        // waited for every one); at most MAX_UPLOADS at once.
        while self.uploads.len() >= MAX_UPLOADS {
            self.wait_upload()?;
        }
        let store = self.store.clone();
        let t = std::thread::Builder::new()
            .name("owsfs-pack-put".into())
            .spawn(move || store.put(&id.key(), pack.seal().1))
            .map_err(|e| StoreError::io("cannot start a pack upload", e))?;
        self.uploads.push_back(t);
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
