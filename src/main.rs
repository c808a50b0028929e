//! owsfs: a durable local workspace filesystem. The binary parses, wires and reports; the
//! logic lives in the library crates (see ARCHITECTURE.md).

mod args;
mod cmd;
mod config;
mod control;
mod failpoints;
mod logwriter;
mod mount;
mod mountpoint;
mod options;
mod progress;

fn main() -> std::process::ExitCode {
    if let Err(e) = failpoints::setup_from_env() {
        eprintln!("owsfs: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The daemon's syncfs helper (`sync/src/pages.rs`), not a command.
    if args.len() == 3 && args[1] == owsfs_sync::pages::HELPER_ARG {
        owsfs_sync::pages::helper_main(std::path::Path::new(&args[2]));
    }
    cmd::main(args)
}
