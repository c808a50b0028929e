//! Filesystem session
//!
//! A session runs a filesystem implementation while it is being mounted to a specific mount
//! point. A session begins by mounting the filesystem and ends by unmounting it. While the
//! filesystem is mounted, the session loop receives, dispatches and replies to kernel requests
//! for filesystem operations under its mount point.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::thread::{self};

use log::debug;
use log::error;
use log::info;
use log::warn;
use nix::unistd::Uid;
use nix::unistd::geteuid;
use parking_lot::Mutex;

use crate::Errno;
use crate::Filesystem;
use crate::KernelConfig;
use crate::MountOption;
use crate::ReplyEmpty;
use crate::Request;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::dev_fuse::DevFuse;
use crate::ll;
use crate::ll::Operation;
use crate::ll::ResponseErrno;
use crate::ll::Version;
use crate::ll::flags::init_flags::InitFlags;
use crate::ll::fuse_abi as abi;
use crate::mnt::Mount;
use crate::mnt::mount_options::Config;
use crate::mnt::mount_options::check_option_conflicts;
use crate::notify::Notifier;
use crate::read_buf::FuseReadBuf;
use crate::reply::Reply;
use crate::reply::ReplyRaw;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;

/// The max size of write requests from the kernel. The absolute minimum is 4k,
/// FUSE recommends at least 128k, max 16M. The FUSE default is 16M on macOS
/// and 128k on other systems.
pub(crate) const MAX_WRITE_SIZE: usize = 16 * 1024 * 1024;

#[derive(Default, Debug, Eq, PartialEq, Clone, Copy)]
/// How requests should be filtered based on the calling UID.
pub enum SessionACL {
    /// Allow requests from any user. Corresponds to the `allow_other` mount option.
    All,
    /// Allow requests from root. Corresponds to the `allow_root` mount option.
    RootAndOwner,
    /// Allow requests from the owning UID. This is FUSE's default mode of operation.
    #[default]
    Owner,
}

impl SessionACL {
    /// Returns the mount option string for kernel/fusermount/libfuse paths.
    /// Both `All` and `RootAndOwner` map to `allow_other` - the kernel only
    /// understands `allow_other`, and fuser enforces the root-only restriction internally.
    #[allow(dead_code)]
    pub(crate) fn to_mount_option(self) -> Option<&'static str> {
        match self {
            SessionACL::All | SessionACL::RootAndOwner => Some("allow_other"),
            SessionACL::Owner => None,
        }
    }
}

/// Calls `destroy` on drop.
#[derive(Debug)]
pub(crate) struct FilesystemHolder<FS: Filesystem> {
    pub(crate) fs: Option<FS>,
}

impl<FS: Filesystem> FilesystemHolder<FS> {
    fn destroy(&mut self) {
        if let Some(mut fs) = self.fs.take() {
            fs.destroy();
        }
    }
}

impl<FS: Filesystem> Drop for FilesystemHolder<FS> {
    fn drop(&mut self) {
        self.destroy();
    }
}

#[derive(Debug)]
struct UmountOnDrop {
    mount: Arc<Mutex<Option<Mount>>>,
}

impl UmountOnDrop {
    fn umount(&self) -> io::Result<()> {
        if let Some(mount) = self.mount.lock().take() {
            mount.umount()?;
        }
        Ok(())
    }
}

impl Drop for UmountOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.umount() {
            warn!("Failed to umount filesystem: {}", e);
        }
    }
}

/// The session data structure
#[derive(Debug)]
pub struct Session<FS: Filesystem> {
    /// Filesystem operation implementations. None after `destroy` called.
    pub(crate) filesystem: FilesystemHolder<FS>,
    /// Communication channel to the kernel driver
    pub(crate) ch: Channel,
    /// Handle to the mount.  Dropping this unmounts.
    mount: UmountOnDrop,
    /// Whether to restrict access to owner, root + owner, or unrestricted
    /// Used to implement `allow_root` and `auto_unmount`
    pub(crate) allowed: SessionACL,
    /// User that launched the fuser process
    pub(crate) session_owner: Uid,
    /// FUSE protocol version, as reported by the kernel.
    /// The field is set to `Some` when the init message is received.
    pub(crate) proto_version: Option<Version>,
    pub(crate) config: Config,
    /// owsfs: the kernel's INIT request as it was read, kept so that another process can
    /// resume the session on the same connection ([`Session::resume`]).
    init_request: Option<Vec<u8>>,
    /// owsfs: the largest write the filesystem's `init` settled (the reading threads'
    /// buffers are sized by it, see [`FuseReadBuf::resident`]).
    max_write: usize,
    /// owsfs: the payload size of a ring entry, when the connection serves through FUSE
    /// over io_uring (the filesystem asked for it and the kernel granted it).
    uring_payload: Option<usize>,
}

