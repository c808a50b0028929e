//! owsfs: a durable local workspace filesystem.

mod cache;
mod cli;
mod control;
mod crashpoint;
mod daemon;
mod hydrate;
mod lease;
mod log;
mod logwriter;
mod mountpoint;
mod options;
mod recover;
mod run;
mod sync;

fn main() -> std::process::ExitCode {
    let args = cli::helper_args(std::env::args_os().collect());
    cli::run(args)
}
