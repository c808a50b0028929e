//! The cache directory: the backing files of the workspace, the journal, and the daemon's
//! control socket and log.
//!
//! Layout (version 1):
//! ```text
//! CACHE/cache.json     format marker: {"format":"owsfs-cache","version":1,"crc32c":...}
//! CACHE/lock           flock(2)ed by the daemon that serves this cache
//! CACHE/backing/       the workspace's files, exactly as the workspace shows them
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

/// An opened cache, locked for this process.
pub struct Cache {
    pub root: PathBuf,
    pub backing: PathBuf,
    pub journal: PathBuf,
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

    /// Creates the cache if needed, checks its format and takes its lock.
    pub fn open(root: &Path) -> anyhow::Result<Cache> {
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
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let holder = std::fs::read_to_string(root.join("lock")).unwrap_or_default();
            bail!(
                "cache {} is in use by another owsfs daemon{}; unmount that workspace first",
                root.display(),
                match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                }
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
        let backing = root.join("backing");
        let journal = root.join("journal");
        for dir in [&backing, &journal] {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", dir.display()));
                }
            }
        }
        // Prove the cache takes writes before mounting on it.
        let probe = root.join(".write-probe");
        std::fs::write(&probe, b"ok")
            .with_context(|| format!("cache directory {} is not writable", root.display()))?;
        let _ = std::fs::remove_file(&probe);
        Ok(Cache {
            root,
            backing,
            journal,
            lock: Some(lock),
        })
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
        let mut raw = [0u8; 8];
        std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut raw)
            .context("cannot get random bytes for a node id")?;
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = self.root.join("node-id.tmp");
        std::fs::write(&tmp, format!("{id}\n"))?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(id)
    }

    /// Moves the backing directory, the journal and the cache state into
    /// `CACHE/aside/NAME/`, with `why` in `aside.json`, and starts empty ones. The caller has
    /// closed the journal and the state. Returns the new directory.
    pub fn set_aside(&self, name: &str, why: &serde_json::Value) -> anyhow::Result<PathBuf> {
        let dest = self.root.join("aside").join(name);
        std::fs::create_dir_all(&dest)
            .with_context(|| format!("cannot create {}", dest.display()))?;
        for part in [
            "backing",
            "journal",
            "state.db",
            "state.db-wal",
            "state.db-shm",
        ] {
            let from = self.root.join(part);
            if from.exists() {
                std::fs::rename(&from, dest.join(part)).with_context(|| {
                    format!("cannot move {} to {}", from.display(), dest.display())
                })?;
            }
            if part == "backing" {
                fail::fail_point!("aside-midway");
            }
        }
        // A cache of its own (for `owsfs recover --cache`), with the same node id.
        for file in ["node-id", "cache.json"] {
            let from = self.root.join(file);
            if from.exists() {
                std::fs::copy(&from, dest.join(file))?;
            }
        }
        std::fs::write(dest.join("aside.json"), serde_json::to_vec_pretty(why)?)?;
        let _ = std::fs::remove_file(self.root.join("stopped.json"));
        for dir in [&self.backing, &self.journal] {
            std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        File::open(&self.root)?.sync_all()?;
        Ok(dest)
    }
}

fn valid_node_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|c| c.is_ascii_hexdigit())
}
