//! Garbage collection: retention applied, then mark and sweep with a grace, safe beside live
//! writers and readers (`FORMAT.md`, "GC": the protocol and its crash analysis).
//!
//! A run marks every pack that the kept generations and snapshots of every workspace reach,
//! then *condemns* the packs nothing reaches by publishing them in its run record
//! (`gc/runs/N`) before it deletes anything. It deletes only packs that an earlier run
//! condemned at least the grace before this run began and that this run's mark still finds
//! unreferenced. Writers read the run records ([`GcWatch`]) and never reference a condemned
//! pack: they do not deduplicate against one, and a commit that would reference one is made
//! again. A pack an in-flight commit uploaded but has not referenced yet is therefore either
//! referenced by the time a later run marks (rescued), or known condemned to its writer before
//! its commit lands.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::{PutOutcome, Store};
use crate::error::{Result, StoreError};
use crate::generation::{GenNumber, GenerationRecord, Workspace, seal_json, unseal_json};
use crate::ids::{BlobId, PackId};
use crate::pack::BlobRef;
use crate::progress::Progress;
use crate::retention::{self, GenSummary, Kept};
use crate::tree::{Content, FileContent, Tree, decode_list};

pub const GC_VERSION: u64 = 1;

/// The default grace: a pack is deleted at least this long after it was condemned, and a
/// generation record only once it is this old.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// How often a writer reads the run records again while it commits (the store's
/// `gc_refresh`); its view may be at most twice this old when a commit is sent.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// A grace must cover a writer's oldest allowed view (twice the refresh interval) plus the
/// time a commit's request may take: at least this many refresh intervals.
pub const MIN_GRACE_REFRESHES: u32 = 4;

/// How long run records are kept. A writer that has not read them for longer forgets its
/// whole deduplication index (it cannot know which packs went).
pub const RUN_HISTORY: Duration = Duration::from_secs(30 * 86_400);

/// A run record `gc/runs/<20-digit run>`: what a GC run condemned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRun {
    pub run: u64,
    /// When the record was written (the GC's clock).
    pub published_unix_ms: u64,
    pub grace_ms: u64,
    /// Packs nothing kept referenced at this run's mark (a blob reached through a pack's
    /// forwards references the pack it was moved to).
    pub condemned: Vec<PackId>,
    /// Packs whose forwards nothing kept reaches any more (their records go once ripe, as
    /// condemned packs do). Absent in records of runs before repacking.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards_condemned: Vec<PackId>,
}

fn run_key(n: u64) -> String {
    format!("gc/runs/{n:020}")
}

/// The numbers of the run records in the store, ascending.
pub fn list_runs(store: &Store) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = store
        .list("gc/runs/")?
        .iter()
        .filter_map(|k| k.strip_prefix("gc/runs/")?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Reads and verifies run record `n`.
pub fn read_run(store: &Store, n: u64) -> Result<GcRun> {
    let key = run_key(n);
    let r: GcRun = unseal_json("owsfs-gc", GC_VERSION, &key, &store.get(&key)?)?;
    if r.run != n {
        return Err(StoreError::corrupt(&key, "the record names another run"));
    }
    Ok(r)
}

/// A writer's view of the run records: the packs it must not reference.
#[derive(Debug, Default)]
pub struct GcWatch {
    /// Condemned packs by run.
    runs: BTreeMap<u64, Vec<PackId>>,
    /// Packs whose forwards were condemned, by run.
    forward_runs: BTreeMap<u64, Vec<PackId>>,
    bad: HashSet<PackId>,
    /// Packs condemned by runs above `seen_before` read since the last `take_fresh`.
    fresh: HashSet<PackId>,
    every: Duration,
    refreshed: Option<Instant>,
}

/// What a refresh found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// The highest run seen (to be remembered across mounts).
    pub seen: u64,
    /// Runs between `seen_before` and the oldest record still stored are gone: the packs they
    /// condemned are unknown, and a deduplication index older than them must be forgotten.
    pub gap: bool,
    /// Runs read for the first time.
    pub new_runs: usize,
}

