//! Checks on a mountpoint, and finding the owsfs mount at a path.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// One mount of this mount namespace.
pub use owsfs_sys::mount::MountEntry as MountInfo;

/// The name a workspace gets from its mountpoint.
pub fn name_of(mountpoint: &Path) -> String {
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    abs.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".to_string())
}

/// Every mount of this mount namespace.
pub fn mounts() -> anyhow::Result<Vec<MountInfo>> {
    Ok(owsfs_sys::mount::table()?)
}

/// The absolute path of a mountpoint without resolving it through a (possibly dead) mount.
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    let abs = std::path::absolute(path)
        .with_context(|| format!("cannot make {} absolute", path.display()))?;
    // Resolve symlinks in the parent only: the last component may be a stale FUSE mount that
    // cannot be stat'ed.
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(p) => Ok(p.join(name)),
            Err(_) => Ok(abs),
        },
        _ => Ok(abs),
    }
}

/// The owsfs mount at `path`, if there is one (the newest, if stacked).
pub fn find_owsfs(path: &Path) -> anyhow::Result<Option<MountInfo>> {
    let abs = absolute(path)?;
    Ok(mounts()?
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == abs && owsfs_sys::mount::is_owsfs(m)))
}

/// An `owsfs mount` process, from its command line (`owsfs mount MOUNTPOINT --cache CACHE
/// ...`; relative paths taken from its working directory).
#[derive(Debug, Clone)]
pub struct DaemonProc {
    pub pid: i32,
    pub mountpoint: Option<PathBuf>,
    pub cache: Option<PathBuf>,
}

/// Every `owsfs mount` process this one can see (but itself).
pub fn daemons() -> Vec<DaemonProc> {
    use std::os::unix::ffi::OsStrExt;
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for p in owsfs_sys::process::processes() {
        let pid = p.pid;
        let args = &p.args;
        if pid == me
            || !args.first().is_some_and(|a| a.ends_with(b"owsfs"))
            || args.get(1).map(Vec::as_slice) != Some(&b"mount"[..])
        {
            continue;
        }
        let cwd = p.cwd.clone().unwrap_or_default();
        // Its arguments as the parser reads them (options before MOUNTPOINT, `--cache=C`).
        let argv: Vec<std::ffi::OsString> = args
            .iter()
            .filter(|a| !a.is_empty())
            .map(|a| std::ffi::OsStr::from_bytes(a).to_os_string())
            .collect();
        let Ok(m) = crate::cmd::command().try_get_matches_from(&argv) else {
            continue;
        };
        let Some(("mount", m)) = m.subcommand() else {
            continue;
        };
        out.push(DaemonProc {
            pid,
            mountpoint: m
                .get_one::<PathBuf>("mountpoint")
                .and_then(|mp| absolute(&cwd.join(mp)).ok()),
            // From its command line only (not this process's OWSFS_CACHE).
            cache: m
                .get_one::<PathBuf>("cache")
                .filter(|_| m.value_source("cache") == Some(clap::parser::ValueSource::CommandLine))
                .map(|c| cwd.join(c)),
        });
    }
    out
}

/// The cache of the owsfs mount `m`: its source, or, when the source is the mount helper's
/// STORE_URL#WORKSPACE, the `--cache` of the daemon serving it.
pub fn cache_of(m: &MountInfo) -> Option<PathBuf> {
    let source = Path::new(&m.source);
    if source.is_absolute() && !m.source.contains("://") {
        return Some(source.to_path_buf());
    }
    daemons()
        .into_iter()
        .find(|d| d.mountpoint.as_deref() == Some(m.mountpoint.as_path()))
        .and_then(|d| d.cache)
}

/// Checks that `path` can be mounted on: an existing directory that is not a mountpoint, and
/// empty unless it is adopted (`--adopt`: its files become the workspace's).
pub fn check_mountable(path: &Path, adopt: bool) -> anyhow::Result<PathBuf> {
    let abs = absolute(path)?;
    let table = mounts()?;
    // An adopted directory's files are served from one file system: a mount below it would
    // hide its own files and mix inode numbers of two file systems. (The mount table has
    // resolved paths.)
    let resolved = abs.canonicalize().unwrap_or_else(|_| abs.clone());
    if adopt
        && let Some(m) = table
            .iter()
            .find(|m| m.mountpoint != resolved && m.mountpoint.starts_with(&resolved))
    {
        bail!(
            "{} has a mount below it ({} at {}): owsfs adopts a directory only whole, on one file \
             system; unmount it first, or adopt another directory",
            abs.display(),
            m.fstype,
            m.mountpoint.display()
        );
    }
    // A directory adopted may be a mount of its own (a container's volume), but not one of
    // ours: a dead one is unmounted first, a live one is served already.
    if let Some(m) = table
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == abs)
        .filter(|m| !adopt || owsfs_sys::mount::is_owsfs(m))
    {
        bail!(
            "{} is already a mountpoint ({} from {}); unmount it first{}",
            abs.display(),
            m.fstype,
            m.source,
            if owsfs_sys::mount::is_owsfs(&m) {
                format!(" with `owsfs unmount {}`", abs.display())
            } else {
                String::new()
            }
        );
    }
    let meta = match std::fs::metadata(&abs) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "mountpoint {} does not exist; create it with `mkdir -p {}`",
            abs.display(),
            abs.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", abs.display())),
    };
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", abs.display());
    }
    let mut entries = std::fs::read_dir(&abs)
        .with_context(|| format!("cannot list mountpoint {}", abs.display()))?;
    if !adopt && entries.next().is_some() {
        bail!(
            "mountpoint {} is not empty, and owsfs hides nothing under a mount; to make its \
             files the workspace's, where they are, pass --adopt",
            abs.display()
        );
    }
    Ok(abs.canonicalize().unwrap_or(abs))
}

/// Checks that the FUSE device is there and can be opened.
pub fn check_dev_fuse() -> anyhow::Result<()> {
    owsfs_sys::mount::check_fuse_device().map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_name_is_the_last_component() {
        assert_eq!(name_of(Path::new("/x/workspace")), "workspace");
        assert_eq!(name_of(Path::new("/")), "root");
    }
}
