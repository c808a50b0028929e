//! Store semantics on memory:// and file://. Unit tests, because they use the raw reads
//! (`get`, `get_range`) and `put_if_absent`, which are private to the crate.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use bytes::Bytes;

use super::{PutOutcome, Store, StoreOptions};
use crate::{FaultConfig, StoreError};

fn stores() -> Vec<(tempfile::TempDir, String)> {
    let d = tempfile::tempdir().unwrap();
    let file = format!("file://{}/s", d.path().display());
    let mem = format!("memory://backend-{:x}", rand::random::<u64>());
    vec![(tempfile::tempdir().unwrap(), mem), (d, file)]
}

#[test]
fn basic_ops() {
    for (_d, url) in stores() {
        let s = Store::open(&url, StoreOptions::default()).unwrap();
        s.put("a/b/c", Bytes::from_static(b"hello world")).unwrap();
        assert_eq!(&s.get("a/b/c").unwrap()[..], b"hello world");
        assert_eq!(&s.get_range("a/b/c", 6..11).unwrap()[..], b"world");
        assert!(s.exists("a/b/c").unwrap());
        assert!(!s.exists("a/b/d").unwrap());
        assert!(matches!(s.get("nope"), Err(StoreError::NotFound { .. })));
        // Past the end, partly or wholly: the store is damaged (or the reference is).
        for r in [6..40, 11..12, 20..30] {
            let e = s.get_range("a/b/c", r.clone()).unwrap_err();
            assert!(
                e.is_corrupt() && e.to_string().contains("a/b/c"),
                "{url} {r:?}: {e}"
            );
        }
        s.put("a/x", Bytes::from_static(b"1")).unwrap();
        assert_eq!(s.list("a/").unwrap(), vec!["a/b/c", "a/x"]);
        assert_eq!(
            s.list("").unwrap(),
            vec!["a/b/c", "a/x", "owsfs-store.json"]
        );
        s.delete("a/x").unwrap();
        s.delete("a/x").unwrap();
        assert_eq!(s.list("a/").unwrap(), vec!["a/b/c"]);
        assert!(s.stats_snapshot().requests() > 5);
        // A second open sees the same data.
        let s2 = Store::open(&url, StoreOptions::default()).unwrap();
        assert_eq!(&s2.get("a/b/c").unwrap()[..], b"hello world");
    }
}

#[test]
fn put_if_absent_semantics() {
    for (_d, url) in stores() {
        let s = Store::open(&url, StoreOptions::default()).unwrap();
        let a = Bytes::from_static(b"A");
        assert_eq!(
            s.put_if_absent("k/1", a.clone()).unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            s.put_if_absent("k/1", a.clone()).unwrap(),
            PutOutcome::AlreadyIdentical
        );
        assert_eq!(
            s.put_if_absent("k/1", Bytes::from_static(b"B")).unwrap(),
            PutOutcome::Conflict(a)
        );
    }
}

#[test]
fn concurrent_creators_exactly_one_wins() {
    for (_d, url) in stores() {
        let s = Store::open(&url, StoreOptions::default()).unwrap();
        for round in 0..5 {
            let n = 8;
            let barrier = Arc::new(Barrier::new(n));
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let s = s.clone();
                    let b = barrier.clone();
                    std::thread::spawn(move || {
                        b.wait();
                        s.put_if_absent(&format!("slot/{round}"), Bytes::from(format!("w{i}")))
                            .unwrap()
                    })
                })
                .collect();
            let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let created = outcomes
                .iter()
                .filter(|o| **o == PutOutcome::Created)
                .count();
            assert_eq!(created, 1, "{url}: {outcomes:?}");
            assert!(
                outcomes
                    .iter()
                    .all(|o| matches!(o, PutOutcome::Created | PutOutcome::Conflict(_)))
            );
        }
    }
}

#[test]
fn refuses_foreign_locations_and_newer_versions() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("something"), b"x").unwrap();
    let e = Store::open(
        &format!("file://{}", d.path().display()),
        StoreOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, StoreError::NotOwsfsStore { .. }), "{e}");
    assert!(e.to_string().contains("no owsfs-store.json"));

    let d2 = tempfile::tempdir().unwrap();
    std::fs::write(
        d2.path().join("owsfs-store.json"),
        br#"{"format":"owsfs-store","version":9,"checksum":"x"}"#,
    )
    .unwrap();
    let e = Store::open(
        &format!("file://{}", d2.path().display()),
        StoreOptions::default(),
    )
    .unwrap_err();
    assert!(e.is_corrupt(), "{e}");

    let e = Store::open("file://relative", StoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("file:///abs/path"));
}

#[test]
fn s3_unreachable_endpoint_is_a_clear_error() {
    // Nothing listens on this loopback port: the error names the endpoint and bucket.
    let opts = StoreOptions {
        timeout: Duration::from_secs(2),
        max_attempts: 2,
        ..StoreOptions::default()
    };
    let e = Store::open("s3://nobucket/p?endpoint=http://127.0.0.1:9", opts).unwrap_err();
    let m = e.to_string();
    assert!(m.contains("127.0.0.1:9") && m.contains("nobucket"), "{m}");
}

#[test]
fn faults_are_retried() {
    for (_d, url) in stores() {
        let mut cfg = FaultConfig::new(0.2, 11);
        cfg.delay = Duration::from_millis(300);
        let opts = StoreOptions {
            timeout: Duration::from_millis(100),
            max_attempts: 20,
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            faults: Some(cfg),
        };
        let s = Store::open(&url, opts).unwrap();
        for i in 0..60 {
            let k = format!("f/{i}");
            let v = Bytes::from(format!("value {i}"));
            s.put(&k, v.clone()).unwrap();
            assert_eq!(s.get(&k).unwrap(), v);
            let o = s.put_if_absent(&format!("c/{i}"), v.clone()).unwrap();
            assert!(
                matches!(o, PutOutcome::Created | PutOutcome::AlreadyIdentical),
                "{o:?}"
            );
            assert_eq!(s.get(&format!("c/{i}")).unwrap(), v);
        }
        let c = s.faults().unwrap().counts();
        assert!(
            c.read > 0 && c.write > 0 && c.ack > 0 && c.timeout > 0,
            "{c:?}"
        );
        assert!(s.stats_snapshot().retries > 0);
    }
}
