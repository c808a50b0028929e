//! The command-line contract: the mount-helper calling convention, foreground mounts and
//! signals, environment variables.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
#[cfg(target_os = "linux")] // mount(8) helpers, /proc/self/mountinfo, unshare
fn mount_helper_convention_through_mount_fuse3() {
    if skip_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cache, mp, bin) = (
        dir.path().join("cache"),
        dir.path().join("mp"),
        dir.path().join("bin"),
    );
    std::fs::create_dir(&mp).unwrap();
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(OWSFS, bin.join("owsfs")).unwrap();
    // mount(8) runs `mount.fuse3 SRC DIR -t fuse.owsfs -o OPTS`, which runs `owsfs SRC DIR -o
    // OPTS` from PATH.
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run_ok(
        Command::new("mount.fuse3")
            .env("XDG_DATA_HOME", test_data_home())
            .arg(&cache)
            .arg(&mp)
            .args(["-t", "fuse.owsfs", "-o", "rw,nosuid,nodev,threads=3"])
            .env("PATH", &path),
    );
    let _guard = MountGuard(mp.clone());
    assert!(is_mounted(&mp));
    std::fs::write(mp.join("f"), b"through the helper").unwrap();
    assert_eq!(
        std::fs::read(cache.join("backing/f")).unwrap(),
        b"through the helper"
    );
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(&*mp.to_string_lossy()))
        .unwrap();
    assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
    let out = owsfs(&["unmount", &mp.to_string_lossy()]);
    assert!(out.status.success());
    assert!(!is_mounted(&mp));
}

