//! Reading a journal directory back into a dirty state, without changing anything on disk.
//! [`crate::Journal::open`] acts on the result (cut, rescan, rotate); `inspect` only reports it.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::JournalError;
use crate::journal::Recovery;
use crate::op::Seq;
use crate::record::{self, Record};
use crate::segment::{self, BootId, HEADER_LEN};
use crate::state::DirtyState;

/// Where appending can continue after a successful replay.
#[derive(Debug)]
pub(crate) struct Tail {
    pub segment: u64,
    pub path: PathBuf,
    /// End of the last whole record: the file is cut here when a torn tail was found.
    pub valid_len: u64,
    pub file_len: u64,
    pub boot: BootId,
    /// Offset just past the segment's snapshot ([`HEADER_LEN`] if it has none).
    pub snapshot_end: u64,
}

#[derive(Debug)]
pub(crate) struct Replay {
    /// The state replayed (up to the first problem when a rescan is needed).
    pub state: DirtyState,
    /// `segments`, `records`, `torn_tail` and `rescan` filled in; `clean` is the caller's.
    pub recovery: Recovery,
    /// Highest seq read.
    pub last_seq: Seq,
    /// None when the directory holds no segment or when a rescan is needed.
    pub tail: Option<Tail>,
    /// Segments older than the one replay started from (superseded by its snapshot).
    pub obsolete: Vec<PathBuf>,
    /// Highest segment number among the file names (0 when none).
    pub max_segment: u64,
}

/// A loaded segment.
struct Seg {
    n: u64,
    path: PathBuf,
    bytes: Vec<u8>,
    /// The boot id, or why the header is unusable.
    header: Result<BootId, String>,
}

impl Seg {
    fn load(n: u64, path: PathBuf) -> Result<Seg, JournalError> {
        let bytes = fs::read(&path).map_err(|e| JournalError::io("read segment", &path, e))?;
        let header = segment::decode_header(&bytes, n);
        Ok(Seg {
            n,
            path,
            bytes,
            header,
        })
    }

    /// True when the segment starts with a whole, valid Snapshot record.
    fn starts_with_snapshot(&self) -> bool {
        self.header.is_ok()
            && matches!(
                record::read_frame(&self.bytes, HEADER_LEN),
                Ok((_, Record::Snapshot(_), _))
            )
    }
}

/// Replays the segments of `dir`. `boot` is the running boot id (None: skip the rule about
/// unclean reboots) and `clean` whether the CLEAN marker was present.
pub(crate) fn replay(
    dir: &Path,
    boot: Option<BootId>,
    clean: bool,
) -> Result<Replay, JournalError> {
    let names = segment::list_segments(dir)?;
    let mut out = Replay {
        state: DirtyState::default(),
        recovery: Recovery::default(),
        last_seq: 0,
        tail: None,
        obsolete: Vec::new(),
        max_segment: names.last().map_or(0, |&(n, _)| n),
    };
    if names.is_empty() {
        return Ok(out);
    }
    let (segs, found_snapshot) = load_from_last_snapshot(&names)?;
    out.obsolete = names[..names.len() - segs.len()]
        .iter()
        .map(|(_, p)| p.clone())
        .collect();
    let mut rescan = distrust(&segs, found_snapshot, boot, clean);
    let mut last: Option<Seq> = None;
    let count = segs.len();
    for (i, seg) in segs.iter().enumerate() {
        if let Err(why) = replay_segment(seg, i + 1 == count, &mut out, &mut last) {
            rescan.get_or_insert(why);
            break;
        }
    }
    out.recovery.last_seq = out.last_seq;
    if let Some(why) = rescan {
        out.recovery.rescan = Some(why);
        out.tail = None;
    }
    Ok(out)
}

/// Loads the segments replay starts from: from the newest that opens with a valid snapshot
/// (rotation writes a segment's snapshot before removing the older segments, so those are
/// superseded) to the last; all of them if none does. Also says whether one did.
fn load_from_last_snapshot(names: &[(u64, PathBuf)]) -> Result<(Vec<Seg>, bool), JournalError> {
    let mut segs = Vec::new();
    let mut found = false;
    for (n, path) in names.iter().rev() {
        let seg = Seg::load(*n, path.clone())?;
        found = seg.starts_with_snapshot();
        segs.push(seg);
        if found {
            break;
        }
    }
    segs.reverse();
    Ok((segs, found))
}

/// Why the segments cannot be trusted whatever their records: the newest one's header is
/// bad, or it was written during another boot and the journal was not closed cleanly, or the
/// start of the journal is missing. `segs` is not empty.
fn distrust(
    segs: &[Seg],
    found_snapshot: bool,
    boot: Option<BootId>,
    clean: bool,
) -> Option<String> {
    let newest = segs.last()?;
    match (&newest.header, boot) {
        (Err(why), _) => return Some(format!("segment {}: bad header: {why}", newest.n)),
        (Ok(written_in), Some(now)) if !clean && *written_in != now => {
            return Some(format!(
                "unclean shutdown across a reboot: segment {} was written during boot \
                 {written_in}, this is boot {now}, and the CLEAN marker is missing, so the page \
                 cache may have lost journal records",
                newest.n
            ));
        }
        _ => {}
    }
    // Only segment 1, the first of a fresh journal, may lack a snapshot with nothing before
    // it (its empty snapshot was torn).
    (!found_snapshot && segs[0].n != 1).then(|| {
        format!(
            "segment {} is the oldest and does not start with a snapshot: the start of the \
             journal is missing",
            segs[0].n
        )
    })
}

