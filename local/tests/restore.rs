//! Restoring a tree into a directory through the node writer: every kind of node, hard
//! links, attributes, a non-empty destination refused, and a corrupt chunk named.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use owsfs_local::Kind;
use owsfs_local::progress::Progress;
use owsfs_store::chunk::chunk_reader;
use owsfs_store::pack::{BlobKind, PackWriter};
use owsfs_store::tree::{build_file_content, file_chunks};
use owsfs_store::{
    Content, FileContent, GenKind, GenStats, GenerationRecord, NodeKind, Store, StoreOptions, Tree,
    TreeEntry, Workspace,
};

/// Records what a restore reports.
#[derive(Default)]
struct Seen(std::sync::Mutex<Vec<(u64, u64)>>);

impl Progress for Seen {
    fn begin(&self, _: &str, bytes: u64, items: u64) {
        self.0.lock().unwrap().push((bytes, items));
    }
    fn update(&self, bytes: u64, items: u64) {
        self.0.lock().unwrap().push((bytes, items));
    }
    fn finish(&self) {}
}

fn restore(
    store: &Store,
    g: &GenerationRecord,
    dest: &std::path::Path,
    p: &dyn Progress,
) -> anyhow::Result<owsfs_local::Update> {
    owsfs_local::restore::restore(store, store, &g.root.unwrap(), dest, p)
}

fn entry(name: &str, kind: NodeKind, mode: u32, content: Content, size: u64) -> TreeEntry {
    TreeEntry {
        name: name.as_bytes().to_vec(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime_sec: 1_600_000_000,
        mtime_nsec: 123_000,
        size,
        rdev: 0,
        link_key: 0,
        xattrs: vec![],
        content,
    }
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed as usize) % 251) as u8 ^ (i >> 12) as u8)
        .collect()
}

fn file_entry(pack: &mut PackWriter, name: &str, bytes: &[u8]) -> TreeEntry {
    let spans = chunk_reader(name, &mut &bytes[..], &mut |c| {
        Ok(pack.add(BlobKind::Chunk, c))
    })
    .unwrap();
    let fc = build_file_content(spans.into_iter().map(|s| s.r).collect(), pack);
    entry(
        name,
        NodeKind::File,
        0o640,
        Content::File(fc),
        bytes.len() as u64,
    )
}

/// Builds a generation in `store`; returns it with the file contents by path.
fn build(store: &Store) -> (GenerationRecord, Vec<(String, Vec<u8>)>) {
    let mut p = PackWriter::new();
    let big = data(5_000_000, 1);
    let small = data(1000, 2);
    let mut sub = Tree {
        entries: vec![
            file_entry(&mut p, "big", &big),
            entry(
                "empty",
                NodeKind::File,
                0o600,
                Content::File(FileContent::Empty),
                0,
            ),
        ],
    };
    sub.entries[0].mtime_sec = 1_500_000_000;
    let sub_ref = p.add(BlobKind::Tree, &sub.encode().unwrap());
    let mut a = file_entry(&mut p, "a", &small);
    a.link_key = 9;
    let mut b = file_entry(&mut p, "b", &small);
    b.link_key = 9;
    let mut subdir = entry("sub", NodeKind::Dir, 0o750, Content::Dir(sub_ref), 0);
    subdir.mtime_sec = 1_400_000_000;
    let root = Tree {
        entries: vec![
            a,
            b,
            entry("fifo", NodeKind::Fifo, 0o644, Content::None, 0),
            entry(
                "link",
                NodeKind::Symlink,
                0o777,
                Content::Symlink(b"sub/big".to_vec()),
                7,
            ),
            subdir,
        ],
    };
    let root_ref = p.add(BlobKind::Tree, &root.encode().unwrap());
    let (id, bytes) = p.seal();
    store.put(&id.key(), bytes).unwrap();
    let g = GenerationRecord {
        workspace: "w".into(),
        number: 1,
        parent: None,
        epoch: 1,
        kind: GenKind::Commit,
        time_unix_ms: 0,
        root: Some(root_ref),
        sqlite: vec![],
        stats: GenStats::default(),
        access: None,
    };
    let ws = Workspace::open_or_create(store, "w").unwrap();
    ws.commit(&g).unwrap();
    (
        ws.read_generation(1).unwrap(),
        vec![
            ("a".into(), small.clone()),
            ("b".into(), small),
            ("sub/big".into(), big),
        ],
    )
}

