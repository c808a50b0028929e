//! The mixed workload: file writes of every size, renames, directory moves, truncates, hard
//! links, symlinks, fsyncs, SQLite transactions in WAL and rollback-journal mode, and `owsfs
//! sync`. A deterministic generator picks each operation from a seed and the model, so the
//! checker can replay the same sequence; the workload (a child process) runs it against the
//! mount and logs what completed.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{DbRows, InFlight, Model, Node, bytes};

/// What shapes a workload; the checker needs the same to replay it.
#[derive(Clone, Debug)]
pub struct Cfg {
    pub seed: u64,
    /// The largest "big" write, in bytes.
    pub max_big: usize,
    /// Relative weight of `owsfs sync` among the operations (0: never).
    pub sync_weight: u32,
}

/// One operation of the workload.
#[derive(Clone, Debug)]
pub enum Op {
    /// open(O_CREAT|O_TRUNC), write, close; with fsync before the close when `fsync`.
    Create {
        path: String,
        len: usize,
        seed: u64,
        fsync: bool,
    },
    Pwrite {
        path: String,
        off: u64,
        len: usize,
        seed: u64,
        fsync: bool,
    },
    Append {
        path: String,
        len: usize,
        seed: u64,
    },
    Truncate {
        path: String,
        len: u64,
    },
    Rename {
        from: String,
        to: String,
    },
    Mkdir {
        path: String,
    },
    MoveDir {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Link {
        from: String,
        to: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    /// One transaction: `rows` rows inserted under this operation's index, and the rows of
    /// an older transaction deleted; a checkpoint after it when `checkpoint` (WAL only).
    Sql {
        db: String,
        wal: bool,
        rows: u64,
        seed: u64,
        delete: Option<u64>,
        checkpoint: bool,
    },
    /// `owsfs sync`: everything completed before it must survive from here on.
    Sync,
}

/// The two databases: one in WAL mode, one in rollback-journal (DELETE) mode.
const DBS: [(&str, bool); 2] = [("db0.sqlite", true), ("db1.sqlite", false)];

/// The value lengths of a transaction's rows.
fn row_lens(seed: u64, rows: u64) -> impl Iterator<Item = usize> {
    (0..rows).map(move |i| 16 + ((seed.wrapping_add(i * 7919)) % 1500) as usize)
}

/// The deterministic generator of operations.
pub struct Gen {
    rng: StdRng,
    cfg: Cfg,
    /// Index of the next operation.
    pub index: u64,
}

impl Gen {
    pub fn new(cfg: &Cfg) -> Gen {
        Gen {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg: cfg.clone(),
            index: 0,
        }
    }

    fn new_name(&mut self, m: &Model, dir: &str, prefix: char) -> String {
        loop {
            let n = self.rng.gen_range(0..400);
            let p = if dir.is_empty() {
                format!("{prefix}{n}")
            } else {
                format!("{dir}/{prefix}{n}")
            };
            if !m.paths.contains_key(&p) {
                return p;
            }
        }
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        (!v.is_empty()).then(|| v[self.rng.gen_range(0..v.len())].clone())
    }

    fn small_len(&mut self) -> usize {
        match self.rng.gen_range(0..10) {
            0 => 0,
            1..=6 => self.rng.gen_range(1..4096),
            7 | 8 => self.rng.gen_range(4096..65536),
            _ => self.rng.gen_range(65536..262_144),
        }
    }

    /// The next operation, valid for the model `m` (the state after every operation before).
    pub fn next(&mut self, m: &Model) -> Op {
        let op = self.choose(m);
        self.index += 1;
        op
    }

    fn choose(&mut self, m: &Model) -> Op {
        let dirs: Vec<String> = std::iter::once(String::new())
            .chain(
                m.paths
                    .iter()
                    .filter(|(_, n)| **n == Node::Dir)
                    .map(|(p, _)| p.clone()),
            )
            .collect();
        let files: Vec<String> = m
            .paths
            .iter()
            .filter(|(p, n)| matches!(n, Node::File(_)) && !crate::model::is_sqlite(p))
            .map(|(p, _)| p.clone())
            .collect();
        let names: Vec<String> = m
            .paths
            .iter()
            .filter(|(p, n)| !matches!(n, Node::Dir) && !crate::model::is_sqlite(p))
            .map(|(p, _)| p.clone())
            .collect();
        let weights = [
            16,
            12,
            8,
            5,
            8,
            if dirs.len() < 12 { 5 } else { 0 },
            4,
            if files.len() > 40 { 14 } else { 5 },
            2,
            4,
            3,
            15,
            self.cfg.sync_weight,
            2,
        ];
        let total: u32 = weights.iter().sum();
        let mut r = self.rng.gen_range(0..total);
        let mut kind = 0;
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                kind = i;
                break;
            }
            r -= w;
        }
        let seed: u64 = self.rng.r#gen();
        let fsync = self.rng.gen_bool(0.3);
        let file = self.pick(&files);
        match (kind, file) {
            (1, Some(path)) => {
                let cur = m.file(&path).map_or(0, Vec::len) as u64;
                Op::Pwrite {
                    off: self.rng.gen_range(0..=cur + 4096),
                    len: self.small_len().max(1),
                    path,
                    seed,
                    fsync,
                }
            }
            (2, Some(path)) => Op::Append {
                len: self.small_len().max(1),
                path,
                seed,
            },
            (3, Some(path)) => {
                let cur = m.file(&path).map_or(0, Vec::len) as u64;
                Op::Truncate {
                    len: self.rng.gen_range(0..=cur + 8192),
                    path,
                }
            }
            (4, _) if !names.is_empty() => {
                let from = self.pick(&names).expect("names");
                // Never over another name of the same inode: rename(2) then does nothing.
                let aliases = m.aliases(&from);
                let to = if self.rng.gen_bool(0.3) {
                    self.pick(&names).filter(|t| !aliases.contains(t))
                } else {
                    None
                };
                let to = match to {
                    Some(t) => t,
                    None => {
                        let d = self.pick(&dirs).expect("dirs");
                        self.new_name(m, &d, 'f')
                    }
                };
                Op::Rename { from, to }
            }
            (5, _) => {
                let d = self.pick(&dirs).expect("dirs");
                Op::Mkdir {
                    path: self.new_name(m, &d, 'd'),
                }
            }
            (6, _) if dirs.len() > 1 => {
                let from = self.pick(&dirs[1..]).expect("dirs");
                let inside = format!("{from}/");
                let targets: Vec<String> = dirs
                    .iter()
                    .filter(|d| **d != from && !d.starts_with(&inside))
                    .cloned()
                    .collect();
                let d = self.pick(&targets).expect("the root is a target");
                Op::MoveDir {
                    from,
                    to: self.new_name(m, &d, 'd'),
                }
            }
            (7, _) if !names.is_empty() => Op::Unlink {
                path: self.pick(&names).expect("names"),
            },
            (8, _) => {
                let empty: Vec<String> = dirs[1..]
                    .iter()
                    .filter(|d| m.children(d).next().is_none())
                    .cloned()
                    .collect();
                match self.pick(&empty) {
                    Some(path) => Op::Rmdir { path },
                    None => self.create(m, &dirs, seed, fsync),
                }
            }
            (9, Some(from)) => {
                let d = self.pick(&dirs).expect("dirs");
                Op::Link {
                    from,
                    to: self.new_name(m, &d, 'f'),
                }
            }
            (10, _) => {
                let d = self.pick(&dirs).expect("dirs");
                Op::Symlink {
                    target: format!("../target/{}", self.rng.gen_range(0..1000)),
                    path: self.new_name(m, &d, 'l'),
                }
            }
            (11, _) => {
                let (db, wal) = DBS[self.rng.gen_range(0..DBS.len())];
                let committed: Vec<u64> = m
                    .dbs
                    .get(db)
                    .map(|d| d.rows.keys().copied().collect())
                    .unwrap_or_default();
                let delete = if committed.len() > 3 && self.rng.gen_bool(0.4) {
                    self.pick(&committed)
                } else {
                    None
                };
                Op::Sql {
                    db: db.to_string(),
                    wal,
                    rows: match self.rng.gen_range(0..10) {
                        0 => 200 + self.rng.gen_range(0..800),
                        _ => self.rng.gen_range(1..20),
                    },
                    seed,
                    delete,
                    checkpoint: wal && self.rng.gen_bool(0.1),
                }
            }
            (12, _) => Op::Sync,
            (13, _) => {
                let d = self.pick(&dirs).expect("dirs");
                let len = self.rng.gen_range(self.cfg.max_big / 4..=self.cfg.max_big);
                Op::Create {
                    path: self.new_name(m, &d, 'f'),
                    len,
                    seed,
                    fsync,
                }
            }
            _ => self.create(m, &dirs, seed, fsync),
        }
    }

