//! Tree and list blob encodings: round trips, canonical rejection, corruption detection.

use bytes::Bytes;
use owsfs_store::pack::{BlobKind, BlobRef, PackWriter, ParsedPack};
use owsfs_store::tree::{
    BlobLoader, ChunkSpan, Content, FileContent, NodeKind, Tree, TreeEntry, build_file_content,
    decode_list, encode_list, file_chunks,
};
use owsfs_store::{BlobId, Codec, Compression, PackId, Result};
use proptest::prelude::*;

struct PackLoader(ParsedPack);

impl BlobLoader for PackLoader {
    fn load(&self, r: &BlobRef) -> Result<Bytes> {
        self.0.blob(r)
    }
}

fn fake_ref(seed: u8, len: u32) -> BlobRef {
    BlobRef::plain(
        BlobId::of(&[seed, len as u8]),
        PackId([seed; 32]),
        16 + seed as u64,
        len,
    )
}

/// A ref to a compressed blob (`stored` bytes in the pack hold `len` plain bytes).
fn packed_ref(seed: u8, len: u32) -> BlobRef {
    BlobRef {
        stored: len / 2 + 1,
        codec: Codec::Zstd,
        ..fake_ref(seed, len)
    }
}

fn entry(name: &[u8], kind: NodeKind, content: Content, size: u64) -> TreeEntry {
    TreeEntry {
        name: name.to_vec(),
        kind,
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
        size,
        rdev: 0,
        link_key: 0,
        xattrs: vec![],
        content,
    }
}

fn sample_tree() -> Tree {
    let mut dev = entry(b"dev", NodeKind::CharDev, Content::None, 0);
    dev.rdev = 0x0103;
    let mut f = entry(
        b"file",
        NodeKind::File,
        Content::File(FileContent::Chunks(vec![fake_ref(1, 10), fake_ref(2, 5)])),
        15,
    );
    f.xattrs = vec![
        (b"user.a".to_vec(), b"1".to_vec()),
        (b"user.b".to_vec(), vec![]),
    ];
    f.link_key = 7;
    Tree {
        entries: vec![
            entry(b"\xffbin", NodeKind::Fifo, Content::None, 0),
            dev,
            entry(
                b"empty",
                NodeKind::File,
                Content::File(FileContent::Empty),
                0,
            ),
            f,
            entry(
                b"link",
                NodeKind::Symlink,
                Content::Symlink(b"../x".to_vec()),
                4,
            ),
            entry(b"sub", NodeKind::Dir, Content::Dir(fake_ref(3, 99)), 0),
        ]
        .into_iter()
        .fold(Vec::new(), |mut v, e| {
            v.push(e);
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        }),
    }
}

#[test]
fn tree_round_trip_and_id() {
    let t = sample_tree();
    let b = t.encode().unwrap();
    let d = Tree::decode("t", &b).unwrap();
    assert_eq!(d, t);
    assert_eq!(d.encode().unwrap(), b);
    assert_eq!(t.id().unwrap(), BlobId::of(&b));
    assert!(t.get(b"file").is_some() && t.get(b"nope").is_none());
}