#[test]
fn restores_a_generation() {
    let store = Store::open(
        &format!("memory://restore-{}", std::process::id()),
        StoreOptions::default(),
    )
    .unwrap();
    let (g, files) = build(&store);
    let dest = tempfile::tempdir().unwrap();
    let seen = Seen::default();
    let update = restore(&store, &g, dest.path(), &seen).unwrap();
    for (path, bytes) in &files {
        assert_eq!(
            &std::fs::read(dest.path().join(path)).unwrap(),
            bytes,
            "{path}"
        );
    }
    let a = std::fs::metadata(dest.path().join("a")).unwrap();
    let b = std::fs::metadata(dest.path().join("b")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    assert_eq!(a.permissions().mode() & 0o7777, 0o640);
    assert_eq!(a.mtime(), 1_600_000_000);
    assert_eq!(a.mtime_nsec(), 123_000);
    let sub = std::fs::metadata(dest.path().join("sub")).unwrap();
    assert_eq!(sub.mtime(), 1_400_000_000);
    assert_eq!(sub.permissions().mode() & 0o7777, 0o750);
    assert_eq!(
        std::fs::metadata(dest.path().join("sub/big"))
            .unwrap()
            .mtime(),
        1_500_000_000
    );
    assert_eq!(
        std::fs::read_link(dest.path().join("link"))
            .unwrap()
            .as_os_str(),
        "sub/big"
    );
    assert!(
        std::fs::metadata(dest.path().join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo_like()
    );
    assert_eq!(
        std::fs::metadata(dest.path().join("sub/empty"))
            .unwrap()
            .len(),
        0
    );
    let seen = seen.0.lock().unwrap();
    // a (b is another name of it), sub/big and sub/empty.
    let total: u64 = files
        .iter()
        .filter(|(p, _)| p != "b")
        .map(|(_, b)| b.len() as u64)
        .sum();
    assert_eq!(seen.first(), Some(&(total, 3)), "begin: bytes and files");
    assert_eq!(seen.last(), Some(&(total, 3)), "everything reported done");
    // Every file and directory is recorded for the cache state (hard links once).
    let kinds: Vec<Kind> = update.nodes.iter().map(|n| n.1).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == Kind::File).count(),
        3,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == Kind::Dir).count(),
        1,
        "{kinds:?}"
    );
    assert!(update.replace_all_nodes);

    // A non-empty destination is refused.
    let e = restore(&store, &g, dest.path(), &owsfs_local::progress::Silent).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

#[test]
fn a_corrupt_chunk_aborts_the_restore_naming_pack_and_blob() {
    // A file:// store, so the test can damage a pack on disk (the store reads objects for
    // callers only through verified paths).
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &format!("file://{}", dir.path().display()),
        StoreOptions::default(),
    )
    .unwrap();
    let (g, _) = build(&store);
    // Find the big file's first chunk and flip a byte in the pack.
    let root = g.root.unwrap();
    let t = Tree::load(&store, &root).unwrap();
    let Content::Dir(sub) = t.get(b"sub").unwrap().content else {
        panic!()
    };
    let st = Tree::load(&store, &sub).unwrap();
    let Content::File(fc) = &st.get(b"big").unwrap().content else {
        panic!()
    };
    let victim = file_chunks(&store, fc).unwrap()[3].r;
    let key = victim.pack.key();
    let path = dir.path().join(&key);
    let mut b = std::fs::read(&path).unwrap();
    b[victim.offset as usize + 10] ^= 0xff;
    std::fs::write(&path, b).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let e = restore(&store, &g, dest.path(), &owsfs_local::progress::Silent).unwrap_err();
    let m = format!("{e:#}");
    let corrupt = e
        .downcast_ref::<owsfs_store::StoreError>()
        .is_some_and(|s| s.is_corrupt());
    assert!(
        corrupt && m.contains(&key) && m.contains(&victim.id.to_hex()),
        "{m}"
    );
}

#[test]
fn a_drill_checks_the_restored_tree_independently() {
    use owsfs_local::drill::{check, drill};
    let store = Store::open(
        &format!("memory://drill-{}", std::process::id()),
        StoreOptions::default(),
    )
    .unwrap();
    let (g, _) = build(&store);
    let dest = tempfile::tempdir().unwrap();
    let c = drill(&store, &g, dest.path(), &owsfs_local::progress::Silent).unwrap();
    assert_eq!((c.files, c.dirs, c.bytes), (4, 2, 5_002_000));
    let p = |rel: &str| dest.path().join(rel);
    let expect_err = |what: &str| {
        let e = format!("{:#}", check(&store, &g, dest.path()).unwrap_err());
        assert!(e.contains(what), "{what:?} not in {e}");
    };
    // One byte of the big file changed on disk.
    let mut big = std::fs::read(p("sub/big")).unwrap();
    big[4_000_000] ^= 1;
    std::fs::write(p("sub/big"), &big).unwrap();
    expect_err("do not hash to their chunk id");
    big[4_000_000] ^= 1;
    std::fs::write(p("sub/big"), &big).unwrap();
    check(&store, &g, dest.path()).unwrap();
    // A name too many, a mode, a broken hard link, another symlink target.
    std::fs::write(p("sub/extra"), b"x").unwrap();
    expect_err("sub holds 3 names, its tree 2");
    std::fs::remove_file(p("sub/extra")).unwrap();
    std::fs::set_permissions(p("sub"), std::fs::Permissions::from_mode(0o700)).unwrap();
    expect_err("mode 700, the tree says 750");
    std::fs::set_permissions(p("sub"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::remove_file(p("b")).unwrap();
    std::fs::copy(p("a"), p("b")).unwrap();
    std::fs::set_permissions(p("b"), std::fs::Permissions::from_mode(0o640)).unwrap();
    expect_err("not the same inode");
    std::fs::remove_file(p("b")).unwrap();
    std::fs::hard_link(p("a"), p("b")).unwrap();
    std::fs::remove_file(p("link")).unwrap();
    std::os::unix::fs::symlink("elsewhere", p("link")).unwrap();
    expect_err("another symlink target");
}
