//! `-o` mount options: owsfs's own settings, kernel mount flags, and what mount(8) adds.

use std::time::Duration;

use anyhow::{Context, bail};

/// Settings parsed from `-o`.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub read_only: bool,
    pub threads: usize,
    pub passthrough: bool,
    pub attr_timeout: Duration,
    pub entry_timeout: Duration,
    pub negative_timeout: Duration,
    pub max_write: u32,
    pub writeback_cache: bool,
    /// `writeback_cache` was given (either way): otherwise a mount without a supervisor
    /// writes through ([`MountOptions::unsupervised`]).
    pub writeback_explicit: bool,
    /// `durability=strict`: every fsync and fdatasync answers once the store holds what was
    /// written before it (concurrent ones share one commit).
    pub strict: bool,
    /// How long a strict fsync (or `OWSFS_IOC_SYNC`) waits for the store before it fails with
    /// EIO (`strict_timeout=S`).
    pub strict_timeout: Duration,
    /// POSIX ACLs, enforced by the kernel (`acl`, the default; `noacl`).
    pub posix_acl: bool,
    /// At most this many inodes cached by the kernel (each holds a descriptor in the daemon);
    /// None: as many as the open file limit allows.
    pub max_inodes: Option<usize>,
    /// FUSE over io_uring (`uring=off|auto|on`).
    pub uring: owsfs_fuse::Uring,
    /// Kernel mount flags passed on as they are (nosuid, nodev, noexec, ...).
    pub kernel: Vec<String>,
    /// `remount` (from `mount -o remount,...`): change the flags of the mount that is there
    /// (ro/rw, nosuid, ...) instead of mounting.
    pub remount: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        let adapter = owsfs_fuse::AdapterOptions::default();
        MountOptions {
            read_only: false,
            threads: 4,
            passthrough: false,
            attr_timeout: adapter.attr_ttl,
            entry_timeout: adapter.entry_ttl,
            negative_timeout: adapter.negative_ttl,
            max_write: adapter.max_write,
            writeback_cache: adapter.writeback_cache,
            writeback_explicit: false,
            strict: false,
            strict_timeout: Duration::from_secs(60),
            posix_acl: adapter.posix_acl,
            max_inodes: None,
            uring: owsfs_fuse::Uring::Off,
            kernel: Vec::new(),
            remount: false,
        }
    }
}

