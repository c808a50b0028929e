//! A live rollback, on the agent's side: the commit of a generation whose tree is an older
//! one's, and the cache made a copy of it, with no cut in between (`store/FORMAT.md`,
//! "Rollback").

use std::time::Duration;

use anyhow::{Context, bail};
use owsfs_local::LocalState;
use owsfs_store::generation::{CommitError, GenKind, GenerationRecord};

use super::SyncAgent;

/// What a live rollback committed.
#[derive(Clone, Debug)]
pub struct RollbackDone {
    /// The new generation, holding `to`'s tree.
    pub generation: u64,
    pub to: u64,
    /// The automatic snapshot of the state it replaced (undo: roll back to it).
    pub snapshot: Option<String>,
}

impl SyncAgent {
    /// Commits, on top of the newest generation, one whose tree is the commit `resolve`
    /// names, then lets `rebase` make the cache a copy of it (given the new generation's
    /// record), under the commit lock and the cache state's lock: no cut runs in between. The
    /// caller holds kernel requests back, so nothing is written meanwhile; whatever was
    /// written since the last commit is committed first (without a syncfs of the mount, which
    /// would wait on the held-back requests), and `resolve` is called after that, so the
    /// reference is read milliseconds before the commit (a GC keeps the packs of a record it
    /// prunes for a grace after the record goes, not for as long as an upload may take). The
    /// newest commit before the rollback gets an automatic snapshot `auto-rollback-N` (older
    /// ones beyond `keep` roll off; 0: none), which a second rollback goes back to.
    ///
    /// A `rebase` that fails stops writes (fail-stop): the cache's state may already be the
    /// new tree's, and the next mount of the cache finishes the rollback.
    pub fn rollback_to(
        &self,
        resolve: impl FnOnce() -> anyhow::Result<GenerationRecord>,
        keep: usize,
        rebase: impl FnOnce(&mut LocalState, &GenerationRecord) -> anyhow::Result<()>,
    ) -> anyhow::Result<RollbackDone> {
        if let Some(why) = self.core.writes_stopped() {
            bail!("writes were stopped ({why}): nothing more is committed from this mount");
        }
        // No other commit until this one's state is updated (the agent's thread would
        // otherwise cut on top of a base the rollback is replacing).
        let _one = self.commit_lock.lock();
        if self.core.journal().is_dirty() {
            self.commit_locked()
                .context("cannot commit what was written before the rollback")?;
        }
        let mut local = self.local.lock();
        if self.core.journal().is_dirty() {
            bail!("the workspace changed during the rollback; nothing was rolled back");
        }
        let to = resolve()?;
        let root = match (to.kind, to.root) {
            (GenKind::Commit, Some(r)) => r,
            _ => bail!("generation {} is a fence, not a state", to.number),
        };
        self.keeper
            .check(Duration::ZERO)
            .context("not rolling back: the lease")?;
        let (head, epoch) = self.head_epoch();
        let snapshot = match self.ws.newest_commit(head)? {
            Some(newest) if keep > 0 => Some(
                self.ws
                    .auto_snapshot("rollback", &newest, keep)
                    .context("cannot take the snapshot before the rollback")?
                    .0
                    .name,
            ),
            _ => None,
        };
        let number = head + 1;
        // Noted before the commit: should the daemon die before the cache becomes the new
        // tree's copy, the next mount must not take the commit for one its journal covers.
        local.set_meta(
            "rollback",
            &format!("{number} {}", serde_json::to_string(&root)?),
        )?;
        let record = owsfs_store::rollback::rollback_record(&self.ws, &to, root, head, epoch);
        fail::fail_point!("rollback-before-commit");
        let slot_started = self.clock.now();
        match self.ws.commit(&record) {
            // Another node looking for the newest state finds the rollback at once.
            Ok(()) => {
                self.keeper.committed(slot_started);
                self.ws.flush_head_hint();
            }
            Err(CommitError::SlotTaken { number, existing }) if existing.epoch != epoch => {
                let why = format!(
                    "generation slot {number} was taken at epoch {} (this mount has epoch \
                     {epoch}): another node took the workspace over",
                    existing.epoch
                );
                self.keeper.lose(&why);
                bail!("rollback refused: {why}");
            }
            Err(e) => return Err(e).with_context(|| format!("commit generation {number}")),
        }
        fail::fail_point!("rollback-after-commit");
        if let Err(e) = rebase(&mut local, &record) {
            let why = format!(
                "the rollback to generation {} was committed as generation {number}, but the \
                 cache could not become its copy ({e:#}); unmount and mount again to finish it",
                to.number
            );
            self.core.stop_writes(&why);
            bail!("{why}");
        }
        let mut st = self.st.lock();
        st.head = number;
        st.previous_sqlite = to.sqlite.clone();
        st.last_error = None;
        self.cv.notify_all();
        Ok(RollbackDone {
            generation: number,
            to: to.number,
            snapshot,
        })
    }

    /// The base generation's access list, carried on after this mount's own (a live
    /// rollback changes the base).
    pub fn set_inherited_access(&self, paths: Vec<String>) {
        *self.inherited_access.lock() = paths;
    }
}
