//! Generation records, HEAD discovery and commits, with and without injected faults.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use owsfs_store::generation::{generation_key, valid_workspace_name};
use owsfs_store::{
    BlobId, BlobRef, CommitError, FaultConfig, GenKind, GenStats, GenerationRecord, ManualClock,
    PackId, SqliteState, Store, StoreOptions, WalPosition, Workspace,
};

fn mem(name: &str) -> Store {
    let url = format!("memory://gen-{name}-{}", std::process::id());
    Store::open(&url, StoreOptions::default()).unwrap()
}

fn record(ws: &str, n: u64, epoch: u64) -> GenerationRecord {
    GenerationRecord {
        workspace: ws.into(),
        number: n,
        parent: (n > 1).then(|| n - 1),
        epoch,
        kind: GenKind::Commit,
        time_unix_ms: 1_700_000_000_000 + n,
        root: Some(BlobRef::plain(
            BlobId::of(&n.to_le_bytes()),
            PackId([n as u8; 32]),
            16,
            100,
        )),
        sqlite: vec![SqliteState {
            path: "db/app.sqlite".into(),
            wal: Some(WalPosition {
                last_commit_frame: 7,
                frames_valid: 9,
                salt1: 1,
                salt2: 2,
                checkpoint_seq: 3,
                page_size: 4096,
                db_pages: 10,
            }),
        }],
        stats: GenStats {
            files: 3,
            ..GenStats::default()
        },
        access: None,
    }
}

#[test]
fn seal_round_trip_and_every_flip_detected() {
    let r = record("w", 3, 1);
    let b = r.seal().unwrap();
    let key = generation_key("w", 3);
    assert_eq!(GenerationRecord::unseal(&key, &b).unwrap(), r);
    assert!(
        std::str::from_utf8(&b)
            .unwrap()
            .starts_with("owsfs-generation 1\n{")
    );
    for i in 0..b.len() {
        let mut c = b.to_vec();
        c[i] ^= 0x01;
        let e = GenerationRecord::unseal(&key, &c).unwrap_err();
        assert!(e.to_string().contains(&key), "byte {i}: {e}");
    }
    let newer = String::from_utf8(b.to_vec())
        .unwrap()
        .replacen("generation 1", "generation 2", 1);
    let e = GenerationRecord::unseal(&key, newer.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("upgrade owsfs"), "{e}");
    assert!(GenerationRecord::unseal(&key, &b[..b.len() - 1]).is_err());
}

#[test]
fn workspace_names() {
    for ok in ["a", "my-ws_1.2", &"x".repeat(128)] {
        assert!(valid_workspace_name(ok), "{ok}");
    }
    for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129), "é"] {
        assert!(!valid_workspace_name(bad), "{bad}");
    }
    let s = mem("names");
    assert!(Workspace::open_or_create(&s, "../x").is_err());
    Workspace::open_or_create(&s, "ok").unwrap();
    Workspace::open_or_create(&s, "ok").unwrap();
}

#[test]
fn commits_head_and_conflicts() {
    let s = mem("commits");
    let ws = Workspace::open_or_create(&s, "w").unwrap();
    assert_eq!(ws.head().unwrap(), None);
    for n in 1..=5 {
        ws.commit(&record("w", n, 1)).unwrap();
        assert_eq!(ws.head().unwrap(), Some(n));
    }
    assert_eq!(ws.list_generations().unwrap(), vec![1, 2, 3, 4, 5]);
    assert_eq!(ws.read_generation(4).unwrap(), record("w", 4, 1));
    // Same record again (a retried commit): fine. A different one: slot taken.
    ws.commit(&record("w", 5, 1)).unwrap();
    match ws.commit(&record("w", 5, 2)) {
        Err(CommitError::SlotTaken {
            number: 5,
            existing,
        }) => assert_eq!(existing.epoch, 1),
        other => panic!("{other:?}"),
    }
    // Invariants.
    let mut bad = record("w", 7, 1);
    bad.parent = Some(5);
    assert!(matches!(ws.commit(&bad), Err(CommitError::Invalid(_))));
    let mut fence = record("w", 6, 2);
    fence.kind = GenKind::Fence;
    assert!(matches!(ws.commit(&fence), Err(CommitError::Invalid(_))));
    fence.root = None;
    let parent = ws.read_generation(5).unwrap();
    ws.commit_checked(&fence, Some(&parent)).unwrap();
    let stale = record("w", 7, 1);
    assert!(matches!(
        ws.commit_checked(&stale, Some(&fence)),
        Err(CommitError::Invalid(_))
    ));
    // HEAD is found by probing past a stale hint, and without a hint, and despite a corrupt one.
    s.put(
        "workspaces/w/HEAD",
        Bytes::from_static(b"owsfs-head 1 2 0000000000000000\n"),
    )
    .unwrap();
    assert_eq!(ws.head().unwrap(), Some(6));
    s.delete("workspaces/w/HEAD").unwrap();
    assert_eq!(ws.head().unwrap(), Some(6));
    ws.commit(&record("w", 7, 2)).unwrap();
    s.put(
        "workspaces/w/HEAD",
        Bytes::from_static(b"\n0a1b2c3d4e5f6a7b 7 1 daeh-sfswo"),
    )
    .unwrap();
    assert_eq!(ws.head().unwrap(), Some(7));
    // A corrupt generation is an error naming the object.
    let key = generation_key("w", 3);
    let mut b = ws.read_generation(3).unwrap().seal().unwrap().to_vec();
    b[30] ^= 4;
    s.put(&key, Bytes::from(b)).unwrap();
    let e = ws.read_generation(3).unwrap_err();
    assert!(e.is_corrupt() && e.to_string().contains(&key), "{e}");
}

