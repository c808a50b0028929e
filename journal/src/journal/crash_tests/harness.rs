//! The harness of the crash tests: a child process that dies at a fail point, a workload
//! that changes a backing directory the way the daemon does, and the check that a dirty
//! state covers every change made to the backing directory since a base.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::journal::*;
use crate::op::NodeKind;
use crate::record::Record;

pub(super) const BOOT_A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
pub(super) const BOOT_B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

pub(super) fn opts(boot: &str, segment_bytes: u64) -> JournalOptions {
    JournalOptions {
        segment_bytes,
        boot_id: Some(boot.to_owned()),
        ..JournalOptions::default()
    }
}

pub(super) fn big(boot: &str) -> JournalOptions {
    opts(boot, 64 << 20)
}

// ---- The child process and its crash ------------------------------------------------------

/// In the child: the directory of the case.
const CASE_ENV: &str = "OWSFS_JOURNAL_CRASH_CASE";

/// Whether the fail point kills the child when reached: the workload arms it once it is
/// where it wants the crash, so earlier passes through the same point go on.
static ARMED: AtomicBool = AtomicBool::new(false);

pub(super) fn arm() {
    ARMED.store(true, Ordering::SeqCst);
}

/// The files of one crash case: the journal, the backing directory, what the workload
/// completed and what it saw.
pub(super) struct Case {
    pub(super) dir: PathBuf,
}

impl Case {
    pub(super) fn journal(&self) -> PathBuf {
        self.dir.join("journal")
    }

    pub(super) fn backing(&self) -> PathBuf {
        self.dir.join("backing")
    }

    /// The seqs of the records whose `append` returned and whose operation the workload
    /// then performed, one a line.
    pub(super) fn done(&self) -> Vec<Seq> {
        fs::read_to_string(self.dir.join("done"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    }

    pub(super) fn open(&self, opts: JournalOptions) -> (Journal, Recovery) {
        Journal::open(&self.journal(), &self.backing(), opts).unwrap()
    }

    /// The dirty state the workload saw last (see [`Case::expect`]).
    pub(super) fn expected(&self) -> DirtyState {
        let bytes = fs::read(self.dir.join("expected")).unwrap();
        match record::read_frame(&bytes, 0) {
            Ok((_, Record::Snapshot(state), _)) => state,
            other => panic!("expected state: {other:?}"),
        }
    }

    /// In the child: records `state` as the one a reopen must give.
    pub(super) fn expect(&self, state: &DirtyState) {
        let mut bytes = Vec::new();
        record::encode_snapshot(&mut bytes, 0, state).unwrap();
        fs::write(self.dir.join("expected"), bytes).unwrap();
    }

    /// The backing directory when the dirty state was last empty: at a commit, or before the
    /// journal was created (empty).
    pub(super) fn base(&self) -> Tree {
        match fs::read(self.dir.join("base")) {
            Ok(b) => serde_json::from_slice(&b).unwrap(),
            Err(_) => {
                let root = Node {
                    dir: true,
                    ..Node::default()
                };
                Tree::from([(String::new(), root)])
            }
        }
    }

    /// In the child: the backing directory now is the base of later dirty states.
    pub(super) fn set_base(&self) {
        let tree = serde_json::to_vec(&tree(&self.backing())).unwrap();
        fs::write(self.dir.join("base"), tree).unwrap();
    }

    /// In the child: notes a number for the parent.
    pub(super) fn note(&self, name: &str, n: u64) {
        fs::write(self.dir.join(name), n.to_string()).unwrap();
    }

    pub(super) fn noted(&self, name: &str) -> u64 {
        fs::read_to_string(self.dir.join(name))
            .unwrap()
            .parse()
            .unwrap()
    }

    pub(super) fn segments(&self) -> Vec<u64> {
        segment::list_segments(&self.journal())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    pub(super) fn temporaries(&self) -> usize {
        fs::read_dir(self.journal())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".seg.tmp")
            })
            .count()
    }

    pub(super) fn clean_marker(&self) -> bool {
        self.journal().join(CLEAN_MARKER).exists()
    }
}

