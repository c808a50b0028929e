//! One configuration, three sources, in this order of precedence: flags, `OWSFS_*` environment
//! variables, and a TOML file (`--config FILE`, `OWSFS_CONFIG`, or
//! `$XDG_CONFIG_HOME/owsfs/config.toml` when it exists). The file's keys are the long options
//! of `owsfs mount` and `owsfs run` (`commit_interval` or `commit-interval`); the other
//! commands take `store` and `workspace` from it. A `[workspace.NAME]` section applies to
//! that workspace only, before the top level. The file fills in what neither a flag
//! nor the environment gave: its values are added to the command line, so every value goes
//! through the same parser and checks.
//!
//! ```toml
//! store = "s3://bucket/ws?endpoint=http://127.0.0.1:8333"
//! commit_interval = "1s"
//! options = ["passthrough=on"]
//!
//! [workspace.agent-7]
//! commit_interval = "200ms"
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::parser::ValueSource;

/// Options no file may set: the file's own, clap's, and internal ones.
const NOT_IN_A_FILE: [&str; 4] = ["help", "version", "config", "default-cache"];

/// A configuration file, read and checked.
pub struct File {
    pub path: PathBuf,
    table: toml::Table,
}

/// Where each value added from the file came from (long option → "PATH" or
/// "PATH [workspace.NAME]").
pub type Sources = BTreeMap<String, String>;

/// The file `--config`/`OWSFS_CONFIG` names (it must exist), or the default one if it exists.
pub fn find(explicit: Option<&Path>) -> anyhow::Result<Option<File>> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let dir = match std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
                Some(d) => PathBuf::from(d),
                None => match std::env::var_os("HOME") {
                    Some(h) => PathBuf::from(h).join(".config"),
                    None => return Ok(None),
                },
            };
            let p = dir.join("owsfs/config.toml");
            if !p.exists() {
                return Ok(None);
            }
            p
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        anyhow::anyhow!("{} is not valid TOML: {}", path.display(), e.message())
    })?;
    let file = File { path, table };
    file.check()?;
    Ok(Some(file))
}

/// The commands whose options a file sets: a mount's configuration.
const CONFIGURED: [&str; 2] = ["mount", "run"];

/// Options the file also gives the other commands, where they mean the same thing (an option
/// named alike elsewhere may mean something else: `gc --grace` is not `run --grace`).
const SHARED: [&str; 2] = ["store", "workspace"];