impl<FS: Filesystem> AsFd for Session<FS> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ch.as_fd()
    }
}

impl<FS: Filesystem> Session<FS> {
    /// Create a new session by mounting the given filesystem to the given mountpoint
    /// # Errors
    /// Returns an error if the options are incorrect, or if the fuse device can't be mounted.
    pub fn new<P: AsRef<Path>>(
        filesystem: FS,
        mountpoint: P,
        options: &Config,
    ) -> io::Result<Session<FS>> {
        check_option_conflicts(options)?;

        let mountpoint = mountpoint.as_ref();
        info!("Mounting {}", mountpoint.display());
        // If AutoUnmount is requested, but not AllowRoot or AllowOther, return an error
        // because fusermount needs allow_root or allow_other to handle the auto_unmount option
        if options.mount_options.contains(&MountOption::AutoUnmount)
            && options.acl == SessionACL::Owner
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("auto_unmount requires acl != Owner, got: {:?}", options.acl),
            ));
        }
        let (file, mount) = Mount::new(mountpoint, &options.mount_options, options.acl)?;

        let ch = Channel::new(file);

        let mut session = Session {
            filesystem: FilesystemHolder {
                fs: Some(filesystem),
            },
            ch,
            mount: UmountOnDrop {
                mount: Arc::new(Mutex::new(Some(mount))),
            },
            allowed: options.acl,
            session_owner: geteuid(),
            proto_version: None,
            config: options.clone(),
            init_request: None,
            max_write: MAX_WRITE_SIZE,
            uring_payload: None,
        };

        session.handshake()?;

        Ok(session)
    }

    /// Wrap an existing /dev/fuse file descriptor. This doesn't mount the
    /// filesystem anywhere; that must be done separately.
    pub fn from_fd(
        filesystem: FS,
        fd: OwnedFd,
        acl: SessionACL,
        config: Config,
    ) -> io::Result<Self> {
        let ch = Channel::new(Arc::new(DevFuse(File::from(fd))));
        let mut session = Session {
            filesystem: FilesystemHolder {
                fs: Some(filesystem),
            },
            ch,
            mount: UmountOnDrop {
                mount: Arc::new(Mutex::new(None)),
            },
            allowed: acl,
            session_owner: geteuid(),
            proto_version: None,
            config,
            init_request: None,
            max_write: MAX_WRITE_SIZE,
            uring_payload: None,
        };

        session.handshake()?;

        Ok(session)
    }

    /// owsfs: takes over a connection whose INIT an earlier process answered (it died, or
    /// was replaced, while something kept the `/dev/fuse` descriptor open). `init_request`
    /// is that INIT request as [`Session::init_request`] returned it: the filesystem's `init`
    /// is called with it again, so it settles what it settled then, and nothing is sent to
    /// the kernel, which is past its handshake.
    pub fn resume(
        filesystem: FS,
        fd: OwnedFd,
        acl: SessionACL,
        config: Config,
        init_request: &[u8],
    ) -> io::Result<Self> {
        let ch = Channel::new(Arc::new(DevFuse(File::from(fd))));
        let mut session = Session {
            filesystem: FilesystemHolder {
                fs: Some(filesystem),
            },
            ch,
            mount: UmountOnDrop {
                mount: Arc::new(Mutex::new(None)),
            },
            allowed: acl,
            session_owner: geteuid(),
            proto_version: None,
            config,
            init_request: None,
            max_write: MAX_WRITE_SIZE,
            uring_payload: None,
        };
        // The request is parsed in place, so it needs fuse_in_header's alignment.
        let mut aligned = vec![0u64; init_request.len().div_ceil(8)];
        let bytes: &mut [u8] = zerocopy::IntoBytes::as_mut_bytes(aligned.as_mut_slice());
        bytes[..init_request.len()].copy_from_slice(init_request);
        let request = ll::AnyRequest::try_from(&bytes[..init_request.len()])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let Ok(ll::Operation::Init(init)) = request.operation() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the saved request is not an INIT",
            ));
        };
        let v = init.version();
        let mut kernel = KernelConfig::new(init.capabilities(), init.max_readahead(), v);
        let Some(filesystem) = &mut session.filesystem.fs else {
            return Err(io::Error::other("Bug: no filesystem"));
        };
        filesystem.init(Request::ref_cast(request.header()), &mut kernel)?;
        session.max_write = kernel.max_write() as usize;
        session.uring_payload = uring_payload(&session.config, init.capabilities(), &kernel);
        session.say_uring();
        session.proto_version = Some(v);
        session.init_request = Some(init_request.to_vec());
        Ok(session)
    }

    /// owsfs: whether this session serves through FUSE over io_uring (the filesystem's
    /// `init` asked for it, the kernel granted it, and `Config::uring_threads` is set).
    pub fn serves_uring(&self) -> bool {
        self.uring_payload.is_some()
    }

    /// owsfs: a session settled on io_uring says so (`uring_served`) from INIT on, before
    /// its rings start: the mount is ready, and asked, as soon as INIT is answered.
    fn say_uring(&self) {
        #[cfg(target_os = "linux")]
        if self.uring_payload.is_some() {
            crate::uring::started();
        }
    }

    /// owsfs: the kernel's INIT request of this connection, for [`Session::resume`].
    pub fn init_request(&self) -> Option<&[u8]> {
        self.init_request.as_deref()
    }

    /// Run the session loop in a background thread. If the returned handle is dropped,
    /// the filesystem is unmounted and the given session ends.
    pub fn spawn(self) -> io::Result<BackgroundSession> {
        let sender = self.ch.sender();
        // Take the fuse_session, so that we can unmount it
        let mount = std::mem::take(&mut *self.mount.mount.lock());
        let guard = thread::Builder::new()
            .name("fuser-bg".to_string())
            .spawn(move || self.run())?;
        Ok(BackgroundSession {
            guard,
            sender,
            mount,
        })
    }

    /// Run the session loop that receives kernel requests and dispatches them to method
    /// calls into the filesystem. This read-dispatch-loop is non-concurrent to prevent
    /// having multiple buffers (which take up much memory), but the filesystem methods
    /// may run concurrent by spawning threads.
    /// # Errors
    /// Returns any final error when the session comes to an end.
    pub fn run(self) -> io::Result<()> {
        let Session {
            filesystem,
            ch,
            mount: _do_not_umount_yet,
            allowed,
            session_owner,
            proto_version: _,
            config,
            init_request: _,
            max_write,
            uring_payload,
        } = self;

        let n_threads = config.n_threads.unwrap_or(1);

        if !cfg!(target_os = "linux") && n_threads != 1 {
            // TODO: check whether it works on macOS/FreeBSD and enable if it works.
            return Err(io::Error::other(
                "n_threads != 1 is only supported on Linux",
            ));
        }

        let Some(n_threads_minus_one) = n_threads.checked_sub(1) else {
            return Err(io::Error::other("n_threads"));
        };

        let mut filesystem = Arc::new(filesystem);

        let mut channels = Vec::with_capacity(n_threads);

        for _ in 0..n_threads_minus_one {
            if config.clone_fd {
                #[cfg(target_os = "linux")]
                {
                    channels.push(ch.clone_fd()?);
                    continue;
                }
                #[cfg(not(target_os = "linux"))]
                {
                    return Err(io::Error::other("clone_fd is only supported on Linux"));
                }
            } else {
                channels.push(ch.clone());
            }
        }
        #[cfg(target_os = "linux")]
        let ring_ch = ch.clone();
        channels.push(ch);

        let mut threads = Vec::with_capacity(n_threads);

        for (i, ch) in channels.into_iter().enumerate() {
            let thread_name = format!("fuser-{i}");
            let event_loop = SessionEventLoop {
                thread_name: thread_name.clone(),
                filesystem: filesystem.clone(),
                ch,
                allowed,
                session_owner,
                max_write,
            };
            threads.push(
                thread::Builder::new()
                    .name(thread_name)
                    .spawn(move || event_loop.event_loop())?,
            );
        }

        #[cfg(target_os = "linux")]
        let rings = match uring_payload {
            Some(payload) => spawn_rings(
                &ring_ch,
                payload,
                config.uring_threads,
                config.uring_root.clone(),
                &filesystem,
                allowed,
                session_owner,
                max_write,
            )?,
            None => Vec::new(),
        };
        #[cfg(not(target_os = "linux"))]
        let _ = uring_payload;

        let mut reply: io::Result<()> = Ok(());
        #[cfg(target_os = "linux")]
        for (name, ring) in rings {
            // A queue that could not be served leaves its requests to /dev/fuse (the kernel
            // uses the rings only once every queue has an entry): not the session's end.
            match ring.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("{name}: the io_uring queue ended: {e}"),
                Err(_) => return Err(io::Error::other("an io_uring thread panicked")),
            }
        }
        for thread in threads {
            let res = match thread.join() {
                Ok(res) => res,
                Err(_) => {
                    return Err(io::Error::other("event loop thread panicked"));
                }
            };
            if let Err(e) = res {
                if reply.is_ok() {
                    reply = Err(e);
                }
            }
        }

        let Some(filesystem) = Arc::get_mut(&mut filesystem) else {
            return Err(io::Error::other(
                "BUG: must have one refcount for filesystem",
            ));
        };

        filesystem.destroy();

        reply
    }

    fn handshake(&mut self) -> io::Result<()> {
        let mut buf = FuseReadBuf::new();
        let buf = buf.as_mut();

        loop {
            // Read the init request from the kernel
            let size = match self.ch.receive_retrying(buf) {
                Ok(size) => size,
                Err(nix::errno::Errno::ENODEV) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "FUSE device disconnected during handshake",
                    ));
                }
                Err(err) => return Err(err.into()),
            };

            // Parse the request
            let request = match ll::AnyRequest::try_from(&buf[..size]) {
                Ok(request) => request,
                Err(err) => {
                    error!("{err}");
                    return Err(io::Error::new(io::ErrorKind::InvalidData, err.to_string()));
                }
            };

            // Extract the init operation
            let op = match request.operation() {
                Ok(op) => op,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "Failed to parse FUSE operation",
                    ));
                }
            };

            let init = match op {
                ll::Operation::Init(init) => init,
                _ => {
                    error!("Received non-init FUSE operation before init: {}", request);
                    // Send error response and return error - non-init during handshake is invalid
                    <ReplyRaw as Reply>::new(
                        request.unique(),
                        ReplySender::Channel(self.ch.sender()),
                    )
                    .send_ll(&ResponseErrno(ll::Errno::EIO));
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "Received non-init FUSE operation during handshake",
                    ));
                }
            };

            let v = init.version();
            if v.0 > abi::FUSE_KERNEL_VERSION {
                // Kernel has a newer major version than we support.
                // Send our version and wait for a second INIT request with a compatible version.
                debug!(
                    "INIT: Kernel version {} > our version {}, sending our version and waiting for next init",
                    v.0,
                    abi::FUSE_KERNEL_VERSION
                );
                let response = init.reply_version_only();
                <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                    .send_ll(&response);
                continue;
            }

            // We don't support ABI versions before 7.6
            if v < Version(7, 6) {
                error!("Unsupported FUSE ABI version {v}");
                <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                    .send_ll(&ResponseErrno(ll::Errno::EPROTO));
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("Unsupported FUSE ABI version {v}"),
                ));
            }

            let mut config = KernelConfig::new(init.capabilities(), init.max_readahead(), v);

            // Call filesystem init method and give it a chance to return an error
            let Some(filesystem) = &mut self.filesystem.fs else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "Bug: filesystem must be initialized during handshake",
                ));
            };
            let res = filesystem.init(Request::ref_cast(request.header()), &mut config);
            if let Err(error) = res {
                let errno = Errno::from_i32(error.raw_os_error().unwrap_or(0));
                <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                    .send_ll(&ResponseErrno(errno));
                return Err(error);
            }

            // Remember the ABI version supported by kernel and mark the session initialized.
            self.proto_version = Some(v);
            self.max_write = config.max_write() as usize;
            self.uring_payload = uring_payload(&self.config, init.capabilities(), &config);
            self.say_uring();
            self.init_request = Some(buf[..size].to_vec());

            // Log capability status for debugging
            for bit in 0..64 {
                let bitflags = InitFlags::from_bits_retain(1 << bit);
                if bitflags == InitFlags::FUSE_INIT_EXT {
                    continue;
                }
                let bitflag_is_known = InitFlags::all().contains(bitflags);
                let kernel_supports = init.capabilities().contains(bitflags);
                let we_requested = config.requested.contains(bitflags);
                // On macOS, there's a clash between linux and macOS constants,
                // so we pick macOS ones (last).
                let name = if let Some((name, _)) = bitflags.iter_names().last() {
                    Cow::Borrowed(name)
                } else {
                    Cow::Owned(format!("(1 << {bit})"))
                };
                if we_requested && kernel_supports {
                    debug!("capability {name} enabled")
                } else if we_requested {
                    debug!("capability {name} not supported by kernel")
                } else if kernel_supports {
                    debug!("capability {name} not requested by client")
                } else if bitflag_is_known {
                    debug!("capability {name} not supported nor requested")
                }
            }

            // Reply with our desired version and settings.
            debug!(
                "INIT response: ABI {}.{}, flags {:#x}, max readahead {}, max write {}",
                abi::FUSE_KERNEL_VERSION,
                abi::FUSE_KERNEL_MINOR_VERSION,
                init.capabilities() & config.requested,
                config.max_readahead,
                config.max_write
            );

            let response = init.reply(&config);
            <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                .send_ll(&response);

            return Ok(());
        }
    }

    /// Unmount the filesystem
    pub fn unmount(&mut self) -> io::Result<()> {
        self.mount.umount()
    }

    /// Returns a thread-safe object that can be used to unmount the Filesystem
    pub fn unmount_callable(&mut self) -> SessionUnmounter {
        SessionUnmounter {
            mount: self.mount.mount.clone(),
        }
    }

    /// Returns an object that can be used to send notifications to the kernel
    pub fn notifier(&self) -> Notifier {
        Notifier::new(self.ch.sender())
    }
}

