//! Operation counters, shown by `owsfs status`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Counters of filesystem operations since the mount.
        #[derive(Debug, Default)]
        pub struct Stats {
            $(pub $name: AtomicU64,)*
        }

        /// A copy of the counters at one instant.
        #[derive(Clone, Debug, Default, Serialize, Deserialize)]
        pub struct StatsSnapshot {
            $(pub $name: u64,)*
        }

        impl Stats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters!(
    lookups,
    getattrs,
    setattrs,
    creates,
    removes,
    renames,
    opens,
    opens_passthrough,
    opens_cached,
    reads,
    read_bytes,
    writes,
    write_bytes,
    fsyncs,
    // Errors other than the ordinary answers (ENOENT, ENODATA, EEXIST, EACCES...).
    errors,
);

impl Stats {
    #[inline]
    pub fn count(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}