#[test]
fn commits_survive_ten_percent_faults_including_lost_acks() {
    for (i, url) in [
        format!("memory://gen-faults-{}", std::process::id()),
        format!("file://{}/s", tempfile::tempdir().unwrap().keep().display()),
    ]
    .into_iter()
    .enumerate()
    {
        let mut cfg = FaultConfig::new(0.1, 7 + i as u64);
        cfg.delay = Duration::from_millis(150);
        let opts = StoreOptions {
            timeout: Duration::from_millis(50),
            max_attempts: 4,
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            faults: Some(cfg),
            ..StoreOptions::default()
        };
        // Opening may itself fail under faults; a caller retries.
        let s = (0..20)
            .find_map(|_| Store::open(&url, opts.clone()).ok())
            .expect("open under faults");
        let ws = (0..20)
            .find_map(|_| Workspace::open_or_create(&s, "w").ok())
            .unwrap();
        let mut acked = Vec::new();
        for n in 1..=60u64 {
            let r = record("w", n, 1);
            // Every commit eventually succeeds: the caller retries failed commits as a whole.
            let mut tries = 0;
            loop {
                tries += 1;
                match ws.commit(&r) {
                    Ok(()) => break,
                    Err(CommitError::Store(e)) if tries < 50 => {
                        let _ = e;
                    }
                    Err(e) => panic!("{url}: generation {n}: {e}"),
                }
            }
            acked.push(r);
        }
        // Every acknowledged generation reads back (through the faults, with retries).
        for r in &acked {
            let got = (0..50)
                .find_map(|_| ws.read_generation(r.number).ok())
                .unwrap();
            assert_eq!(&got, r);
        }
        let f = s.faults().unwrap().counts();
        assert!(f.ack > 0 && f.write > 0 && f.read > 0, "{f:?}");
        let clean = Store::open(&url, StoreOptions::default()).unwrap();
        let ws2 = Workspace::open_or_create(&clean, "w").unwrap();
        assert_eq!(ws2.head().unwrap(), Some(60));
        assert_eq!(
            ws2.list_generations().unwrap(),
            (1..=60).collect::<Vec<_>>()
        );
    }
}

/// A new holder's fence takes the next slot: a commit of the old epoch that was in flight at
/// the takeover either landed before the fence (and the fence goes after it) or is refused;
/// no generation of the old epoch can follow the new epoch's first.
#[test]
fn a_fence_refuses_every_later_commit_of_an_older_epoch() {
    let store = mem("fence");
    let ws = Workspace::open_or_create(&store, "w").unwrap();
    ws.commit(&record("w", 1, 1)).unwrap();
    ws.commit(&record("w", 2, 1)).unwrap();
    // The old holder (epoch 1) has generation 3 in flight while epoch 2 fences.
    let in_flight = record("w", 3, 1);
    let f = ws.fence(2).unwrap();
    assert_eq!(f, 3);
    match ws.commit_checked(&in_flight, Some(&ws.read_generation(2).unwrap())) {
        Err(CommitError::SlotTaken { existing, .. }) => {
            assert_eq!((existing.kind, existing.epoch), (GenKind::Fence, 2))
        }
        other => panic!("late commit of epoch 1: {other:?}"),
    }
    // Nor can it commit after the fence: its parent would be of a newer epoch.
    let mut after = record("w", 4, 1);
    after.parent = Some(3);
    match ws.commit_checked(&after, Some(&ws.read_generation(3).unwrap())) {
        Err(CommitError::Invalid(why)) => assert!(why.contains("older"), "{why}"),
        other => panic!("commit of epoch 1 after the fence: {other:?}"),
    }
    // An in-flight commit that won its slot first: the fence goes after it.
    ws.commit(&record("w", 4, 2)).unwrap();
    let late = record("w", 5, 2);
    ws.commit(&late).unwrap();
    assert_eq!(ws.fence(3).unwrap(), 6);
    assert_eq!(ws.newest_commit(6).unwrap().unwrap().number, 5);
    // A holder of an older epoch cannot fence over a newer one.
    assert!(matches!(ws.fence(2), Err(CommitError::Invalid(_))));
    let epochs: Vec<u64> = (1..=6)
        .map(|n| ws.read_generation(n).unwrap().epoch)
        .collect();
    assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "{epochs:?}");
}

