//! owsfs: FUSE over io_uring (`FUSE_OVER_IO_URING`, Linux 6.14; protocol 7.42).
//!
//! Once a connection's INIT granted `FUSE_OVER_IO_URING` and every queue has an entry, the
//! kernel hands each request to the queue of the CPU that made it, through a ring entry: a
//! pair of buffers in this process (the headers, and the payload) and an `IORING_OP_URING_CMD`
//! that completes when a request has been copied into them. The answer goes back with
//! `COMMIT_AND_FETCH`, which in the same call waits for the next request: one system call
//! per request, and the thread that sleeps in it is woken on the CPU of the program that
//! asked, which is what /dev/fuse cannot do.
//!
//! Here each serving thread owns one ring, pinned to its queue's CPU, and starts with one
//! entry. Only that thread submits to its ring (the kernel copies the next request in the
//! submitter's context, so it must be a thread that lives as long as the ring). A request
//! the filesystem answers later, from another thread (a strict fsync waiting for the store),
//! keeps its entry meanwhile: the thread registers another entry and goes on serving, and
//! the late answer is handed back to it through an eventfd it keeps a read on; it then
//! commits that entry, which becomes one more of its entries. FORGET, INTERRUPT and
//! notifications keep going through /dev/fuse, served by the usual threads.
//!
//! The kernel's layout (include/uapi/linux/fuse.h): the headers buffer is
//! `struct fuse_uring_req_header` (the in or out header in 128 bytes, the operation's first
//! argument in 128 bytes, then `struct fuse_uring_ent_in_out`); the other arguments are in
//! the payload buffer, `payload_sz` bytes of it. fuser parses a request laid out as
//! /dev/fuse delivers it, header then arguments in one slice; the header and the first
//! argument (at most 168 bytes) are copied right in front of the payload, so the payload
//! itself (a write's data) is never copied.

use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::warn;
use parking_lot::Mutex;

/// Requests served through rings by this process, once its rings started.
static SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The requests this process served through FUSE over io_uring; None if it serves none
/// through it (its session did not settle on io_uring).
pub fn served() -> Option<u64> {
    use std::sync::atomic::Ordering::Relaxed;
    STARTED.load(Relaxed).then(|| SERVED.load(Relaxed))
}

pub(crate) fn started() {
    STARTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: in_out[128], op_in[128], fuse_uring_ent_in_out (32).
const HEADERS: usize = 128 + 128 + 32;
const OP_IN: usize = 128;
const ENT_IN_OUT: usize = 256;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// Where the payload starts in an entry's memory: the headers, then room to put the request
/// header and first argument right in front of the payload.
const PAYLOAD_AT: usize = 1024;
const PAGE: usize = 4096;

/// Where an entry's request is.
#[derive(Debug, Default)]
enum State {
    /// With the kernel: the entry waits for a request.
    #[default]
    Kernel,
    /// Being dispatched by the serving thread.
    Serving {
        unique: u64,
        /// It had a payload, which fuser's slice of it still covers meanwhile.
        overlaps: bool,
        /// Its answer, if given during the dispatch: kept aside (Some) when it overlaps,
        /// else written into the entry (None).
        answer: Option<Option<Staged>>,
    },
    /// Dispatched, not answered yet: the answer will come from another thread.
    Deferred { unique: u64 },
    /// Answered late, in the entry: the serving thread is to commit it.
    Answered { unique: u64 },
    /// Its answer was refused: the kernel keeps the entry, and it serves no more.
    Lost,
}

/// An answer kept aside: inline up to 256 bytes (an entry, a write's count), so that the
/// answers to requests with a payload cost no allocation.
type Staged = smallvec::SmallVec<[u8; 256]>;

/// What a ring's serving thread shares with the threads that answer late: the entries to
/// commit, and the eventfd that wakes it.
#[derive(Debug)]
pub(crate) struct Wake {
    fd: std::os::fd::OwnedFd,
    ready: Mutex<Vec<usize>>,
}

impl Wake {
    fn new() -> io::Result<Wake> {
        // SAFETY: eventfd(2) with constant flags; the descriptor is owned at once.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor, owned by nothing else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Wake {
            fd,
            ready: Mutex::new(Vec::new()),
        })
    }

    fn post(&self, index: usize) {
        self.ready.lock().push(index);
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) of 8 bytes to an eventfd we own.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// One ring entry's memory, and the hand-over of its answer: the serving thread waits
/// until the answer is in the buffers (from whatever thread the filesystem answers).
#[derive(Debug)]
pub(crate) struct RingSlot {
    base: *mut u8,
    len: usize,
    payload_cap: usize,
    /// Its number in its ring (the user data of its commands).
    index: usize,
    state: Mutex<State>,
    wake: Arc<Wake>,
}

