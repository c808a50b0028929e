//! Repacking: a mostly dead pack's live blobs move to a new pack with a forward record, the old
//! pack goes a grace later, reads and copies find the blobs through the forwards, and the
//! forwards go once nothing kept reaches them. On a memory store with a manual clock.

use std::sync::Arc;
use std::time::Duration;

use owsfs_store::gc::{self, GcOptions, GcReport};
use owsfs_store::pack::{BlobKind, PackWriter};
use owsfs_store::progress::Silent;
use owsfs_store::retention::Policy;
use owsfs_store::tree::{Content, FileContent, NodeKind, Tree, TreeEntry};
use owsfs_store::{
    BlobRef, Codec, Compression, GenKind, GenStats, GenerationRecord, Holder, ManualClock, PackId,
    Store, StoreOptions, Workspace,
};

const HOUR: Duration = Duration::from_secs(3600);
const FILE: usize = 64 << 10;

fn store(name: &str, clock: &Arc<ManualClock>) -> Store {
    Store::open(
        &format!("memory://repack-{name}-{}", std::process::id()),
        StoreOptions {
            clock: clock.clone(),
            gc_refresh: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .unwrap()
}

/// A file's bytes: incompressible for odd seeds, compressible (16 letters) for even ones, so
/// that packs hold both plain and zstd blobs.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            if seed.is_multiple_of(2) {
                b'a' + (x >> 60) as u8
            } else {
                (x >> 56) as u8
            }
        })
        .collect()
}

