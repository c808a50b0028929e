//! POSIX behaviour that a standard conformance suite found missing (issue 15), each through a
//! real mount: atime that holds still, direct I/O seen by buffered readers, xattrs on symlinks,
//! POSIX ACLs, `O_TMPFILE` and file handles.
// Linux kernel semantics (renameat2, fallocate modes, O_DIRECT, aio, file handles,
// /proc and /sys): the file builds on Linux only.
#![cfg(target_os = "linux")]

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::Path;
use std::time::Duration;

use common::*;

/// Two days ago: old enough that relatime would move it on the next read.
fn two_days_ago() -> rustix::fs::Timespec {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    rustix::fs::Timespec {
        tv_sec: (now - Duration::from_secs(2 * 86_400)).as_secs() as i64,
        tv_nsec: 0,
    }
}

fn set_atime(p: &Path, t: rustix::fs::Timespec) {
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
        },
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
}

#[test]
fn atime_holds_still() {
    atime_holds_still_with(&[]);
}

#[test]
fn atime_holds_still_passthrough() {
    atime_holds_still_with(&["passthrough=on"]);
}

/// The mount is noatime: reads through it do not move atime, and neither do the daemon's own
/// reads of the backing files and directories (serving reads, reading around a write, cutting
/// a generation), which the backing filesystem would otherwise count (relatime) and getattr
/// would then report.
fn atime_holds_still_with(opts: &[&str]) {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(opts);
    let f = ws.path("f");
    let d = ws.path("d");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("inner"), b"inner").unwrap();
    fs::write(&f, noise(300_000, 1)).unwrap();
    let old = two_days_ago();
    set_atime(&f, old);
    set_atime(&d, old);
    let atimes = || {
        (
            fs::metadata(&f).unwrap().atime(),
            fs::metadata(&d).unwrap().atime(),
            fs::metadata(ws.backing("f")).unwrap().atime(),
            fs::metadata(ws.backing("d")).unwrap().atime(),
        )
    };
    let want = (old.tv_sec, old.tv_sec, old.tv_sec, old.tv_sec);
    assert_eq!(atimes(), want);
    // Reads through the mount, with the kernel's page cache dropped so that they reach the
    // daemon (or, with passthrough, the backing file).
    fs::write("/proc/sys/vm/drop_caches", b"1").unwrap();
    assert_eq!(fs::read(&f).unwrap(), noise(300_000, 1));
    assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
    assert_eq!(atimes(), want, "after reads");
    // A write of part of a page: the kernel reads the rest of the page first.
    fs::write("/proc/sys/vm/drop_caches", b"1").unwrap();
    let w = OpenOptions::new().write(true).open(&f).unwrap();
    std::os::unix::fs::FileExt::write_at(&w, b"xyz", 5).unwrap();
    drop(w);
    assert_eq!(atimes().1, old.tv_sec);
    assert_eq!(atimes().3, old.tv_sec);
    set_atime(&f, old);
    // A cut reads the file's bytes and walks the directory.
    fs::write(d.join("more"), b"more").unwrap();
    set_atime(&d, old);
    ws.sync();
    assert_eq!(atimes(), want, "after a cut");
}

fn lget(p: &Path, name: &str) -> rustix::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let n = rustix::fs::lgetxattr(p, name, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

fn llist(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut buf).unwrap();
    let mut names: Vec<String> = buf[..n]
        .split(|b| *b == 0)
        .filter(|k| !k.is_empty())
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    names.sort();
    names
}