#[derive(Debug)]
/// A thread-safe object that can be used to unmount a Filesystem
pub struct SessionUnmounter {
    mount: Arc<Mutex<Option<Mount>>>,
}

impl SessionUnmounter {
    /// Unmount the filesystem
    pub fn unmount(&mut self) -> io::Result<()> {
        if let Some(mount) = std::mem::take(&mut *self.mount.lock()) {
            mount.umount()?;
        }
        Ok(())
    }
}

pub(crate) struct SessionEventLoop<FS: Filesystem> {
    /// Cache thread name for faster `debug!`.
    pub(crate) thread_name: String,
    pub(crate) ch: Channel,
    pub(crate) filesystem: Arc<FilesystemHolder<FS>>,
    pub(crate) allowed: SessionACL,
    pub(crate) session_owner: Uid,
    /// owsfs: the connection's largest write, which sizes the read buffer.
    pub(crate) max_write: usize,
}

impl<FS: Filesystem> SessionEventLoop<FS> {
    fn event_loop(&self) -> io::Result<()> {
        // Buffer for receiving requests from the kernel. Only one is allocated and
        // it is reused immediately after dispatching to conserve memory and allocations.
        // owsfs: the largest request is a write of max_write bytes or a setxattr of 64 KiB,
        // each after headers well below 4 KiB; the buffer is resident (see `resident`).
        let mut buf = FuseReadBuf::resident(self.max_write.max(1 << 16) + 4096 + 64);
        let buf = buf.as_mut();
        loop {
            // Read the next request from the given channel to kernel driver
            // The kernel driver makes sure that we get exactly one request per read
            match self.ch.receive_retrying(buf) {
                Ok(size) => match RequestWithSender::new(self.ch.sender(), &buf[..size]) {
                    // Dispatch request
                    Some(req) => {
                        if let Ok(Operation::Destroy(_)) = req.request.operation() {
                            req.reply::<ReplyEmpty>().ok();
                            return Ok(());
                        } else {
                            req.dispatch(self)
                        }
                    }
                    // Quit loop on illegal request
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "Invalid request",
                        ));
                    }
                },
                Err(nix::errno::Errno::ENODEV) => return Ok(()),
                // owsfs: a read that took a request just as the unmount (or an abort) shut
                // the connection down answers ECONNABORTED (fuse_dev_do_read): the end too.
                Err(nix::errno::Errno::ECONNABORTED) => return Ok(()),
                Err(err) => return Err(err.into()),
            }
        }
    }
}

