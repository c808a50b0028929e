//! `owsfs mount --metrics ADDR`: the daemon's state as Prometheus metrics, served over HTTP at
//! `http://ADDR/metrics` in the OpenMetrics text format (encoded by `prometheus-client`). The
//! values are read at each scrape from what `owsfs status` shows, plus the latency histograms
//! of FUSE requests and of commits; nothing is counted twice.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::daemon::Daemon;
use crate::control::Status;

/// The HTTP server of the metrics; stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Binds `addr` (`HOST:PORT`; port 0 picks a free one) early, before the mount, so that a bad
/// or busy address fails the mount before it takes the lease.
pub fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("cannot listen for metrics on {addr}"))?;
    // Polled, so that the server stops without a connection to itself.
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl MetricsServer {
    /// Serves the metrics of `daemon` on `listener` (from [`bind`]).
    pub fn start(listener: TcpListener, daemon: Arc<Daemon>) -> anyhow::Result<MetricsServer> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(DaemonCollector(daemon)));
        let registry = Arc::new(registry);
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("owsfs-metrics".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match listener.accept() {
                            Ok((c, _)) => {
                                let _ = c.set_nonblocking(false);
                                if let Err(e) = answer(c, &registry) {
                                    tracing::debug!("metrics: {e}");
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            Err(e) => {
                                tracing::debug!("metrics: accept: {e}");
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                })
                .context("cannot start the metrics thread")?
        };
        tracing::info!("metrics at http://{addr}/metrics");
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one HTTP request: `GET /metrics` gets the metrics, anything else a 404 or 405.
fn answer(conn: TcpStream, registry: &Registry) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The headers are not needed; read them so that the client sees its request taken.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path.split('?').next()) {
        ("GET", Some("/metrics")) => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "cannot encode the metrics\n".into(),
                ),
            }
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "owsfs serves /metrics only\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    let mut w = conn;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

/// Reads the daemon at each scrape.
#[derive(Debug)]
struct DaemonCollector(Arc<Daemon>);

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Daemon")
    }
}

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

fn gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

impl Collector for DaemonCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let d = &self.0;
        let s = d.status(false);
        encode_fuse(&mut e, d, &s)?;
        encode_sync(&mut e, d, &s)?;
        encode_store(&mut e, &s)
    }
}

type Enc<'a, 'b> = &'a mut DescriptorEncoder<'b>;

