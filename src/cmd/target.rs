//! Which workspace a command works on: `--workspace W` (with `--store`), or the workspace a
//! running mount serves (its MOUNTPOINT), or `W@REF` for a state of it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use owsfs_store::{GenRef, GenerationRecord, Store, Workspace};

use crate::args::StoreArgs;

/// `--store` and `--workspace`.
#[derive(Args, Debug, Clone)]
pub struct WorkspaceArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace (instead of a MOUNTPOINT).
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: Option<String>,
}

/// An existing workspace and the store it is in.
pub struct Target {
    pub store: Arc<Store>,
    pub ws: Workspace,
    pub url: String,
}

/// Opens the existing workspace `name` (never creates one).
pub fn open_existing(store: &StoreArgs, name: &str) -> anyhow::Result<Target> {
    let url = store.url()?;
    open_existing_at(&url, name)
}

fn open_existing_at(url: &str, name: &str) -> anyhow::Result<Target> {
    let store = crate::mount::open_store(url)?;
    let ws = Workspace::open_existing(&store, name)
        .with_context(|| format!("cannot open workspace {name:?} in {url}"))?
        .with_context(|| format!("there is no workspace {name:?} in {url}"))?;
    Ok(Target {
        store,
        ws,
        url: url.to_string(),
    })
}

/// The workspace of `--workspace`, or of the mount at `mountpoint` (its store and name, as its
/// daemon reports them). Exactly one of them must be given.
pub fn open(args: &WorkspaceArgs, mountpoint: Option<&Path>) -> anyhow::Result<Target> {
    match (mountpoint, &args.workspace) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give either a MOUNTPOINT or --workspace, not both")
        }
        (None, None) => anyhow::bail!(
            "which workspace? Give the MOUNTPOINT of a mount, or --workspace NAME (and --store URL)"
        ),
        (None, Some(name)) => open_existing(&args.store, name),
        (Some(mp), None) => {
            let s = crate::control::client::status(mp, false, Duration::from_secs(30))?;
            open_existing_at(&s.sync.agent.store_url, &s.sync.agent.workspace)
        }
    }
}

/// Splits `W@REF` (REF defaults to HEAD).
pub fn split_ref(s: &str) -> anyhow::Result<(String, GenRef)> {
    match s.split_once('@') {
        Some((w, r)) => Ok((
            w.to_string(),
            r.parse().map_err(|e: String| anyhow::anyhow!("{e}"))?,
        )),
        None => Ok((s.to_string(), GenRef::Head)),
    }
}

/// The workspace and state of `spec`: `W@REF`, or a REF of `workspace` (`--workspace`).
pub fn resolve_spec(
    store: &StoreArgs,
    workspace: Option<&str>,
    spec: &str,
) -> anyhow::Result<(Target, GenerationRecord)> {
    let (name, r) = if spec.contains('@') {
        split_ref(spec)?
    } else {
        let name = workspace.with_context(|| {
            format!("which workspace is {spec:?} of? Pass --workspace NAME, or write NAME@{spec}")
        })?;
        let r = spec.parse().map_err(|e: String| anyhow::anyhow!("{e}"))?;
        (name.to_string(), r)
    };
    let t = open_existing(store, &name)?;
    let record = t.resolve(&r)?;
    Ok((t, record))
}

/// Restores tree `root` into `dest` (created, or an existing empty directory) through the
/// one restore path; on failure nothing half-restored is left: a directory this call made is
/// removed, an existing one emptied again.
pub fn restore_into(
    store: &Store,
    root: &owsfs_store::BlobRef,
    dest: &std::path::Path,
) -> anyhow::Result<()> {
    let created = !dest.exists();
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let bar = crate::progress::Bar::new();
    let r = owsfs_local::restore::restore(store, store, root, dest, &bar);
    if r.is_err() {
        if created {
            let _ = std::fs::remove_dir_all(dest);
        } else if let Ok(rd) = std::fs::read_dir(dest) {
            for e in rd.flatten() {
                let p = e.path();
                let _ = if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
    r.map(|_| ())
}

/// A lease holder for a command that briefly holds a workspace's lease (`copy`, `rollback`).
pub fn cli_holder(what: &str) -> owsfs_store::Holder {
    owsfs_store::Holder {
        node: format!("{:016x}", rand::random::<u64>()),
        host: rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned(),
        pid: std::process::id(),
        session: format!("{:016x}", rand::random::<u64>()),
        cache: format!("owsfs {what}"),
        mountpoint: String::new(),
    }
}

impl Target {
    /// The commit `r` names, with the workspace in the message when it does not resolve.
    pub fn resolve(&self, r: &GenRef) -> anyhow::Result<GenerationRecord> {
        self.ws.resolve(r).with_context(|| {
            format!(
                "cannot find {r} of workspace {:?} in {}",
                self.ws.name(),
                self.url
            )
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn workspace_at_ref() {
        use owsfs_store::GenRef;
        let (w, r) = super::split_ref("src@12").unwrap();
        assert_eq!((w.as_str(), r), ("src", GenRef::Number(12)));
        let (w, r) = super::split_ref("src").unwrap();
        assert_eq!((w.as_str(), r), ("src", GenRef::Head));
        let (_, r) = super::split_ref("src@10m ago").unwrap();
        assert_eq!(r, GenRef::Ago(std::time::Duration::from_secs(600)));
        assert!(super::split_ref("src@").is_err());
    }
}