impl GcWatch {
    /// Reads the run records this watch has not read yet (`seen_before`: the highest run a
    /// previous watch of the same cache read; 0 for none). `now` is the caller's monotonic
    /// time, taken before the listing.
    pub fn refresh(&mut self, store: &Store, seen_before: u64, now: Instant) -> Result<Refreshed> {
        let listed = list_runs(store)?;
        let gap = match listed.first() {
            Some(&oldest) => self.runs.is_empty() && oldest > seen_before + 1,
            None => false,
        };
        let listed_set: BTreeSet<u64> = listed.iter().copied().collect();
        self.runs.retain(|n, _| listed_set.contains(n));
        self.forward_runs.retain(|n, _| listed_set.contains(n));
        let mut new_runs = 0;
        for &n in &listed {
            if self.runs.contains_key(&n) {
                continue;
            }
            let r = match read_run(store, n) {
                Ok(r) => r,
                // Deleted since the listing (too old): its packs are gone or rescued.
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            if n > seen_before {
                self.fresh.extend(r.condemned.iter().copied());
            }
            self.runs.insert(n, r.condemned);
            self.forward_runs.insert(n, r.forwards_condemned);
            new_runs += 1;
        }
        self.bad = self.runs.values().flatten().copied().collect();
        self.every = store.gc_refresh();
        self.refreshed = Some(now);
        Ok(Refreshed {
            seen: listed
                .last()
                .copied()
                .unwrap_or(seen_before)
                .max(seen_before),
            gap,
            new_runs,
        })
    }

    /// The packs condemned by runs this cache had not seen before (since the last call): a
    /// writer drops them from its deduplication index for good, since run records go after
    /// 30 days.
    pub fn take_fresh(&mut self) -> HashSet<PackId> {
        std::mem::take(&mut self.fresh)
    }

    /// Whether the newest run condemned `pack`: the next run may delete it (an older run's
    /// condemnation that a later run did not repeat was rescued).
    pub fn at_risk(&self, pack: &PackId) -> bool {
        self.runs
            .values()
            .next_back()
            .is_some_and(|c| c.contains(pack))
    }

    /// Whether the newest run condemned the forwards of `pack` (a copy that needs them must
    /// not count on them).
    pub fn forwards_at_risk(&self, pack: &PackId) -> bool {
        self.forward_runs
            .values()
            .next_back()
            .is_some_and(|c| c.contains(pack))
    }

    /// Whether a writer may reference `pack`.
    pub fn is_condemned(&self, pack: &PackId) -> bool {
        self.bad.contains(pack)
    }

    /// Every condemned pack.
    pub fn condemned(&self) -> &HashSet<PackId> {
        &self.bad
    }

    /// Whether the view should be read again (older than the refresh interval).
    pub fn stale(&self, now: Instant) -> bool {
        self.refreshed
            .is_none_or(|t| now.saturating_duration_since(t) > self.every)
    }

    /// Whether the view is too old to send a commit with (twice the refresh interval).
    pub fn too_old(&self, now: Instant) -> bool {
        self.refreshed
            .is_none_or(|t| now.saturating_duration_since(t) > 2 * self.every)
    }
}

/// How a GC run goes.
#[derive(Clone, Debug)]
pub struct GcOptions {
    pub grace: Duration,
    /// Compute and report, change nothing.
    pub dry_run: bool,
    /// Bytes of mostly-dead packs a run reads to repack them (0: no repacking).
    pub repack_budget: u64,
    /// Live packs are repacked, the deadest first, until the dead bytes left in them are at
    /// most this share of the live bytes.
    pub max_unused: f64,
}

/// The default [`GcOptions::repack_budget`]: 2 GiB of packs read per run.
pub const DEFAULT_REPACK_BUDGET: u64 = 2 << 30;

impl Default for GcOptions {
    fn default() -> GcOptions {
        GcOptions {
            grace: DEFAULT_GRACE,
            dry_run: false,
            repack_budget: DEFAULT_REPACK_BUDGET,
            max_unused: crate::repack::DEFAULT_MAX_UNUSED,
        }
    }
}

/// What a GC run did (or, dry, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// The run record written (none when dry or when there was nothing to condemn or delete).
    pub run: Option<u64>,
    pub workspaces: u64,
    pub generations: u64,
    pub generations_kept: u64,
    /// Generation records deleted: not kept and older than the grace.
    pub generations_pruned: u64,
    pub snapshots: u64,
    pub trees_read: u64,
    pub packs: u64,
    pub packs_live: u64,
    /// Unreferenced now: deleted by a later run unless referenced again.
    pub packs_condemned: u64,
    pub packs_deleted: u64,
    pub bytes_deleted: u64,
    /// Packs whose live blobs were moved (dry: would be), the packs written for them, and
    /// the live bytes moved.
    #[serde(default)]
    pub packs_repacked: u64,
    #[serde(default)]
    pub repack_packs_written: u64,
    #[serde(default)]
    pub repack_bytes_moved: u64,
    /// Forward records deleted (their packs reached by nothing kept, a grace ago).
    #[serde(default)]
    pub forwards_deleted: u64,
    /// Every object deleted: packs, generation records, old run records.
    pub objects_deleted: u64,
    /// Why the run did nothing (another GC took the same run number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Kept generations per workspace, with why (for `owsfs log`-like reports).
    #[serde(skip)]
    pub kept: BTreeMap<String, Kept>,
}

