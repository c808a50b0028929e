//! A restore drill: a generation restored into an empty directory through the one restore
//! path, then checked against its trees independently of that path (every node's kind, size,
//! mode, symlink target and link count; every file's bytes hashed again chunk by chunk; no
//! extra names), its totals against the generation record, and each SQLite database the
//! generation recorded with `PRAGMA integrity_check`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use owsfs_store::Workspace;
use owsfs_store::drill::{DatabaseCheck, DrillRecord};
use owsfs_store::tree::file_chunks;
use owsfs_store::{
    BlobLoader, BlobRef, Content, GenStats, GenerationRecord, NodeKind, Store, Tree,
};

use crate::progress::Progress;

/// What a drill checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub databases: Vec<DatabaseCheck>,
}

/// Runs a drill of `record` in a new directory under `scratch` (named `prefix…`, removed
/// afterwards); the caller records the outcome (`Workspace::record_drill`). An error means
/// the drill could not be run (no scratch space); a failed check is a record with `ok:
/// false`.
pub fn run(
    store: &Store,
    ws: &Workspace,
    record: &GenerationRecord,
    scratch: &Path,
    prefix: &str,
    progress: &dyn Progress,
) -> anyhow::Result<DrillRecord> {
    let started = std::time::Instant::now();
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch)
        .with_context(|| format!("cannot make the drill's directory in {}", scratch.display()))?;
    let outcome = drill(store, record, dir.path(), progress);
    drop(dir);
    let (ok, error, checked) = match outcome {
        Ok(c) => (true, None, c),
        Err(e) => (false, Some(format!("{e:#}")), Checked::default()),
    };
    let r = DrillRecord {
        workspace: ws.name().to_string(),
        generation: record.number,
        time_unix_ms: store.clock().unix_ms(),
        duration_ms: started.elapsed().as_millis() as u64,
        ok,
        error,
        files: checked.files,
        dirs: checked.dirs,
        bytes: checked.bytes,
        databases: checked.databases,
        host: rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned(),
    };
    Ok(r)
}

/// Restores `record`'s tree into `dir` (empty) and checks it. An error says what did not
/// hold; a database that fails its integrity check is an error too.
pub fn drill(
    store: &Store,
    record: &GenerationRecord,
    dir: &Path,
    progress: &dyn Progress,
) -> anyhow::Result<Checked> {
    let root = record
        .root
        .with_context(|| format!("generation {} has no tree", record.number))?;
    crate::restore::restore(store, store, &root, dir, progress).context("the restore failed")?;
    check(store, record, dir)
}

/// Checks that `dir` holds exactly `record`'s tree (see the module's comment).
pub fn check(store: &Store, record: &GenerationRecord, dir: &Path) -> anyhow::Result<Checked> {
    let mut c = check_tree(store, record, dir)?;
    for db in &record.sqlite {
        let path = dir.join(&db.path);
        let integrity = integrity_check(&path)
            .with_context(|| format!("cannot check the SQLite database {}", db.path))?;
        let ok = integrity == "ok";
        c.databases.push(DatabaseCheck {
            path: db.path.clone(),
            integrity: integrity.clone(),
        });
        if !ok {
            bail!("{}: PRAGMA integrity_check says: {integrity}", db.path);
        }
    }
    Ok(c)
}

/// Checks that `dir` holds exactly `record`'s tree, as [`check`] does, but opens no
/// database (it reads `dir` only, and changes nothing): the first difference is the error.
pub fn check_tree(store: &Store, record: &GenerationRecord, dir: &Path) -> anyhow::Result<Checked> {
    let root = record
        .root
        .with_context(|| format!("generation {} has no tree", record.number))?;
    let mut c = Checked {
        dirs: 1,
        ..Checked::default()
    };
    let mut links: HashMap<u64, u64> = HashMap::new();
    let mut inodes: HashMap<u64, u64> = HashMap::new();
    check_dir(
        store,
        &root,
        dir,
        &PathBuf::new(),
        &mut c,
        &mut links,
        &mut inodes,
    )?;
    for (key, names) in &links {
        if *names < 2 {
            bail!("hard-link key {key} has only one name");
        }
    }
    if record.stats != GenStats::default()
        && (
            record.stats.files,
            record.stats.dirs,
            record.stats.bytes_total,
        ) != (c.files, c.dirs, c.bytes)
    {
        bail!(
            "the generation record counts {} files, {} directories and {} bytes; the trees hold {}, {} and {}",
            record.stats.files,
            record.stats.dirs,
            record.stats.bytes_total,
            c.files,
            c.dirs,
            c.bytes
        );
    }
    Ok(c)
}

/// `PRAGMA integrity_check` of the database at `path` (its `-wal` beside it is used).
pub fn integrity_check(path: &Path) -> anyhow::Result<String> {
    if !path.is_file() {
        bail!("it is missing");
    }
    let conn = rusqlite::Connection::open(path)?;
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let lines: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(lines.join("; "))
}

