//! The commands. Each module owns its arguments and its `run`; this one only dispatches.
//! These names are a contract that scripts and later commands build on.

mod config;
mod copy;
mod diff;
pub mod drill;
mod export;
mod fork;
mod gc;
mod handoff;
mod journal;
mod log;
mod manual;
pub mod mount;
mod recover;
mod restart;
mod restore;
mod retention;
mod rollback;
mod run;
mod snapshot;
mod status;
mod sync;
mod target;
mod template;
mod unmount;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "owsfs",
    version,
    about = "A durable local workspace filesystem: a FUSE passthrough over a local cache with a write journal",
    long_about = None,
    after_help = "Run `owsfs COMMAND --help` for the options of a command.\n\
                  Also a mount helper: `mount -t fuse.owsfs STORE_URL#WORKSPACE MOUNTPOINT -o \
                  cache=DIR,...` (or a CACHE_DIR as the source), and in /etc/fstab."
)]
struct Cli {
    /// A TOML file of defaults: long options as keys, `[workspace.NAME]` sections
    /// [default: $XDG_CONFIG_HOME/owsfs/config.toml, if it exists]. Flags and OWSFS_*
    /// variables win over it. `owsfs config show` prints what is in effect.
    #[arg(long, global = true, env = "OWSFS_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// The whole parser (for the config file's keys, completions and manual pages).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command()
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount a workspace (in the background unless --foreground; returns once it is ready).
    Mount(mount::MountArgs),
    /// Unmount cleanly: stop the daemon after the journal is flushed.
    #[command(alias = "umount")]
    Unmount(unmount::UnmountArgs),
    /// Show the state of a mounted workspace.
    Status(status::StatusArgs),
    /// Inspect a cache's journal offline (the daemon must not be running on it).
    Journal(journal::JournalArgs),
    /// Cut a generation now and wait until it is durable in the store; prints its number.
    Sync(sync::SyncArgs),
    /// Replace the daemon of a mount with a new one (the binary now at its path) without
    /// unmounting: programs using it wait meanwhile (an upgrade in place).
    Restart(restart::RestartArgs),
    /// List the generations of a workspace in a store.
    Log(log::LogArgs),
    /// Restore a generation of a workspace into a new directory (no mount; every object is
    /// verified by hash).
    Restore(restore::RestoreArgs),
    /// Hand the workspace off: last cut, wait until durable, release the lease, unmount.
    /// Another node can then mount it at once.
    Handoff(handoff::HandoffArgs),
    /// Turn the unsynced changes left in a cache (after a crash or a fail-stop) into a new
    /// workspace: a fork of the cache's last generation plus those changes.
    Recover(recover::RecoverArgs),
    /// Mount, run CMD with the workspace ready, forward signals, hand off when CMD exits, and
    /// exit with CMD's status (a container entrypoint).
    Run(run::RunArgs),
    /// Name a state of a workspace (create), list the names, delete one.
    Snapshot(snapshot::SnapshotArgs),
    /// Make a new workspace that starts from a state of another (no data is copied); the
    /// source goes on, and the fork can be mounted at once, anywhere.
    Fork(fork::ForkArgs),
    /// What changed between two states of a workspace (or of a fork and its source):
    /// added, removed, modified, renamed; with --sqlite, the tables whose row counts changed.
    Diff(diff::DiffArgs),
    /// Write a state of a workspace as a plain directory tree or a tar archive (.tar,
    /// .tar.zst, or - for stdout), every object verified.
    Export(export::ExportArgs),
    /// Prove a generation restores: restore it into a temporary directory, verify every hash,
    /// the tree's shape and each SQLite database, and record the outcome in the store.
    Drill(drill::DrillArgs),
    /// Collect garbage in a store: apply each workspace's retention, then delete packs no
    /// kept generation, snapshot or fork references (a grace after they were found so).
    Gc(gc::GcArgs),
    /// Show or set which generations a workspace keeps (everything recent, hourly, daily).
    Retention(retention::RetentionArgs),
    /// Copy a workspace's history (or one state) to another store, uploading only what the
    /// destination lacks: STORE#WS[@REF] to STORE[#NEW].
    Copy(copy::CopyArgs),
    /// Go back to an earlier state: a new generation whose tree is REF's (history is kept, so
    /// it can be undone). On a MOUNTPOINT the mount serves it at once.
    Rollback(rollback::RollbackArgs),
    /// Mark a workspace a template (a read-mostly source that forks start from), unmark it,
    /// list the templates.
    Template(template::TemplateArgs),
    /// Print a shell completion script (e.g. `owsfs completions bash >
    /// /etc/bash_completion.d/owsfs`).
    Completions(manual::CompletionsArgs),
    /// Print the manual page (`owsfs man | man -l -`), or write a page per command with --dir.
    Man(manual::ManArgs),
    /// The configuration in effect: `owsfs config show [MOUNT ARGS]` prints every option of a
    /// mount with its value and where it came from (flag, environment, file, default).
    Config(config::ConfigArgs),
}

