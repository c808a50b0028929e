//! Journal-level tests: replay equals live state, crashes at every byte, damage, reboots,
//! concurrency, and inspect's read-only promise.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Barrier;

use proptest::prelude::*;

use super::*;
use crate::ino::FuseIno;
use crate::op::NodeKind;
use crate::record::Record;
use crate::segment::{HEADER_LEN, encode_header, segment_path};

const BOOT_A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const BOOT_B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

fn opts(boot: &str, segment_bytes: u64) -> JournalOptions {
    JournalOptions {
        segment_bytes,
        boot_id: Some(boot.to_owned()),
        ..JournalOptions::default()
    }
}

fn big() -> JournalOptions {
    opts(BOOT_A, 64 << 20)
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// A backing directory with a little content, for rescans.
/// An empty backing directory: a fresh journal over it starts with a clean state.
fn backing() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A backing directory with files, for the tests that compare against a rescan.
fn populated_backing() -> tempfile::TempDir {
    let b = tempfile::tempdir().unwrap();
    fs::create_dir_all(b.path().join("src/deep")).unwrap();
    fs::write(b.path().join("src/deep/main.rs"), b"fn main() {}").unwrap();
    fs::write(b.path().join("README"), b"hello").unwrap();
    b
}

fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    segment::list_segments(dir).unwrap()
}

fn last_segment(dir: &Path) -> PathBuf {
    segments(dir).pop().unwrap().1
}

/// Every file of `dir` with its bytes.
fn dir_bytes(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = fs::read(&path).unwrap();
            (path.file_name().unwrap().into(), bytes)
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    for (name, bytes) in dir_bytes(from) {
        fs::write(to.join(name), bytes).unwrap();
    }
}

fn flip(path: &Path, offset: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

fn write_op(ino: u64, offset: u64, len: u64) -> Op {
    Op::Write {
        ino: FuseIno(ino),
        offset,
        len,
    }
}

/// A few ops of different sizes.
fn sample_ops() -> Vec<Op> {
    vec![
        Op::Create {
            ino: FuseIno(10),
            kind: NodeKind::Dir,
            path: p("src"),
        },
        Op::Create {
            ino: FuseIno(11),
            kind: NodeKind::File,
            path: p("src/lib.rs"),
        },
        write_op(11, 0, 4096),
        Op::Rename {
            from: p("src"),
            to: p("crate/src"),
            exchange: false,
        },
        Op::Truncate {
            ino: FuseIno(11),
            size: 100,
        },
        Op::Meta {
            ino: FuseIno(12),
            dir: None,
        },
        Op::Link {
            ino: FuseIno(11),
            path: p("crate/lib-link.rs"),
        },
        write_op(12, 7, 9),
    ]
}

fn applied(ops: &[Op]) -> DirtyState {
    let mut s = DirtyState::default();
    for op in ops {
        s.apply(op);
    }
    s
}

/// Hand-written segment: header, optional snapshot, then ops with the given seqs.
fn write_segment(
    dir: &Path,
    n: u64,
    snapshot: Option<(Seq, &DirtyState)>,
    ops: &[(Seq, Op)],
) -> Vec<usize> {
    let mut buf = encode_header(n, BootId::parse(BOOT_A).unwrap()).to_vec();
    if let Some((seq, state)) = snapshot {
        record::encode_snapshot(&mut buf, seq, state).unwrap();
    }
    let mut starts = Vec::new();
    for (seq, op) in ops {
        starts.push(buf.len());
        record::encode_op(&mut buf, *seq, op).unwrap();
    }
    fs::write(segment_path(dir, n), buf).unwrap();
    starts
}

#[test]
fn journal_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Journal>();
}

#[test]
fn fresh_journal_appends_and_replays() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert_eq!((rec.segments, rec.records, rec.clean), (0, 0, false));
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none());
    let seqs: Vec<Seq> = sample_ops()
        .into_iter()
        .map(|op| j.append(op).unwrap())
        .collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    let live = j.dirty();
    assert_eq!(live, applied(&sample_ops()));
    let st = j.stats();
    assert_eq!(
        (st.last_seq, st.records, st.batches, st.segment),
        (8, 8, 8, 1)
    );
    assert_eq!(st.dirty_bytes, 4096 + 9);
    drop(j);
    assert!(
        !d.path().join(CLEAN_MARKER).exists(),
        "drop must not mark clean"
    );

    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert_eq!((rec.segments, rec.records, rec.last_seq), (1, 8, 8));
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none() && !rec.clean);
    assert_eq!(j.dirty(), live);
    assert_eq!(
        j.append(Op::Fsync { ino: FuseIno(1) }).unwrap(),
        9,
        "seqs continue after replay"
    );
}

#[test]
fn close_clean_writes_marker_and_open_removes_it() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    j.append(write_op(1, 0, 10)).unwrap();
    let live = j.dirty();
    j.close_clean().unwrap();
    drop(j);
    assert!(d.path().join(CLEAN_MARKER).exists());
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(rec.clean);
    assert!(!d.path().join(CLEAN_MARKER).exists());
    assert_eq!(j.dirty(), live);
}

#[test]
fn appends_after_close_clean_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    j.append(write_op(1, 0, 10)).unwrap();
    j.close_clean().unwrap();
    assert!(matches!(
        j.append(write_op(1, 10, 10)),
        Err(JournalError::Poisoned { .. })
    ));
    drop(j);
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(rec.clean);
    assert_eq!(j.dirty().files[&FuseIno(1)].extents.total_len(), 10);
}

#[test]
fn second_open_is_refused_while_locked() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    match Journal::open(d.path(), b.path(), big()) {
        Err(e @ JournalError::Locked { .. }) => assert!(e.to_string().contains("another process")),
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
    drop(j);
    Journal::open(d.path(), b.path(), big()).unwrap();
}

