//! Store growth under the default retention (issue 14's figure): a 1 GiB file (a SQLite
//! database), one 4 KiB page rewritten every simulated second for two hours, one generation
//! per second built as a cut builds it (the changed range re-chunked with `chunk::rechunk`,
//! list blobs deduplicated, the root tree written anew, one pack per generation). Then GC at
//! the end, and twice more a grace apart. Time is a `ManualClock`. Prints one JSON object: store
//! bytes before and after, and the bytes the kept generations reach (what they need by
//! definition).
//!
//! `cargo run --release -p owsfs-store --example growth -- DIR [MiB] [SECONDS]`

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use owsfs_store::chunk::{chunk_ranges, rechunk};
use owsfs_store::gc::{self, GcOptions};
use owsfs_store::pack::{BlobKind, PackWriter};
use owsfs_store::progress::Silent;
use owsfs_store::tree::{
    Content, FileContent, NodeKind, Tree, TreeEntry, build_file_content_with, decode_list,
    file_chunks,
};
use owsfs_store::{
    BlobId, BlobRef, ChunkSpan, GenKind, GenStats, GenerationRecord, ManualClock, Store,
    StoreOptions, Workspace, read_blob,
};

const PAGE: usize = 4096;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// One generation: `spans` as the file's content, `known` list blobs reused by id.
fn commit(
    ws: &Workspace,
    store: &Store,
    n: u64,
    pack: &mut PackWriter,
    spans: &[ChunkSpan],
    len: u64,
    known: &mut HashMap<BlobId, BlobRef>,
) {
    let refs: Vec<BlobRef> = spans.iter().map(|s| s.r).collect();
    let content = build_file_content_with(refs, &mut |k, b| {
        let id = BlobId::of(b);
        if let Some(r) = known.get(&id) {
            return Ok(*r);
        }
        let r = pack.add(k, b);
        known.insert(id, r);
        Ok(r)
    })
    .unwrap();
    let entry = TreeEntry {
        name: b"app.db".to_vec(),
        kind: NodeKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_sec: n as i64,
        mtime_nsec: 0,
        size: len,
        rdev: 0,
        link_key: 0,
        xattrs: vec![],
        content: Content::File(content),
    };
    let root = pack.add(
        BlobKind::Tree,
        &Tree {
            entries: vec![entry],
        }
        .encode()
        .unwrap(),
    );
    let (id, bytes) = std::mem::take(pack).seal();
    store.put(&id.key(), bytes).unwrap();
    ws.commit(&GenerationRecord {
        workspace: ws.name().into(),
        number: n,
        parent: (n > 1).then(|| n - 1),
        epoch: 1,
        kind: GenKind::Commit,
        time_unix_ms: store.clock().unix_ms(),
        root: Some(root),
        sqlite: vec![],
        stats: GenStats {
            files: 1,
            dirs: 1,
            bytes_total: len,
            ..Default::default()
        },
        access: None,
    })
    .unwrap();
}

/// Bytes of the distinct blobs the kept generations reach.
fn needed(ws: &Workspace, store: &Store) -> u64 {
    let mut seen: HashSet<BlobId> = HashSet::new();
    let mut bytes = 0u64;
    let mut add = |r: &BlobRef| {
        if seen.insert(r.id) {
            bytes += r.len as u64;
        }
    };
    for n in ws.list_generations().unwrap() {
        let g = ws.read_generation(n).unwrap();
        let Some(root) = g.root else { continue };
        add(&root);
        for e in Tree::load(store, &root).unwrap().entries {
            if let Content::File(f) = &e.content {
                if let FileContent::List(lists) = f {
                    for l in lists {
                        add(&l.blob);
                        let b = read_blob(store, &l.blob).unwrap();
                        for r in decode_list("list", &b).unwrap() {
                            add(&r);
                        }
                    }
                } else {
                    for s in file_chunks(store, f).unwrap() {
                        add(&s.r);
                    }
                }
            }
        }
    }
    bytes
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: growth DIR [MiB] [SECONDS]");
    let mib: usize = args.next().map_or(1024, |s| s.parse().unwrap());
    let seconds: u64 = args.next().map_or(7200, |s| s.parse().unwrap());
    let root = Path::new(&dir).join("growth-store");
    let _ = std::fs::remove_dir_all(&root);
    let clock = Arc::new(ManualClock::starting_at_unix_ms(1_800_000_000_000));
    let store = Store::open(
        &format!("file://{}", root.display()),
        StoreOptions {
            clock: clock.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    let ws = Workspace::open_or_create(&store, "db").unwrap();
    // The wall time the simulation took (a benchmark's own measure, not the store's time).
    #[allow(clippy::disallowed_methods)]
    let started = Instant::now();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut data = vec![0u8; mib << 20];
    rng.fill(&mut data);
    let len = data.len() as u64;
    let mut known: HashMap<BlobId, BlobRef> = HashMap::new();
    // Generation 1: the whole file, in packs of about 16 MiB.
    let mut spans = Vec::new();
    let mut pack = PackWriter::new();
    for r in chunk_ranges(&data) {
        let b = pack.add(BlobKind::Chunk, &data[r.clone()]);
        spans.push(ChunkSpan {
            r: b,
            offset: r.start as u64,
        });
        if pack.len() >= owsfs_store::pack::PACK_TARGET_SIZE {
            let (id, bytes) = std::mem::take(&mut pack).seal();
            store.put(&id.key(), bytes).unwrap();
        }
    }
    commit(&ws, &store, 1, &mut pack, &spans, len, &mut known);
    // One page a second.
    let pages = data.len() / PAGE;
    for n in 2..=seconds + 1 {
        clock.advance(Duration::from_secs(1));
        let p = (rng.next() as usize % pages) * PAGE;
        rng.fill(&mut data[p..p + PAGE]);
        let dirty = p as u64..(p + PAGE) as u64;
        let mut pack = PackWriter::new();
        spans = rechunk(
            &spans,
            len,
            len,
            std::slice::from_ref(&dirty),
            &mut |off, buf| {
                buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
                Ok(())
            },
            &mut |b| Ok(pack.add(BlobKind::Chunk, b)),
        )
        .unwrap();
        commit(&ws, &store, n, &mut pack, &spans, len, &mut known);
    }
    let built_secs = started.elapsed().as_secs_f64();
    let before = dir_bytes(&root);
    let gens_before = ws.list_generations().unwrap().len();
    // GC at the end, and twice more a grace apart: a pack goes a grace after a run condemned
    // it, so the third run shows the steady state.
    let opts = GcOptions::default();
    let mut deleted = 0;
    for i in 0..3 {
        if i > 0 {
            clock.advance(opts.grace + Duration::from_secs(1));
        }
        deleted += gc::collect(&store, &opts, &Silent).unwrap().packs_deleted;
    }
    let after = dir_bytes(&root);
    let need = needed(&ws, &store);
    println!(
        "{}",
        serde_json::json!({
            "file_bytes": len,
            "seconds": seconds,
            "generations_before": gens_before,
            "generations_after": ws.list_generations().unwrap().len(),
            "store_bytes_before_gc": before,
            "store_bytes_after_gc": after,
            "bytes_kept_generations_need": need,
            "packs_deleted": deleted,
            "build_secs": built_secs,
        })
    );
    let _ = std::fs::remove_dir_all(&root);
}
