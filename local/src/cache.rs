//! The cache directory: the backing files of the workspace, the journal, and the daemon's
//! control socket and log.
//!
//! Layout (version 1):
//! ```text
//! CACHE/cache.json     format marker: {"format":"owsfs-cache","version":1,"crc32c":...}
//! CACHE/lock           flock(2)ed by the daemon that serves this cache; holds its pid, then
//!                      `PID stopping` once its session ended (a new mount waits for it)
//! CACHE/backing/       the workspace's files, exactly as the workspace shows them (left
//!                      empty by a cache that adopted a directory: its files stay there)
//! CACHE/adopted.json   the directory adopted by `owsfs mount DIR --adopt` (`adopt.rs`)
//! CACHE/journal/       write journal segments (journal/FORMAT.md)
//! CACHE/control.sock   the daemon's control socket
//! CACHE/owsfs.log      the log of a background daemon
//! CACHE/node-id        this cache's node id in leases (random, made on first use)
//! CACHE/state.db       the base generation and chunk index (src/sync/local.rs)
//! CACHE/stopped.json   written at fail-stop (why, epoch); informational. The unsynced changes
//!                      are set aside at the next mount only if another node committed since
//! CACHE/aside/NAME/    unsynced changes set aside (backing/, journal/, state.db, aside.json):
//!                      `owsfs recover --cache CACHE/aside/NAME --as NEW` forks them
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::adopt::Adopted;

pub const CACHE_FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Marker {
    format: String,
    version: u32,
    crc32c: u32,
}

fn marker_crc(version: u32) -> u32 {
    crc32c::crc32c(format!("owsfs-cache:{version}").as_bytes())
}

/// How long opening a cache waits for a lock held by a daemon that is not stopping cleanly
/// before calling the cache in use: enough for a daemon that just died to let go of it.
const DYING_DAEMON_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// An opened cache, locked for this process.
pub struct Cache {
    pub root: PathBuf,
    pub backing: PathBuf,
    pub journal: PathBuf,
    /// Set-asides that a crash had interrupted, finished by [`Cache::open`].
    pub finished_aside: Vec<PathBuf>,
    /// The directory this cache adopted (`CACHE/adopted.json`): then `backing` reaches it.
    adopted: Option<Adopted>,
    lock: Option<File>,
}

impl Cache {
    /// Lets another daemon open the cache (once this one has closed its journal), while this
    /// process is still exiting.
    pub fn release(&mut self) {
        self.lock.take();
    }

    pub fn socket_path(root: &Path) -> PathBuf {
        root.join("control.sock")
    }

    pub fn log_path(root: &Path) -> PathBuf {
        root.join("owsfs.log")
    }

    /// Says in the lock file that this daemon's session has ended and it is finishing its
    /// last commit: a new mount of the cache then waits for it instead of failing.
    pub fn mark_stopping(&self) {
        use std::os::unix::fs::FileExt;
        if let Some(f) = &self.lock {
            let _ = f.set_len(0);
            let _ = f.write_all_at(format!("{} stopping\n", std::process::id()).as_bytes(), 0);
        }
    }

    /// Creates the cache if needed, checks its format and takes its lock.
    pub fn open(root: &Path) -> anyhow::Result<Cache> {
        Self::open_waiting(root, std::time::Duration::ZERO, &mut |_| {})
    }