/// Applies the records of `seg` to `out` (`last`: the seq of the last record applied). At
/// the first record that is not whole and valid: in the last segment, a torn tail (noted in
/// `out`), unless a valid record follows; otherwise returns why the journal must be rescanned.
fn replay_segment(
    seg: &Seg,
    is_last: bool,
    out: &mut Replay,
    last: &mut Option<Seq>,
) -> Result<(), String> {
    let boot = match &seg.header {
        Ok(b) => *b,
        Err(why) => return Err(format!("segment {}: bad header: {why}", seg.n)),
    };
    out.recovery.segments += 1;
    let (off, snapshot_end, problem) = apply_records(seg, out, last);
    out.last_seq = last.unwrap_or(0);
    if let Some(why) = problem {
        if !is_last {
            return Err(format!(
                "segment {} is corrupt at offset {off}: {why}; it is not the last segment, so \
                 records after it would be lost",
                seg.n
            ));
        }
        if let Some(next) = valid_record_after(&seg.bytes, off, out.last_seq) {
            return Err(format!(
                "segment {} is corrupt at offset {off}: {why}; a valid record follows at \
                 offset {next}, so this is damage, not a torn write",
                seg.n
            ));
        }
        out.recovery.torn_tail = Some(format!("segment {} cut at offset {off}: {why}", seg.n));
    }
    if is_last {
        out.tail = Some(Tail {
            segment: seg.n,
            path: seg.path.clone(),
            valid_len: off as u64,
            file_len: seg.bytes.len() as u64,
            boot,
            snapshot_end: snapshot_end as u64,
        });
    }
    Ok(())
}

/// Applies the whole, valid records of `seg` in order, up to the first that is not (or is out
/// of order). Returns the offset where they end, the end of the segment's snapshot
/// ([`HEADER_LEN`] if none), and what is wrong at that offset, if anything.
fn apply_records(
    seg: &Seg,
    out: &mut Replay,
    last: &mut Option<Seq>,
) -> (usize, usize, Option<String>) {
    let mut off = HEADER_LEN;
    let mut snapshot_end = HEADER_LEN;
    while off < seg.bytes.len() {
        let (seq, rec, end) = match record::read_frame(&seg.bytes, off) {
            Ok(frame) => frame,
            Err(e) => return (off, snapshot_end, Some(e.reason().to_owned())),
        };
        let in_order = match (&rec, *last) {
            (_, None) => true,
            // A snapshot repeats the seq of the last record it covers.
            (Record::Snapshot(_), Some(l)) => off == HEADER_LEN && seq >= l,
            (Record::Op(_), Some(l)) => seq > l,
        };
        if !in_order {
            let why = match rec {
                Record::Snapshot(_) if off != HEADER_LEN => {
                    "snapshot record not at the start of its segment".to_owned()
                }
                _ => format!(
                    "sequence number {seq} does not follow {}",
                    last.unwrap_or(0)
                ),
            };
            return (off, snapshot_end, Some(why));
        }
        match rec {
            Record::Op(op) => {
                out.state.apply(&op);
                out.recovery.records += 1;
            }
            Record::Snapshot(state) => {
                out.state = state;
                snapshot_end = end;
            }
        }
        *last = Some(seq);
        off = end;
    }
    (off, snapshot_end, None)
}

/// The offset of a whole, valid record with a seq above `last` somewhere after `bad`, if any.
/// A crash mid-write leaves only a prefix of the last batch, whose incomplete last record
/// cannot contain such a record; finding one means the bytes at `bad` were damaged in place.
fn valid_record_after(buf: &[u8], bad: usize, last: Seq) -> Option<usize> {
    (bad + 1..buf.len()).find(
        |&off| matches!(record::read_frame(buf, off), Ok((seq, Record::Op(_), _)) if seq > last),
    )
}

/// The states a segment's whole records give, for [`crate::Journal`] to drop the records of a
/// failed write from its live state: `bytes` is the segment up to the end of its last record
/// (header, snapshot, records). Returns the state and, when `cut` is given, the changes after
/// seq `cut` alone, if the segment holds them all (its snapshot is not newer than the cut).
pub(crate) fn fold_segment(
    bytes: &[u8],
    cut: Option<Seq>,
) -> Result<(DirtyState, Option<DirtyState>), String> {
    let mut state = DirtyState::default();
    let mut after_cut = None;
    let mut off = HEADER_LEN;
    while off < bytes.len() {
        let (seq, rec, end) = record::read_frame(bytes, off).map_err(|e| e.reason().to_owned())?;
        match rec {
            Record::Snapshot(s) if off == HEADER_LEN => {
                state = s;
                after_cut = cut.filter(|&c| c >= seq).map(|_| DirtyState::default());
            }
            Record::Snapshot(_) => return Err(format!("snapshot record at offset {off}")),
            Record::Op(op) => {
                state.apply(&op);
                if let Some(live) = after_cut.as_mut()
                    && cut.is_some_and(|c| seq > c)
                {
                    live.apply(&op);
                }
            }
        }
        off = end;
    }
    Ok((state, after_cut))
}