// SAFETY: the memory is written by the kernel while the entry is with it (in the serving
// thread's io_uring_enter), read by the serving thread while it dispatches, and written by
// an answer only under `state`'s lock while a request is pending; nothing else touches it.
unsafe impl Send for RingSlot {}
unsafe impl Sync for RingSlot {}

impl Drop for RingSlot {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl RingSlot {
    /// An entry whose payload holds `payload_cap` bytes. Every page is written and locked
    /// before the kernel copies into it: a copy that faults while the process is being
    /// killed ends the request with an error (as for /dev/fuse, see `FuseReadBuf::resident`).
    fn new(payload_cap: usize, index: usize, wake: Arc<Wake>) -> io::Result<RingSlot> {
        let len = (PAYLOAD_AT + payload_cap).div_ceil(PAGE) * PAGE;
        // SAFETY: an anonymous private mapping, owned by the returned slot.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base.cast::<u8>();
        let mut at = 0;
        while at < len {
            // SAFETY: within the mapping; volatile so that the page is really written.
            unsafe { std::ptr::write_volatile(base.add(at), 0) };
            at += PAGE;
        }
        // SAFETY: mlock(2) of this mapping; failing (RLIMIT_MEMLOCK) leaves it written.
        unsafe { libc::mlock(base.cast(), len) };
        Ok(RingSlot {
            base,
            len,
            payload_cap,
            index,
            state: Mutex::new(State::Kernel),
            wake,
        })
    }

    fn iovecs(&self) -> [libc::iovec; 2] {
        [
            libc::iovec {
                iov_base: self.base.cast(),
                iov_len: HEADERS,
            },
            libc::iovec {
                // SAFETY: within the mapping.
                iov_base: unsafe { self.base.add(PAYLOAD_AT) }.cast(),
                iov_len: self.payload_cap,
            },
        ]
    }

    fn read_u32(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        // SAFETY: `at + 4` is within the headers.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(at), b.as_mut_ptr(), 4) };
        u32::from_ne_bytes(b)
    }