fn check_dir(
    loader: &dyn BlobLoader,
    r: &BlobRef,
    root: &Path,
    rel: &Path,
    c: &mut Checked,
    links: &mut HashMap<u64, u64>,
    inodes: &mut HashMap<u64, u64>,
) -> anyhow::Result<()> {
    let tree = Tree::load(loader, r)?;
    let here = root.join(rel);
    let mut names: Vec<Vec<u8>> = std::fs::read_dir(&here)
        .with_context(|| format!("cannot list {}", here.display()))?
        .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
        .collect::<Result<_, _>>()?;
    names.sort();
    // A SQLite database's `-shm` beside it is never stored (rebuilt on open).
    let derived: Vec<Vec<u8>> = names
        .iter()
        .filter(|n| {
            n.strip_suffix(b"-shm").is_some_and(|db| {
                names.binary_search(&db.to_vec()).is_ok()
                    && is_sqlite(&here.join(OsStr::from_bytes(db)))
            })
        })
        .cloned()
        .collect();
    names.retain(|n| !derived.contains(n));
    let mut want: Vec<Vec<u8>> = tree
        .entries
        .iter()
        .filter(|e| e.kind != NodeKind::Socket)
        .map(|e| e.name.clone())
        .collect();
    want.sort();
    if names != want {
        let extra = names.iter().find(|n| want.binary_search(n).is_err());
        let missing = want.iter().find(|n| names.binary_search(n).is_err());
        let which = match (extra, missing) {
            (Some(n), _) => format!(", and {} is not in the tree", show(rel, n)),
            (None, Some(n)) => format!(", and {} is missing", show(rel, n)),
            (None, None) => String::new(),
        };
        bail!(
            "{} holds {} names, its tree {}{which}",
            display(rel),
            names.len(),
            want.len()
        );
    }
    for e in &tree.entries {
        if e.kind == NodeKind::Socket {
            continue;
        }
        let p = rel.join(OsStr::from_bytes(&e.name));
        let md = std::fs::symlink_metadata(root.join(&p))
            .with_context(|| format!("cannot stat {}", p.display()))?;
        let bad = |what: String| anyhow::anyhow!("{}: {what}", p.display());
        let kind_ok = match e.kind {
            NodeKind::File => md.is_file(),
            NodeKind::Dir => md.is_dir(),
            NodeKind::Symlink => md.file_type().is_symlink(),
            _ => !md.is_file() && !md.is_dir() && !md.file_type().is_symlink(),
        };
        if !kind_ok {
            return Err(bad(format!("is not a {:?}", e.kind)));
        }
        if e.kind != NodeKind::Symlink && md.permissions().mode() & 0o7777 != e.mode {
            return Err(bad(format!(
                "mode {:o}, the tree says {:o}",
                md.permissions().mode() & 0o7777,
                e.mode
            )));
        }
        match &e.content {
            Content::Dir(sub) => {
                c.dirs += 1;
                check_dir(loader, sub, root, &p, c, links, inodes)?;
            }
            Content::Symlink(t) => {
                let got = std::fs::read_link(root.join(&p))?;
                if got.as_os_str().as_bytes() != t.as_slice() {
                    return Err(bad("another symlink target".into()));
                }
            }
            Content::File(f) => {
                c.files += 1;
                c.bytes += e.size;
                if md.len() != e.size {
                    return Err(bad(format!("{} bytes, the tree says {}", md.len(), e.size)));
                }
                if e.link_key != 0 {
                    *links.entry(e.link_key).or_default() += 1;
                    let ino = *inodes.entry(e.link_key).or_insert(md.ino());
                    if ino != md.ino() {
                        return Err(bad("not the same inode as its other names".into()));
                    }
                }
                check_bytes(loader, f, &root.join(&p)).map_err(|m| bad(format!("{m:#}")))?;
            }
            Content::None => {}
        }
    }
    Ok(())
}

/// Hashes the restored file chunk by chunk against the chunk ids of the tree.
fn check_bytes(
    loader: &dyn BlobLoader,
    f: &owsfs_store::FileContent,
    path: &Path,
) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    for span in file_chunks(loader, f)? {
        buf.resize(span.r.len as usize, 0);
        file.read_exact(&mut buf)
            .with_context(|| format!("short at offset {}", span.offset))?;
        if blake3::hash(&buf).as_bytes() != span.r.id.as_bytes() {
            bail!(
                "the bytes at offset {} do not hash to their chunk id",
                span.offset
            );
        }
    }
    Ok(())
}

/// The file at `path` starts with SQLite's header string.
fn is_sqlite(path: &Path) -> bool {
    let mut head = [0u8; 16];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == b"SQLite format 3\0"
}

/// The path of entry `name` of directory `rel`.
fn show(rel: &Path, name: &[u8]) -> String {
    rel.join(OsStr::from_bytes(name)).display().to_string()
}

fn display(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        "the root".into()
    } else {
        rel.display().to_string()
    }
}
