//! Command-line interface. These names are a contract that scripts and later commands build on.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::{control, daemon, journal_cmd, mountpoint};

#[derive(Parser, Debug)]
#[command(
    name = "owsfs",
    version,
    about = "A durable local workspace filesystem: a FUSE passthrough over a local cache with a write journal",
    long_about = None,
    after_help = "Run `owsfs COMMAND --help` for the options of a command.\n\
                  Also usable as a mount helper: `mount -t fuse.owsfs CACHE_DIR MOUNTPOINT -o OPTIONS`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a workspace (in the background unless --foreground; returns once it is ready).
    Mount(MountArgs),
    /// Unmount cleanly: stop the daemon after the journal is flushed.
    #[command(alias = "umount")]
    Unmount(UnmountArgs),
    /// Show the state of a mounted workspace.
    Status(StatusArgs),
    /// Inspect a cache's journal offline (the daemon must not be running on it).
    Journal(JournalArgs),
    /// Cut a generation now and wait until it is durable in the store; prints its number.
    Sync(SyncArgs),
    /// List the generations of a workspace in a store.
    Log(LogArgs),
    /// Restore a generation of a workspace into a new directory (no mount; every object is
    /// verified by hash).
    Restore(RestoreArgs),
    /// Hand the workspace off: last cut, wait until durable, release the lease, unmount.
    /// Another node can then mount it at once.
    Handoff(HandoffArgs),
    /// Turn the unsynced changes left in a cache (after a crash or a fail-stop) into a new
    /// workspace: a fork of the cache's last generation plus those changes.
    Recover(RecoverArgs),
    /// Mount, run CMD with the workspace ready, forward signals, hand off when CMD exits, and
    /// exit with CMD's status (a container entrypoint).
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct HandoffArgs {
    /// The mountpoint of a running owsfs mount.
    pub mountpoint: PathBuf,
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// The cache (or a directory set aside in CACHE/aside/) holding the unsynced changes. No
    /// daemon may be running on it.
    #[arg(long)]
    pub cache: PathBuf,
    /// The name of the new workspace (the fork). It must not exist yet.
    #[arg(long = "as", value_name = "NEW_NAME")]
    pub as_name: String,
    /// The store [default: the one the cache belongs to]. It must be that store: the cache's
    /// unchanged data is referenced there, not copied.
    #[arg(long, env = "OWSFS_STORE")]
    pub store: Option<String>,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: CMD's (128+N if a signal N ended it); 75 when the \
                        workspace's lease was lost and CMD was stopped; 1 when the mount or the \
                        handoff failed."
)]
pub struct RunArgs {
    /// Where to mount the workspace for CMD.
    #[arg(long = "mount", value_name = "DIR")]
    pub mount: PathBuf,
    /// How long CMD has to exit after SIGTERM (forwarded, or on fail-stop) before SIGKILL.
    #[arg(long, env = "OWSFS_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub grace: std::time::Duration,
    #[command(flatten)]
    pub opts: MountOpts,
    /// The command and its arguments (after --).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace to restore.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: String,
    /// The generation [default: the newest].
    #[arg(long)]
    pub generation: Option<u64>,
    /// Where to restore: a directory that does not exist yet, or is empty.
    pub dest: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// The store: file:///ABS/PATH, s3://BUCKET/PREFIX?endpoint=URL&region=R (credentials from
    /// AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), or memory:// (tests)
    /// [default: file://$XDG_DATA_HOME/owsfs/store].
    #[arg(long, env = "OWSFS_STORE")]
    pub store: Option<String>,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The mountpoint of a running owsfs mount.
    pub mountpoint: PathBuf,
    /// Give up after this long (e.g. 30s, 5m).
    #[arg(long, env = "OWSFS_SYNC_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
}

#[derive(Args, Debug)]
pub struct LogArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace whose generations to list.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: String,
    /// Print JSON (one array of generation records).
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// Where the workspace appears: an existing, empty directory.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub opts: MountOpts,
}

impl std::ops::Deref for MountArgs {
    type Target = MountOpts;
    fn deref(&self) -> &MountOpts {
        &self.opts
    }
}

