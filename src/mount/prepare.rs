//! Phase 4: the cache matched with the store (the fence, a set-aside of a diverged cache,
//! the base generation).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use owsfs_journal::{Journal, Recovery};
use owsfs_local::{Cache, LocalState};
use owsfs_store::generation::{SqliteState, Workspace};

use super::background::Readiness;
use super::lease::LeaseGuard;
use super::{OpenCache, open_journal};

/// Phase 4's result: a cache that matches the store, ready to serve.
pub struct Prepared {
    pub cache: Cache,
    pub journal: Arc<Journal>,
    pub recovery: Recovery,
    pub local: LocalState,
    /// The newest generation (the fence of this mount, or a commit after it).
    pub head: u64,
    /// The SQLite positions of the base generation, carried on for databases a cut skips.
    pub previous_sqlite: Vec<SqliteState>,
}

/// Phase 4: fences the workspace (no older epoch can commit from now on), sets aside the
/// unsynced changes of a cache that diverged from the store, and matches the cache with the
/// newest generation.
pub fn prepare(
    open: OpenCache,
    ws: &Workspace,
    lease: &LeaseGuard,
    store_url: &str,
    ready: &Readiness,
    taking_over: bool,
) -> anyhow::Result<Prepared> {
    let OpenCache {
        cache,
        mut journal,
        mut recovery,
    } = open;
    // A set-aside that a crash interrupted was finished when the cache was opened.
    for dest in &cache.finished_aside {
        ready.notice(&aside_notice(dest));
    }
    let head = ws
        .fence(lease.epoch())
        .with_context(|| format!("cannot fence workspace {}", ws.name()))?;
    tracing::info!("generation {head}: fence of epoch {}", lease.epoch());
    // Crash window: the fence is in the store, nothing of this mount in the cache yet.
    fail::fail_point!("fence-after-slot");
    let state_path = cache.root.join("state.db");
    let mut local = LocalState::open(&state_path)?;
    // After a crash, what the journal may have lost (against the cache's own base, before it
    // is matched with the store). A new cache (no segment yet) has nothing to reconcile.
    if !recovery.clean && recovery.rescan.is_none() && recovery.segments > 0 {
        let torn = recovery.torn_tail.is_some();
        let (n, names) =
            owsfs_hydrate::reconcile::after_crash(&cache.backing, &local, &journal, torn)?;
        if n > 0 {
            tracing::warn!(
                "journal: {n} name(s) differ from the last generation without a journal record \
                 (fetched since, or records lost to damage); the next commit reads them again: \
                 {}",
                names.join(", ")
            );
        }
    }
    if let Some(dir) = cache.adopted() {
        owsfs_hydrate::prepare::check_adopted(
            ws,
            &mut local,
            dir,
            &cache.backing,
            &cache.root,
            head,
        )?;
    }
    if let Some(why) = owsfs_hydrate::prepare::diverged(ws, &local, journal.is_dirty(), head)? {
        if taking_over {
            // The kernel refers to this tree's files: it cannot go aside under it.
            anyhow::bail!(
                "cannot take over the mount: {why}; another node wrote the workspace while no \
                 daemon served it"
            );
        }
        // Never merged: the unsynced changes go aside, whole, for `owsfs recover`.
        drop(local);
        drop(journal);
        let name = format!(
            "{}-epoch{}",
            jiff::Timestamp::now().as_second(),
            lease.epoch()
        );
        let dest = cache.set_aside(
            &name,
            &serde_json::json!({"workspace": ws.name(), "store": store_url, "reason": why}),
        )?;
        tracing::warn!(
            "{why}: they are kept in {}; make them a workspace of their own with `owsfs recover \
             --cache {} --as NEW_NAME`",
            dest.display(),
            dest.display()
        );
        ready.notice(&aside_notice(&dest));
        (journal, recovery) = open_journal(&cache)?;
        local = LocalState::open(&state_path)?;
    }
    let journal = Arc::new(journal);
    let (previous_sqlite, head) =
        owsfs_hydrate::prepare::prepare_base(ws, &mut local, &cache, &journal, store_url, head)?;
    if lease.keeper().is_lost() {
        anyhow::bail!("the lease was lost while preparing the cache");
    }
    // Commits of this mount carry this epoch; a later mount of this cache knows them as its own.
    local.set_meta("lease_epoch", &lease.epoch().to_string())?;
    Ok(Prepared {
        cache,
        journal,
        recovery,
        local,
        head,
        previous_sqlite,
    })
}

/// Where unsynced changes were set aside, and how to get them back.
pub fn aside_notice(dest: &Path) -> String {
    format!(
        "unsynced changes of an earlier mount were set aside in {} (recover them with `owsfs \
         recover --cache {} --as NEW_NAME`)",
        dest.display(),
        dest.display()
    )
}
