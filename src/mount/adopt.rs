//! What an adopted directory (`owsfs mount DIR --adopt`) needs before the mount covers it.
//! A process that already holds DIR (its working directory, its root, an open file) keeps
//! using the directory underneath the mount, so its writes would bypass the journal and never
//! reach the store. The store, and the scratch space of drills, must not lie inside DIR either:
//! the daemon would write them through its own mount.

use std::path::Path;

use anyhow::bail;

use owsfs_sys::process::Holder;

/// `path` is `dir` or lies below it.
fn inside(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// Every process (other than this one) that holds something inside `dir`.
pub fn holders(dir: &Path) -> Vec<Holder> {
    // Adoption is refused before this where the system cannot tell (see `Adopted::open`).
    owsfs_sys::process::holders(dir).unwrap_or_default()
}

/// The processes this one was started from: its parent, the parent's parent, and so on.
fn ancestors() -> Vec<u32> {
    let mut out = Vec::new();
    let mut pid = std::os::unix::process::parent_id();
    while pid > 1 && out.len() < 64 {
        out.push(pid);
        let Some(ppid) = owsfs_sys::process::parent_of(pid) else {
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
