//! GC: retention, mark, condemn, sweep after the grace, and the writer's side of the
//! protocol, on a memory store with a manual clock.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use owsfs_store::gc::{self, GcOptions, GcWatch};
use owsfs_store::pack::{BlobKind, PackWriter};
use owsfs_store::progress::Silent;
use owsfs_store::tree::{Content, FileContent, NodeKind, Tree, TreeEntry};
use owsfs_store::{
    BlobRef, GenKind, GenStats, GenerationRecord, ManualClock, PackId, Store, StoreOptions,
    Workspace,
};

const HOUR: Duration = Duration::from_secs(3600);
/// How often writers read the runs (graces must be at least four times this).
const REFRESH: Duration = Duration::from_secs(1);

struct World {
    store: Store,
    clock: Arc<ManualClock>,
}

fn world(name: &str) -> World {
    let clock = Arc::new(ManualClock::starting_at_unix_ms(1_800_000_000_000));
    let store = Store::open(
        &format!("memory://gc-{name}-{}", std::process::id()),
        StoreOptions {
            clock: clock.clone(),
            gc_refresh: REFRESH,
            ..Default::default()
        },
    )
    .unwrap();
    World { store, clock }
}

fn file(name: &str, chunk: BlobRef) -> TreeEntry {
    TreeEntry {
        name: name.as_bytes().to_vec(),
        kind: NodeKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_sec: 1,
        mtime_nsec: 0,
        size: chunk.len as u64,
        rdev: 0,
        link_key: 0,
        xattrs: vec![],
        content: Content::File(FileContent::Chunks(vec![chunk])),
    }
}

