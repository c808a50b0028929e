//! Opening, after replay: the backing directory rescanned into a new segment, or the last
//! segment continued after its torn tail is cut, or a fresh journal (FORMAT.md, "Opening",
//! steps 4 and 5).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{Recovery, segment};
use crate::error::JournalError;
use crate::op::Seq;
use crate::replay::Replay;
use crate::segment::BootId;
use crate::state::{self, DirtyState};

/// What [`Journal::open`] goes on from: the state, the report, and the segment to append to.
pub(super) struct Resumed {
    pub(super) state: DirtyState,
    pub(super) recovery: Recovery,
    pub(super) last_seq: Seq,
    pub(super) file: File,
    pub(super) segment: u64,
    /// Bytes in the segment.
    pub(super) offset: u64,
    /// Offset just past the segment's snapshot.
    pub(super) snapshot_end: u64,
}

/// Acts on what replay found (FORMAT.md, "Opening", steps 4 and 5): rescans the backing
/// directory into a new segment, or continues the last segment after cutting its torn tail
/// (a new one after a reboot), or starts a fresh journal.
pub(super) fn resume(
    dir: &Path,
    backing_root: &Path,
    boot: BootId,
    replay: Replay,
    asked: bool,
) -> Result<Resumed, JournalError> {
    let Replay {
        state,
        mut recovery,
        last_seq,
        tail,
        obsolete,
        max_segment,
    } = replay;
    if tail.is_none() && recovery.rescan.is_none() && backing_has_entries(backing_root, dir)? {
        // No journal at all, yet the backing directory holds files: whatever changed them
        // went unrecorded (the journal was deleted, or never written), so all of it is dirty.
        recovery.rescan = Some("no journal, but the backing directory is not empty".into());
    }
    let resumed = |state, recovery, (file, segment, offset, snapshot_end)| Resumed {
        state,
        recovery,
        last_seq,
        file,
        segment,
        offset,
        snapshot_end,
    };
    if let Some(why) = &recovery.rescan {
        // Nothing is cut: the damaged segments are replaced as a whole.
        recovery.torn_tail = None;
        if asked {
            tracing::info!("journal {}: rescanning: {why}", dir.display());
        } else {
            tracing::warn!(
                "journal {}: rescanning backing directory {}: {why}",
                dir.display(),
                backing_root.display()
            );
        }
        let state = state::rescan_excluding(backing_root, dir_id(dir))?;
        let n = max_segment + 1;
        let (file, len) =
            segment::create_segment(dir, n, boot, last_seq, &state, "journal-rescan-midway")?;
        // Crash window: the new segment in place, the damaged ones still there.
        fail::fail_point!("journal-rescan-after-rename");
        segment::remove_segments_before(dir, n);
        return Ok(resumed(state, recovery, (file, n, len, len)));
    }
    let Some(tail) = tail else {
        let n = max_segment + 1;
        let (file, len) =
            segment::create_segment(dir, n, boot, 0, &state, "journal-create-before-rename")?;
        return Ok(resumed(state, recovery, (file, n, len, len)));
    };
    for path in &obsolete {
        if let Err(e) = fs::remove_file(path) {
            tracing::warn!(
                "journal: could not remove superseded segment {}: {e}",
                path.display()
            );
        }
    }
    if let Some(torn) = &recovery.torn_tail {
        tracing::warn!(
            "journal {}: torn tail: {torn} ({} bytes dropped)",
            dir.display(),
            tail.file_len - tail.valid_len
        );
    }
    if tail.boot != boot {
        // The header must name the boot that writes the segment's tail, for the rule about
        // unclean reboots. A torn tail goes away with the old segment.
        let n = tail.segment + 1;
        let (file, len) = segment::create_segment(
            dir,
            n,
            boot,
            last_seq,
            &state,
            "journal-rotate-before-rename",
        )?;
        // Crash window: the new segment in place, the old one still there.
        fail::fail_point!("journal-rotate-after-rename");
        segment::remove_segments_before(dir, n);
        return Ok(resumed(state, recovery, (file, n, len, len)));
    }
    let file = OpenOptions::new()
        .append(true)
        .open(&tail.path)
        .map_err(|e| JournalError::io("open segment", &tail.path, e))?;
    if tail.valid_len < tail.file_len {
        // Crash window: superseded segments removed, the torn tail not yet cut.
        fail::fail_point!("journal-open-before-cut");
        file.set_len(tail.valid_len)
            .map_err(|e| JournalError::io("cut torn tail of segment", &tail.path, e))?;
    }
    let start = (file, tail.segment, tail.valid_len, tail.snapshot_end);
    Ok(resumed(state, recovery, start))
}

/// `(dev, ino)` of the journal directory, so a rescan can skip it when it lies inside the
/// backing directory.
fn dir_id(dir: &Path) -> Option<(u64, u64)> {
    fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether `backing_root` has any entry other than the journal directory itself.
fn backing_has_entries(backing_root: &Path, journal_dir: &Path) -> Result<bool, JournalError> {
    let entries = fs::read_dir(backing_root)
        .map_err(|e| JournalError::io("list backing directory", backing_root, e))?;
    let journal = journal_dir.canonicalize().ok();
    for entry in entries {
        let entry =
            entry.map_err(|e| JournalError::io("list backing directory", backing_root, e))?;
        if journal.is_some() && entry.path().canonicalize().ok() == journal {
            continue;
        }
        return Ok(true);
    }
    Ok(false)
}
