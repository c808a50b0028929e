//! Command-line interface. These names are a contract that scripts and later commands build on.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::{cache, control, daemon, mountpoint};

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
}

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// Where the workspace appears: an existing, empty directory.
    pub mountpoint: PathBuf,
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
                "mount" | "unmount" | "umount" | "status" | "journal" | "help"
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
        Command::Journal(args) => cache::inspect_journal(&args.cache, args.json),
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
