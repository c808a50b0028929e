//! POSIX behaviour through a real mount: each test mounts a fresh workspace through /dev/fuse.
// Linux kernel semantics (renameat2, fallocate modes, O_DIRECT, aio, file handles,
// /proc and /sys): the file builds on Linux only.
#![cfg(target_os = "linux")]

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

use common::*;

fn cstr(p: &std::path::Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

#[test]
fn files_dirs_links_and_attributes() {
    files_dirs_links_and_attributes_with(&[]);
}

#[test]
fn files_dirs_links_and_attributes_write_through() {
    files_dirs_links_and_attributes_with(&["writeback_cache=off"]);
}

#[test]
fn files_dirs_links_and_attributes_passthrough() {
    files_dirs_links_and_attributes_with(&["passthrough=on"]);
}

fn files_dirs_links_and_attributes_with(opts: &[&str]) {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(opts);
    fs::create_dir_all(ws.path("a/b/c")).unwrap();
    fs::write(ws.path("a/b/c/f.txt"), b"hello world").unwrap();
    assert_eq!(fs::read(ws.path("a/b/c/f.txt")).unwrap(), b"hello world");
    // The backing directory holds exactly what the workspace shows.
    assert_eq!(fs::read(ws.backing("a/b/c/f.txt")).unwrap(), b"hello world");

    // Rename across directories, and the file keeps its inode number.
    let ino = fs::metadata(ws.path("a/b/c/f.txt")).unwrap().ino();
    fs::rename(ws.path("a/b/c/f.txt"), ws.path("a/g.txt")).unwrap();
    assert!(!ws.path("a/b/c/f.txt").exists());
    assert_eq!(fs::metadata(ws.path("a/g.txt")).unwrap().ino(), ino);

    // Directory rename moves the subtree.
    fs::rename(ws.path("a/b"), ws.path("z")).unwrap();
    assert!(ws.path("z/c").is_dir());

    // Symlinks.
    symlink("g.txt", ws.path("a/link")).unwrap();
    assert_eq!(
        fs::read_link(ws.path("a/link")).unwrap().to_str(),
        Some("g.txt")
    );
    assert_eq!(fs::read(ws.path("a/link")).unwrap(), b"hello world");
    assert!(
        fs::symlink_metadata(ws.path("a/link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // Hard links share the inode number and the content.
    fs::hard_link(ws.path("a/g.txt"), ws.path("z/hard")).unwrap();
    let m1 = fs::metadata(ws.path("a/g.txt")).unwrap();
    let m2 = fs::metadata(ws.path("z/hard")).unwrap();
    assert_eq!(m1.ino(), m2.ino());
    assert_eq!(m1.nlink(), 2);
    fs::write(ws.path("z/hard"), b"via the other name").unwrap();
    assert_eq!(fs::read(ws.path("a/g.txt")).unwrap(), b"via the other name");

    // chmod, chown, utimens.
    fs::set_permissions(ws.path("a/g.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        fs::metadata(ws.path("a/g.txt")).unwrap().mode() & 0o7777,
        0o640
    );
    std::os::unix::fs::chown(ws.path("a/g.txt"), Some(1234), Some(4321)).unwrap();
    let m = fs::metadata(ws.path("a/g.txt")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 4321));
    let f = File::options()
        .write(true)
        .open(ws.path("a/g.txt"))
        .unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 123_456_789);
    f.set_times(fs::FileTimes::new().set_accessed(t).set_modified(t))
        .unwrap();
    drop(f);
    let m = fs::metadata(ws.path("a/g.txt")).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 123_456_789));

    // Truncate up and down.
    let f = OpenOptions::new()
        .write(true)
        .open(ws.path("a/g.txt"))
        .unwrap();
    f.set_len(3).unwrap();
    f.set_len(10).unwrap();
    drop(f);
    assert_eq!(fs::read(ws.path("a/g.txt")).unwrap(), b"via\0\0\0\0\0\0\0");

    // Unlink and rmdir, and their errors.
    assert_eq!(
        fs::remove_dir(ws.path("z")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    fs::remove_file(ws.path("z/hard")).unwrap();
    fs::remove_dir_all(ws.path("z")).unwrap();
    assert!(!ws.path("z").exists());
    assert_eq!(
        fs::read(ws.path("nope")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(
        fs::create_dir(ws.path("a")).unwrap_err().raw_os_error(),
        Some(libc::EEXIST)
    );

    // readdir sees exactly the entries.
    let mut names: Vec<String> = fs::read_dir(ws.path("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["g.txt", "link"]);
}

#[test]
fn open_flags_append_trunc_excl() {
    open_flags_append_trunc_excl_with(&[]);
}

#[test]
fn open_flags_append_trunc_excl_write_through() {
    open_flags_append_trunc_excl_with(&["writeback_cache=off"]);
}

#[test]
fn open_flags_append_trunc_excl_passthrough() {
    open_flags_append_trunc_excl_with(&["passthrough=on"]);
}

fn open_flags_append_trunc_excl_with(opts: &[&str]) {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(opts);
    let p = ws.path("f");
    fs::write(&p, b"abc").unwrap();
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"def").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"abcdef");
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all(b"x").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"x");
    // As on Linux's local filesystems, O_TRUNC truncates even a read-only open.
    fs::write(&p, b"xyz").unwrap();
    let c = cstr(&p);
    // SAFETY: a valid NUL-terminated path; the descriptor is closed right away.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_TRUNC);
        assert!(fd >= 0);
        libc::close(fd);
    }
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
    fs::write(&p, b"x").unwrap();
    let err = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    // A FIFO is created and reported as one.
    let fifo = cstr(&ws.path("fifo"));
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::metadata(ws.path("fifo")).unwrap().file_type().is_fifo());
}

#[test]
fn rename_noreplace_and_exchange() {
    rename_noreplace_and_exchange_with(&[]);
}

#[test]
fn rename_noreplace_and_exchange_write_through() {
    rename_noreplace_and_exchange_with(&["writeback_cache=off"]);
}

#[test]
fn rename_noreplace_and_exchange_passthrough() {
    rename_noreplace_and_exchange_with(&["passthrough=on"]);
}

fn rename_noreplace_and_exchange_with(opts: &[&str]) {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(opts);
    fs::write(ws.path("a"), b"A").unwrap();
    fs::write(ws.path("b"), b"B").unwrap();
    let (a, b) = (cstr(&ws.path("a")), cstr(&ws.path("b")));
    let renameat2 = |flags: u32| {
        // SAFETY: valid NUL-terminated paths; AT_FDCWD.
        unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                flags,
            )
        }
    };
    assert_eq!(renameat2(libc::RENAME_NOREPLACE), -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    assert_eq!(renameat2(libc::RENAME_EXCHANGE), 0);
    assert_eq!(fs::read(ws.path("a")).unwrap(), b"B");
    assert_eq!(fs::read(ws.path("b")).unwrap(), b"A");
    fs::remove_file(ws.path("b")).unwrap();
    assert_eq!(renameat2(libc::RENAME_NOREPLACE), 0);
    assert_eq!(fs::read(ws.path("b")).unwrap(), b"B");
}

#[test]
fn unlinked_and_replaced_open_files_keep_their_contents() {
    unlinked_and_replaced_open_files_keep_their_contents_with(&[]);
}

#[test]
fn unlinked_and_replaced_open_files_keep_their_contents_write_through() {
    unlinked_and_replaced_open_files_keep_their_contents_with(&["writeback_cache=off"]);
}

#[test]
fn unlinked_and_replaced_open_files_keep_their_contents_passthrough() {
    unlinked_and_replaced_open_files_keep_their_contents_with(&["passthrough=on"]);
}

fn unlinked_and_replaced_open_files_keep_their_contents_with(opts: &[&str]) {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(opts);
    // Unlink while open: reads and writes go on through the open descriptor.
    fs::write(ws.path("u"), b"still here").unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(ws.path("u"))
        .unwrap();
    fs::remove_file(ws.path("u")).unwrap();
    assert!(!ws.path("u").exists());
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    f.write_all(b" and more").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    s.clear();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here and more");
    drop(f);

    // Rename over an open file: the open file keeps the old contents, the name the new.
    fs::write(ws.path("target"), b"old contents").unwrap();
    let mut old = File::open(ws.path("target")).unwrap();
    fs::write(ws.path("new"), b"new contents").unwrap();
    fs::rename(ws.path("new"), ws.path("target")).unwrap();
    let mut s = String::new();
    old.read_to_string(&mut s).unwrap();
    assert_eq!(s, "old contents");
    assert_eq!(fs::read(ws.path("target")).unwrap(), b"new contents");
    drop(old);

    // Hard links survive the removal of the first name and a remount, with the same number.
    fs::write(ws.path("h1"), b"linked").unwrap();
    fs::hard_link(ws.path("h1"), ws.path("h2")).unwrap();
    let ino = fs::metadata(ws.path("h2")).unwrap().ino();
    fs::remove_file(ws.path("h1")).unwrap();
    ws.unmount();
    ws.mount();
    let m = fs::metadata(ws.path("h2")).unwrap();
    assert_eq!(m.ino(), ino, "inode numbers are stable across remounts");
    assert_eq!(m.nlink(), 1);
    assert_eq!(fs::read(ws.path("h2")).unwrap(), b"linked");
}

#[test]
fn xattrs_fallocate_seek_data_copy_range() {
    xattrs_fallocate_seek_data_copy_range_with(&[]);
}

#[test]
fn xattrs_fallocate_seek_data_copy_range_write_through() {
    xattrs_fallocate_seek_data_copy_range_with(&["writeback_cache=off"]);
}

#[test]
fn xattrs_fallocate_seek_data_copy_range_passthrough() {
    xattrs_fallocate_seek_data_copy_range_with(&["passthrough=on"]);
}

fn xattrs_fallocate_seek_data_copy_range_with(opts: &[&str]) {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(opts);
    let p = ws.path("x");
    fs::write(&p, b"data").unwrap();
    let cp = cstr(&p);
    let name = c"user.owsfs.test";
    // SAFETY: valid pointers and lengths for the duration of each call.
    unsafe {
        assert_eq!(
            libc::setxattr(cp.as_ptr(), name.as_ptr(), b"v1".as_ptr().cast(), 2, 0),
            0,
            "setxattr: {}",
            std::io::Error::last_os_error()
        );
        let mut buf = [0u8; 16];
        let n = libc::getxattr(cp.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 16);
        assert_eq!(&buf[..n as usize], b"v1");
        let n = libc::listxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), 0);
        assert!(n >= 16);
        assert_eq!(libc::removexattr(cp.as_ptr(), name.as_ptr()), 0);
        let n = libc::getxattr(cp.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 16);
        assert_eq!(n, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENODATA)
        );
    }

    // A sparse file: data, a hole, data. SEEK_DATA and SEEK_HOLE find them.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(ws.path("sparse"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.write_all_at(&[2u8; 4096], 1 << 20).unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: plain syscalls on an open descriptor.
    unsafe {
        if !opts.contains(&"writeback_cache=off") && !opts.contains(&"passthrough=on") {
            // Holes of pages still dirty in the kernel are unknown: all data, hole at EOF.
            assert_eq!(libc::lseek(fd, 0, libc::SEEK_HOLE), (1 << 20) + 4096);
            assert_eq!(libc::lseek(fd, 4096, libc::SEEK_DATA), 4096);
        } else {
            assert_eq!(libc::lseek(fd, 0, libc::SEEK_HOLE), 4096);
            assert_eq!(libc::lseek(fd, 4096, libc::SEEK_DATA), 1 << 20);
        }
        // Punch the first block out and allocate space past the end.
        assert_eq!(
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                4096
            ),
            0
        );
        assert_eq!(libc::fallocate(fd, 0, 2 << 20, 4096), 0);
    }
    let mut b = [9u8; 4];
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(b, [0u8; 4]);
    assert_eq!(f.metadata().unwrap().len(), (2 << 20) + 4096);

    // copy_file_range between two files of the workspace.
    let src = File::open(ws.path("x")).unwrap();
    let dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(ws.path("y"))
        .unwrap();
    let mut off_in: i64 = 0;
    let mut off_out: i64 = 0;
    // SAFETY: valid descriptors and offset pointers.
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            4,
            0,
        )
    };
    assert_eq!(n, 4);
    drop(dst);
    assert_eq!(fs::read(ws.path("y")).unwrap(), b"data");

    // statfs answers with the backing filesystem's numbers.
    let c = cstr(&ws.mp);
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-parameter.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut sv) }, 0);
    assert!(sv.f_blocks > 0);
}

