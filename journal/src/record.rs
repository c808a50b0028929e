//! Record framing and the encoding of each record type (layouts in FORMAT.md).
//!
//! A record is `u32 payload_len | u32 crc32c(payload) | payload` with
//! `payload = u64 seq | u8 type | fields`; integers are little endian and byte strings are
//! `u32 len | bytes`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::JournalError;
use crate::extent::ExtentSet;
use crate::ino::FuseIno;
use crate::op::{Ino, NodeKind, Op, Seq};
use crate::state::{DirtyFile, DirtyState};

/// Bytes before the payload: length and checksum.
pub(crate) const FRAME_HEADER: usize = 8;
/// The smallest payload: seq and type.
pub(crate) const MIN_PAYLOAD: usize = 9;

// Record type numbers. Never reuse a number: an old journal must not decode as something else.
pub(crate) const T_TOUCH: u8 = 1;
pub(crate) const T_CREATE: u8 = 2;
pub(crate) const T_REMOVE: u8 = 3;
pub(crate) const T_RENAME: u8 = 4;
pub(crate) const T_LINK: u8 = 5;
pub(crate) const T_WRITE: u8 = 6;
pub(crate) const T_TRUNCATE: u8 = 7;
pub(crate) const T_META: u8 = 8;
pub(crate) const T_FSYNC: u8 = 9;
pub(crate) const T_UNPLACE: u8 = 10;
pub(crate) const T_SNAPSHOT: u8 = 64;

// Snapshot per-file flag bits.
const F_PATH: u8 = 1;
const F_CREATED: u8 = 2;
const F_META: u8 = 4;
const F_TRUNCATED: u8 = 8;
const F_UNPLACED: u8 = 16;
const F_ALL: u8 = F_PATH | F_CREATED | F_META | F_TRUNCATED | F_UNPLACED;

/// A decoded record payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    Op(Op),
    /// The whole dirty state as of its seq; only valid as the first record of a segment.
    Snapshot(DirtyState),
}

/// Why the bytes at some offset are not a whole, valid record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The frame runs past the end of the data (what a torn write leaves).
    Short(String),
    /// A whole frame that is wrong: impossible length, checksum mismatch, undecodable payload.
    Bad(String),
}

