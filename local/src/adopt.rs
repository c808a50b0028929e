//! An adopted directory (`owsfs mount DIR --adopt`): the files stay in DIR, which the daemon
//! opens before its mount covers it and serves as the backing directory; the journal and the
//! state stay in the cache.
//!
//! `CACHE/adopted.json` (version 1) says which directory a cache adopted:
//! `{"format":"owsfs-adopted","version":1,"dir":"/abs/DIR","crc32c":N}`, where `crc32c` is the
//! CRC-32C of `owsfs-adopted:VERSION:DIR`. A cache adopts one directory for its whole life.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rustix::fs::OFlags;
use serde::{Deserialize, Serialize};

/// The record's name in the cache.
pub const ADOPTED_FILE: &str = "adopted.json";
/// The version of `adopted.json` this code writes and reads.
pub const ADOPTED_FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Record {
    format: String,
    version: u32,
    dir: String,
    crc32c: u32,
}

fn record_crc(version: u32, dir: &str) -> u32 {
    crc32c::crc32c(format!("owsfs-adopted:{version}:{dir}").as_bytes())
}

/// The adopted directory, open: its path, and a descriptor that reaches it under the mount.
#[derive(Debug)]
pub struct Adopted {
    pub dir: PathBuf,
    fd: OwnedFd,
}

impl Adopted {
    /// Opens `dir` (an absolute path, not covered by a mount of ours yet).
    pub fn open(dir: &Path) -> anyhow::Result<Adopted> {
        if !owsfs_sys::fs::FD_PATH_REACHES_COVERED_FILES {
            bail!(
                "adopting a directory in place needs Linux (its /proc/self/fd reaches the files \
                 a mount covers); mount an empty directory and copy the files in instead"
            );
        }
        let fd = match owsfs_sys::fs::open_path(
            rustix::fs::CWD,
            dir,
            OFlags::DIRECTORY | OFlags::CLOEXEC,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOTCONN) => bail!(
                "the adopted directory {} has a dead mount on it (its daemon stopped): remove \
                 it with `owsfs unmount {}` first",
                dir.display(),
                dir.display()
            ),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot open the adopted directory {}", dir.display())
                });
            }
        };
        Ok(Adopted {
            dir: dir.to_path_buf(),
            fd,
        })
    }

    /// The path by which this process reaches the directory's own files, also once the mount
    /// covers `dir`: `/proc/self/fd/N` (every thread shares the descriptor table).
    pub fn backing(&self) -> PathBuf {
        // `open` refused the systems where this path would lead into the mount.
        owsfs_sys::fs::fd_path(self.fd.as_fd()).unwrap_or_else(|_| self.dir.clone())
    }
}

/// The directory the cache at `root` adopted, if any.
pub fn read(root: &Path) -> anyhow::Result<Option<PathBuf>> {
    let path = root.join(ADOPTED_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let r: Record = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not an adoption record", path.display()))?;
    if r.format != "owsfs-adopted" || r.crc32c != record_crc(r.version, &r.dir) {
        bail!(
            "{} is damaged (its checksum does not match); it names the directory this cache \
             adopted: write it again by hand, or use another --cache",
            path.display()
        );
    }
    if r.version > ADOPTED_FORMAT_VERSION {
        bail!(
            "{} has version {}, newer than this owsfs understands ({ADOPTED_FORMAT_VERSION}); \
             upgrade owsfs",
            path.display(),
            r.version
        );
    }
    Ok(Some(PathBuf::from(r.dir)))
}

/// Records, durably, that the cache at `root` adopts `dir`.
pub fn write(root: &Path, dir: &Path) -> anyhow::Result<()> {
    let Some(dir_str) = dir.to_str() else {
        bail!(
            "cannot adopt {}: its path is not UTF-8",
            dir.to_string_lossy()
        );
    };
    let r = Record {
        format: "owsfs-adopted".into(),
        version: ADOPTED_FORMAT_VERSION,
        dir: dir_str.to_string(),
        crc32c: record_crc(ADOPTED_FORMAT_VERSION, dir_str),
    };
    let tmp = root.join(format!("{ADOPTED_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&r)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, root.join(ADOPTED_FILE))?;
    std::fs::File::open(root)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_damage_is_refused() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), None);
        write(d.path(), Path::new("/home/me/project")).unwrap();
        assert_eq!(
            read(d.path()).unwrap().as_deref(),
            Some(Path::new("/home/me/project"))
        );
        let p = d.path().join(ADOPTED_FILE);
        let s = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, s.replace("project", "projecT")).unwrap();
        let e = read(d.path()).unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
    }

    #[test]
    fn the_directory_is_reached_through_the_descriptor() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let a = Adopted::open(d.path()).unwrap();
        assert_eq!(std::fs::read(a.backing().join("f")).unwrap(), b"x");
    }
}
