//! The store misbehaving: injected request faults (`OWSFS_FAULTS`) never lose an acknowledged
//! generation, and a corrupted object in the store is refused with an error naming it, with
//! nothing served from it.

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use stores::TestStore;

const FAULTS: &str = "rate=0.1,seed=7,kinds=read+write+ack+timeout,delay_ms=200";

#[test]
fn injected_faults_lose_no_acknowledged_generation_file() {
    if skip_fuse() {
        return;
    }
    injected_faults_lose_no_acknowledged_generation(&TestStore::file());
}

#[test]
fn injected_faults_lose_no_acknowledged_generation_seaweedfs() {
    if skip_fuse() {
        return;
    }
    injected_faults_lose_no_acknowledged_generation(&TestStore::seaweed("owsfs-faults"));
}

fn injected_faults_lose_no_acknowledged_generation(store: &TestStore) {
    let mut ws = store.workspace("faulty", &["--commit-interval", "300ms"]);
    ws.env.push(("OWSFS_FAULTS".into(), FAULTS.into()));
    ws.mount();
    std::fs::create_dir(ws.path("f")).unwrap();
    std::fs::write(ws.path("big.bin"), noise(600_000, 1)).unwrap();

    // Every acknowledged generation and what the workspace held when it was acknowledged.
    let mut acked: Vec<(u64, BTreeMap<String, Vec<u8>>)> = Vec::new();
    for i in 0..25u64 {
        std::fs::write(
            ws.path(&format!("f/{i}.txt")),
            format!("file {i}\n").repeat(i as usize + 1),
        )
        .unwrap();
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(ws.path("log.txt"))
            .unwrap();
        std::io::Write::write_all(&mut log, format!("line {i}\n").as_bytes()).unwrap();
        drop(log);
        let big = std::fs::OpenOptions::new()
            .write(true)
            .open(ws.path("big.bin"))
            .unwrap();
        big.write_all_at(&noise(3000, 100 + i), 23_456 * i).unwrap();
        drop(big);
        if i % 5 == 4 {
            std::fs::remove_file(ws.path(&format!("f/{}.txt", i - 2))).unwrap();
            std::fs::rename(
                ws.path(&format!("f/{}.txt", i - 3)),
                ws.path(&format!("f/renamed-{i}.txt")),
            )
            .unwrap();
        }
        let g = ws.sync();
        if let Some((prev, _)) = acked.last() {
            assert!(g > *prev, "sync acknowledged {g} after {prev}");
        }
        acked.push((g, snapshot(&ws.mp)));
    }
    let status = ws.status_json(false);
    let sync = &status["sync"];
    let retries = status
        .pointer("/sync/store_requests/retries")
        .or_else(|| status.pointer("/store_requests/retries"))
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("no store_requests.retries in status: {status}"));
    assert!(
        retries > 0,
        "no store request was retried: were faults injected? {sync}"
    );
    ws.unmount();

    // Without faults: every acknowledged generation holds exactly what it acknowledged.
    ws.env.retain(|(k, _)| k != "OWSFS_FAULTS");
    let work = tempfile::Builder::new()
        .prefix("owsfs-restores-")
        .tempdir()
        .unwrap();
    for (g, want) in &acked {
        let dest = work.path().join(g.to_string());
        let out = ws.restore(Some(*g), &dest);
        assert!(
            out.status.success(),
            "owsfs restore --generation {g}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = snapshot(&dest);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "generation {g}: other files than acknowledged"
        );
        for (k, v) in want {
            assert!(got[k] == *v, "generation {g}: {k} differs");
        }
    }
    let fresh = store.workspace("faulty", &[]);
    fresh.mount();
    let got = snapshot(&fresh.mp);
    fresh.unmount();
    assert!(
        got == acked.last().unwrap().1,
        "a fresh cache does not show the last acknowledged state"
    );
}

/// The generation record's JSON line.
fn record(store_root: &Path, ws: &str, g: u64) -> (PathBuf, serde_json::Value) {
    let path = store_root.join(format!("workspaces/{ws}/gens/{g:020}"));
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text.lines().nth(1).expect("record line 2");
    (path, serde_json::from_str(line).expect("record json"))
}

/// The path of a pack in a `file://` store.
fn pack_path(store_root: &Path, pack: &str) -> PathBuf {
    store_root.join(format!("packs/{}/{pack}", &pack[..2]))
}

