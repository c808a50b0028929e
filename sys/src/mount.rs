//! Mounting, unmounting and the mount table.
//!
//! On Linux a root daemon mounts with mount(2) over a `/dev/fuse` descriptor it opened
//! itself, and unmounts with umount2(2) (`fusermount3 -u` for a user's mount). On macOS
//! macFUSE mounts through its library (fuser's `libfuse` path), the mount table comes from
//! mount(8), and `umount` unmounts.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One mount of this mount namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Whether an entry of [`table`] is an owsfs mount: type `fuse.owsfs` on Linux; on macOS
/// every mount of macFUSE (its table has no subtype), which callers narrow by mountpoint.
#[cfg(target_os = "linux")]
pub fn is_owsfs(m: &MountEntry) -> bool {
    m.fstype == "fuse.owsfs"
}
#[cfg(not(target_os = "linux"))]
pub fn is_owsfs(m: &MountEntry) -> bool {
    matches!(m.fstype.as_str(), "macfuse" | "osxfuse" | "fuse.owsfs")
}

/// Whether a FUSE session may have several worker threads, each reading its own clone of
/// the device (fuser's `clone_fd`); macFUSE serves one thread.
#[cfg(target_os = "linux")]
pub const FUSE_CLONE_FD: bool = true;
#[cfg(not(target_os = "linux"))]
pub const FUSE_CLONE_FD: bool = false;

/// Every mount this process sees.
#[cfg(target_os = "linux")]
pub fn table() -> io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read /proc/self/mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text))
}
#[cfg(not(target_os = "linux"))]
pub fn table() -> io::Result<Vec<MountEntry>> {
    table_portable()
}

/// The mount table as mount(8) prints it.
pub fn table_portable() -> io::Result<Vec<MountEntry>> {
    let out = Command::new("mount").output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("mount(8) failed: {}", out.status)));
    }
    Ok(parse_mount_output(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `/proc/self/mountinfo`: `id parent major:minor root mountpoint options
/// [optional...] - fstype source superopts`.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rfields: Vec<&str> = right.split(' ').collect();
        if fields.len() < 5 || rfields.len() < 2 {
            continue;
        }
        out.push(MountEntry {
            mountpoint: PathBuf::from(unescape(fields[4])),
            fstype: rfields[0].to_string(),
            source: unescape(rfields[1]),
        });
    }
    out
}

/// Raises the readahead of the mount at `target` to `kib` KiB where it is lower
/// (`/sys/class/bdi/MAJ:MIN/read_ahead_kb`, which needs root). A FUSE mount starts at
/// 128 KiB, so a sequential read reaches the daemon in 128 KiB requests even when it takes
/// requests of max_write (1 MiB): eight round trips instead of one.
#[cfg(target_os = "linux")]
pub fn raise_readahead(target: &Path, kib: u64) -> io::Result<()> {
    let device = device_of(target)?;
    let knob = format!("/sys/class/bdi/{device}/read_ahead_kb");
    let now: u64 = std::fs::read_to_string(&knob)?
        .trim()
        .parse()
        .map_err(|e| io::Error::other(format!("{knob}: {e}")))?;
    if now < kib {
        std::fs::write(&knob, kib.to_string())?;
    }
    Ok(())
}

/// The device number (`MAJOR:MINOR`) of the newest mount at `target`, from
/// `/proc/self/mountinfo` (without a stat(2), which a mount not served yet would not answer).
#[cfg(target_os = "linux")]
pub fn device_of(target: &Path) -> io::Result<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .rev()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.len() > 4 && Path::new(&unescape(fields[4])) == target)
                .then(|| fields[2].to_string())
        })
        .ok_or_else(|| io::Error::other(format!("{} is not mounted", target.display())))
}
#[cfg(not(target_os = "linux"))]
pub fn device_of(target: &Path) -> io::Result<String> {
    Err(io::Error::other(format!(
        "no device number for {} here",
        target.display()
    )))
}

/// Elsewhere the system decides.
#[cfg(not(target_os = "linux"))]
pub fn raise_readahead(_target: &Path, _kib: u64) -> io::Result<()> {
    Ok(())
}

