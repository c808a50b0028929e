//! `owsfs template`: mark a workspace a template (a read-mostly source that forks start
//! from), unmark it, list the templates of a store.

use clap::{Args, Subcommand};

use super::target;
use crate::args::StoreArgs;

#[derive(Args, Debug)]
pub struct TemplateArgs {
    #[command(subcommand)]
    pub command: TemplateCommand,
}

#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// Mark a workspace a template: writer mounts of it are refused (unless `owsfs mount
    /// --edit-template`); read-only mounts and forks (`owsfs fork TEMPLATE NEW`) are what it
    /// is for.
    Mark(NameArgs),
    /// Make a template an ordinary workspace again.
    Unmark(NameArgs),
    /// The templates of a store.
    List(ListArgs),
}

#[derive(Args, Debug)]
pub struct NameArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: String,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print JSON (an array of {workspace, since_unix_ms, by}).
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
}

pub fn run(args: &TemplateArgs) -> anyhow::Result<()> {
    match &args.command {
        TemplateCommand::Mark(a) => {
            let t = target::open_existing(&a.store, &a.workspace)?;
            let h = target::cli_holder("template mark");
            let m =
                t.ws.mark_template(&format!("host {} (pid {})", h.host, h.pid))?;
            println!(
                "{} is a template since {} (fork it: `owsfs fork {} NEW`)",
                t.ws.name(),
                time(m.since_unix_ms),
                t.ws.name()
            );
        }
        TemplateCommand::Unmark(a) => {
            let t = target::open_existing(&a.store, &a.workspace)?;
            if t.ws.unmark_template()? {
                println!("{} is an ordinary workspace again", t.ws.name());
            } else {
                println!("{} was not a template", t.ws.name());
            }
        }
        TemplateCommand::List(a) => {
            let store = crate::mount::open_store(&a.store.url()?)?;
            let all = owsfs_store::template::templates(&store)?;
            if a.json {
                let v: Vec<_> = all
                    .iter()
                    .map(|(n, m)| {
                        serde_json::json!({"workspace": n, "since_unix_ms": m.since_unix_ms, "by": m.by})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if all.is_empty() {
                eprintln!("no templates in {}", store.url());
            } else {
                for (n, m) in all {
                    println!("{n}\tsince {}\tby {}", time(m.since_unix_ms), m.by);
                }
            }
        }
    }
    Ok(())
}

fn time(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|_| ms.to_string())
}
