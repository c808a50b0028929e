//! What owsfs learns about processes, and how it ties its own to each other. Linux answers
//! from `/proc`; elsewhere ps(1), sysctl, or a safe default answers.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Asks the kernel to send `signal` to this process when its parent exits (`None`: stop
/// asking). Async-signal-safe: call it between fork and exec, or at any time to clear it.
/// Other systems have no such request: there it does nothing, and a daemon outlives an
/// interrupted `owsfs mount --wait` (it then serves the mount without anyone waiting).
#[cfg(target_os = "linux")]
pub fn die_with_parent(signal: Option<i32>) {
    // SAFETY: prctl with plain integer arguments; async-signal-safe.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal.unwrap_or(0) as libc::c_ulong) };
}
#[cfg(not(target_os = "linux"))]
pub fn die_with_parent(_signal: Option<i32>) {}

/// The most descriptors one process may have open, past the hard limit for root.
#[cfg(target_os = "linux")]
pub fn open_files_ceiling() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
}
#[cfg(not(target_os = "linux"))]
pub fn open_files_ceiling() -> Option<u64> {
    sysctl("kern.maxfilesperproc").and_then(|s| s.parse().ok())
}

/// sysctl(8)'s value of `name`, if it has one.
pub fn sysctl(name: &str) -> Option<String> {
    let out = Command::new("sysctl").arg("-n").arg(name).output().ok()?;
    let value = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !value.is_empty()).then_some(value)
}

/// An id of the running system that changes at each boot. Where none is known, an id of
/// this process: every start then counts as a reboot, which costs rescans, never data.
#[cfg(target_os = "linux")]
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| boot_id_portable())
}
#[cfg(not(target_os = "linux"))]
pub fn boot_id() -> String {
    boot_id_portable()
}

/// [`boot_id`] from sysctl: macOS's boot session UUID, Linux's boot id; else this process.
pub fn boot_id_portable() -> String {
    for name in ["kern.bootsessionuuid", "kernel.random.boot_id"] {
        if let Some(id) = sysctl(name) {
            return id;
        }
    }
    // At most 36 bytes, as long as a UUID: the journal's segment header holds it.
    format!("process-{:x}-{:x}", std::process::id(), start_nanos())
}

fn start_nanos() -> u128 {
    use std::sync::OnceLock;
    static START: OnceLock<u128> = OnceLock::new();
    *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    })
}

/// The supplementary groups of process `pid` (none when it is gone or they are unknown).
#[cfg(target_os = "linux")]
pub fn groups_of(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"));
    line.into_iter()
        .flat_map(|l| l.split_whitespace())
        .filter_map(|g| g.parse::<u32>().ok())
        .collect()
}
#[cfg(not(target_os = "linux"))]
pub fn groups_of(_pid: u32) -> Vec<u32> {
    // macFUSE checks permissions in the kernel (default_permissions): the primary group
    // the request carries is enough for what the daemon checks itself.
    Vec::new()
}

/// The parent of process `pid`.
#[cfg(target_os = "linux")]
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces and parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
}
#[cfg(not(target_os = "linux"))]
pub fn parent_of(pid: u32) -> Option<u32> {
    parent_of_portable(pid)
}

/// [`parent_of`] from ps(1).
pub fn parent_of_portable(pid: u32) -> Option<u32> {
    let out = Command::new("ps")
        .args(["-o", "ppid=", "-p"])
        .arg(pid.to_string())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The parent of process `pid` if it runs the same command line: an owsfs daemon's
/// supervisor (`src/mount/supervisor.rs` starts each daemon with its own arguments).
#[cfg(target_os = "linux")]
pub fn supervisor_of(pid: u32) -> Option<u32> {
    let cmdline = |p: u32| std::fs::read(format!("/proc/{p}/cmdline")).ok();
    let parent = parent_of(pid)?;
    let own = cmdline(pid)?;
    (cmdline(parent)? == own).then_some(parent)
}
#[cfg(not(target_os = "linux"))]
pub fn supervisor_of(pid: u32) -> Option<u32> {
    supervisor_of_portable(pid)
}

/// [`supervisor_of`] from ps(1).
pub fn supervisor_of_portable(pid: u32) -> Option<u32> {
    let command = |p: u32| {
        let out = Command::new("ps")
            .args(["-ww", "-o", "command=", "-p"])
            .arg(p.to_string())
            .output()
            .ok()?;
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!s.is_empty()).then_some(s)
    };
    let parent = parent_of_portable(pid)?;
    let own = command(pid)?;
    (command(parent)? == own).then_some(parent)
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
#[cfg(target_os = "linux")]
pub fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}
#[cfg(not(target_os = "linux"))]
pub fn has_exited(pid: u32) -> bool {
    has_exited_portable(pid)
}

/// [`has_exited`] from ps(1): no such process, or its state starts with `Z`.
pub fn has_exited_portable(pid: u32) -> bool {
    let Ok(out) = Command::new("ps")
        .args(["-o", "stat=", "-p"])
        .arg(pid.to_string())
        .output()
    else {
        return false;
    };
    let state = String::from_utf8_lossy(&out.stdout);
    let state = state.trim();
    state.is_empty() || state.starts_with('Z')
}

/// The path of the running binary, also once an upgrade replaced the file at its path.
#[cfg(target_os = "linux")]
pub fn self_exe() -> PathBuf {
    PathBuf::from("/proc/self/exe")
}
#[cfg(not(target_os = "linux"))]
pub fn self_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("owsfs"))
}

