//! A failed batch write (a full disk, an I/O error): the segment cut back to its last whole
//! record, the batch's records dropped from the state, the journal poisoned unless the
//! failure passes. FORMAT.md, "Failed writes".

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use super::{EFBIG, Failure, Inner, Journal, is_no_space};
use crate::record::{self, Record};
use crate::{replay, segment};

impl Journal {
    /// After a failed batch write: leaves the segment as it was before the write, drops the
    /// batch's records from the state (their operations will not be performed), and poisons
    /// the journal unless the failure is a passing one (no space). Returns the batch's error.
    pub(super) fn failed_write(&self, g: &mut Inner, e: io::Error) -> Failure {
        let path = segment::segment_path(&self.dir, g.segment);
        let errno = e.raw_os_error();
        let failure = Failure::Write {
            path: path.clone(),
            errno,
            text: e.to_string(),
        };
        let err = failure.error(&self.dir);
        g.failed_batches += 1;
        // The write may have appended part of the batch: cut it off, so the segment ends with
        // the last whole record again and later records follow it directly.
        // Crash window: the segment may end in part of the failed batch.
        fail::fail_point!("journal-failed-before-cut");
        let cut = g.file.set_len(g.offset);
        // Crash window: the segment cut back, the state not yet rebuilt.
        fail::fail_point!("journal-failed-after-cut");
        let mut poison = match cut {
            Ok(()) if is_no_space(errno) || errno == Some(EFBIG) => None,
            Ok(()) => Some(format!("{err}")),
            Err(cut) => Some(format!(
                "{err}; then could not remove the partial write from the segment: {cut}"
            )),
        };
        if poison.is_some() {
            // The records buffered meanwhile will not be written either.
            g.buf.clear();
            let _ = std::mem::take(&mut g.batch)
                .outcome
                .set(Err(Failure::Poisoned(poison.clone().unwrap_or_default())));
        }
        // The failed records were applied to the state when they were buffered.
        if let Err(why) = self.restore_state(g) {
            let why = format!("{err}; then could not drop its records from the dirty state: {why}");
            g.state_lost = true;
            poison = Some(why);
        }
        if let Some(why) = poison {
            tracing::error!("journal {}: {why}", self.dir.display());
            g.poisoned.get_or_insert(why);
        } else {
            tracing::debug!("journal {}: {err}", self.dir.display());
            if is_no_space(errno) && g.reserve.bytes > 0 && g.reserve.supported {
                // Cutting the segment back also freed what was left of its reserve.
                g.reserve.end = g.offset;
                self.top_up(g);
            }
        }
        failure
    }

    /// Rebuilds the state and the changes since the pending cut from the segment's whole
    /// records (what the disk holds), then applies the records still buffered.
    fn restore_state(&self, g: &mut Inner) -> Result<(), String> {
        let path = segment::segment_path(&self.dir, g.segment);
        let mut bytes = vec![0; g.offset as usize];
        File::open(&path)
            .and_then(|f| f.read_exact_at(&mut bytes, 0))
            .map_err(|e| format!("read {}: {e}", path.display()))?;
        let (mut state, after_cut) = replay::fold_segment(&bytes, g.pending_cut)
            .map_err(|why| format!("{}: {why}", path.display()))?;
        // Without a pending cut the two are one; with one whose start the segment no longer
        // holds (it rotated since), the whole state stands in for the later changes: a
        // superset, which only makes the next cut read more.
        let mut live = match (g.pending_cut, after_cut) {
            (Some(_), Some(live)) => live,
            _ => state.clone(),
        };
        let mut off = 0;
        while off < g.buf.len() {
            let (_, rec, end) =
                record::read_frame(&g.buf, off).map_err(|e| e.reason().to_owned())?;
            if let Record::Op(op) = rec {
                state.apply(&op);
                live.apply(&op);
            }
            off = end;
        }
        if state.is_empty() {
            g.dirty_since = None;
        } else if g.dirty_since.is_none() {
            g.dirty_since = Some(Instant::now());
        }
        if live.is_empty() {
            g.live_since = None;
        } else if g.live_since.is_none() {
            g.live_since = Some(Instant::now());
        }
        g.state = state;
        g.live = live;
        Ok(())
    }
}