#[test]
fn append_file_op_touches_unknown_inodes_once() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    let mut calls = 0;
    let seq = j
        .append_file_op(
            FuseIno(5),
            || {
                calls += 1;
                Some(p("x/y"))
            },
            write_op(5, 0, 3),
        )
        .unwrap();
    assert_eq!(seq, 2, "the Touch took seq 1");
    let seq = j
        .append_file_op(
            FuseIno(5),
            || -> Place { panic!("place_of must not be called") },
            write_op(5, 3, 3),
        )
        .unwrap();
    assert_eq!(seq, 3);
    assert_eq!(calls, 1);
    let f = &j.dirty().files[&FuseIno(5)];
    assert_eq!(f.path, Some(p("x/y")));
    assert_eq!(f.extents.total_len(), 6);
    drop(j);
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert_eq!(rec.records, 3);
    assert_eq!(j.dirty().files[&FuseIno(5)].path, Some(p("x/y")));
}

/// A file whose first change finds it with names but none known is marked unplaced (so the
/// cut looks for it), also after replay; a nameless one is not.
#[test]
fn append_file_op_marks_a_file_of_unknown_place() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    j.append_file_op(FuseIno(5), || Place::Unknown, write_op(5, 0, 3))
        .unwrap();
    j.append_file_op(FuseIno(6), || Place::Nameless, write_op(6, 0, 3))
        .unwrap();
    j.append_file_op(FuseIno(7), || Place::Path(p("a")), write_op(7, 0, 3))
        .unwrap();
    let check = |s: &DirtyState| {
        let f = |i| {
            (
                s.files[&FuseIno(i)].path.clone(),
                s.files[&FuseIno(i)].unplaced,
            )
        };
        assert_eq!(f(5), (None, true));
        assert_eq!(f(6), (None, false));
        assert_eq!(f(7), (Some(p("a")), false));
    };
    check(&j.dirty());
    drop(j);
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    check(&j.dirty());
}

#[test]
fn rotation_keeps_one_segment_and_the_state() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), opts(BOOT_A, 4096)).unwrap();
    for i in 0..2000u64 {
        j.append(write_op(i % 50, i * 3, 2)).unwrap();
    }
    let st = j.stats();
    assert!(st.rotations > 5, "{st:?}");
    assert_eq!(st.segment, st.rotations + 1);
    let segs = segments(d.path());
    assert_eq!(segs.len(), 1, "old segments are removed: {segs:?}");
    assert_eq!(segs[0].0, st.segment);
    let live = j.dirty();
    drop(j);
    let (j, rec) = Journal::open(d.path(), b.path(), opts(BOOT_A, 4096)).unwrap();
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none());
    assert_eq!(rec.last_seq, 2000);
    assert_eq!(j.dirty(), live);
}

/// Builds a journal of `sample_ops()` and returns the end offset of every record in the
/// single segment and the state after each record (index 0: before any).
fn journal_with_offsets(dir: &Path, backing: &Path) -> (Vec<u64>, Vec<DirtyState>) {
    let (j, _) = Journal::open(dir, backing, big()).unwrap();
    let mut ends = vec![j.stats().segment_offset];
    let mut states = vec![j.dirty()];
    for op in sample_ops() {
        j.append(op).unwrap();
        ends.push(j.stats().segment_offset);
        states.push(j.dirty());
    }
    (ends, states)
}

#[test]
fn torn_tail_at_every_offset_is_cut_and_appending_continues() {
    let src = tempfile::tempdir().unwrap();
    let b = backing();
    let (ends, states) = journal_with_offsets(src.path(), b.path());
    let n = ends.len() - 1;
    let full = fs::read(last_segment(src.path())).unwrap();
    assert_eq!(full.len() as u64, ends[n]);
    // Cuts inside the last three records, and at each record boundary among them.
    for cut in ends[n - 3]..ends[n] {
        let d = tempfile::tempdir().unwrap();
        copy_dir(src.path(), d.path());
        let seg = last_segment(d.path());
        fs::write(&seg, &full[..cut as usize]).unwrap();
        let whole = ends.iter().rposition(|&e| e <= cut).unwrap();

        let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
        assert!(rec.rescan.is_none(), "cut {cut}: {rec:?}");
        assert_eq!(j.dirty(), states[whole], "cut {cut}");
        assert_eq!(rec.records, whole as u64, "cut {cut}");
        if cut == ends[whole] {
            assert!(rec.torn_tail.is_none(), "cut {cut} is a record boundary");
        } else {
            let torn = rec.torn_tail.clone().unwrap();
            assert!(
                torn.contains(&format!("cut at offset {}", ends[whole])),
                "cut {cut}: {torn}"
            );
        }
        assert_eq!(fs::metadata(&seg).unwrap().len(), ends[whole], "cut {cut}");

        let extra = write_op(99, cut, 1);
        assert_eq!(j.append(extra.clone()).unwrap(), whole as u64 + 1);
        let mut expected = states[whole].clone();
        expected.apply(&extra);
        drop(j);
        let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
        assert!(
            rec.torn_tail.is_none() && rec.rescan.is_none(),
            "cut {cut}: {rec:?}"
        );
        assert_eq!(j.dirty(), expected, "cut {cut}");
    }
}

#[test]
fn flipped_byte_in_last_record_is_cut() {
    let src = tempfile::tempdir().unwrap();
    let b = backing();
    let (ends, states) = journal_with_offsets(src.path(), b.path());
    let n = ends.len() - 1;
    for off in ends[n - 1]..ends[n] {
        let d = tempfile::tempdir().unwrap();
        copy_dir(src.path(), d.path());
        flip(&last_segment(d.path()), off as usize);
        let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
        assert!(rec.rescan.is_none(), "flip at {off}: {rec:?}");
        assert!(rec.torn_tail.is_some(), "flip at {off}");
        assert_eq!(j.dirty(), states[n - 1], "flip at {off}");
    }
}

#[test]
fn flipped_byte_before_valid_records_of_last_segment_rescans() {
    let src = tempfile::tempdir().unwrap();
    let b = populated_backing();
    let (ends, _) = journal_with_offsets(src.path(), b.path());
    // Damage to the third record, with five whole records after it: not a torn write.
    for off in ends[2]..ends[3] {
        let d = tempfile::tempdir().unwrap();
        copy_dir(src.path(), d.path());
        flip(&last_segment(d.path()), off as usize);
        let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
        let why = rec
            .rescan
            .unwrap_or_else(|| panic!("flip at {off} not detected"));
        assert!(why.contains("valid record follows"), "{why}");
        assert_eq!(j.dirty(), DirtyState::rescan(b.path()).unwrap());
    }
}

