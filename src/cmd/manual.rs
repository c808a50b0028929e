//! `owsfs completions SHELL` and `owsfs man`: shell completion scripts and manual pages,
//! generated from the same parser the commands use, so they never drift from `--help`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory};

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write owsfs.1 and a page per command (owsfs-mount.1, ...) into DIR instead of printing
    /// owsfs.1 to stdout. Section 1 pages: to install them, DIR is a `man1` directory, e.g.
    /// /usr/local/share/man/man1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Prints the completion script of `args.shell` to stdout.
pub fn completions(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "owsfs", &mut std::io::stdout());
    Ok(())
}

/// Prints owsfs.1, or writes every page into `--dir`.
pub fn man(args: &ManArgs) -> anyhow::Result<()> {
    let cmd = super::Cli::command();
    match &args.dir {
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("cannot write the manual page"),
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the manual pages into {}", dir.display()))?;
            eprintln!("owsfs: manual pages written to {}", dir.display());
            Ok(())
        }
    }
}
