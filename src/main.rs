//! owsfs: a durable local workspace filesystem.

mod cli;
mod control;
mod daemon;
mod journal_cmd;
mod log;
mod mountpoint;
mod options;
mod recover;
mod run;

fn main() -> std::process::ExitCode {
    let args = cli::helper_args(std::env::args_os().collect());
    cli::run(args)
}