/// One workspace as GC sees it.
struct WsView {
    ws: Workspace,
    gens: Vec<GenerationRecord>,
    snapshot_roots: Vec<(GenNumber, BlobRef)>,
    /// Unexpired pins: generation and root.
    pins: Vec<(GenNumber, BlobRef)>,
    /// Expired pins, deleted by the sweep.
    expired_pins: Vec<String>,
}

/// Runs GC over the whole store.
pub fn collect(store: &Store, opts: &GcOptions, progress: &dyn Progress) -> Result<GcReport> {
    let min = store.gc_refresh() * MIN_GRACE_REFRESHES;
    if opts.grace < min {
        return Err(StoreError::Invalid(format!(
            "a grace of {} is too short: writers read the GC runs every {}, so it must be at \
             least {}",
            humantime::format_duration(opts.grace),
            humantime::format_duration(store.gc_refresh()),
            humantime::format_duration(min)
        )));
    }
    let grace_ms = opts.grace.as_millis() as u64;
    let t_mark = store.clock().unix_ms();
    let mut report = GcReport::default();

    // 1. Every workspace, its generations and snapshots.
    let views = load_workspaces(store, progress, &mut report)?;
    let mut fork_sources: HashMap<String, Vec<GenNumber>> = HashMap::new();
    for v in &views {
        if let Some(f) = &v.ws.info().forked_from {
            fork_sources
                .entry(f.workspace.clone())
                .or_default()
                .push(f.generation);
        }
    }

    // 2. Retention: what is kept, what is pruned (not kept and older than the grace).
    let (roots, blobs, prune) =
        apply_retention(&views, &fork_sources, t_mark, grace_ms, &mut report)?;

    // 3. Mark every blob the kept trees reach, each where its pack's forwards (if any) say it
    // is now.
    let marked = mark_through_forwards(store, &roots, &blobs, progress, &mut report)?;
    // 4. Every pack; the unreferenced ones are condemned. Mostly dead ones are repacked: their
    // live blobs move to new packs, with forwards, and they are condemned too.
    let Condemned {
        condemned,
        forwards_condemned,
        repacked,
        forwards,
    } = condemn(store, opts, marked, progress, &mut report)?;

    // 5. Deletable: condemned now and by every run back to one published at least the grace
    // before this run's mark began, with no run in between that found it referenced.
    let (runs, records, old_runs) = read_runs(store, t_mark)?;
    let ripe = ripe_packs(&condemned, &records, |r| &r.condemned, t_mark, grace_ms);
    let delete: Vec<PackId> = condemned
        .iter()
        .filter(|p| ripe.contains(p) && !repacked.contains(p))
        .copied()
        .collect();
    let ripe_forwards = ripe_packs(
        &forwards_condemned,
        &records,
        |r| &r.forwards_condemned,
        t_mark,
        grace_ms,
    );
    if opts.dry_run {
        report.packs_deleted = delete.len() as u64;
        for p in &delete {
            report.bytes_deleted += store.size(&p.key()).unwrap_or(0);
        }
        report.objects_deleted = report.packs_deleted + report.generations_pruned;
        return Ok(report);
    }

    // 6. Publish what this run condemns, before deleting anything. Every run writes one, so
    // that "condemned by every run since" has no holes.
    {
        let n = runs.last().map_or(1, |l| l + 1);
        let record = GcRun {
            run: n,
            published_unix_ms: store.clock().unix_ms(),
            grace_ms,
            condemned: condemned.clone(),
            forwards_condemned: forwards_condemned.clone(),
        };
        match store.put_if_absent(
            &run_key(n),
            seal_json("owsfs-gc", GC_VERSION, "gc run", &record)?,
        )? {
            PutOutcome::Created | PutOutcome::AlreadyIdentical => {}
            PutOutcome::Conflict(_) => {
                report.skipped = Some(format!(
                    "another GC wrote run {n} at the same time; this one deleted nothing"
                ));
                return Ok(report);
            }
        }
        report.run = Some(n);
    }
    fail::fail_point!("gc-after-publish");

    // 7. Sweep: pruned generation records first (a record is never left whose packs are gone),
    // then packs, then expired pins and run records past their history.
    for key in &prune {
        store.delete(key)?;
    }
    progress.begin("deleting", 0, delete.len() as u64);
    for (i, p) in delete.iter().enumerate() {
        let key = p.key();
        match store.size(&key) {
            Ok(n) => report.bytes_deleted += n,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        }
        store.delete(&key)?;
        report.packs_deleted += 1;
        progress.update(report.bytes_deleted, i as u64 + 1);
    }
    progress.finish();
    // Forwards last: a blob is never left whose forward is gone while its old pack is not.
    for p in &ripe_forwards {
        if let Some(f) = forwards.get(p) {
            for key in &f.keys {
                store.delete(key)?;
                report.forwards_deleted += 1;
            }
        }
    }
    for v in &views {
        for id in &v.expired_pins {
            v.ws.unpin(id)?;
            report.objects_deleted += 1;
        }
    }
    // Keep the newest run record whatever its age (run numbers go on from it).
    for n in old_runs
        .iter()
        .filter(|&&n| Some(n) != report.run && Some(&n) != runs.last())
    {
        store.delete(&run_key(*n))?;
        report.objects_deleted += 1;
    }
    report.objects_deleted +=
        report.packs_deleted + report.generations_pruned + report.forwards_deleted;
    Ok(report)
}