/// xattrs on symlinks (and FIFOs) work where the backing filesystem has them: `trusted.` and
/// `security.` names, not `user.` ones (Linux refuses those on symlinks with EPERM). They
/// are journaled, cut into the tree and restored like a file's.
#[test]
fn xattrs_on_symlinks_and_fifos() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    let link = ws.path("link");
    symlink("nowhere", &link).unwrap();
    let fifo = ws.path("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let set = |p: &Path, k: &str, v: &[u8]| {
        rustix::fs::lsetxattr(p, k, v, rustix::fs::XattrFlags::empty())
    };
    set(&link, "trusted.owner", b"agent-7").unwrap();
    set(&link, "trusted.gone", b"x").unwrap();
    set(&fifo, "trusted.kind", b"pipe").unwrap();
    assert_eq!(
        set(&link, "user.nope", b"x").unwrap_err(),
        rustix::io::Errno::PERM,
        "user. xattrs on a symlink are refused, as on ext4"
    );
    assert_eq!(lget(&link, "trusted.owner").unwrap(), b"agent-7");
    assert_eq!(llist(&link), ["trusted.gone", "trusted.owner"]);
    rustix::fs::lremovexattr(&link, "trusted.gone").unwrap();
    assert_eq!(llist(&link), ["trusted.owner"]);
    assert_eq!(
        lget(&link, "trusted.gone").unwrap_err(),
        rustix::io::Errno::NODATA
    );
    // The backing symlink carries them, not its target.
    assert_eq!(
        lget(&ws.backing("link"), "trusted.owner").unwrap(),
        b"agent-7"
    );
    ws.sync();
    let dest = ws.dir.path().join("restored");
    let out = ws.restore(None, &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_link(dest.join("link")).unwrap(),
        Path::new("nowhere")
    );
    assert_eq!(llist(&dest.join("link")), ["trusted.owner"]);
    assert_eq!(
        lget(&dest.join("link"), "trusted.owner").unwrap(),
        b"agent-7"
    );
    assert_eq!(lget(&dest.join("fifo"), "trusted.kind").unwrap(), b"pipe");
}

/// A POSIX ACL in its xattr form: version 2, then (tag, perm, id) entries in order.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const NO_ID: u32 = u32::MAX;

