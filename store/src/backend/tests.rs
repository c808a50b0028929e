//! Store semantics on memory:// and file://. Unit tests, because they use the raw reads
//! (`get`, `get_range`) and `put_if_absent`, which are private to the crate.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use bytes::Bytes;

use super::{PutOutcome, Store, StoreOptions};
use crate::{FaultConfig, FaultKinds, ManualClock, StoreError};

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
        let clock = Arc::new(ManualClock::new());
        let mut cfg = FaultConfig::new(0.2, 11);
        cfg.delay = Duration::from_millis(300);
        let opts = StoreOptions {
            timeout: Duration::from_millis(100),
            max_attempts: 20,
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            faults: Some(cfg),
            clock: clock.clone(),
            ..StoreOptions::default()
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
        let retries = s.stats_snapshot().retries;
        assert!(retries > 0);
        // Every retry waited on the store's clock, none on the real one.
        assert_eq!(clock.sleeps().len() as u64, retries);
    }
}

/// A store on `url` whose every write fails with a temporary error (reads succeed).
fn failing_writes(url: &str, clock: Arc<ManualClock>, max_attempts: u32) -> Store {
    // The first open makes the marker, which the faulty store then only reads.
    Store::open(url, StoreOptions::default()).unwrap();
    let mut cfg = FaultConfig::new(1.0, 1);
    cfg.kinds = FaultKinds {
        write: true,
        ..FaultKinds::NONE
    };
    let opts = StoreOptions {
        max_attempts,
        min_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        faults: Some(cfg),
        clock,
        ..StoreOptions::default()
    };
    Store::open(url, opts).unwrap()
}

#[test]
fn backoff_doubles_up_to_its_cap_with_jitter_on_the_store_clock() {
    for (_d, url) in stores() {
        let clock = Arc::new(ManualClock::new());
        let s = failing_writes(&url, clock.clone(), 8);
        let e = s.put("k", Bytes::from_static(b"v")).unwrap_err();
        assert!(matches!(e, StoreError::Backend { op: "put", .. }), "{e}");
        let sleeps = clock.sleeps();
        // Eight attempts, seven waits: the cap doubles from 200 ms (2 × min_backoff) up to
        // max_backoff (1 s), and each wait is drawn from [cap/2, cap].
        assert_eq!(sleeps.len(), 7, "{url}: {sleeps:?}");
        for (i, d) in sleeps.iter().enumerate() {
            let cap = (Duration::from_millis(100) * (2 << i)).min(Duration::from_secs(1));
            assert!(
                *d >= cap / 2 && *d <= cap,
                "{url}: wait {i} is {d:?}, cap {cap:?}"
            );
        }
        assert_eq!(clock.elapsed(), sleeps.iter().sum::<Duration>());
        let st = s.stats_snapshot();
        assert_eq!((st.errors, st.retries), (8, 7), "{url}");

        // The conditional write takes the same path (file:// has its own).
        let clock2 = Arc::new(ManualClock::new());
        let s = failing_writes(&url, clock2.clone(), 3);
        assert!(s.put_if_absent("c", Bytes::from_static(b"v")).is_err());
        assert_eq!(clock2.sleeps().len(), 2, "{url}");
    }
}

#[test]
fn missing_objects_and_permanent_errors_are_not_retried() {
    for (_d, url) in stores() {
        let clock = Arc::new(ManualClock::new());
        let opts = StoreOptions {
            clock: clock.clone(),
            ..StoreOptions::default()
        };
        let s = Store::open(&url, opts).unwrap();
        assert!(s.get("nope").unwrap_err().is_not_found());
        assert!(s.get_range("nope", 0..4).unwrap_err().is_not_found());
        // Past the end of an object: refused at once, not retried.
        s.put("short", Bytes::from_static(b"abc")).unwrap();
        assert!(s.get_range("short", 10..20).unwrap_err().is_corrupt());
        assert_eq!(clock.sleeps(), Vec::<Duration>::new(), "{url}");
        assert_eq!(s.stats_snapshot().retries, 0, "{url}");
    }
}

