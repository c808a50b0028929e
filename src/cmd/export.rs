//! `owsfs export REF DEST`: a state of a workspace as a plain directory tree, or as a tar
//! archive (`.tar`, `.tar.zst`, or `-` for a tar on stdout). Every object is verified by hash.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use owsfs_store::Store;

use super::target;
use crate::args::StoreArgs;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The state: REF (of --workspace) or WORKSPACE@REF. A REF is a generation number, a
    /// snapshot name, HEAD, `10m ago` or an RFC 3339 time.
    pub state: String,
    /// Where: a directory that does not exist yet (or is empty), FILE.tar, FILE.tar.zst
    /// (also .tzst), or `-` for a tar archive on stdout.
    pub dest: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace of a REF given without WORKSPACE@.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: Option<String>,
    /// zstd level of a .tar.zst (1 fastest .. 19 smallest).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd_level: i32,
}

enum Dest {
    Dir(PathBuf),
    Tar { path: Option<PathBuf>, zstd: bool },
}

fn dest_kind(p: &Path) -> Dest {
    let s = p.to_string_lossy();
    if s == "-" {
        Dest::Tar {
            path: None,
            zstd: false,
        }
    } else if s.ends_with(".tar.zst") || s.ends_with(".tzst") {
        Dest::Tar {
            path: Some(p.to_path_buf()),
            zstd: true,
        }
    } else if s.ends_with(".tar") {
        Dest::Tar {
            path: Some(p.to_path_buf()),
            zstd: false,
        }
    } else {
        Dest::Dir(p.to_path_buf())
    }
}

pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let (t, record) = target::resolve_spec(&args.store, args.workspace.as_deref(), &args.state)?;
    let root = record
        .root
        .with_context(|| format!("generation {} has no tree", record.number))?;
    let store: &Store = &t.store;
    let what = format!("generation {} of {}", record.number, t.ws.name());
    let bar = crate::progress::Bar::new();
    match dest_kind(&args.dest) {
        Dest::Dir(dir) => {
            super::target::restore_into(store, &root, &dir)
                .with_context(|| format!("cannot export {what}"))?;
            eprintln!("exported {what} to {}", dir.display());
        }
        Dest::Tar { path: None, zstd } => {
            let out = std::io::stdout().lock();
            write_tar(
                store,
                &root,
                out,
                zstd,
                args.zstd_level,
                record.stats.bytes_total,
                &bar,
            )
            .with_context(|| format!("cannot export {what}"))?;
        }
        Dest::Tar {
            path: Some(path),
            zstd,
        } => {
            // Written beside, then renamed: a failed export leaves no partial archive.
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let tmp = tempfile::Builder::new()
                .prefix(".owsfs-export-")
                .tempfile_in(&dir)
                .with_context(|| format!("cannot create a file in {}", dir.display()))?;
            let n = write_tar(
                store,
                &root,
                tmp.as_file(),
                zstd,
                args.zstd_level,
                record.stats.bytes_total,
                &bar,
            )
            .with_context(|| format!("cannot export {what}"))?;
            tmp.as_file()
                .sync_all()
                .with_context(|| format!("cannot write {}", path.display()))?;
            tmp.persist(&path)
                .with_context(|| format!("cannot rename the archive to {}", path.display()))?;
            eprintln!(
                "exported {what} to {}: {} entries, {} bytes of files{}",
                path.display(),
                n.entries,
                n.bytes,
                if n.sockets_skipped > 0 {
                    format!(" ({} sockets left out)", n.sockets_skipped)
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}

fn write_tar<W: Write>(
    store: &Store,
    root: &owsfs_store::BlobRef,
    out: W,
    zstd: bool,
    level: i32,
    total: u64,
    bar: &crate::progress::Bar,
) -> anyhow::Result<owsfs_local::export::Exported> {
    let mut out = std::io::BufWriter::new(out);
    if zstd {
        let mut z = zstd::Encoder::new(&mut out, level).context("cannot start zstd")?;
        let n = owsfs_local::export::export_tar(store, root, &mut z, total, bar)?;
        z.finish().context("cannot finish the zstd stream")?;
        out.flush()?;
        Ok(n)
    } else {
        let n = owsfs_local::export::export_tar(store, root, &mut out, total, bar)?;
        out.flush()?;
        Ok(n)
    }
}
