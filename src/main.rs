//! owsfs: a durable local workspace filesystem. The binary parses, wires and reports; the
//! logic lives in the library crates (see ARCHITECTURE.md).

mod args;
mod cmd;
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
    cmd::main(std::env::args_os().collect())
}