/// Whether `name` is one of the commands (or an alias, or `help`): taken from the parser, so
/// a new command can never be mistaken for the mount helper's SOURCE.
fn is_command_name(name: &str) -> bool {
    use clap::CommandFactory;
    name == "help"
        || Cli::command()
            .get_subcommands()
            .any(|c| c.get_name() == name || c.get_all_aliases().any(|a| a == name))
}

pub use config::redact_url;

/// `mount.fuse3` runs helpers as `owsfs SOURCE MOUNTPOINT -o OPTIONS`. SOURCE is a cache
/// directory (`owsfs mount MOUNTPOINT --cache SOURCE`) or `STORE_URL#WORKSPACE`
/// (`--store STORE_URL --workspace WORKSPACE`, and the mount table shows SOURCE). In OPTIONS,
/// `KEY=VALUE` (or `KEY`) for a long option of `owsfs mount` becomes `--KEY=VALUE`
/// (`cache=DIR,commit_interval=1s`); the rest stay mount options.
fn helper_args(args: Vec<OsString>) -> Vec<OsString> {
    let is_command = |a: &OsString| {
        let s = a.to_string_lossy();
        s.starts_with('-') || is_command_name(&s)
    };
    let argv0 = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Run as /sbin/umount.fuse.owsfs (umount(8) runs it for a fuse.owsfs mount):
    // `umount.fuse.owsfs DIR [-flags]` is `owsfs unmount DIR`, which waits for the handoff.
    if argv0.ends_with("umount.fuse.owsfs") {
        let mut out: Vec<OsString> =
            vec![args[0].clone(), "unmount".into(), "--umount-helper".into()];
        let mut dir = None;
        let mut rest = args[1..].iter();
        while let Some(a) = rest.next() {
            match a.to_str() {
                Some("-t") => {
                    rest.next();
                }
                Some(f) if f.starts_with('-') => {
                    // -l lazy, -f force; -n, -v, -r, -i, -d: nothing for owsfs to do.
                    if f.contains('l') {
                        out.push("--lazy".into());
                    }
                    if f.contains('f') {
                        out.push("--force".into());
                    }
                }
                _ if dir.is_none() => dir = Some(a.clone()),
                _ => {}
            }
        }
        out.extend(dir);
        return out;
    }
    // Run as /sbin/mount.fuse.owsfs (mount(8) runs that for `-t fuse.owsfs` when it exists),
    // the arguments are always the helper's.
    let as_helper = argv0.ends_with("mount.fuse.owsfs");
    // mount(8)'s flags for helpers: -f (fake: do nothing), -n (no mtab), -s (sloppy), -v.
    let fake = as_helper && args.iter().any(|a| a == "-f");
    // A mount helper says nothing on success, as mount(8) does, unless asked to (-v).
    let verbose = args.iter().any(|a| a == "-v");
    let args: Vec<OsString> = if as_helper {
        args.into_iter()
            .filter(|a| !matches!(a.to_str(), Some("-n" | "-s" | "-v" | "-f")))
            .collect()
    } else {
        args
    };
    if fake {
        std::process::exit(0);
    }
    if args.len() < 3 || (!as_helper && is_command(&args[1])) {
        return args;
    }
    let mut out = vec![args[0].clone(), "mount".into(), args[2].clone()];
    if !verbose {
        out.push("--quiet".into());
    }
    let source = args[1].to_string_lossy().into_owned();
    if source.contains("://") {
        let (url, ws) = match source.rsplit_once('#') {
            Some((u, w)) => (u, Some(w)),
            None => (source.as_str(), None),
        };
        out.extend(["--store".into(), url.into()]);
        if let Some(w) = ws {
            out.extend(["--workspace".into(), w.into()]);
        }
        out.extend(["--fsname".into(), source.clone().into()]);
    } else {
        out.extend(["--cache".into(), args[1].clone()]);
    }
    let longs: Vec<String> = command()
        .find_subcommand("mount")
        .map(|m| {
            m.get_arguments()
                .filter(|a| !a.is_hide_set())
                .filter_map(|a| a.get_long().map(str::to_string))
                .filter(|l| !matches!(l.as_str(), "options" | "help"))
                .collect()
        })
        .unwrap_or_default();
    let mut rest = args[3..].iter();
    while let Some(a) = rest.next() {
        let value = match a.to_str() {
            // mount(8) may name the type (`-t fuse.owsfs`) or a namespace (`-N ns`): nothing
            // for owsfs to do with either.
            Some("-t" | "-N") if as_helper => {
                rest.next();
                continue;
            }
            Some("-o") => rest.next().cloned(),
            Some(s) if s.starts_with("-o") => Some(s[2..].into()),
            _ => {
                out.push(a.clone());
                continue;
            }
        };
        let Some(value) = value else { continue };
        let mut kept = Vec::new();
        for opt in value.to_string_lossy().split(',') {
            let (key, v) = opt
                .split_once('=')
                .map_or((opt, None), |(k, v)| (k, Some(v)));
            let long = key.replace('_', "-");
            if longs.contains(&long) {
                out.push(match v {
                    Some(v) => format!("--{long}={v}").into(),
                    None => format!("--{long}").into(),
                });
            } else if !opt.is_empty() {
                kept.push(opt.to_string());
            }
        }
        if !kept.is_empty() {
            out.extend(["-o".into(), kept.join(",").into()]);
        }
    }
    out
}