#[test]
fn a_store_hands_out_its_clock() {
    let clock = Arc::new(ManualClock::starting_at_unix_ms(77));
    let opts = StoreOptions {
        clock: clock.clone(),
        ..StoreOptions::default()
    };
    let s = Store::open(&format!("memory://t{:016x}", rand::random::<u64>()), opts).unwrap();
    assert_eq!(s.clock().unix_ms(), 77);
    clock.advance(Duration::from_millis(5));
    assert_eq!(s.clock().unix_ms(), 82);
}

#[test]
fn temporary_errors_are_told_by_kind_and_status_not_by_message() {
    use opendal::{Error, ErrorKind};
    assert!(super::is_temporary(
        &Error::new(ErrorKind::Unexpected, "503").set_temporary()
    ));
    assert!(super::is_temporary(&Error::new(ErrorKind::RateLimited, "")));
    // S3's ConditionalRequestConflict on a PUT: opendal says Conflict, temporary.
    assert!(super::is_temporary(
        &Error::new(ErrorKind::Conflict, "").set_temporary()
    ));
    assert!(!super::is_temporary(&Error::new(ErrorKind::Conflict, "")));
    assert!(!super::is_temporary(&Error::new(
        ErrorKind::ConditionNotMatch,
        ""
    )));
    assert!(!super::is_temporary(&Error::new(
        ErrorKind::PermissionDenied,
        ""
    )));
    // The message no longer decides anything.
    assert!(!super::is_temporary(&Error::new(
        ErrorKind::Unexpected,
        "S3Error { code: \"ConditionalRequestConflict\" }"
    )));
}

#[test]
fn access_failures_are_explained_by_kind() {
    use opendal::{Error, ErrorKind};
    let explain =
        |kind, signed| super::explain_s3(&Error::new(kind, "S3Error { code: \"X\" }"), "b", signed);
    let m = explain(ErrorKind::ConfigInvalid, true);
    assert!(m.contains("bucket \"b\" does not exist (X)"), "{m}");
    let m = explain(ErrorKind::PermissionDenied, true);
    assert!(
        m.contains("credentials were refused") && m.contains("AWS_SECRET_ACCESS_KEY"),
        "{m}"
    );
    let m = explain(ErrorKind::PermissionDenied, false);
    assert!(m.contains("no credentials are set"), "{m}");
    let m = explain(ErrorKind::Unexpected, true);
    assert!(m.contains("not reachable (X)"), "{m}");
}

/// A loopback HTTP server standing in for S3: it answers the n-th request with the n-th
/// scripted response (the last one repeats) and records each request line. Enough to see how
/// the store treats the answers S3 gives, through opendal's real S3 service.
struct FakeS3 {
    addr: std::net::SocketAddr,
    requests: Arc<parking_lot::Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// One scripted answer: status and body.
type Answer = (u16, Vec<u8>);

fn s3_error(status: u16, code: &str) -> Answer {
    (
        status,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{code}</Message><Resource>/b/p</Resource><RequestId>1</RequestId></Error>"
        )
        .into_bytes(),
    )
}

fn ok(body: &[u8]) -> Answer {
    (200, body.to_vec())
}

fn marker_body() -> Vec<u8> {
    serde_json::to_vec(&super::Marker {
        format: super::MARKER_FORMAT.into(),
        version: super::STORE_VERSION,
        checksum: super::marker_checksum(super::MARKER_FORMAT, super::STORE_VERSION),
    })
    .unwrap()
}

impl FakeS3 {
    fn start(script: Vec<Answer>) -> FakeS3 {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (log, stopped) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            for conn in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                let (status, answer) = script[n.min(script.len() - 1)].clone();
                n += 1;
                let head = line.starts_with("HEAD ");
                log.lock().push(line.trim_end().to_string());
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    answer.len()
                )
                .into_bytes();
                if !head {
                    out.extend_from_slice(&answer);
                }
                let _ = conn.write_all(&out);
            }
        });
        FakeS3 {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("s3://b/p?endpoint=http://{}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().clone()
    }
}

