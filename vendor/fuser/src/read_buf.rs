use std::mem::align_of;

use crate::ll::fuse_abi as abi;
use crate::session::MAX_WRITE_SIZE;

/// Size of the buffer for reading a request from the kernel. Since the kernel may send
/// up to `MAX_WRITE_SIZE` bytes in a write request, we use that value plus some extra space.
const BUFFER_SIZE: usize = MAX_WRITE_SIZE + 4096;

/// A buffer that provides an aligned sub-slice for FUSE operations.
///
/// This struct wraps a `Vec<u8>` and provides access to an aligned portion
/// of the buffer, ensuring proper alignment for `fuse_in_header`.
#[derive(Debug)]
pub(crate) struct FuseReadBuf {
    buffer: Vec<u8>,
}

impl FuseReadBuf {
    /// Creates a new `FuseReadBuf` with the default buffer size.
    ///
    /// The actual buffer may be slightly larger to accommodate alignment requirements.
    pub(crate) fn new() -> Self {
        Self {
            buffer: vec![0; BUFFER_SIZE],
        }
    }

    /// owsfs: a buffer of `size` bytes whose every page is in memory before the first read
    /// (written to, and locked where the process may lock memory). The kernel copies a
    /// request into the reader's buffer after taking it off the queue; a copy that faults
    /// while the process is being killed fails, and the kernel then ends that request with
    /// EIO instead of leaving it to be sent again to the next daemon
    /// (`fuse_dev_do_read`). A page already there is copied into without a fault, so a
    /// daemon that dies, or exits for a restart, mid-read loses no request.
    pub(crate) fn resident(size: usize) -> Self {
        let mut buffer = vec![0u8; size];
        let page = 4096;
        let mut at = 0;
        while at < buffer.len() {
            // SAFETY: `at` is within the buffer; a volatile write is not optimised away,
            // so the page is really written (a read would map the shared zero page).
            unsafe { std::ptr::write_volatile(buffer.as_mut_ptr().add(at), 0) };
            at += page;
        }
        // SAFETY: mlock(2) of memory this buffer owns; failing (RLIMIT_MEMLOCK) leaves it
        // merely written, which is enough unless memory runs short.
        unsafe { libc::mlock(buffer.as_ptr().cast(), buffer.len()) };
        Self { buffer }
    }

    /// Returns a mutable reference to the aligned portion of the buffer.
    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        let alignment = align_of::<abi::fuse_in_header>();
        let off = alignment - (self.buffer.as_ptr() as usize) % alignment;
        if off == alignment {
            &mut self.buffer
        } else {
            &mut self.buffer[off..]
        }
    }
}
