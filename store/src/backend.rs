//! [`Store`]: a blocking object store handle over opendal. The store owns a small tokio
//! runtime; callers are plain threads. Every operation is retried as a whole (the complete
//! request, body included) on temporary errors with jittered exponential backoff.
//!
//! Layer stack, innermost first: backend service, request counters ([`crate::stats`]),
//! fault injection ([`crate::fault`], tests only), opendal `TimeoutLayer`; the retry loop is
//! in [`Store::retry`] above all of them. Whole-operation retry is deliberate: opendal's
//! `RetryLayer` retries a writer's `close` on the same writer, and some writers (memory) have
//! already handed their buffer to the failed attempt, so a retried close could store an empty
//! object.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use opendal::{ErrorKind, Operator};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock};
use crate::error::{Result, StoreError};
use crate::fault::{FaultConfig, FaultInjector, FaultLayer};
use crate::hook::{Hook, HookLayer, Req};
use crate::stats::{StatsHook, StatsSnapshot, StoreStats};
use crate::url::StoreUrl;

/// The marker object at the store root.
pub const MARKER_KEY: &str = "owsfs-store.json";
/// The marker format name.
pub const MARKER_FORMAT: &str = "owsfs-store";
/// The store layout version this build writes and understands.
pub const STORE_VERSION: u64 = 1;

/// Options of [`Store::open`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Deadline of one request attempt.
    pub timeout: Duration,
    /// Attempts of one operation, the first included.
    pub max_attempts: u32,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Fault injection (tests).
    pub faults: Option<FaultConfig>,
    /// The clock of the retry backoff and of the time stamps the store writes; the crates
    /// above take it from [`Store::clock`]. Tests pass a [`crate::ManualClock`].
    pub clock: Arc<dyn Clock>,
    /// How often a writer reads the GC run records again while it commits; a GC's grace must
    /// be at least four times this (`crate::gc`). Tests shorten it (`OWSFS_GC_REFRESH`).
    pub gc_refresh: Duration,
    /// How the blobs this process writes are compressed (`OWSFS_COMPRESSION`). Reading
    /// takes every codec whatever this says.
    pub compression: crate::pack::Compression,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            timeout: Duration::from_secs(30),
            max_attempts: 6,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            faults: None,
            clock: SystemClock::shared(),
            gc_refresh: crate::gc::DEFAULT_REFRESH,
            compression: crate::pack::Compression::default(),
        }
    }
}

/// Result of [`Store::put_if_absent`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PutOutcome {
    /// This call created the object.
    Created,
    /// The object existed with exactly these bytes (typically our own earlier attempt whose
    /// acknowledgement was lost).
    AlreadyIdentical,
    /// The object exists with different bytes, returned here.
    Conflict(Bytes),
}

#[derive(Serialize, Deserialize)]
struct Marker {
    format: String,
    version: u64,
    checksum: String,
}

fn marker_checksum(format: &str, version: u64) -> String {
    hex::encode(&blake3::hash(format!("{format}\n{version}").as_bytes()).as_bytes()[..8])
}

/// A handle to an owsfs store. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    url: StoreUrl,
    op: Operator,
    /// Requests carry a signature (S3 with credentials).
    signed: bool,
    rt: tokio::runtime::Runtime,
    fs_root: Option<PathBuf>,
    stats: Arc<StoreStats>,
    faults: Option<Arc<FaultInjector>>,
    opts: StoreOptions,
    /// Backoff jitter.
    jitter: Mutex<StdRng>,
    /// Forwards of repacked packs read so far (`crate::forward::locate`).
    forwards: Mutex<HashMap<crate::ids::PackId, Arc<crate::forward::Forwarded>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.inner.url)
    }
}