    /// A small file created, or a regular file overwritten.
    fn create(&mut self, m: &Model, dirs: &[String], seed: u64, fsync: bool) -> Op {
        let len = self.small_len();
        let files: Vec<String> = m
            .paths
            .iter()
            .filter(|(p, n)| matches!(n, Node::File(_)) && !crate::model::is_sqlite(p))
            .map(|(p, _)| p.clone())
            .collect();
        let path = match self.rng.gen_bool(0.3) {
            true if !files.is_empty() => self.pick(&files).expect("files"),
            _ => {
                let d = self.pick(dirs).expect("dirs");
                self.new_name(m, &d, 'f')
            }
        };
        Op::Create {
            path,
            len,
            seed,
            fsync,
        }
    }
}

/// The rows of a database after `op` (a [`Op::Sql`]) committed on top of `before`.
fn rows_after(before: Option<&DbRows>, index: u64, op: &Op) -> DbRows {
    let mut rows = before.cloned().unwrap_or_default();
    if let Op::Sql {
        rows: n,
        seed,
        delete,
        ..
    } = op
    {
        if let Some(d) = delete {
            rows.remove(d);
        }
        let total: usize = row_lens(*seed, *n).sum();
        rows.insert(index, (*n, total as u64));
    }
    rows
}

/// Applies operation number `index` to the model.
pub fn apply(m: &mut Model, index: u64, op: &Op) {
    match op {
        Op::Create {
            path, len, seed, ..
        } => m.create(path, bytes(*seed, *len)),
        Op::Pwrite {
            path,
            off,
            len,
            seed,
            ..
        } => {
            let d = m.data_mut(path);
            let end = *off as usize + len;
            if d.len() < end {
                d.resize(end, 0);
            }
            d[*off as usize..end].copy_from_slice(&bytes(*seed, *len));
        }
        Op::Append { path, len, seed } => m.data_mut(path).extend(bytes(*seed, *len)),
        Op::Truncate { path, len } => m.data_mut(path).resize(*len as usize, 0),
        Op::Rename { from, to } => m.rename(from, to),
        Op::Mkdir { path } => m.mkdir(path),
        Op::MoveDir { from, to } => m.move_dir(from, to),
        Op::Unlink { path } | Op::Rmdir { path } => m.remove(path),
        Op::Link { from, to } => m.link(from, to),
        Op::Symlink { target, path } => m.symlink(path, target),
        Op::Sql { db, wal, .. } => {
            let rows = rows_after(m.dbs.get(db).map(|d| &d.rows), index, op);
            let e = m.dbs.entry(db.clone()).or_default();
            e.wal = *wal;
            e.rows = rows;
        }
        Op::Sync => {}
    }
}