/// Segment 1 (snapshot + ops 1..=5) and segment 2 (no snapshot, ops 6..=8): what a crash while
/// writing segment 2's snapshot leaves once its torn snapshot was cut and appending went on.
fn two_segment_journal(dir: &Path) -> (Vec<usize>, DirtyState) {
    let ops: Vec<(Seq, Op)> = sample_ops()
        .into_iter()
        .enumerate()
        .map(|(i, op)| (i as u64 + 1, op))
        .collect();
    let starts = write_segment(dir, 1, Some((0, &DirtyState::default())), &ops[..5]);
    write_segment(dir, 2, None, &ops[5..]);
    (starts, applied(&sample_ops()))
}

#[test]
fn replay_spans_segments() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (_, expected) = two_segment_journal(d.path());
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none(), "{rec:?}");
    assert_eq!((rec.segments, rec.records, rec.last_seq), (2, 8, 8));
    assert_eq!(j.dirty(), expected);
    assert_eq!(
        j.stats().segment,
        2,
        "appending continues in the last segment"
    );
}

#[test]
fn flipped_byte_in_non_last_segment_rescans() {
    let b = populated_backing();
    let rescanned = DirtyState::rescan(b.path()).unwrap();
    let probe = tempfile::tempdir().unwrap();
    let (starts, _) = two_segment_journal(probe.path());
    // Every byte of the third record of segment 1, and one byte of its snapshot.
    let offsets = (starts[2]..starts[3]).chain([HEADER_LEN + 3]);
    for off in offsets {
        let d = tempfile::tempdir().unwrap();
        two_segment_journal(d.path());
        flip(&segment_path(d.path(), 1), off);
        let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
        let why = rec
            .rescan
            .unwrap_or_else(|| panic!("flip at {off} not detected"));
        assert!(why.contains("segment 1"), "{why}");
        assert_eq!(j.dirty(), rescanned, "flip at {off}");
        // The rescan is saved as the snapshot of a fresh segment; the old ones are gone.
        let segs = segments(d.path());
        assert_eq!(segs.iter().map(|s| s.0).collect::<Vec<_>>(), vec![3]);
        drop(j);
        let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
        assert!(rec.rescan.is_none() && rec.torn_tail.is_none(), "{rec:?}");
        assert_eq!(j.dirty(), rescanned);
    }
}

#[test]
fn superseded_segment_is_ignored_and_removed() {
    // A crash after rotation wrote segment 2 but before it removed segment 1.
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let ops = sample_ops();
    let seq_ops: Vec<(Seq, Op)> = ops.iter().cloned().zip(1..).map(|(o, s)| (s, o)).collect();
    let starts = write_segment(
        d.path(),
        1,
        Some((0, &DirtyState::default())),
        &seq_ops[..5],
    );
    let snap = applied(&ops[..5]);
    write_segment(d.path(), 2, Some((5, &snap)), &seq_ops[5..]);
    flip(&segment_path(d.path(), 1), starts[1] + 10);
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none(), "{rec:?}");
    assert_eq!((rec.segments, rec.records, rec.last_seq), (1, 3, 8));
    assert_eq!(j.dirty(), applied(&ops));
    assert_eq!(segments(d.path()).len(), 1);
}

#[test]
fn oldest_segment_without_snapshot_rescans() {
    let d = tempfile::tempdir().unwrap();
    let b = populated_backing();
    write_segment(d.path(), 4, None, &[(9, write_op(1, 0, 1))]);
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(
        rec.rescan
            .unwrap()
            .contains("start of the journal is missing")
    );
    assert_eq!(j.dirty(), DirtyState::rescan(b.path()).unwrap());
    assert_eq!(
        j.append(Op::Fsync { ino: FuseIno(1) }).unwrap(),
        10,
        "seqs continue"
    );
}

#[test]
fn non_increasing_seq_is_damage() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let ops = [
        (1, write_op(1, 0, 1)),
        (2, write_op(1, 5, 1)),
        (2, write_op(1, 9, 1)),
    ];
    write_segment(d.path(), 1, Some((0, &DirtyState::default())), &ops);
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(rec.torn_tail.unwrap().contains("does not follow"));
    assert_eq!(j.dirty(), applied(&[ops[0].1.clone(), ops[1].1.clone()]));
}

#[test]
fn bad_header_or_unknown_version_rescans() {
    let b = populated_backing();
    let rescanned = DirtyState::rescan(b.path()).unwrap();
    type Damage = fn(&mut Vec<u8>);
    let damage: [(&str, Damage); 3] = [
        ("bad magic", |h| h[0] = b'X'),
        ("checksum", |h| h[40] ^= 1),
        ("unknown format version 9", |h| {
            h[8..12].copy_from_slice(&9u32.to_le_bytes());
            let crc = crc32c::crc32c(&h[..56]);
            h[56..60].copy_from_slice(&crc.to_le_bytes());
        }),
    ];
    for (expect, damage) in damage {
        let d = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
        j.append(write_op(1, 0, 1)).unwrap();
        drop(j);
        let seg = last_segment(d.path());
        let mut bytes = fs::read(&seg).unwrap();
        damage(&mut bytes);
        fs::write(&seg, bytes).unwrap();
        let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
        let why = rec.rescan.unwrap();
        assert!(why.contains("bad header") && why.contains(expect), "{why}");
        assert_eq!(j.dirty(), rescanned);
    }
}