/// The keys a file may use (long options of `mount` and `run`, aliases included), each with
/// the option it stands for.
fn known_keys() -> Vec<(String, String)> {
    let cmd = crate::cmd::command();
    let mut out = Vec::new();
    for c in CONFIGURED.iter().filter_map(|n| cmd.find_subcommand(n)) {
        for a in c.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if NOT_IN_A_FILE.contains(&long) || a.is_hide_set() {
                continue;
            }
            out.push((long.to_string(), long.to_string()));
            for alias in a.get_visible_aliases().into_iter().flatten() {
                out.push((alias.to_string(), long.to_string()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The known key nearest to `key`, if any is near.
fn nearest<'a>(key: &str, known: &'a [(String, String)]) -> Option<&'a str> {
    known
        .iter()
        .map(|(k, _)| (strsim::jaro_winkler(key, k), k.as_str()))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

impl File {
    /// Unknown keys, and values no option takes, are errors that name the key.
    fn check(&self) -> anyhow::Result<()> {
        let known = known_keys();
        let check_table = |t: &toml::Table, section: &str| -> anyhow::Result<()> {
            for (k, v) in t {
                if section.is_empty() && k == "workspace" {
                    continue;
                }
                let long = k.replace('_', "-");
                if !known.iter().any(|(key, _)| *key == long) {
                    let hint = nearest(&long, &known)
                        .map(|n| format!("; did you mean {:?}?", n.replace('-', "_")))
                        .unwrap_or_default();
                    bail!(
                        "unknown key {k:?}{section} in {}{hint}",
                        self.path.display()
                    );
                }
                let scalar = |v: &toml::Value| {
                    matches!(
                        v,
                        toml::Value::String(_)
                            | toml::Value::Integer(_)
                            | toml::Value::Float(_)
                            | toml::Value::Boolean(_)
                    )
                };
                let ok = match v {
                    toml::Value::Array(a) => a.iter().all(scalar),
                    v => scalar(v),
                };
                if !ok {
                    bail!(
                        "key {k:?}{section} in {}: a string, number, boolean or list of them",
                        self.path.display()
                    );
                }
            }
            Ok(())
        };
        check_table(&self.table, "")?;
        if let Some(w) = self.table.get("workspace") {
            let Some(sections) = w.as_table() else {
                bail!(
                    "\"workspace\" in {} must be sections: [workspace.NAME]",
                    self.path.display()
                );
            };
            for (name, t) in sections {
                let Some(t) = t.as_table() else {
                    bail!(
                        "workspace.{name} in {} must be a section: [workspace.{name}]",
                        self.path.display()
                    );
                };
                check_table(t, &format!(" (in [workspace.{name}])"))?;
            }
        }
        Ok(())
    }

    /// The values for workspace `ws` (its section's first, then the top level), as
    /// (long option, values, where from).
    fn values_for(&self, ws: Option<&str>) -> Vec<(String, Vec<toml::Value>, String)> {
        let known = known_keys();
        let canonical = |key: &str| {
            let long = key.replace('_', "-");
            known
                .iter()
                .find(|(k, _)| *k == long)
                .map_or(long.clone(), |(_, c)| c.clone())
        };
        let mut out = Vec::new();
        let mut add = |t: &toml::Table, from: String| {
            for (k, v) in t {
                if k == "workspace" && !from.contains('[') {
                    continue;
                }
                let values = match v {
                    toml::Value::Array(a) => a.clone(),
                    v => vec![v.clone()],
                };
                out.push((canonical(k), values, from.clone()));
            }
        };
        let path = self.path.display().to_string();
        if let Some(ws) = ws
            && let Some(t) = self
                .table
                .get("workspace")
                .and_then(|w| w.get(ws))
                .and_then(|t| t.as_table())
        {
            add(t, format!("{path} [workspace.{ws}]"));
        }
        add(&self.table, path);
        out
    }
}

fn text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `args` with the file's values added for the options the command has that were given
/// neither as flags nor by the environment; and where each added value came from. Arguments
/// that do not parse are returned as they are (the real parse reports them).
pub fn merge(args: Vec<OsString>) -> anyhow::Result<(Vec<OsString>, Sources, Option<PathBuf>)> {
    let cmd = crate::cmd::command();
    let Ok(matches) = cmd.clone().try_get_matches_from(&args) else {
        return Ok((args, Sources::new(), None));
    };
    // `--config` is global: it may follow the command.
    let mut explicit = matches.get_one::<PathBuf>("config");
    let mut mm = &matches;
    while let Some((_, sub)) = mm.subcommand() {
        explicit = sub.get_one::<PathBuf>("config").or(explicit);
        mm = sub;
    }
    let file = find(explicit.map(PathBuf::as_path))?;
    let Some(file) = file else {
        return Ok((args, Sources::new(), None));
    };
    // The command in use, however deep (`snapshot create`), and its arguments.
    let mut names = Vec::new();
    let (mut m, mut c) = (&matches, &cmd);
    while let Some((name, sub)) = m.subcommand() {
        names.push(name.to_string());
        c = c
            .find_subcommand(name)
            .expect("the parser's own subcommand");
        m = sub;
    }
    // The workspace: named, or (a mount's) after the mountpoint.
    let mountpoint = ["mountpoint", "mount"]
        .into_iter()
        .find_map(|id| m.try_get_one::<PathBuf>(id).ok().flatten());
    let ws = match m.try_get_one::<String>("workspace") {
        Ok(Some(w)) => Some(w.clone()),
        _ => match (names.first().map(String::as_str), mountpoint) {
            (Some("mount" | "run"), Some(mp)) => Some(crate::mountpoint::name_of(mp)),
            _ => None,
        },
    };
    let mut added: Vec<OsString> = Vec::new();
    let mut sources = Sources::new();
    let configured = names
        .first()
        .is_some_and(|n| CONFIGURED.contains(&n.as_str()));
    for (long, values, from) in file.values_for(ws.as_deref()) {
        if !configured && !SHARED.contains(&long.as_str()) {
            continue;
        }
        let Some(arg) = c
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
        else {
            continue; // an option of another command
        };
        // `-o` options add up: the file's come first, so that the command line's (after
        // them) win where they say otherwise (mount(8) always passes `-o rw`).
        let adds_up = long == "options";
        if sources.contains_key(&long)
            || (!adds_up
                && matches!(
                    m.value_source(arg.get_id().as_str()),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                ))
        {
            continue;
        }
        if arg.get_action().takes_values() {
            for v in &values {
                added.push(format!("--{long}={}", text(v)).into());
            }
        } else if values.iter().any(|v| v.as_bool() == Some(true)) {
            added.push(format!("--{long}").into());
        }
        sources.insert(long, from);
    }
    // Right after the command's name (or an alias of it): before a `--` or a trailing
    // command line.
    let mut at = 1;
    let mut level = &cmd;
    for name in &names {
        level = level
            .find_subcommand(name)
            .expect("the parser's own subcommand");
        let spellings: Vec<&str> = std::iter::once(level.get_name())
            .chain(level.get_all_aliases())
            .collect();
        if let Some(i) = args[at..]
            .iter()
            .position(|a| a.to_str().is_some_and(|a| spellings.contains(&a)))
        {
            at += i + 1;
        }
    }
    let mut out = args[..at].to_vec();
    out.extend(added);
    out.extend_from_slice(&args[at..]);
    Ok((out, sources, Some(file.path)))
}
