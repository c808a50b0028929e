//! Argument groups that several commands share (the store, the options of a mount, the lease),
//! their value parsers, and the default places (`$XDG_DATA_HOME`, `$XDG_CACHE_HOME`).
//! Commands own their other arguments.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use owsfs_sync::lease::Takeover;

/// How log lines look.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// `OWSFS_LOG_FORMAT` for the commands that are not daemons (text unless it says json).
    pub fn from_env() -> LogFormat {
        match std::env::var("OWSFS_LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// `--store`.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// The store: file:///ABS/PATH, s3://BUCKET/PREFIX?endpoint=URL&region=R (credentials from
    /// AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), or memory:// (tests)
    /// [default: file://$XDG_DATA_HOME/owsfs/store].
    #[arg(long, env = "OWSFS_STORE")]
    pub store: Option<String>,
}

impl StoreArgs {
    /// The store URL: the flag, or the embedded default `file://$XDG_DATA_HOME/owsfs/store`
    /// (created if missing).
    pub fn url(&self) -> anyhow::Result<String> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let dir = xdg_dir("XDG_DATA_HOME", ".local/share", "--store URL")?
            .join("owsfs")
            .join("store");
        std::fs::create_dir_all(&dir).map_err(|e| {
            anyhow::anyhow!("cannot create the default store {}: {e}", dir.display())
        })?;
        Ok(format!("file://{}", dir.display()))
    }
}

