//! The lease keeper: takes the workspace's lease at mount (waiting or stealing as asked),
//! renews it, stops writes (fail-stop) when it cannot renew in time or was taken over, and
//! releases it at a clean unmount.
//!
//! Timing, all on this node's monotonic clock: a renewal is attempted TTL/3 after the last
//! successful renewal or commit (a new generation slot shows the holder alive to the nodes
//! that watch, as a new lease step does: lease version 2). The lease is good until `start of
//! the last successful renewal or slot write + TTL - margin` (margin = TTL/4): another node
//! starts counting the TTL only once it has seen that renewal or slot, which is later.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use crossbeam_channel::{Receiver, Sender, bounded, select};
use owsfs_store::generation::Workspace;
use owsfs_store::{Clock, Holder, Lease, LeaseError, LeaseRecord, LeaseState, LeaseWatch};
use parking_lot::Mutex;

/// The lease as this mount sees it, for `owsfs status`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LeaseStatus {
    /// `held`, `lost` (fail-stop) or `released`.
    pub state: String,
    pub holder: String,
    pub node: String,
    pub epoch: u64,
    pub ttl_secs: f64,
    pub last_renewal_secs_ago: f64,
    pub good_for_secs: f64,
    pub renewals: u64,
    /// Commits that counted as renewals (lease version 2: none was sent meanwhile).
    #[serde(default)]
    pub commits_as_renewals: u64,
    /// Renewals that failed (the store answered with an error, or not in time).
    #[serde(default)]
    pub renewal_failures: u64,
    pub last_error: Option<String>,
    pub lost: Option<String>,
}

/// This process as a lease holder of `cache`: the cache's node id, the host, the pid, a
/// random session, and the cache's fingerprint (see `Holder::cache`).
pub fn holder(cache: &owsfs_local::Cache) -> anyhow::Result<Holder> {
    Ok(Holder {
        node: cache.node_id()?,
        host: rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned(),
        pid: std::process::id(),
        session: format!("{:016x}", rand::random::<u64>()),
        cache: cache_fingerprint(&cache.root),
        mountpoint: String::new(),
    })
}

/// Boot id, path and device/inode of the cache directory: equal only for the same directory
/// on the same running system.
fn cache_fingerprint(root: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let boot = owsfs_sys::process::boot_id();
    match std::fs::metadata(root) {
        Ok(m) if !boot.trim().is_empty() => {
            format!("{}:{}#{}:{}", boot.trim(), root.display(), m.dev(), m.ino())
        }
        _ => String::new(),
    }
}

/// How a mount treats a lease another node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// Fail, naming the holder.
    Refuse,
    /// Wait until it is released or lapses.
    Wait,
    /// Take it once it has lapsed; fail if the holder keeps renewing.
    Steal,
    /// Take it now (the holder is known to be dead).
    Force,
}

/// Progress while waiting for a lease, for the user.
pub type Notice<'a> = &'a mut dyn FnMut(&str);

