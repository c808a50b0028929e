//! Scenario 6: bad input. A mutation fuzzer that builds on stable Rust: each target starts
//! from valid encodings (made by the crates' own encoders, or by SQLite), mutates them (bit
//! flips, byte stores, insertions, deletions, truncations, splices, repeated ranges, random
//! bytes) and feeds them to a parser. A parser must return, with a value or an error; a panic
//! fails the run, and the input that caused it is saved. The CLI target runs the `owsfs`
//! binary with malformed arguments: it must exit with an error, never panic.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Broken;

/// The targets, in the order they run.
pub const TARGETS: &[&str] = &[
    "journal",
    "tree",
    "list",
    "generation",
    "lease",
    "wal",
    "url",
    "cli",
];

/// What one target did.
pub struct Outcome {
    pub target: &'static str,
    pub runs: u64,
    pub elapsed: Duration,
    /// Inputs the parser accepted (the rest got an error).
    pub accepted: u64,
}

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    let rounds = 1 + rng.gen_range(0..4);
    for _ in 0..rounds {
        let len = input.len();
        match rng.gen_range(0..9) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] = [0, 0xff, 0x7f, 0x80, b'\n', b'"', b'0', b'9'][rng.gen_range(0..8)];
            }
            2 => {
                let i = rng.gen_range(0..=len);
                let n = rng.gen_range(1..16);
                for _ in 0..n {
                    input.insert(i, rng.r#gen());
                }
            }
            3 if len > 0 => {
                let i = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - i).min(64));
                input.drain(i..i + n);
            }
            4 if len > 0 => input.truncate(rng.gen_range(0..len)),
            5 => {
                // Splice: the head of this input, the tail of another seed.
                let other = &seeds[rng.gen_range(0..seeds.len())];
                let cut = rng.gen_range(0..=len);
                let from = rng.gen_range(0..=other.len());
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            6 if len > 1 => {
                // A range repeated (lengths and counts that lie).
                let i = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - i).min(32));
                let part = input[i..i + n].to_vec();
                let at = rng.gen_range(0..=len);
                input.splice(at..at, part);
            }
            7 if len >= 4 => {
                // A little-endian integer field set to an edge value.
                let i = rng.gen_range(0..len - 3);
                let v: u32 = [0, 1, u32::MAX, 0x8000_0000, 4096, 65536][rng.gen_range(0..6)];
                input[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                let n = rng.gen_range(0..64);
                *input = (0..n).map(|_| rng.r#gen()).collect();
            }
        }
    }
}

/// Runs `parse` on mutated inputs for `budget`. `Ok(true)` when it accepted an input.
fn run_bytes(
    target: &'static str,
    seeds: Vec<Vec<u8>>,
    budget: Duration,
    seed: u64,
    crashes: &Path,
    mut parse: impl FnMut(&[u8]) -> bool,
) -> Result<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let (mut runs, mut accepted) = (0, 0);
    // Seeds must parse: a target whose seeds fail tests nothing but the first check.
    for (i, s) in seeds.iter().enumerate() {
        if !parse(s) {
            bail!("fuzz target {target}: seed {i} does not parse");
        }
    }
    while start.elapsed() < budget {
        let mut input = seeds[rng.gen_range(0..seeds.len())].clone();
        mutate(&mut rng, &seeds, &mut input);
        runs += 1;
        match std::panic::catch_unwind(AssertUnwindSafe(|| parse(&input))) {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(_) => {
                std::fs::create_dir_all(crashes)?;
                let file = crashes.join(format!("{target}-{runs}.bin"));
                std::fs::write(&file, &input)?;
                return Err(Broken(format!(
                    "fuzz target {target}: the parser panicked on input {} ({} bytes)",
                    file.display(),
                    input.len()
                ))
                .into());
            }
        }
    }
    Ok(Outcome {
        target,
        runs,
        elapsed: start.elapsed(),
        accepted,
    })
}

/// Runs every target in `targets` for `budget` each.
pub fn run(
    targets: &[String],
    budget: Duration,
    seed: u64,
    owsfs: &Path,
    work: &Path,
) -> Result<Vec<Outcome>> {
    // Panics are expected to be caught here; their default report would flood the output.
    std::panic::set_hook(Box::new(|_| {}));
    let crashes = work.join("fuzz-crashes");
    let mut out = Vec::new();
    for (i, &t) in TARGETS.iter().enumerate() {
        if !targets.iter().any(|x| x == t || x == "all") {
            continue;
        }
        let s = seed ^ (i as u64) << 32;
        let o = match t {
            "journal" => journal(budget, s, &crashes, work)?,
            "tree" => run_bytes(t, tree_seeds()?, budget, s, &crashes, |b| {
                owsfs_store::Tree::decode("fuzz", b).is_ok()
            })?,
            "list" => run_bytes(t, list_seeds()?, budget, s, &crashes, |b| {
                owsfs_store::tree::decode_list("fuzz", b).is_ok()
            })?,
            "generation" => run_bytes(t, generation_seeds()?, budget, s, &crashes, |b| {
                owsfs_store::generation::GenerationRecord::unseal("fuzz", b).is_ok()
            })?,
            "lease" => run_bytes(t, lease_seeds()?, budget, s, &crashes, |b| {
                owsfs_store::lease::LeaseRecord::unseal("fuzz", b).is_ok()
            })?,
            "wal" => run_bytes(t, wal_seeds(work)?, budget, s, &crashes, |b| {
                let a = owsfs_sync::wal::parse(b).is_some();
                let d = owsfs_sync::wal::db_pages(b).is_some();
                a || d
            })?,
            "url" => run_bytes(t, url_seeds(), budget, s, &crashes, |b| {
                owsfs_store::url::StoreUrl::parse(&String::from_utf8_lossy(b)).is_ok()
            })?,
            _ => cli(budget, s, owsfs, work)?,
        };
        out.push(o);
    }
    let _ = std::panic::take_hook();
    Ok(out)
}

