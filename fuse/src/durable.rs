//! Waiting for the store: the replies that must not go before everything written so far is
//! durable in the store (an fsync under `-o durability=strict`, the `OWSFS_IOC_SYNC` ioctl)
//! are handed to one thread, which waits for the store once for every reply queued meanwhile
//! (group commit): a commit-heavy program pays one store round trip per group of fsyncs, not
//! one per fsync, and no FUSE thread waits (a cut may need them to serve the kernel's
//! writeback of dirty pages).

use std::sync::Arc;

/// `_IOR('o', 1, u64)`: an ioctl on any file or directory of the mount that returns once
/// everything written before it is durable in the store, with the generation that holds it
/// (8 bytes, native endian). From Python: `fcntl.ioctl(fd, 0x80086F01, bytearray(8), True)`.
pub const OWSFS_IOC_SYNC: u32 = (2 << 30) | (8 << 16) | ((b'o' as u32) << 8) | 1;

/// What a strict reply waits for: the store holding everything the journal recorded before
/// the call; with `push_pages`, after the kernel's dirty pages of every file (the writeback
/// cache, shared mmaps) reached the daemon. Returns the generation that holds it, or why it
/// could not (the errno to answer).
pub trait Durable: Send + Sync {
    fn wait(&self, push_pages: bool) -> Result<u64, (i32, String)>;
}

type Waiting = (bool, Box<dyn FnOnce(Result<u64, i32>) + Send>);

/// The thread that answers replies once the store holds what came before them.
pub struct Waiter {
    tx: crossbeam_channel::Sender<Waiting>,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiter")
    }
}

impl Waiter {
    /// Starts the thread; it ends when the waiter is dropped and every queued reply answered.
    pub fn start(durable: Arc<dyn Durable>) -> std::io::Result<Waiter> {
        let (tx, rx) = crossbeam_channel::unbounded::<Waiting>();
        std::thread::Builder::new()
            .name("owsfs-durable".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Everything queued by now was written before this wait starts, so one
                    // commit covers the whole group.
                    let mut group = vec![first];
                    group.extend(rx.try_iter());
                    let push = group.iter().any(|(push, _)| *push);
                    let r = durable.wait(push).map_err(|(errno, why)| {
                        tracing::warn!(
                            "{} call(s) waiting for the store get errno {errno}: {why}",
                            group.len()
                        );
                        errno
                    });
                    for (_, reply) in group {
                        reply(r);
                    }
                }
            })?;
        Ok(Waiter { tx })
    }

    /// Calls `reply` once everything written so far is durable in the store (with the
    /// generation), or with the errno that says it is not. `push_pages`: written so far
    /// includes what the kernel still holds in dirty pages of any file (an fsync has had the
    /// kernel write its own file's pages already).
    pub fn after_durable(
        &self,
        push_pages: bool,
        reply: impl FnOnce(Result<u64, i32>) + Send + 'static,
    ) {
        if let Err(e) = self.tx.send((push_pages, Box::new(reply))) {
            (e.into_inner().1)(Err(libc::EIO));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    struct Slow(AtomicUsize);

    impl Durable for Slow {
        fn wait(&self, _push_pages: bool) -> Result<u64, (i32, String)> {
            std::thread::sleep(Duration::from_millis(100));
            Ok(self.0.fetch_add(1, Ordering::SeqCst) as u64 + 1)
        }
    }

    #[test]
    fn replies_queued_during_a_wait_share_the_next_one() {
        let durable = Arc::new(Slow(AtomicUsize::new(0)));
        let waiter = Waiter::start(durable.clone()).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        for i in 0..20 {
            let got = Arc::clone(&got);
            waiter.after_durable(false, move |r| got.lock().unwrap().push((i, r)));
            if i == 0 {
                // The first wait starts alone; the 19 others queue behind it.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        drop(waiter);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.lock().unwrap().len() < 20 {
            assert!(std::time::Instant::now() < deadline, "replies missing");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            durable.0.load(Ordering::SeqCst),
            2,
            "two store round trips for 20"
        );
        let got = got.lock().unwrap();
        assert!(
            got.iter()
                .all(|(i, r)| *r == Ok(if *i == 0 { 1 } else { 2 }))
        );
        assert_eq!(OWSFS_IOC_SYNC, 0x8008_6F01);
    }
}