    /// As [`Cache::open`], but while the daemon holding the lock is finishing its last commit
    /// (its session ended: `umount MOUNTPOINT` then `mount MOUNTPOINT`, as fstab and systemd
    /// do), waits up to `wait` for it, saying so once through `notice`.
    pub fn open_waiting(
        root: &Path,
        wait: std::time::Duration,
        notice: &mut dyn FnMut(&str),
    ) -> anyhow::Result<Cache> {
        std::fs::create_dir_all(root).with_context(|| {
            format!(
                "cannot create cache directory {}: choose a writable place with --cache DIR",
                root.display()
            )
        })?;
        let root = root
            .canonicalize()
            .with_context(|| format!("cannot resolve cache directory {}", root.display()))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(root.join("lock"))
            .with_context(|| {
                format!(
                    "cache directory {} is not writable: choose another with --cache DIR",
                    root.display()
                )
            })?;
        let started = std::time::Instant::now();
        let mut told = false;
        while rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .is_err()
        {
            let holder = std::fs::read_to_string(root.join("lock")).unwrap_or_default();
            let (pid, stopping) = match holder.trim().split_once(' ') {
                Some((pid, "stopping")) => (pid.to_string(), true),
                _ => (holder.trim().to_string(), false),
            };
            let pid = if pid.is_empty() {
                String::new()
            } else {
                format!(" (pid {pid})")
            };
            if stopping && started.elapsed() < wait {
                if !told {
                    notice(&format!(
                        "the previous daemon of cache {}{pid} is finishing its last commit; \
                         waiting for it (up to {} s)",
                        root.display(),
                        wait.as_secs()
                    ));
                    told = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            // A daemon that has just died may still be closing its descriptors (its process
            // tears down its memory before its files): a moment's patience, not an error.
            if !stopping && started.elapsed() < DYING_DAEMON_WAIT {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            if stopping {
                bail!(
                    "cache {} is still held by its previous daemon{pid}, which has been \
                     finishing its last commit for {} s (is the store reachable?); try again \
                     later, or see its log {}",
                    root.display(),
                    started.elapsed().as_secs(),
                    Self::log_path(&root).display()
                );
            }
            bail!(
                "cache {} is in use by another owsfs daemon{pid}; unmount that workspace first",
                root.display(),
            );
        }
        let mut lock = lock;
        lock.set_len(0)
            .context("cannot write the cache lock file")?;
        writeln!(lock, "{}", std::process::id()).context("cannot write the cache lock file")?;

        let marker_path = root.join("cache.json");
        match std::fs::read(&marker_path) {
            Ok(bytes) => {
                let m: Marker = serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is not an owsfs cache marker", marker_path.display())
                })?;
                if m.format != "owsfs-cache" || m.crc32c != marker_crc(m.version) {
                    bail!(
                        "{} is damaged or not an owsfs cache; use another --cache directory",
                        marker_path.display()
                    );
                }
                if m.version > CACHE_FORMAT_VERSION {
                    bail!(
                        "cache {} has format version {}, newer than this owsfs understands ({}); \
                         upgrade owsfs",
                        root.display(),
                        m.version,
                        CACHE_FORMAT_VERSION
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let nonempty = std::fs::read_dir(&root)?
                    .filter_map(Result::ok)
                    .any(|e| !matches!(e.file_name().to_str(), Some("lock" | "owsfs.log")));
                if nonempty {
                    bail!(
                        "{} is not empty and is not an owsfs cache; give --cache an empty or new \
                         directory",
                        root.display()
                    );
                }
                // Only the daemon's user may reach the backing files directly: a write that
                // bypassed the mount would bypass the journal too. Everyone else goes through
                // the mount, where the files' own permissions apply.
                std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("cannot make {} private", root.display()))?;
                let m = Marker {
                    format: "owsfs-cache".into(),
                    version: CACHE_FORMAT_VERSION,
                    crc32c: marker_crc(CACHE_FORMAT_VERSION),
                };
                let tmp = root.join("cache.json.tmp");
                std::fs::write(&tmp, serde_json::to_vec(&m)?)?;
                File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &marker_path)?;
            }
            Err(e) => return Err(e).context("cannot read the cache marker"),
        }
        // Before anything starts a new backing directory, journal or state.
        let finished_aside = resume_set_aside(&root)?;
        make_dirs(&root)?;
        let adopted = match crate::adopt::read(&root)? {
            Some(dir) => Some(Adopted::open(&dir)?),
            None => None,
        };
        let backing = adopted
            .as_ref()
            .map_or_else(|| root.join("backing"), Adopted::backing);
        let journal = root.join("journal");
        // Prove the cache takes writes before mounting on it.
        let probe = root.join(".write-probe");
        std::fs::write(&probe, b"ok")
            .with_context(|| format!("cache directory {} is not writable", root.display()))?;
        let _ = std::fs::remove_file(&probe);
        Ok(Cache {
            root,
            backing,
            journal,
            finished_aside,
            adopted,
            lock: Some(lock),
        })
    }

    /// Whether the cache ever held a workspace (its state names one).
    pub fn held_a_workspace(&self) -> anyhow::Result<bool> {
        let path = self.root.join("state.db");
        if !path.exists() {
            return Ok(false);
        }
        Ok(crate::LocalState::open(&path)?.meta("workspace")?.is_some())
    }

    /// Forgets the adopted directory of a cache that never held a workspace (a mount that was
    /// refused before it held anything), so that it can serve another.
    pub fn unadopt(&mut self) -> anyhow::Result<()> {
        if self.adopted.is_none() {
            return Ok(());
        }
        if self.held_a_workspace()? {
            bail!(
                "the cache {} holds a workspace in the directory it adopted; it cannot leave it",
                self.root.display()
            );
        }
        std::fs::remove_file(self.root.join(crate::adopt::ADOPTED_FILE))
            .with_context(|| format!("cannot forget the adoption of {}", self.root.display()))?;
        File::open(&self.root)?.sync_all()?;
        self.adopted = None;
        self.backing = self.root.join("backing");
        Ok(())
    }

    /// The directory this cache adopted, if it did.
    pub fn adopted(&self) -> Option<&Path> {
        self.adopted.as_ref().map(|a| a.dir.as_path())
    }

    /// Makes `dir` (absolute, not covered by a mount) this cache's backing directory, for
    /// good: recorded in `CACHE/adopted.json`. A cache adopts one directory, and only a cache
    /// that holds no workspace files of its own.
    pub fn adopt(&mut self, dir: &Path) -> anyhow::Result<()> {
        match &self.adopted {
            Some(a) if a.dir == dir => return Ok(()),
            // A mount refused before it held anything binds nothing.
            Some(_) if !self.held_a_workspace()? => self.unadopt()?,
            Some(a) => bail!(
                "the cache {} adopted {}, not {}: mount {} with it, or give {} another --cache",
                self.root.display(),
                a.dir.display(),
                dir.display(),
                a.dir.display(),
                dir.display()
            ),
            None => {}
        }
        // The cache's own files must not be served, nor the workspace's kept in the cache.
        let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        if self.root.starts_with(&canonical) || canonical.starts_with(&self.root) {
            bail!(
                "the cache {} and the adopted directory {} lie one inside the other: give \
                 --cache a directory outside {}",
                self.root.display(),
                dir.display(),
                dir.display()
            );
        }
        if self.held_a_workspace()?
            || std::fs::read_dir(&self.backing).is_ok_and(|mut d| d.next().is_some())
        {
            bail!(
                "the cache {} keeps a workspace's files itself (in {}), so it cannot adopt {}: \
                 give --adopt a new --cache",
                self.root.display(),
                self.backing.display(),
                dir.display()
            );
        }
        let a = Adopted::open(dir)?;
        crate::adopt::write(&self.root, dir)?;
        self.backing = a.backing();
        self.adopted = Some(a);
        Ok(())
    }

    /// This cache's node id: made once, at random, and kept in `CACHE/node-id`.
    pub fn node_id(&self) -> anyhow::Result<String> {
        let path = self.root.join("node-id");
        match std::fs::read_to_string(&path) {
            Ok(s) if valid_node_id(s.trim()) => return Ok(s.trim().to_string()),
            Ok(s) => bail!(
                "{} holds {:?}, not a node id (16 hex digits); remove it to make a new one",
                path.display(),
                s.trim()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
        let id = format!("{:016x}", rand::random::<u64>());
        let tmp = self.root.join("node-id.tmp");
        std::fs::write(&tmp, format!("{id}\n"))?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(id)
    }

    /// Moves the backing directory, the journal and the cache state into
    /// `CACHE/aside/NAME/`, with `why` in `aside.json`, and starts empty ones. The caller has
    /// closed the journal and the state. Returns the new directory.
    ///
    /// The move is staged in `CACHE/aside/.NAME.partial/`: once its `aside.json` is there,
    /// the decision is durable, and a set-aside that a crash interrupts is finished by the
    /// next [`Cache::open`], before anything makes a new backing directory, journal or state
    /// that could be taken for the ones set aside.
    pub fn set_aside(&self, name: &str, why: &serde_json::Value) -> anyhow::Result<PathBuf> {
        if let Some(dir) = self.adopted() {
            // The files are the user's own directory: they are never moved away.
            bail!(
                "{}: {} has changes that are not in the store, and the store has newer \
                 generations written elsewhere; refusing to mix them. Make the changes a \
                 workspace of their own with `owsfs recover --cache {} --as NEW_NAME`, then \
                 mount {} with --adopt --workspace NEW_NAME",
                why.get("reason")
                    .and_then(|r| r.as_str())
                    .unwrap_or("diverged"),
                dir.display(),
                self.root.display(),
                dir.display()
            );
        }
        let aside = self.root.join("aside");
        let staging = aside.join(format!(".{name}{PARTIAL}"));
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("cannot create {}", staging.display()))?;
        let tmp = staging.join("aside.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(why)?)?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, staging.join("aside.json"))?;
        File::open(&staging)?.sync_all()?;
        File::open(&aside)?.sync_all()?;
        finish_aside(&self.root, &staging)
    }
}

/// Suffix of a set-aside in progress (`CACHE/aside/.NAME.partial/`).
const PARTIAL: &str = ".partial";

/// What a set-aside moves, in this order.
const ASIDE_PARTS: [&str; 5] = [
    "backing",
    "journal",
    "state.db",
    "state.db-wal",
    "state.db-shm",
];

/// Finishes the set-asides a crash interrupted (see [`Cache::set_aside`]). Returns where
/// they went.
fn resume_set_aside(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut done = Vec::new();
    let Ok(entries) = std::fs::read_dir(root.join("aside")) else {
        return Ok(done);
    };
    for e in entries {
        let staging = e?.path();
        let name = staging.file_name().unwrap_or_default().to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(PARTIAL)) {
            continue;
        }
        if !staging.join("aside.json").exists() {
            // Interrupted before it was decided: nothing was moved yet.
            std::fs::remove_dir_all(&staging)
                .with_context(|| format!("cannot remove {}", staging.display()))?;
            continue;
        }
        tracing::warn!(
            "finishing the set-aside of unsynced changes into {} that a crash interrupted",
            staging.display()
        );
        done.push(finish_aside(root, &staging)?);
    }
    Ok(done)
}

/// Moves what is left of the cache's parts into `staging`, gives `staging` its final name,
/// and starts empty ones (after the rename: an empty part made before it would stand beside
/// the staged one when a crash comes in between).
fn finish_aside(root: &Path, staging: &Path) -> anyhow::Result<PathBuf> {
    // A cache of its own (for `owsfs recover --cache`), with the same node id.
    for file in ["node-id", "cache.json"] {
        let from = root.join(file);
        if from.exists() {
            std::fs::copy(&from, staging.join(file))?;
        }
    }
    for part in ASIDE_PARTS {
        let from = root.join(part);
        let to = staging.join(part);
        if std::fs::symlink_metadata(&from).is_ok() {
            // An empty directory beside the staged one was started after the move by an
            // earlier version of this code, which made them before the rename: nothing in it.
            if std::fs::symlink_metadata(&to).is_ok() && std::fs::remove_dir(&from).is_ok() {
                continue;
            }
            if std::fs::symlink_metadata(&to).is_ok() {
                bail!(
                    "{} and {} both exist: a set-aside was interrupted and the cache changed \
                     since; move one of them away by hand",
                    from.display(),
                    to.display()
                );
            }
            std::fs::rename(&from, &to).with_context(|| {
                format!("cannot move {} to {}", from.display(), staging.display())
            })?;
        }
        if part == "backing" {
            fail::fail_point!("aside-midway");
        }
    }
    let _ = std::fs::remove_file(root.join("stopped.json"));
    File::open(root)?.sync_all()?;
    let name = staging
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix('.'))
        .and_then(|n| n.strip_suffix(PARTIAL))
        .context("a set-aside's staging directory has no name")?;
    let aside = root.join("aside");
    let dest = aside.join(name);
    if dest.exists() {
        bail!(
            "cannot finish the set-aside {}: {} exists",
            staging.display(),
            dest.display()
        );
    }
    std::fs::rename(staging, &dest)
        .with_context(|| format!("cannot rename {} to {}", staging.display(), dest.display()))?;
    File::open(&aside)?.sync_all()?;
    make_dirs(root)?;
    Ok(dest)
}

/// Starts the backing directory and the journal's directory where they are missing.
fn make_dirs(root: &Path) -> anyhow::Result<()> {
    for dir in ["backing", "journal"] {
        match std::fs::create_dir(root.join(dir)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create {}", root.join(dir).display()));
            }
        }
    }
    File::open(root)?.sync_all()?;
    Ok(())
}