static MEMORY: LazyLock<Mutex<HashMap<String, Operator>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The backend service's operator, and whether its requests are signed (S3 with
/// credentials in the environment).
fn base_operator(url: &StoreUrl, shown: &str) -> Result<(Operator, bool)> {
    let cfg = |e: opendal::Error| StoreError::Config {
        url: shown.to_string(),
        msg: e.to_string(),
    };
    match url {
        StoreUrl::Memory { name } => {
            let mut m = MEMORY.lock();
            if let Some(op) = m.get(name) {
                return Ok((op.clone(), false));
            }
            let op = Operator::new(opendal::services::Memory::default()).map_err(cfg)?;
            m.insert(name.clone(), op.clone());
            Ok((op, false))
        }
        StoreUrl::File { root } => {
            std::fs::create_dir_all(root.join(".tmp")).map_err(|e| {
                StoreError::io(
                    format!("cannot create the store directory {}", root.display()),
                    e,
                )
            })?;
            let b = opendal::services::Fs::default()
                .root(&root.to_string_lossy())
                .atomic_write_dir(&root.join(".tmp").to_string_lossy());
            Ok((Operator::new(b).map_err(cfg)?, false))
        }
        StoreUrl::S3 {
            bucket,
            prefix,
            endpoint,
            region,
            virtual_host,
        } => {
            let mut b = opendal::services::S3::default()
                .bucket(bucket)
                .root(&format!("/{prefix}"))
                .region(region.as_deref().unwrap_or("us-east-1"))
                // Only explicit settings and the AWS_* key variables: no profile files, no
                // EC2 metadata probe (which hangs off EC2).
                .disable_config_load()
                .disable_ec2_metadata();
            if let Some(e) = endpoint {
                b = b.endpoint(e);
            }
            if *virtual_host {
                b = b.enable_virtual_host_style();
            }
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let signed = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
                (Some(ak), Some(sk)) => {
                    b = b.access_key_id(&ak).secret_access_key(&sk);
                    if let Some(t) = env("AWS_SESSION_TOKEN") {
                        b = b.session_token(&t);
                    }
                    true
                }
                _ => {
                    b = b.skip_signature();
                    false
                }
            };
            Ok((Operator::new(b).map_err(cfg)?, signed))
        }
    }
}