fn seconds(key: &str, v: &str) -> anyhow::Result<Duration> {
    let secs: f64 = v
        .parse()
        .with_context(|| format!("-o {key}={v}: expected a number of seconds"))?;
    if !(0.0..=1e9).contains(&secs) {
        bail!("-o {key}={v}: expected a number of seconds between 0 and 1e9");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses every `-o` value (each may hold several comma-separated options). Kernel
/// passthrough (`passthrough=on`) goes without the writeback cache: it is off unless asked for,
/// which is refused.
pub fn parse(values: &[String]) -> anyhow::Result<MountOptions> {
    let mut o = MountOptions::default();
    let mut writeback_asked = None;
    for opt in values.iter().flat_map(|v| v.split(',')) {
        let opt = opt.trim();
        if opt.is_empty() {
            continue;
        }
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (key, value) {
            ("ro", None) => o.read_only = true,
            ("remount", None) => o.remount = true,
            ("rw", None) => o.read_only = false,
            ("threads", Some(v)) => {
                o.threads = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .with_context(|| format!("-o threads={v}: expected 1 to 256"))?
            }
            ("passthrough", Some("on" | "1" | "true")) => {
                if !owsfs_sys::fs::KERNEL_PASSTHROUGH {
                    bail!("-o passthrough=on needs Linux's FUSE passthrough; leave it off here");
                }
                o.passthrough = true
            }
            ("passthrough", Some("off" | "0" | "false")) => o.passthrough = false,
            ("writeback_cache", None | Some("on" | "1" | "true")) => {
                o.writeback_cache = true;
                writeback_asked = Some(true);
            }
            ("writeback_cache", Some("off" | "0" | "false")) | ("nowriteback_cache", None) => {
                o.writeback_cache = false;
                writeback_asked = Some(false);
            }
            ("uring", Some("off" | "0" | "false")) => o.uring = owsfs_fuse::Uring::Off,
            ("uring", Some("auto")) => o.uring = owsfs_fuse::Uring::Auto,
            ("uring", Some("on" | "1" | "true")) => o.uring = owsfs_fuse::Uring::On,
            ("uring", v) => bail!(
                "-o uring={}: expected off (the default), auto (io_uring when the kernel \
                 offers it) or on",
                v.unwrap_or("")
            ),
            ("durability", Some("strict")) => o.strict = true,
            ("durability", Some("default")) => o.strict = false,
            ("durability", Some(v)) => {
                bail!(
                    "-o durability={v}: expected `strict` (fsync waits for the store) or `default`"
                )
            }
            ("strict_timeout", Some(v)) => o.strict_timeout = seconds(key, v)?,
            ("acl", None) => o.posix_acl = true,
            ("noacl", None) => o.posix_acl = false,
            ("max_inodes", Some(v)) => {
                o.max_inodes = Some(
                    v.parse()
                        .ok()
                        .filter(|n| *n >= 16)
                        .with_context(|| format!("-o max_inodes={v}: expected a number >= 16"))?,
                )
            }
            ("attr_timeout", Some(v)) => o.attr_timeout = seconds(key, v)?,
            ("entry_timeout", Some(v)) => o.entry_timeout = seconds(key, v)?,
            ("negative_timeout", Some(v)) => o.negative_timeout = seconds(key, v)?,
            ("max_write", Some(v)) => {
                o.max_write = v
                    .parse()
                    .ok()
                    .filter(|n| (4096..=(1 << 20)).contains(n))
                    .with_context(|| format!("-o max_write={v}: expected 4096 to 1048576"))?
            }
            (
                "nosuid" | "suid" | "nodev" | "dev" | "noexec" | "exec" | "noatime" | "atime"
                | "sync" | "async" | "dirsync",
                None,
            ) => o.kernel.push(key.to_string()),
            // Added by mount(8) and mount.fuse3, or implied by how owsfs mounts.
            (
                "allow_other"
                | "default_permissions"
                | "auto"
                | "noauto"
                | "user"
                | "nouser"
                | "users"
                | "_netdev"
                | "nofail"
                | "defaults",
                None,
            ) => {}
            // What the kernel shows of a FUSE mount, and mount(8) hands back on a remount:
            // owsfs sets these itself.
            ("user_id" | "group_id" | "rootmode" | "blksize" | "max_read" | "fd", Some(_)) => {}
            ("relatime" | "strictatime" | "nodiratime" | "lazytime" | "nolazytime", None) => {}
            // Options for userspace tools (systemd's x-systemd.*, x-gvfs-*, comment=...).
            (k, _) if k.starts_with("x-") || k == "comment" => {}
            _ => bail!(
                "unknown mount option `{opt}`; owsfs's: threads passthrough writeback_cache \
                 uring durability strict_timeout acl noacl max_inodes attr_timeout entry_timeout \
                 negative_timeout max_write (see owsfs mount --help); the kernel's: ro rw \
                 remount nosuid nodev noexec noatime sync dirsync"
            ),
        }
    }
    match (o.passthrough, writeback_asked) {
        (true, Some(true)) => bail!(
            "-o passthrough=on and writeback_cache cannot go together: the kernel serves a \
             passthrough file from the backing file, which the writeback cache would bypass; \
             choose one"
        ),
        (true, _) => o.writeback_cache = false,
        _ => {}
    }
    o.writeback_explicit = writeback_asked.is_some();
    if o.uring != owsfs_fuse::Uring::Off && !o.writeback_explicit {
        // The kernel cannot send a dead daemon's io_uring requests again, so such a mount
        // does not outlive its daemon, and the kernel's dirty pages would die with it.
        o.writeback_cache = false;
    }
    if o.uring == owsfs_fuse::Uring::On && !owsfs_sys::fs::fuse_uring_enabled() {
        bail!(
            "-o uring=on: the kernel does not offer FUSE over io_uring (Linux 6.14 or later, \
             and as root: echo Y > /sys/module/fuse/parameters/enable_uring)"
        );
    }
    Ok(o)
}

impl MountOptions {
    /// The options of a mount whose daemon has no supervisor: the writeback cache only when
    /// asked for, since nothing would keep the kernel's dirty pages across the daemon's death.
    pub fn unsupervised(mut self) -> MountOptions {
        if !self.writeback_explicit {
            self.writeback_cache = false;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owsfs_and_kernel_options() {
        let o = parse(&["ro,threads=4".into(), "nosuid,passthrough=off".into()]).unwrap();
        assert!(o.read_only);
        assert_eq!(o.threads, 4);
        assert!(!o.passthrough);
        assert_eq!(o.kernel, vec!["nosuid".to_string()]);
        assert!(o.posix_acl, "POSIX ACLs are on by default");
        assert!(!parse(&["noacl".into()]).unwrap().posix_acl);
        assert!(parse(&["noacl,acl".into()]).unwrap().posix_acl);
        let o = parse(&["durability=strict,strict_timeout=5".into()]).unwrap();
        assert!(o.strict);
        assert_eq!(o.strict_timeout, Duration::from_secs(5));
        assert!(!parse(&["durability=default".into()]).unwrap().strict);
        assert!(
            !parse(&["writeback_cache=off".into()])
                .unwrap()
                .writeback_cache
        );
        assert!(
            parse(&["writeback_cache=on".into()])
                .unwrap()
                .writeback_cache
        );
        assert!(
            parse(&[]).unwrap().writeback_cache,
            "the writeback cache is the default"
        );
        let o = parse(&["passthrough=on".into()]).unwrap();
        assert!(
            o.passthrough && !o.writeback_cache,
            "passthrough goes without it"
        );
        assert!(parse(&["passthrough=on,writeback_cache".into()]).is_err());
    }

    #[test]
    fn io_uring_is_asked_for_and_gives_up_the_default_writeback_cache() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.uring, owsfs_fuse::Uring::Off, "off is the default");
        let o = parse(&["uring=auto".into()]).unwrap();
        assert_eq!(o.uring, owsfs_fuse::Uring::Auto);
        assert!(
            !o.writeback_cache,
            "a mount that does not outlive its daemon keeps no dirty pages in the kernel"
        );
        let o = parse(&["uring=auto,writeback_cache".into()]).unwrap();
        assert!(o.writeback_cache, "unless asked for");
        let e = parse(&["uring=maybe".into()]).unwrap_err().to_string();
        assert!(e.contains("auto"), "{e}");
        // `on` is refused where the kernel does not offer it, with how to turn it on.
        match parse(&["uring=on".into()]) {
            Ok(o) => assert!(owsfs_sys::fs::fuse_uring_enabled() && !o.writeback_cache),
            Err(e) => assert!(e.to_string().contains("enable_uring"), "{e}"),
        }
    }

    #[test]
    fn rejects_unknown_and_bad_values() {
        assert!(parse(&["bogus".into()]).is_err());
        assert!(parse(&["threads=0".into()]).is_err());
        let e = parse(&["durability=paranoid".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("strict"), "{e}");
        assert!(parse(&["attr_timeout=-1".into()]).is_err());
        let e = parse(&["max_write=12".into()]).unwrap_err().to_string();
        assert!(e.contains("max_write"), "{e}");
    }

    #[test]
    fn ignores_what_mount_helpers_add() {
        let o = parse(&["rw,dev,suid,allow_other,default_permissions".into()]).unwrap();
        assert!(!o.read_only);
        assert_eq!(o.kernel, vec!["dev".to_string(), "suid".to_string()]);
    }
}