fn valid_node_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache adopts one directory, outside it, and only while it has no files of its own;
    /// the adoption outlives the process.
    #[test]
    fn adoption_rules() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("project");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("f"), b"mine").unwrap();
        // The cache inside the directory, or the other way round: refused.
        let mut inside = Cache::open(&dir.join(".cache")).unwrap();
        let e = inside.adopt(&dir).unwrap_err().to_string();
        assert!(e.contains("one inside the other"), "{e}");
        drop(inside);
        let mut holding = Cache::open(&d.path().join("c1")).unwrap();
        let e = holding
            .adopt(&holding.root.join("backing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("one inside the other"), "{e}");
        // A cache with files of its own: refused.
        std::fs::write(holding.backing.join("x"), b"x").unwrap();
        let e = holding.adopt(&dir).unwrap_err().to_string();
        assert!(e.contains("keeps a workspace's files itself"), "{e}");
        // A new cache adopts; reopened, it still does, and reaches the directory's files.
        let root = d.path().join("c2");
        let mut c = Cache::open(&root).unwrap();
        c.adopt(&dir).unwrap();
        drop(c);
        let mut c = Cache::open(&root).unwrap();
        assert_eq!(c.adopted(), Some(dir.as_path()));
        assert_eq!(std::fs::read(c.backing.join("f")).unwrap(), b"mine");
        c.adopt(&dir).unwrap();
        // It never held a workspace: it may adopt another directory, or none.
        let other = d.path().join("other");
        std::fs::create_dir(&other).unwrap();
        c.adopt(&other).unwrap();
        c.unadopt().unwrap();
        assert_eq!(c.adopted(), None);
        assert_eq!(c.backing, c.root.join("backing"));
        c.adopt(&dir).unwrap();
        // Once it holds a workspace, it stays with its directory.
        crate::LocalState::open(&c.root.join("state.db"))
            .unwrap()
            .set_meta("workspace", "w")
            .unwrap();
        let e = c.adopt(&other).unwrap_err().to_string();
        assert!(e.contains("adopted"), "{e}");
        assert!(c.unadopt().is_err());
        // Its unsynced changes are never set aside (moved out of the user's directory).
        let e = c
            .set_aside("x", &serde_json::json!({"reason": "diverged"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("owsfs recover"), "{e}");
        assert!(dir.join("f").exists());
    }

    /// A set-aside that stopped after moving the backing directory (a crash) is finished by
    /// the next open: everything ends up in one aside directory, and the cache starts empty.
    #[test]
    fn an_interrupted_set_aside_is_finished_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("c");
        let cache = Cache::open(&root).unwrap();
        std::fs::write(cache.backing.join("f"), b"unsynced").unwrap();
        std::fs::write(cache.journal.join("1.seg"), b"journal").unwrap();
        std::fs::write(cache.root.join("state.db"), b"state").unwrap();
        let root = cache.root.clone();
        drop(cache);
        // What set_aside leaves when it dies after its first move.
        let staging = root.join("aside").join(".n.partial");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("aside.json"), b"{}").unwrap();
        std::fs::rename(root.join("backing"), staging.join("backing")).unwrap();

        let cache = Cache::open(&root).unwrap();
        let dest = root.join("aside").join("n");
        assert_eq!(cache.finished_aside, vec![dest.clone()]);
        assert!(!staging.exists());
        assert_eq!(std::fs::read(dest.join("backing/f")).unwrap(), b"unsynced");
        assert_eq!(
            std::fs::read(dest.join("journal/1.seg")).unwrap(),
            b"journal"
        );
        assert_eq!(std::fs::read(dest.join("state.db")).unwrap(), b"state");
        assert!(dest.join("cache.json").exists());
        assert_eq!(std::fs::read_dir(&cache.backing).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(&cache.journal).unwrap().count(), 0);
        assert!(!root.join("state.db").exists());
        drop(cache);

        // Stopped by an earlier version after it started the empty parts and before the
        // rename: the empty ones go, the staged ones are kept.
        let staging = root.join("aside").join(".k.partial");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("aside.json"), b"{}").unwrap();
        std::fs::write(root.join("backing").join("h"), b"second").unwrap();
        for part in ["backing", "journal"] {
            std::fs::rename(root.join(part), staging.join(part)).unwrap();
            std::fs::create_dir(root.join(part)).unwrap();
        }
        let cache = Cache::open(&root).unwrap();
        let dest = root.join("aside").join("k");
        assert_eq!(cache.finished_aside, vec![dest.clone()]);
        assert_eq!(std::fs::read(dest.join("backing/h")).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(&cache.backing).unwrap().count(), 0);
        drop(cache);

        // Interrupted before its aside.json was in place: nothing had moved, nothing moves.
        std::fs::create_dir_all(root.join("aside").join(".m.partial")).unwrap();
        std::fs::write(root.join("backing").join("g"), b"kept").unwrap();
        let cache = Cache::open(&root).unwrap();
        assert!(cache.finished_aside.is_empty());
        assert!(!root.join("aside").join(".m.partial").exists());
        assert_eq!(std::fs::read(cache.backing.join("g")).unwrap(), b"kept");
    }
}