/// A pack's index: (kind, offset, len) of each blob.
fn pack_index(bytes: &[u8]) -> Vec<(u8, u64, u32)> {
    let t = &bytes[bytes.len() - 24..];
    assert_eq!(&t[16..24], b"OWSPEND\0", "pack trailer magic");
    let index_off = u64::from_le_bytes(t[0..8].try_into().unwrap()) as usize;
    let idx = &bytes[index_off..];
    assert_eq!(&idx[0..8], b"OWSPIDX\0", "pack index magic");
    let count = u32::from_le_bytes(idx[8..12].try_into().unwrap()) as usize;
    (0..count)
        .map(|i| {
            let e = &idx[12 + 46 * i..12 + 46 * (i + 1)];
            (
                e[0],
                u64::from_le_bytes(e[33..41].try_into().unwrap()),
                u32::from_le_bytes(e[41..45].try_into().unwrap()),
            )
        })
        .collect()
}

/// XORs one byte of a file with `mask`; calling it again restores it.
fn flip(path: &Path, at: u64, mask: u8) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A restore and a fresh-cache mount of the newest generation both fail, naming `object`
/// (any of the given strings); nothing is mounted afterwards. Returns the restore directory
/// (possibly partly written) for the caller to inspect.
fn refused(store: &TestStore, work: &Path, case: &str, objects: &[&str]) -> PathBuf {
    let dest = refused_by_restore(store, work, case, objects);
    let ws = store.workspace("ws", &[]);
    let out = ws.try_mount();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let mounted = is_mounted(&ws.mp);
    eprintln!("{case}: owsfs mount: {}", err.trim());
    assert!(
        !out.status.success(),
        "{case}: a fresh-cache mount succeeded on a corrupted store{}",
        ws.log_tail()
    );
    assert!(
        !mounted,
        "{case}: the failed mount left a mount behind{}",
        ws.log_tail()
    );
    assert!(
        objects.iter().any(|o| err.contains(o)),
        "{case}: the mount error does not name {objects:?}: {err}{}",
        ws.log_tail()
    );
    dest
}

/// `owsfs restore` of the newest generation fails, naming one of `objects`.
fn refused_by_restore(store: &TestStore, work: &Path, case: &str, objects: &[&str]) -> PathBuf {
    let ws = store.workspace("ws", &[]);
    let dest = work.join(format!("restore-{case}"));
    let out = ws.restore(None, &dest);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{case}: owsfs restore succeeded on a corrupted store: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        objects.iter().any(|o| err.contains(o)),
        "{case}: the restore error does not name {objects:?}: {err}"
    );
    eprintln!("{case}: owsfs restore: {}", err.trim());
    dest
}

/// A fresh-cache mount fetches lazily: it succeeds, every file but `bad` reads right, and
/// reading `bad` fails with EIO (never zeros), the daemon's log naming one of `objects`.
fn refused_on_read(
    store: &TestStore,
    case: &str,
    bad: &str,
    objects: &[&str],
    want: &BTreeMap<String, Vec<u8>>,
) {
    let ws = store.workspace("ws", &["--prefetch", "0"]);
    ws.mount();
    for (name, v) in want {
        if name == bad || !v.starts_with(b"f:") {
            continue;
        }
        assert_eq!(
            std::fs::read(ws.path(name)).unwrap(),
            v[2..],
            "{case}: {name} differs"
        );
    }
    let err = std::fs::read(ws.path(bad)).expect_err("a corrupted chunk was served");
    let log = ws.log_tail();
    ws.unmount();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{case}: {err}");
    assert!(
        objects.iter().any(|o| log.contains(o)),
        "{case}: the daemon log does not name {objects:?}: {log}"
    );
}