#[test]
fn boot_id_rule() {
    let b = populated_backing();
    let rescanned = DirtyState::rescan(b.path()).unwrap();

    // Unclean: written in boot A, reopened in boot B.
    let d = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(d.path(), b.path(), opts(BOOT_A, 1 << 20)).unwrap();
    j.append(write_op(1, 0, 1)).unwrap();
    drop(j);
    let (j, rec) = Journal::open(d.path(), b.path(), opts(BOOT_A, 1 << 20)).unwrap();
    assert!(
        rec.rescan.is_none(),
        "same boot: a daemon crash, replay is enough"
    );
    drop(j);
    let (j, rec) = Journal::open(d.path(), b.path(), opts(BOOT_B, 1 << 20)).unwrap();
    assert!(
        rec.rescan
            .unwrap()
            .contains("unclean shutdown across a reboot")
    );
    assert_eq!(j.dirty(), rescanned);
    drop(j);

    // Clean: no rescan, and the next segment names boot B.
    let d = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(d.path(), b.path(), opts(BOOT_A, 1 << 20)).unwrap();
    j.append(write_op(1, 0, 1)).unwrap();
    let live = j.dirty();
    j.close_clean().unwrap();
    drop(j);
    let (j, rec) = Journal::open(d.path(), b.path(), opts(BOOT_B, 1 << 20)).unwrap();
    assert!(rec.rescan.is_none() && rec.clean, "{rec:?}");
    assert_eq!(j.dirty(), live);
    assert_eq!(j.stats().segment, 2);
    assert_eq!(segments(d.path()).len(), 1);
    j.append(write_op(1, 5, 1)).unwrap();
    let live = j.dirty();
    drop(j);
    // A later daemon crash in boot B replays without rescanning...
    let (j, rec) = Journal::open(d.path(), b.path(), opts(BOOT_B, 1 << 20)).unwrap();
    assert!(rec.rescan.is_none(), "{rec:?}");
    assert_eq!(j.dirty(), live);
    drop(j);
    // ...but a crash of boot B itself does.
    let (_, rec) = Journal::open(d.path(), b.path(), opts(BOOT_A, 1 << 20)).unwrap();
    assert!(rec.rescan.is_some());
}

#[test]
fn rescan_skips_journal_inside_backing_dir() {
    let b = backing();
    let jdir = b.path().join(".owsfs-journal");
    let (j, _) = Journal::open(&jdir, b.path(), opts(BOOT_A, 1 << 20)).unwrap();
    drop(j);
    let (j, rec) = Journal::open(&jdir, b.path(), opts(BOOT_B, 1 << 20)).unwrap();
    assert!(rec.rescan.is_some());
    let state = j.dirty();
    assert!(!state.dirs.contains(&p(".owsfs-journal")));
    assert!(
        state
            .files
            .values()
            .all(|f| !f.path.as_ref().unwrap().starts_with(".owsfs-journal"))
    );
}

#[test]
fn leftover_temporary_segment_is_removed() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    j.append(write_op(1, 0, 1)).unwrap();
    let live = j.dirty();
    drop(j);
    let tmp = d.path().join("00000000000000000002.seg.tmp");
    fs::write(&tmp, b"OWSJ").unwrap();
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none());
    assert!(!tmp.exists());
    assert_eq!(j.dirty(), live);
}

fn set_write_hook(j: &Journal, hook: impl Fn() -> io::Result<()> + Send + Sync + 'static) {
    j.inner.lock().write_hook = Some(Arc::new(move |_: &File, _: &[u8]| match hook() {
        Ok(()) => None,
        Err(e) => Some(Err(e)),
    }));
}

/// The next batch writes only its first half, then fails with `errno` (a write that ran out
/// of space in the middle); later batches are written normally.
fn fail_next_write_halfway(j: &Journal, errno: i32) {
    let armed = std::sync::atomic::AtomicBool::new(true);
    j.inner.lock().write_hook = Some(Arc::new(move |file: &File, bytes: &[u8]| {
        if !armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let mut f = file;
        f.write_all(&bytes[..bytes.len() / 2]).unwrap();
        Some(Err(io::Error::from_raw_os_error(errno)))
    }));
}

fn concurrent_appends(segment_bytes: u64) {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 500;
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), opts(BOOT_A, segment_bytes)).unwrap();
    // A disk-like 20 µs per write: on a machine with fewer cores than threads, instant
    // writes on an otherwise busy test host would rarely overlap with other appends.
    set_write_hook(&j, || {
        std::thread::sleep(std::time::Duration::from_micros(20));
        Ok(())
    });
    let barrier = Barrier::new(THREADS as usize);
    let per_thread: Vec<Vec<Seq>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (j, barrier) = (&j, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    (0..PER_THREAD)
                        .map(|i| j.append(write_op(t, i * 10, 5)).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for seqs in &per_thread {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "per-thread seqs increase"
        );
    }
    let mut all: Vec<Seq> = per_thread.concat();
    all.sort_unstable();
    assert_eq!(all, (1..=THREADS * PER_THREAD).collect::<Vec<_>>());
    let st = j.stats();
    println!(
        "segment_bytes {segment_bytes}: {} records in {} batches ({:.1} per batch), {} rotations",
        st.records,
        st.batches,
        st.records as f64 / st.batches as f64,
        st.rotations
    );
    assert_eq!(st.records, THREADS * PER_THREAD);
    assert!(
        st.batches < st.records,
        "no batching under contention: {st:?}"
    );
    let live = j.dirty();
    for t in 0..THREADS {
        assert_eq!(live.files[&FuseIno(t)].extents.total_len(), PER_THREAD * 5);
    }
    drop(j);
    let (j, rec) = Journal::open(d.path(), b.path(), opts(BOOT_A, segment_bytes)).unwrap();
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none(), "{rec:?}");
    assert_eq!(rec.last_seq, THREADS * PER_THREAD);
    if st.rotations == 0 {
        assert_eq!(rec.records, THREADS * PER_THREAD, "every record replayed");
    }
    assert_eq!(j.dirty(), live);
}

#[test]
fn concurrent_appends_are_batched_and_all_replayed() {
    concurrent_appends(64 << 20);
}

#[test]
fn concurrent_appends_with_rotation() {
    concurrent_appends(8192);
}

