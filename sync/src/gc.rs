//! The writer's side of the GC protocol (`store/FORMAT.md`, "GC"): the agent reads the GC
//! run records when its view is older than the store's `gc_refresh` R, drops newly condemned
//! packs from its deduplication index for good, never deduplicates against a condemned pack,
//! and does not commit a generation that would reference one, nor with a view older than 2R.

use std::collections::HashSet;

use anyhow::{Context, bail};
use owsfs_local::LocalState;
use owsfs_store::PackId;

use crate::SyncAgent;

impl SyncAgent {
    /// Reads the run records again when the agent's view is stale; the deduplication index
    /// then leaves the condemned packs out (or is forgotten whole when runs were missed).
    pub(crate) fn gc_refresh(&self, local: &mut LocalState) -> anyhow::Result<()> {
        let now = self.clock.now();
        let mut watch = self.gc.lock();
        if !watch.stale(now) {
            return Ok(());
        }
        let seen = local
            .meta("gc_seen")?
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        match watch.refresh(&self.store, seen, now) {
            Ok(r) => {
                if r.gap {
                    tracing::warn!(
                        "GC runs this cache did not see are gone from the store: forgetting \
                         its deduplication index (blobs are uploaded again where needed)"
                    );
                    local.forget_chunks()?;
                }
                let purged = local.purge_chunks(&watch.take_fresh())?;
                if purged > 0 {
                    tracing::info!(
                        "GC condemned packs: {purged} blobs leave the deduplication index"
                    );
                }
                // Noted only once the purge is done: a crash in between purges again.
                if r.seen != seen {
                    local.set_meta("gc_seen", &r.seen.to_string())?;
                }
                local.set_condemned(watch.condemned().clone());
                Ok(())
            }
            Err(e) if !watch.too_old(now) => {
                tracing::warn!("cannot read the GC runs (read again at the next commit): {e}");
                Ok(())
            }
            Err(e) => Err(e).context(
                "cannot read the GC runs, and the last reading is too old to commit safely",
            ),
        }
    }

    /// Before generation `number` is committed: the view of the runs is fresh enough, and no
    /// pack the generation's new blobs are in was condemned.
    pub(crate) fn gc_check(
        &self,
        local: &mut LocalState,
        used: &HashSet<PackId>,
        number: u64,
    ) -> anyhow::Result<()> {
        self.gc_refresh(local)?;
        let watch = self.gc.lock();
        if watch.too_old(self.clock.now()) {
            bail!("not committing generation {number}: the GC runs could not be read lately");
        }
        if let Some(p) = used.iter().find(|p| watch.is_condemned(p)) {
            bail!(
                "not committing generation {number}: it would use pack {}, which a GC \
                 condemned; the next cut uploads those blobs again",
                p.to_hex()
            );
        }
        Ok(())
    }
}
