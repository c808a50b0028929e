//! `owsfs retention`: show or set which generations a workspace keeps.

use std::time::Duration;

use clap::Args;
use owsfs_store::retention::Policy;

use super::target;
use crate::args::StoreArgs;

#[derive(Args, Debug)]
pub struct RetentionArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: String,
    /// Keep every generation made within this long (e.g. 1h).
    #[arg(long, value_parser = crate::args::parse_duration, value_name = "DURATION")]
    pub keep_all: Option<Duration>,
    /// Keep the newest generation of each hour within this long (e.g. 1d).
    #[arg(long, value_parser = crate::args::parse_duration, value_name = "DURATION")]
    pub hourly: Option<Duration>,
    /// Keep the newest generation of each day within this long (e.g. 7d).
    #[arg(long, value_parser = crate::args::parse_duration, value_name = "DURATION")]
    pub daily: Option<Duration>,
    /// Go back to the defaults (everything for 1h, hourly for 1d, daily for 7d).
    #[arg(long, conflicts_with_all = ["keep_all", "hourly", "daily"])]
    pub reset: bool,
}

pub fn run(args: &RetentionArgs) -> anyhow::Result<()> {
    let t = target::open_existing(&args.store, &args.workspace)?;
    let mut p = t.ws.retention()?;
    let change =
        args.reset || args.keep_all.is_some() || args.hourly.is_some() || args.daily.is_some();
    if args.reset {
        p = Policy::default();
    }
    if let Some(d) = args.keep_all {
        p.all_secs = d.as_secs();
    }
    if let Some(d) = args.hourly {
        p.hourly_secs = d.as_secs();
    }
    if let Some(d) = args.daily {
        p.daily_secs = d.as_secs();
    }
    if change {
        t.ws.set_retention(&p)?;
    }
    println!("{}: {p}", t.ws.name());
    Ok(())
}