impl Store {
    /// Opens (and on first use initialises) the store at `url`.
    pub fn open(url: &str, opts: StoreOptions) -> Result<Store> {
        let parsed = StoreUrl::parse(url)?;
        opendal::install_default();
        let shown = parsed.to_string();
        let stats = Arc::new(StoreStats::default());
        let faults = opts.faults.clone().map(|c| Arc::new(FaultInjector::new(c)));
        let (op, signed) = base_operator(&parsed, &shown)?;
        let mut op = op.layer(HookLayer::new(Arc::new(StatsHook(stats.clone()))));
        if let Some(f) = &faults {
            op = op.layer(FaultLayer::new(f.clone()));
        }
        // Fault injection may shorten the deadline, so that its timeouts are real ones.
        let timeout = opts
            .faults
            .as_ref()
            .and_then(|f| f.store_timeout)
            .unwrap_or(opts.timeout);
        op = op.layer(
            opendal::layers::TimeoutLayer::new()
                .with_timeout(timeout)
                .with_io_timeout(timeout),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("owsfs-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("cannot start the store runtime", e))?;
        let fs_root = match &parsed {
            StoreUrl::File { root } => Some(root.clone()),
            _ => None,
        };
        let store = Store {
            inner: Arc::new(Inner {
                url: parsed,
                op,
                signed,
                rt,
                fs_root,
                stats,
                faults,
                opts,
                jitter: Mutex::new(StdRng::from_entropy()),
                forwards: Mutex::new(HashMap::new()),
            }),
        };
        store.check_marker()?;
        Ok(store)
    }

    /// How often writers read the GC run records again ([`StoreOptions::gc_refresh`]).
    pub fn gc_refresh(&self) -> Duration {
        self.inner.opts.gc_refresh
    }

    /// The store's location, for messages.
    pub fn url(&self) -> &StoreUrl {
        &self.inner.url
    }

    /// The live counters.
    pub fn stats(&self) -> &StoreStats {
        &self.inner.stats
    }

    /// A copy of the counters.
    pub fn stats_snapshot(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// The store's clock: time stamps, backoff, and the lease watch of the crates above.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.opts.clock
    }

    /// How new blobs are compressed ([`StoreOptions::compression`]).
    pub fn compression(&self) -> crate::pack::Compression {
        self.inner.opts.compression
    }

    /// A new pack that compresses as this store's options say.
    pub fn pack_writer(&self) -> crate::pack::PackWriter {
        crate::pack::PackWriter::compressing(self.compression())
    }

    /// The fault injector, when faults are configured.
    pub fn faults(&self) -> Option<&FaultInjector> {
        self.inner.faults.as_deref()
    }

    fn check_marker(&self) -> Result<()> {
        let want = Marker {
            format: MARKER_FORMAT.into(),
            version: STORE_VERSION,
            checksum: marker_checksum(MARKER_FORMAT, STORE_VERSION),
        };
        let body =
            Bytes::from(serde_json::to_vec(&want).map_err(|e| {
                StoreError::Invalid(format!("cannot encode the store marker: {e}"))
            })?);
        let existing = match self.get(MARKER_KEY) {
            Ok(b) => Some(b),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(self.explain_access(e)),
        };
        let existing = match existing {
            Some(b) => b,
            None => {
                let others = self.list("").map_err(|e| self.explain_access(e))?;
                if !others.is_empty() {
                    return Err(StoreError::NotOwsfsStore {
                        url: self.inner.url.to_string(),
                    });
                }
                match self.put_if_absent(MARKER_KEY, body)? {
                    PutOutcome::Created | PutOutcome::AlreadyIdentical => return Ok(()),
                    PutOutcome::Conflict(b) => b,
                }
            }
        };
        let m: Marker = serde_json::from_slice(&existing).map_err(|e| {
            StoreError::corrupt(
                format!("{} {MARKER_KEY}", self.inner.url),
                format!("not a store marker: {e}"),
            )
        })?;
        if m.format != MARKER_FORMAT || m.checksum != marker_checksum(&m.format, m.version) {
            return Err(StoreError::corrupt(
                format!("{} {MARKER_KEY}", self.inner.url),
                "format name or checksum is wrong",
            ));
        }
        if m.version > STORE_VERSION {
            return Err(StoreError::UnsupportedVersion {
                object: format!("{} {MARKER_KEY}", self.inner.url),
                found: m.version,
                supported: STORE_VERSION,
            });
        }
        Ok(())
    }

    /// Turns a failed first contact into a message that says what to check.
    fn explain_access(&self, e: StoreError) -> StoreError {
        let StoreError::Backend { error: source, .. } = e else {
            return e;
        };
        let url = self.inner.url.to_string();
        let bucket = match &self.inner.url {
            StoreUrl::S3 { bucket, .. } => bucket.clone(),
            _ => {
                return StoreError::Access {
                    url,
                    msg: format!("not usable ({})", crate::error::cause(&source)),
                    error: Some(source),
                };
            }
        };
        let msg = explain_s3(&source, &bucket, self.inner.signed);
        StoreError::Access {
            url,
            msg,
            error: Some(source),
        }
    }

    /// Runs a future on the store's runtime and waits for it from the calling thread (which
    /// may itself be inside another runtime).
    fn block<T, F>(&self, fut: F) -> opendal::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = opendal::Result<T>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(opendal::Error::new(
                ErrorKind::Unexpected,
                "the store runtime stopped",
            ))
        })
    }

    /// The wait before attempt `attempt + 1`: `min_backoff × 2^attempt`, capped at
    /// `max_backoff`, jittered uniformly into [cap/2, cap].
    fn backoff(&self, attempt: u32) -> Duration {
        let o = &self.inner.opts;
        let base = o.min_backoff.saturating_mul(1u32 << attempt.min(16));
        let cap = base.min(o.max_backoff);
        let ms = cap.as_millis() as u64;
        Duration::from_millis(self.inner.jitter.lock().gen_range(ms / 2..=ms.max(1)))
    }

    /// Runs `f` until it succeeds, fails permanently, or attempts run out.
    fn retry<T>(
        &self,
        what: &'static str,
        key: &str,
        mut f: impl FnMut() -> opendal::Result<T>,
    ) -> Result<T> {
        let mut attempt = 0;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if e.kind() == ErrorKind::NotFound {
                        return Err(StoreError::NotFound { key: key.into() });
                    }
                    self.inner
                        .stats
                        .errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    attempt += 1;
                    if !is_temporary(&e) || attempt >= self.inner.opts.max_attempts {
                        tracing::debug!(what, key, attempt, "store request failed: {e:?}");
                        return Err(StoreError::Backend {
                            op: what,
                            key: key.into(),
                            error: Box::new(e),
                        });
                    }
                    self.inner
                        .stats
                        .retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.inner.opts.clock.sleep(self.backoff(attempt));
                }
            }
        }
    }

    /// Reads a whole object, unverified. Crate-private: every object read for a caller goes
    /// through a decoder that checks its hash or checksum ([`crate::pack::read_pack`], the
    /// generation, lease, HEAD and marker readers).
    pub(crate) fn get(&self, key: &str) -> Result<Bytes> {
        self.retry("get", key, || {
            let op = self.inner.op.clone();
            let k = key.to_string();
            self.block(async move { Ok(op.read(&k).await?.to_bytes()) })
        })
    }

    /// Reads `range` of an object, unverified. A range past the end is an error.
    /// Crate-private: callers read blobs with [`crate::pack::read_blob`] and
    /// [`crate::pack::read_blob_run`], which verify each blob's hash.
    /// The forwards of pack `p` this store read before, if any.
    pub(crate) fn forwards_cached(
        &self,
        p: &crate::ids::PackId,
    ) -> Option<Arc<crate::forward::Forwarded>> {
        self.inner.forwards.lock().get(p).cloned()
    }

    pub(crate) fn cache_forwards(&self, p: crate::ids::PackId, f: Arc<crate::forward::Forwarded>) {
        self.inner.forwards.lock().insert(p, f);
    }

    pub(crate) fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let want = range.end - range.start;
        let b = match self.retry("get", key, || {
            let op = self.inner.op.clone();
            let k = key.to_string();
            let r = range.clone();
            self.block(async move { Ok(op.read_with(&k).range(r).await?.to_bytes()) })
        }) {
            // A reference past the end of its object: some backends refuse the range (memory,
            // S3's 416) where others return fewer bytes (below). Both are a damaged store.
            Err(StoreError::Backend { error, .. })
                if error.kind() == ErrorKind::RangeNotSatisfied =>
            {
                return Err(StoreError::corrupt(
                    key,
                    format!(
                        "range {}..{} is past the end of the object",
                        range.start, range.end
                    ),
                ));
            }
            r => r?,
        };
        if b.len() as u64 != want {
            return Err(StoreError::corrupt(
                key,
                format!(
                    "range {}..{} returned {} bytes (object too short)",
                    range.start,
                    range.end,
                    b.len()
                ),
            ));
        }
        Ok(b)
    }

    /// Writes an object, replacing any previous version. Atomic for readers on every backend.
    pub fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.retry("put", key, || {
            let op = self.inner.op.clone();
            let k = key.to_string();
            let d = data.clone();
            self.block(async move { op.write(&k, d).await.map(|_| ()) })
        })?;
        if let Some(root) = &self.inner.fs_root {
            // opendal's fs service syncs the file and renames it; the rename itself becomes
            // durable with the directory.
            sync_parent(&root.join(key))?;
        }
        Ok(())
    }

    /// Creates an object only if it does not exist yet. Exactly one of several concurrent
    /// creators gets `Created`. A precondition failure is resolved by reading the object back:
    /// the same bytes mean an earlier attempt of ours (or an identical writer) landed.
    /// Crate-private because a `Conflict` carries the existing object unverified; callers
    /// write slots and lease steps through [`crate::Workspace`] and [`crate::Lease`].
    pub(crate) fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome> {
        let created = match &self.inner.fs_root {
            Some(root) => self.retry("put_if_absent", key, || {
                fs_put_if_absent(
                    root,
                    key,
                    &data,
                    self.inner.faults.as_deref(),
                    &self.inner.stats,
                )
            })?,
            None => {
                let r = self.retry("put_if_absent", key, || {
                    let op = self.inner.op.clone();
                    let k = key.to_string();
                    let d = data.clone();
                    self.block(async move {
                        match op.write_with(&k, d).if_not_exists(true).await {
                            Ok(_) => Ok(true),
                            Err(e) if e.kind() == ErrorKind::ConditionNotMatch => Ok(false),
                            Err(e) => Err(e),
                        }
                    })
                });
                r?
            }
        };
        if created {
            return Ok(PutOutcome::Created);
        }
        let existing = self.get(key)?;
        if existing == data {
            Ok(PutOutcome::AlreadyIdentical)
        } else {
            Ok(PutOutcome::Conflict(existing))
        }
    }

    /// Whether an object exists.
    pub fn exists(&self, key: &str) -> Result<bool> {
        self.retry("stat", key, || {
            let op = self.inner.op.clone();
            let k = key.to_string();
            self.block(async move { op.exists(&k).await })
        })
    }

    /// Keys of all objects under `prefix` (recursively), sorted. `prefix` is a directory-like
    /// prefix ending in `/`, or empty for the whole store.
    /// [`Store::list`] with each object's size, where the listing tells it (S3 does;
    /// elsewhere 0, and [`Store::size`] asks).
    pub fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut keys = self.retry("list", prefix, || {
            let op = self.inner.op.clone();
            let p = if prefix.is_empty() {
                "/".to_string()
            } else {
                prefix.to_string()
            };
            self.block(async move {
                let entries = match op.list_with(&p).recursive(true).await {
                    Ok(v) => v,
                    Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
                    Err(e) => return Err(e),
                };
                Ok(entries
                    .into_iter()
                    .filter(|e| e.metadata().is_file() && !e.path().ends_with('/'))
                    .map(|e| {
                        (
                            e.path().trim_start_matches('/').to_string(),
                            e.metadata().content_length(),
                        )
                    })
                    .filter(|(p, _)| !p.starts_with(".tmp/"))
                    .collect::<Vec<_>>())
            })
        })?;
        keys.sort();
        Ok(keys)
    }

    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_sizes(prefix)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// The size of an object in bytes.
    pub fn size(&self, key: &str) -> Result<u64> {
        self.retry("stat", key, || {
            let op = self.inner.op.clone();
            let k = key.to_string();
            self.block(async move { Ok(op.stat(&k).await?.content_length()) })
        })
    }

    /// Deletes objects, in as few requests as the backend allows (S3's DeleteObjects takes
    /// 1,000 keys); missing objects are not an error.
    pub fn delete_many(&self, keys: &[String]) -> Result<()> {
        let Some(first) = keys.first() else {
            return Ok(());
        };
        self.retry("delete", first, || {
            let op = self.inner.op.clone();
            let keys = keys.to_vec();
            self.block(async move { op.delete_iter(keys).await })
        })
    }

    /// Deletes an object; deleting a missing object is not an error.
    pub fn delete(&self, key: &str) -> Result<()> {
        self.retry("delete", key, || {
            let op = self.inner.op.clone();
            let k = key.to_string();
            self.block(async move { op.delete(&k).await })
        })
    }
}

