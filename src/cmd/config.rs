//! `owsfs config show [MOUNT ARGS]`: every option of a mount with its value and where it came
//! from, as `owsfs mount` would see it: a flag, an `OWSFS_*` variable, the config file (and
//! its section), or the default. Credentials from the environment are shown redacted.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub what: ConfigCmd,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the configuration in effect for `owsfs mount ARGS` (MOUNTPOINT defaults to
    /// /workspace).
    Show {
        /// The arguments of `owsfs mount`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "MOUNT ARGS"
        )]
        args: Vec<OsString>,
    },
}

/// Environment variables whose values are secrets: named, never shown.
const SECRETS: [&str; 3] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

pub fn run(args: &ConfigArgs, file: Option<&Path>) -> anyhow::Result<()> {
    let ConfigCmd::Show { args } = &args.what;
    let mut argv: Vec<OsString> = vec!["owsfs".into(), "mount".into()];
    argv.extend(args.iter().cloned());
    // Without a MOUNTPOINT, as for /workspace.
    if super::command()
        .try_get_matches_from(&argv)
        .is_err_and(|e| e.kind() == clap::error::ErrorKind::MissingRequiredArgument)
    {
        argv.insert(2, "/workspace".into());
    }
    let (argv, from_file, _) = crate::config::merge(argv)?;
    let cmd = super::command();
    let matches = match cmd.clone().try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) => {
            let from: Vec<String> = from_file
                .iter()
                .map(|(k, f)| format!("--{k} from {f}"))
                .collect();
            let first = e.render().to_string();
            let first = first
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ");
            if from.is_empty() {
                anyhow::bail!("{first}");
            }
            anyhow::bail!("{first} (the config file gave {})", from.join(", "));
        }
    };
    let (_, m) = matches.subcommand().expect("mount");
    // The mount options are checked as the mount will check them.
    let options: Vec<String> = m
        .get_many::<String>("options")
        .map(|v| v.cloned().collect())
        .unwrap_or_default();
    if let Err(e) = crate::options::parse(&options) {
        let from = from_file
            .get("options")
            .map(|f| format!(" (the config file {f} gave options)"))
            .unwrap_or_default();
        anyhow::bail!("{e:#}{from}");
    }
    let mount = cmd.find_subcommand("mount").expect("mount");
    println!(
        "# config file: {}",
        file.map_or("none".to_string(), |f| f.display().to_string())
    );
    for arg in mount.get_arguments() {
        let Some(long) = arg.get_long() else {
            continue;
        };
        if arg.is_hide_set() || matches!(long, "help" | "version" | "config") {
            continue;
        }
        let id = arg.get_id().as_str();
        let values: Vec<String> = m
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let source = match (from_file.get(long), m.value_source(id)) {
            (Some(f), _) => format!("file {f}"),
            (None, Some(ValueSource::CommandLine)) => "flag".to_string(),
            (None, Some(ValueSource::EnvVariable)) => format!(
                "environment {}",
                arg.get_env()
                    .map_or(String::new(), |e| e.to_string_lossy().into_owned())
            ),
            (None, Some(ValueSource::DefaultValue)) => "default".to_string(),
            _ => "unset".to_string(),
        };
        let (shown, source) = match (long, values.is_empty()) {
            // Defaults the mount works out.
            ("workspace", true) => (
                m.get_one::<std::path::PathBuf>("mountpoint")
                    .map_or("-".into(), |mp| crate::mountpoint::name_of(mp)),
                "default (the mountpoint's name)".to_string(),
            ),
            ("store", true) => (
                "file://$XDG_DATA_HOME/owsfs/store".to_string(),
                "default".to_string(),
            ),
            ("cache", true) => (
                "$XDG_CACHE_HOME/owsfs/<workspace>".to_string(),
                "default".to_string(),
            ),
            _ => (shown(&values), source),
        };
        println!("{:<20} = {shown:<40} # {source}", long.replace('-', "_"));
    }
    for name in SECRETS {
        if std::env::var_os(name).is_some() {
            println!("{name:<20} = <redacted>{:<30} # environment {name}", "");
        }
    }
    Ok(())
}

/// Values as one line, URLs without their user information.
fn shown(values: &[String]) -> String {
    if values.is_empty() {
        "-".to_string()
    } else {
        values
            .iter()
            .map(|v| redact_url(v))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A URL with its user information (`user:password@`) hidden.
pub fn redact_url(v: &str) -> String {
    match v.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://<redacted>@{host}{tail}"),
                None => {
                    // An endpoint inside the query may carry them too.
                    match tail.split_once("://") {
                        Some((before, after)) => {
                            format!("{scheme}://{authority}{before}://{}", redact_inner(after))
                        }
                        None => v.to_string(),
                    }
                }
            }
        }
        None => v.to_string(),
    }
}

fn redact_inner(after: &str) -> String {
    let end = after.find(['/', '?', '&']).unwrap_or(after.len());
    match after[..end].rsplit_once('@') {
        Some((_, host)) => format!("<redacted>@{host}{}", &after[end..]),
        None => after.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_lose_their_user_information() {
        use super::redact_url;
        assert_eq!(
            redact_url("s3://b/p?endpoint=http://k:s@h:1&region=r"),
            "s3://b/p?endpoint=http://<redacted>@h:1&region=r"
        );
        assert_eq!(
            redact_url("http://user:pw@host/x"),
            "http://<redacted>@host/x"
        );
        assert_eq!(redact_url("file:///a/b"), "file:///a/b");
        assert_eq!(redact_url("1s"), "1s");
    }
}