/// A restore and a fresh-cache mount of the newest generation succeed and show `want`.
fn served(store: &TestStore, work: &Path, case: &str, want: &BTreeMap<String, Vec<u8>>) {
    let ws = store.workspace("ws", &[]);
    let dest = work.join(format!("restore-{case}"));
    let out = ws.restore(None, &dest);
    assert!(
        out.status.success(),
        "{case}: owsfs restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(snapshot(&dest) == *want, "{case}: restore differs");
    ws.mount();
    let got = snapshot(&ws.mp);
    ws.unmount();
    assert!(got == *want, "{case}: fresh-cache mount differs");
}

#[test]
fn corrupted_objects_are_refused_and_named() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let root = store.root();
    let keep = noise(300_000, 42);
    {
        let ws = store.workspace("ws", &["--commit-interval", "1h"]);
        ws.mount();
        std::fs::write(ws.path("keep.bin"), &keep).unwrap();
        std::fs::write(ws.path("a.txt"), b"first\n").unwrap();
        ws.sync();
        std::fs::create_dir(ws.path("d")).unwrap();
        std::fs::write(ws.path("d/b.txt"), b"second\n").unwrap();
        ws.sync();
        std::fs::write(ws.path("a.txt"), b"third\n").unwrap();
        ws.sync();
        ws.unmount();
    }
    let newest = store.workspace("ws", &[]).log_json().len() as u64;
    assert!(newest >= 3);
    let work = tempfile::Builder::new()
        .prefix("owsfs-corrupt-")
        .tempdir()
        .unwrap();
    let expected: BTreeMap<String, Vec<u8>> = [
        ("a.txt", b"f:third\n".to_vec()),
        ("d", b"d".to_vec()),
        ("d/b.txt", b"f:second\n".to_vec()),
        ("keep.bin", [b"f:".as_slice(), &keep].concat()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    served(&store, work.path(), "before", &expected);

    // (a) A byte in the middle of a chunk of keep.bin (chunks of at least 16 KiB: only
    // keep.bin has them, and every one of them is in the newest generation).
    let (pack, off, len) = all_files(&root.join("packs"))
        .into_iter()
        .find_map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            pack_index(&bytes)
                .into_iter()
                .find(|&(kind, _, len)| kind == 1 && len >= 16 * 1024)
                .map(|(_, off, len)| (p, off, len))
        })
        .expect("a chunk of keep.bin in some pack");
    let pack_key = pack
        .strip_prefix(&root)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let chunk = std::fs::read(&pack).unwrap()[off as usize..(off + len as u64) as usize].to_vec();
    let in_file = keep
        .windows(chunk.len())
        .position(|w| w == chunk.as_slice())
        .expect("the chunk is a piece of keep.bin");
    let at = off + len as u64 / 2;
    flip(&pack, at, 0x5a);
    let dest = refused_by_restore(&store, work.path(), "chunk", &[&pack_key]);
    refused_on_read(&store, "chunk", "keep.bin", &[&pack_key], &expected);
    let mut bad_chunk = chunk.clone();
    bad_chunk[len as usize / 2] ^= 0x5a;
    for f in all_files(&dest) {
        let got = std::fs::read(&f).unwrap();
        assert!(
            !got.windows(bad_chunk.len())
                .any(|w| w == bad_chunk.as_slice()),
            "chunk: {} holds the corrupted chunk (keep.bin at {in_file})",
            f.display()
        );
    }
    flip(&pack, at, 0x5a);
    served(&store, work.path(), "chunk-restored", &expected);

    // (b) A byte inside the newest generation's root tree.
    let (_, rec) = record(&root, "ws", newest);
    let tree_pack = rec["root"]["pack"].as_str().unwrap().to_string();
    let tree_id = rec["root"]["id"].as_str().unwrap().to_string();
    let tree_off = rec["root"]["offset"].as_u64().unwrap();
    let tree_len = rec["root"]["len"].as_u64().unwrap();
    let tree_pack_path = pack_path(&root, &tree_pack);
    let tree_key = format!("packs/{}/{tree_pack}", &tree_pack[..2]);
    let at = tree_off + tree_len / 2;
    flip(&tree_pack_path, at, 0x01);
    let dest = refused(&store, work.path(), "tree", &[&tree_key, &tree_id]);
    let leaked: Vec<_> = all_files(&dest);
    assert!(
        leaked.is_empty(),
        "tree: a restore with an unreadable root tree wrote {leaked:?}"
    );
    flip(&tree_pack_path, at, 0x01);
    served(&store, work.path(), "tree-restored", &expected);

    // (c) A byte of the newest generation record's JSON line (a digit of its time, so the
    // text stays well formed and only the checksum can tell).
    let (gen_path, _) = record(&root, "ws", newest);
    let gen_key = format!("workspaces/ws/gens/{newest:020}");
    let text = std::fs::read(&gen_path).unwrap();
    let field = b"\"time_unix_ms\":";
    let at = text
        .windows(field.len())
        .position(|w| w == field)
        .expect("time_unix_ms in the record")
        + field.len()
        + 5;
    assert!(text[at].is_ascii_digit());
    flip(&gen_path, at as u64, 0x01);
    let dest = refused(&store, work.path(), "record", &[&gen_key]);
    let leaked: Vec<_> = all_files(&dest);
    assert!(
        leaked.is_empty(),
        "record: a restore of a corrupt generation wrote {leaked:?}"
    );
    flip(&gen_path, at as u64, 0x01);
    served(&store, work.path(), "record-restored", &expected);
}