/// Whether a failed request is worth repeating: opendal marks it temporary (5xx, timeouts,
/// connection errors; S3's `SlowDown`, `RequestTimeout`, and `ConditionalRequestConflict` on
/// a PUT), or the backend asks us to slow down. Decided on opendal's typed kind and status,
/// never on the message.
fn is_temporary(e: &opendal::Error) -> bool {
    e.is_temporary() || e.kind() == ErrorKind::RateLimited
}

/// What a person should check when the first request to an S3 store failed, decided on
/// opendal's error kind (which opendal derives from the HTTP status and the S3 error code).
fn explain_s3(source: &opendal::Error, bucket: &str, signed: bool) -> String {
    let cause = crate::error::cause(source);
    match source.kind() {
        // opendal classifies S3's `NoSuchBucket` (a 404 that is not about a key) as
        // ConfigInvalid. The operator was built before the first request, so a ConfigInvalid
        // here comes from the answer; its cause is shown in case it is something else.
        ErrorKind::ConfigInvalid | ErrorKind::NotFound => {
            format!("bucket {bucket:?} does not exist ({cause}); create it or fix the bucket name")
        }
        ErrorKind::PermissionDenied if !signed => format!(
            "an unsigned request was refused ({cause}): no credentials are set; set \
             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)"
        ),
        // A 403: wrong key id, wrong secret, or a policy that denies these credentials. The
        // S3 error code in the cause tells which.
        ErrorKind::PermissionDenied => format!(
            "the credentials were refused ({cause}); check AWS_ACCESS_KEY_ID, \
             AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) and the bucket policy"
        ),
        _ => format!("not reachable ({cause}); check that the endpoint is up and reachable"),
    }
}