#[test]
fn appenders_waiting_during_a_write_share_the_next_one() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    // The first write blocks until every appender has buffered its record.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Mutex::new(Some(go_rx));
    set_write_hook(&j, move || {
        if let Some(rx) = go_rx.lock().take() {
            rx.recv().ok();
        }
        Ok(())
    });
    std::thread::scope(|s| {
        let j = &j;
        s.spawn(move || j.append(write_op(0, 0, 1)).unwrap());
        while j.stats().records < 1 {
            std::thread::yield_now();
        }
        for t in 1..8 {
            s.spawn(move || j.append(write_op(t, 0, 1)).unwrap());
        }
        while j.stats().records < 8 {
            std::thread::yield_now();
        }
        go_tx.send(()).unwrap();
    });
    let st = j.stats();
    assert_eq!((st.records, st.batches), (8, 2), "{st:?}");
    drop(j);
    let (_, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert_eq!(rec.records, 8);
}

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

/// A write that fails with ENOSPC halfway through leaves the segment as it was (no partial
/// record), gives the caller ENOSPC, keeps the failed op out of the state, and appending goes
/// on once the write succeeds again: the journal is not poisoned.
#[test]
fn a_failed_write_leaves_the_segment_whole_and_appending_goes_on() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    j.append(write_op(1, 0, 1)).unwrap();
    let seg = last_segment(d.path());
    let len = file_len(&seg);
    fail_next_write_halfway(&j, ENOSPC);
    let e = j.append(write_op(2, 5, 1)).unwrap_err();
    assert_eq!(e.to_errno(), ENOSPC, "{e}");
    assert_eq!(file_len(&seg), len, "the partial write is cut off");
    assert_eq!(j.dirty(), applied(&[write_op(1, 0, 1)]));
    let st = j.stats();
    assert!(st.failed.is_none(), "not poisoned: {st:?}");
    assert_eq!(st.failed_batches, 1);
    // The seq of the failed record is a gap; later records follow the last whole one.
    assert_eq!(j.append(write_op(1, 9, 1)).unwrap(), 3);
    let live = j.dirty();
    assert_eq!(live, applied(&[write_op(1, 0, 1), write_op(1, 9, 1)]));
    j.close_clean().unwrap();
    drop(j);
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none(), "{rec:?}");
    assert_eq!((rec.records, rec.last_seq), (2, 3));
    assert_eq!(j.dirty(), live);
}

/// Path bookkeeping is not a monotone join: a rename whose record failed (and which is
/// therefore not performed) must not move the paths of the state.
#[test]
fn a_failed_rename_moves_no_path() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    j.append_file_op(FuseIno(5), || Some(p("a/x")), write_op(5, 0, 3))
        .unwrap();
    let before = j.dirty();
    fail_next_write_halfway(&j, ENOSPC);
    let rename = Op::Rename {
        from: p("a"),
        to: p("b"),
        exchange: false,
    };
    assert_eq!(j.append(rename).unwrap_err().to_errno(), ENOSPC);
    assert_eq!(j.dirty(), before);
    assert_eq!(j.dirty().files[&FuseIno(5)].path, Some(p("a/x")));
    let rmdir = Op::Remove {
        ino: FuseIno(9),
        path: p("a"),
        dir: true,
    };
    fail_next_write_halfway(&j, ENOSPC);
    assert_eq!(j.append(rmdir).unwrap_err().to_errno(), ENOSPC);
    assert_eq!(j.dirty(), before);
}

/// Every appender whose record is in the failed write gets its error; appenders of the next
/// batch do not, and their records are kept.
#[test]
fn every_appender_of_a_failed_batch_fails_and_only_they_do() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    // Write 1 (one record) blocks until appenders 1..8 have buffered theirs (write 2), which
    // then fails halfway; appender 8's record is buffered while write 2 is in flight and goes
    // into write 3.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (second_tx, second_rx) = std::sync::mpsc::channel::<()>();
    let (third_tx, third_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Mutex::new(Some(go_rx));
    let third_rx = Mutex::new(Some(third_rx));
    let writes = std::sync::atomic::AtomicU32::new(0);
    j.inner.lock().write_hook = Some(Arc::new(move |file: &File, bytes: &[u8]| {
        match writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => {
                if let Some(rx) = go_rx.lock().take() {
                    rx.recv().ok();
                }
                None
            }
            1 => {
                second_tx.send(()).unwrap();
                if let Some(rx) = third_rx.lock().take() {
                    rx.recv().ok();
                }
                let mut f = file;
                f.write_all(&bytes[..bytes.len() / 2]).unwrap();
                Some(Err(io::Error::from_raw_os_error(ENOSPC)))
            }
            _ => None,
        }
    }));
    let results: Vec<(u64, Result<Seq, i32>)> = std::thread::scope(|s| {
        let j = &j;
        let mut handles = vec![s.spawn(move || (0, j.append(write_op(0, 0, 1))))];
        while j.stats().records < 1 {
            std::thread::yield_now();
        }
        for t in 1..8 {
            handles.push(s.spawn(move || (t, j.append(write_op(t, 0, 1)))));
        }
        while j.stats().records < 8 {
            std::thread::yield_now();
        }
        go_tx.send(()).unwrap();
        second_rx.recv().unwrap();
        handles.push(s.spawn(move || (8, j.append(write_op(8, 0, 1)))));
        while j.stats().records < 9 {
            std::thread::yield_now();
        }
        third_tx.send(()).unwrap();
        handles
            .into_iter()
            .map(|h| {
                let (t, r) = h.join().unwrap();
                (t, r.map_err(|e| e.to_errno()))
            })
            .collect()
    });
    for (t, r) in &results {
        match t {
            0 => assert_eq!(*r, Ok(1)),
            8 => assert_eq!(*r, Ok(9)),
            _ => assert_eq!(*r, Err(ENOSPC), "appender {t}"),
        }
    }
    let live = applied(&[write_op(0, 0, 1), write_op(8, 0, 1)]);
    assert_eq!(j.dirty(), live);
    assert_eq!(j.stats().failed_batches, 1);
    drop(j);
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none(), "{rec:?}");
    assert_eq!(j.dirty(), live);
}

