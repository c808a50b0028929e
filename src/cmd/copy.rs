//! `owsfs copy SRC_STORE#WS[@REF] DST_STORE[#NEW]`: a workspace's history (or one state) into
//! another store, uploading only the packs the destination lacks. The laptop-to-cloud path:
//! build on the embedded `file://` store, copy to `s3://`, mount there, and copy back.

use anyhow::Context;
use clap::Args;

use super::target;

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The source: STORE_URL#WORKSPACE, or STORE_URL#WORKSPACE@REF for one state (a
    /// generation number, a snapshot, `10m ago`, an RFC 3339 time).
    pub source: String,
    /// The destination: STORE_URL, or STORE_URL#NAME to give the copy another name. A copy
    /// into a workspace copied before adds what is new, unless it was written there since.
    pub dest: String,
    /// Print the report as JSON.
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
}

/// Splits `URL#REST` at the last `#`.
fn split_hash(s: &str) -> (&str, Option<&str>) {
    match s.rsplit_once('#') {
        Some((u, r)) => (u, Some(r)),
        None => (s, None),
    }
}

pub fn run(args: &CopyArgs) -> anyhow::Result<()> {
    let (src_url, spec) = split_hash(&args.source);
    let spec = spec.context("the source needs its workspace: STORE_URL#WORKSPACE[@REF]")?;
    let (ws_name, r) = match spec.split_once('@') {
        Some(_) => {
            let (w, r) = target::split_ref(spec)?;
            (w, Some(r))
        }
        None => (spec.to_string(), None),
    };
    let (dst_url, new) = split_hash(&args.dest);
    let dst_name = new.unwrap_or(&ws_name).to_string();
    if src_url == dst_url && dst_name == ws_name {
        anyhow::bail!("the source and the destination are the same workspace");
    }
    let src = target::open_existing(
        &crate::args::StoreArgs {
            store: Some(src_url.to_string()),
        },
        &ws_name,
    )?;
    let only = r.as_ref().map(|r| src.resolve(r)).transpose()?;
    let dst = crate::mount::open_store(dst_url)?;
    let holder = target::cli_holder("copy");
    let bar = crate::progress::Bar::new();
    let report =
        owsfs_store::copy::copy_workspace(&src.ws, only.as_ref(), &dst, &dst_name, &holder, &bar)
            .with_context(|| format!("cannot copy {ws_name:?} from {src_url} to {dst_url}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "copied {} generations ({} already there), {} snapshots, {} packs ({} bytes; {} \
             already there) to {dst_url}#{dst_name}; its newest generation is {}",
            report.generations_copied,
            report.generations_present,
            report.snapshots_copied,
            report.packs_copied,
            report.bytes_copied,
            report.packs_present,
            report.head.map_or("-".into(), |h| h.to_string())
        );
    }
    Ok(())
}
