//! Concurrent namespace and data operations from several threads: the workspace stays
//! consistent with its backing directory, and the journal's dirty set covers every file that
//! changed, live and after replay.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;

/// A small deterministic generator, so a failure can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every regular file under `root`, by path, with its inode number and size.
fn files(root: &Path) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, (m.ino(), m.len()));
            }
        }
    }
    out
}

#[test]
fn concurrent_operations_keep_workspace_backing_and_journal_consistent() {
    if skip_fuse() {
        return;
    }
    // The dirty set is compared with everything changed since the mount: no cuts.
    let ws = Workspace::without_cuts(&[]);
    let dirs = ["a", "b", "c/d"];
    for d in dirs {
        std::fs::create_dir_all(ws.path(d)).unwrap();
    }
    let seed0: u64 = std::env::var("OWSFS_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_abcd);
    eprintln!("stress seed {seed0} (set OWSFS_STRESS_SEED to replay)");
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let ws = &ws;
            s.spawn(move || {
                let mut rng = Rng(seed0 ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                for _ in 0..600 {
                    let d1 = dirs[rng.below(3) as usize];
                    let d2 = dirs[rng.below(3) as usize];
                    let p1 = ws.path(&format!("{d1}/f{}", rng.below(12)));
                    let p2 = ws.path(&format!("{d2}/f{}", rng.below(12)));
                    // Races between threads make some operations fail (ENOENT, EEXIST):
                    // that is expected; what matters is the state afterwards.
                    let _ =
                        match rng.below(7) {
                            0 | 1 => std::fs::write(&p1, vec![t as u8; rng.below(20000) as usize]),
                            2 => std::fs::rename(&p1, &p2),
                            3 => std::fs::remove_file(&p1),
                            4 => std::fs::hard_link(&p1, &p2),
                            5 => std::fs::OpenOptions::new().append(true).open(&p1).and_then(
                                |mut f| {
                                    use std::io::Write;
                                    f.write_all(b"appended")
                                },
                            ),
                            _ => std::fs::File::options()
                                .write(true)
                                .open(&p1)
                                .and_then(|f| f.set_len(rng.below(5000))),
                        };
                }
            });
        }
    });

    // The workspace shows exactly the backing directory.
    let seen = files(&ws.mp);
    let backing = files(&ws.cache.join("backing"));
    assert_eq!(seen, backing, "mount view and backing directory differ");
    assert!(!seen.is_empty());

    // Every file that exists was created in this window, so each is dirty, by inode number.
    let check = |v: &serde_json::Value, when: &str| {
        let dirty: BTreeSet<u64> = v["files"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.parse().unwrap())
            .collect();
        for (path, (ino, _)) in &backing {
            assert!(dirty.contains(ino), "{when}: {path} (ino {ino}) not dirty");
        }
        let dirs: BTreeSet<&str> = v["dirs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d.as_str())
            .collect();
        for d in ["", "a", "b", "c", "c/d"] {
            assert!(dirs.contains(d), "{when}: directory {d:?} not dirty");
        }
    };
    let live = ws.status_json(true)["dirty"].clone();
    check(&live, "live");
    // A clean unmount would commit a last generation and leave nothing dirty: replay is
    // checked after a kill -9 instead.
    ws.kill_daemon();
    ws.mount();
    let replayed = ws.status_json(true)["dirty"].clone();
    assert_eq!(live, replayed, "replay rebuilds the same dirty state");
    check(&replayed, "replayed");
    assert_eq!(files(&ws.mp), backing, "after remount");
}

/// Each inode the kernel caches holds a descriptor in the daemon, so their number is bounded
/// by the daemon's open file limit (20,000 on these machines, which lack CAP_SYS_RESOURCE to
/// raise it) or by `-o max_inodes`. Near the bound the daemon asks the kernel to forget the
/// least recently used names, so far more files than the bound work.
#[test]
fn many_more_files_than_the_inode_budget() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(&["max_inodes=1000"]);
    std::fs::create_dir(ws.path("many")).unwrap();
    // A process working in the directory while the daemon sheds names keeps a valid cwd.
    let worker = std::process::Command::new("sh")
        .args(["-c", "sleep 2; /bin/pwd -P"])
        .current_dir(ws.path("many"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let n = 3000;
    for i in 0..n {
        std::fs::write(ws.path(&format!("many/f{i}")), i.to_string()).unwrap();
    }
    let out = worker.wait_with_output().unwrap();
    assert!(out.status.success(), "getcwd in the workspace still works");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        ws.path("many").to_string_lossy()
    );
    for i in 0..n {
        let got = std::fs::read_to_string(ws.path(&format!("many/f{i}"))).unwrap();
        assert_eq!(got, i.to_string());
    }
    assert_eq!(std::fs::read_dir(ws.path("many")).unwrap().count(), n);
    let v = ws.status_json(false);
    assert_eq!(v["inode_budget"], 1000);
    assert!(v["inodes"].as_u64().unwrap() <= 1000, "{}", v["inodes"]);
}

/// Inodes kept busy by open files cannot be forgotten: past the bound, new names fail with
/// ENFILE rather than starving the daemon; files already open keep working, the daemon still
/// answers, and once the files are closed there is room again.
#[test]
fn open_files_beyond_the_inode_budget_fail_with_enfile() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(&["max_inodes=200"]);
    std::fs::create_dir(ws.path("open")).unwrap();
    // Names made (and closed) before the bound is reached.
    for i in 0..300 {
        std::fs::write(ws.path(&format!("open/x{i}")), b"x").unwrap();
    }
    let mut files = Vec::new();
    let mut refused = None;
    for i in 0..400 {
        match std::fs::File::create(ws.path(&format!("open/f{i}"))) {
            Ok(f) => files.push(f),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("the bound is reached");
    assert_eq!(e.raw_os_error(), Some(libc::ENFILE), "{e}");
    // A listing at the bound names every file, also those it has no room to look up.
    let listed = std::fs::read_dir(ws.path("open")).unwrap().count();
    assert_eq!(listed, 300 + files.len(), "a listing at the bound");
    use std::io::Write;
    files[0].write_all(b"still writable").unwrap();
    assert_eq!(ws.status_json(false)["inode_budget"], 200);
    drop(files);
    assert!(
        wait_for(std::time::Duration::from_secs(10), || {
            std::fs::File::create(ws.path("open/after")).is_ok()
        }),
        "new names work once the files are closed"
    );
    assert_eq!(
        std::fs::read(ws.path("open/f0")).unwrap(),
        b"still writable"
    );
}