#[test]
fn fence_records_carry_the_store_clocks_wall_time() {
    let clock = Arc::new(ManualClock::starting_at_unix_ms(42_000));
    let opts = StoreOptions {
        clock: clock.clone(),
        ..StoreOptions::default()
    };
    let s = Store::open(&format!("memory://gen-clock-{}", std::process::id()), opts).unwrap();
    let ws = Workspace::open_or_create(&s, "w").unwrap();
    let n = ws.fence(1).unwrap();
    assert_eq!(ws.read_generation(n).unwrap().time_unix_ms, 42_000);
    clock.advance(Duration::from_secs(1));
    let n = ws.fence(2).unwrap();
    assert_eq!(ws.read_generation(n).unwrap().time_unix_ms, 43_000);
}

#[test]
fn a_fork_starts_at_its_sources_tree_and_says_where_it_came_from() {
    let s = mem("fork");
    let src = Workspace::open_or_create(&s, "src").unwrap();
    assert_eq!(src.info().forked_from, None);
    for n in 1..=3 {
        src.commit(&record("src", n, 1)).unwrap();
    }
    let from = src.read_generation(2).unwrap();
    let fork = Workspace::fork(&s, "f", &src, &from).unwrap();
    let first = fork.read_generation(1).unwrap();
    assert_eq!(first.root, from.root, "the same tree: nothing copied");
    assert_eq!(
        (first.epoch, first.parent, first.kind),
        (0, None, GenKind::Commit)
    );
    assert_eq!(first.sqlite, from.sqlite);
    assert_eq!(first.stats.files, 3);
    let source = fork.info().forked_from.clone().unwrap();
    assert_eq!((source.workspace.as_str(), source.generation), ("src", 2));
    // Read back as a reader would.
    let again = Workspace::open_existing(&s, "f").unwrap().unwrap();
    assert_eq!(again.info(), fork.info());
    // The source goes on; the fork takes a lease and fences like any workspace.
    src.commit(&record("src", 4, 1)).unwrap();
    assert_eq!(fork.fence(1).unwrap(), 2);
    // An existing name is refused, a fork or not.
    let err = Workspace::fork(&s, "f", &src, &from)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    let err = Workspace::fork(&s, "src", &src, &from)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    // A fence is not a state.
    let fence = fork.read_generation(2).unwrap();
    assert!(Workspace::fork(&s, "g", &fork, &fence).is_err());
    assert!(Workspace::open_existing(&s, "nope").unwrap().is_none());
}

#[test]
fn a_fork_left_half_made_is_finished_by_the_same_fork() {
    let s = mem("fork-half");
    let src = Workspace::open_or_create(&s, "src").unwrap();
    src.commit(&record("src", 1, 1)).unwrap();
    let from = src.read_generation(1).unwrap();
    // The marker of the fork exists, its first generation does not (a crash in between).
    let half = Workspace::fork(&s, "f", &src, &from).unwrap();
    s.delete(&half.generation_key(1)).unwrap();
    Workspace::fork(&s, "f", &src, &from).unwrap();
    // Another source's half-made fork of the same name is not taken over.
    s.delete(&half.generation_key(1)).unwrap();
    src.commit(&record("src", 2, 1)).unwrap();
    let other = src.read_generation(2).unwrap();
    assert!(Workspace::fork(&s, "f", &src, &other).is_err());
}

#[test]
fn a_version_1_workspace_marker_is_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(
        &format!("file://{}", dir.path().display()),
        StoreOptions::default(),
    )
    .unwrap();
    let v1 = r#"{"format":"owsfs-workspace","version":1,"name":"old","created_unix_ms":5}"#;
    s.put("workspaces/old/workspace.json", Bytes::from(v1))
        .unwrap();
    let ws = Workspace::open_or_create(&s, "old").unwrap();
    assert_eq!(ws.info().created_unix_ms, 5);
    assert_eq!(ws.info().forked_from, None);
    // A new marker is sealed: a changed byte is caught.
    let ws = Workspace::open_or_create(&s, "new").unwrap();
    let sealed = Workspace::open_existing(&s, "new").unwrap().unwrap();
    assert_eq!(sealed.info(), ws.info());
    let path = dir.path().join("workspaces/new/workspace.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("owsfs-workspace 2\n"), "{text}");
    std::fs::write(&path, text.replacen("\"new\"", "\"neW\"", 1)).unwrap();
    assert!(
        Workspace::open_existing(&s, "new")
            .unwrap_err()
            .is_corrupt()
    );
}