/// A failed write while a cut is pending keeps the later changes apart from the cut's: once
/// the cut is committed, only the later changes that were written stay dirty.
#[test]
fn a_failed_write_during_a_pending_cut_keeps_the_cut_apart() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    j.append(write_op(1, 0, 1)).unwrap();
    let (seq, _) = j.cut().unwrap();
    j.append(write_op(2, 0, 1)).unwrap();
    fail_next_write_halfway(&j, ENOSPC);
    j.append(write_op(3, 0, 1)).unwrap_err();
    assert_eq!(j.dirty(), applied(&[write_op(1, 0, 1), write_op(2, 0, 1)]));
    j.committed(seq).unwrap();
    assert_eq!(j.dirty(), applied(&[write_op(2, 0, 1)]));
}

/// An error other than "no space" (here EIO) may mean the disk or the page cache can no
/// longer be trusted: the journal stops accepting records, but still leaves the segment whole.
#[test]
fn a_failed_write_of_another_kind_poisons_the_journal() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    j.append(write_op(1, 0, 1)).unwrap();
    let len = file_len(&last_segment(d.path()));
    fail_next_write_halfway(&j, EIO);
    let e = j.append(write_op(1, 5, 1)).unwrap_err();
    assert_eq!(e.to_errno(), EIO, "{e}");
    assert_eq!(file_len(&last_segment(d.path())), len);
    let e = j.append(write_op(1, 9, 1)).unwrap_err();
    assert!(matches!(e, JournalError::Poisoned { .. }), "{e}");
    assert!(e.to_string().contains("restart the daemon"), "{e}");
    assert!(j.stats().failed.is_some(), "the failure shows in the stats");
    // The state holds exactly what was written, so cuts may still upload it.
    assert_eq!(j.cut().unwrap().1, applied(&[write_op(1, 0, 1)]));
    assert!(j.close_clean().is_err());
    assert!(!d.path().join(CLEAN_MARKER).exists());
    drop(j);
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none());
    assert_eq!(j.dirty(), applied(&[write_op(1, 0, 1)]));
}

/// A small tmpfs of the test's own, unmounted on drop. Needs root.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs");
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the file system is full.
    fn fill(&self, name: &str) {
        let mut f = File::create(self.path().join(name)).unwrap();
        let chunk = vec![7u8; 64 << 10];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(ENOSPC) => break,
                Err(e) => panic!("fill: {e}"),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// On a really full file system: records of ops that free space go into the reserve, the
/// others fail with ENOSPC, and once space is freed everything is accepted again.
#[test]
fn a_full_disk_leaves_room_for_unlink_and_rename_and_recovers() {
    let Some(fs) = Tmpfs::mount("4m") else {
        return;
    };
    let d = fs.path().join("journal");
    let b = backing();
    let o = JournalOptions {
        reserve_bytes: 64 << 10,
        ..big()
    };
    let (j, _) = Journal::open(&d, b.path(), o.clone()).unwrap();
    let mut model = DirtyState::default();
    let ok = |j: &Journal, model: &mut DirtyState, op: Op| {
        j.append(op.clone()).unwrap();
        model.apply(&op);
    };
    ok(&j, &mut model, write_op(1, 0, 10));
    fs.fill("filler");
    // Records still fit in what is allocated until the reserve must be refilled; then only
    // ops that free space are accepted.
    let mut refused = None;
    for i in 0..100_000 {
        match j.append(write_op(2, i * 10, 5)) {
            Ok(_) => model.apply(&write_op(2, i * 10, 5)),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("appends are refused on a full disk");
    assert_eq!(e.to_errno(), ENOSPC, "{e}");
    assert!(j.stats().low_space.is_some(), "{:?}", j.stats());
    assert!(j.stats().failed.is_none(), "not poisoned");
    let create = Op::Create {
        ino: FuseIno(3),
        kind: NodeKind::File,
        path: p("new"),
    };
    assert_eq!(j.append(create).unwrap_err().to_errno(), ENOSPC);
    // An fsync's record is not worth the reserve: a program fsyncing in a loop would use it up.
    assert_eq!(
        j.append(Op::Fsync { ino: FuseIno(1) })
            .unwrap_err()
            .to_errno(),
        ENOSPC
    );
    // Unlink, rename and truncate still work: hundreds of them fit in the reserve.
    for i in 0..200 {
        ok(
            &j,
            &mut model,
            Op::Rename {
                from: p(&format!("r{i}")),
                to: p(&format!("s{i}")),
                exchange: false,
            },
        );
        ok(
            &j,
            &mut model,
            Op::Truncate {
                ino: FuseIno(1),
                size: 5,
            },
        );
        ok(
            &j,
            &mut model,
            Op::Remove {
                ino: FuseIno(100 + i),
                path: p(&format!("f{i}")),
                dir: false,
            },
        );
    }
    assert_eq!(j.dirty(), model);
    // A commit cannot start a new segment on the full disk: the current one stays in use.
    let (seq, _) = j.cut().unwrap();
    j.committed(seq).unwrap();
    model = DirtyState::default();
    assert!(j.stats().failed.is_none());
    // Space is freed: every op is accepted again.
    fs::remove_file(fs.path().join("filler")).unwrap();
    ok(&j, &mut model, write_op(4, 0, 1));
    assert!(j.stats().low_space.is_none());
    assert_eq!(j.dirty(), model);
    drop(j);
    let (j, rec) = Journal::open(&d, b.path(), o).unwrap();
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none(), "{rec:?}");
    // Replay gives a superset: the segment from before the commit is still the current one.
    let replayed = j.dirty();
    assert_eq!(replayed.files[&FuseIno(4)], model.files[&FuseIno(4)]);
}

#[test]
fn huge_snapshot_does_not_rotate_after_every_batch() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), opts(BOOT_A, 4096)).unwrap();
    // About 10k extents: a snapshot of ~160 KiB, forty times segment_bytes.
    for i in 0..10_000 {
        j.append(write_op(1, i * 10, 5)).unwrap();
    }
    let st = j.stats();
    assert!(st.rotations < 20, "{st:?}");
    let live = j.dirty();
    drop(j);
    let (j, _) = Journal::open(d.path(), b.path(), opts(BOOT_A, 4096)).unwrap();
    assert_eq!(j.dirty(), live);
}