#[test]
fn non_canonical_trees_are_refused() {
    let t = sample_tree();
    // Unsorted or duplicate names.
    let mut u = t.clone();
    u.entries.swap(0, 1);
    assert!(u.encode().is_err());
    let mut dup = t.clone();
    let e0 = dup.entries[0].clone();
    dup.entries.insert(0, e0);
    assert!(dup.encode().is_err());
    // Bad names.
    for name in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
        let t = Tree {
            entries: vec![entry(name, NodeKind::Fifo, Content::None, 0)],
        };
        assert!(t.encode().is_err(), "{name:?}");
    }
    // Size and content disagree; kinds and content disagree; mode with type bits.
    let bad = [
        entry(b"a", NodeKind::File, Content::File(FileContent::Empty), 3),
        entry(b"a", NodeKind::File, Content::Dir(fake_ref(1, 1)), 0),
        entry(b"a", NodeKind::Symlink, Content::Symlink(b"xy".to_vec()), 3),
        entry(
            b"a",
            NodeKind::File,
            Content::File(FileContent::Chunks(vec![fake_ref(1, 3)])),
            4,
        ),
        TreeEntry {
            mode: 0o100644,
            ..entry(b"a", NodeKind::Fifo, Content::None, 0)
        },
        TreeEntry {
            rdev: 1,
            ..entry(b"a", NodeKind::Fifo, Content::None, 0)
        },
        TreeEntry {
            xattrs: vec![(b"b".to_vec(), vec![]), (b"a".to_vec(), vec![])],
            ..entry(b"a", NodeKind::Fifo, Content::None, 0)
        },
    ];
    for e in bad {
        let t = Tree { entries: vec![e] };
        assert!(t.encode().is_err(), "{t:?}");
    }
    // Decoding refuses trailing bytes and bytes that decode to a non-canonical tree.
    let mut b = t.encode().unwrap();
    b.push(0);
    assert!(Tree::decode("t", &b).unwrap_err().is_corrupt());
    let fifo = Tree {
        entries: vec![
            entry(b"b", NodeKind::Fifo, Content::None, 0),
            entry(b"a", NodeKind::Fifo, Content::None, 0),
        ],
    };
    // Hand-encode the unsorted pair by encoding each alone and splicing.
    let one = |e: &TreeEntry| {
        Tree {
            entries: vec![e.clone()],
        }
        .encode()
        .unwrap()[14..]
            .to_vec()
    };
    let mut raw = b"OWSTREE\0".to_vec();
    raw.extend_from_slice(&1u16.to_le_bytes());
    raw.extend_from_slice(&2u32.to_le_bytes());
    raw.extend(one(&fifo.entries[0]));
    raw.extend(one(&fifo.entries[1]));
    let e = Tree::decode("workspace tree X", &raw).unwrap_err();
    assert!(e.to_string().contains("workspace tree X"), "{e}");
}

#[test]
fn newer_tree_version_is_a_clear_error() {
    let mut b = sample_tree().encode().unwrap();
    b[8] = 9;
    let e = Tree::decode("t", &b).unwrap_err();
    assert!(e.to_string().contains("upgrade owsfs"), "{e}");
}

#[test]
fn every_flipped_tree_byte_is_detected_and_names_the_object() {
    let t = sample_tree();
    let enc = t.encode().unwrap();
    let mut w = PackWriter::new();
    let r = w.add(BlobKind::Tree, &enc);
    let (id, data) = w.seal();
    let ok = PackLoader(ParsedPack::parse(id, data.clone()).unwrap());
    assert_eq!(Tree::load(&ok, &r).unwrap(), t);
    for i in r.range() {
        let mut c = data.to_vec();
        c[i as usize] ^= 1;
        let p = PackLoader(ParsedPack::parse(id, Bytes::from(c)).unwrap());
        let e = Tree::load(&p, &r).unwrap_err();
        let m = e.to_string();
        assert!(
            e.is_corrupt() && m.contains(&id.key()) && m.contains(&r.id.to_hex()),
            "{m}"
        );
    }
}