/// Parses mount(8)'s lines: Linux's `SOURCE on DIR type TYPE (OPTIONS)`, or the BSDs' and
/// macOS's `SOURCE on DIR (TYPE, OPTIONS)`.
pub fn parse_mount_output(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((source, rest)) = line.split_once(" on ") else {
            continue;
        };
        let (mountpoint, fstype) = if let Some((dir, tail)) = rest.rsplit_once(" type ") {
            (dir, tail.split(' ').next().unwrap_or_default())
        } else if let Some((dir, tail)) = rest.rsplit_once(" (") {
            (dir, tail.split([',', ')']).next().unwrap_or_default())
        } else {
            continue;
        };
        out.push(MountEntry {
            mountpoint: PathBuf::from(mountpoint),
            fstype: fstype.trim().to_string(),
            source: source.to_string(),
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the FUSE device is there and this process may open it, with what to do if not.
#[cfg(target_os = "linux")]
pub fn check_fuse_device() -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(String::from(
            "/dev/fuse does not exist: load the fuse kernel module (`modprobe fuse`), or in a \
             container pass the device (`--device /dev/fuse`)",
        )),
        Err(e) => Err(format!(
            "cannot open /dev/fuse: run as root, or give this user access to the FUSE device \
             ({e})"
        )),
    }
}
#[cfg(not(target_os = "linux"))]
pub fn check_fuse_device() -> Result<(), String> {
    // macFUSE opens its device itself when it mounts, and says what is missing then.
    Ok(())
}

/// The kernel flags of a mount, by their mount(8) names.
#[derive(Clone, Debug, Default)]
pub struct KernelFlags {
    pub read_only: bool,
    /// `nosuid`, `suid`, `nodev`, `dev`, `noexec`, `exec`, `noatime`, `atime`, `sync`,
    /// `async`, `dirsync`.
    pub names: Vec<String>,
}

#[cfg(target_os = "linux")]
fn linux_flags(flags: &KernelFlags, defaults: bool) -> io::Result<rustix::mount::MountFlags> {
    use rustix::mount::MountFlags as F;
    let mut out = if defaults {
        F::NOSUID | F::NODEV | F::NOATIME
    } else {
        F::empty()
    };
    if flags.read_only {
        out |= F::RDONLY;
    }
    for flag in &flags.names {
        match flag.as_str() {
            "nosuid" => out |= F::NOSUID,
            "suid" => out.remove(F::NOSUID),
            "nodev" => out |= F::NODEV,
            "dev" => out.remove(F::NODEV),
            "noexec" => out |= F::NOEXEC,
            "exec" => out.remove(F::NOEXEC),
            "noatime" => out |= F::NOATIME,
            "atime" => out.remove(F::NOATIME),
            "sync" => out |= F::SYNCHRONOUS,
            "async" => out.remove(F::SYNCHRONOUS),
            "dirsync" => out |= F::DIRSYNC,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unknown mount flag {other}"),
                ));
            }
        }
    }
    Ok(out)
}

/// Mounts a FUSE filesystem of type `fuse.owsfs` at `target` over a `/dev/fuse` descriptor
/// of its own, and returns that descriptor. `Ok(None)` where this process cannot: not root,
/// or not Linux. The caller then mounts through fuser's own path (fusermount3, macFUSE).
#[cfg(target_os = "linux")]
pub fn mount_fuse(
    source: &str,
    target: &Path,
    flags: &KernelFlags,
    default_permissions: bool,
) -> io::Result<Option<OwnedFd>> {
    use std::os::fd::AsRawFd;
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    let mount_flags = linux_flags(flags, true)?;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let st = rustix::fs::stat(target)?;
    let data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}{},allow_other",
        dev.as_raw_fd(),
        st.st_mode & libc::S_IFMT,
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
        if default_permissions {
            ",default_permissions"
        } else {
            ""
        },
    );
    let data = std::ffi::CString::new(data).map_err(io::Error::other)?;
    rustix::mount::mount(source, target, "fuse.owsfs", mount_flags, data.as_c_str()).map_err(
        |e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("mount(2) of fuse.owsfs failed: {e}"),
            )
        },
    )?;
    Ok(Some(OwnedFd::from(dev)))
}
#[cfg(not(target_os = "linux"))]
pub fn mount_fuse(
    _source: &str,
    _target: &Path,
    _flags: &KernelFlags,
    _default_permissions: bool,
) -> io::Result<Option<OwnedFd>> {
    Ok(None)
}

/// How to unmount.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnmountHow {
    /// Detach now, and let the last user finish (`umount -l`).
    pub lazy: bool,
    /// Abort what is in flight (`umount -f`).
    pub force: bool,
}

