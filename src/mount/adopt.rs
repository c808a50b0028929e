//! What an adopted directory (`owsfs mount DIR --adopt`) needs before the mount covers it.
//! A process that already holds DIR (its working directory, its root, an open file) keeps
//! using the directory underneath the mount, so its writes would bypass the journal and never
//! reach the store. The store, and the scratch space of drills, must not lie inside DIR either:
//! the daemon would write them through its own mount.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// A process that holds something inside the directory.
#[derive(Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub name: String,
    /// `working directory`, `root directory` or `open file`.
    pub what: &'static str,
    pub path: PathBuf,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}) has its {} at {}",
            self.name,
            self.pid,
            self.what,
            self.path.display()
        )
    }
}

/// `path` is `dir` or lies below it.
fn inside(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// Every process (other than this one) whose working directory, root or open files lie
/// inside `dir`, as far as `/proc` shows them (other users' processes only to root).
pub fn holders(dir: &Path) -> Vec<Holder> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.filter_map(Result::ok) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = p.path();
        let name = std::fs::read_to_string(base.join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mut found = |what, path: PathBuf| {
            if inside(&path, dir) {
                out.push(Holder {
                    pid,
                    name: name.clone(),
                    what,
                    path,
                });
                true
            } else {
                false
            }
        };
        if let Ok(cwd) = std::fs::read_link(base.join("cwd"))
            && found("working directory", cwd)
        {
            continue;
        }
        // A root of "/" covers everything; only a root inside the directory counts.
        if let Ok(root) = std::fs::read_link(base.join("root"))
            && root != Path::new("/")
            && found("root directory", root)
        {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(base.join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            if let Ok(target) = std::fs::read_link(fd.path())
                && target.is_absolute()
                && found("open file", target)
            {
                break;
            }
        }
    }
    out
}

/// The processes this one was started from: its parent, the parent's parent, and so on.
fn ancestors() -> Vec<u32> {
    let mut out = Vec::new();
    let mut pid = std::os::unix::process::parent_id();
    while pid > 1 && out.len() < 64 {
        out.push(pid);
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            break;
        };
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
        else {
            break;
        };
        pid = ppid;
    }
    out
}

/// Refuses the adoption of `dir` while a process other than the ones this mount was started
/// from holds something inside it; returns a warning for each of those (a shell whose working
/// directory is inside DIR starts its next commands beside the mount, not in it). owsfs's own
/// processes are left out: they leave, or (`owsfs run`) move into the mount themselves.
pub fn check_holders(dir: &Path) -> anyhow::Result<Vec<String>> {
    let ancestors = ancestors();
    let (theirs, others): (Vec<Holder>, Vec<Holder>) = holders(dir)
        .into_iter()
        .filter(|h| h.name != "owsfs")
        .partition(|h| ancestors.contains(&h.pid));
    if !others.is_empty() {
        let listed: Vec<String> = others.iter().take(5).map(Holder::to_string).collect();
        let more = match others.len() {
            n if n > 5 => format!(", and {} more", n - 5),
            _ => String::new(),
        };
        bail!(
            "{} is in use: {}{more}. A process that holds the directory before the mount goes \
             on using the files beside it, and what it writes would not reach the store: stop \
             it, or start it once the directory is mounted",
            dir.display(),
            listed.join("; ")
        );
    }
    Ok(theirs
        .iter()
        .map(|h| {
            format!(
                "{h}: what it starts from there will write beside the mount, not through it; \
                 `cd {}` again in it",
                h.path.display()
            )
        })
        .collect())
}

/// Everything [`check_paths`] and [`check_holders`] refuse; the holders' warnings are logged
/// and said.
pub fn check(
    dir: &Path,
    store_url: &str,
    scratch: Option<&Path>,
    ready: &super::background::Readiness,
) -> anyhow::Result<()> {
    check_paths(dir, store_url, scratch)?;
    for w in check_holders(dir)? {
        tracing::warn!("{w}");
        ready.notice(&w);
    }
    Ok(())
}

/// Refuses a `file://` store or a drill scratch directory inside `dir`: the daemon would
/// write them through its own mount (and commit its own store, endlessly).
pub fn check_paths(dir: &Path, store_url: &str, scratch: Option<&Path>) -> anyhow::Result<()> {
    let resolve = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let dir = resolve(dir);
    if let Some(path) = store_url.strip_prefix("file://") {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        if inside(&resolve(Path::new(path)), &dir) {
            bail!(
                "the store {store_url} lies inside the adopted directory {}: keep the store \
                 outside it",
                dir.display()
            );
        }
    }
    if let Some(s) = scratch
        && inside(&resolve(s), &dir)
    {
        bail!(
            "--drill-scratch {} lies inside the adopted directory {}: choose a place outside it",
            s.display(),
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_working_inside_the_directory_is_found() {
        let d = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(d.path())
            .spawn()
            .unwrap();
        // The child's cwd is set before exec; wait until /proc shows it.
        let dir = d.path().canonicalize().unwrap();
        let mut found = Vec::new();
        for _ in 0..100 {
            found = holders(&dir);
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found
                .iter()
                .any(|h| h.pid == child.id() && h.what == "working directory"),
            "{found:?}"
        );
        let e = check_holders(&dir);
        // The child is gone by now: nothing holds the directory.
        assert!(e.is_ok(), "{e:?}");
    }

    #[test]
    fn a_store_or_scratch_inside_the_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("project");
        std::fs::create_dir(&dir).unwrap();
        let inner = format!("file://{}/.store", dir.display());
        assert!(check_paths(&dir, &inner, None).is_err());
        let outer = format!("file://{}/store", d.path().display());
        assert!(check_paths(&dir, &outer, None).is_ok());
        assert!(check_paths(&dir, "s3://b/p?region=x", Some(&dir.join("tmp"))).is_err());
        assert!(check_paths(&dir, "s3://b/p?region=x", Some(d.path())).is_ok());
    }
}