#[test]
fn replayed_seqs_strictly_increase() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let j = &j;
            s.spawn(move || {
                for i in 0..200 {
                    j.append(write_op(t, i, 1)).unwrap();
                }
            });
        }
    });
    drop(j);
    let bytes = fs::read(last_segment(d.path())).unwrap();
    let mut off = HEADER_LEN;
    let mut seqs = Vec::new();
    while off < bytes.len() {
        let (seq, rec, end) = record::read_frame(&bytes, off).unwrap();
        if let Record::Op(_) = rec {
            seqs.push(seq);
        }
        off = end;
    }
    assert_eq!(seqs, (1..=800).collect::<Vec<_>>());
}

#[test]
fn inspect_modifies_nothing() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    // The running kernel's boot id, as inspect uses it.
    let real = JournalOptions::default();
    let (j, _) = Journal::open(d.path(), b.path(), real.clone()).unwrap();
    for op in sample_ops() {
        j.append(op).unwrap();
    }
    let live = j.dirty();
    j.close_clean().unwrap();
    drop(j);

    let before = dir_bytes(d.path());
    let (state, rec) = Journal::inspect(d.path()).unwrap();
    assert_eq!(dir_bytes(d.path()), before);
    assert_eq!(state, live);
    assert!(rec.clean && rec.rescan.is_none() && rec.torn_tail.is_none());
    assert_eq!(rec.records, 8);

    // A torn tail is reported, not cut.
    let seg = last_segment(d.path());
    let len = fs::metadata(&seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let before = dir_bytes(d.path());
    let (state, rec) = Journal::inspect(d.path()).unwrap();
    assert_eq!(dir_bytes(d.path()), before);
    assert!(rec.torn_tail.is_some());
    assert_eq!(state, applied(&sample_ops()[..7]));

    // A rescan is reported, not done.
    flip(&seg, 2);
    let before = dir_bytes(d.path());
    let (_, rec) = Journal::inspect(d.path()).unwrap();
    assert_eq!(dir_bytes(d.path()), before);
    assert!(rec.rescan.unwrap().contains("bad header"));
}

#[test]
fn serializes_recovery_and_stats() {
    let rec = Recovery {
        torn_tail: Some("segment 1 cut at offset 60: x".into()),
        ..Recovery::default()
    };
    let v = serde_json::to_value(&rec).unwrap();
    assert_eq!(v["torn_tail"], "segment 1 cut at offset 60: x");
    let v = serde_json::to_value(JournalStats::default()).unwrap();
    assert_eq!(v["batches"], 0);
    let v = serde_json::to_value(write_op(1, 2, 3)).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"op": "write", "ino": 1, "offset": 2, "len": 3})
    );
}

/// One step of a random history.
#[derive(Clone, Debug)]
enum Step {
    Append(Op),
    /// Through `append_file_op` with this path.
    FileOp(Op, Option<PathBuf>),
    /// Crash (drop without close_clean) and reopen.
    Crash,
    /// close_clean and reopen.
    CleanRestart,
}

fn arb_path() -> impl Strategy<Value = PathBuf> {
    prop::sample::select(vec![
        "", "a", "b", "ab", "a/b", "a/c", "b/a", "a/b/c", "c/a/b",
    ])
    .prop_map(PathBuf::from)
}

