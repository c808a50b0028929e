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
//! Here each serving thread owns one ring and one entry, and is pinned to its queue's CPU;
//! a queue has as many entries as it has threads, so a thread busy with a slow request
//! (one that waits for the store) leaves the others of its CPU free. FORGET, INTERRUPT and
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
use parking_lot::Condvar;
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

/// The request a serving thread waits to see answered.
#[derive(Debug, Default)]
struct Pending {
    /// Its unique, until it is answered.
    unique: Option<u64>,
    /// It had a payload, which fuser's slice of it still covers while it is served.
    overlaps: bool,
    /// An answer kept aside until the request is done with.
    staged: Option<Vec<u8>>,
}

/// One ring entry's memory, and the hand-over of its answer: the serving thread waits
/// until the answer is in the buffers (from whatever thread the filesystem answers).
#[derive(Debug)]
pub(crate) struct RingSlot {
    base: *mut u8,
    len: usize,
    payload_cap: usize,
    pending: Mutex<Pending>,
    answered: Condvar,
}

// SAFETY: the memory is written by the kernel while the owning thread waits in
// io_uring_enter, read by that thread, and written by an answer only under `pending`'s lock
// while a request is pending; nothing else touches it.
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
    fn new(payload_cap: usize) -> io::Result<RingSlot> {
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
            pending: Mutex::new(Pending::default()),
            answered: Condvar::new(),
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

    /// Takes an answer (an out header, then its arguments, as written to /dev/fuse). When
    /// the request had a payload, fuser's slice of it is still alive while the filesystem
    /// answers, so the answer is kept aside and put into the entry once the request is
    /// done with; otherwise it goes straight into the entry.
    pub(crate) fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let mut pending = self.pending.lock();
        let Some(unique) = pending.unique else {
            return Err(io::Error::other("an answer to a request that has none pending"));
        };
        if pending.overlaps {
            pending.staged = Some(bufs.iter().flat_map(|b| b.iter().copied()).collect());
        } else {
            self.put(unique, bufs);
        }
        pending.unique = None;
        self.answered.notify_all();
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
        let mut pending = self.pending.lock();
        pending.unique = Some(unique);
        pending.overlaps = overlaps;
        pending.staged = None;
    }

    /// Waits until the request being served is answered, and puts an answer kept aside
    /// into the entry.
    fn wait_answered(&self, unique: u64) {
        let mut pending = self.pending.lock();
        while pending.unique.is_some() {
            self.answered.wait(&mut pending);
        }
        if let Some(staged) = pending.staged.take() {
            self.put(unique, &[IoSlice::new(&staged)]);
        }
    }

    /// Answers the request being served with an error (one fuser could not parse).
    fn fail(&self, unique: u64, errno: i32) {
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

/// The number of queues the kernel makes: one per possible CPU, each of which needs an
/// entry before the connection uses io_uring at all.
pub(crate) fn queues() -> usize {
    // SAFETY: sysconf(3) takes a constant.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(n).unwrap_or(1).max(1)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity(2) on this
    // thread.
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
    /// Serves one request (`data`, laid out as /dev/fuse delivers it); false if it could
    /// not be parsed (answered with EIO here).
    fn serve(&self, slot: &Arc<RingSlot>, data: &[u8]) -> bool;
}

/// Serves queue `qid` through one entry until the connection ends: registers the entry,
/// then answers each request and fetches the next in one call. Returns once the kernel
/// ends the entry (unmount, abort); an error if the kernel refuses the entry.
pub(crate) fn serve_queue<S: Serve>(
    dev: &impl AsFd,
    qid: u16,
    cpu: usize,
    payload_cap: usize,
    serve: &S,
) -> io::Result<()> {
    pin_to_cpu(cpu);
    let dev = dev.as_fd().as_raw_fd();
    let mut slots = vec![Arc::new(RingSlot::new(payload_cap)?)];
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder().build(2)?;
    let end = serve_entries(&mut ring, dev, qid, payload_cap, serve, &mut slots);
    // The ring goes first: once it is closed the kernel copies nothing more into an entry
    // (its work for a closed ring runs as if the task were dead), so the memory may go.
    drop(ring);
    drop(slots);
    end
}

fn serve_entries<S: Serve>(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    dev: RawFd,
    qid: u16,
    payload_cap: usize,
    serve: &S,
    slots: &mut Vec<Arc<RingSlot>>,
) -> io::Result<()> {
    let mut slot = slots[0].clone();
    let mut iov = slot.iovecs();
    let mut next = register(dev, qid, &iov);
    let mut registering = true;
    let mut early = 0;
    loop {
        // SAFETY: the entry's buffers (and the iovec array, for REGISTER) outlive the
        // command: `serve_queue` keeps them until the ring is closed.
        unsafe { ring.submission().push(&next) }
            .map_err(|_| io::Error::other("the io_uring submission queue is full"))?;
        let cqe = loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            if let Some(cqe) = ring.completion().next() {
                break cqe;
            }
        };
        let res = cqe.result();
        match -res {
            0 => {}
            libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV | libc::ECANCELED => return Ok(()),
            // The kernel takes entries once the connection's INIT is settled.
            libc::EAGAIN if registering && early < 100 => {
                early += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            e if registering => return Err(io::Error::from_raw_os_error(e)),
            e => {
                // The answer was refused (its request is gone), and the entry with it:
                // the entry stays the kernel's, so a new one takes its place.
                warn!(
                    "io_uring queue {qid}: an answer was refused ({}): registering a new entry",
                    io::Error::from_raw_os_error(e)
                );
                slot = Arc::new(RingSlot::new(payload_cap)?);
                slots.push(slot.clone());
                iov = slot.iovecs();
                next = register(dev, qid, &iov);
                registering = true;
                continue;
            }
        }
        registering = false;
        let commit_id = slot.commit_id();
        SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match slot.request() {
            Some((data, overlaps)) => {
                slot.serving(commit_id, overlaps);
                if !serve.serve(&slot, data) {
                    slot.fail(commit_id, libc::EIO);
                }
            }
            None => {
                warn!("io_uring queue {qid}: a request whose sizes do not add up: EIO");
                slot.serving(commit_id, false);
                slot.fail(commit_id, libc::EIO);
            }
        }
        slot.wait_answered(commit_id);
        next = command(dev, CMD_COMMIT_AND_FETCH, qid, commit_id);
    }
}