/// FUSE requests, and what the daemon holds.
fn encode_fuse(e: Enc<'_, '_>, d: &Daemon, s: &Status) -> Result<(), std::fmt::Error> {
    // FUSE requests: a latency histogram per kind (its _count is the request count).
    let mut m = e.encode_descriptor(
        "owsfs_fuse_request_duration",
        "Time to serve a kernel request, by kind of request",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    for (kind, h) in d.fuse_latency() {
        let h = h.snapshot();
        m.encode_family(&[("op", kind.name())])?
            .encode_histogram::<NoLabelSet>(h.sum_secs, h.count, &h.buckets, None)?;
    }
    let ops = &s.ops;
    counter(
        e,
        "owsfs_fuse_read",
        "Bytes read through the daemon",
        Some(&Unit::Bytes),
        ops.read_bytes,
    )?;
    counter(
        e,
        "owsfs_fuse_written",
        "Bytes written through the daemon",
        Some(&Unit::Bytes),
        ops.write_bytes,
    )?;
    counter(
        e,
        "owsfs_fuse_errors",
        "Requests answered with an unexpected error",
        None,
        ops.errors,
    )?;
    gauge(
        e,
        "owsfs_inodes",
        "Inodes the daemon holds",
        None,
        s.inodes as f64,
    )?;
    gauge(
        e,
        "owsfs_open_files",
        "Open file handles",
        None,
        s.open_files as f64,
    )?;
    Ok(())
}

/// The journal and the commits.
fn encode_sync(e: Enc<'_, '_>, d: &Daemon, s: &Status) -> Result<(), std::fmt::Error> {
    // The journal.
    let j = &s.journal;
    counter(
        e,
        "owsfs_journal_written",
        "Bytes of records written to the journal",
        Some(&Unit::Bytes),
        j.bytes,
    )?;
    counter(
        e,
        "owsfs_journal_records",
        "Records written to the journal",
        None,
        j.records,
    )?;
    gauge(
        e,
        "owsfs_journal_dirty",
        "Bytes of changes not yet in a durable generation",
        Some(&Unit::Bytes),
        j.dirty_bytes as f64,
    )?;
    // Commits.
    let a = &s.sync.agent;
    counter(e, "owsfs_commits", "Generations committed", None, a.commits)?;
    counter(
        e,
        "owsfs_commit_failures",
        "Commit attempts that failed",
        None,
        a.commit_failures,
    )?;
    let h = d.commit_latency();
    let mut m = e.encode_descriptor(
        "owsfs_commit_duration",
        "Time from the cut to the generation record in the store",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    m.encode_histogram::<NoLabelSet>(h.sum_secs, h.count, &h.buckets, None)?;
    gauge(
        e,
        "owsfs_generation",
        "The newest durable generation",
        None,
        a.generation as f64,
    )?;
    gauge(
        e,
        "owsfs_lag",
        "Age of the oldest change not yet in the store",
        Some(&Unit::Seconds),
        a.lag_secs,
    )?;
    gauge(
        e,
        "owsfs_lag",
        "Bytes of changes not yet in the store",
        Some(&Unit::Bytes),
        a.lag_bytes as f64,
    )?;
    let m = e.encode_descriptor(
        "owsfs_throttled",
        "Time writers were held back by --max-lag",
        Some(&Unit::Seconds),
        MetricType::Counter,
    )?;
    ConstCounter::new(a.throttled_ms as f64 / 1000.0).encode(m)?;
    Ok(())
}

/// The store, lazy hydration and the lease.
fn encode_store(e: Enc<'_, '_>, s: &Status) -> Result<(), std::fmt::Error> {
    let a = &s.sync.agent;
    // The store.
    let r = &a.store_requests;
    let mut m = e.encode_descriptor(
        "owsfs_store_requests",
        "Requests to the store, by kind",
        None,
        MetricType::Counter,
    )?;
    for (kind, v) in [
        ("get", r.gets),
        ("put", r.puts),
        ("list", r.lists),
        ("delete", r.deletes),
        ("head", r.heads),
    ] {
        ConstCounter::new(v).encode(m.encode_family(&[("kind", kind)])?)?;
    }
    counter(
        e,
        "owsfs_store_errors",
        "Store requests that failed",
        None,
        r.errors,
    )?;
    counter(
        e,
        "owsfs_store_retries",
        "Store requests retried",
        None,
        r.retries,
    )?;
    counter(
        e,
        "owsfs_store_uploaded",
        "Bytes uploaded to the store",
        Some(&Unit::Bytes),
        r.bytes_up,
    )?;
    counter(
        e,
        "owsfs_store_downloaded",
        "Bytes downloaded from the store",
        Some(&Unit::Bytes),
        r.bytes_down,
    )?;
    // Lazy hydration.
    let hy = &s.sync.hydration;
    counter(
        e,
        "owsfs_hydration_fetched",
        "Bytes fetched from the store on first read or by prefetch",
        Some(&Unit::Bytes),
        hy.fetched_bytes,
    )?;
    gauge(
        e,
        "owsfs_hydration_missing",
        "Bytes of the generation not yet local",
        Some(&Unit::Bytes),
        hy.bytes_total.saturating_sub(hy.bytes_present) as f64,
    )?;
    // The lease.
    let l = &s.sync.lease;
    counter(
        e,
        "owsfs_lease_renewals",
        "Lease renewals that succeeded",
        None,
        l.renewals,
    )?;
    counter(
        e,
        "owsfs_lease_renewal_failures",
        "Lease renewals that failed",
        None,
        l.renewal_failures,
    )?;
    gauge(
        e,
        "owsfs_lease_epoch",
        "The epoch of the lease this mount holds",
        None,
        l.epoch as f64,
    )?;
    let stopped = u64::from(l.lost.is_some() || a.writes_stopped.is_some());
    counter(
        e,
        "owsfs_fail_stops",
        "Fail-stops: writes stopped because the lease could not be kept",
        None,
        stopped,
    )?;
    Ok(())
}
