//! The platform layer: every call that only Linux offers lives here, behind
//! `cfg(target_os = "linux")`, beside the fallback other systems (macOS with
//! macFUSE) compile instead. `tests/linux_only.rs` lists every Linux-only call
//! in the workspace's sources and checks that each is gated, and that outside
//! tests each sits here with its fallback.

pub mod creds;
pub mod fs;
pub mod handle;
pub mod mount;
pub mod process;
pub mod xattr;
