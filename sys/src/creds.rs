//! Acting as another user for the calls that create files: Linux's per-thread filesystem
//! ids. Elsewhere the daemon runs as the user who mounted (macFUSE mounts per user), and
//! files are created as that user.

/// Makes this thread's file creations and permission checks use `uid` and `gid` (group
/// first: a thread that is no longer root could not change it). Returns whether the system
/// could.
#[cfg(target_os = "linux")]
pub fn assume_fs_ids(uid: u32, gid: u32) -> bool {
    // SAFETY: setfsgid/setfsuid take plain integers and touch only this thread's
    // credentials; they cannot violate memory safety.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
    }
    true
}
#[cfg(not(target_os = "linux"))]
pub fn assume_fs_ids(_uid: u32, _gid: u32) -> bool {
    false
}

/// Gives this thread back the daemon's own ids (user first, while it may still).
#[cfg(target_os = "linux")]
pub fn restore_fs_ids(uid: u32, gid: u32) {
    // SAFETY: as in `assume_fs_ids`.
    unsafe {
        libc::setfsuid(uid);
        libc::setfsgid(gid);
    }
}
#[cfg(not(target_os = "linux"))]
pub fn restore_fs_ids(_uid: u32, _gid: u32) {}