/// The options of a mount (shared by `owsfs mount` and `owsfs run`).
#[derive(Args, Debug, Clone)]
pub struct MountOpts {
    /// The cache directory: the backing files and the journal
    /// [default: $XDG_CACHE_HOME/owsfs/<mountpoint name>].
    #[arg(long, env = "OWSFS_CACHE")]
    pub cache: Option<PathBuf>,
    /// Stay in the foreground (logs to stderr; SIGINT/SIGTERM unmount cleanly).
    #[arg(long, short = 'f', env = "OWSFS_FOREGROUND")]
    pub foreground: bool,
    /// Mount options, comma-separated: ro, rw, threads=N (default 4), passthrough=on|off
    /// (default off), writeback_cache, max_inodes=N, attr_timeout=SECS, entry_timeout=SECS,
    /// negative_timeout=SECS, max_write=BYTES, and the usual flags (nosuid, nodev, noexec, ...).
    /// See SEMANTICS.md for what passthrough and writeback_cache change.
    #[arg(short = 'o', env = "OWSFS_OPTIONS", value_name = "OPTS")]
    pub options: Vec<String>,
    /// Log filter for the daemon (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, env = "OWSFS_LOG", default_value = "info")]
    pub log: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace's name in the store [default: the mountpoint's base name]. Created on
    /// first mount; an existing workspace is restored into an empty cache.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: Option<String>,
    /// Cut a generation this often when anything changed (e.g. 1s, 500ms).
    #[arg(long, env = "OWSFS_COMMIT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub commit_interval: std::time::Duration,
    /// Slow writers down while the oldest unsynced change is older than this.
    #[arg(long, env = "OWSFS_MAX_LAG", default_value = "30s", value_parser = parse_duration)]
    pub max_lag: std::time::Duration,
    /// Slow writers down while more than this many bytes are unsynced (e.g. 512MiB, 2GiB).
    #[arg(long, env = "OWSFS_MAX_LAG_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub max_lag_bytes: u64,
    /// Background fetch workers for a workspace restored lazily (0: fetch only what is read).
    #[arg(long, env = "OWSFS_PREFETCH", default_value_t = 4, value_name = "N")]
    pub prefetch: usize,
    /// Bandwidth of the background fetch per second, all workers together (0: no limit).
    #[arg(long, env = "OWSFS_PREFETCH_BANDWIDTH", default_value = "0", value_parser = parse_bytes, value_name = "BYTES")]
    pub prefetch_bandwidth: u64,
    #[command(flatten)]
    pub lease: LeaseArgs,
}

/// How a mount takes the workspace's writer lease.
#[derive(Args, Debug, Clone)]
pub struct LeaseArgs {
    /// How long the lease lasts without renewal (renewed every third of it). A holder that
    /// cannot renew stops writing a quarter of it before it lapses.
    #[arg(long, env = "OWSFS_LEASE_TTL", default_value = "10s", value_parser = parse_lease_ttl)]
    pub lease_ttl: std::time::Duration,
    /// If another node holds the lease, wait until it hands off or its lease lapses.
    #[arg(long, env = "OWSFS_WAIT", conflicts_with = "steal")]
    pub wait: bool,
    /// Take the lease from another node once it has lapsed (watched for one TTL here); fail
    /// if that node keeps renewing it.
    #[arg(long, env = "OWSFS_STEAL")]
    pub steal: bool,
    /// With --steal: take the lease at once, for a node known to be dead. Its late commits
    /// are refused (fenced), and its unsynced writes stay in its cache.
    #[arg(long, requires = "steal")]
    pub force: bool,
}

impl LeaseArgs {
    pub fn takeover(&self) -> owsfs_sync::lease::Takeover {
        use owsfs_sync::lease::Takeover;
        match (self.wait, self.steal, self.force) {
            (_, true, true) => Takeover::Force,
            (_, true, false) => Takeover::Steal,
            (true, _, _) => Takeover::Wait,
            _ => Takeover::Refuse,
        }
    }

    /// The flags again, for the background daemon.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--lease-ttl".to_string(),
            format!("{}ms", self.lease_ttl.as_millis()),
        ];
        if self.wait {
            v.push("--wait".into());
        }
        if self.steal {
            v.push("--steal".into());
        }
        if self.force {
            v.push("--force".into());
        }
        v
    }
}