/// Whether the command in `args` is one the config file configures (mount, run, config).
fn configures(args: &[OsString]) -> bool {
    let cmd = command();
    // The command is the first argument that is neither an option nor `--config`'s value.
    let mut rest = args.iter().skip(1).map(|a| a.to_string_lossy());
    let name = loop {
        match rest.next() {
            Some(a) if a == "--config" => {
                rest.next();
            }
            Some(a) if a.starts_with('-') => {}
            other => break other,
        }
    };
    name.is_some_and(|a| {
        ["mount", "run", "config"].iter().any(|n| {
            cmd.find_subcommand(n)
                .is_some_and(|c| c.get_name() == a || c.get_all_aliases().any(|x| x == a))
        })
    })
}

/// Parses `args` (the mount-helper form too) and runs the command.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let args = helper_args(args);
    let (args, from_file, file) = match crate::config::merge(args.clone()) {
        Ok(m) => m,
        // A bad file stops what it configures (a mount); the other commands say so and go
        // on without it, so that `owsfs unmount` or `status` still work.
        Err(e) if !configures(&args) => {
            eprintln!("owsfs: warning: {e:#}; going on without the config file");
            (args, Default::default(), None)
        }
        Err(e) => {
            eprintln!("owsfs: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(f) = &file {
        // The background daemon reads the same file (it inherits the environment).
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("OWSFS_CONFIG", f) };
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            if e.use_stderr() && !from_file.is_empty() {
                let from: Vec<String> = from_file
                    .iter()
                    .map(|(k, f)| format!("--{k} from {f}"))
                    .collect();
                eprintln!("note: the config file gave {}", from.join(", "));
            }
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    if !matches!(cli.command, Command::Mount(_) | Command::Run(_)) {
        // `owsfs log | head` ends quietly, as other tools do, instead of a panic on the closed
        // pipe. Not for the daemons (`mount`, `run`), which must outlive a reader that left.
        // SAFETY: signal(2) with a valid signal number and SIG_DFL, before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        // Commands log to stderr: warnings by default, `OWSFS_LOG=debug` for the whole of a
        // failed store request (an error says only its cause). The daemons set up their own.
        crate::mount::background::init_logging(
            &std::env::var("OWSFS_LOG").unwrap_or_else(|_| "warn".into()),
            crate::args::LogFormat::from_env(),
        );
    }
    let result = match cli.command {
        Command::Mount(a) => mount::run(a),
        Command::Unmount(a) => unmount::run(&a),
        Command::Status(a) => status::run(&a),
        Command::Journal(a) => journal::run(&a),
        Command::Sync(a) => sync::run(&a),
        Command::Restart(a) => restart::run(&a),
        Command::Log(a) => log::run(&a),
        Command::Restore(a) => restore::run(&a),
        Command::Handoff(a) => handoff::run(&a),
        Command::Recover(a) => recover::run(&a),
        Command::Run(a) => return run::run(a),
        Command::Snapshot(a) => snapshot::run(&a),
        Command::Fork(a) => fork::run(&a),
        Command::Diff(a) => diff::run(&a),
        Command::Export(a) => export::run(&a),
        Command::Drill(a) => drill::run(&a),
        Command::Gc(a) => gc::run(&a),
        Command::Retention(a) => retention::run(&a),
        Command::Copy(a) => copy::run(&a),
        Command::Rollback(a) => rollback::run(&a),
        Command::Template(a) => template::run(&a),
        Command::Completions(a) => manual::completions(&a),
        Command::Man(a) => manual::man(&a),
        Command::Config(a) => config::run(&a, file.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("owsfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_helper_form_becomes_a_mount() {
        let args: Vec<OsString> = ["owsfs", "/c", "/w", "-o", "rw"].map(Into::into).into();
        let got = helper_args(args);
        let want: Vec<OsString> = [
            "owsfs", "mount", "/w", "--quiet", "--cache", "/c", "-o", "rw",
        ]
        .map(Into::into)
        .into();
        assert_eq!(got, want);
        // mount -v: what the mount did is said.
        let args: Vec<OsString> = ["mount.fuse.owsfs", "/c", "/w", "-v", "-o", "rw"]
            .map(Into::into)
            .into();
        assert!(!helper_args(args).iter().any(|a| a == "--quiet"));
        let status: Vec<OsString> = ["owsfs", "status", "/w"].map(Into::into).into();
        assert_eq!(helper_args(status.clone()), status);
    }

    #[test]
    fn every_command_is_known_to_the_helper_form() {
        for name in ["umount", "copy", "gc", "help", "snapshot"] {
            assert!(is_command_name(name), "{name}");
        }
        assert!(!is_command_name("/c"));
        let copy: Vec<OsString> = ["owsfs", "copy", "file:///a#w", "file:///b"]
            .map(Into::into)
            .into();
        assert_eq!(helper_args(copy.clone()), copy);
    }
}