impl Drop for FakeS3 {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_fake(s3: &FakeS3, clock: Arc<ManualClock>) -> Result<Store, StoreError> {
    let opts = StoreOptions {
        timeout: Duration::from_secs(20),
        clock,
        ..StoreOptions::default()
    };
    Store::open(&s3.url(), opts)
}

#[test]
fn s3_missing_bucket_is_reported_as_such_without_retries() {
    let s3 = FakeS3::start(vec![s3_error(404, "NoSuchBucket")]);
    let clock = Arc::new(ManualClock::new());
    let e = open_fake(&s3, clock.clone()).unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, StoreError::Access { .. }), "{m}");
    assert!(
        m.contains("bucket \"b\" does not exist (HTTP 404 NoSuchBucket)"),
        "{m}"
    );
    assert_eq!(s3.requests().len(), 1, "{:?}", s3.requests());
    assert!(clock.sleeps().is_empty());
}

#[test]
fn s3_refused_credentials_are_reported_without_retries() {
    for code in [
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
    ] {
        let s3 = FakeS3::start(vec![s3_error(403, code)]);
        let clock = Arc::new(ManualClock::new());
        let e = open_fake(&s3, clock.clone()).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, StoreError::Access { .. }), "{m}");
        // Signed or not depends on the test's environment; both name the variables.
        assert!(
            m.contains("refused") && m.contains("AWS_ACCESS_KEY_ID"),
            "{code}: {m}"
        );
        assert_eq!(s3.requests().len(), 1, "{code}: {:?}", s3.requests());
        assert!(clock.sleeps().is_empty());
    }
}

#[test]
fn s3_server_errors_and_slow_downs_are_retried() {
    let s3 = FakeS3::start(vec![
        s3_error(503, "SlowDown"),
        s3_error(500, "InternalError"),
        s3_error(429, "TooManyRequests"),
        ok(&marker_body()),
    ]);
    let clock = Arc::new(ManualClock::new());
    let s = open_fake(&s3, clock.clone()).unwrap();
    assert_eq!(s3.requests().len(), 4, "{:?}", s3.requests());
    assert_eq!(clock.sleeps().len(), 3);
    assert_eq!(s.stats_snapshot().retries, 3);
}

#[test]
fn s3_conditional_request_conflict_on_a_put_is_retried() {
    let s3 = FakeS3::start(vec![
        ok(&marker_body()),
        s3_error(409, "ConditionalRequestConflict"),
        ok(b""),
    ]);
    let clock = Arc::new(ManualClock::new());
    let s = open_fake(&s3, clock.clone()).unwrap();
    let o = s.put_if_absent("k", Bytes::from_static(b"v")).unwrap();
    assert_eq!(o, PutOutcome::Created);
    let r = s3.requests();
    assert_eq!(r.len(), 3, "{r:?}");
    assert!(
        r[1].starts_with("PUT ") && r[2].starts_with("PUT "),
        "{r:?}"
    );
    assert_eq!(clock.sleeps().len(), 1);
}

#[test]
fn s3_precondition_failed_is_read_back_not_retried() {
    let s3 = FakeS3::start(vec![
        ok(&marker_body()),
        s3_error(412, "PreconditionFailed"),
        ok(b"other"),
    ]);
    let clock = Arc::new(ManualClock::new());
    let s = open_fake(&s3, clock.clone()).unwrap();
    let o = s.put_if_absent("k", Bytes::from_static(b"v")).unwrap();
    assert_eq!(o, PutOutcome::Conflict(Bytes::from_static(b"other")));
    let r = s3.requests();
    assert!(
        r[1].starts_with("PUT ") && r[2].starts_with("GET "),
        "{r:?}"
    );
    assert!(clock.sleeps().is_empty());
}

#[test]
fn s3_permanent_errors_are_not_retried() {
    let s3 = FakeS3::start(vec![
        ok(&marker_body()),
        s3_error(400, "InvalidArgument"),
        ok(b""),
    ]);
    let clock = Arc::new(ManualClock::new());
    let s = open_fake(&s3, clock.clone()).unwrap();
    let e = s.put("k", Bytes::from_static(b"v")).unwrap_err();
    assert!(matches!(e, StoreError::Backend { op: "put", .. }), "{e}");
    assert_eq!(s3.requests().len(), 2, "{:?}", s3.requests());
    assert!(clock.sleeps().is_empty());
}
