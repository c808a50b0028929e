//! `owsfs mount --metrics ADDR`: a scrape, parsed by a Prometheus text-format parser, holds the
//! daemon's metrics under Prometheus names, and they move with the work.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

/// `GET path` on `addr`: the status code and the body.
fn get(addr: &str, path: &str) -> (u32, String) {
    let mut c = TcpStream::connect(addr).expect("connect to the metrics server");
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"));
    match &s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn a_scrape_parses_and_follows_the_work() {
    if skip_fuse() {
        return;
    }
    let mut ws = Workspace::unmounted(None, "metrics");
    ws.extra = vec!["--metrics".into(), "127.0.0.1:0".into()];
    ws.mount();
    let status = ws.owsfs(&["status", &ws.mp.to_string_lossy(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let addr = v["metrics"]
        .as_str()
        .expect("status names the metrics address")
        .to_string();

    for i in 0..10 {
        std::fs::write(ws.path(&format!("f{i}")), noise(64 << 10, i)).unwrap();
        assert_eq!(
            std::fs::read(ws.path(&format!("f{i}"))).unwrap().len(),
            64 << 10
        );
    }
    assert!(
        ws.owsfs(&["sync", &ws.mp.to_string_lossy()])
            .status
            .success()
    );

    let (code, body) = get(&addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert!(!scrape.samples.is_empty());

    // Prometheus naming: every name under owsfs_, counters end in _total, units are suffixes.
    for s in &scrape.samples {
        assert!(s.metric.starts_with("owsfs_"), "{}", s.metric);
        assert!(
            s.metric
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{}",
            s.metric
        );
    }
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut f = line.split_whitespace().skip(2);
        let (name, kind) = (f.next().unwrap(), f.next().unwrap());
        if kind == "histogram" {
            assert!(name.ends_with("_seconds"), "a duration in seconds: {line}");
        }
    }
    let histogram = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "owsfs_fuse_request_duration_seconds" && s.labels.get("op") == Some("write")
        })
        .expect("a write latency histogram");
    match &histogram.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
            assert!(inf.count >= 10.0, "{buckets:?}");
            assert!(
                buckets.windows(2).all(|w| w[0].count <= w[1].count),
                "cumulative"
            );
        }
        other => panic!("not a histogram: {other:?}"),
    }
    assert!(
        value(
            &scrape,
            "owsfs_fuse_request_duration_seconds_count",
            Some(("op", "write"))
        ) >= 10.0
    );
    assert!(value(&scrape, "owsfs_fuse_written_bytes_total", None) >= (640 << 10) as f64);
    assert!(value(&scrape, "owsfs_journal_written_bytes_total", None) > 0.0);
    assert!(value(&scrape, "owsfs_commits_total", None) >= 1.0);
    assert!(value(&scrape, "owsfs_commit_duration_seconds_count", None) >= 1.0);
    assert!(value(&scrape, "owsfs_generation", None) >= 1.0);
    assert!(value(&scrape, "owsfs_store_uploaded_bytes_total", None) >= (640 << 10) as f64);
    assert!(value(&scrape, "owsfs_store_requests_total", Some(("kind", "put"))) >= 1.0);
    assert_eq!(value(&scrape, "owsfs_lag_bytes", None), 0.0);
    assert_eq!(value(&scrape, "owsfs_fail_stops_total", None), 0.0);
    for name in [
        "owsfs_lease_renewals_total",
        "owsfs_lease_renewal_failures_total",
        "owsfs_hydration_fetched_bytes_total",
        "owsfs_lag_seconds",
        "owsfs_store_errors_total",
    ] {
        value(&scrape, name, None);
    }

    // The counters move with the work.
    std::fs::write(ws.path("more"), noise(1 << 20, 99)).unwrap();
    assert!(
        ws.owsfs(&["sync", &ws.mp.to_string_lossy()])
            .status
            .success()
    );
    let (_, body) = get(&addr, "/metrics");
    let again = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert!(
        value(&again, "owsfs_store_uploaded_bytes_total", None)
            >= value(&scrape, "owsfs_store_uploaded_bytes_total", None) + (1 << 20) as f64
    );

    assert_eq!(get(&addr, "/").0, 404);
    ws.unmount();
    assert!(
        TcpStream::connect(&addr).is_err(),
        "the server stops with the mount"
    );
}