/// What operation number `index` may have left half done if it was cut short, given the
/// model before it.
pub fn in_flight(m: &Model, index: u64, op: &Op) -> InFlight {
    let mut f = InFlight::default();
    match op {
        Op::Create { path, .. }
        | Op::Pwrite { path, .. }
        | Op::Append { path, .. }
        | Op::Truncate { path, .. } => f.paths.extend(m.aliases(path)),
        Op::Rename { from, to } | Op::Link { from, to } => {
            f.paths.insert(from.clone());
            f.paths.insert(to.clone());
        }
        Op::MoveDir { from, to } => f.prefixes = vec![from.clone(), to.clone()],
        Op::Mkdir { path } | Op::Unlink { path } | Op::Rmdir { path } => {
            f.paths.insert(path.clone());
        }
        Op::Symlink { path, .. } => {
            f.paths.insert(path.clone());
        }
        Op::Sql { db, .. } => {
            f.db = Some((
                db.clone(),
                rows_after(m.dbs.get(db).map(|d| &d.rows), index, op),
            ));
        }
        Op::Sync => {}
    }
    f
}

/// The workload's side: runs operations against the mount until `max_ops` completed or one
/// fails, appending `done N` (N operations completed) and `synced N` (an `owsfs sync`
/// succeeded after N operations) to `log`.
pub struct Runner {
    pub mount: PathBuf,
    pub owsfs: PathBuf,
    pub log: PathBuf,
    pub cfg: Cfg,
    pub max_ops: u64,
    /// Pause between operations: up to this long, at random.
    pub pause: Duration,
}