/// Commits the next generation of `ws`: the files `(name, content)`, each content in a pack
/// of its own unless `reuse` gives its chunk already. Returns the record and each file's
/// chunk.
fn commit(
    w: &World,
    ws: &Workspace,
    files: &[(&str, &str)],
    reuse: &[(&str, BlobRef)],
) -> (GenerationRecord, Vec<(String, BlobRef)>) {
    let mut entries = Vec::new();
    let mut chunks = Vec::new();
    for (name, content) in files {
        let r = match reuse.iter().find(|(n, _)| n == name) {
            Some((_, r)) => *r,
            None => {
                let mut p = PackWriter::new();
                let r = p.add(BlobKind::Chunk, content.as_bytes());
                let (id, bytes) = p.seal();
                w.store.put(&id.key(), bytes).unwrap();
                r
            }
        };
        chunks.push((name.to_string(), r));
        entries.push(file(name, r));
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut p = PackWriter::new();
    let root = p.add(BlobKind::Tree, &Tree { entries }.encode().unwrap());
    let (id, bytes) = p.seal();
    w.store.put(&id.key(), bytes).unwrap();
    let head = ws.head().unwrap().unwrap_or(0);
    let r = GenerationRecord {
        workspace: ws.name().into(),
        number: head + 1,
        parent: (head > 0).then_some(head),
        epoch: 1,
        kind: GenKind::Commit,
        time_unix_ms: w.store.clock().unix_ms(),
        root: Some(root),
        sqlite: vec![],
        stats: GenStats::default(),
        access: None,
    };
    ws.commit(&r).unwrap();
    (r, chunks)
}

/// Every pack the kept generations reach exists: they all restore.
fn all_kept_readable(w: &World, ws: &Workspace) {
    for n in ws.list_generations().unwrap() {
        let g = ws.read_generation(n).unwrap();
        let Some(root) = g.root else { continue };
        let tree = Tree::load(&w.store, &root).unwrap();
        for e in &tree.entries {
            let owsfs_store::Content::File(f) = &e.content else {
                continue;
            };
            for span in owsfs_store::tree::file_chunks(&w.store, f).unwrap() {
                owsfs_store::read_blob(&w.store, &span.r)
                    .unwrap_or_else(|e| panic!("generation {n}: {e}"));
            }
        }
    }
}

fn packs(w: &World) -> HashSet<String> {
    w.store.list("packs/").unwrap().into_iter().collect()
}

fn opts(grace: Duration) -> GcOptions {
    GcOptions {
        grace,
        ..GcOptions::default()
    }
}

#[test]
fn old_generations_go_after_the_grace_and_their_packs_a_run_later() {
    let w = world("basic");
    let ws = Workspace::open_or_create(&w.store, "w").unwrap();
    // A new version of `f` every 10 minutes for two days; `keep` never changes.
    let (_, first) = commit(&w, &ws, &[("keep", "always"), ("f", "v0")], &[]);
    let keep = first[0].1;
    for i in 1..(2 * 24 * 6) {
        w.clock.advance(Duration::from_secs(600));
        commit(
            &w,
            &ws,
            &[("keep", "always"), ("f", &format!("v{i}"))],
            &[("keep", keep)],
        );
    }
    let before = packs(&w);
    let gens_before = ws.list_generations().unwrap().len();
    // A dry run changes nothing.
    let dry = gc::collect(
        &w.store,
        &GcOptions {
            dry_run: true,
            ..opts(HOUR)
        },
        &Silent,
    )
    .unwrap();
    assert_eq!(packs(&w), before);
    assert_eq!(ws.list_generations().unwrap().len(), gens_before);
    assert_eq!(dry.packs_deleted, 0, "nothing was condemned before");
    assert!(dry.generations_pruned > 200, "{dry:?}");

    let r1 = gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    assert_eq!(r1.run, Some(1));
    assert_eq!(r1.generations_pruned, dry.generations_pruned);
    assert_eq!(
        r1.packs_deleted, 0,
        "condemned only: nothing is deleted in the first run"
    );
    let kept = ws.list_generations().unwrap();
    assert_eq!(kept.len() as u64, r1.generations_kept);
    assert!(kept.len() < 40, "{}", kept.len());
    all_kept_readable(&w, &ws);
    // Within the grace, a second run deletes nothing either.
    w.clock.advance(Duration::from_secs(600));
    let r2 = gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    assert_eq!(r2.packs_deleted, 0);
    // After it: the packs of the pruned generations go; the kept ones all restore.
    w.clock.advance(HOUR);
    let r3 = gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    assert!(r3.packs_deleted >= r1.generations_pruned, "{r3:?}");
    assert!(r3.bytes_deleted > 0);
    all_kept_readable(&w, &ws);
    assert!(w.store.list(&keep.pack.key()).is_ok());
    owsfs_store::read_blob(&w.store, &keep).unwrap();
}

#[test]
fn a_condemned_pack_referenced_again_is_not_deleted() {
    let w = world("rescue");
    let ws = Workspace::open_or_create(&w.store, "w").unwrap();
    let (_, c1) = commit(&w, &ws, &[("a", "first a")], &[]);
    w.clock.advance(2 * HOUR);
    commit(&w, &ws, &[("b", "b")], &[]);
    w.clock.advance(2 * HOUR);
    // Generation 1 is pruned at once (older than the policy's hour and not the newest of
    // anything but its hour... it is the newest of its hour: shrink the policy).
    ws.set_retention(&owsfs_store::retention::Policy {
        all_secs: 60,
        hourly_secs: 0,
        daily_secs: 0,
    })
    .unwrap();
    commit(&w, &ws, &[("b", "b2")], &[]);
    let r1 = gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    assert!(r1.packs_condemned >= 1);
    // A writer that had not seen run 1 references `a`'s chunk again (a file restored with
    // the same bytes, deduplicated by an old index entry) before the next run.
    commit(&w, &ws, &[("a", "")], &[("a", c1[0].1)]);
    w.clock.advance(2 * HOUR);
    gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    owsfs_store::read_blob(&w.store, &c1[0].1).unwrap();
    all_kept_readable(&w, &ws);
}

#[test]
fn forks_keep_what_they_share_and_snapshots_keep_their_state() {
    let w = world("forks");
    let src = Workspace::open_or_create(&w.store, "src").unwrap();
    let (g1, c) = commit(&w, &src, &[("shared", "shared bytes")], &[]);
    Workspace::fork(&w.store, "fork", &src, &g1).unwrap();
    let (g2, _) = commit(&w, &src, &[("x", "x")], &[]);
    src.create_snapshot("keep-x", &g2, None).unwrap();
    for _ in 0..3 {
        w.clock.advance(Duration::from_secs(8 * 86_400));
        commit(
            &w,
            &src,
            &[("y", &format!("{:?}", w.store.clock().unix_ms()))],
            &[],
        );
        gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    }
    // Generation 1 of src is the fork's source; 2 is a snapshot; both stay.
    let kept = src.list_generations().unwrap();
    assert!(kept.contains(&1) && kept.contains(&2), "{kept:?}");
    owsfs_store::read_blob(&w.store, &c[0].1).unwrap();
    let fork = Workspace::open_existing(&w.store, "fork").unwrap().unwrap();
    all_kept_readable(&w, &fork);
    all_kept_readable(&w, &src);
    // Once the snapshot is deleted, generation 2 and its pack go (two runs, a grace apart).
    src.delete_snapshot("keep-x").unwrap();
    gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    w.clock.advance(2 * HOUR);
    gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    assert!(!src.list_generations().unwrap().contains(&2));
    let root2 = g2.root.unwrap();
    assert!(owsfs_store::read_blob(&w.store, &root2).is_err());
}

#[test]
fn a_writer_learns_what_is_condemned_and_when_its_view_is_too_old() {
    let w = world("watch");
    let ws = Workspace::open_or_create(&w.store, "w").unwrap();
    commit(&w, &ws, &[("a", "a")], &[]);
    // A pack nobody references (a commit that crashed after uploading).
    let mut p = PackWriter::new();
    p.add(BlobKind::Chunk, b"orphan");
    let (orphan, bytes) = p.seal();
    w.store.put(&orphan.key(), bytes).unwrap();

    let mut watch = GcWatch::default();
    let t0 = w.store.clock().now();
    assert!(watch.stale(t0) && watch.too_old(t0));
    let r = watch.refresh(&w.store, 0, t0).unwrap();
    assert_eq!(
        r,
        gc::Refreshed {
            seen: 0,
            gap: false,
            new_runs: 0
        }
    );
    assert!(!watch.stale(t0));
    assert!(watch.stale(t0 + REFRESH * 3 / 2));
    assert!(!watch.too_old(t0 + REFRESH * 3 / 2));
    assert!(watch.too_old(t0 + REFRESH * 3));
    // A grace shorter than four refresh intervals is refused.
    let err = gc::collect(&w.store, &opts(REFRESH * 3), &Silent).unwrap_err();
    assert!(err.to_string().contains("too short"), "{err}");

    gc::collect(&w.store, &opts(Duration::from_secs(120)), &Silent).unwrap();
    let r = watch.refresh(&w.store, 0, t0).unwrap();
    assert_eq!(
        r,
        gc::Refreshed {
            seen: 1,
            gap: false,
            new_runs: 1
        }
    );
    assert!(watch.is_condemned(&orphan));
    let live: Vec<PackId> = w
        .store
        .list("packs/")
        .unwrap()
        .iter()
        .filter_map(|k| k.rsplit('/').next()?.parse().ok())
        .filter(|p| *p != orphan)
        .collect();
    assert!(live.iter().all(|p| !watch.is_condemned(p)));

    // A cache that last saw run 0 and meets only runs from 3 on has missed what 1 and 2
    // condemned.
    for i in 0..2 {
        w.clock.advance(Duration::from_secs(600));
        let mut p = PackWriter::new();
        p.add(BlobKind::Chunk, format!("orphan {i}").as_bytes());
        let (id, bytes) = p.seal();
        w.store.put(&id.key(), bytes).unwrap();
        gc::collect(&w.store, &opts(Duration::from_secs(120)), &Silent).unwrap();
    }
    assert_eq!(gc::list_runs(&w.store).unwrap(), [1, 2, 3]);
    w.store.delete("gc/runs/00000000000000000001").unwrap();
    w.store.delete("gc/runs/00000000000000000002").unwrap();
    let mut fresh = GcWatch::default();
    let r = fresh.refresh(&w.store, 0, t0).unwrap();
    assert!(r.gap, "{r:?}");
    let mut caught_up = GcWatch::default();
    let r = caught_up.refresh(&w.store, 2, t0).unwrap();
    assert!(!r.gap, "{r:?}");
    // The orphan is gone by now (condemned in run 1, ripe in run 2 or 3).
    assert!(w.store.size(&orphan.key()).is_err());
}

#[test]
fn a_run_that_cannot_read_a_tree_deletes_nothing() {
    let w = world("partial");
    let ws = Workspace::open_or_create(&w.store, "w").unwrap();
    let (g, _) = commit(&w, &ws, &[("a", "a")], &[]);
    let mut p = PackWriter::new();
    p.add(BlobKind::Chunk, b"orphan");
    let (orphan, bytes) = p.seal();
    w.store.put(&orphan.key(), bytes).unwrap();
    gc::collect(&w.store, &opts(REFRESH * 4), &Silent).unwrap();
    w.clock.advance(Duration::from_secs(10));
    // The root tree's pack is lost: the mark fails, the orphan (ripe) stays.
    w.store.delete(&g.root.unwrap().pack.key()).unwrap();
    assert!(gc::collect(&w.store, &opts(REFRESH * 4), &Silent).is_err());
    assert!(w.store.size(&orphan.key()).is_ok());
}

#[test]
fn a_pinned_generation_stays_until_its_pin_expires() {
    let w = world("pins");
    let ws = Workspace::open_or_create(&w.store, "w").unwrap();
    ws.set_retention(&owsfs_store::retention::Policy {
        all_secs: 0,
        hourly_secs: 0,
        daily_secs: 0,
    })
    .unwrap();
    let (g1, c1) = commit(&w, &ws, &[("a", "pinned bytes")], &[]);
    commit(&w, &ws, &[("b", "newer")], &[]);
    // A read-only mount of generation 1, pinned for ten minutes.
    ws.pin(
        "ro-1",
        1,
        g1.root.unwrap(),
        "test",
        Duration::from_secs(600),
    )
    .unwrap();
    for _ in 0..6 {
        w.clock.advance(Duration::from_secs(300));
        ws.pin(
            "ro-1",
            1,
            g1.root.unwrap(),
            "test",
            Duration::from_secs(600),
        )
        .unwrap();
        gc::collect(&w.store, &opts(Duration::from_secs(60)), &Silent).unwrap();
    }
    assert!(ws.list_generations().unwrap().contains(&1));
    owsfs_store::read_blob(&w.store, &c1[0].1).unwrap();
    // The pin expires (its mount died): generation 1 and its pack go, the pin record too.
    w.clock.advance(HOUR);
    for _ in 0..3 {
        gc::collect(&w.store, &opts(Duration::from_secs(60)), &Silent).unwrap();
        w.clock.advance(Duration::from_secs(120));
    }
    assert!(!ws.list_generations().unwrap().contains(&1));
    assert!(owsfs_store::read_blob(&w.store, &c1[0].1).is_err());
    assert!(ws.list_pins().unwrap().is_empty());
}

#[test]
fn a_pack_referenced_again_in_between_waits_a_full_grace_once_it_is_unreferenced_again() {
    let w = world("streak");
    let ws = Workspace::open_or_create(&w.store, "w").unwrap();
    ws.set_retention(&owsfs_store::retention::Policy {
        all_secs: 0,
        hourly_secs: 0,
        daily_secs: 0,
    })
    .unwrap();
    commit(&w, &ws, &[("x", "x")], &[]);
    // An orphan (a commit that crashed after its upload), condemned by run 1.
    let mut p = PackWriter::new();
    let orphan_ref = p.add(BlobKind::Chunk, b"orphan");
    let (orphan, bytes) = p.seal();
    w.store.put(&orphan.key(), bytes).unwrap();
    gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    // Referenced by a commit before run 2 (rescued there) ...
    w.clock.advance(2 * HOUR);
    commit(&w, &ws, &[("o", "")], &[("o", orphan_ref)]);
    gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    // ... and unreferenced again (the next commit drops it; its generation is pruned).
    w.clock.advance(2 * HOUR);
    commit(&w, &ws, &[("y", "y")], &[]);
    w.clock.advance(2 * HOUR);
    commit(&w, &ws, &[("z", "z")], &[]);
    let r3 = gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    assert!(
        w.store.size(&orphan.key()).is_ok(),
        "deleted at once, on the strength of run 1's old condemnation: {r3:?}"
    );
    // A grace after it was condemned again, it goes.
    w.clock.advance(2 * HOUR);
    gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    assert!(w.store.size(&orphan.key()).is_err());
    // Every run left a record, even one that condemned nothing.
    assert_eq!(gc::list_runs(&w.store).unwrap(), [1, 2, 3, 4]);
}

#[test]
fn the_newest_commit_is_found_across_pruned_slots() {
    let w = world("holes");
    let ws = Workspace::open_or_create(&w.store, "w").unwrap();
    commit(&w, &ws, &[("a", "a")], &[]);
    let f1 = ws.fence(2).unwrap();
    let f2 = ws.fence(3).unwrap();
    let f3 = ws.fence(4).unwrap();
    // Retention keeps the fences above the newest commit (the path from HEAD down to it).
    w.clock.advance(2 * HOUR);
    ws.set_retention(&owsfs_store::retention::Policy {
        all_secs: 0,
        hourly_secs: 0,
        daily_secs: 0,
    })
    .unwrap();
    gc::collect(&w.store, &opts(HOUR), &Silent).unwrap();
    assert_eq!(ws.list_generations().unwrap(), [1, f1, f2, f3]);
    // A hole made another way is stepped over.
    w.store.delete(&ws.generation_key(f2)).unwrap();
    assert_eq!(ws.newest_commit(f3).unwrap().unwrap().number, 1);
}
