//! Request counters. The counting hook sits directly above the backend service, below the
//! fault injector, the timeout layer and the store's retry loop, so it counts the requests
//! that really reach the backend (a benchmark counts requests per minute from it).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::hook::{Before, Hook, Req};

/// Live counters of one [`crate::Store`].
#[derive(Debug, Default)]
pub struct StoreStats {
    pub gets: AtomicU64,
    pub puts: AtomicU64,
    pub lists: AtomicU64,
    pub deletes: AtomicU64,
    pub heads: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Failed attempts seen by the store (including injected faults and timeouts).
    pub errors: AtomicU64,
    /// Attempts repeated after a temporary error.
    pub retries: AtomicU64,
}

/// A copy of the counters at one instant.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub gets: u64,
    pub puts: u64,
    pub lists: u64,
    pub deletes: u64,
    pub heads: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub errors: u64,
    pub retries: u64,
}

impl StatsSnapshot {
    /// All requests sent to the backend.
    pub fn requests(&self) -> u64 {
        self.gets + self.puts + self.lists + self.deletes + self.heads
    }
}

impl StoreStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            gets: self.gets.load(Relaxed),
            puts: self.puts.load(Relaxed),
            lists: self.lists.load(Relaxed),
            deletes: self.deletes.load(Relaxed),
            heads: self.heads.load(Relaxed),
            bytes_up: self.bytes_up.load(Relaxed),
            bytes_down: self.bytes_down.load(Relaxed),
            errors: self.errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
        }
    }

    pub(crate) fn count(&self, req: Req) {
        let c = match req {
            Req::Get => &self.gets,
            Req::Put => &self.puts,
            Req::List => &self.lists,
            Req::Delete => &self.deletes,
            Req::Head => &self.heads,
        };
        c.fetch_add(1, Relaxed);
    }

    pub(crate) fn bytes(&self, req: Req, n: u64) {
        match req {
            Req::Get => self.bytes_down.fetch_add(n, Relaxed),
            Req::Put => self.bytes_up.fetch_add(n, Relaxed),
            _ => 0,
        };
    }
}

/// The counting hook.
#[derive(Debug)]
pub(crate) struct StatsHook(pub std::sync::Arc<StoreStats>);

impl Hook for StatsHook {
    fn before(&self, req: Req, _path: &str) -> Before {
        self.0.count(req);
        Before::default()
    }

    fn after(&self, req: Req, _path: &str, bytes: u64, ok: bool) -> opendal::Result<()> {
        if ok {
            self.0.bytes(req, bytes);
        }
        Ok(())
    }
}