fn io_err(e: std::io::Error) -> opendal::Error {
    let kind = if e.kind() == std::io::ErrorKind::NotFound {
        ErrorKind::NotFound
    } else {
        ErrorKind::Unexpected
    };
    opendal::Error::new(kind, e.to_string())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn sync_parent(path: &Path) -> Result<()> {
    if let Some(p) = path.parent() {
        sync_dir(p)
            .map_err(|e| StoreError::io(format!("cannot fsync directory {}", p.display()), e))?;
    }
    Ok(())
}

/// Creates the missing directories of `dir` below `root`, making each creation durable.
fn ensure_dir(root: &Path, dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && parent.starts_with(root)
        && parent != dir
    {
        ensure_dir(root, parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// `file://` create-if-absent: write a temporary file, fsync it, `link()` it to the final
/// name (atomic, fails with EEXIST if the name exists), unlink the temporary, fsync the
/// directory. Readers never see a partial object and a crash never leaves a torn one in place.
fn fs_put_if_absent(
    root: &Path,
    key: &str,
    data: &[u8],
    faults: Option<&FaultInjector>,
    stats: &StoreStats,
) -> opendal::Result<bool> {
    stats.count(Req::Put);
    if let Some(f) = faults {
        let b = f.before(Req::Put, key);
        if let Some(d) = b.delay {
            // An injected slow request: real time, like the network it stands for.
            #[expect(clippy::disallowed_methods, reason = "simulates a slow request")]
            std::thread::sleep(d);
        }
        if let Some(e) = b.fail {
            return Err(e);
        }
    }
    let dest = root.join(key);
    let tmp = root
        .join(".tmp")
        .join(format!("{}.cas", hex::encode(rand::random::<[u8; 16]>())));
    let res = (|| -> std::io::Result<bool> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        if let Some(parent) = dest.parent() {
            ensure_dir(root, parent)?;
        }
        // Crash windows: a durable temporary that nobody links (garbage in `.tmp/`), then the
        // object in place with its temporary still beside it.
        fail::fail_point!("cas-before-link");
        let created = match std::fs::hard_link(&tmp, &dest) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        };
        fail::fail_point!("cas-after-link");
        std::fs::remove_file(&tmp)?;
        if created && let Some(parent) = dest.parent() {
            sync_dir(parent)?;
        }
        Ok(created)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let created = res.map_err(io_err)?;
    stats.bytes(Req::Put, data.len() as u64);
    if created && let Some(f) = faults {
        f.after(Req::Put, key, data.len() as u64, true)?;
    }
    Ok(created)
}

#[cfg(test)]
mod tests;