#[test]
fn fsync_and_fdatasync_reach_the_backing_file() {
    fsync_and_fdatasync_reach_the_backing_file_with(&[]);
}

#[test]
fn fsync_and_fdatasync_reach_the_backing_file_write_through() {
    fsync_and_fdatasync_reach_the_backing_file_with(&["writeback_cache=off"]);
}

#[test]
fn fsync_and_fdatasync_reach_the_backing_file_passthrough() {
    fsync_and_fdatasync_reach_the_backing_file_with(&["passthrough=on"]);
}

fn fsync_and_fdatasync_reach_the_backing_file_with(opts: &[&str]) {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(opts);
    let mut f = File::create(ws.path("durable")).unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    let dir = File::open(&ws.mp).unwrap();
    dir.sync_all().unwrap();
    let v = ws.status_json(false);
    assert!(
        v["ops"]["fsyncs"].as_u64().unwrap() >= 3,
        "fsync, fdatasync and fsyncdir reach the daemon: {v}"
    );
}

#[test]
fn shared_writable_mmap_is_coherent_between_processes() {
    shared_writable_mmap_is_coherent_between_processes_with(&[]);
}

#[test]
fn shared_writable_mmap_is_coherent_between_processes_write_through() {
    shared_writable_mmap_is_coherent_between_processes_with(&["writeback_cache=off"]);
}