/// The options of a mount (shared by `owsfs mount` and `owsfs run`).
#[derive(Args, Debug, Clone)]
pub struct MountOpts {
    /// The cache directory: the backing files and the journal
    /// [default: $XDG_CACHE_HOME/owsfs/<workspace name>, or <workspace name>.read-only].
    #[arg(long, env = "OWSFS_CACHE")]
    pub cache: Option<PathBuf>,
    /// (internal) The `--cache` a background daemon gets is the default one, not the user's
    /// choice: it exempts no mount from the default-name rule (`mount::identity`).
    #[arg(long, hide = true, requires = "cache")]
    pub default_cache: bool,
    /// (internal) The mount's source as the mount table shows it (the mount helper's
    /// STORE_URL#WORKSPACE) [default: the cache directory].
    #[arg(long, hide = true)]
    pub fsname: Option<String>,
    /// Say nothing on success: what the mount did goes to its log only. The mount helper's
    /// default (`mount -t fuse.owsfs`), unless mount(8) is given -v. Errors are always said.
    #[arg(long, env = "OWSFS_QUIET")]
    pub quiet: bool,
    /// Stay in the foreground (logs to stderr; SIGINT/SIGTERM unmount cleanly).
    #[arg(long, short = 'f', env = "OWSFS_FOREGROUND")]
    pub foreground: bool,
    /// Mount options, comma-separated: ro, rw, remount (with ro|rw and the flags: changes the
    /// mount that is there), threads=N (default 4), passthrough=on|off
    /// (default off), writeback_cache[=on|off], durability=strict|default (strict: every
    /// fsync waits until the store holds the data), strict_timeout=SECS (default 60),
    /// acl|noacl (POSIX ACLs, default acl), max_inodes=N, attr_timeout=SECS,
    /// entry_timeout=SECS, negative_timeout=SECS, max_write=BYTES, and the usual flags
    /// (nosuid, nodev, noexec, ...). See SEMANTICS.md for what they change.
    #[arg(
        short = 'o',
        long = "options",
        env = "OWSFS_OPTIONS",
        value_name = "OPTS"
    )]
    pub options: Vec<String>,
    /// Log level of the daemon (error, warn, info, debug, trace, or a tracing filter such as
    /// `info,owsfs_sync=debug`). Info logs a line per commit.
    #[arg(
        long,
        visible_alias = "log-level",
        env = "OWSFS_LOG",
        default_value = "info"
    )]
    pub log: String,
    /// Log lines as text, or as JSON objects (one per line, with the event's fields).
    #[arg(long, env = "OWSFS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace's name in the store [default: the mountpoint's base name]. Created on
    /// first mount; an existing workspace is restored into an empty cache. A default name
    /// does not attach a workspace last mounted at another path (say --workspace to).
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: Option<String>,
    /// Adopt the mountpoint's own files: the directory is served in place (its files stay
    /// there; the journal and the state go to the cache), the first generation uploads what
    /// was there, and after unmount it is a plain directory holding the latest contents. An
    /// existing workspace is adopted only by a directory that holds exactly its newest
    /// generation.
    #[arg(long, env = "OWSFS_ADOPT", conflicts_with_all = ["read_only", "at"])]
    pub adopt: bool,
    /// Mount without the writer's lease: every write fails with EROFS, any number of such
    /// mounts can run beside the writer, on any node. Shows --at, or the newest generation.
    #[arg(long, env = "OWSFS_READ_ONLY")]
    pub read_only: bool,
    /// Mount this state, read-only (implies --read-only): a generation number, a snapshot
    /// name, HEAD, `10m ago`, an RFC 3339 time.
    #[arg(long, value_name = "REF", value_parser = parse_ref)]
    pub at: Option<String>,
    /// Cut a generation this often when anything changed (e.g. 1s, 500ms).
    #[arg(long, env = "OWSFS_COMMIT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub commit_interval: Duration,
    /// Slow writers down while the oldest unsynced change is older than this.
    #[arg(long, env = "OWSFS_MAX_LAG", default_value = "30s", value_parser = parse_duration)]
    pub max_lag: Duration,
    /// Slow writers down while more than this many bytes are unsynced (e.g. 512MiB, 2GiB).
    #[arg(long, env = "OWSFS_MAX_LAG_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub max_lag_bytes: u64,
    /// Background fetch workers for a workspace restored lazily (0: fetch only what is read).
    #[arg(long, env = "OWSFS_PREFETCH", default_value_t = 4, value_name = "N")]
    pub prefetch: usize,
    /// Bandwidth of the background fetch per second, all workers together (0: no limit).
    #[arg(long, env = "OWSFS_PREFETCH_BANDWIDTH", default_value = "0", value_parser = parse_bytes, value_name = "BYTES")]
    pub prefetch_bandwidth: u64,
    /// How the blobs this mount uploads are compressed: zstd:LEVEL (1 fastest to 19
    /// smallest), zstd (level 1), or off (the store format before compression). Blobs that do
    /// not shrink by 1/32 are stored as they are. Reading takes every format whatever this
    /// says.
    #[arg(long, env = "OWSFS_COMPRESSION", default_value = "zstd:1", value_parser = parse_compression)]
    pub compression: owsfs_store::Compression,
    /// Automatic snapshots to keep: one is taken at each handoff (unmount), and the oldest
    /// beyond this many are deleted. Snapshots named with `owsfs snapshot create` stay until
    /// deleted. 0: take none.
    #[arg(
        long,
        env = "OWSFS_KEEP_SNAPSHOTS",
        default_value_t = 5,
        value_name = "N"
    )]
    pub keep_snapshots: usize,
    /// Mount a template (`owsfs template mark`) for writing: templates are read-mostly, and
    /// are otherwise mounted --read-only or forked.
    #[arg(long)]
    pub edit_template: bool,
    /// Run a restore drill this often (e.g. 1h): the newest generation, or every other time
    /// a random older one, restored into --drill-scratch and verified; the outcome goes to
    /// the store, the log and `owsfs status` [default: never].
    #[arg(long, env = "OWSFS_DRILL_EVERY", value_parser = parse_duration, value_name = "DURATION")]
    pub drill_every: Option<Duration>,
    /// Where drills restore (it needs room for a whole generation) [default: $TMPDIR].
    #[arg(long, env = "OWSFS_DRILL_SCRATCH", value_name = "DIR")]
    pub drill_scratch: Option<PathBuf>,
    /// Run retention and GC of the whole store this often (e.g. 1h), as `owsfs gc` does
    /// [default: never].
    #[arg(long, env = "OWSFS_GC_EVERY", value_parser = parse_duration, value_name = "DURATION")]
    pub gc_every: Option<Duration>,
    /// The grace of the daemon's GC runs (see `owsfs gc --grace`).
    #[arg(long, env = "OWSFS_GC_GRACE", default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    pub gc_grace: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; port 0 picks a
    /// free one, shown by `owsfs status --json`).
    #[arg(long, env = "OWSFS_METRICS", value_name = "ADDR")]
    pub metrics: Option<String>,
    #[command(flatten)]
    pub lease: LeaseArgs,
}

