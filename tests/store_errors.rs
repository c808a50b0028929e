//! Store failures as a person reads them: one short sentence that says what failed, the cause
//! (HTTP status and S3 error code, or the errno) and what to do, never opendal's whole context.
//! Against a real SeaweedFS: a missing bucket, wrong keys, and the server stopped; through a
//! command (`owsfs log`) and through `owsfs mount`.

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;

use std::process::Command;

use common::*;
use seaweed::Seaweed;

/// The longest line a CLI error may print.
const MAX_LINE: usize = 300;

/// Runs `owsfs ARGS` with `env`, expecting it to fail; returns its stderr after checking
/// every line is short.
fn fails(args: &[&str], env: &[(String, String)]) -> String {
    let out = Command::new(OWSFS)
        .args(args)
        .env_remove("OWSFS_CACHE")
        .env("XDG_DATA_HOME", test_data_home())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run owsfs");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "owsfs {args:?} succeeded: {err}");
    for line in err.lines() {
        assert!(
            line.chars().count() <= MAX_LINE,
            "a line of {} characters (at most {MAX_LINE}): {line}",
            line.chars().count()
        );
        for noise in ["context: {", "headers", "<?xml", "reqwest::", "S3Error {"] {
            assert!(!line.contains(noise), "{noise:?} in: {line}");
        }
    }
    err
}

/// Each way in: a command, and a mount (which must leave nothing mounted).
fn both(url: &str, env: &[(String, String)], want: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let _guard = MountGuard(mp.clone());
    let cache = dir.path().join("cache");
    for args in [
        vec!["log", "--store", url, "--workspace", "w"],
        vec![
            "mount",
            mp.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
            "--store",
            url,
            "--workspace",
            "w",
        ],
    ] {
        let err = fails(&args, env);
        for w in want {
            assert!(err.contains(w), "{args:?}: no {w:?} in: {err}");
        }
        assert!(!is_mounted(&mp));
    }
}

#[test]
fn store_errors_are_one_short_sentence() {
    if skip_fuse() {
        return;
    }
    let s3 = Seaweed::start();
    s3.create_bucket("there");

    // A bucket that does not exist.
    both(
        &s3.store_url("nosuch", "p"),
        &s3.env(),
        &[
            "bucket \"nosuch\" does not exist",
            "NoSuchBucket",
            "create it",
        ],
    );

    // Wrong keys: a wrong secret, and a key id the server does not know.
    for (key, secret) in [
        (s3.env()[0].1.clone(), "wrong".to_string()),
        ("NOSUCHKEY".into(), s3.env()[1].1.clone()),
    ] {
        let mut env = s3.env();
        env[0].1 = key;
        env[1].1 = secret;
        both(
            &s3.store_url("there", "p"),
            &env,
            &[
                "credentials were refused",
                "HTTP 403",
                "AWS_SECRET_ACCESS_KEY",
            ],
        );
    }

    // The server stopped.
    let url = s3.store_url("there", "p");
    let env = s3.env();
    drop(s3);
    both(
        &url,
        &env,
        &["not reachable", "Connection refused", "is up and reachable"],
    );
}

/// Nothing secret reaches a log, at any level: not the secret key, not a request signature.
/// A daemon logs at `trace` through a mount, a sync and an unmount on SeaweedFS, and a command
/// logs a refused request at `trace`.
#[test]
fn no_secret_is_ever_logged() {
    if skip_fuse() {
        return;
    }
    let s3 = Seaweed::start();
    s3.create_bucket("logs");
    let env = s3.env();
    let secret = env
        .iter()
        .find(|(k, _)| k == "AWS_SECRET_ACCESS_KEY")
        .map(|(_, v)| v.clone())
        .unwrap();
    let url = s3.store_url("logs", "p");
    let dir = tempfile::tempdir().unwrap();
    let (mp, cache) = (dir.path().join("mnt"), dir.path().join("cache"));
    std::fs::create_dir(&mp).unwrap();
    let _guard = MountGuard(mp.clone());
    let run = |args: &[&str], env: &[(String, String)]| {
        Command::new(OWSFS)
            .args(args)
            .env_remove("OWSFS_CACHE")
            .env("XDG_DATA_HOME", test_data_home())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run owsfs")
    };
    let (mps, caches) = (mp.to_string_lossy(), cache.to_string_lossy());
    for format in ["text", "json"] {
        let out = run(
            &[
                "mount",
                &mps,
                "--cache",
                &caches,
                "--store",
                &url,
                "--workspace",
                "w",
                "--log",
                // Directives naming the signer's targets cannot let it speak either.
                "trace,reqsign=trace,reqsign_core::api=trace",
                "--log-format",
                format,
            ],
            &env,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(mp.join("f"), format.repeat(1000)).unwrap();
        assert!(run(&["sync", &mps], &env).status.success());
        assert!(run(&["unmount", &mps], &env).status.success());
    }
    let mut wrong = env.clone();
    for (k, v) in wrong.iter_mut() {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = format!("{secret}x");
        }
    }
    wrong.push(("OWSFS_LOG".into(), "trace,reqsign_core=trace".into()));
    let refused = run(&["log", "--store", &url, "--workspace", "w"], &wrong);
    assert!(!refused.status.success());

    let daemon_log = std::fs::read_to_string(cache.join("owsfs.log")).unwrap();
    assert!(
        daemon_log.contains("committed") && daemon_log.contains("\"level\":\"TRACE\""),
        "the daemon logged at trace, as text and as JSON"
    );
    let command_log = String::from_utf8_lossy(&refused.stderr).into_owned();
    for (what, log) in [("daemon", &daemon_log), ("command", &command_log)] {
        for needle in [
            secret.as_str(),
            "Signature=",
            "X-Amz-Signature",
            "x-amz-signature",
            "authorization:",
            "Authorization:",
        ] {
            assert!(
                !log.contains(needle),
                "the {what} log holds {needle:?}: {}",
                log.lines().find(|l| l.contains(needle)).unwrap_or("")
            );
        }
    }
}