/// The run numbers listed, the records still there, and the numbers of those past their
/// history at `t_mark`.
fn read_runs(store: &Store, t_mark: u64) -> Result<(Vec<u64>, Vec<GcRun>, Vec<u64>)> {
    let runs = list_runs(store)?;
    let mut records = Vec::new();
    let mut old_runs = Vec::new();
    for &n in &runs {
        match read_run(store, n) {
            Ok(r) => {
                if r.published_unix_ms + RUN_HISTORY.as_millis() as u64 <= t_mark {
                    old_runs.push(n);
                }
                records.push(r);
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok((runs, records, old_runs))
}

/// What a mark found: the live blobs of each pack (after forwards), every pack a kept blob
/// names or passes through (their forwards are still needed), and the forwards read.
struct Marked {
    live: crate::repack::Live,
    named: HashSet<PackId>,
    forwards: HashMap<PackId, crate::forward::Forwarded>,
}

/// Steps 3 of a run: the mark from `roots` (and the loose `blobs`: access lists), resolved
/// through every pack's forwards.
fn mark_through_forwards(
    store: &Store,
    roots: &[BlobRef],
    blobs: &[BlobRef],
    progress: &dyn Progress,
    report: &mut GcReport,
) -> Result<Marked> {
    let mut refs = mark(store, roots, progress, report)?;
    blobs.iter().for_each(|b| refs.insert(b));
    let forwards = crate::forward::read_all(store)?;
    let mut live = crate::repack::Live::default();
    let mut named: HashSet<PackId> = HashSet::new();
    for b in refs.blobs() {
        named.insert(b.pack);
        let (at, via) = crate::forward::resolve(&forwards, &b);
        let moved = !via.is_empty();
        named.extend(via);
        live.add(&at, moved.then_some((b.pack, b.offset)));
    }
    drop(refs);
    report.packs_live = live.packs.len() as u64;
    Ok(Marked {
        live,
        named,
        forwards,
    })
}

/// What a run condemns: packs with no live blob (the repacked ones included), forwards of
/// packs nothing kept reaches; and the packs it repacked (its own mark found them live).
struct Condemned {
    condemned: Vec<PackId>,
    forwards_condemned: Vec<PackId>,
    repacked: HashSet<PackId>,
    forwards: HashMap<PackId, crate::forward::Forwarded>,
}

/// Step 4 of a run: every pack listed, the mostly dead ones repacked (not when dry), the
/// unreferenced ones condemned.
fn condemn(
    store: &Store,
    opts: &GcOptions,
    marked: Marked,
    progress: &dyn Progress,
    report: &mut GcReport,
) -> Result<Condemned> {
    let Marked {
        mut live,
        named,
        forwards,
    } = marked;
    let mut sizes: HashMap<PackId, u64> = HashMap::new();
    for (k, size) in store.list_sizes("packs/")? {
        if let Some(p) = k.rsplit('/').next().and_then(|p| p.parse::<PackId>().ok()) {
            sizes.insert(p, size);
        }
    }
    report.packs = sizes.len() as u64;
    if opts.repack_budget > 0 {
        // Sizes the listing did not give (file://): only of packs that may qualify.
        let unknown: Vec<PackId> = sizes
            .iter()
            .filter(|(p, s)| **s == 0 && live.packs.contains_key(p))
            .map(|(p, _)| *p)
            .collect();
        for p in unknown {
            sizes.insert(p, store.size(&p.key()).unwrap_or(0));
        }
    }
    let cands = crate::repack::candidates(&sizes, &live, opts.repack_budget, opts.max_unused);
    report.packs_repacked = cands.len() as u64;
    // This run's mark found them referenced: their grace starts with this run, whatever
    // earlier runs condemned.
    let repacked: HashSet<PackId> = cands.iter().map(|c| c.pack).collect();
    if opts.dry_run {
        report.repack_bytes_moved = cands.iter().map(|c| c.live_bytes()).sum();
    } else if !cands.is_empty() {
        let done = crate::repack::repack(store, &cands, progress)?;
        report.repack_packs_written = done.packs_written;
        report.repack_bytes_moved = done.bytes_moved;
        for c in &cands {
            live.packs.remove(&c.pack);
        }
    }
    let mut condemned: Vec<PackId> = sizes
        .keys()
        .filter(|p| !live.packs.contains_key(p))
        .copied()
        .collect();
    condemned.sort();
    report.packs_condemned = condemned.len() as u64;
    let mut forwards_condemned: Vec<PackId> = forwards
        .keys()
        .filter(|p| !named.contains(p))
        .copied()
        .collect();
    forwards_condemned.sort();
    Ok(Condemned {
        condemned,
        forwards_condemned,
        repacked,
        forwards,
    })
}

/// The trees and blobs kept generations reach, and the keys of the records to prune (not kept
/// and older than the grace).
fn apply_retention(
    views: &[WsView],
    fork_sources: &HashMap<String, Vec<GenNumber>>,
    t_mark: u64,
    grace_ms: u64,
    report: &mut GcReport,
) -> Result<(Vec<BlobRef>, Vec<BlobRef>, Vec<String>)> {
    let mut roots: Vec<BlobRef> = Vec::new();
    let mut blobs: Vec<BlobRef> = Vec::new();
    let mut prune: Vec<String> = Vec::new();
    for v in views {
        let policy = v.ws.retention()?;
        let summaries: Vec<GenSummary> = v
            .gens
            .iter()
            .map(|g| GenSummary {
                number: g.number,
                kind: g.kind,
                time_unix_ms: g.time_unix_ms,
            })
            .collect();
        let snaps: Vec<GenNumber> = v.snapshot_roots.iter().map(|(n, _)| *n).collect();
        let forks = fork_sources.get(v.ws.name()).cloned().unwrap_or_default();
        let pinned: Vec<GenNumber> = v.pins.iter().map(|(n, _)| *n).collect();
        let kept = retention::plan(&policy, t_mark, &summaries, &snaps, &forks, &pinned);
        for g in &v.gens {
            let young = t_mark.saturating_sub(g.time_unix_ms) < grace_ms;
            if kept.contains_key(&g.number) || young {
                report.generations_kept += 1;
                roots.extend(g.root);
                blobs.extend(g.access);
            } else {
                prune.push(v.ws.generation_key(g.number));
            }
        }
        roots.extend(v.snapshot_roots.iter().map(|(_, r)| *r));
        // A pin's tree even if its record was pruned by a run that listed before the pin.
        roots.extend(v.pins.iter().map(|(_, r)| *r));
        report.kept.insert(v.ws.name().to_string(), kept);
    }
    report.generations_pruned = prune.len() as u64;
    Ok((roots, blobs, prune))
}

/// The packs of `condemned` that every run from the newest back to one published at least
/// `grace_ms` before `t_mark` condemned too, with consecutive run numbers (a pack some run in
/// between found referenced starts over: a grace from when it was condemned again).
fn ripe_packs(
    condemned: &[PackId],
    records: &[GcRun],
    of: impl Fn(&GcRun) -> &Vec<PackId>,
    t_mark: u64,
    grace_ms: u64,
) -> HashSet<PackId> {
    let mut streak: HashSet<PackId> = condemned.iter().copied().collect();
    let mut expect: Option<u64> = None;
    for r in records.iter().rev() {
        if expect.is_some_and(|e| e != r.run) {
            break;
        }
        let theirs: HashSet<&PackId> = of(r).iter().collect();
        streak.retain(|p| theirs.contains(p));
        if streak.is_empty() {
            break;
        }
        if r.published_unix_ms + grace_ms <= t_mark {
            // Older runs' streaks are subsets of this one.
            return streak;
        }
        expect = r.run.checked_sub(1);
    }
    HashSet::new()
}

/// Reads every workspace's generation records and snapshots.
fn load_workspaces(
    store: &Store,
    progress: &dyn Progress,
    report: &mut GcReport,
) -> Result<Vec<WsView>> {
    let keys = store.list("workspaces/")?;
    let mut names: BTreeSet<String> = BTreeSet::new();
    let mut gens: HashMap<String, Vec<GenNumber>> = HashMap::new();
    for k in &keys {
        let mut parts = k.splitn(4, '/');
        let (Some(_), Some(name), Some(kind)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        names.insert(name.to_string());
        if kind == "gens"
            && let Some(n) = parts.next().and_then(|n| n.parse::<GenNumber>().ok())
        {
            gens.entry(name.to_string()).or_default().push(n);
        }
    }
    let total: u64 = gens.values().map(|g| g.len() as u64).sum();
    progress.begin("reading generations", 0, total);
    let mut done = 0;
    let mut out = Vec::new();
    for name in names {
        // A workspace without its marker would go unmarked: stop rather than delete its
        // packs.
        let ws = Workspace::open_existing(store, &name)?.ok_or_else(|| {
            StoreError::corrupt(
                format!("workspaces/{name}/workspace.json"),
                "missing while the workspace has other objects; GC stopped",
            )
        })?;
        let mut records = Vec::new();
        let mut numbers = gens.remove(&name).unwrap_or_default();
        numbers.sort_unstable();
        for n in numbers {
            match ws.read_generation(n) {
                Ok(r) => records.push(r),
                // Pruned since the listing by another GC: not kept by this one either.
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
            done += 1;
            progress.update(0, done);
        }
        let snapshot_roots = ws
            .list_snapshots()?
            .into_iter()
            .map(|s| (s.generation, s.root))
            .collect::<Vec<_>>();
        let now = store.clock().unix_ms();
        let (mut pins, mut expired_pins) = (Vec::new(), Vec::new());
        for p in ws.list_pins()? {
            if p.expires_unix_ms > now {
                pins.push((p.generation, p.root));
            } else {
                expired_pins.push(p.id);
            }
        }
        report.workspaces += 1;
        report.generations += records.len() as u64;
        report.snapshots += snapshot_roots.len() as u64;
        out.push(WsView {
            ws,
            gens: records,
            snapshot_roots,
            pins,
            expired_pins,
        });
    }
    progress.finish();
    Ok(out)
}

/// The packs the trees at `roots` reach. Any tree or list that cannot be read fails the whole
/// mark: nothing is deleted on a partial mark.
pub(crate) fn mark(
    store: &Store,
    roots: &[BlobRef],
    progress: &dyn Progress,
    report: &mut GcReport,
) -> Result<Refs> {
    progress.begin("marking", 0, 0);
    let live = Marker::default().mark(store, roots, progress, report);
    progress.finish();
    live
}

/// The blobs a mark reached, by pack and offset (blobs are named by pack and offset: a
/// repacked pack's are found through its forwards).
#[derive(Clone, Debug, Default)]
pub(crate) struct Refs {
    /// Keyed by pack and offset: one table, not one per pack (a store has many small packs).
    blobs: HashMap<(PackId, u64), BlobRef>,
}

impl Refs {
    pub(crate) fn insert(&mut self, r: &BlobRef) {
        self.blobs.insert((r.pack, r.offset), *r);
    }

    /// The blobs named, pack by pack.
    pub(crate) fn by_pack_blobs(&self) -> Vec<(PackId, Vec<BlobRef>)> {
        let mut by: HashMap<PackId, Vec<BlobRef>> = HashMap::new();
        for b in self.blobs() {
            by.entry(b.pack).or_default().push(b);
        }
        by.into_iter().collect()
    }

    /// Every blob named, each once.
    pub(crate) fn blobs(&self) -> impl Iterator<Item = BlobRef> + '_ {
        self.blobs.values().copied()
    }
}

/// A mark that remembers the trees and lists it read: a later call returns only the packs
/// that trees and lists it had not met yet reach (a copy, generation by generation).
#[derive(Default)]
pub(crate) struct Marker {
    seen_trees: HashSet<BlobId>,
    seen_lists: HashSet<BlobId>,
}

impl Marker {
    pub(crate) fn mark(
        &mut self,
        store: &Store,
        roots: &[BlobRef],
        progress: &dyn Progress,
        report: &mut GcReport,
    ) -> Result<Refs> {
        let mut live = Refs::default();
        let mut stack: Vec<BlobRef> = Vec::new();
        for r in roots {
            if !self.seen_trees.contains(&r.id) {
                live.insert(r);
                stack.push(*r);
            }
        }
        while let Some(r) = stack.pop() {
            if !self.seen_trees.insert(r.id) {
                continue;
            }
            let tree = Tree::load(store, &r)?;
            report.trees_read += 1;
            progress.update(0, report.trees_read);
            for e in &tree.entries {
                match &e.content {
                    Content::Dir(sub) if !self.seen_trees.contains(&sub.id) => {
                        live.insert(sub);
                        stack.push(*sub);
                    }
                    Content::File(FileContent::Chunks(c)) => c.iter().for_each(|r| live.insert(r)),
                    Content::File(FileContent::List(lists)) => {
                        for l in lists {
                            live.insert(&l.blob);
                            if self.seen_lists.insert(l.blob.id) {
                                let b = crate::pack::read_blob(store, &l.blob)?;
                                let object = format!("list {} in {}", l.blob.id, l.blob.pack.key());
                                decode_list(&object, &b)?
                                    .iter()
                                    .for_each(|r| live.insert(r));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(live)
    }
}