impl MountOpts {
    /// The flags again, for the background daemon (everything but the mountpoint, `--cache`
    /// and `--foreground`).
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--log".to_string(),
            self.log.clone(),
            "--log-format".to_string(),
            match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .to_string(),
        ];
        for o in &self.options {
            v.extend(["-o".to_string(), o.clone()]);
        }
        if let Some(s) = &self.store.store {
            v.extend(["--store".to_string(), s.clone()]);
        }
        if let Some(w) = &self.workspace {
            v.extend(["--workspace".to_string(), w.clone()]);
        }
        v.extend([
            "--commit-interval".to_string(),
            format!("{}ms", self.commit_interval.as_millis()),
            "--max-lag".to_string(),
            format!("{}ms", self.max_lag.as_millis()),
            "--max-lag-bytes".to_string(),
            self.max_lag_bytes.to_string(),
            "--prefetch".to_string(),
            self.prefetch.to_string(),
            "--prefetch-bandwidth".to_string(),
            self.prefetch_bandwidth.to_string(),
            "--compression".to_string(),
            self.compression.to_string(),
            "--keep-snapshots".to_string(),
            self.keep_snapshots.to_string(),
        ]);
        if let Some(d) = self.drill_every {
            v.extend(["--drill-every".to_string(), format!("{}ms", d.as_millis())]);
        }
        if self.read_only {
            v.push("--read-only".to_string());
        }
        if self.adopt {
            v.push("--adopt".to_string());
        }
        if self.edit_template {
            v.push("--edit-template".to_string());
        }
        if let Some(r) = &self.at {
            v.extend(["--at".to_string(), r.clone()]);
        }
        if let Some(d) = self.gc_every {
            v.extend(["--gc-every".to_string(), format!("{}ms", d.as_millis())]);
        }
        v.extend([
            "--gc-grace".to_string(),
            format!("{}ms", self.gc_grace.as_millis()),
        ]);
        if let Some(d) = &self.drill_scratch {
            // The daemon does not keep the caller's working directory.
            let d = std::path::absolute(d).unwrap_or_else(|_| d.clone());
            v.extend([
                "--drill-scratch".to_string(),
                d.to_string_lossy().into_owned(),
            ]);
        }
        if let Some(m) = &self.metrics {
            v.extend(["--metrics".to_string(), m.clone()]);
        }
        if let Some(f) = &self.fsname {
            v.extend(["--fsname".to_string(), f.clone()]);
        }
        v.extend(self.lease.to_args());
        v
    }

    /// The user named the cache (`--cache`, `OWSFS_CACHE`, the mount helper's source).
    pub fn cache_is_explicit(&self) -> bool {
        self.cache.is_some() && !self.default_cache
    }

    /// The cache: `--cache`, or `$XDG_CACHE_HOME/owsfs/NAME`. NAME is the workspace's: the
    /// mountpoint's base name, or `--workspace`. (Before owsfs 0.2 it was always the
    /// mountpoint's; a cache of that name that holds the `--workspace` is still used, so an
    /// older cache with unsynced changes is not passed over.)
    pub fn cache_dir(&self, mountpoint: &Path) -> anyhow::Result<PathBuf> {
        if let Some(c) = &self.cache {
            return Ok(c.clone());
        }
        // A read-only mount never shares a writer's default cache.
        let suffix = if self.read_only || self.at.is_some() {
            ".read-only"
        } else {
            ""
        };
        let base = xdg_dir("XDG_CACHE_HOME", ".cache", "--cache DIR")?.join("owsfs");
        let by_mountpoint = base.join(format!(
            "{}{suffix}",
            crate::mountpoint::name_of(mountpoint)
        ));
        Ok(match &self.workspace {
            // An invalid name is refused later, with its reason; it names no directory.
            Some(w)
                if owsfs_store::generation::valid_workspace_name(w)
                    && !cache_holds(&by_mountpoint, w) =>
            {
                base.join(format!("{w}{suffix}"))
            }
            _ => by_mountpoint,
        })
    }
}

/// Whether the cache at `dir` holds workspace `name` (its `state.db`, read without a lock:
/// a daemon may be serving it).
fn cache_holds(dir: &Path, name: &str) -> bool {
    use rusqlite::{Connection, OpenFlags, OptionalExtension};
    let path = dir.join("state.db");
    if !path.exists() {
        return false;
    }
    Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row("SELECT value FROM meta WHERE key = 'workspace'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()
        })
        .is_ok_and(|w| w.as_deref() == Some(name))
}