/// owsfs: the payload size of a ring entry when the connection serves through io_uring:
/// the filesystem's `init` asked for `FUSE_OVER_IO_URING`, the kernel offered it, and the
/// session has threads for it. The kernel refuses an entry smaller than its largest
/// request or answer (`max_write`, `max_pages` pages, at least 8 KiB).
fn uring_payload(config: &Config, offered: InitFlags, kernel: &KernelConfig) -> Option<usize> {
    let granted = offered & kernel.requested;
    if config.uring_threads == 0 || !granted.contains(InitFlags::FUSE_OVER_IO_URING) {
        return None;
    }
    let page = page_size::get();
    let pages = usize::from(kernel.max_pages()).max(32);
    Some((kernel.max_write() as usize).max(pages * page).max(8192))
}

/// owsfs: the serving threads of FUSE over io_uring: `per_queue` for each of the kernel's
/// queues (one per CPU), each with its own ring and entry, pinned to its queue's CPU.
#[cfg(target_os = "linux")]
fn spawn_rings<FS: Filesystem>(
    ch: &Channel,
    payload: usize,
    per_queue: usize,
    root: Option<std::path::PathBuf>,
    filesystem: &Arc<FilesystemHolder<FS>>,
    allowed: SessionACL,
    session_owner: Uid,
    max_write: usize,
) -> io::Result<Vec<(String, JoinHandle<io::Result<()>>)>> {
    let queues = crate::uring::queues();
    let mut rings = Vec::new();
    for qid in 0..queues {
        let qid = u16::try_from(qid).map_err(|_| io::Error::other("too many CPUs"))?;
        for t in 0..per_queue.max(1) {
            let name = format!("fuser-ring-{qid}.{t}");
            // Pinned to the queue's CPU: the kernel gives the queue the requests made
            // there. (Spreading a queue's threads over the other CPUs, or not pinning them,
            // measured slower for untar and rm -rf on two CPUs.)
            let cpu = usize::from(qid);
            let event_loop = SessionEventLoop {
                thread_name: name.clone(),
                filesystem: filesystem.clone(),
                ch: ch.clone(),
                allowed,
                session_owner,
                max_write,
            };
            let root = root.clone();
            let handle = thread::Builder::new().name(name.clone()).spawn(move || {
                let ring = crate::uring::Queue {
                    qid,
                    cpu,
                    payload,
                    root,
                };
                crate::uring::serve_queue(&event_loop.ch, ring, &event_loop)
            })?;
            rings.push((name, handle));
        }
    }
    debug!("serving through io_uring: {queues} queues, {per_queue} entries each");
    Ok(rings)
}

