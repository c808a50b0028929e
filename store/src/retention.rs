//! Which generations a workspace keeps, and why (`FORMAT.md`, "Retention").
//!
//! Commits are kept when they are the newest, made within the last `all` (everything
//! recent), the newest of their hour within the last `hourly`, the newest of their UTC day
//! within the last `daily`, named by a snapshot, or the start of a fork. The highest slot
//! (HEAD, which may be a fence) is kept too: the next commit's parent. Everything else may go;
//! GC deletes it only once it is older than its grace (`crate::gc`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::generation::{GenKind, GenNumber, Workspace, seal_json, unseal_json};

pub const RETENTION_VERSION: u64 = 1;

/// A workspace's retention policy (`workspaces/W/retention`; absent: the defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Keep every commit made within this long.
    pub all_secs: u64,
    /// Keep the newest commit of each hour within this long.
    pub hourly_secs: u64,
    /// Keep the newest commit of each UTC day within this long.
    pub daily_secs: u64,
}

impl Default for Policy {
    /// Everything for an hour, hourly for a day, daily for a week.
    fn default() -> Policy {
        Policy {
            all_secs: 3600,
            hourly_secs: 86_400,
            daily_secs: 7 * 86_400,
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |s: u64| humantime::format_duration(Duration::from_secs(s)).to_string();
        write!(
            f,
            "everything for {}, hourly for {}, daily for {}, and always the newest",
            d(self.all_secs),
            d(self.hourly_secs),
            d(self.daily_secs)
        )
    }
}

/// Why a generation is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The newest commit.
    Newest,
    /// The highest slot (the next commit's parent).
    Head,
    /// Made within the policy's `all`.
    Recent,
    /// The newest of its hour.
    Hourly,
    /// The newest of its day.
    Daily,
    /// Named by a snapshot.
    Snapshot,
    /// The generation a fork started from.
    ForkSource,
    /// Pinned (a read-only mount reads it).
    Pinned,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Newest => "newest",
            Reason::Head => "head",
            Reason::Recent => "recent",
            Reason::Hourly => "hourly",
            Reason::Daily => "daily",
            Reason::Snapshot => "snapshot",
            Reason::ForkSource => "fork source",
            Reason::Pinned => "pinned",
        }
    }
}

/// What retention needs of a generation record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenSummary {
    pub number: GenNumber,
    pub kind: GenKind,
    pub time_unix_ms: u64,
}

/// Kept generations with their reasons; generations not in the map may go.
pub type Kept = BTreeMap<GenNumber, BTreeSet<Reason>>;

/// Applies `policy` at Unix time `now_ms` to `gens` (any order), with the generations that
/// snapshots name, that forks started from and that pins hold.
pub fn plan(
    policy: &Policy,
    now_ms: u64,
    gens: &[GenSummary],
    snapshots: &[GenNumber],
    fork_sources: &[GenNumber],
    pinned: &[GenNumber],
) -> Kept {
    let mut kept = Kept::new();
    let mut add = |n: GenNumber, r: Reason| {
        kept.entry(n).or_default().insert(r);
    };
    let mut commits: Vec<&GenSummary> = gens.iter().filter(|g| g.kind == GenKind::Commit).collect();
    commits.sort_by_key(|g| g.number);
    if let Some(head) = gens.iter().map(|g| g.number).max() {
        add(head, Reason::Head);
    }
    if let Some(newest) = commits.last() {
        add(newest.number, Reason::Newest);
    }
    // The fences above the newest commit: the path from HEAD down to it.
    let newest_n = commits.last().map_or(0, |c| c.number);
    for g in gens.iter().filter(|g| g.number > newest_n) {
        add(g.number, Reason::Head);
    }
    let age = |g: &GenSummary| now_ms.saturating_sub(g.time_unix_ms);
    // Newest first, so the first commit met in a bucket is its newest.
    let mut hours = BTreeSet::new();
    let mut days = BTreeSet::new();
    for g in commits.iter().rev() {
        if age(g) <= policy.all_secs * 1000 {
            add(g.number, Reason::Recent);
        }
        if age(g) <= policy.hourly_secs * 1000 && hours.insert(g.time_unix_ms / 3_600_000) {
            add(g.number, Reason::Hourly);
        }
        if age(g) <= policy.daily_secs * 1000 && days.insert(g.time_unix_ms / 86_400_000) {
            add(g.number, Reason::Daily);
        }
    }
    let exists: BTreeSet<GenNumber> = gens.iter().map(|g| g.number).collect();
    for (list, reason) in [
        (snapshots, Reason::Snapshot),
        (fork_sources, Reason::ForkSource),
        (pinned, Reason::Pinned),
    ] {
        for &n in list {
            if exists.contains(&n) {
                add(n, reason);
            }
        }
    }
    kept
}