/// Journal segments as a crash or a disk leaves them: a directory with one segment, opened
/// by `Journal::inspect` (header, framing, record payloads, snapshots).
fn journal(budget: Duration, seed: u64, crashes: &Path, work: &Path) -> Result<Outcome> {
    use owsfs_journal::{Journal, JournalOptions, NodeKind, Op};
    let dir = work.join("fuzz-journal");
    let _ = std::fs::remove_dir_all(&dir);
    let (jdir, backing) = (dir.join("journal"), dir.join("backing"));
    std::fs::create_dir_all(&backing)?;
    let (j, _) = Journal::open(&jdir, &backing, JournalOptions::default())?;
    let ino = owsfs_journal::FuseIno(7);
    for op in [
        Op::Create {
            ino,
            kind: NodeKind::File,
            path: "d/a".into(),
        },
        Op::Write {
            ino,
            offset: 4096,
            len: 100,
        },
        Op::Rename {
            from: "d".into(),
            to: "e".into(),
            exchange: false,
        },
        Op::Truncate { ino, size: 9 },
        Op::Meta {
            ino,
            dir: Some("e".into()),
        },
        Op::Unplace { ino },
    ] {
        j.append(op)?;
    }
    drop(j);
    let seg = std::fs::read_dir(&jdir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .context("no segment written")?;
    let name = seg.file_name().expect("name").to_owned();
    let seeds = vec![std::fs::read(&seg)?];
    let probe = dir.join("probe");
    std::fs::create_dir_all(&probe)?;
    let r = run_bytes("journal", seeds, budget, seed, crashes, |b| {
        let _ = std::fs::remove_file(probe.join("CLEAN"));
        std::fs::write(probe.join(&name), b).expect("write the probe segment");
        Journal::inspect(&probe).is_ok_and(|(_, rec)| rec.rescan.is_none())
    });
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn tree_seeds() -> Result<Vec<Vec<u8>>> {
    use owsfs_store::{Content, NodeKind, Tree, TreeEntry, tree::FileContent};
    let e = |name: &str, kind: NodeKind, size: u64, content: Content| TreeEntry {
        name: name.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
        size,
        rdev: 0,
        link_key: 0,
        xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
        content,
    };
    let t = Tree {
        entries: vec![
            e("a", NodeKind::File, 0, Content::File(FileContent::Empty)),
            e("fifo", NodeKind::Fifo, 0, Content::None),
            e(
                "l",
                NodeKind::Symlink,
                6,
                Content::Symlink(b"target".to_vec()),
            ),
        ],
    };
    Ok(vec![t.encode()?, Tree::default().encode()?])
}

fn list_seeds() -> Result<Vec<Vec<u8>>> {
    // A list blob of a real chunked file: built through the store's own file-content path.
    // Plain refs (a version 1 list) and compressed ones (version 2).
    let refs: Vec<owsfs_store::pack::BlobRef> = (0..3u8)
        .map(|i| {
            owsfs_store::pack::BlobRef::plain(
                owsfs_store::ids::BlobId::of(&[i]),
                owsfs_store::ids::PackId([i; 32]),
                40 + 1000 * u64::from(i),
                1000 + u32::from(i),
            )
        })
        .collect();
    let packed: Vec<_> = refs
        .iter()
        .map(|r| owsfs_store::pack::BlobRef {
            stored: r.len / 3,
            codec: owsfs_store::Codec::Zstd,
            ..*r
        })
        .collect();
    Ok(vec![
        owsfs_store::tree::encode_list(&refs),
        owsfs_store::tree::encode_list(&packed),
    ])
}

fn generation_seeds() -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for json in [
        r#"{"workspace":"w","number":3,"parent":2,"epoch":1,"kind":"fence","time_unix_ms":1700000000000,"root":null}"#,
        r#"{"workspace":"w","number":4,"parent":3,"epoch":2,"kind":"fence","time_unix_ms":1,"root":null,"sqlite":[],"stats":{}}"#,
    ] {
        let r: owsfs_store::generation::GenerationRecord =
            serde_json::from_str(json).context("generation seed")?;
        out.push(r.seal()?.to_vec());
    }
    Ok(out)
}

fn lease_seeds() -> Result<Vec<Vec<u8>>> {
    let json = r#"{"workspace":"w","seq":12,"epoch":3,"state":"held","holder":{"node":"0123456789abcdef","host":"vm","pid":123,"session":"fedcba9876543210","cache":"b:/c#1:2"},"ttl_ms":10000,"time_unix_ms":1}"#;
    let r: owsfs_store::lease::LeaseRecord = serde_json::from_str(json).context("lease seed")?;
    let mut released = r.clone();
    released.state = owsfs_store::lease::LeaseState::Released;
    Ok(vec![r.seal()?.to_vec(), released.seal()?.to_vec()])
}

/// A WAL and a database header written by SQLite itself.
fn wal_seeds(work: &Path) -> Result<Vec<Vec<u8>>> {
    let dir = work.join("fuzz-wal");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("x.db");
    let c = rusqlite::Connection::open(&db)?;
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
    c.execute_batch("PRAGMA wal_autocheckpoint=0; CREATE TABLE t (v BLOB);")?;
    for i in 0..20 {
        c.execute("INSERT INTO t VALUES (?1)", [vec![i as u8; 3000]])?;
    }
    let wal = std::fs::read(dir.join("x.db-wal"))?;
    let head = std::fs::read(&db)?;
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(vec![wal, head[..head.len().min(4096)].to_vec()])
}

fn url_seeds() -> Vec<Vec<u8>> {
    [
        "file:///var/lib/owsfs/store",
        "s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1",
        "s3://b",
        "memory://",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// The CLI with malformed arguments: every run ends with an error (or help), never a panic,
/// a signal or a hang. Paths are under a scratch directory and do not exist, so nothing is
/// mounted or written elsewhere.
fn cli(budget: Duration, seed: u64, owsfs: &Path, work: &Path) -> Result<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let scratch = work.join("fuzz-cli");
    std::fs::create_dir_all(&scratch)?;
    let missing: PathBuf = scratch.join("missing");
    let words: Vec<String> = [
        "mount",
        "unmount",
        "status",
        "sync",
        "log",
        "restore",
        "recover",
        "snapshot",
        "fork",
        "diff",
        "export",
        "drill",
        "gc",
        "retention",
        "copy",
        "rollback",
        "template",
        "journal",
        "handoff",
        "run",
        "--store",
        "--workspace",
        "--cache",
        "--at",
        "--generation",
        "--json",
        "--commit-interval",
        "--max-lag",
        "--max-lag-bytes",
        "--lease-ttl",
        "--grace",
        "--keep-all",
        "--hourly",
        "--daily",
        "--max-unused",
        "--repack-budget",
        "-o",
        "--as",
        "--read-only",
        "--steal",
        "--force",
        "--dry-run",
        "create",
        "delete",
        "list",
        "mark",
        "1s",
        "0",
        "-1",
        "1x",
        "99999999999999999999d",
        "10%",
        "200%",
        "12QB",
        "1GiB",
        "",
        " ",
        "HEAD",
        "@",
        "w@",
        "@@3",
        "10m ago",
        "2026-13-45T99:99:99Z",
        "s3://",
        "file://",
        "file://relative",
        "s3://b?endpoint=",
        "memory://",
        "ro,rw",
        "threads=0",
        "max_write=1",
        "attr_timeout=-5",
        "passthrough=maybe",
        "\u{fffd}",
        "--",
        "-",
        "--help",
        "--version",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let start = Instant::now();
    let (mut runs, mut accepted) = (0, 0);
    while start.elapsed() < budget {
        let n = rng.gen_range(1..7);
        let mut args: Vec<String> = (0..n)
            .map(|_| match rng.gen_range(0..8) {
                0 => missing
                    .join(format!("p{}", rng.gen_range(0..9)))
                    .display()
                    .to_string(),
                1 => (0..rng.gen_range(0..12))
                    .map(|_| char::from(rng.gen_range(0x20u8..0x7f)))
                    .collect(),
                _ => words[rng.gen_range(0..words.len())].clone(),
            })
            .collect();
        if rng.gen_bool(0.7) {
            args.insert(0, words[rng.gen_range(0..20)].clone());
        }
        let mut child = std::process::Command::new(owsfs)
            .args(&args)
            .env("XDG_DATA_HOME", scratch.join("data"))
            .env("XDG_CACHE_HOME", scratch.join("cache"))
            .env("XDG_CONFIG_HOME", scratch.join("config"))
            .env(
                "OWSFS_STORE",
                format!("file://{}", scratch.join("store").display()),
            )
            .current_dir(&scratch)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Broken(format!("owsfs {args:?} hung (killed after 20 s)")).into());
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read as _;
            let _ = e.read_to_string(&mut err);
        }
        runs += 1;
        if err.contains("panicked") || status.code() == Some(101) || status.code().is_none() {
            return Err(Broken(format!(
                "owsfs {args:?} crashed ({status}): {}",
                err.lines().take(5).collect::<Vec<_>>().join(" | ")
            ))
            .into());
        }
        if status.success() {
            accepted += 1;
        }
    }
    // Whatever a run left (a store, caches) goes with the scratch directory.
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(Outcome {
        target: "cli",
        runs,
        elapsed: start.elapsed(),
        accepted,
    })
}