    fn read_u64(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: `at + 8` is within the headers.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(at), b.as_mut_ptr(), 8) };
        u64::from_ne_bytes(b)
    }

    /// The commit id of the request in the entry (its unique).
    fn commit_id(&self) -> u64 {
        self.read_u64(ENT_IN_OUT + 8)
    }

    /// The request the kernel put in the entry, laid out as /dev/fuse delivers it, and
    /// whether it has a payload; None if its sizes do not add up.
    fn request(&self) -> Option<(&[u8], bool)> {
        let payload = self.read_u32(ENT_IN_OUT + 16) as usize;
        let len = self.read_u32(0) as usize;
        let op = len.checked_sub(IN_HEADER + payload)?;
        if op > OP_IN || payload > self.payload_cap {
            return None;
        }
        // fuser reads the header in place, which needs 8-byte alignment: with a first
        // argument of another size, the payload moves down to follow it.
        let start = (PAYLOAD_AT - IN_HEADER - op) & !7;
        // SAFETY: all ranges are within the mapping (the headers end at 288, `start` is at
        // least 1024 - 176); only the payload's move may overlap, and `copy` allows it.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base, self.base.add(start), IN_HEADER);
            std::ptr::copy_nonoverlapping(
                self.base.add(128),
                self.base.add(start + IN_HEADER),
                op,
            );
            if start + IN_HEADER + op != PAYLOAD_AT {
                std::ptr::copy(
                    self.base.add(PAYLOAD_AT),
                    self.base.add(start + IN_HEADER + op),
                    payload,
                );
            }
            Some((
                std::slice::from_raw_parts(self.base.add(start), len),
                payload > 0,
            ))
        }
    }

    /// Takes an answer (an out header, then its arguments, as written to /dev/fuse). During
    /// the dispatch it goes into the entry, or aside when the request had a payload (fuser's
    /// slice of it is still alive); the serving thread commits it once the dispatch returns.
    /// Later, it goes into the entry and the serving thread is woken to commit it.
    pub(crate) fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let mut state = self.state.lock();
        match &mut *state {
            State::Serving {
                unique,
                overlaps,
                answer: answer @ None,
            } => {
                if *overlaps {
                    *answer = Some(Some(bufs.iter().flat_map(|b| b.iter().copied()).collect()));
                } else {
                    self.put(*unique, bufs);
                    *answer = Some(None);
                }
            }
            State::Deferred { unique } => {
                let unique = *unique;
                self.put(unique, bufs);
                *state = State::Answered { unique };
                drop(state);
                self.wake.post(self.index);
            }
            _ => return Err(io::Error::other("an answer to a request that has none pending")),
        }
        Ok(())
    }

    /// Writes an answer into the entry: its out header where the in header was, the rest
    /// into the payload. An answer larger than the payload buffer becomes EIO.
    fn put(&self, unique: u64, bufs: &[IoSlice<'_>]) {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut header = [0u8; OUT_HEADER];
        let mut payload = 0usize;
        if total >= OUT_HEADER && total - OUT_HEADER <= self.payload_cap {
            let mut at = 0usize;
            for b in bufs {
                let head = OUT_HEADER.saturating_sub(at).min(b.len());
                header[at.min(OUT_HEADER)..at.min(OUT_HEADER) + head].copy_from_slice(&b[..head]);
                let part = &b[head..];
                // SAFETY: `payload + part.len()` stays within the payload buffer (checked
                // against the total above).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        part.as_ptr(),
                        self.base.add(PAYLOAD_AT + payload),
                        part.len(),
                    )
                };
                payload += part.len();
                at += b.len();
            }
        } else {
            warn!("an answer of {total} bytes does not fit the ring entry: EIO instead");
            header = error_header(unique, libc::EIO);
        }
        // SAFETY: the out header goes where the in header was, the payload size into
        // fuse_uring_ent_in_out; both within the headers.
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_ptr(), self.base, OUT_HEADER);
            std::ptr::copy_nonoverlapping(
                (payload as u32).to_ne_bytes().as_ptr(),
                self.base.add(ENT_IN_OUT + 16),
                4,
            );
        }
    }

    fn serving(&self, unique: u64, overlaps: bool) {
        *self.state.lock() = State::Serving {
            unique,
            overlaps,
            answer: None,
        };
    }

    /// After the dispatch: the unique to commit now (an answer kept aside is put into the
    /// entry first), or None if the answer is still to come.
    fn dispatched(&self) -> Option<u64> {
        let mut state = self.state.lock();
        let State::Serving { unique, answer, .. } = &mut *state else {
            return None;
        };
        let unique = *unique;
        match answer.take() {
            Some(staged) => {
                if let Some(staged) = staged {
                    self.put(unique, &[IoSlice::new(&staged)]);
                }
                *state = State::Kernel;
                Some(unique)
            }
            None => {
                *state = State::Deferred { unique };
                None
            }
        }
    }

    /// A late answer to commit: its unique, once.
    fn take_answered(&self) -> Option<u64> {
        let mut state = self.state.lock();
        let State::Answered { unique } = *state else {
            return None;
        };
        *state = State::Kernel;
        Some(unique)
    }

    fn lose(&self) {
        *self.state.lock() = State::Lost;
    }

    fn is_with_kernel(&self) -> bool {
        matches!(*self.state.lock(), State::Kernel)
    }

    /// Answers the request being served with an error (one fuser could not parse), or with
    /// nothing (a FORGET the kernel sent through the ring: it waits for a commit).
    pub(crate) fn fail(&self, unique: u64, errno: i32) {
        let _ = self.send(&[IoSlice::new(&error_header(unique, errno))]);
    }
}