#[cfg(target_os = "linux")]
impl<FS: Filesystem> crate::uring::Serve for SessionEventLoop<FS> {
    fn serve(&self, slot: &Arc<crate::uring::RingSlot>, data: &[u8]) -> bool {
        match RequestWithSender::new(self.ch.ring_sender(slot.clone()), data) {
            Some(req) => {
                match req.request.operation() {
                    Ok(Operation::Destroy(_)) => req.reply::<ReplyEmpty>().ok(),
                    // The kernel sends a FORGET through the ring when it must (a
                    // READDIRPLUS entry it could not keep): it has no answer, but the ring
                    // waits for a commit.
                    Ok(Operation::Forget(_) | Operation::BatchForget(_)) => {
                        req.dispatch(self);
                        slot.fail(req.request.unique().0, 0);
                    }
                    _ => req.dispatch(self),
                }
                true
            }
            None => false,
        }
    }
}

/// The background session data structure
#[derive(Debug)]
pub struct BackgroundSession {
    /// Thread guard of the background session
    pub guard: JoinHandle<io::Result<()>>,
    /// Object for creating Notifiers for client use
    sender: ChannelSender,
    /// Ensures the filesystem is unmounted when the session ends
    mount: Option<Mount>,
}

impl BackgroundSession {
    /// Unmount the filesystem and join the background thread.
    pub fn umount_and_join(mut self) -> io::Result<()> {
        if let Some(mount) = self.mount.take() {
            mount.umount()?;
        }
        self.join()
    }

    /// Returns an object that can be used to send notifications to the kernel
    pub fn notifier(&self) -> Notifier {
        Notifier::new(self.sender.clone())
    }

    /// Join the filesystem thread.
    pub fn join(self) -> io::Result<()> {
        self.guard
            .join()
            .map_err(|_panic: Box<dyn std::any::Any + Send>| {
                io::Error::new(
                    io::ErrorKind::Other,
                    "filesystem background thread panicked",
                )
            })?
    }
}