impl FrameError {
    pub(crate) fn reason(&self) -> &str {
        match self {
            FrameError::Short(r) | FrameError::Bad(r) => r,
        }
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bool(out: &mut Vec<u8>, v: bool) {
    out.push(u8::from(v));
}

fn put_len(out: &mut Vec<u8>, len: usize, what: &'static str) -> Result<(), JournalError> {
    let len32 = u32::try_from(len).map_err(|_| JournalError::RecordTooLarge {
        what,
        len: len as u64,
    })?;
    put_u32(out, len32);
    Ok(())
}

fn put_path(out: &mut Vec<u8>, p: &Path, what: &'static str) -> Result<(), JournalError> {
    let bytes = p.as_os_str().as_bytes();
    put_len(out, bytes.len(), what)?;
    out.extend_from_slice(bytes);
    Ok(())
}

/// Appends a framed record to `out`. On error `out` is left as it was.
fn frame(
    out: &mut Vec<u8>,
    seq: Seq,
    ty: u8,
    what: &'static str,
    fields: impl FnOnce(&mut Vec<u8>) -> Result<(), JournalError>,
) -> Result<(), JournalError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    put_u64(out, seq);
    out.push(ty);
    let result = fields(out).and_then(|()| {
        let payload_len = out.len() - start - FRAME_HEADER;
        u32::try_from(payload_len).map_err(|_| JournalError::RecordTooLarge {
            what,
            len: payload_len as u64,
        })
    });
    match result {
        Ok(len) => {
            let crc = crc32c::crc32c(&out[start + FRAME_HEADER..]);
            out[start..start + 4].copy_from_slice(&len.to_le_bytes());
            out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Appends the framed record of `op` with sequence number `seq`.
pub(crate) fn encode_op(out: &mut Vec<u8>, seq: Seq, op: &Op) -> Result<(), JournalError> {
    let what = op.name();
    match op {
        Op::Touch { ino, path } => frame(out, seq, T_TOUCH, what, |o| {
            put_u64(o, ino.0);
            put_bool(o, path.is_some());
            match path {
                Some(p) => put_path(o, p, what),
                None => Ok(()),
            }
        }),
        Op::Create { ino, kind, path } => frame(out, seq, T_CREATE, what, |o| {
            put_u64(o, ino.0);
            o.push(kind.code());
            put_path(o, path, what)
        }),
        Op::Remove { ino, path, dir } => frame(out, seq, T_REMOVE, what, |o| {
            put_u64(o, ino.0);
            put_path(o, path, what)?;
            put_bool(o, *dir);
            Ok(())
        }),
        Op::Rename { from, to, exchange } => frame(out, seq, T_RENAME, what, |o| {
            put_path(o, from, what)?;
            put_path(o, to, what)?;
            put_bool(o, *exchange);
            Ok(())
        }),
        Op::Link { ino, path } => frame(out, seq, T_LINK, what, |o| {
            put_u64(o, ino.0);
            put_path(o, path, what)
        }),
        Op::Write { ino, offset, len } => frame(out, seq, T_WRITE, what, |o| {
            put_u64(o, ino.0);
            put_u64(o, *offset);
            put_u64(o, *len);
            Ok(())
        }),
        Op::Truncate { ino, size } => frame(out, seq, T_TRUNCATE, what, |o| {
            put_u64(o, ino.0);
            put_u64(o, *size);
            Ok(())
        }),
        Op::Meta { ino, dir } => frame(out, seq, T_META, what, |o| {
            put_u64(o, ino.0);
            put_bool(o, dir.is_some());
            match dir {
                Some(p) => put_path(o, p, what),
                None => Ok(()),
            }
        }),
        Op::Fsync { ino } => frame(out, seq, T_FSYNC, what, |o| {
            put_u64(o, ino.0);
            Ok(())
        }),
        Op::Unplace { ino } => frame(out, seq, T_UNPLACE, what, |o| {
            put_u64(o, ino.0);
            Ok(())
        }),
    }
}

/// Appends a framed Snapshot record holding `state` as of `seq`.
pub(crate) fn encode_snapshot(
    out: &mut Vec<u8>,
    seq: Seq,
    state: &DirtyState,
) -> Result<(), JournalError> {
    const WHAT: &str = "snapshot";
    frame(out, seq, T_SNAPSHOT, WHAT, |o| {
        put_len(o, state.files.len(), WHAT)?;
        for (ino, f) in &state.files {
            put_u64(o, ino.0);
            let mut flags = 0;
            if f.path.is_some() {
                flags |= F_PATH;
            }
            if f.created {
                flags |= F_CREATED;
            }
            if f.meta {
                flags |= F_META;
            }
            if f.truncated_to.is_some() {
                flags |= F_TRUNCATED;
            }
            if f.unplaced {
                flags |= F_UNPLACED;
            }
            o.push(flags);
            if let Some(p) = &f.path {
                put_path(o, p, WHAT)?;
            }
            if let Some(t) = f.truncated_to {
                put_u64(o, t);
            }
            put_len(o, f.extents.len(), WHAT)?;
            for (s, e) in f.extents.iter() {
                put_u64(o, s);
                put_u64(o, e);
            }
        }
        put_len(o, state.dirs.len(), WHAT)?;
        for d in &state.dirs {
            put_path(o, d, WHAT)?;
        }
        Ok(())
    })
}

/// Reads fields from a payload; every failure is a reason string for a corrupt record.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() - self.pos < n {
            return Err(format!(
                "payload ends inside a field (needs {n} bytes at payload offset {}, has {})",
                self.pos,
                self.buf.len() - self.pos
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn ino(&mut self) -> Result<Ino, String> {
        self.u64().map(FuseIno)
    }

    fn bool(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("boolean field holds {b}")),
        }
    }

    fn path(&mut self) -> Result<PathBuf, String> {
        let len = self.u32()? as usize;
        Ok(PathBuf::from(OsStr::from_bytes(self.take(len)?)))
    }

    fn count(&mut self, min_item_bytes: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        // Refuses counts the rest of the payload cannot hold before allocating for them.
        if n.saturating_mul(min_item_bytes) > self.buf.len() - self.pos {
            return Err(format!("count {n} does not fit the payload"));
        }
        Ok(n)
    }

    fn finish(&self) -> Result<(), String> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(format!(
                "{} trailing bytes in payload",
                self.buf.len() - self.pos
            ))
        }
    }
}

/// Decodes a payload (whose checksum has been checked).
pub(crate) fn decode_payload(payload: &[u8]) -> Result<(Seq, Record), String> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let seq = r.u64()?;
    let ty = r.u8()?;
    let record = match ty {
        T_TOUCH => {
            let ino = r.ino()?;
            let path = if r.bool()? { Some(r.path()?) } else { None };
            Record::Op(Op::Touch { ino, path })
        }
        T_CREATE => {
            let ino = r.ino()?;
            let code = r.u8()?;
            let kind =
                NodeKind::from_code(code).ok_or_else(|| format!("unknown node kind {code}"))?;
            let path = r.path()?;
            Record::Op(Op::Create { ino, kind, path })
        }
        T_REMOVE => {
            let ino = r.ino()?;
            let path = r.path()?;
            let dir = r.bool()?;
            Record::Op(Op::Remove { ino, path, dir })
        }
        T_RENAME => {
            let from = r.path()?;
            let to = r.path()?;
            let exchange = r.bool()?;
            Record::Op(Op::Rename { from, to, exchange })
        }
        T_LINK => {
            let ino = r.ino()?;
            let path = r.path()?;
            Record::Op(Op::Link { ino, path })
        }
        T_WRITE => Record::Op(Op::Write {
            ino: r.ino()?,
            offset: r.u64()?,
            len: r.u64()?,
        }),
        T_TRUNCATE => Record::Op(Op::Truncate {
            ino: r.ino()?,
            size: r.u64()?,
        }),
        T_META => {
            let ino = r.ino()?;
            let dir = if r.bool()? { Some(r.path()?) } else { None };
            Record::Op(Op::Meta { ino, dir })
        }
        T_FSYNC => Record::Op(Op::Fsync { ino: r.ino()? }),
        T_UNPLACE => Record::Op(Op::Unplace { ino: r.ino()? }),
        T_SNAPSHOT => Record::Snapshot(decode_snapshot(&mut r)?),
        other => return Err(format!("unknown record type {other}")),
    };
    r.finish()?;
    Ok((seq, record))
}