/// Closes every FUSE device descriptor this process inherited: holding one keeps a dead
/// daemon's connection alive.
#[cfg(target_os = "linux")]
pub fn close_fuse_descriptors() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .filter(|fd| {
            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .is_ok_and(|t| t == Path::new("/dev/fuse"))
        })
        .collect();
    for fd in fds {
        // SAFETY: close(2) of a descriptor number this process holds and never uses again.
        unsafe { libc::close(fd) };
    }
}
#[cfg(not(target_os = "linux"))]
pub fn close_fuse_descriptors() {
    // macFUSE's device descriptors are closed on exec by its library.
}

/// A process as [`processes`] sees it.
#[derive(Debug)]
pub struct ProcessInfo {
    pub pid: i32,
    /// Its command line, one element per argument.
    pub args: Vec<Vec<u8>>,
    /// Its working directory, where the system tells.
    pub cwd: Option<PathBuf>,
}

/// Every process this one can see (other users' only as far as the system shows them).
#[cfg(target_os = "linux")]
pub fn processes() -> Vec<ProcessInfo> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        let cwd = std::fs::read_link(p.path().join("cwd")).ok();
        out.push(ProcessInfo { pid, args, cwd });
    }
    out
}
#[cfg(not(target_os = "linux"))]
pub fn processes() -> Vec<ProcessInfo> {
    processes_portable()
}

/// [`processes`] from ps(1): arguments split at spaces (an argument with a space in it
/// comes apart), no working directory.
pub fn processes_portable() -> Vec<ProcessInfo> {
    let Ok(out) = Command::new("ps")
        .args(["-axww", "-o", "pid=,command="])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let (pid, command) = line.split_once(' ')?;
            Some(ProcessInfo {
                pid: pid.parse().ok()?,
                args: command
                    .split_whitespace()
                    .map(|a| a.as_bytes().to_vec())
                    .collect(),
                cwd: None,
            })
        })
        .collect()
}

/// A process that holds something inside a directory.
#[derive(Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub name: String,
    /// `working directory`, `root directory` or `open file`.
    pub what: &'static str,
    pub path: PathBuf,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}) has its {} at {}",
            self.name,
            self.pid,
            self.what,
            self.path.display()
        )
    }
}

/// Every process (other than this one) whose working directory, root or open files lie
/// inside `dir`, as far as `/proc` shows them (other users' processes only to root).
/// `None` where the system cannot tell.
#[cfg(target_os = "linux")]
pub fn holders(dir: &Path) -> Option<Vec<Holder>> {
    let me = std::process::id();
    let mut out = Vec::new();
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.filter_map(Result::ok) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = p.path();
        let name = std::fs::read_to_string(base.join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mut found = |what, path: PathBuf| {
            if path.starts_with(dir) {
                out.push(Holder {
                    pid,
                    name: name.clone(),
                    what,
                    path,
                });
                true
            } else {
                false
            }
        };
        if let Ok(cwd) = std::fs::read_link(base.join("cwd"))
            && found("working directory", cwd)
        {
            continue;
        }
        // A root of "/" covers everything; only a root inside the directory counts.
        if let Ok(root) = std::fs::read_link(base.join("root"))
            && root != Path::new("/")
            && found("root directory", root)
        {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(base.join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            if let Ok(target) = std::fs::read_link(fd.path())
                && target.is_absolute()
                && found("open file", target)
            {
                break;
            }
        }
    }
    Some(out)
}
#[cfg(not(target_os = "linux"))]
pub fn holders(_dir: &Path) -> Option<Vec<Holder>> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_portable_answers_agree_with_procfs() {
        let me = std::process::id();
        assert_eq!(parent_of(me), Some(std::os::unix::process::parent_id()));
        if Command::new("ps").arg("-p").arg("1").output().is_ok() {
            assert_eq!(parent_of_portable(me), parent_of(me));
            assert!(!has_exited_portable(me));
        }
        assert!(!has_exited(me));
        // A forked child runs its parent's command line: the parent is its "supervisor"; a
        // child running another command has none.
        let forks = "import os, sys, time\npid = os.fork()\nif pid:\n    print(pid, flush=True)\ntime.sleep(3)";
        if let Ok(mut parent) = Command::new("python3")
            .args(["-c", forks])
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            let mut line = String::new();
            use std::io::BufRead;
            std::io::BufReader::new(parent.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let child: u32 = line.trim().parse().unwrap();
            assert_eq!(supervisor_of(child), Some(parent.id()));
            assert_eq!(supervisor_of_portable(child), Some(parent.id()));
            assert_eq!(
                supervisor_of(parent.id()),
                None,
                "its parent runs another command"
            );
            if let Some(pid) = rustix::process::Pid::from_raw(child as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            let _ = (parent.kill(), parent.wait());
        }
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(has_exited(pid) && has_exited_portable(pid));
        assert!(!boot_id().is_empty());
        assert_eq!(
            boot_id_portable(),
            boot_id(),
            "sysctl reads the same boot id"
        );
        assert!(open_files_ceiling().is_some());
        assert!(self_exe().exists());
    }

    #[test]
    fn the_portable_process_list_agrees_with_procfs() {
        let me = std::process::id() as i32;
        let linux = processes();
        let mine = linux.iter().find(|p| p.pid == me).expect("this process");
        assert!(!mine.args.is_empty() && mine.cwd.is_some());
        if Command::new("ps").arg("-p").arg("1").output().is_ok() {
            let portable = processes_portable();
            let p = portable
                .iter()
                .find(|p| p.pid == me)
                .expect("this process in ps");
            assert_eq!(p.args.first(), mine.args.first());
        }
    }

    #[test]
    fn a_process_inside_a_directory_is_a_holder() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("sleep")
            .arg("30")
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        let canonical = dir.path().canonicalize().unwrap();
        let found = holders(&canonical).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found
                .iter()
                .any(|h| h.pid == child.id() && h.what == "working directory"),
            "{found:?}"
        );
    }
}