fn arb_op() -> impl Strategy<Value = Op> {
    let ino = (1u64..8).prop_map(FuseIno);
    let kind = prop::sample::select(vec![NodeKind::File, NodeKind::Dir, NodeKind::Symlink]);
    prop_oneof![
        (ino.clone(), proptest::option::of(arb_path()))
            .prop_map(|(ino, path)| Op::Touch { ino, path }),
        (ino.clone(), kind, arb_path()).prop_map(|(ino, kind, path)| Op::Create {
            ino,
            kind,
            path
        }),
        (ino.clone(), arb_path(), any::<bool>()).prop_map(|(ino, path, dir)| Op::Remove {
            ino,
            path,
            dir
        }),
        (arb_path(), arb_path(), any::<bool>()).prop_map(|(from, to, exchange)| Op::Rename {
            from,
            to,
            exchange
        }),
        (ino.clone(), arb_path()).prop_map(|(ino, path)| Op::Link { ino, path }),
        (ino.clone(), 0u64..100_000, 0u64..5000).prop_map(|(ino, offset, len)| Op::Write {
            ino,
            offset,
            len
        }),
        (ino.clone(), 0u64..100_000).prop_map(|(ino, size)| Op::Truncate { ino, size }),
        (ino.clone(), proptest::option::of(arb_path()))
            .prop_map(|(ino, dir)| Op::Meta { ino, dir }),
        ino.prop_map(|ino| Op::Fsync { ino }),
    ]
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        20 => arb_op().prop_map(Step::Append),
        6 => (arb_op(), proptest::option::of(arb_path())).prop_map(|(op, p)| Step::FileOp(op, p)),
        1 => Just(Step::Crash),
        1 => Just(Step::CleanRestart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Replay after a crash equals the live state, with 4 KiB segments so that rotation,
    /// snapshots and reopening mid-segment all happen.
    #[test]
    fn replay_equals_live_state(steps in proptest::collection::vec(arb_step(), 0..250)) {
        let d = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let o = opts(BOOT_A, 4096);
        let (mut j, _) = Journal::open(d.path(), b.path(), o.clone()).unwrap();
        let mut model = DirtyState::default();
        let mut seq = 0;
        for step in steps {
            match step {
                Step::Append(op) => {
                    model.apply(&op);
                    seq += 1;
                    prop_assert_eq!(j.append(op).unwrap(), seq);
                }
                Step::FileOp(op, path) => {
                    let ino = op.ino().unwrap_or(FuseIno(1));
                    if !model.files.contains_key(&ino) {
                        model.apply(&Op::Touch { ino, path: path.clone() });
                        seq += 1;
                    }
                    model.apply(&op);
                    seq += 1;
                    prop_assert_eq!(j.append_file_op(ino, || path, op).unwrap(), seq);
                }
                Step::Crash | Step::CleanRestart => {
                    prop_assert_eq!(&j.dirty(), &model);
                    if matches!(step, Step::CleanRestart) {
                        j.close_clean().unwrap();
                        drop(j);
                    } else {
                        drop(j);
                    }
                    let (j2, rec) = Journal::open(d.path(), b.path(), o.clone()).unwrap();
                    prop_assert!(rec.rescan.is_none() && rec.torn_tail.is_none(), "{:?}", rec);
                    prop_assert_eq!(rec.last_seq, seq);
                    j = j2;
                }
            }
            prop_assert_eq!(j.stats().last_seq, seq);
        }
        prop_assert_eq!(&j.dirty(), &model);
        drop(j);
        let (j, rec) = Journal::open(d.path(), b.path(), o).unwrap();
        prop_assert!(rec.rescan.is_none() && rec.torn_tail.is_none(), "{:?}", rec);
        prop_assert_eq!(j.dirty(), model);
        prop_assert!(segments(d.path()).len() == 1);
    }
}

#[test]
fn no_journal_over_a_non_empty_backing_directory_rescans() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    std::fs::write(b.path().join("unrecorded"), b"12345").unwrap();
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(
        rec.rescan.as_deref().unwrap_or("").contains("no journal"),
        "{rec:?}"
    );
    let dirty = j.dirty();
    let f = dirty.files.values().next().expect("the file is dirty");
    assert_eq!(f.extents.total_len(), 5);
    assert!(f.created);
    drop(j);
    // Once written, the journal is trusted again.
    let (_, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(rec.rescan.is_none(), "{rec:?}");
}

/// A cut splits the state: what it covered is forgotten once committed, what came after stays
/// dirty, and a reopen (replay) after `committed` sees only the later changes. Before
/// `committed`, replay sees both (the cut's changes are still unsynced).
#[test]
fn cut_then_committed_keeps_only_later_changes() {
    let dir = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(dir.path(), b.path(), big()).unwrap();
    j.append_file_op(FuseIno(5), || Some(p("a")), write_op(5, 0, 10))
        .unwrap();
    let (seq, covered) = j.cut().unwrap();
    assert!(covered.files.contains_key(&FuseIno(5)));
    j.append_file_op(FuseIno(6), || Some(p("b")), write_op(6, 0, 4))
        .unwrap();
    // Not committed yet: everything is still unsynced, and replay agrees.
    assert_eq!(
        j.dirty().files.keys().copied().collect::<Vec<_>>(),
        vec![FuseIno(5), FuseIno(6)]
    );
    let (replayed, _) = Journal::inspect(dir.path()).unwrap();
    assert_eq!(replayed, j.dirty());
    assert_eq!(j.lag().0, 14);

    j.committed(seq).unwrap();
    assert_eq!(
        j.dirty().files.keys().copied().collect::<Vec<_>>(),
        vec![FuseIno(6)]
    );
    assert_eq!(j.dirty().files[&FuseIno(6)].path, Some(p("b")));
    assert_eq!(j.lag().0, 4);
    assert!(j.committed(seq).is_err(), "a cut is committed once");
    drop(j);
    let (j, _) = Journal::open(dir.path(), b.path(), big()).unwrap();
    assert_eq!(
        j.dirty().files.keys().copied().collect::<Vec<_>>(),
        vec![FuseIno(6)]
    );
    assert_eq!(segments(dir.path()).len(), 1, "older segments are removed");

    // A cut that is never committed (its upload failed) stays in the next cut.
    let (_, first) = j.cut().unwrap();
    j.append_file_op(FuseIno(7), || Some(p("c")), write_op(7, 0, 1))
        .unwrap();
    let (seq2, second) = j.cut().unwrap();
    assert!(first.files.contains_key(&FuseIno(6)));
    assert_eq!(
        second.files.keys().copied().collect::<Vec<_>>(),
        vec![FuseIno(6), FuseIno(7)]
    );
    j.committed(seq2).unwrap();
    assert!(!j.is_dirty());
    assert_eq!(j.lag(), (0, None));
}

/// `on_change` is called when the first change since a cut is appended, once, and not for a
/// record that changes nothing (an fsync); nor does such a record start the age of unsynced
/// changes.
#[test]
fn on_change_fires_once_per_cut_and_not_for_an_fsync() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    j.on_change(Box::new(move || {
        c.fetch_add(1, Ordering::SeqCst);
    }));
    j.append(Op::Fsync { ino: FuseIno(1) }).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 0, "an fsync is no change");
    assert!(!j.is_dirty());
    j.append(write_op(1, 0, 1)).unwrap();
    j.append(write_op(1, 1, 1)).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let (seq, _) = j.cut().unwrap();
    j.append(write_op(2, 0, 1)).unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the first change after the cut"
    );
    j.committed(seq).unwrap();
}

/// A rescan asked for by the caller (an adopted directory, changed while nothing was
/// mounted) happens even over a clean journal: what changed behind its back is dirty.
#[test]
fn a_rescan_asked_for_marks_changes_made_behind_a_clean_journal() {
    let d = tempfile::tempdir().unwrap();
    let b = backing();
    let (j, _) = Journal::open(d.path(), b.path(), big()).unwrap();
    j.close_clean().unwrap();
    drop(j);
    fs::write(b.path().join("edited-offline"), b"x").unwrap();
    let (j, rec) = Journal::open(d.path(), b.path(), big()).unwrap();
    assert!(rec.clean && rec.rescan.is_none() && !j.is_dirty());
    j.close_clean().unwrap();
    drop(j);
    let o = JournalOptions {
        rescan: Some("adopted".into()),
        ..big()
    };
    let (j, rec) = Journal::open(d.path(), b.path(), o).unwrap();
    assert_eq!(rec.rescan.as_deref(), Some("adopted"));
    let dirty = j.dirty();
    assert!(
        dirty
            .files
            .values()
            .any(|f| f.path.as_deref() == Some(Path::new("edited-offline"))),
        "{dirty:?}"
    );
    assert!(dirty.dirs.contains(Path::new("")));
}