impl Runner {
    pub fn run(&self) -> Result<()> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let mut gen_ = Gen::new(&self.cfg);
        let mut pauses = StdRng::seed_from_u64(self.cfg.seed ^ 0x5eed);
        let mut m = Model::new();
        let mut dbs: HashMap<String, rusqlite::Connection> = HashMap::new();
        while gen_.index < self.max_ops {
            let index = gen_.index;
            let op = gen_.next(&m);
            if let Op::Sync = op {
                let out = Command::new(&self.owsfs)
                    .arg("sync")
                    .arg(&self.mount)
                    .output()
                    .context("run owsfs sync")?;
                if out.status.success() {
                    writeln!(log, "synced {index}")?;
                } else {
                    let why = String::from_utf8_lossy(&out.stderr).replace('\n', " ");
                    writeln!(log, "sync-failed {index} {}", why.trim())?;
                }
            } else {
                self.exec(&op, index, &mut dbs)
                    .with_context(|| format!("operation {index} ({op:?})"))?;
            }
            apply(&mut m, index, &op);
            writeln!(log, "done {}", index + 1)?;
            if !self.pause.is_zero() {
                let us = pauses.gen_range(0..=self.pause.as_micros() as u64);
                std::thread::sleep(Duration::from_micros(us));
            }
        }
        Ok(())
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mount.join(rel)
    }

    fn exec(
        &self,
        op: &Op,
        index: u64,
        dbs: &mut HashMap<String, rusqlite::Connection>,
    ) -> Result<()> {
        match op {
            Op::Create {
                path,
                len,
                seed,
                fsync,
            } => {
                let mut f = fs::File::create(self.path(path))?;
                f.write_all(&bytes(*seed, *len))?;
                if *fsync {
                    f.sync_all()?;
                }
            }
            Op::Pwrite {
                path,
                off,
                len,
                seed,
                fsync,
            } => {
                let f = OpenOptions::new().write(true).open(self.path(path))?;
                f.write_all_at(&bytes(*seed, *len), *off)?;
                if *fsync {
                    f.sync_data()?;
                }
            }
            Op::Append { path, len, seed } => {
                let mut f = OpenOptions::new().append(true).open(self.path(path))?;
                f.write_all(&bytes(*seed, *len))?;
            }
            Op::Truncate { path, len } => {
                OpenOptions::new()
                    .write(true)
                    .open(self.path(path))?
                    .set_len(*len)?;
            }
            Op::Rename { from, to } | Op::MoveDir { from, to } => {
                fs::rename(self.path(from), self.path(to))?
            }
            Op::Mkdir { path } => fs::create_dir(self.path(path))?,
            Op::Unlink { path } => fs::remove_file(self.path(path))?,
            Op::Rmdir { path } => fs::remove_dir(self.path(path))?,
            Op::Link { from, to } => fs::hard_link(self.path(from), self.path(to))?,
            Op::Symlink { target, path } => std::os::unix::fs::symlink(target, self.path(path))?,
            Op::Sql {
                db,
                wal,
                rows,
                seed,
                delete,
                checkpoint,
            } => {
                let conn = match dbs.entry(db.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(open_db(&self.path(db), *wal)?)
                    }
                };
                let r = transaction(conn, index, *rows, *seed, *delete, *checkpoint);
                if let Err(e) = r {
                    // SQLite reports any failed write(2) as an I/O error: say which errno.
                    // SAFETY: the handle is this open connection's; the call only reads it.
                    let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) };
                    bail!("{e} ({})", std::io::Error::from_raw_os_error(errno));
                }
            }
            Op::Sync => bail!("sync is run by the runner"),
        }
        Ok(())
    }
}