fn error_header(unique: u64, errno: i32) -> [u8; OUT_HEADER] {
    let mut out = [0u8; OUT_HEADER];
    out[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
    out[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    out[8..16].copy_from_slice(&unique.to_ne_bytes());
    out
}

/// The number of queues the kernel makes: one per possible CPU (the highest number in
/// `/sys/devices/system/cpu/possible`, plus one), each of which needs an entry before the
/// connection uses io_uring at all.
pub(crate) fn queues() -> usize {
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let highest = possible
        .trim()
        .split([',', '-'])
        .filter_map(|n| n.parse::<usize>().ok())
        .max();
    match highest {
        Some(n) => n + 1,
        // SAFETY: sysconf(3) takes a constant.
        None => usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) })
            .unwrap_or(1)
            .max(1),
    }
}

fn pin_to_cpu(cpu: usize) {
    // A cpu_set_t holds CPUs 0 to 1023; a thread for a higher one runs anywhere.
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET of a CPU it holds, and
    // sched_setaffinity(2) on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            debug!(
                "io_uring queue {cpu}: not pinned ({})",
                io::Error::last_os_error()
            );
        }
    }
}

fn command(dev: RawFd, op: u32, qid: u16, commit_id: u64) -> squeue::Entry128 {
    // struct fuse_uring_cmd_req: flags (u64), commit_id (u64), qid (u16), padding.
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    opcode::UringCmd80::new(types::Fd(dev), op).cmd(cmd).build()
}