/// Takes the lease of `ws` for `holder`. Returns it, and when the successful request started
/// (on the store's clock): the lease is good for its TTL less a margin from then.
pub fn acquire(
    ws: &Workspace,
    holder: &Holder,
    ttl: Duration,
    mode: Takeover,
    notice: Notice<'_>,
) -> anyhow::Result<(LeaseRecord, Instant)> {
    let clock = Arc::clone(ws.store().clock());
    let lease = Lease::new(ws);
    let mut look = Looking {
        ws,
        holder,
        mode,
        watch: LeaseWatch::with_clock(Arc::clone(&clock)),
        own_seen: None,
        steal_seen: None,
        last_notice: None,
        clock: Arc::clone(&clock),
        slot: None,
    };
    loop {
        let current = match lease.current() {
            Ok(c) => c,
            Err(e) if e.is_corrupt() && mode == Takeover::Force => {
                // The newest record cannot be read: --force replaces it, fencing above every
                // epoch it could have held.
                let min_epoch = ws
                    .head()
                    .ok()
                    .flatten()
                    .and_then(|h| ws.read_generation(h).ok())
                    .map_or(0, |r| r.epoch);
                let started = clock.now();
                match lease.replace_damaged(holder, ttl, min_epoch) {
                    Ok((r, damaged)) => {
                        tracing::warn!(
                            "the lease record {damaged} of workspace {:?} is damaged ({e}); \
                             took the lease over it at epoch {} (--force)",
                            ws.name(),
                            r.epoch
                        );
                        return Ok((r, started));
                    }
                    Err(LeaseError::Lost { .. }) => continue,
                    Err(LeaseError::Store(e)) => return Err(e.into()),
                }
            }
            Err(e) if e.is_corrupt() => {
                return Err(anyhow::Error::new(e).context(format!(
                    "the lease of workspace {:?} cannot be read; if no node holds the workspace, \
                     mount with --steal --force to take it over the damaged record",
                    ws.name()
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let take = match &current {
            None => true,
            Some(r) if r.state == LeaseState::Released => true,
            Some(_) if mode == Takeover::Force => true,
            Some(r) => look.may_take(r, notice)?,
        };
        if take {
            let started = clock.now();
            match lease.acquire(current.as_ref(), holder, ttl) {
                Ok(r) => {
                    if let Some(old) = &current
                        && old.state == LeaseState::Held
                    {
                        tracing::warn!(
                            "took over the lease of workspace {:?} from {} (epoch {} → {})",
                            ws.name(),
                            old.holder,
                            old.epoch,
                            r.epoch
                        );
                    }
                    return Ok((r, started));
                }
                // Someone else moved first: look again.
                Err(LeaseError::Lost { .. }) => continue,
                Err(LeaseError::Store(e)) => return Err(e.into()),
            }
        }
        let pause = current.as_ref().map_or(Duration::from_millis(100), |r| {
            (r.ttl() / 10).clamp(Duration::from_millis(20), Duration::from_millis(500))
        });
        clock.sleep(pause);
    }
}

/// What [`acquire`] has seen of a lease another holder has.
struct Looking<'a> {
    ws: &'a Workspace,
    holder: &'a Holder,
    mode: Takeover,
    watch: LeaseWatch,
    /// The step last seen held under this cache's own node id.
    own_seen: Option<u64>,
    /// The step and newest slot last seen while waiting to steal.
    steal_seen: Option<(u64, Option<u64>)>,
    last_notice: Option<Instant>,
    clock: Arc<dyn Clock>,
    /// The newest generation slot seen (a holder's commit counts as a renewal).
    slot: Option<u64>,
}

impl Looking<'_> {
    /// Whether the held lease `r` may be taken now; an error when it must not be waited for.
    fn may_take(&mut self, r: &LeaseRecord, notice: Notice<'_>) -> anyhow::Result<bool> {
        let ws = self.ws;
        let slot = self.newest_slot()?;
        let lapsed = self.watch.lapsed(r, slot);
        if r.holder.node == self.holder.node
            && !self.holder.cache.is_empty()
            && r.holder.cache == self.holder.cache
        {
            // A mount of this very cache died holding it: this process holds the cache's
            // lock, so that mount is gone.
            tracing::info!(
                "the lease of workspace {:?} was held by an earlier mount of this cache ({}, \
                 epoch {}), which is gone; taking it over",
                ws.name(),
                r.holder,
                r.epoch
            );
            return Ok(true);
        }
        if r.holder.node == self.holder.node {
            // This cache's id, while this process holds the cache lock: either a mount of
            // this cache that died, or another cache with the same id.
            if let Some(seq) = self.own_seen
                && seq != r.seq
            {
                bail!(
                    "node id {} is in use by another live mount ({}, session {}): two caches \
                     claim the same node id (a copied cache?). Remove the file node-id from one \
                     cache to give it a new id",
                    self.holder.node,
                    r.holder,
                    r.holder.session
                );
            }
            self.own_seen = Some(r.seq);
            if !lapsed && self.notice_due() {
                notice(&format!(
                    "the lease of workspace {:?} is held under this cache's node id ({}, epoch \
                     {}) by another cache or an earlier mount; waiting up to {:.1}s for it to \
                     lapse",
                    ws.name(),
                    r.holder,
                    r.epoch,
                    self.watch.remaining(r, slot).as_secs_f64()
                ));
            }
            return Ok(lapsed);
        }
        match self.mode {
            Takeover::Refuse => bail!(
                "workspace {:?} is in use: its lease is held by {} at epoch {} (ttl {:.1}s). It \
                 lapses within {:.1}s if that node stops renewing it. Use --wait to wait for \
                 it, --steal to take it once it lapses, or --steal --force if that node is dead",
                ws.name(),
                r.holder,
                r.epoch,
                r.ttl().as_secs_f64(),
                r.ttl().as_secs_f64()
            ),
            Takeover::Steal if self.steal_seen.is_some_and(|seen| seen != (r.seq, slot)) => bail!(
                "workspace {:?} is in use: {} renewed its lease or committed (epoch {}) while we \
                 waited for it to lapse. Use --wait to wait for a handoff, or --steal --force if \
                 that node is dead",
                ws.name(),
                r.holder,
                r.epoch
            ),
            _ => {
                self.steal_seen = Some((r.seq, slot));
                if !lapsed && self.notice_due() {
                    notice(&format!(
                        "waiting for the lease of workspace {:?}: held by {} at epoch {}; it \
                         lapses in {:.1}s unless renewed",
                        ws.name(),
                        r.holder,
                        r.epoch,
                        self.watch.remaining(r, slot).as_secs_f64()
                    ));
                }
                Ok(lapsed)
            }
        }
    }

    /// The newest generation slot, probed forward from the last one seen (`None`: the
    /// workspace has none yet).
    fn newest_slot(&mut self) -> anyhow::Result<Option<u64>> {
        let known = match self.slot {
            Some(n) => Some(n),
            None => self.ws.head()?,
        };
        let Some(mut n) = known else {
            return Ok(None);
        };
        while self.ws.store().exists(&self.ws.generation_key(n + 1))? {
            n += 1;
        }
        self.slot = Some(n);
        Ok(Some(n))
    }

    /// A notice every 5 s at most.
    fn notice_due(&mut self) -> bool {
        let now = self.clock.now();
        if self
            .last_notice
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(5))
        {
            return false;
        }
        self.last_notice = Some(now);
        true
    }
}

struct KeeperState {
    held: LeaseRecord,
    /// Writes must stop at this instant unless a renewal succeeds first.
    good_until: Instant,
    last_renewal: Instant,
    renewals: u64,
    /// Commits that counted as renewals.
    commits_as_renewals: u64,
    renewal_failures: u64,
    last_error: Option<String>,
    /// Set once, at fail-stop: why.
    lost: Option<String>,
    released: bool,
}

/// Keeps a lease renewed while the mount runs: a renewal thread and a watchdog, each waiting
/// in one `select!` on the stop channel and a deadline of the store's clock (the watchdog
/// also on renewals, which move its deadline).
pub struct Keeper {
    lease: Lease,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    margin: Duration,
    st: Mutex<KeeperState>,
    lost_flag: AtomicBool,
    on_lost: Box<dyn Fn(&str) + Send + Sync>,
    /// Dropped at stop or fail-stop: both threads wake and end.
    stop_tx: Mutex<Option<Sender<()>>>,
    stop_rx: Receiver<()>,
    renewed_tx: Sender<()>,
    renewed_rx: Receiver<()>,
}

impl Keeper {
    /// `acquired_at`: when the acquisition request started (on the store's clock).
    pub fn new(
        ws: &Workspace,
        held: LeaseRecord,
        acquired_at: Instant,
        on_lost: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Arc<Keeper> {
        let ttl = held.ttl();
        let margin = ttl / 4;
        let (stop_tx, stop_rx) = bounded(0);
        let (renewed_tx, renewed_rx) = bounded(1);
        Arc::new(Keeper {
            lease: Lease::new(ws),
            clock: Arc::clone(ws.store().clock()),
            ttl,
            margin,
            st: Mutex::new(KeeperState {
                held,
                good_until: acquired_at + ttl - margin,
                last_renewal: acquired_at,
                renewals: 0,
                commits_as_renewals: 0,
                renewal_failures: 0,
                last_error: None,
                lost: None,
                released: false,
            }),
            lost_flag: AtomicBool::new(false),
            on_lost,
            stop_tx: Mutex::new(Some(stop_tx)),
            stop_rx,
            renewed_tx,
            renewed_rx,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.st.lock().held.epoch
    }

    /// How long the lease lasts without renewal.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether the lease is still good for at least `ahead`; commits check this first.
    pub fn check(&self, ahead: Duration) -> anyhow::Result<()> {
        let st = self.st.lock();
        if let Some(why) = &st.lost {
            bail!("the lease is lost: {why}");
        }
        let now = self.clock.now();
        if now + ahead >= st.good_until {
            bail!(
                "the lease is about to lapse (no renewal for {:.1}s{})",
                now.saturating_duration_since(st.last_renewal).as_secs_f64(),
                st.last_error
                    .as_deref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Why the lease was lost, if it was.
    pub fn lost_reason(&self) -> Option<String> {
        self.st.lock().lost.clone()
    }

    pub fn is_lost(&self) -> bool {
        self.lost_flag.load(Ordering::Relaxed)
    }

    /// Fail-stop: records why and stops writes. Only the first reason counts.
    pub fn lose(&self, why: &str) {
        {
            let mut st = self.st.lock();
            if st.lost.is_some() || st.released {
                return;
            }
            st.lost = Some(why.to_string());
        }
        self.lost_flag.store(true, Ordering::Relaxed);
        tracing::error!("fail-stop: {why}; writes now fail with EROFS");
        (self.on_lost)(why);
        self.stop_tx.lock().take();
    }

    /// The renewal thread (and the watchdog beside it); returns when stopped or lost.
    pub fn run(self: &Arc<Self>) {
        let watchdog = {
            let me = Arc::clone(self);
            std::thread::Builder::new()
                .name("owsfs-lease-dog".into())
                .spawn(move || me.watchdog())
        };
        let every = (self.ttl / 3).max(Duration::from_millis(10));
        loop {
            let next = {
                let st = self.st.lock();
                if st.lost.is_some() {
                    break;
                }
                st.last_renewal + every
            };
            select! {
                recv(self.stop_rx) -> _ => break,
                recv(self.clock.at(next)) -> _ => {}
            }
            // A commit since counted as a renewal: not due yet.
            if self.clock.now() < self.st.lock().last_renewal + every {
                continue;
            }
            if !self.renew_once(every) {
                break;
            }
        }
        if let Ok(w) = watchdog {
            let _ = w.join();
        }
    }

    /// One renewal; false when the lease turned out lost.
    fn renew_once(&self, every: Duration) -> bool {
        let held = {
            let st = self.st.lock();
            if st.lost.is_some() {
                return false;
            }
            st.held.clone()
        };
        let started = self.clock.now();
        match self.lease.renew(&held) {
            Ok(r) => {
                fail::fail_point!("lease-after-renew");
                let mut st = self.st.lock();
                st.held = r;
                st.last_renewal = started;
                st.good_until = started + self.ttl - self.margin;
                st.renewals += 1;
                st.last_error = None;
                drop(st);
                let _ = self.renewed_tx.try_send(());
            }
            Err(LeaseError::Lost { current, .. })
                if current.epoch == held.epoch && current.holder.session == held.holder.session =>
            {
                // Our own renewal, whose answer was lost, landed: take it as held, but keep
                // the deadline of the last renewal we know started in time.
                tracing::info!("lease: step {} was our own renewal", current.seq);
                self.st.lock().held = *current;
            }
            Err(LeaseError::Lost { current, .. }) => {
                self.lose(&format!(
                    "the lease was taken over by {} at epoch {}",
                    current.holder, current.epoch
                ));
                return false;
            }
            Err(LeaseError::Store(e)) => {
                tracing::warn!("lease: renewal failed: {e}");
                let mut st = self.st.lock();
                st.last_error = Some(e.to_string());
                st.renewal_failures += 1;
                // Try again soon rather than a full interval later.
                st.last_renewal = self
                    .clock
                    .now()
                    .checked_sub(every.saturating_sub(Duration::from_millis(100)))
                    .unwrap_or(st.last_renewal);
            }
        }
        true
    }

    /// Stops writes when the lease runs out, even while a renewal request hangs.
    fn watchdog(&self) {
        loop {
            let (good_until, now) = {
                let st = self.st.lock();
                if st.lost.is_some() {
                    return;
                }
                (st.good_until, self.clock.now())
            };
            if now >= good_until {
                let why = {
                    let st = self.st.lock();
                    format!(
                        "the lease could not be renewed for {:.1}s (ttl {:.1}s){}",
                        self.clock
                            .now()
                            .saturating_duration_since(st.last_renewal)
                            .as_secs_f64(),
                        self.ttl.as_secs_f64(),
                        st.last_error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    )
                };
                self.lose(&why);
                return;
            }
            select! {
                recv(self.stop_rx) -> _ => return,
                recv(self.renewed_rx) -> _ => {}
                recv(self.clock.at(good_until)) -> _ => {}
            }
        }
    }

    /// A commit whose slot write started at `started` landed. Observers count a new slot
    /// as a renewal (lease version 2, `LeaseWatch`), so it moves the deadline and the next
    /// renewal as a renewal started then would: a workspace that commits steadily sends no
    /// renewals at all.
    pub fn committed(&self, started: Instant) {
        let mut st = self.st.lock();
        if st.lost.is_some() || st.released || started <= st.last_renewal {
            return;
        }
        st.last_renewal = started;
        st.good_until = st.good_until.max(started + self.ttl - self.margin);
        st.commits_as_renewals += 1;
        drop(st);
        let _ = self.renewed_tx.try_send(());
    }

    /// Stops renewing (the threads end).
    pub fn stop(&self) {
        self.stop_tx.lock().take();
    }

    /// Releases the lease so the next node can mount at once. Call after `stop` and after
    /// the last generation is durable.
    pub fn release(&self) -> anyhow::Result<()> {
        let held = {
            let st = self.st.lock();
            if let Some(why) = &st.lost {
                bail!("not released: the lease is lost ({why})");
            }
            st.held.clone()
        };
        match self.lease.release(&held) {
            Ok(r) => {
                fail::fail_point!("lease-after-release");
                let mut st = self.st.lock();
                st.held = r;
                st.released = true;
                Ok(())
            }
            Err(LeaseError::Lost { current, .. }) => bail!(
                "not released: the lease was taken over by {} at epoch {}",
                current.holder,
                current.epoch
            ),
            Err(LeaseError::Store(e)) => Err(e.into()),
        }
    }

    /// For `owsfs status`.
    pub fn status(&self) -> LeaseStatus {
        let st = self.st.lock();
        let state = if st.released {
            "released"
        } else if st.lost.is_some() {
            "lost"
        } else {
            "held"
        };
        LeaseStatus {
            state: state.to_string(),
            holder: st.held.holder.to_string(),
            node: st.held.holder.node.clone(),
            epoch: st.held.epoch,
            ttl_secs: self.ttl.as_secs_f64(),
            last_renewal_secs_ago: self
                .clock
                .now()
                .saturating_duration_since(st.last_renewal)
                .as_secs_f64(),
            good_for_secs: st
                .good_until
                .saturating_duration_since(self.clock.now())
                .as_secs_f64(),
            renewals: st.renewals,
            commits_as_renewals: st.commits_as_renewals,
            renewal_failures: st.renewal_failures,
            last_error: st.last_error.clone(),
            lost: st.lost.clone(),
        }
    }
}

impl crate::LeaseCheck for Keeper {
    fn epoch(&self) -> u64 {
        Keeper::epoch(self)
    }
    fn check(&self, ahead: Duration) -> anyhow::Result<()> {
        Keeper::check(self, ahead)
    }
    fn is_lost(&self) -> bool {
        Keeper::is_lost(self)
    }
    fn lose(&self, why: &str) {
        Keeper::lose(self, why)
    }
    fn committed(&self, started: Instant) {
        Keeper::committed(self, started)
    }
}
