//! The lease keeper on a store whose clock the test drives: renewals come every third of the
//! TTL, a partition that outlasts the lease fail-stops the holder (before the lease lapses for
//! other nodes), and a takeover is noticed at the next renewal. No test sleeps for the TTL:
//! time moves when the test says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use owsfs_store::{Clock, FaultConfig, Holder, ManualClock, Store, StoreOptions, Workspace};
use owsfs_sync::lease::{Keeper, Takeover, acquire};

const TTL: Duration = Duration::from_secs(30);

fn holder(node: &str) -> Holder {
    Holder {
        node: node.into(),
        host: "test".into(),
        pid: 1,
        session: format!("s-{node}"),
        cache: String::new(),
        mountpoint: String::new(),
    }
}

struct Fixture {
    clock: Arc<ManualClock>,
    ws: Workspace,
    partition: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn fixture(name: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let partition = dir.path().join("partition");
    let mut faults = FaultConfig::new(0.0, 1);
    faults.partition = Some(partition.clone());
    let store = Store::open(
        &format!("memory://keeper-{name}-{}", std::process::id()),
        StoreOptions {
            clock: clock.clone(),
            faults: Some(faults),
            max_attempts: 1,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let ws = Workspace::open_or_create(&store, "w").unwrap();
    Fixture {
        clock,
        ws,
        partition,
        _dir: dir,
    }
}

/// Waits (bounded, to turn a hang into a failure) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "never: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn start(
    f: &Fixture,
    node: &str,
    lost: &Arc<AtomicUsize>,
) -> (Arc<Keeper>, std::thread::JoinHandle<()>) {
    let (held, at) = acquire(&f.ws, &holder(node), TTL, Takeover::Refuse, &mut |_| {}).unwrap();
    let lost = Arc::clone(lost);
    let keeper = Keeper::new(
        &f.ws,
        held,
        at,
        Box::new(move |_| {
            lost.fetch_add(1, Ordering::SeqCst);
        }),
    );
    let k = Arc::clone(&keeper);
    (keeper, std::thread::spawn(move || k.run()))
}

#[test]
fn renewals_follow_the_clock_and_a_long_partition_fail_stops() {
    let f = fixture("partition");
    let lost = Arc::new(AtomicUsize::new(0));
    let (keeper, thread) = start(&f, "a", &lost);
    assert_eq!(keeper.status().renewals, 0);
    // A third of the TTL: one renewal, and none before it.
    f.clock.advance(TTL / 3 - Duration::from_millis(1));
    assert_eq!(keeper.status().renewals, 0);
    f.clock.advance(Duration::from_millis(1));
    eventually("the first renewal", || keeper.status().renewals == 1);
    keeper.check(TTL / 2).unwrap();

    // The store goes away: renewals fail, the lease stays good until TTL - TTL/4 after the
    // last renewal, then writes stop, and only once.
    std::fs::write(&f.partition, b"").unwrap();
    f.clock.advance(TTL / 3);
    eventually("a failed renewal", || keeper.status().last_error.is_some());
    assert!(!keeper.is_lost());
    keeper.check(Duration::ZERO).unwrap();
    f.clock.advance(TTL - TTL / 4 - TTL / 3);
    eventually("the fail-stop", || keeper.is_lost());
    assert_eq!(lost.load(Ordering::SeqCst), 1);
    assert!(keeper.check(Duration::ZERO).is_err());
    assert!(keeper.release().is_err(), "a lost lease is not released");
    thread.join().unwrap();
}

#[test]
fn a_takeover_is_noticed_at_the_next_renewal() {
    let f = fixture("takeover");
    let lost = Arc::new(AtomicUsize::new(0));
    let (keeper, thread) = start(&f, "a", &lost);
    // Another node forces the lease away (as `--steal --force` does).
    let (b, _) = acquire(&f.ws, &holder("b"), TTL, Takeover::Force, &mut |_| {}).unwrap();
    assert!(b.epoch > keeper.epoch());
    f.clock.advance(TTL / 3);
    eventually("the takeover noticed", || keeper.is_lost());
    assert!(keeper.lost_reason().unwrap().contains("taken over by"));
    assert_eq!(lost.load(Ordering::SeqCst), 1);
    thread.join().unwrap();
}

#[test]
fn stop_ends_the_threads_at_once_and_release_hands_the_lease_on() {
    let f = fixture("stop");
    let lost = Arc::new(AtomicUsize::new(0));
    let (keeper, thread) = start(&f, "a", &lost);
    keeper.stop();
    // No time passes on the clock: the threads end on the stop channel alone.
    thread.join().unwrap();
    keeper.release().unwrap();
    // The next node takes it at once, without waiting for a lapse.
    let (b, _) = acquire(&f.ws, &holder("b"), TTL, Takeover::Refuse, &mut |_| {}).unwrap();
    assert!(b.epoch > keeper.epoch());
    assert_eq!(lost.load(Ordering::SeqCst), 0);
}

/// A commit of generation `n` by epoch `epoch` (a fence record: no tree needed).
fn commit_slot(ws: &Workspace, n: u64, epoch: u64) {
    let r = owsfs_store::GenerationRecord {
        workspace: ws.name().into(),
        number: n,
        parent: (n > 1).then_some(n - 1),
        epoch,
        kind: owsfs_store::GenKind::Fence,
        time_unix_ms: 0,
        root: None,
        sqlite: vec![],
        stats: Default::default(),
        access: None,
    };
    ws.commit(&r).unwrap();
}

#[test]
fn commits_count_as_renewals_for_the_holder_and_for_observers() {
    let f = fixture("commits");
    let lost = Arc::new(AtomicUsize::new(0));
    let (keeper, thread) = start(&f, "a", &lost);
    let epoch = keeper.status().epoch;
    // A commit every 5 s (less than TTL/3) for two TTLs: no renewal at all, and the lease
    // stays good all along.
    for n in 1..=12u64 {
        f.clock.advance(Duration::from_secs(5));
        let started = f.clock.now();
        commit_slot(&f.ws, n, epoch);
        keeper.committed(started);
        keeper.check(TTL / 2).unwrap();
    }
    // Give a renewal that would be due a chance to run: none is.
    std::thread::sleep(Duration::from_millis(50));
    let st = keeper.status();
    assert_eq!((st.renewals, st.commits_as_renewals), (0, 12));

    // Meanwhile another node waiting to steal saw the holder alive: the commits kept the
    // lease from lapsing although no lease step was written for a minute.
    let f2 = f.ws.clone();
    let waiter = std::thread::spawn(move || {
        acquire(&f2, &holder("b"), TTL, Takeover::Steal, &mut |_| {})
            .map(|(r, _)| r.epoch)
            .map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(50));
    f.clock.advance(Duration::from_secs(5));
    let started = f.clock.now();
    commit_slot(&f.ws, 13, epoch);
    keeper.committed(started);
    // The waiter sees the new slot: it gives up (the holder is alive), as for a renewal.
    for _ in 0..100 {
        if waiter.is_finished() {
            break;
        }
        f.clock.advance(Duration::from_millis(500));
        std::thread::sleep(Duration::from_millis(5));
    }
    let got = waiter.join().unwrap();
    let e = got.expect_err("a steal while the holder commits must fail");
    assert!(e.contains("renewed its lease or committed"), "{e}");

    // Once the commits stop, renewals come back TTL/3 after the last one.
    f.clock.advance(TTL / 3);
    eventually("a renewal after the commits stopped", || {
        keeper.status().renewals == 1
    });
    assert_eq!(lost.load(Ordering::SeqCst), 0);
    keeper.stop();
    thread.join().unwrap();
}