#[test]
fn shared_writable_mmap_is_coherent_between_processes_passthrough() {
    shared_writable_mmap_is_coherent_between_processes_with(&["passthrough=on"]);
}

fn shared_writable_mmap_is_coherent_between_processes_with(opts: &[&str]) {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(opts);
    let p = ws.path("shm");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(4096).unwrap();
    // SAFETY: mapping 4096 bytes of a file of 4096 bytes; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // Another process writes through its own shared mapping (python's mmap).
    let script = format!(
        "import mmap,os\nfd=os.open('{}',os.O_RDWR)\nm=mmap.mmap(fd,4096)\nm[0:5]=b'hello'\nm.flush()\n",
        p.display()
    );
    run_ok(std::process::Command::new("python3").arg("-c").arg(&script));
    // SAFETY: the mapping is 4096 bytes long and alive.
    let seen = unsafe { std::slice::from_raw_parts(map as *const u8, 5) }.to_vec();
    assert_eq!(&seen, b"hello");
    // SAFETY: writing inside the live mapping, then syncing and unmapping it.
    unsafe {
        std::ptr::copy_nonoverlapping(b"world".as_ptr(), (map as *mut u8).add(100), 5);
        assert_eq!(libc::msync(map, 4096, libc::MS_SYNC), 0);
        libc::munmap(map, 4096);
    }
    drop(f);
    let data = fs::read(ws.backing("shm")).unwrap();
    assert_eq!(&data[0..5], b"hello");
    assert_eq!(&data[100..105], b"world");
}