impl Workspace {
    fn retention_key(&self) -> String {
        format!("workspaces/{}/retention", self.name())
    }

    /// The workspace's policy (the defaults when none was set).
    pub fn retention(&self) -> Result<Policy> {
        let key = self.retention_key();
        match self.store().get(&key) {
            Ok(b) => unseal_json("owsfs-retention", RETENTION_VERSION, &key, &b),
            Err(e) if e.is_not_found() => Ok(Policy::default()),
            Err(e) => Err(e),
        }
    }

    /// The workspace's policy when one was set (`None`: the defaults apply).
    pub fn retention_if_set(&self) -> Result<Option<Policy>> {
        let key = self.retention_key();
        match self.store().get(&key) {
            Ok(b) => unseal_json("owsfs-retention", RETENTION_VERSION, &key, &b).map(Some),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores the workspace's policy.
    pub fn set_retention(&self, p: &Policy) -> Result<()> {
        self.store().put(
            &self.retention_key(),
            seal_json("owsfs-retention", RETENTION_VERSION, "retention", p)?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;
    const D: u64 = 24 * H;

    fn commit(n: u64, t: u64) -> GenSummary {
        GenSummary {
            number: n,
            kind: GenKind::Commit,
            time_unix_ms: t,
        }
    }

    fn reasons(k: &Kept, n: u64) -> Vec<&'static str> {
        k.get(&n)
            .map(|r| r.iter().map(|r| r.as_str()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_default_policy_thins_by_age() {
        // A commit every 10 minutes for 10 days, ending at `now`.
        let now = 100 * D + 30 * 60_000;
        let n_total = 10 * 24 * 6;
        let gens: Vec<GenSummary> = (1..=n_total)
            .map(|n| commit(n, now - (n_total - n) * 600_000))
            .collect();
        let k = plan(&Policy::default(), now, &gens, &[], &[], &[]);
        let newest = n_total;
        assert_eq!(
            reasons(&k, newest),
            ["newest", "head", "recent", "hourly", "daily"]
        );
        // The last hour: all 7 (0, 10, ..., 60 minutes old).
        let recent: Vec<u64> = k
            .iter()
            .filter(|(_, r)| r.contains(&Reason::Recent))
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(recent, (newest - 6..=newest).collect::<Vec<_>>());
        // Within a day: one per hour bucket (24 or 25 of them), the newest of each.
        let hourly: Vec<u64> = k
            .iter()
            .filter(|(_, r)| r.contains(&Reason::Hourly))
            .map(|(n, _)| *n)
            .collect();
        assert!((24..=25).contains(&hourly.len()), "{}", hourly.len());
        for n in &hourly {
            let t = gens[*n as usize - 1].time_unix_ms;
            let next = gens.get(*n as usize).map(|g| g.time_unix_ms);
            assert!(
                next.is_none_or(|u| u / H != t / H),
                "{n} is not the newest of its hour"
            );
        }
        // Within a week: one per day, 7 or 8 days touched.
        let daily = k.values().filter(|r| r.contains(&Reason::Daily)).count();
        assert!((7..=8).contains(&daily), "{daily}");
        // Older than a week: nothing.
        assert!(
            k.keys()
                .all(|&n| now - gens[n as usize - 1].time_unix_ms <= 7 * D + D)
        );
        assert!(k.len() < 45, "{}", k.len());
    }

    #[test]
    fn snapshots_forks_pins_and_head_are_kept_whatever_their_age() {
        let now = 1000 * D;
        let mut gens = vec![commit(1, 1), commit(2, 2), commit(3, 3)];
        gens.push(GenSummary {
            number: 4,
            kind: GenKind::Fence,
            time_unix_ms: 4,
        });
        let k = plan(&Policy::default(), now, &gens, &[1], &[2, 99], &[1]);
        assert_eq!(reasons(&k, 1), ["snapshot", "pinned"]);
        assert_eq!(reasons(&k, 2), ["fork source"]);
        assert_eq!(reasons(&k, 3), ["newest"]);
        assert_eq!(reasons(&k, 4), ["head"]);
        assert!(!k.contains_key(&99), "a generation that is not there");
        // No commit at all: only HEAD.
        let k = plan(&Policy::default(), now, &gens[3..], &[], &[], &[]);
        assert_eq!(k.keys().copied().collect::<Vec<_>>(), [4]);
    }
}