/// One transaction of [`Op::Sql`] on `conn`.
fn transaction(
    conn: &mut rusqlite::Connection,
    index: u64,
    rows: u64,
    seed: u64,
    delete: Option<u64>,
    checkpoint: bool,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    if let Some(d) = delete {
        tx.execute("DELETE FROM t WHERE txn = ?1", [d as i64])?;
    }
    {
        let mut ins = tx.prepare("INSERT INTO t (txn, i, v) VALUES (?1, ?2, ?3)")?;
        for (i, len) in row_lens(seed, rows).enumerate() {
            ins.execute(rusqlite::params![
                index as i64,
                i as i64,
                bytes(seed.wrapping_add(i as u64), len)
            ])?;
        }
    }
    tx.commit()?;
    if checkpoint {
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    Ok(())
}

fn open_db(path: &Path, wal: bool) -> Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(30))?;
    let mode = if wal { "WAL" } else { "DELETE" };
    c.query_row(&format!("PRAGMA journal_mode={mode}"), [], |_| Ok(()))?;
    c.execute_batch(if wal {
        "PRAGMA synchronous=NORMAL"
    } else {
        "PRAGMA synchronous=FULL"
    })?;
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS t (txn INTEGER NOT NULL, i INTEGER NOT NULL, v BLOB NOT NULL)",
    )?;
    Ok(c)
}

/// A database's contents as the checker compares them, read from a copy of its files (so
/// the tree under test is not changed): `Err` when it cannot be opened or fails
/// `integrity_check`.
pub fn read_db(dir: &Path, name: &str, scratch: &Path) -> std::result::Result<DbRows, String> {
    let copy = scratch.join("dbcheck");
    let _ = fs::remove_dir_all(&copy);
    fs::create_dir_all(&copy).map_err(|e| format!("mkdir {}: {e}", copy.display()))?;
    for suffix in ["", "-wal", "-journal"] {
        let src = dir.join(format!("{name}{suffix}"));
        if src.exists() {
            fs::copy(&src, copy.join(format!("{name}{suffix}")))
                .map_err(|e| format!("copy {}: {e}", src.display()))?;
        }
    }
    let run = || -> rusqlite::Result<std::result::Result<DbRows, String>> {
        let c = rusqlite::Connection::open(copy.join(name))?;
        let integrity: Vec<String> = c
            .prepare("PRAGMA integrity_check")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if integrity != ["ok"] {
            return Ok(Err(format!("integrity_check: {}", integrity.join("; "))));
        }
        let has_t: bool = c.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 't'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has_t {
            return Ok(Ok(DbRows::new()));
        }
        let rows = c
            .prepare("SELECT txn, count(*), sum(length(v)) FROM t GROUP BY txn")?
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    (r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
                ))
            })?
            .collect::<rusqlite::Result<DbRows>>()?;
        Ok(Ok(rows))
    };
    let r = run().unwrap_or_else(|e| Err(format!("sqlite: {e}")));
    let _ = fs::remove_dir_all(&copy);
    r
}

/// What the workload's log says: operations completed, and the count completed before the
/// last successful `owsfs sync`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub synced: u64,
    /// `owsfs sync` calls that succeeded, and that failed.
    pub syncs: u64,
    pub sync_failures: u64,
}

pub fn read_log(path: &Path) -> Result<Progress> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut p = Progress::default();
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("done", n)) => p.done = n.parse().context("done")?,
            Some(("synced", n)) => {
                p.synced = n.parse().context("synced")?;
                p.syncs += 1;
            }
            Some(("sync-failed", _)) => p.sync_failures += 1,
            _ => {}
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generator's operations are valid for its model, and two runs of one seed agree.
    #[test]
    fn generator_is_deterministic_and_valid() {
        let cfg = Cfg {
            seed: 42,
            max_big: 1 << 20,
            sync_weight: 3,
        };
        let run = || {
            let mut g = Gen::new(&cfg);
            let mut m = Model::new();
            let mut ops = Vec::new();
            for _ in 0..3000 {
                let i = g.index;
                let op = g.next(&m);
                apply(&mut m, i, &op);
                ops.push(format!("{op:?}"));
            }
            (ops, m.paths.len())
        };
        let (a, n) = run();
        assert_eq!(a, run().0);
        assert!(n > 10, "the tree stays tiny: {n}");
    }
}