/// REGISTER takes the entry's two buffers as an iovec array: its address in `sqe->addr`,
/// and 2 in `sqe->len`, which the io-uring crate does not set.
fn register(dev: RawFd, qid: u16, iov: &[libc::iovec; 2]) -> squeue::Entry128 {
    let sqe = opcode::UringCmd80::new(types::Fd(dev), CMD_REGISTER)
        .cmd({
            let mut cmd = [0u8; 80];
            cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
            cmd
        })
        .addr(Some(iov.as_ptr() as u64))
        .build();
    // SAFETY: Entry128 is repr(C): a 64-byte io_uring_sqe and 64 more bytes; `len` is the
    // u32 at offset 24 of io_uring_sqe.
    let mut bytes: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    bytes[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: the same bytes back, with `len` set.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
}

/// What a serving thread does with each request: parse it and answer it through `slot`.
pub(crate) trait Serve {
    /// Serves one request (`data`, laid out as /dev/fuse delivers it), answering through
    /// `slot` now or later; false if it could not be parsed (answered with EIO here).
    fn serve(&self, slot: &Arc<RingSlot>, data: &[u8]) -> bool;
}

/// The user data of the eventfd read that wakes the serving thread.
const WAKE: u64 = u64::MAX;
/// At most this many entries in one ring: beyond, late answers hold the thread back.
const MOST_ENTRIES: usize = 32;

/// One serving thread's ring: its entries, their iovec arrays (which REGISTER points to),
/// and the eventfd read that wakes it.
struct Entries {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    dev: RawFd,
    qid: u16,
    payload_cap: usize,
    kick: Option<Kicker>,
    slots: Vec<Arc<RingSlot>>,
    iovecs: Vec<Box<[libc::iovec; 2]>>,
    wake: Arc<Wake>,
    wake_buf: Box<u64>,
    /// A request came through the ring: a failure now would strand the requests of its
    /// entries, so it panics instead ([`fatal`]).
    served: bool,
}

impl Entries {
    fn push(&mut self, sqe: &squeue::Entry128) -> io::Result<()> {
        // SAFETY: what the command points to (an entry's buffers and iovec array, the
        // eventfd's buffer) lives in `self` until the ring is closed (`serve_queue`).
        match unsafe { self.ring.submission().push(sqe) } {
            Ok(()) => Ok(()),
            Err(_) => fatal(
                self.served,
                io::Error::other("the io_uring submission queue is full"),
            ),
        }
    }

    /// A new entry, registered with the kernel.
    fn add(&mut self) -> io::Result<()> {
        let index = self.slots.len();
        let slot = match RingSlot::new(self.payload_cap, index, self.wake.clone()) {
            Ok(slot) => Arc::new(slot),
            Err(err) => return fatal(self.served, err),
        };
        self.iovecs.push(Box::new(slot.iovecs()));
        self.slots.push(slot);
        self.register(index)
    }

    fn register(&mut self, index: usize) -> io::Result<()> {
        let sqe = register(self.dev, self.qid, &self.iovecs[index]).user_data(index as u64);
        self.push(&sqe)
    }

    fn commit(&mut self, index: usize, unique: u64) -> io::Result<()> {
        let sqe = command(self.dev, CMD_COMMIT_AND_FETCH, self.qid, unique).user_data(index as u64);
        self.push(&sqe)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let buf: *mut u64 = &mut *self.wake_buf;
        let sqe: squeue::Entry128 =
            opcode::Read::new(types::Fd(self.wake.fd.as_raw_fd()), buf.cast(), 8)
                .build()
                .user_data(WAKE)
                .into();
        self.push(&sqe)
    }

    /// A new entry while the others are busy, and a request to take it (see [`Kicker`]):
    /// the entry is registered first (submitted now), then the kick is sent.
    fn add_and_kick(&mut self) -> io::Result<()> {
        self.add()?;
        if let Err(err) = self.ring.submit() {
            return fatal(self.served, err);
        }
        if let Some(kick) = &self.kick {
            let _ = kick.0.send(());
        }
        Ok(())
    }

    /// Entries with the kernel, waiting for a request.
    fn waiting(&self) -> usize {
        self.slots.iter().filter(|s| s.is_with_kernel()).count()
    }
}

/// Which queue a serving thread serves, from which CPU, with entries of which payload
/// size; `root` is the mountpoint, for the [`Kicker`].
pub(crate) struct Queue {
    pub(crate) qid: u16,
    pub(crate) cpu: usize,
    pub(crate) payload: usize,
    pub(crate) root: Option<std::path::PathBuf>,
}

/// Makes a request come through a queue's ring: a thread pinned to the queue's CPU asks for
/// the attributes of the mount's root, past the kernel's cache (`AT_STATX_FORCE_SYNC`).
/// The kernel gives a newly registered entry only requests that come after it: those
/// queued while every entry of the queue was busy are taken by the next COMMIT_AND_FETCH.
/// When the busy entries wait for late answers (which may wait for those very requests: a
/// sync ioctl pushing dirty pages), that commit must come from a new request.
struct Kicker(std::sync::mpsc::Sender<()>);

impl Kicker {
    fn start(root: std::path::PathBuf, cpu: usize) -> io::Result<Kicker> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(root.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("a mountpoint with a NUL byte"))?;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(format!("fuser-ring-kick-{cpu}"))
            .spawn(move || {
                pin_to_cpu(cpu);
                while rx.recv().is_ok() {
                    while rx.try_recv().is_ok() {}
                    // SAFETY: statx(2) with a NUL-terminated path and a buffer of its type.
                    unsafe {
                        let mut buf: libc::statx = std::mem::zeroed();
                        libc::statx(
                            libc::AT_FDCWD,
                            path.as_ptr(),
                            libc::AT_STATX_FORCE_SYNC,
                            libc::STATX_TYPE,
                            &mut buf,
                        );
                    }
                }
            })?;
        Ok(Kicker(tx))
    }
}