/// How a mount takes the workspace's writer lease.
#[derive(Args, Debug, Clone)]
pub struct LeaseArgs {
    /// How long the lease lasts without renewal (renewed every third of it). A holder that
    /// cannot renew stops writing a quarter of it before it lapses.
    #[arg(long, env = "OWSFS_LEASE_TTL", default_value = "10s", value_parser = parse_lease_ttl)]
    pub lease_ttl: Duration,
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
    pub fn takeover(&self) -> Takeover {
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

/// A duration: `1s`, `250ms`, `2m`, `1h 30m`, `1d` (humantime), or plain seconds (`30`,
/// `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
    } else if let Ok(d) = humantime::parse_duration(t) {
        return Ok(d);
    }
    Err(format!("{s:?} is not a duration (use e.g. 1s, 250ms, 2m)"))
}

/// A REF (checked here, kept as written so the daemon gets it as given).
pub fn parse_ref(s: &str) -> Result<String, String> {
    s.parse::<owsfs_store::GenRef>()?;
    Ok(s.to_string())
}

/// A lease TTL: a duration of at least 500ms (shorter ones would fail-stop on any hiccup).
pub fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(500) {
        return Err(format!(
            "{s:?} is too short for a lease TTL (at least 500ms)"
        ));
    }
    Ok(d)
}

/// A size: `1GiB`, `512MiB`, `64K`, `1G`, `100MB`, or plain bytes. As owsfs always took them,
/// the units are binary whether or not they say `i` (`1G` = `1GB` = `1GiB` = 2^30 bytes);
/// bytesize parses the normalized form.
pub fn parse_compression(s: &str) -> Result<owsfs_store::Compression, String> {
    s.parse()
}

pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size (use e.g. 512MiB, 1GiB)");
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => "B",
        "k" | "kb" | "kib" => "KiB",
        "m" | "mb" | "mib" => "MiB",
        "g" | "gb" | "gib" => "GiB",
        "t" | "tb" | "tib" => "TiB",
        _ => return Err(bad()),
    };
    format!("{num} {unit}")
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| bad())
}

/// `$VAR`, or `$HOME/fallback`.
fn xdg_dir(var: &str, fallback: &str, flag: &str) -> anyhow::Result<PathBuf> {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => Ok(PathBuf::from(home).join(fallback)),
            None => anyhow::bail!("neither {var} nor HOME is set: pass {flag}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_lease_ttl("100ms").is_err());
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("8MiB"), Ok(8 << 20));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        // Binary, as owsfs always took them.
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("100MB"), Ok(100 << 20));
        assert_eq!(parse_bytes("1.5k"), Ok(1536));
        assert!(parse_bytes("lots").is_err());
    }

    /// What the daemon is started with says everything the user gave `owsfs mount`.
    #[test]
    fn the_daemon_gets_every_mount_option() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            opts: MountOpts,
        }
        let given = [
            "x",
            "--store",
            "memory://a",
            "--workspace",
            "w",
            "--commit-interval",
            "2s",
            "--max-lag",
            "5s",
            "--max-lag-bytes",
            "1MiB",
            "--prefetch",
            "2",
            "--prefetch-bandwidth",
            "1000",
            "--keep-snapshots",
            "3",
            "--drill-every",
            "1h",
            "--drill-scratch",
            "/scratch",
            "--gc-every",
            "1d",
            "--read-only",
            "--edit-template",
            "--at",
            "10m ago",
            "--gc-grace",
            "2h",
            "--lease-ttl",
            "3s",
            "--wait",
        ];
        let a = <Cli as clap::Parser>::parse_from(given).opts;
        let mut again = vec!["x".to_string()];
        again.extend(a.to_args());
        let b = <Cli as clap::Parser>::parse_from(again).opts;
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_eq!(b.keep_snapshots, 3);
        assert_eq!(b.drill_every, Some(Duration::from_secs(3600)));
        // --adopt excludes --read-only and --at.
        let a = <Cli as clap::Parser>::parse_from(["x", "--adopt"]).opts;
        let mut again = vec!["x".to_string()];
        again.extend(a.to_args());
        assert!(<Cli as clap::Parser>::parse_from(again).opts.adopt);
        assert!(<Cli as clap::Parser>::try_parse_from(["x", "--adopt", "--read-only"]).is_err());
    }
}
