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

    // Replay starts at the newest segment that opens with a valid snapshot: rotation writes
    // a segment's snapshot before removing the older segments, so those are superseded.
    let mut segs = Vec::new();
    let mut start = None;
    for (n, path) in names.iter().rev() {
        let seg = Seg::load(*n, path.clone())?;
        let found = seg.starts_with_snapshot();
        segs.push(seg);
        if found {
            start = Some(names.len() - segs.len());
            break;
        }
    }
    segs.reverse();
    let found_snapshot = start.is_some();
    let start = start.unwrap_or(0);
    // `segs` holds names[names.len() - segs.len()..]; keep those from `start` on.
    let skip = start - (names.len() - segs.len());
    let segs: Vec<Seg> = segs.into_iter().skip(skip).collect();
    out.obsolete = names[..start].iter().map(|(_, p)| p.clone()).collect();

    let newest = segs.last().map(|s| (s.n, s.header.clone()));
    let mut rescan = match newest {
        Some((n, Err(why))) => Some(format!("segment {n}: bad header: {why}")),
        Some((n, Ok(written_in))) => match boot {
            Some(now) if !clean && written_in != now => Some(format!(
                "unclean shutdown across a reboot: segment {n} was written during boot \
                 {written_in}, this is boot {now}, and the CLEAN marker is missing, so the page \
                 cache may have lost journal records"
            )),
            _ => None,
        },
        None => None,
    };
    // Only segment 1, the first of a fresh journal, may lack a snapshot with nothing before
    // it (its empty snapshot was torn).
    if rescan.is_none() && !found_snapshot && segs[0].n != 1 {
        rescan = Some(format!(
            "segment {} is the oldest and does not start with a snapshot: the start of the \
             journal is missing",
            segs[0].n
        ));
    }

    let mut last: Option<Seq> = None;
    let count = segs.len();
    for (i, seg) in segs.iter().enumerate() {
        let is_last = i + 1 == count;
        let boot_of_seg = match &seg.header {
            Ok(b) => *b,
            Err(why) => {
                rescan.get_or_insert_with(|| format!("segment {}: bad header: {why}", seg.n));
                break;
            }
        };
        out.recovery.segments += 1;
        let mut off = HEADER_LEN;
        let mut snapshot_end = HEADER_LEN;
        let mut problem = None;
        while off < seg.bytes.len() {
            match record::read_frame(&seg.bytes, off) {
                Ok((seq, rec, end)) => {
                    let in_order = match (&rec, last) {
                        (_, None) => true,
                        // A snapshot repeats the seq of the last record it covers.
                        (Record::Snapshot(_), Some(l)) => off == HEADER_LEN && seq >= l,
                        (Record::Op(_), Some(l)) => seq > l,
                    };
                    if !in_order {
                        problem = Some(match rec {
                            Record::Snapshot(_) if off != HEADER_LEN => {
                                "snapshot record not at the start of its segment".to_owned()
                            }
                            _ => format!(
                                "sequence number {seq} does not follow {}",
                                last.unwrap_or(0)
                            ),
                        });
                        break;
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
                    last = Some(seq);
                    off = end;
                }
                Err(e) => {
                    problem = Some(e.reason().to_owned());
                    break;
                }
            }
        }
        out.last_seq = last.unwrap_or(0);
        if let Some(why) = problem {
            if !is_last {
                rescan.get_or_insert_with(|| {
                    format!(
                        "segment {} is corrupt at offset {off}: {why}; it is not the last \
                         segment, so records after it would be lost",
                        seg.n
                    )
                });
                break;
            }
            if let Some(next) = valid_record_after(&seg.bytes, off, out.last_seq) {
                rescan.get_or_insert_with(|| {
                    format!(
                        "segment {} is corrupt at offset {off}: {why}; a valid record follows \
                         at offset {next}, so this is damage, not a torn write",
                        seg.n
                    )
                });
                break;
            }
            out.recovery.torn_tail = Some(format!("segment {} cut at offset {off}: {why}", seg.n));
        }
        if is_last {
            out.tail = Some(Tail {
                segment: seg.n,
                path: seg.path.clone(),
                valid_len: off as u64,
                file_len: seg.bytes.len() as u64,
                boot: boot_of_seg,
                snapshot_end: snapshot_end as u64,
            });
        }
    }
    out.recovery.last_seq = out.last_seq;
    if let Some(why) = rescan {
        out.recovery.rescan = Some(why);
        out.tail = None;
    }
    Ok(out)
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