#[test]
fn a_tree_is_version_2_only_when_a_ref_names_a_compressed_blob() {
    let plain = sample_tree();
    let b = plain.encode().unwrap();
    assert_eq!(
        u16::from_le_bytes([b[8], b[9]]),
        1,
        "a plain tree is what v1 wrote"
    );
    let mut packed = plain.clone();
    let f = packed
        .entries
        .iter_mut()
        .find(|e| e.name == b"file")
        .unwrap();
    f.content = Content::File(FileContent::Chunks(vec![packed_ref(1, 10), fake_ref(2, 5)]));
    let b2 = packed.encode().unwrap();
    assert_eq!(u16::from_le_bytes([b2[8], b2[9]]), 2);
    let d = Tree::decode("t", &b2).unwrap();
    assert_eq!(d, packed);
    assert_eq!(d.encode().unwrap(), b2);
    assert_ne!(packed.id().unwrap(), plain.id().unwrap());
    // A version 2 encoding of plain refs only is not canonical.
    let mut forged = b2.clone();
    // The packed ref's tail: len 10, stored 6, codec 1.
    let tail = [&10u32.to_le_bytes()[..], &6u32.to_le_bytes(), &[1]].concat();
    let at = forged.windows(9).position(|w| w == tail).unwrap() + 4;
    forged[at..at + 4].copy_from_slice(&10u32.to_le_bytes());
    forged[at + 4] = 0;
    let e = Tree::decode("t", &forged).unwrap_err();
    assert!(
        e.is_corrupt() && e.to_string().contains("non-canonical"),
        "{e}"
    );
    // A plain ref whose stored length differs from its length, or an unknown codec.
    forged[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
    assert!(Tree::decode("t", &forged).unwrap_err().is_corrupt());
    forged[at + 4] = 7;
    let e = Tree::decode("t", &forged).unwrap_err();
    assert!(e.to_string().contains("unknown codec 7"), "{e}");
}

#[test]
fn a_compressed_tree_in_a_compressed_pack_detects_every_flipped_byte() {
    let mut t = sample_tree();
    for i in 0..40u8 {
        t.entries.push(entry(
            format!("generated-{i:03}.c").as_bytes(),
            NodeKind::File,
            Content::File(FileContent::Chunks(vec![packed_ref(i, 1000 + i as u32)])),
            1000 + i as u64,
        ));
    }
    t.entries.sort_by(|a, b| a.name.cmp(&b.name));
    let enc = t.encode().unwrap();
    let mut w = PackWriter::compressing(Compression::default());
    let r = w.add(BlobKind::Tree, &enc);
    assert_eq!(r.codec, Codec::Zstd);
    assert!(r.stored < r.len / 2, "{} of {}", r.stored, r.len);
    let (id, data) = w.seal();
    let ok = PackLoader(ParsedPack::parse(id, data.clone()).unwrap());
    assert_eq!(Tree::load(&ok, &r).unwrap(), t);
    // A flip either fails (naming pack and blob) or, where zstd ignores the bit (a frame
    // header flag), still yields exactly the tree: what is served is always verified.
    let mut same = 0;
    for i in r.range() {
        let mut c = data.to_vec();
        c[i as usize] ^= 1;
        let p = PackLoader(ParsedPack::parse(id, Bytes::from(c)).unwrap());
        match Tree::load(&p, &r) {
            Ok(got) => {
                assert_eq!(got, t, "byte {i} flipped into another tree");
                same += 1;
            }
            Err(e) => {
                let m = e.to_string();
                assert!(
                    e.is_corrupt() && m.contains(&id.key()) && m.contains(&r.id.to_hex()),
                    "{m}"
                );
            }
        }
    }
    assert!(same <= 8, "{same} flipped bytes went unnoticed by zstd");
}

#[test]
fn list_blobs() {
    let refs: Vec<_> = (0..10).map(|i| fake_ref(i, 100 + i as u32)).collect();
    let b = encode_list(&refs);
    assert_eq!(decode_list("l", &b).unwrap(), refs);
    let mut t = b.clone();
    t.push(1);
    assert!(decode_list("l", &t).is_err());
    assert!(decode_list("l", &b[..b.len() - 1]).is_err());
    assert!(decode_list("l", &encode_list(&[])).is_err());
    // Version 1 for plain refs, 2 once one is compressed; both round trip.
    assert_eq!(u16::from_le_bytes([b[8], b[9]]), 1);
    let mut mixed = refs.clone();
    mixed[3] = packed_ref(3, 103);
    let b2 = encode_list(&mixed);
    assert_eq!(u16::from_le_bytes([b2[8], b2[9]]), 2);
    assert_eq!(decode_list("l", &b2).unwrap(), mixed);
}

fn real_chunks(n: usize) -> (PackWriter, Vec<BlobRef>, Vec<Vec<u8>>) {
    let mut w = PackWriter::new();
    let mut datas = Vec::new();
    let refs = (0..n)
        .map(|i| {
            let d = format!("chunk number {i}").into_bytes();
            datas.push(d.clone());
            w.add(BlobKind::Chunk, &d)
        })
        .collect();
    (w, refs, datas)
}

#[test]
fn file_content_inline_and_lists() {
    for n in [0, 1, 64, 65, 3000] {
        let (mut w, refs, _) = real_chunks(n);
        let fc = build_file_content(refs.clone(), &mut w);
        match (&fc, n) {
            (FileContent::Empty, 0) => {}
            (FileContent::Chunks(c), 1..=64) => assert_eq!(c.len(), n),
            (FileContent::List(l), _) if n > 64 => {
                assert!(l.len() >= n.div_ceil(1024));
                // Content-defined ends: about one group in 64 chunks.
                assert!(n < 3000 || l.len() > 10, "{}", l.len());
            }
            _ => panic!("{n}: {fc:?}"),
        }
        let (id, data) = w.seal();
        let loader = PackLoader(ParsedPack::parse(id, data).unwrap());
        let spans = file_chunks(&loader, &fc).unwrap();
        assert_eq!(spans.iter().map(|s| s.r).collect::<Vec<_>>(), refs);
        let mut off = 0;
        for s in &spans {
            assert_eq!(s.offset, off);
            off = s.end();
        }
    }
}

#[test]
fn one_chunk_change_rewrites_one_list_blob() {
    let (mut w, mut refs, _) = real_chunks(5000);
    let a = build_file_content(refs.clone(), &mut w);
    refs[2500] = w.add(BlobKind::Chunk, b"a different chunk");
    let b = build_file_content(refs, &mut w);
    let (FileContent::List(a), FileContent::List(b)) = (a, b) else {
        panic!()
    };
    let changed = b
        .iter()
        .filter(|l| !a.iter().any(|x| x.blob.id == l.blob.id))
        .count();
    assert!(changed <= 2, "{changed} list blobs changed");
}

fn arb_entry() -> impl Strategy<Value = TreeEntry> {
    (
        proptest::collection::vec(1u8..=255, 1..12),
        0u8..5,
        0u32..0o7777,
        any::<u32>(),
        any::<i64>(),
        0u32..1_000_000_000,
        proptest::collection::btree_map(
            proptest::collection::vec(any::<u8>(), 1..5),
            proptest::collection::vec(any::<u8>(), 0..5),
            0..3,
        ),
        1u32..10_000,
    )
        .prop_map(|(name, k, mode, uid, sec, nsec, xattrs, len)| {
            let name: Vec<u8> = name
                .into_iter()
                .map(|c| if c == b'/' { b'x' } else { c })
                .collect();
            let name = if name == b"." || name == b".." {
                b"dot".to_vec()
            } else {
                name
            };
            let (kind, content, size) = match k {
                0 => (NodeKind::File, Content::File(FileContent::Empty), 0),
                1 => (
                    NodeKind::File,
                    Content::File(FileContent::Chunks(vec![fake_ref(1, len)])),
                    len as u64,
                ),
                2 => (NodeKind::Dir, Content::Dir(fake_ref(2, len)), 0),
                3 => (
                    NodeKind::Symlink,
                    Content::Symlink(vec![b'a'; len as usize % 50 + 1]),
                    len as u64 % 50 + 1,
                ),
                4 => (
                    NodeKind::File,
                    Content::File(FileContent::Chunks(vec![packed_ref(1, len)])),
                    len as u64,
                ),
                _ => (NodeKind::Socket, Content::None, 0),
            };
            TreeEntry {
                name,
                kind,
                mode,
                uid,
                gid: uid / 2,
                mtime_sec: sec,
                mtime_nsec: nsec,
                size,
                rdev: 0,
                link_key: 0,
                xattrs: xattrs.into_iter().collect(),
                content,
            }
        })
}

proptest! {
    #[test]
    fn any_tree_round_trips(mut entries in proptest::collection::vec(arb_entry(), 0..20)) {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries.dedup_by(|a, b| a.name == b.name);
        let t = Tree { entries };
        let b = t.encode().unwrap();
        let d = Tree::decode("t", &b).unwrap();
        prop_assert_eq!(&d, &t);
        prop_assert_eq!(d.encode().unwrap(), b);
    }

    #[test]
    fn decode_never_panics_and_accepts_only_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..400), mut entries in proptest::collection::vec(arb_entry(), 1..4), flip in any::<prop::sample::Index>()) {
        let _ = Tree::decode("t", &bytes);
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries.dedup_by(|a, b| a.name == b.name);
        let mut b = Tree { entries }.encode().unwrap();
        let i = flip.index(b.len());
        b[i] ^= 0x80;
        if let Ok(t) = Tree::decode("t", &b) {
            prop_assert_eq!(t.encode().unwrap(), b);
        }
    }
}

#[allow(dead_code)]
fn _span_is_copy(s: ChunkSpan) -> (ChunkSpan, ChunkSpan) {
    (s, s)
}