#[test]
fn foreground_daemon_unmounts_cleanly_on_sigterm_and_sigint() {
    if skip_fuse() {
        return;
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let (cache, mp) = (dir.path().join("cache"), dir.path().join("mp"));
        std::fs::create_dir(&mp).unwrap();
        let mut child = Command::new(OWSFS)
            .env("XDG_DATA_HOME", test_data_home())
            .arg("mount")
            .arg(&mp)
            .arg("--foreground")
            .env("OWSFS_CACHE", &cache)
            // Each round's mountpoint is another directory named mp: a workspace of its own.
            .env("OWSFS_WORKSPACE", format!("signal-{sig}"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _guard = MountGuard(mp.clone());
        assert!(
            wait_for(Duration::from_secs(10), || is_mounted(&mp)),
            "foreground mount came up"
        );
        std::fs::write(mp.join("f"), b"x").unwrap();
        // SAFETY: kill(2) on our child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let status = child.wait().unwrap();
        assert!(status.success(), "exit after signal {sig}: {status}");
        assert!(!is_mounted(&mp));
        assert!(
            cache.join("journal/CLEAN").exists(),
            "the journal was closed cleanly"
        );
    }
}

#[test]
fn environment_variables_stand_in_for_flags() {
    if skip_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cache, mp) = (dir.path().join("envcache"), dir.path().join("mp"));
    std::fs::create_dir(&mp).unwrap();
    let out = Command::new(OWSFS)
        .env("XDG_DATA_HOME", test_data_home())
        .arg("mount")
        .arg(&mp)
        .env("OWSFS_CACHE", &cache)
        .env("OWSFS_OPTIONS", "threads=2,passthrough=off")
        .output()
        .unwrap();
    let _guard = MountGuard(mp.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(OWSFS)
        .env("XDG_DATA_HOME", test_data_home())
        .args(["status"])
        .arg(&mp)
        .env("OWSFS_JSON", "true")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let unmounted = owsfs(&["unmount", &mp.to_string_lossy()]);
    assert!(unmounted.status.success());
    assert_eq!(v["cache"].as_str().unwrap(), cache.to_str().unwrap());
    assert_eq!(v["passthrough"], false);
}

#[test]
fn default_cache_is_under_xdg_cache_home() {
    if skip_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("myws");
    std::fs::create_dir(&mp).unwrap();
    let out = Command::new(OWSFS)
        .env("XDG_DATA_HOME", test_data_home())
        .arg("mount")
        .arg(&mp)
        .env_remove("OWSFS_CACHE")
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    let _guard = MountGuard(mp.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exists = dir.path().join("xdg/owsfs/myws/backing").is_dir();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("xdg/owsfs/myws"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "the cache is private");
    let unmounted = owsfs(&["unmount", &mp.to_string_lossy()]);
    assert!(unmounted.status.success());
    assert!(exists, "cache at $XDG_CACHE_HOME/owsfs/<mountpoint name>");
}

/// A mount without `--workspace` takes its mountpoint's base name. It says what it did, and
/// it never attaches a workspace that was last mounted at another path of that base name,
/// unless told to (`--workspace`, or the workspace's own cache named with `--cache`).
#[test]
fn a_default_name_never_attaches_a_workspace_mounted_elsewhere() {
    if skip_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a/data"), dir.path().join("b/data"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let _guards = (MountGuard(a.clone()), MountGuard(b.clone()));
    let xdg_cache = dir.path().join("xdg");
    let mount = |mp: &std::path::Path, args: &[&str]| {
        let out = Command::new(OWSFS)
            .arg("mount")
            .arg(mp)
            .args(args)
            .env_remove("OWSFS_CACHE")
            .env_remove("OWSFS_WORKSPACE")
            .env("XDG_DATA_HOME", dir.path().join("data"))
            .env("XDG_CACHE_HOME", &xdg_cache)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let unmount = |mp: &std::path::Path| {
        let out = owsfs(&["unmount", &mp.to_string_lossy()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let refused = |ok: bool, err: &str, here: &std::path::Path, there: &std::path::Path| {
        assert!(!ok, "attached without a word: {err}");
        assert!(
            err.contains(&*here.to_string_lossy())
                && err.contains(&*there.to_string_lossy())
                && err.contains("--workspace data"),
            "the refusal names both paths and the way out: {err}"
        );
        assert!(!is_mounted(here));
    };

    let (ok, err) = mount(&a, &[]);
    assert!(ok && err.contains("created workspace \"data\""), "{err}");
    std::fs::write(a.join("f"), b"from a").unwrap();
    unmount(&a);

    // Another directory named data: refused, then attached on purpose.
    let (ok, err) = mount(&b, &[]);
    refused(ok, &err, &b, &a);
    // A command that took the lease since (an offline rollback names no mountpoint) does not
    // hide where the workspace was last mounted.
    let store = format!("file://{}", dir.path().join("data/owsfs/store").display());
    let rolled = owsfs(&["rollback", "--store", &store, "--workspace", "data", "HEAD"]);
    assert!(
        rolled.status.success(),
        "{}",
        String::from_utf8_lossy(&rolled.stderr)
    );
    let (ok, err) = mount(&b, &[]);
    refused(ok, &err, &b, &a);
    let (ok, err) = mount(&b, &["--workspace", "data"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("attached workspace \"data\"") && err.contains("at generation"),
        "{err}"
    );
    assert_eq!(std::fs::read(b.join("f")).unwrap(), b"from a");
    unmount(&b);

    // The other way round: it was last mounted at b now.
    let (ok, err) = mount(&a, &[]);
    refused(ok, &err, &a, &b);
    // Its own cache, named: that is the same workspace coming back, wherever it is mounted.
    let cache = xdg_cache.join("owsfs/data");
    let (ok, err) = mount(&a, &["--cache", &cache.to_string_lossy()]);
    assert!(ok, "{err}");
    unmount(&a);
    // Mounted at a again: a plain mount there is fine.
    let (ok, err) = mount(&a, &[]);
    assert!(ok && err.contains("attached workspace \"data\""), "{err}");
    unmount(&a);

    // A named cache without --workspace mounts the workspace it holds, wherever.
    let elsewhere = dir.path().join("c/elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let _guard3 = MountGuard(elsewhere.clone());
    let (ok, err) = mount(&elsewhere, &["--cache", &cache.to_string_lossy()]);
    assert!(ok && err.contains("attached workspace \"data\""), "{err}");
    assert_eq!(std::fs::read(elsewhere.join("f")).unwrap(), b"from a");
    unmount(&elsewhere);

    // A new workspace at b gets a cache of its own name.
    let (ok, err) = mount(&b, &["--workspace", "other"]);
    assert!(ok && err.contains("created workspace \"other\""), "{err}");
    assert!(std::fs::read_dir(&b).unwrap().next().is_none());
    assert!(xdg_cache.join("owsfs/other/state.db").exists());
    unmount(&b);
}

/// `rm -rf` of a live mount's cache takes its control socket with it: `owsfs unmount` still
/// ends the mount, through the daemon it finds by its command line, and says what happened.
#[test]
fn unmount_works_after_the_cache_was_deleted() {
    if skip_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cache, mp) = (dir.path().join("cache"), dir.path().join("mp"));
    std::fs::create_dir(&mp).unwrap();
    let _guard = MountGuard(mp.clone());
    let mounted = owsfs(&[
        "mount",
        &mp.to_string_lossy(),
        "--cache",
        &cache.to_string_lossy(),
        "--workspace",
        "cache-gone",
    ]);
    assert!(
        mounted.status.success(),
        "{}",
        String::from_utf8_lossy(&mounted.stderr)
    );
    std::fs::write(mp.join("f"), b"x").unwrap();
    let status = owsfs(&["status", &mp.to_string_lossy(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let pid = v["pid"].as_i64().expect("status names the daemon's pid") as i32;
    std::fs::remove_dir_all(&cache).unwrap();

    let out = owsfs(&["unmount", &mp.to_string_lossy()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        // The daemon and its supervisor.
        err.contains("was deleted")
            && err.contains("stopped its daemon (pid ")
            && err.contains(&pid.to_string()),
        "{err}"
    );
    assert!(!is_mounted(&mp));
    assert!(
        wait_for(Duration::from_secs(30), || {
            // SAFETY: kill(2) with signal 0 only checks that the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            !alive
        }),
        "the daemon {pid} is still running"
    );
}

#[test]
fn help_lists_commands_and_environment() {
    let out = owsfs(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["mount", "unmount", "status", "journal"] {
        assert!(text.contains(cmd), "{text}");
    }
    let out = owsfs(&["mount", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for env in [
        "OWSFS_CACHE",
        "OWSFS_FOREGROUND",
        "OWSFS_OPTIONS",
        "OWSFS_LOG",
    ] {
        assert!(text.contains(env), "{env} in {text}");
    }
}

/// A refused unmount (a file is open) answers only for itself: once the file is closed the
/// next `owsfs unmount` succeeds, and `--lazy` after a refusal detaches at once, the session
/// ending (and the cache coming free) when the file is closed.
#[test]
fn unmount_after_a_busy_refusal() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    let mp = ws.mp.to_string_lossy().to_string();
    std::fs::write(ws.path("f"), b"kept").unwrap();
    let held = std::fs::File::open(ws.path("f")).unwrap();
    for _ in 0..2 {
        let busy = ws.owsfs(&["unmount", &mp]);
        assert!(!busy.status.success(), "unmount with a file open succeeded");
        let err = String::from_utf8_lossy(&busy.stderr);
        assert!(err.contains("busy"), "no 'busy' in: {err}");
        assert!(is_mounted(&ws.mp));
    }
    drop(held);
    ws.unmount();

    ws.mount();
    let held = std::fs::File::open(ws.path("f")).unwrap();
    let busy = ws.owsfs(&["unmount", &mp]);
    assert!(!busy.status.success(), "unmount with a file open succeeded");
    let lazy = ws.owsfs(&["unmount", "--lazy", &mp]);
    assert!(
        lazy.status.success(),
        "unmount --lazy after a refusal failed: {}{}",
        String::from_utf8_lossy(&lazy.stderr),
        ws.log_tail()
    );
    assert!(!is_mounted(&ws.mp), "still mounted after --lazy");
    drop(held);
    assert!(
        wait_for(Duration::from_secs(20), || ws.try_mount().status.success()),
        "the cache did not come free after the detached session's file was closed{}",
        ws.log_tail()
    );
    assert_eq!(std::fs::read(ws.path("f")).unwrap(), b"kept");
    ws.unmount();
}

/// Arguments the parser takes but the command cannot use get an error, not a panic. Found by
/// the torture harness's CLI fuzzer: clap takes rollback's positionals again after an option.
#[test]
fn rollback_with_three_positionals_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(OWSFS)
        .args([
            "rollback",
            "fork",
            "200%",
            "--workspace",
            "template",
            "drill",
        ])
        .env("XDG_DATA_HOME", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("got 3 arguments"), "{err}");
}

/// `mount -o remount,ro` and `remount,rw` through the mount-helper convention (`owsfs SOURCE
/// MOUNTPOINT -o remount,...`, as mount.fuse3 runs it): the daemon stays, writes fail with
/// EROFS while read-only and work again after. Found by running a standard conformance suite
/// against owsfs ("unknown mount option `remount`").
#[test]
fn remount_read_only_and_back_through_the_mount_helper() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    std::fs::write(ws.path("a"), b"before").unwrap();
    let pid = ws.daemon_pid();
    let helper = |opts: &str| {
        let out = Command::new(OWSFS)
            .arg(&ws.cache)
            .arg(&ws.mp)
            .args(["-o", opts])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "owsfs CACHE MP -o {opts}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    helper("remount,ro,nosuid");
    let e = std::fs::write(ws.path("b"), b"refused").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert_eq!(std::fs::read(ws.path("a")).unwrap(), b"before");
    helper("remount,rw");
    std::fs::write(ws.path("b"), b"after").unwrap();
    assert_eq!(ws.daemon_pid(), pid, "the daemon was replaced");
    let g = ws.sync();
    let dest = ws.dir.path().join("restored");
    assert!(ws.restore(Some(g), &dest).status.success());
    assert_eq!(std::fs::read(dest.join("b")).unwrap(), b"after");
    // Not an owsfs mount: a clear error.
    let out = Command::new(OWSFS)
        .arg(&ws.cache)
        .arg(ws.dir.path())
        .args(["-o", "remount,ro"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not an owsfs mount"),
        "{err}"
    );
}

/// Completion scripts and manual pages come from the parser: every command is in them, and
/// bash accepts its script.
#[test]
fn completions_and_manual_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let out = owsfs(&["completions", shell]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}");
        for word in [
            "mount",
            "unmount",
            "rollback",
            "workspace",
            "commit-interval",
        ] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
    let script = owsfs(&["completions", "bash"]).stdout;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("owsfs.bash");
    std::fs::write(&path, script).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p owsfs", path.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("owsfs"),
        "bash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = owsfs(&["man"]);
    let text = String::from_utf8_lossy(&page.stdout);
    assert!(
        page.status.success() && text.contains(".TH owsfs 1"),
        "{text}"
    );
    let pages = dir.path().join("man");
    let out = owsfs(&["man", "--dir", &pages.to_string_lossy()]);
    assert!(out.status.success());
    for p in [
        "owsfs.1",
        "owsfs-mount.1",
        "owsfs-unmount.1",
        "owsfs-snapshot.1",
    ] {
        assert!(pages.join(p).is_file(), "{p} missing");
    }
    let bad = owsfs(&["completions", "nosuchshell"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values"));
}

/// Off a terminal, long work prints a plain progress line now and then, and one at the end.
#[test]
fn progress_off_a_terminal_is_plain_lines() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    for i in 0..20 {
        std::fs::write(ws.path(&format!("f{i}")), noise(256 << 10, i)).unwrap();
    }
    ws.unmount();
    let dest = ws.dir.path().join("restored");
    let out = Command::new(OWSFS)
        .args(["restore", "--store", &ws.store, "--workspace", &ws.name])
        .arg(&dest)
        .env("XDG_DATA_HOME", test_data_home())
        .env("OWSFS_PROGRESS_EVERY", "1ns")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("owsfs: restoring: "))
        .collect();
    assert!(lines.len() >= 2, "{err}");
    assert!(lines.iter().any(|l| l.contains("of 20 files")), "{err}");
    assert!(lines.last().unwrap().contains("done in"), "{err}");
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}'),
        "no bar drawing: {err:?}"
    );
}

/// One configuration from three sources: a flag wins over its `OWSFS_*` variable, which wins
/// over the config file, whose `[workspace.NAME]` section wins over its top level. `owsfs
/// config show` says where each value came from and shows no secret; a mount uses the file;
/// an unknown key is an error that names it and the nearest valid one.
#[test]
fn config_file_environment_and_flags_in_that_order() {
    if skip_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "commit_interval = \"3s\"\nmax_lag = \"45s\"\nprefetch = 7\nlog_format = \"json\"\n\
         store = \"s3://b/p?endpoint=http://key:secretword@127.0.0.1:9&region=r\"\n\
         [workspace.special]\ncommit_interval = \"200ms\"\n",
    )
    .unwrap();
    let show = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(OWSFS)
            .args(["config", "show"])
            .args(args)
            .env("OWSFS_CONFIG", &file)
            .env_remove("OWSFS_MAX_LAG")
            .env_remove("OWSFS_PREFETCH")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let line = |text: &str, key: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .to_string()
    };
    let text = show(
        &["/x/ws", "--prefetch", "2"],
        &[
            ("OWSFS_MAX_LAG", "10s"),
            ("AWS_SECRET_ACCESS_KEY", "verysecret"),
        ],
    );
    let l = line(&text, "commit_interval");
    assert!(l.contains("3s") && l.contains("# file "), "{l}");
    let l = line(&text, "max_lag");
    assert!(
        l.contains("10s") && l.contains("environment OWSFS_MAX_LAG"),
        "{l}"
    );
    let l = line(&text, "prefetch");
    assert!(l.contains(" 2 ") && l.contains("# flag"), "{l}");
    let l = line(&text, "max_lag_bytes");
    assert!(l.contains("# default"), "{l}");
    assert!(
        !text.contains("verysecret") && !text.contains("secretword"),
        "{text}"
    );
    assert!(line(&text, "AWS_SECRET_ACCESS_KEY").contains("<redacted>"));
    assert!(
        line(&text, "store").contains("<redacted>@127.0.0.1:9"),
        "{text}"
    );
    // The workspace's section first.
    let text = show(&["/x/special"], &[]);
    let l = line(&text, "commit_interval");
    assert!(
        l.contains("200ms") && l.contains("[workspace.special]"),
        "{l}"
    );

    // A mount reads it too (here: JSON logs).
    std::fs::write(&file, "log_format = \"json\"\n").unwrap();
    let (cache, mp) = (dir.path().join("cache"), dir.path().join("mp"));
    std::fs::create_dir(&mp).unwrap();
    let _guard = MountGuard(mp.clone());
    let out = Command::new(OWSFS)
        .arg("mount")
        .arg(&mp)
        .args(["--cache", &cache.to_string_lossy(), "--workspace", "cfg"])
        .arg("--config")
        .arg(&file)
        .env("XDG_DATA_HOME", test_data_home())
        .env_remove("OWSFS_LOG_FORMAT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(owsfs(&["unmount", &mp.to_string_lossy()]).status.success());
    let log = std::fs::read_to_string(cache.join("owsfs.log")).unwrap();
    assert!(
        log.lines()
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with('{')),
        "JSON log lines: {log}"
    );

    // Mistakes name the key, and the nearest valid one; bad values name the file.
    let refused = |contents: &str, args: &[&str]| -> String {
        std::fs::write(&file, contents).unwrap();
        let out = Command::new(OWSFS)
            .args(args)
            .env("OWSFS_CONFIG", &file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{contents} was taken");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused("comit_interval = \"1s\"\n", &["log", "--workspace", "w"]);
    assert!(
        err.contains("unknown key \"comit_interval\"")
            && err.contains("did you mean \"commit_interval\""),
        "{err}"
    );
    let show = ["config", "show", "/x/ws"];
    let err = refused("commit_interval = \"soon\"\n", &show);
    assert!(
        err.contains("soon") && err.contains(&*file.to_string_lossy()),
        "{err}"
    );
    // Mount options are checked as the mount checks them.
    let err = refused("options = [\"threads=many\"]\n", &show);
    assert!(
        err.contains("threads=many") && err.contains(&*file.to_string_lossy()),
        "{err}"
    );
}

/// Puts `/sbin/mount.fuse.owsfs` and `/sbin/umount.fuse.owsfs` (what mount(8) and umount(8)
/// run for fuse.owsfs) at the binary under test while it lives, and puts back what was there.
struct HelperInstalled(Vec<(&'static str, Option<std::path::PathBuf>)>);

impl HelperInstalled {
    const PATHS: [&str; 2] = ["/sbin/mount.fuse.owsfs", "/sbin/umount.fuse.owsfs"];

    fn new() -> HelperInstalled {
        HelperInstalled(
            Self::PATHS
                .iter()
                .map(|p| {
                    let before = std::fs::read_link(p).ok();
                    let _ = std::fs::remove_file(p);
                    std::os::unix::fs::symlink(OWSFS, p).expect("install the mount helper");
                    (*p, before)
                })
                .collect(),
        )
    }
}

impl Drop for HelperInstalled {
    fn drop(&mut self) {
        for (p, before) in &self.0 {
            let _ = std::fs::remove_file(p);
            if let Some(b) = before {
                let _ = std::os::unix::fs::symlink(b, p);
            }
        }
    }
}

/// `mount -t fuse.owsfs STORE_URL#WORKSPACE DIR -o cache=...,commit_interval=...` and the
/// same as an fstab line through `mount -a` (twice: the second finds it mounted), with the
/// fstab-only options; the mount table shows the source as written; `remount,ro` and
/// `remount,rw` work; plain umount(8) hands off.
#[test]
#[cfg(target_os = "linux")] // mount(8) helpers, /proc/self/mountinfo, unshare
fn fstab_line_and_mount_helper_with_a_store_url() {
    if skip_fuse() {
        return;
    }
    let _helper = HelperInstalled::new();
    let dir = tempfile::tempdir().unwrap();
    let (store, cache, mp) = (
        dir.path().join("store"),
        dir.path().join("cache"),
        dir.path().join("mp"),
    );
    std::fs::create_dir(&mp).unwrap();
    let _guard = MountGuard(mp.clone());
    let source = format!("file://{}#fstab-ws", store.display());
    let mounts = || -> Vec<(String, String)> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let target = left.split(' ').nth(4)?.replace("\\040", " ");
                let source = right.split(' ').nth(1)?.replace("\\043", "#");
                (target == mp.to_string_lossy()).then_some((target, source))
            })
            .collect()
    };
    let mount = |args: &[&str]| {
        let out = Command::new("mount").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "mount {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mps = mp.to_string_lossy().into_owned();
    mount(&[
        "-t",
        "fuse.owsfs",
        &source,
        &mps,
        "-o",
        &format!("cache={},commit_interval=200ms,nosuid", cache.display()),
    ]);
    assert_eq!(mounts().len(), 1);
    assert_eq!(
        mounts()[0].1,
        source,
        "the mount table shows the source as written"
    );
    std::fs::write(mp.join("f"), b"through mount(8)").unwrap();
    assert_eq!(
        std::fs::read(cache.join("backing/f")).unwrap(),
        b"through mount(8)"
    );
    mount(&["-o", "remount,ro", &mps]);
    let e = std::fs::write(mp.join("g"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    mount(&["-o", "remount,rw", &mps]);
    std::fs::write(mp.join("g"), b"rw again").unwrap();
    // umount(8) runs the umount helper, which waits for the handoff: the workspace is free
    // for another cache at once.
    assert!(Command::new("umount").arg(&mp).status().unwrap().success());
    assert!(mounts().is_empty());
    let (mp2, cache2) = (dir.path().join("mp2"), dir.path().join("cache2"));
    std::fs::create_dir(&mp2).unwrap();
    let _guard2 = MountGuard(mp2.clone());
    let other = owsfs(&[
        "mount",
        &mp2.to_string_lossy(),
        "--cache",
        &cache2.to_string_lossy(),
        "--store",
        &format!("file://{}", store.display()),
        "--workspace",
        "fstab-ws",
    ]);
    assert!(
        other.status.success(),
        "the lease was not free after umount: {}",
        String::from_utf8_lossy(&other.stderr)
    );
    assert_eq!(std::fs::read(mp2.join("g")).unwrap(), b"rw again");
    assert!(owsfs(&["unmount", &mp2.to_string_lossy()]).status.success());

    // The same as an fstab line.
    let fstab = dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# owsfs\n{source} {mps} fuse.owsfs cache={},commit_interval=1s,_netdev,nofail,x-systemd.automount 0 0\n",
            cache.display()
        ),
    )
    .unwrap();
    let fstab_s = fstab.to_string_lossy().into_owned();
    wait_cache_unlocked(&cache);
    // -v and -n reach the helper too.
    mount(&["-a", "-v", "-T", &fstab_s]);
    mount(&["-a", "-n", "-T", &fstab_s]);
    assert_eq!(mounts().len(), 1, "mount -a mounts it once");
    assert_eq!(std::fs::read(mp.join("g")).unwrap(), b"rw again");
    let out = owsfs(&["status", &mps, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sync"]["workspace"], "fstab-ws");
    assert!(Command::new("umount").arg(&mp).status().unwrap().success());
    assert!(wait_for(Duration::from_secs(10), || mounts().is_empty()));
    wait_cache_unlocked(&cache);
    // umount(8) of a mount whose daemon died still removes it (through the helper).
    mount(&["-a", "-T", &fstab_s]);
    let out = owsfs(&["status", &mps, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = v["pid"].as_i64().unwrap() as i32;
    kill_9_node(pid);
    assert!(wait_for(Duration::from_secs(10), || {
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        !alive
    }));
    assert!(Command::new("umount").arg(&mp).status().unwrap().success());
    assert!(mounts().is_empty(), "the dead mount is gone");
    wait_cache_unlocked(&cache);
    let log = owsfs(&[
        "log",
        "--store",
        &format!("file://{}", store.display()),
        "--workspace",
        "fstab-ws",
    ]);
    assert!(
        log.status.success(),
        "{}",
        String::from_utf8_lossy(&log.stderr)
    );
}

/// The systemd unit in docs/ passes `systemd-analyze verify` (with ExecStart pointed at the
/// binary under test), where systemd-analyze is installed.
#[test]
fn the_systemd_unit_example_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/owsfs-workspace.service"
    ))
    .unwrap();
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: the unit is not verified");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("owsfs-workspace.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/owsfs", OWSFS)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A bad line is only a warning (`FILE:LINE: ...`), still with exit status 0.
    assert!(
        out.status.success() && !said.contains("owsfs-workspace.service:"),
        "{said}"
    );
}

/// The daemon serves its status as JSON over HTTP on its socket, and the document has every
/// field docs/status.md lists, at the documented schema version.
#[test]
fn the_status_api_serves_its_documented_schema() {
    if skip_fuse() {
        return;
    }
    use std::io::{Read, Write};
    let ws = Workspace::new();
    std::fs::write(ws.path("f"), b"x").unwrap();
    ws.sync();
    let http = |request: &str| -> (String, serde_json::Value) {
        let mut c = std::os::unix::net::UnixStream::connect(ws.cache.join("control.sock")).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        (
            head.lines().next().unwrap().to_string(),
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}")),
        )
    };
    let (status, doc) = http("GET /status HTTP/1.1\r\nHost: owsfs\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/status.md")).unwrap();
    assert!(docs.contains("# The status API, schema 1"));
    assert_eq!(doc["schema"], 1);
    // Every field of the table, by its dotted path.
    let mut checked = 0;
    for line in docs.lines().filter(|l| l.starts_with("| `")) {
        let field = line.split('`').nth(1).unwrap();
        if field.starts_with("GET") || field.starts_with("POST") {
            continue;
        }
        let mut v = &doc;
        for part in field.split('.') {
            assert!(
                v.get(part).is_some(),
                "docs/status.md lists {field}, the daemon's status lacks it: {doc}"
            );
            v = &v[part];
        }
        checked += 1;
    }
    assert!(checked >= 25, "{checked} fields checked");
    let (status, body) = http(
        "POST /sync HTTP/1.1\r\nHost: owsfs\r\nContent-Length: 20\r\n\r\n{\"timeout_secs\": 30}",
    );
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(body["generation"].as_u64().unwrap() >= 1);
    let (status, body) = http("DELETE /status HTTP/1.1\r\n\r\n");
    assert!(status.starts_with("HTTP/1.1 405"), "{status} {body}");
    assert_eq!(body["ok"], false);
    let (status, body) = http("GET /statuss HTTP/1.1\r\n\r\n");
    assert!(status.starts_with("HTTP/1.1 404"), "{status} {body}");
    assert_eq!(body["kind"], "bad_request");
    // The line protocol of older clients is still answered.
    let mut c = std::os::unix::net::UnixStream::connect(ws.cache.join("control.sock")).unwrap();
    c.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let mut line = String::new();
    c.read_to_string(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["schema"], 1);
}

/// `owsfs status --dirty` lists the dirty set as lines, not as JSON.
#[test]
fn status_dirty_lists_the_dirty_set_as_text() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::without_cuts(&[]);
    std::fs::create_dir(ws.path("d")).unwrap();
    std::fs::write(ws.path("d/f"), b"hello\n").unwrap();
    let out = ws.ok(&["status", "--dirty", &ws.mp.to_string_lossy()]);
    assert!(
        out.contains("  dir  /d\n")
            && out.contains("  file /d/f ino=")
            && out.contains("bytes=6 created"),
        "{out}"
    );
    assert!(!out.contains('{'), "{out}");
}