#[test]
fn unprivileged_writes_and_truncates_clear_set_id_bits() {
    unprivileged_writes_and_truncates_clear_set_id_bits_with(&[]);
}

#[test]
fn unprivileged_writes_and_truncates_clear_set_id_bits_write_through() {
    unprivileged_writes_and_truncates_clear_set_id_bits_with(&["writeback_cache=off"]);
}

#[test]
fn unprivileged_writes_and_truncates_clear_set_id_bits_passthrough() {
    unprivileged_writes_and_truncates_clear_set_id_bits_with(&["passthrough=on"]);
}

fn unprivileged_writes_and_truncates_clear_set_id_bits_with(opts: &[&str]) {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(opts);
    let p = ws.path("setid");
    let reset = || {
        fs::write(&p, b"x").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o6777)).unwrap();
    };
    let as_user = |code: &str| {
        let script = format!("import os\nos.setgid(4242)\nos.setuid(4242)\n{code}\n");
        run_ok(
            std::process::Command::new("python3")
                .arg("-c")
                .arg(script)
                .arg(&p),
        );
    };
    // The mode as the kernel has it: statx asking for the mode alone is answered from the
    // kernel's cached attributes unless the daemon said they changed (stat(2) asks for the
    // times too, which a write marks stale, and so refreshes everything).
    let mode = || {
        let st = rustix::fs::statx(
            rustix::fs::CWD,
            &p,
            rustix::fs::AtFlags::empty(),
            rustix::fs::StatxFlags::MODE,
        )
        .unwrap();
        let cached = u32::from(st.stx_mode) & 0o7777;
        let fresh = fs::metadata(&p).unwrap().mode() & 0o7777;
        assert_eq!(cached, fresh, "statx(STATX_MODE) and stat(2) disagree");
        cached
    };
    // Root (CAP_FSETID) keeps them.
    reset();
    fs::write(&p, b"by root").unwrap();
    assert_eq!(mode(), 0o6777);
    // A write by another user clears set-uid, and set-gid since the file is group-executable.
    reset();
    assert_eq!(mode(), 0o6777);
    as_user("import sys\nfd=os.open(sys.argv[1], os.O_WRONLY)\nos.write(fd, b'y')\nos.close(fd)");
    assert_eq!(mode(), 0o0777);
    // So does a truncate, and an O_TRUNC open.
    reset();
    as_user("import sys\nos.truncate(sys.argv[1], 0)");
    assert_eq!(mode(), 0o0777);
    reset();
    as_user("import sys\nos.close(os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC))");
    assert_eq!(mode(), 0o0777);
    // And every kind of fallocate(1): plain (mode 0), punching a hole, zeroing a range, as
    // vfs_fallocate does on a local filesystem.
    for falloc in [&[][..], &["--punch-hole"], &["--zero-range"]] {
        reset();
        assert_eq!(mode(), 0o6777);
        run_ok(
            std::process::Command::new("setpriv")
                .args([
                    "--reuid=4242",
                    "--regid=4242",
                    "--clear-groups",
                    "fallocate",
                ])
                .args(falloc)
                .args(["--offset=0", "--length=4096"])
                .arg(&p),
        );
        assert_eq!(mode(), 0o0777, "fallocate {falloc:?}");
    }
    // Root's fallocate keeps them.
    reset();
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, 8192).unwrap();
    drop(f);
    assert_eq!(mode(), 0o6777);
}