/// Serves queue `q.qid` from a thread pinned to `q.cpu` until the connection ends:
/// registers an entry, then answers each request and fetches the next in one call. Returns
/// once the kernel ends the entries (unmount, abort); an error if it refuses the first one.
/// A ring that fails after serving panics: its entries' requests would otherwise wait for
/// good.
pub(crate) fn serve_queue<S: Serve>(dev: &impl AsFd, q: Queue, serve: &S) -> io::Result<()> {
    pin_to_cpu(q.cpu);
    let kick = match q.root {
        Some(root) => Some(Kicker::start(root, q.cpu)?),
        None => None,
    };
    let mut entries = Entries {
        ring: IoUring::builder().build(2 * MOST_ENTRIES as u32 + 2)?,
        dev: dev.as_fd().as_raw_fd(),
        qid: q.qid,
        payload_cap: q.payload,
        kick,
        slots: Vec::new(),
        iovecs: Vec::new(),
        wake: Arc::new(Wake::new()?),
        wake_buf: Box::new(0),
        served: false,
    };
    let end = serve_entries(&mut entries, serve);
    // The ring goes first: once it is closed the kernel copies nothing more into an entry
    // (its work for a closed ring runs as if the task were dead), so the memory may go.
    let Entries { ring, slots, .. } = entries;
    drop(ring);
    drop(slots);
    end
}

fn serve_entries<S: Serve>(e: &mut Entries, serve: &S) -> io::Result<()> {
    e.add()?;
    e.arm_wake()?;
    let mut early = 0;
    // The completions of one wait, taken off the ring before any is served (serving one
    // submits to the ring); kept from wait to wait.
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(2 * MOST_ENTRIES);
    loop {
        match e.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
            Err(err) => return fatal(e.served, err),
        }
        done.clear();
        done.extend(e.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(data, res) in &done {
            if data == WAKE {
                let ready = std::mem::take(&mut *e.wake.ready.lock());
                for index in ready {
                    if let Some(unique) = e.slots[index].take_answered() {
                        e.commit(index, unique)?;
                    }
                }
                e.arm_wake()?;
                continue;
            }
            let index = data as usize;
            match -res {
                0 => {}
                libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV | libc::ECANCELED => {
                    return Ok(());
                }
                // The kernel takes entries once the connection's INIT is settled.
                libc::EAGAIN if !e.served && early < 100 => {
                    early += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    e.register(index)?;
                    continue;
                }
                errno if !e.served => return Err(io::Error::from_raw_os_error(errno)),
                errno => {
                    // An answer was refused (its request is gone), and the entry with it:
                    // it stays the kernel's, so another takes its place.
                    warn!(
                        "io_uring queue {}: an answer was refused ({}): registering another entry",
                        e.qid,
                        io::Error::from_raw_os_error(errno)
                    );
                    e.slots[index].lose();
                    e.add_and_kick()?;
                    continue;
                }
            }
            e.served = true;
            let slot = e.slots[index].clone();
            serve_one(&slot, e.qid, serve);
            match slot.dispatched() {
                Some(unique) => e.commit(index, unique)?,
                // Answered later, through the wake: meanwhile another entry serves.
                None if e.waiting() == 0 && e.slots.len() < MOST_ENTRIES => e.add_and_kick()?,
                None => {}
            }
        }
    }
}

/// Serves the request in `slot`, or answers EIO when it does not parse.
fn serve_one<S: Serve>(slot: &Arc<RingSlot>, qid: u16, serve: &S) {
    let commit_id = slot.commit_id();
    SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match slot.request() {
        Some((data, overlaps)) => {
            slot.serving(commit_id, overlaps);
            if !serve.serve(slot, data) {
                slot.fail(commit_id, libc::EIO);
            }
        }
        None => {
            warn!("io_uring queue {qid}: a request whose sizes do not add up: EIO");
            slot.serving(commit_id, false);
            slot.fail(commit_id, libc::EIO);
        }
    }
}

fn fatal(served_any: bool, err: io::Error) -> io::Result<()> {
    if served_any {
        panic!("FUSE over io_uring: the ring failed ({err}); its requests cannot be answered");
    }
    Err(err)
}