/// Runs the test `test` (a function of `crash_tests`) again in a child process, which calls
/// `workload` with the fail point `point` set to kill it once [`arm`]ed, and checks that it
/// died there. In the child this never returns: it dies, or exits with status 3 when the
/// workload ends without reaching the armed point (the parent then fails).
pub(super) fn crash(test: &str, point: &str, workload: impl FnOnce(&Case)) -> Case {
    if let Some(dir) = std::env::var_os(CASE_ENV) {
        fail::cfg_callback(point, || {
            if ARMED.load(Ordering::SeqCst) {
                let me = rustix::process::getpid();
                let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
                // Not reached: a SIGKILL sent to oneself is delivered before kill returns.
                std::process::abort();
            }
        })
        .unwrap();
        workload(&Case { dir: dir.into() });
        std::process::exit(3);
    }
    let dir = tempfile::tempdir().unwrap().keep();
    fs::create_dir(dir.join("backing")).unwrap();
    // The tests are in the parent module; libtest names them without the crate.
    let module = module_path!().split_once("::").unwrap().1;
    let module = module.rsplit_once("::").unwrap().0;
    let spawning = SPAWNING.write();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([&format!("{module}::{test}"), "--exact", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CASE_ENV, &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the child says something (libtest's "running 1 test"), it runs its own program
    // and holds no descriptor of ours any more.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0; 1];
    let n = stdout.read(&mut first).unwrap();
    drop(spawning);
    child.stdout = Some(stdout);
    let mut out = child.wait_with_output().unwrap();
    out.stdout.splice(0..0, first[..n].iter().copied());
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{test}: the child did not die at {point} ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Case { dir }
}

impl Drop for Case {
    fn drop(&mut self) {
        if std::env::var_os(CASE_ENV).is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---- A daemon's operations on the backing directory -----------------------------------------

/// Performs operations on the backing directory the way the daemon does: the record first,
/// the operation only once `append` returned, then the seq goes to the case's `done` list.
pub(super) struct Daemon<'a> {
    j: &'a Journal,
    root: PathBuf,
    done: File,
    /// Regular files, by path, for the workload to pick from.
    pub(super) files: Mutex<BTreeSet<PathBuf>>,
}

/// The directories the workload spreads its files over ("" is the root).
pub(super) const DIRS: [&str; 4] = ["", "a", "a/b", "c"];

impl<'a> Daemon<'a> {
    pub(super) fn new(j: &'a Journal, case: &Case) -> Daemon<'a> {
        let files = tree(&case.backing())
            .into_iter()
            .filter(|(_, n)| !n.dir)
            .map(|(p, _)| PathBuf::from(p))
            .collect();
        Daemon {
            j,
            root: case.backing(),
            done: OpenOptions::new()
                .create(true)
                .append(true)
                .open(case.dir.join("done"))
                .unwrap(),
            files: Mutex::new(files),
        }
    }

    pub(super) fn ino(&self, rel: &Path) -> Ino {
        crate::FuseIno(fs::symlink_metadata(self.root.join(rel)).unwrap().ino())
    }

    pub(super) fn completed(&self, seq: Seq) -> Seq {
        writeln!(&self.done, "{seq}").unwrap();
        seq
    }

    /// Makes the workload's directories (those missing).
    pub(super) fn dirs(&self) {
        for d in &DIRS[1..] {
            if !self.root.join(d).exists() {
                self.make(Path::new(d), NodeKind::Dir, |p| fs::create_dir(p).unwrap());
            }
        }
    }

    /// As the daemon makes a node: its parent marked, the node made, then its record.
    pub(super) fn make(&self, rel: &Path, kind: NodeKind, make: impl FnOnce(&Path)) -> Seq {
        let parent = rel.parent().unwrap();
        let ino = self.ino(parent);
        let seq = self
            .j
            .append(Op::Meta {
                ino,
                dir: Some(parent.to_path_buf()),
            })
            .unwrap();
        self.completed(seq);
        make(&self.root.join(rel));
        let ino = self.ino(rel);
        let seq = self.j.append(Op::Create {
            ino,
            kind,
            path: rel.to_path_buf(),
        });
        self.completed(seq.unwrap())
    }

    pub(super) fn create(&self, rel: &Path, data: &[u8]) {
        self.make(rel, NodeKind::File, |p| {
            File::create(p).unwrap();
        });
        self.files.lock().insert(rel.to_path_buf());
        self.write(rel, 0, data);
    }

    pub(super) fn write(&self, rel: &Path, offset: u64, data: &[u8]) -> Seq {
        let ino = self.ino(rel);
        let op = Op::Write {
            ino,
            offset,
            len: data.len() as u64,
        };
        let seq = self
            .j
            .append_file_op(ino, || Some(rel.to_path_buf()), op)
            .unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(self.root.join(rel))
            .unwrap();
        f.write_all_at(data, offset).unwrap();
        self.completed(seq)
    }

    pub(super) fn truncate(&self, rel: &Path, size: u64) {
        let ino = self.ino(rel);
        let op = Op::Truncate { ino, size };
        let seq = self.j.append_file_op(ino, || Some(rel.to_path_buf()), op);
        let f = OpenOptions::new()
            .write(true)
            .open(self.root.join(rel))
            .unwrap();
        f.set_len(size).unwrap();
        self.completed(seq.unwrap());
    }

    pub(super) fn rename(&self, from: &Path, to: &Path) {
        let op = Op::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            exchange: false,
        };
        let seq = self.j.append(op).unwrap();
        fs::rename(self.root.join(from), self.root.join(to)).unwrap();
        let mut files = self.files.lock();
        files.remove(from);
        files.insert(to.to_path_buf());
        self.completed(seq);
    }

    pub(super) fn unlink(&self, rel: &Path) {
        let op = Op::Remove {
            ino: self.ino(rel),
            path: rel.to_path_buf(),
            dir: false,
        };
        let seq = self.j.append(op).unwrap();
        fs::remove_file(self.root.join(rel)).unwrap();
        self.files.lock().remove(rel);
        self.completed(seq);
    }

    pub(super) fn link(&self, from: &Path, to: &Path) {
        let op = Op::Link {
            ino: self.ino(from),
            path: to.to_path_buf(),
        };
        let seq = self.j.append(op).unwrap();
        fs::hard_link(self.root.join(from), self.root.join(to)).unwrap();
        self.files.lock().insert(to.to_path_buf());
        self.completed(seq);
    }

    /// Step `i` of a deterministic workload of creations, writes, truncations, renames,
    /// unlinks and hard links over [`DIRS`].
    pub(super) fn step(&self, i: u64) {
        let files: Vec<PathBuf> = self.files.lock().iter().cloned().collect();
        let dir = |k: u64| Path::new(DIRS[((i + k) % 4) as usize]);
        if files.len() < 4 || i.is_multiple_of(6) {
            let len = 20 + (i * 37) % 700;
            self.create(&dir(0).join(format!("f{i}")), &noise(len, i));
            return;
        }
        let pick = &files[(i * 7) as usize % files.len()];
        match i % 6 {
            1 | 2 => {
                self.write(pick, (i * 13) % 500, &noise(1 + i % 90, i));
            }
            3 => self.truncate(pick, (i * 11) % 300),
            4 if i.is_multiple_of(4) => self.unlink(pick),
            4 => self.rename(pick, &dir(1).join(format!("r{i}"))),
            _ => self.link(pick, &dir(2).join(format!("l{i}"))),
        }
    }

    pub(super) fn steps(&self, range: std::ops::Range<u64>) {
        for i in range {
            self.step(i);
        }
    }
}

/// Deterministic bytes.
pub(super) fn noise(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

// ---- Checking a recovery against the backing directory --------------------------------------

/// A node of the backing directory: a directory's names, a file's bytes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Node {
    ino: Ino,
    dir: bool,
    bytes: Vec<u8>,
    names: BTreeSet<String>,
}

/// The backing directory by relative path ("" is the root).
pub(super) type Tree = BTreeMap<String, Node>;

pub(super) fn tree(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let md = fs::symlink_metadata(&abs).unwrap();
        let mut node = Node {
            ino: crate::FuseIno(md.ino()),
            dir: md.is_dir(),
            ..Node::default()
        };
        if node.dir {
            for e in fs::read_dir(&abs).unwrap() {
                let name = e.unwrap().file_name().into_string().unwrap();
                stack.push(rel.join(&name));
                node.names.insert(name);
            }
        } else {
            node.bytes = fs::read(&abs).unwrap();
        }
        out.insert(rel.to_string_lossy().into_owned(), node);
    }
    out
}

/// Checks that `state` covers every difference between `base` and the backing directory
/// `now`, the way a cut reads it: a directory whose listing changed is in `dirs`; a file is
/// found (by its path in the state, by listing its dirty parent, or where it was) and its
/// bytes are rebuilt from the base's bytes of its inode, cut at `truncated_to`, with the
/// dirty extents read from the file (all of it when created).
pub(super) fn assert_covers(state: &DirtyState, base: &Tree, now: &Tree, what: &str) {
    let base_files: BTreeMap<Ino, &[u8]> = base
        .values()
        .filter(|n| !n.dir)
        .map(|n| (n.ino, &n.bytes[..]))
        .collect();
    for (path, node) in now {
        let p = Path::new(path);
        if node.dir {
            let same = base
                .get(path)
                .is_some_and(|b| b.dir && b.names == node.names);
            assert!(
                same || state.dirs.contains(p),
                "{what}: directory {path:?} changed but is not dirty"
            );
            continue;
        }
        let entry = state.files.get(&node.ino);
        let parent = p.parent().unwrap();
        let found = entry.is_some_and(|f| f.path.as_deref() == Some(p))
            || state.dirs.contains(parent)
            || base.get(path).is_some_and(|b| b.ino == node.ino);
        assert!(found, "{what}: {path:?} cannot be found from the state");
        let rebuilt = match entry {
            Some(f) if f.created => node.bytes.clone(),
            _ => {
                let mut b = match base_files.get(&node.ino) {
                    Some(b) => b.to_vec(),
                    None => {
                        assert!(entry.is_some(), "{what}: {path:?} is new but not dirty");
                        Vec::new()
                    }
                };
                if let Some(f) = entry {
                    b.truncate(f.truncated_to.unwrap_or(u64::MAX).min(b.len() as u64) as usize);
                    b.resize(node.bytes.len(), 0);
                    for (start, end) in f.extents.iter() {
                        let end = end.min(b.len() as u64) as usize;
                        let start = (start as usize).min(end);
                        b[start..end].copy_from_slice(&node.bytes[start..end]);
                    }
                }
                b
            }
        };
        assert!(
            rebuilt == node.bytes,
            "{what}: {path:?} differs from what the state rebuilds ({:?})",
            entry
        );
    }
}

/// Reopens the crashed journal with `opts`, checks it covers the backing directory, then
/// runs more of the workload, reopens again and checks that nothing was cut or lost.
/// Returns the recovery of the first reopen.
pub(super) fn reopen_and_go_on(case: &Case, opts: JournalOptions) -> Recovery {
    let base = case.base();
    let (j, rec) = case.open(opts.clone());
    assert_covers(&j.dirty(), &base, &tree(&case.backing()), "reopened");
    if let Some(max) = case.done().into_iter().max() {
        assert!(
            max <= rec.last_seq,
            "a record whose append returned is lost: {max} > {rec:?}"
        );
    }
    assert_eq!(
        j.stats().last_seq,
        rec.last_seq,
        "seqs go on after the replayed ones"
    );
    let d = Daemon::new(&j, case);
    d.dirs();
    d.steps(1000..1030);
    let live = j.dirty();
    let last = j.stats().last_seq;
    drop(d);
    drop(j);
    let (j, again) = case.open(opts);
    assert!(
        again.torn_tail.is_none() && again.rescan.is_none(),
        "{again:?}"
    );
    assert_eq!(again.last_seq, last);
    assert_eq!(j.dirty(), live, "appending went on after the crash");
    assert_covers(&j.dirty(), &base, &tree(&case.backing()), "went on");
    rec
}

/// A journal over the case's backing directory with the workload's first `n` steps done.
pub(super) fn worked(case: &Case, opts: JournalOptions, n: u64) -> Journal {
    let (j, _) = case.open(opts);
    let d = Daemon::new(&j, case);
    d.dirs();
    d.steps(0..n);
    j
}
