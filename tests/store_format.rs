//! A store written before compression (`tests/fixtures/store-v1.tar.gz`, made by the owsfs of
//! commit 0d79058 with `tests/fixtures/make-store-v1`: version 1 packs and trees) mounts with
//! this owsfs, serves what it held, and takes new commits (compressed, version 2) beside the
//! old objects; a restore, a fresh mount and a drill then see old and new bytes alike.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// The version in a pack's header.
fn pack_version(path: &Path) -> u32 {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"OWSPACK\0", "{}", path.display());
    u32::from_le_bytes(b[8..12].try_into().unwrap())
}

/// The versions of every pack under `store`, by path.
fn pack_versions(store: &Path) -> std::collections::BTreeMap<String, u32> {
    let mut out = std::collections::BTreeMap::new();
    for dir in std::fs::read_dir(store.join("packs")).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            out.insert(p.display().to_string(), pack_version(&p));
        }
    }
    out
}

#[test]
fn a_store_from_before_compression_mounts_serves_and_commits() {
    if skip_fuse() {
        return;
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1.tar.gz");
    let unpacked = tempfile::tempdir().unwrap();
    run_ok(Command::new("tar").args([
        "-xzf",
        &fixture.to_string_lossy(),
        "-C",
        &unpacked.path().to_string_lossy(),
    ]));
    let store_dir = unpacked.path().join("store");
    let expected = tree(&unpacked.path().join("expected"));
    let old_packs = pack_versions(&store_dir);
    assert!(!old_packs.is_empty());
    assert!(
        old_packs.values().all(|&v| v == 1),
        "the fixture holds version 1 packs only: {old_packs:?}"
    );

    // The old store, mounted on an empty cache: everything it held, byte for byte.
    let store = format!("file://{}", store_dir.display());
    let ws = Workspace::unmounted(Some(&store), "legacy");
    ws.mount();
    assert_same_tree(&tree(&ws.mp), &expected, "the old store mounted");
    let (integrity, _) = sql_check(&ws.path("app.db"), true);
    assert_eq!(integrity, "ok");

    // New commits beside the old objects: appended text, a few bytes changed in the middle
    // of an old incompressible file, new compressible data, new rows.
    let text: String = (0..3000)
        .map(|i| format!("line {i} written after the upgrade, compressed this time\n"))
        .collect();
    let mut notes = std::fs::read(ws.path("notes/notes.md")).unwrap();
    notes.extend_from_slice(text.as_bytes());
    std::fs::write(ws.path("notes/notes.md"), &notes).unwrap();
    std::fs::create_dir(ws.path("new")).unwrap();
    std::fs::write(ws.path("new/compressible.txt"), text.repeat(4)).unwrap();
    let mut noise = std::fs::read(ws.path("data/noise.bin")).unwrap();
    noise[40_000..40_010].copy_from_slice(b"0123456789");
    std::fs::write(ws.path("data/noise.bin"), &noise).unwrap();
    run_ok(Command::new("sqlite3").arg(ws.path("app.db")).arg(
        "WITH RECURSIVE c(k) AS (SELECT 501 UNION ALL SELECT k + 1 FROM c WHERE k < 600) \
         INSERT INTO t SELECT k, 'new row ' || k FROM c;",
    ));
    ws.sync();
    let after = tree(&ws.mp);
    ws.unmount();

    let packs = pack_versions(&store_dir);
    for (p, v) in &old_packs {
        assert_eq!(packs.get(p), Some(v), "old pack {p} changed");
    }
    let new: Vec<u32> = packs
        .iter()
        .filter(|(p, _)| !old_packs.contains_key(*p))
        .map(|(_, v)| *v)
        .collect();
    assert!(
        new.contains(&2),
        "the new commit wrote no compressed pack: {new:?}"
    );
    let new_bytes: u64 = packs
        .keys()
        .filter(|p| !old_packs.contains_key(*p))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        new_bytes < text.len() as u64 * 2,
        "{new_bytes} bytes of new packs for {} bytes of new text (uncompressed?)",
        text.len() * 5
    );

    // A restore, a mount on another cache, and a drill all read old and new blobs.
    let dest = tempfile::tempdir().unwrap();
    let restored = dest.path().join("r");
    let out = ws.restore(None, &restored);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&tree(&restored), &after, "the restore after the new commit");
    let (integrity, rows) = sql_check(&restored.join("app.db"), true);
    assert_eq!((integrity.as_str(), rows.len()), ("ok", 600));

    let other = Workspace::unmounted(Some(&store), "legacy");
    other.mount();
    assert_same_tree(&tree(&other.mp), &after, "a mount on a fresh cache");
    other.unmount();

    let drill = owsfs(&["drill", "--store", &store, "--workspace", "legacy"]);
    assert!(
        drill.status.success(),
        "owsfs drill: {}{}",
        String::from_utf8_lossy(&drill.stdout),
        String::from_utf8_lossy(&drill.stderr)
    );
}