/// Unmounts `target`. A user's FUSE mount that umount2(2) refuses (EPERM) is unmounted
/// through `fusermount3 -u`. A busy mount fails with the raw EBUSY.
#[cfg(target_os = "linux")]
pub fn unmount(target: &Path, how: UnmountHow) -> io::Result<()> {
    use rustix::mount::UnmountFlags;
    let mut flags = UnmountFlags::empty();
    if how.lazy {
        flags |= UnmountFlags::DETACH;
    }
    if how.force {
        flags |= UnmountFlags::FORCE;
    }
    match rustix::mount::unmount(target, flags) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::PERM) if !how.force => {
            let mut cmd = Command::new("fusermount3");
            cmd.arg("-u");
            if how.lazy {
                cmd.arg("-z");
            }
            let status = cmd
                .arg(target)
                .status()
                .map_err(|e| io::Error::new(e.kind(), format!("cannot run fusermount3: {e}")))?;
            if status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "fusermount3 -u {} failed",
                    target.display()
                )))
            }
        }
        Err(e) => Err(e.into()),
    }
}
#[cfg(not(target_os = "linux"))]
pub fn unmount(target: &Path, how: UnmountHow) -> io::Result<()> {
    unmount_portable(target, how)
}

/// Unmounts with umount(8), which every Unix has (`-f` forces; a lazy unmount is a plain
/// one there).
pub fn unmount_portable(target: &Path, how: UnmountHow) -> io::Result<()> {
    let mut cmd = Command::new("umount");
    if how.force {
        cmd.arg("-f");
    }
    let out = cmd.arg(target).output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr);
    if msg.contains("busy") {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    Err(io::Error::other(format!(
        "umount {} failed: {}",
        target.display(),
        msg.trim()
    )))
}

/// Changes the flags of the mount at `target`: the superblock's read-only flag, then the
/// mount point's own flags.
#[cfg(target_os = "linux")]
pub fn remount(target: &Path, flags: &KernelFlags) -> io::Result<()> {
    use rustix::mount::MountFlags;
    let mut out = MountFlags::empty();
    if flags.read_only {
        out |= MountFlags::RDONLY;
    }
    for k in &flags.names {
        out |= match k.as_str() {
            "nosuid" => MountFlags::NOSUID,
            "nodev" => MountFlags::NODEV,
            "noexec" => MountFlags::NOEXEC,
            "noatime" => MountFlags::NOATIME,
            _ => MountFlags::empty(),
        };
    }
    rustix::mount::mount_remount(target, out & MountFlags::RDONLY, "").map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!(
                "cannot remount {} {}: {e}",
                target.display(),
                if flags.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            ),
        )
    })?;
    rustix::mount::mount_remount(target, out | MountFlags::BIND, "").map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot change the flags of {}: {e}", target.display()),
        )
    })
}
#[cfg(not(target_os = "linux"))]
pub fn remount(target: &Path, flags: &KernelFlags) -> io::Result<()> {
    // mount(8) -u changes a mounted filesystem's flags on the BSDs and macOS.
    let mut opts = vec![String::from(if flags.read_only { "rdonly" } else { "rw" })];
    opts.extend(flags.names.iter().cloned());
    let status = Command::new("mount")
        .arg("-u")
        .arg("-o")
        .arg(opts.join(","))
        .arg(target)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "mount -u {} failed",
            target.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_and_unescape() {
        let text = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - fuse.owsfs /cache\\040x rw\n\
                    bad line\n";
        assert_eq!(
            parse_mountinfo(text),
            vec![MountEntry {
                mountpoint: PathBuf::from("/mnt/a b"),
                fstype: String::from("fuse.owsfs"),
                source: String::from("/cache x"),
            }]
        );
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/tail\\04"), "/tail\\04");
    }

    #[test]
    fn mount_output_parses_in_the_linux_and_macos_forms() {
        let text = "tmpfs on /run type tmpfs (rw,nosuid)\n\
                    /dev/disk3s1 on / (apfs, local, journaled)\n\
                    owsfs on /Users/me/work (macfuse, nodev, nosuid)\n";
        let got = parse_mount_output(text);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].fstype, "tmpfs");
        assert_eq!(got[0].mountpoint, PathBuf::from("/run"));
        assert_eq!(got[1].fstype, "apfs");
        assert_eq!(got[2].source, "owsfs");
        assert_eq!(got[2].mountpoint, PathBuf::from("/Users/me/work"));
    }

    /// The fallback, on this machine, sees the mounts the Linux table sees.
    #[test]
    fn the_portable_table_agrees_with_mountinfo() {
        let Ok(portable) = table_portable() else {
            return; // no mount(8) here
        };
        let linux = table().unwrap();
        for m in linux
            .iter()
            .filter(|m| !m.mountpoint.to_string_lossy().contains(' '))
        {
            assert!(
                portable.iter().any(|p| p.mountpoint == m.mountpoint),
                "{m:?} missing from mount(8)'s table"
            );
        }
    }
}