/// `1s`, `250ms`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86400.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use e.g. 1s, 250ms, 2m)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a duration (use e.g. 1s, 250ms, 2m)"));
    }
    Ok(std::time::Duration::from_secs_f64(v * mult))
}

/// A lease TTL: a duration of at least 500ms (shorter ones would fail-stop on any hiccup).
pub fn parse_lease_ttl(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_millis(500) {
        return Err(format!(
            "{s:?} is too short for a lease TTL (at least 500ms)"
        ));
    }
    Ok(d)
}

/// `1GiB`, `512MiB`, `64KiB`, `1G`, `100M`, or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?} is not a size (use e.g. 512MiB, 1GiB)")),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (use e.g. 512MiB, 1GiB)"))?;
    Ok((v * mult as f64) as u64)
}

/// The store URL: the flag, or the embedded default `file://$XDG_DATA_HOME/owsfs/store`.
pub fn store_url(args: &StoreArgs) -> anyhow::Result<String> {
    if let Some(s) = &args.store {
        return Ok(s.clone());
    }
    let base = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".local/share"),
            None => anyhow::bail!("neither XDG_DATA_HOME nor HOME is set: pass --store URL"),
        },
    };
    let dir = base.join("owsfs").join("store");
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create the default store {}: {e}", dir.display()))?;
    Ok(format!("file://{}", dir.display()))
}

#[derive(Args, Debug)]
pub struct UnmountArgs {
    /// The mountpoint of a running owsfs mount.
    pub mountpoint: PathBuf,
    /// Detach now even if files are open; the daemon finishes when the last one is closed.
    #[arg(long, short = 'l', env = "OWSFS_LAZY")]
    pub lazy: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The mountpoint of a running owsfs mount.
    pub mountpoint: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
    /// Also list the dirty set (files with their dirty extents, and dirty directories).
    #[arg(long, env = "OWSFS_DIRTY")]
    pub dirty: bool,
}

#[derive(Args, Debug)]
pub struct JournalArgs {
    /// The cache directory whose journal to read.
    #[arg(long, env = "OWSFS_CACHE")]
    pub cache: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
}

/// `mount.fuse3` runs helpers as `owsfs SOURCE MOUNTPOINT -o OPTIONS`: turn that into
/// `owsfs mount MOUNTPOINT --cache SOURCE -o OPTIONS`.
pub fn helper_args(args: Vec<OsString>) -> Vec<OsString> {
    let is_subcommand = |a: &OsString| {
        let s = a.to_string_lossy();
        s.starts_with('-')
            || matches!(
                s.as_ref(),
                "mount"
                    | "unmount"
                    | "umount"
                    | "status"
                    | "journal"
                    | "sync"
                    | "log"
                    | "restore"
                    | "handoff"
                    | "recover"
                    | "run"
                    | "help"
            )
    };
    if args.len() >= 3 && !is_subcommand(&args[1]) {
        let mut out = vec![
            args[0].clone(),
            "mount".into(),
            args[2].clone(),
            "--cache".into(),
            args[1].clone(),
        ];
        out.extend(args[3..].iter().cloned());
        return out;
    }
    args
}

pub fn run(args: Vec<OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Mount(args) => daemon::mount(args),
        Command::Unmount(args) => control::unmount(&args.mountpoint, args.lazy),
        Command::Status(args) => control::status(&args.mountpoint, args.json, args.dirty),
        Command::Journal(args) => journal_cmd::inspect_journal(&args.cache, args.json),
        Command::Sync(args) => control::sync(&args.mountpoint, args.timeout),
        Command::Log(args) => crate::log::run(&args),
        Command::Restore(args) => crate::log::restore(&args),
        Command::Handoff(args) => control::handoff(&args.mountpoint),
        Command::Recover(args) => crate::recover::recover(&args),
        Command::Run(args) => return crate::run::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("owsfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The default cache of a mountpoint: `$XDG_CACHE_HOME/owsfs/NAME`.
pub fn default_cache(mountpoint: &std::path::Path) -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".cache"),
            None => anyhow::bail!("neither XDG_CACHE_HOME nor HOME is set: pass --cache DIR"),
        },
    };
    let name = mountpoint::name_of(mountpoint);
    Ok(base.join("owsfs").join(name))
}