fn decode_snapshot(r: &mut Reader<'_>) -> Result<DirtyState, String> {
    let mut state = DirtyState::default();
    // A file entry is at least ino, flags and extent count.
    let files = r.count(13)?;
    for _ in 0..files {
        let ino = r.ino()?;
        let flags = r.u8()?;
        if flags & !F_ALL != 0 {
            return Err(format!("unknown snapshot file flags {flags:#x}"));
        }
        let path = if flags & F_PATH != 0 {
            Some(r.path()?)
        } else {
            None
        };
        let truncated_to = if flags & F_TRUNCATED != 0 {
            Some(r.u64()?)
        } else {
            None
        };
        let n = r.count(16)?;
        let mut extents = ExtentSet::new();
        for _ in 0..n {
            let (s, e) = (r.u64()?, r.u64()?);
            if s >= e {
                return Err(format!("empty extent [{s}, {e}) in snapshot"));
            }
            extents.insert(s, e);
        }
        let file = DirtyFile {
            path,
            extents,
            truncated_to,
            created: flags & F_CREATED != 0,
            meta: flags & F_META != 0,
            unplaced: flags & F_UNPLACED != 0,
        };
        if state.files.insert(ino, file).is_some() {
            return Err(format!("inode {ino} twice in snapshot"));
        }
    }
    let dirs = r.count(4)?;
    for _ in 0..dirs {
        state.dirs.insert(r.path()?);
    }
    Ok(state)
}

