//! The container image: the Dockerfile passes hadolint (no container engine runs here, so
//! the lint is what checks it), and the documented entrypoint is one owsfs accepts.

use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// hadolint as `scripts/setup` installs it, or from PATH.
fn hadolint() -> Option<std::path::PathBuf> {
    let installed = std::path::PathBuf::from("/opt/owsfs/hadolint/bin/hadolint");
    if installed.exists() {
        return Some(installed);
    }
    Command::new("hadolint")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "hadolint".into())
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let Some(hadolint) = hadolint() else {
        // CI installs it (scripts/setup); elsewhere say so rather than pass quietly.
        assert!(
            std::env::var("CI").is_err(),
            "hadolint is missing: scripts/setup installs it"
        );
        eprintln!("hadolint is not installed (scripts/setup installs it): not linted");
        return;
    };
    let out = Command::new(hadolint)
        .arg(format!("{ROOT}/Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_entrypoint_is_a_command_owsfs_takes() {
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let entry = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("an ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(entry).expect("the exec form");
    assert_eq!(argv[0], "owsfs");
    // Its options (before `--`) parse: `--help` after them answers only if they do.
    let options: Vec<&str> = argv[1..]
        .iter()
        .map(String::as_str)
        .take_while(|a| *a != "--")
        .collect();
    assert_eq!(options.first(), Some(&"run"));
    let out = Command::new(env!("CARGO_BIN_EXE_owsfs"))
        .args(&options)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = std::fs::read_to_string(format!("{ROOT}/docs/containers.md")).unwrap();
    for needle in [
        "--device /dev/fuse",
        "SYS_ADMIN",
        "mountPropagation",
        "preStop",
        "terminationGracePeriodSeconds",
    ] {
        assert!(
            docs.contains(needle),
            "docs/containers.md says nothing of {needle}"
        );
    }
}