/// Runs `cmd` as user 4242 (or another uid): whether it succeeded.
fn as_user(uid: u32, cmd: &[&str]) -> bool {
    std::process::Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .args(cmd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// POSIX ACLs: stored as `system.posix_acl_*` xattrs, enforced by the kernel
/// (FUSE_POSIX_ACL), kept in step with the mode, inherited from a directory's default ACL,
/// and cut into the tree and restored like other xattrs.
#[test]
fn posix_acls_are_enforced_inherited_and_restored() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    let secret = ws.path("secret");
    fs::write(&secret, b"s3cret").unwrap();
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cat = |p: &Path| vec!["cat".to_string(), p.to_string_lossy().into_owned()];
    let can_read = |uid, p: &Path| {
        let c = cat(p);
        as_user(uid, &c.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert!(!can_read(4242, &secret), "mode 0600 keeps user 4242 out");
    // user::rw- user:4242:r-- group::--- mask::r-- other::---
    let access = acl(&[
        (USER_OBJ, 6, NO_ID),
        (USER, 4, 4242),
        (GROUP_OBJ, 0, NO_ID),
        (MASK, 4, NO_ID),
        (OTHER, 0, NO_ID),
    ]);
    rustix::fs::setxattr(
        &secret,
        "system.posix_acl_access",
        &access,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    // The mode's group bits are the mask.
    assert_eq!(fs::metadata(&secret).unwrap().mode() & 0o777, 0o640);
    assert_eq!(lget(&secret, "system.posix_acl_access").unwrap(), access);
    assert!(can_read(4242, &secret), "the ACL lets user 4242 read");
    assert!(!can_read(4243, &secret), "and nobody else");
    // A chmod moves the mask, and so takes the read back.
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert!(!can_read(4242, &secret), "chmod 0600 masks the named user");
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    assert!(can_read(4242, &secret));

    // A directory's default ACL is inherited by what is created in it, whatever the umask.
    let shared = ws.path("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let rwx_4242 = acl(&[
        (USER_OBJ, 7, NO_ID),
        (USER, 7, 4242),
        (GROUP_OBJ, 0, NO_ID),
        (MASK, 7, NO_ID),
        (OTHER, 0, NO_ID),
    ]);
    for name in ["system.posix_acl_access", "system.posix_acl_default"] {
        rustix::fs::setxattr(&shared, name, &rwx_4242, rustix::fs::XattrFlags::empty()).unwrap();
    }
    let old_umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    fs::write(shared.join("new"), b"n").unwrap();
    rustix::process::umask(old_umask);
    let inherited = lget(&shared.join("new"), "system.posix_acl_access").unwrap();
    assert_eq!(
        inherited,
        acl(&[
            (USER_OBJ, 6, NO_ID),
            (USER, 7, 4242),
            (GROUP_OBJ, 0, NO_ID),
            (MASK, 6, NO_ID),
            (OTHER, 0, NO_ID),
        ]),
        "the default ACL, masked by the mode asked for (0666), not by the umask (077)"
    );
    assert_eq!(
        fs::metadata(shared.join("new")).unwrap().mode() & 0o777,
        0o660
    );
    let new = shared.join("new").to_string_lossy().into_owned();
    assert!(as_user(4242, &["sh", "-c", &format!("echo more >> {new}")]));
    assert!(!as_user(4243, &["cat", &new]));

    // An owner outside the file's group who sets an access ACL loses the set-group-id bit
    // (root keeps it), as on a local disk.
    let sgid = ws.path("sgid");
    fs::write(&sgid, b"g").unwrap();
    std::os::unix::fs::chown(&sgid, Some(4242), Some(0)).unwrap();
    fs::set_permissions(&sgid, std::os::unix::fs::PermissionsExt::from_mode(0o2770)).unwrap();
    rustix::fs::setxattr(
        &sgid,
        "system.posix_acl_access",
        &access,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    assert_eq!(
        fs::metadata(&sgid).unwrap().mode() & 0o7000,
        0o2000,
        "root keeps it"
    );
    let hex: String = access.iter().map(|b| format!("{b:02x}")).collect();
    // Python drops to user 4242 itself (its interpreter may live where 4242 cannot read).
    run_ok(
        std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import os, sys\nos.setgroups([]); os.setgid(4242); os.setuid(4242)\n\
                 os.setxattr(sys.argv[1], 'system.posix_acl_access', bytes.fromhex(sys.argv[2]))",
            )
            .arg(&sgid)
            .arg(&hex),
    );
    assert_eq!(
        fs::metadata(&sgid).unwrap().mode() & 0o7000,
        0,
        "the owner outside group 0 loses it"
    );

    // Cut into the tree and restored.
    ws.sync();
    let dest = ws.dir.path().join("restored");
    let out = ws.restore(None, &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lget(&dest.join("secret"), "system.posix_acl_access").unwrap(),
        access
    );
    assert_eq!(
        fs::metadata(dest.join("secret")).unwrap().mode() & 0o777,
        0o640
    );
    assert_eq!(
        lget(&dest.join("shared"), "system.posix_acl_default").unwrap(),
        rwx_4242
    );
    assert_eq!(
        lget(&dest.join("shared/new"), "system.posix_acl_access").unwrap(),
        inherited
    );
}

/// Linux AIO (`io_setup`, `io_submit`, `io_getevents`), for the asynchronous direct writes
/// the test below makes: the layout of `struct iocb` and `struct io_event` on little-endian
/// 64-bit machines.
mod aio {
    #[repr(C)]
    #[derive(Default)]
    pub struct Iocb {
        pub data: u64,
        pub key: u32,
        pub rw_flags: i32,
        pub opcode: u16,
        pub reqprio: i16,
        pub fildes: u32,
        pub buf: u64,
        pub nbytes: u64,
        pub offset: i64,
        pub reserved2: u64,
        pub flags: u32,
        pub resfd: u32,
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    pub struct Event {
        pub data: u64,
        pub obj: u64,
        pub res: i64,
        pub res2: i64,
    }

    pub const PWRITE: u16 = 1;

    pub struct Ctx(libc::c_ulong);

    impl Ctx {
        pub fn new() -> Ctx {
            let mut ctx: libc::c_ulong = 0;
            // SAFETY: io_setup writes the context id into `ctx`, which outlives the call.
            let r = unsafe { libc::syscall(libc::SYS_io_setup, 8, &mut ctx) };
            assert_eq!(r, 0, "io_setup: {}", std::io::Error::last_os_error());
            Ctx(ctx)
        }

        /// Submits one pwrite and waits for it: its result.
        pub fn pwrite(&self, fd: i32, buf: &[u8], offset: i64) -> i64 {
            let mut cb = Iocb {
                opcode: PWRITE,
                fildes: fd as u32,
                buf: buf.as_ptr() as u64,
                nbytes: buf.len() as u64,
                offset,
                ..Default::default()
            };
            let mut cbs = [&mut cb as *mut Iocb];
            // SAFETY: the iocb and the buffer it names live until io_getevents below returns.
            let r = unsafe { libc::syscall(libc::SYS_io_submit, self.0, 1, cbs.as_mut_ptr()) };
            assert_eq!(r, 1, "io_submit: {}", std::io::Error::last_os_error());
            let mut ev = [Event::default()];
            // SAFETY: `ev` has room for the one event asked for.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.0,
                    1,
                    1,
                    ev.as_mut_ptr(),
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            assert_eq!(r, 1, "io_getevents: {}", std::io::Error::last_os_error());
            ev[0].res
        }
    }

    impl Drop for Ctx {
        fn drop(&mut self) {
            // SAFETY: the context is this value's own, and nothing is in flight on it.
            unsafe { libc::syscall(libc::SYS_io_destroy, self.0) };
        }
    }
}

/// A buffer of `len` bytes aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn filled(len: usize, byte: u8) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size; the block is `len` bytes, all written.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `ptr` holds `len` bytes.
        unsafe { std::ptr::write_bytes(ptr, byte, len) };
        Aligned { ptr, len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` holds `len` initialized bytes while `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in `filled` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

#[test]
fn buffered_reads_see_asynchronous_direct_writes() {
    buffered_reads_see_asynchronous_direct_writes_with(&[]);
}

#[test]
fn buffered_reads_see_asynchronous_direct_writes_write_through() {
    buffered_reads_see_asynchronous_direct_writes_with(&["writeback_cache=off"]);
}

/// After an asynchronous O_DIRECT write completes, a buffered read sees what it wrote, even
/// when buffered readers (with readahead) raced the write and filled the page cache with the
/// old bytes meanwhile (xfstests' aio-dio-invalidate-readahead). The kernel drops the cached
/// pages before it sends an asynchronous direct write, not after; the daemon drops them once
/// the write is in the backing file.
fn buffered_reads_see_asynchronous_direct_writes_with(opts: &[&str]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    if skip_fuse() {
        return;
    }
    const SIZE: usize = 4 << 20;
    const CHUNK: usize = 64 << 10;
    let ws = Workspace::with_options(opts);
    let p = ws.path("dio");
    fs::write(&p, vec![0u8; SIZE]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Buffered readers: drop the cache, then read the file through (readahead included).
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            let p = p.clone();
            std::thread::spawn(move || {
                let f = fs::File::open(&p).unwrap();
                let mut buf = vec![0u8; 128 << 10];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
                    let mut off = 0;
                    while off < SIZE as u64 {
                        off += f.read_at(&mut buf, off).unwrap().max(1) as u64;
                    }
                }
            })
        })
        .collect();
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    let reader = fs::File::open(&p).unwrap();
    let ctx = aio::Ctx::new();
    let mut stale = Vec::new();
    for i in 0..1000usize {
        let byte = (i % 250 + 1) as u8;
        let buf = Aligned::filled(CHUNK, byte);
        let off = ((i * 7919) % (SIZE / CHUNK) * CHUNK) as i64;
        assert_eq!(
            ctx.pwrite(direct.as_raw_fd(), buf.bytes(), off),
            CHUNK as i64
        );
        let mut got = vec![0u8; CHUNK];
        reader.read_exact_at(&mut got, off as u64).unwrap();
        if got != buf.bytes() {
            let bad = got.iter().filter(|b| **b != byte).count();
            stale.push(format!("write {i} at {off}: {bad} bytes stale"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(
        stale.is_empty(),
        "{} stale reads: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    // A descriptor opened O_DIRECT whose flag fcntl cleared writes through the page cache,
    // which holds its pages locked while the daemon serves the write: the daemon must not
    // wait for them (it goes by the flags of each request, not of the open).
    let unset = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    rustix::fs::fcntl_setfl(&unset, rustix::fs::OFlags::empty()).unwrap();
    unset.write_all_at(b"buffered again", 5).unwrap();
    drop(unset);
    let mut got = [0u8; 14];
    reader.read_exact_at(&mut got, 5).unwrap();
    assert_eq!(&got, b"buffered again");
}

/// A file handle through the mount (`name_to_handle_at`): its type and bytes.
fn handle_of(p: &Path) -> (i32, Vec<u8>) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = vec![0u64; 32];
    let fh = buf.as_mut_ptr().cast::<libc::file_handle>();
    let mut mount_id = 0;
    // SAFETY: `buf` is aligned and holds the header and the 128 bytes `handle_bytes` says.
    let r = unsafe {
        (*fh).handle_bytes = 128;
        libc::name_to_handle_at(libc::AT_FDCWD, c.as_ptr(), fh, &mut mount_id, 0)
    };
    assert_eq!(
        r,
        0,
        "name_to_handle_at {p:?}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: filled in by the successful call.
    let (len, kind) = unsafe { ((*fh).handle_bytes as usize, (*fh).handle_type) };
    let hdr = std::mem::size_of::<libc::file_handle>();
    // SAFETY: `len` bytes of handle follow the header inside `buf`.
    let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>().add(hdr), len) };
    (kind, bytes.to_vec())
}

/// `open_by_handle_at` on the mount.
fn open_by_handle(mount: &fs::File, (kind, bytes): &(i32, Vec<u8>)) -> std::io::Result<fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut buf = vec![0u64; 32];
    let fh = buf.as_mut_ptr().cast::<libc::file_handle>();
    let hdr = std::mem::size_of::<libc::file_handle>();
    // SAFETY: `buf` holds the header and up to 128 bytes of handle.
    let fd = unsafe {
        (*fh).handle_bytes = bytes.len() as u32;
        (*fh).handle_type = *kind;
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            buf.as_mut_ptr().cast::<u8>().add(hdr),
            bytes.len(),
        );
        libc::open_by_handle_at(mount.as_raw_fd(), fh, libc::O_RDONLY | libc::O_CLOEXEC)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    Ok(unsafe { fs::File::from_raw_fd(fd) })
}

/// The kernel forgets every inode nobody holds (and so sends FORGET for them).
fn evict_inodes() {
    fs::write("/proc/sys/vm/drop_caches", b"2").unwrap();
    std::thread::sleep(Duration::from_millis(200));
}

/// File handles through the mount (`name_to_handle_at`, `open_by_handle_at`, what NFS
/// re-export uses) keep working after the kernel evicts the inode (FUSE_EXPORT_SUPPORT: the
/// daemon answers lookups of "." and ".."), follow renames, and go stale with their file.
/// A handle naming an inode the daemon never handed out opens nothing.
#[test]
fn file_handles_survive_eviction_and_go_stale_with_their_file() {
    if skip_fuse() {
        return;
    }
    use std::io::Read;
    let ws = Workspace::new();
    fs::create_dir_all(ws.path("d/e")).unwrap();
    fs::write(ws.path("d/e/f"), b"by handle").unwrap();
    fs::write(ws.path("g"), b"doomed").unwrap();
    let f = handle_of(&ws.path("d/e/f"));
    let e = handle_of(&ws.path("d/e"));
    let g = handle_of(&ws.path("g"));
    let mount = fs::File::open(&ws.mp).unwrap();
    evict_inodes();
    let mut s = String::new();
    open_by_handle(&mount, &f)
        .unwrap_or_else(|e| panic!("a file's handle after eviction: {e}{}", ws.log_tail()))
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "by handle");
    // A directory's handle: the kernel reconnects it to the tree by looking up "..".
    let dir = open_by_handle(&mount, &e).expect("a directory's handle after eviction");
    use std::os::fd::AsRawFd;
    let at = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).unwrap();
    assert_eq!(at, ws.path("d/e"));
    drop(dir);
    // Renamed, it is still the same file.
    fs::rename(ws.path("d/e/f"), ws.path("f2")).unwrap();
    evict_inodes();
    s.clear();
    open_by_handle(&mount, &f)
        .expect("a renamed file's handle")
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "by handle");
    // Removed, its handle is stale.
    fs::remove_file(ws.path("g")).unwrap();
    evict_inodes();
    assert_eq!(
        open_by_handle(&mount, &g).unwrap_err().raw_os_error(),
        Some(libc::ESTALE)
    );
    // A forged handle naming an inode outside the workspace (a journal segment of the cache,
    // on the same filesystem) reaches nothing. A FUSE handle is (node id high, low,
    // generation) in 32-bit words.
    let outside = fs::read_dir(ws.cache.join("journal"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .metadata()
        .unwrap()
        .ino();
    let mut forged = f.clone();
    forged.1[0..4].copy_from_slice(&((outside >> 32) as u32).to_ne_bytes());
    forged.1[4..8].copy_from_slice(&(outside as u32).to_ne_bytes());
    let err = open_by_handle(&mount, &forged).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
}

/// `open(O_TMPFILE)`: an unnamed file that `linkat(2)` may name (as systemd, editors and
/// Python's `tempfile.TemporaryFile` use it). Named, it is journaled as created, whole, and
/// survives a `kill -9` and a restore; left unnamed, it leaves nothing behind; opened
/// `O_EXCL`, it cannot be named.
#[test]
fn o_tmpfile_and_linkat() {
    if skip_fuse() {
        return;
    }
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let ws = Workspace::new();
    let d = ws.path("d");
    fs::create_dir(&d).unwrap();
    let tmp = |extra: rustix::fs::OFlags| {
        rustix::fs::open(
            &d,
            rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | extra,
            rustix::fs::Mode::from_raw_mode(0o640),
        )
        .map(fs::File::from)
    };
    let mut f = tmp(rustix::fs::OFlags::empty()).expect("O_TMPFILE");
    let body = noise(200_000, 7);
    f.write_all(&body).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(
        (md.nlink(), md.len(), md.mode() & 0o777),
        (0, 200_000, 0o640)
    );
    assert_eq!(
        fs::read_dir(&d).unwrap().count(),
        0,
        "an unnamed file has no entry"
    );
    // Named through /proc, as programs without CAP_DAC_READ_SEARCH do.
    rustix::fs::linkat(
        rustix::fs::CWD,
        format!("/proc/self/fd/{}", f.as_raw_fd()),
        rustix::fs::CWD,
        d.join("named"),
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )
    .unwrap();
    f.write_all(b"tail").unwrap();
    drop(f);
    let mut want = body.clone();
    want.extend_from_slice(b"tail");
    assert_eq!(fs::read(d.join("named")).unwrap(), want);
    assert_eq!(fs::metadata(d.join("named")).unwrap().nlink(), 1);
    // Unnamed, and then closed: nothing.
    let mut g = tmp(rustix::fs::OFlags::empty()).unwrap();
    g.write_all(b"scratch").unwrap();
    drop(g);
    // O_EXCL: it stays unnamed.
    let h = tmp(rustix::fs::OFlags::EXCL).unwrap();
    assert_eq!(
        rustix::fs::linkat(
            rustix::fs::CWD,
            format!("/proc/self/fd/{}", h.as_raw_fd()),
            rustix::fs::CWD,
            d.join("never"),
            rustix::fs::AtFlags::SYMLINK_FOLLOW,
        )
        .unwrap_err(),
        rustix::io::Errno::NOENT
    );
    drop(h);
    // Python's TemporaryFile (O_TMPFILE where the directory takes it).
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, tempfile, os\n\
             f = tempfile.TemporaryFile(dir=sys.argv[1])\n\
             f.write(b'py'); f.seek(0)\n\
             assert f.read() == b'py'\n\
             assert tempfile._O_TMPFILE_WORKS, 'O_TMPFILE refused'\n\
             assert os.listdir(sys.argv[1]) == ['named'], os.listdir(sys.argv[1])",
        )
        .arg(&d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The journal has it: a kill -9 and a remount keep it, and the next generation holds it.
    ws.kill_daemon();
    ws.mount();
    assert_eq!(fs::read(d.join("named")).unwrap(), want);
    ws.sync();
    let dest = ws.dir.path().join("restored");
    let out = ws.restore(None, &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got = Vec::new();
    fs::File::open(dest.join("d/named"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == want, "the restored file differs");
    let names: Vec<_> = fs::read_dir(dest.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["named"]);
}