/// Reads the record framed at `buf[off..]`. Returns its seq, the record and the offset just
/// past it.
pub(crate) fn read_frame(buf: &[u8], off: usize) -> Result<(Seq, Record, usize), FrameError> {
    let rest = &buf[off..];
    if rest.len() < FRAME_HEADER {
        return Err(FrameError::Short(format!(
            "{} bytes left, a record header needs {FRAME_HEADER}",
            rest.len()
        )));
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len < MIN_PAYLOAD {
        return Err(FrameError::Bad(format!(
            "payload length {len} is below the minimum {MIN_PAYLOAD}"
        )));
    }
    if rest.len() - FRAME_HEADER < len {
        return Err(FrameError::Short(format!(
            "payload length {len} runs past the end of the segment ({} bytes left)",
            rest.len() - FRAME_HEADER
        )));
    }
    let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
    let actual = crc32c::crc32c(payload);
    if actual != crc {
        return Err(FrameError::Bad(format!(
            "checksum mismatch (stored {crc:#010x}, computed {actual:#010x})"
        )));
    }
    let (seq, record) = decode_payload(payload).map_err(FrameError::Bad)?;
    Ok((seq, record, off + FRAME_HEADER + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::ffi::OsStringExt;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    /// One op of every variant, with the optional fields both set and unset.
    fn every_op() -> Vec<Op> {
        let odd = PathBuf::from(std::ffi::OsString::from_vec(vec![b'a', 0xff, b'/', 0x80]));
        vec![
            Op::Touch {
                ino: FuseIno(1),
                path: Some(p("a/b")),
            },
            Op::Touch {
                ino: FuseIno(2),
                path: None,
            },
            Op::Create {
                ino: FuseIno(3),
                kind: NodeKind::File,
                path: p("f"),
            },
            Op::Create {
                ino: FuseIno(4),
                kind: NodeKind::Dir,
                path: p("d/e"),
            },
            Op::Create {
                ino: FuseIno(5),
                kind: NodeKind::Symlink,
                path: odd.clone(),
            },
            Op::Create {
                ino: FuseIno(6),
                kind: NodeKind::Fifo,
                path: p("fifo"),
            },
            Op::Create {
                ino: FuseIno(7),
                kind: NodeKind::Socket,
                path: p("sock"),
            },
            Op::Create {
                ino: FuseIno(8),
                kind: NodeKind::CharDev,
                path: p("c"),
            },
            Op::Create {
                ino: FuseIno(9),
                kind: NodeKind::BlockDev,
                path: p("b"),
            },
            Op::Remove {
                ino: FuseIno(10),
                path: p("x"),
                dir: false,
            },
            Op::Remove {
                ino: FuseIno(11),
                path: p("y"),
                dir: true,
            },
            Op::Rename {
                from: p("a"),
                to: p("b/c"),
                exchange: false,
            },
            Op::Rename {
                from: odd,
                to: p(""),
                exchange: true,
            },
            Op::Link {
                ino: FuseIno(12),
                path: p("l"),
            },
            Op::Write {
                ino: FuseIno(u64::MAX),
                offset: u64::MAX - 5,
                len: 5,
            },
            Op::Truncate {
                ino: FuseIno(13),
                size: 0,
            },
            Op::Meta {
                ino: FuseIno(14),
                dir: Some(p("m")),
            },
            Op::Meta {
                ino: FuseIno(15),
                dir: None,
            },
            Op::Fsync { ino: FuseIno(16) },
        ]
    }

    fn sample_state() -> DirtyState {
        let mut s = DirtyState::default();
        for op in every_op() {
            s.apply(&op);
        }
        s.apply(&Op::Write {
            ino: FuseIno(3),
            offset: 0,
            len: 10,
        });
        s.apply(&Op::Write {
            ino: FuseIno(3),
            offset: 20,
            len: 10,
        });
        s
    }

    #[test]
    fn every_op_round_trips() {
        for (i, op) in every_op().into_iter().enumerate() {
            let seq = 1000 + i as u64;
            let mut buf = Vec::new();
            encode_op(&mut buf, seq, &op).unwrap();
            let (got_seq, rec, end) = read_frame(&buf, 0).unwrap();
            assert_eq!((got_seq, end), (seq, buf.len()), "{op:?}");
            assert_eq!(rec, Record::Op(op));
        }
    }

    #[test]
    fn snapshot_round_trips() {
        for state in [DirtyState::default(), sample_state()] {
            let mut buf = Vec::new();
            encode_snapshot(&mut buf, 42, &state).unwrap();
            let (seq, rec, end) = read_frame(&buf, 0).unwrap();
            assert_eq!((seq, end), (42, buf.len()));
            assert_eq!(rec, Record::Snapshot(state));
        }
    }

    #[test]
    fn records_concatenate() {
        let mut buf = Vec::new();
        for (i, op) in every_op().iter().enumerate() {
            encode_op(&mut buf, i as u64 + 1, op).unwrap();
        }
        let mut off = 0;
        let mut ops = Vec::new();
        while off < buf.len() {
            let (_, rec, end) = read_frame(&buf, off).unwrap();
            ops.push(rec);
            off = end;
        }
        assert_eq!(
            ops,
            every_op().into_iter().map(Record::Op).collect::<Vec<_>>()
        );
    }

    #[test]
    fn every_truncation_is_short() {
        let mut buf = Vec::new();
        encode_op(
            &mut buf,
            1,
            &Op::Create {
                ino: FuseIno(1),
                kind: NodeKind::File,
                path: p("some/file"),
            },
        )
        .unwrap();
        for cut in 0..buf.len() {
            let got = read_frame(&buf[..cut], 0);
            assert!(
                matches!(got, Err(FrameError::Short(_))),
                "cut at {cut}: {got:?}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let mut buf = Vec::new();
        encode_op(
            &mut buf,
            7,
            &Op::Rename {
                from: p("a"),
                to: p("b"),
                exchange: false,
            },
        )
        .unwrap();
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(read_frame(&bad, 0).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn unknown_type_and_trailing_bytes_are_bad() {
        let payload = |ty: u8, extra: &[u8]| {
            let mut p = 5u64.to_le_bytes().to_vec();
            p.push(ty);
            p.extend_from_slice(extra);
            p
        };
        assert!(
            decode_payload(&payload(200, &[]))
                .unwrap_err()
                .contains("unknown record type 200")
        );
        let mut fsync = payload(T_FSYNC, &9u64.to_le_bytes());
        assert!(decode_payload(&fsync).is_ok());
        fsync.push(0);
        assert!(decode_payload(&fsync).unwrap_err().contains("trailing"));
        assert!(
            decode_payload(&payload(T_REMOVE, &[0; 8]))
                .unwrap_err()
                .contains("ends inside")
        );
    }

    #[test]
    fn huge_counts_are_refused_without_allocating() {
        let mut p = 1u64.to_le_bytes().to_vec();
        p.push(T_SNAPSHOT);
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_payload(&p).unwrap_err().contains("does not fit"));
    }

    fn arb_path() -> impl Strategy<Value = PathBuf> {
        proptest::collection::vec(any::<u8>(), 0..12)
            .prop_map(|b| PathBuf::from(std::ffi::OsString::from_vec(b)))
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let ino = || any::<u64>().prop_map(FuseIno);
        let kind = prop_oneof![
            Just(NodeKind::File),
            Just(NodeKind::Dir),
            Just(NodeKind::Symlink),
            Just(NodeKind::Fifo),
            Just(NodeKind::Socket),
            Just(NodeKind::CharDev),
            Just(NodeKind::BlockDev),
        ];
        prop_oneof![
            (ino(), proptest::option::of(arb_path()))
                .prop_map(|(ino, path)| Op::Touch { ino, path }),
            (ino(), kind, arb_path()).prop_map(|(ino, kind, path)| Op::Create { ino, kind, path }),
            (ino(), arb_path(), any::<bool>()).prop_map(|(ino, path, dir)| Op::Remove {
                ino,
                path,
                dir
            }),
            (arb_path(), arb_path(), any::<bool>())
                .prop_map(|(from, to, exchange)| { Op::Rename { from, to, exchange } }),
            (ino(), arb_path()).prop_map(|(ino, path)| Op::Link { ino, path }),
            ino().prop_map(|ino| Op::Unplace { ino }),
            (ino(), any::<u64>(), any::<u64>()).prop_map(|(ino, offset, len)| Op::Write {
                ino,
                offset,
                len
            }),
            (ino(), any::<u64>()).prop_map(|(ino, size)| Op::Truncate { ino, size }),
            (ino(), proptest::option::of(arb_path())).prop_map(|(ino, dir)| Op::Meta { ino, dir }),
            ino().prop_map(|ino| Op::Fsync { ino }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_ops_round_trip(op in arb_op(), seq in any::<u64>()) {
            let mut buf = Vec::new();
            encode_op(&mut buf, seq, &op).unwrap();
            let (s, rec, end) = read_frame(&buf, 0).unwrap();
            prop_assert_eq!(s, seq);
            prop_assert_eq!(end, buf.len());
            prop_assert_eq!(rec, Record::Op(op));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = read_frame(&bytes, 0);
            let _ = decode_payload(&bytes);
        }
    }
}
