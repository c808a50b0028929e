//! What a mounted workspace costs in store requests (issue 18). Idle: each lease renewal is
//! one PUT, and old lease steps go in batches (one DeleteObjects request on S3 for 16 steps),
//! so an idle mount makes about one request per renewal. Written steadily: two requests per
//! commit (the pack and the slot), since commits count as renewals and the HEAD hint waits.
//! Counted by the daemon's own metrics against a real S3 server (SeaweedFS on loopback).

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use stores::TestStore;

/// The daemon's metrics: name (with its `kind` label, if any) to value.
fn scrape(addr: &str) -> std::collections::HashMap<String, f64> {
    let mut c = TcpStream::connect(addr).expect("connect to the metrics server");
    write!(c, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    let body = answer.split_once("\r\n\r\n").expect("an HTTP answer").1;
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("a Prometheus scrape");
    let mut out = std::collections::HashMap::new();
    for s in parsed.samples {
        let key = match s.labels.get("kind") {
            Some(kind) => format!("{}{{{kind}}}", s.metric),
            None => s.metric.clone(),
        };
        if let prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) = s.value
        {
            out.insert(key, v);
        }
    }
    out
}

#[test]
fn an_idle_mount_makes_about_one_request_per_renewal_seaweedfs() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::seaweed("owsfs-lease-req");
    // A short TTL renews every 200 ms: 50 renewals in the 10 s measured.
    let ws = store.workspace(
        "idle",
        &["--metrics", "127.0.0.1:0", "--lease-ttl", "600ms"],
    );
    ws.mount();
    std::fs::write(ws.path("f"), b"x").unwrap();
    ws.sync();
    let status = ws.owsfs(&["status", &ws.mp.to_string_lossy(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let addr = v["metrics"]
        .as_str()
        .expect("the metrics address")
        .to_string();
    std::thread::sleep(Duration::from_secs(1));
    let a = scrape(&addr);
    std::thread::sleep(Duration::from_secs(10));
    let b = scrape(&addr);
    ws.unmount();
    let delta = |k: &str| b.get(k).copied().unwrap_or(0.0) - a.get(k).copied().unwrap_or(0.0);
    let renewals = delta("owsfs_lease_renewals_total");
    let kinds = ["get", "put", "list", "delete", "head"];
    let per_kind: Vec<(&str, f64)> = kinds
        .iter()
        .map(|k| (*k, delta(&format!("owsfs_store_requests_total{{{k}}}"))))
        .collect();
    let total: f64 = per_kind.iter().map(|(_, n)| n).sum();
    eprintln!("idle 10 s: {renewals} renewals, requests {per_kind:?}");
    assert!(renewals >= 20.0, "{renewals} renewals in 10 s");
    let deletes = delta("owsfs_store_requests_total{delete}");
    assert!(
        deletes >= 1.0 && deletes <= renewals / 16.0 + 1.0,
        "{deletes} delete requests for {renewals} renewals: not batched"
    );
    assert!(
        total <= renewals * 1.15 + 2.0,
        "{total} requests for {renewals} renewals: {per_kind:?}"
    );
    // The batches really went: at most 4 + 16 steps stay behind the newest (the release).
    let left = store.keys("workspaces/idle/lease/");
    let steps = renewals as usize + 3;
    assert!(
        (5..=21).contains(&left.len()),
        "{} lease steps left after about {steps}: {left:?}",
        left.len()
    );
}

/// A steadily written mount: a small file changed every 100 ms for 10 s, with the default
/// commit interval (1 s) and lease TTL (10 s). What each commit costs in requests: the pack
/// and the slot, no renewal (the commits count as renewals), no HEAD hint (it waits).
#[test]
fn a_steadily_written_mount_pays_two_requests_per_commit_seaweedfs() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::seaweed("owsfs-lease-req-w");
    let ws = store.workspace("busy", &["--metrics", "127.0.0.1:0"]);
    ws.mount();
    std::fs::write(ws.path("f"), b"x").unwrap();
    ws.sync();
    let status = ws.owsfs(&["status", &ws.mp.to_string_lossy(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let addr = v["metrics"]
        .as_str()
        .expect("the metrics address")
        .to_string();
    let a = scrape(&addr);
    for i in 0..100u32 {
        std::fs::write(ws.path("f"), i.to_le_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = scrape(&addr);
    ws.unmount();
    let delta = |k: &str| b.get(k).copied().unwrap_or(0.0) - a.get(k).copied().unwrap_or(0.0);
    let commits = delta("owsfs_commits_total");
    let renewals = delta("owsfs_lease_renewals_total");
    let per_kind: Vec<(&str, f64)> = ["get", "put", "list", "delete", "head"]
        .iter()
        .map(|k| (*k, delta(&format!("owsfs_store_requests_total{{{k}}}"))))
        .collect();
    let total: f64 = per_kind.iter().map(|(_, n)| n).sum();
    eprintln!(
        "written 10 s: {commits} commits, {renewals} renewals, {total} requests {per_kind:?}"
    );
    assert!(commits >= 5.0, "{commits} commits in 10 s");
    assert!(
        renewals <= 1.0,
        "{renewals} renewals while committing every second: commits should count as renewals"
    );
    let per_commit = total / commits;
    assert!(
        per_commit <= 2.2,
        "{per_commit:.2} requests per commit, renewals included: {per_kind:?}"
    );
    let status = serde_json::from_slice::<serde_json::Value>(
        &ws.owsfs(&["log", "--store", &ws.store, "--workspace", "busy", "--json"])
            .stdout,
    )
    .unwrap();
    assert!(status.as_array().is_some_and(|a| a.len() as f64 >= commits));
}