#[test]
fn a_file_being_read_can_be_opened_for_writing() {
    a_file_being_read_can_be_opened_for_writing_with(&[]);
}

#[test]
fn a_file_being_read_can_be_opened_for_writing_write_through() {
    a_file_being_read_can_be_opened_for_writing_with(&["writeback_cache=off"]);
}

fn a_file_being_read_can_be_opened_for_writing_with(opts: &[&str]) {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(opts);
    let p = ws.path("log");
    fs::write(&p, b"first\n").unwrap();
    // `tail -f` style: a reader holds the file open while a writer appends.
    let mut reader = File::open(&p).unwrap();
    let mut w = OpenOptions::new().append(true).open(&p).unwrap();
    w.write_all(b"second\n").unwrap();
    drop(w);
    let mut s = String::new();
    reader.read_to_string(&mut s).unwrap();
    assert_eq!(s, "first\nsecond\n");
}

/// With `-o passthrough=on`, a file open by a passthrough reader cannot be opened for writing
/// until the reader closes (the kernel would accept only another passthrough open, and writes
/// must reach the daemon): ETXTBSY, and nothing changes.
#[test]
fn passthrough_readers_refuse_writers_with_etxtbsy() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(&["passthrough=on"]);
    let p = ws.path("f");
    fs::write(&p, b"abc").unwrap();
    // close(2) returns before the writer's RELEASE reaches the daemon; a reader that opens
    // before it is served cached, as it should be. Open until the reader is a passthrough one.
    let passthrough_opens = || {
        ws.status_json(false)["ops"]["opens_passthrough"]
            .as_u64()
            .unwrap()
    };
    let mut reader = None;
    for _ in 0..100 {
        let before = passthrough_opens();
        let f = File::open(&p).unwrap();
        if passthrough_opens() > before {
            reader = Some(f);
            break;
        }
        drop(f);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let reader = reader.expect("no open became a passthrough one");
    let err = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ETXTBSY), "{err}");
    assert_eq!(fs::read(&p).unwrap(), b"abc");
    drop(reader);
    fs::write(&p, b"written").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"written");
}

/// `open(O_RDONLY | O_TRUNC)` of a running executable fails with ETXTBSY and leaves it intact
/// (the truncation must not happen before the kernel's write-access check).
#[test]
fn truncating_a_running_executable_is_refused_and_harmless() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    let exe = ws.path("sleeper");
    fs::copy("/bin/sleep", &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let size = fs::metadata(&exe).unwrap().len();
    let mut child = std::process::Command::new(&exe).arg("30").spawn().unwrap();
    // Wait until the exec is complete (its executable is known), then try to truncate.
    assert!(wait_for(std::time::Duration::from_secs(10), || {
        fs::read_link(format!("/proc/{}/exe", child.id())).is_ok()
    }));
    let c = cstr(&exe);
    for flags in [
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_WRONLY,
        libc::O_RDWR | libc::O_TRUNC,
    ] {
        // SAFETY: a valid NUL-terminated path; a descriptor, if any, is closed.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        let err = std::io::Error::last_os_error();
        if fd >= 0 {
            // SAFETY: closing the descriptor just opened.
            unsafe { libc::close(fd) };
        }
        assert_eq!(fd, -1, "open with flags {flags:#o} must fail");
        assert_eq!(err.raw_os_error(), Some(libc::ETXTBSY), "{err}");
    }
    assert_eq!(
        fs::metadata(&exe).unwrap().len(),
        size,
        "the executable is intact"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the program still runs"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