/// Commits the next generation: files `(name, chunk)`.
fn commit(s: &Store, ws: &Workspace, files: &[(String, BlobRef)]) -> GenerationRecord {
    let mut entries: Vec<TreeEntry> = files
        .iter()
        .map(|(name, r)| TreeEntry {
            name: name.as_bytes().to_vec(),
            kind: NodeKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: 1,
            mtime_nsec: 0,
            size: r.len as u64,
            rdev: 0,
            link_key: 0,
            xattrs: vec![],
            content: Content::File(FileContent::Chunks(vec![*r])),
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut p = PackWriter::new();
    let root = p.add(BlobKind::Tree, &Tree { entries }.encode().unwrap());
    let (id, bytes) = p.seal();
    s.put(&id.key(), bytes).unwrap();
    let head = ws.head().unwrap().unwrap_or(0);
    let r = GenerationRecord {
        workspace: ws.name().into(),
        number: head + 1,
        parent: (head > 0).then_some(head),
        epoch: 1,
        kind: GenKind::Commit,
        time_unix_ms: s.clock().unix_ms(),
        root: Some(root),
        sqlite: vec![],
        stats: GenStats::default(),
        access: None,
    };
    ws.commit(&r).unwrap();
    r
}

/// `n` files of 64 KiB in one pack: their chunks.
fn big_pack(s: &Store, n: u64) -> (PackId, Vec<(String, BlobRef)>) {
    let mut p = PackWriter::compressing(Compression::default());
    let files: Vec<(String, BlobRef)> = (0..n)
        .map(|i| (format!("f{i:02}"), p.add(BlobKind::Chunk, &noise(FILE, i))))
        .collect();
    if n > 1 {
        assert!(files.iter().any(|(_, r)| r.codec == Codec::Zstd));
        assert!(files.iter().any(|(_, r)| r.codec == Codec::None));
    }
    let (id, bytes) = p.seal();
    s.put(&id.key(), bytes).unwrap();
    (id, files)
}

fn gc(s: &Store) -> GcReport {
    gc::collect(
        s,
        &GcOptions {
            grace: HOUR,
            ..GcOptions::default()
        },
        &Silent,
    )
    .unwrap()
}

/// Every file of generation `g` reads back right, blob by blob and as one run.
fn reads_back(s: &Store, ws: &Workspace, g: u64) {
    let r = ws.read_generation(g).unwrap();
    let tree = Tree::load(s, &r.root.unwrap()).unwrap();
    let mut chunks = Vec::new();
    for e in &tree.entries {
        let Content::File(FileContent::Chunks(c)) = &e.content else {
            panic!("a file")
        };
        let seed: u64 = std::str::from_utf8(&e.name[1..]).unwrap().parse().unwrap();
        let got = owsfs_store::read_blob(s, &c[0]).unwrap();
        assert_eq!(
            &got[..],
            &noise(FILE, seed)[..],
            "{}",
            e.name.escape_ascii()
        );
        chunks.push((c[0], seed));
    }
    // Adjacent in the old pack: one run, read where the forwards say.
    chunks.sort_by_key(|(c, _)| (c.pack, c.offset));
    let run: Vec<BlobRef> = chunks.iter().map(|(c, _)| *c).collect();
    let adjacent = run
        .windows(2)
        .all(|w| w[0].pack == w[1].pack && w[0].end() == w[1].offset);
    if adjacent {
        let got = owsfs_store::read_blob_run(s, &run).unwrap();
        for (b, (_, seed)) in got.iter().zip(&chunks) {
            assert_eq!(&b[..], &noise(FILE, *seed)[..]);
        }
    }
}

fn pack_bytes(s: &Store) -> u64 {
    s.list("packs/")
        .unwrap()
        .iter()
        .map(|k| s.size(k).unwrap())
        .sum()
}

/// A store on a manual clock, workspace `w` keeping only its newest generation, and a first
/// generation of 40 files of 64 KiB in one pack: the clock, the store, the workspace, the
/// pack and the files.
fn setup(
    name: &str,
) -> (
    Arc<ManualClock>,
    Store,
    Workspace,
    PackId,
    Vec<(String, BlobRef)>,
) {
    let clock = Arc::new(ManualClock::starting_at_unix_ms(1_800_000_000_000));
    let s = store(name, &clock);
    let ws = Workspace::open_or_create(&s, "w").unwrap();
    ws.set_retention(&Policy {
        all_secs: 0,
        hourly_secs: 0,
        daily_secs: 0,
    })
    .unwrap();
    let (old, files) = big_pack(&s, 40);
    commit(&s, &ws, &files);
    (clock, s, ws, old, files)
}

#[test]
fn a_mostly_dead_pack_is_repacked_and_its_blobs_read_through_forwards() {
    let (clock, s, ws, old, files) = setup("basic");
    // Five adjacent files stay: 5 of 40 live.
    let g2 = commit(&s, &ws, &files[10..15]).number;
    let before = pack_bytes(&s);

    clock.advance(2 * HOUR);
    let r1 = gc(&s);
    assert_eq!(r1.generations_pruned, 1, "{r1:?}");
    assert_eq!(r1.packs_repacked, 1, "{r1:?}");
    assert_eq!(r1.repack_bytes_moved, 5 * FILE as u64);
    assert_eq!(r1.repack_packs_written, 1);
    assert!(!s.list("forwards/").unwrap().is_empty());
    reads_back(&s, &ws, g2);

    // A grace later the old pack goes; the blobs are read through the forward.
    clock.advance(2 * HOUR);
    let r2 = gc(&s);
    assert!(r2.packs_deleted >= 1, "{r2:?}");
    assert!(s.size(&old.key()).unwrap_err().is_not_found());
    reads_back(&s, &ws, g2);
    let after = pack_bytes(&s);
    assert!(
        after < before / 4,
        "{before} bytes of packs before, {after} after"
    );
    // Nothing more to repack: the new pack is all live.
    assert_eq!(gc(&s).packs_repacked, 0);

    // A copy of the workspace to another store reads the same, through the copied forward.
    let dst = store("copy-dst", &clock);
    owsfs_store::copy::copy_workspace(&ws, None, &dst, "w", &holder(), &Silent).unwrap();
    let copy = Workspace::open_existing(&dst, "w").unwrap().unwrap();
    reads_back(&dst, &copy, g2);
    assert_eq!(dst.list("forwards/").unwrap(), s.list("forwards/").unwrap());

    // Once nothing kept reaches the old pack, its forward goes too, then the new pack.
    let (_, other) = big_pack(&s, 1);
    commit(&s, &ws, &other);
    for _ in 0..3 {
        clock.advance(2 * HOUR);
        gc(&s);
    }
    assert!(s.list("forwards/").unwrap().is_empty());
    assert_eq!(
        s.list("packs/").unwrap().len(),
        2,
        "the newest tree and its file"
    );
}

/// The blob a writer deduplicated against a pack after the GC's mark (so not forwarded) keeps
/// the old pack alive: it is not deleted while a kept tree names it at an unforwarded offset.
#[test]
fn a_blob_referenced_after_the_mark_keeps_a_repacked_pack() {
    let (clock, s, ws, old, files) = setup("late");
    commit(&s, &ws, &files[..5]);
    clock.advance(2 * HOUR);
    assert_eq!(gc(&s).packs_repacked, 1);
    // A writer that had not seen the run yet commits a file of the old pack that was dead.
    let g = commit(&s, &ws, &files[..6]).number;
    clock.advance(2 * HOUR);
    let r = gc(&s);
    assert!(
        s.size(&old.key()).is_ok(),
        "the old pack went while a kept tree named it: {r:?}"
    );
    reads_back(&s, &ws, g);
    // It was repacked again for that blob; a grace later it goes and everything still reads.
    for _ in 0..2 {
        clock.advance(2 * HOUR);
        gc(&s);
    }
    assert!(s.size(&old.key()).unwrap_err().is_not_found());
    reads_back(&s, &ws, g);
}

fn holder() -> Holder {
    Holder {
        node: "n".into(),
        host: "h".into(),
        pid: 1,
        session: "s".into(),
        cache: "test".into(),
        mountpoint: String::new(),
    }
}

/// A blob repacked twice stays one hop from where trees name it, and a reader whose cached
/// forwards point at the emptied middle pack reads them again.
#[test]
fn a_blob_repacked_twice_is_found_by_a_reader_with_stale_forwards() {
    let (clock, s, ws, old, files) = setup("twice");
    commit(&s, &ws, &files[..16]);
    for _ in 0..2 {
        clock.advance(2 * HOUR);
        gc(&s);
    }
    assert!(s.size(&old.key()).unwrap_err().is_not_found());
    // This store now caches the old pack's forwards (to the first new pack).
    let g = commit(&s, &ws, &files[..3]).number;
    reads_back(&s, &ws, g);
    clock.advance(2 * HOUR);
    let r = gc(&s);
    assert_eq!(
        r.packs_repacked, 1,
        "the first new pack is mostly dead: {r:?}"
    );
    clock.advance(2 * HOUR);
    let r = gc(&s);
    assert!(r.packs_deleted >= 1, "{r:?}");
    // Both records are under the pack the trees name.
    let records = s.list("forwards/").unwrap();
    assert_eq!(records.len(), 2, "{records:?}");
    let prefix = owsfs_store::forward::prefix(&old);
    assert!(
        records.iter().all(|k| k.starts_with(&prefix)),
        "{records:?}"
    );
    // The stale cache sends this store to the emptied pack first; it reads the forwards again.
    reads_back(&s, &ws, g);
    // A copy takes only where the blobs are now (the emptied middle pack is gone).
    let dst = store("twice-dst", &clock);
    owsfs_store::copy::copy_workspace(&ws, None, &dst, "w", &holder(), &Silent).unwrap();
    reads_back(&dst, &ws_in(&dst), g);
    // A fresh reader goes straight there.
    let fresh = Store::open(
        &format!("memory://repack-twice-{}", std::process::id()),
        StoreOptions {
            clock: clock.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    reads_back(&fresh, &ws_in(&fresh), g);
}

fn ws_in(s: &Store) -> Workspace {
    Workspace::open_existing(s, "w").unwrap().unwrap()
}
