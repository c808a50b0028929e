//! `owsfs restart`: replaces the daemon of a mount with a new one, the binary now at its path,
//! without unmounting (an upgrade in place). Programs using the mount wait meanwhile.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

#[derive(Args, Debug)]
pub struct RestartArgs {
    /// The mountpoint of a running owsfs mount (a background one: it has a supervisor).
    pub mountpoint: PathBuf,
    /// Give up waiting for the new daemon after this long (e.g. 30s, 5m).
    #[arg(long, default_value = "2m", value_parser = crate::args::parse_duration)]
    pub timeout: Duration,
}

pub fn run(args: &RestartArgs) -> anyhow::Result<()> {
    let mp = &args.mountpoint;
    let before = crate::control::client::status(mp, false, Duration::from_secs(30))?;
    let Some(supervisor) = before.supervisor else {
        bail!(
            "{} has no supervisor to keep its connection (a --foreground or read-only mount): \
             unmount and mount it again instead",
            mp.display()
        );
    };
    let started = Instant::now();
    let old = crate::control::client::restart(mp)?;
    // The new daemon answers once it serves; until then the socket is gone or refuses.
    loop {
        if let Ok(s) = crate::control::client::status(mp, false, Duration::from_secs(5))
            && s.pid != old
        {
            let daemon = s.supervisor.map_or(0, |s| s.daemon);
            eprintln!(
                "owsfs: restarted the daemon of {}: pid {old} → {} (daemon {daemon} of \
                 supervisor {}), in {} ms",
                mp.display(),
                s.pid,
                supervisor.pid,
                started.elapsed().as_millis()
            );
            return Ok(());
        }
        if started.elapsed() > args.timeout {
            let log = owsfs_local::Cache::log_path(&before.cache);
            return Err(anyhow::anyhow!(
                "no new daemon answers for {} after {:?}; its log is {}",
                mp.display(),
                args.timeout,
                log.display()
            ))
            .context("restart");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
