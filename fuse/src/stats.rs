//! Operation counters, shown by `owsfs status`, and latency histograms per kind of request,
//! exported as Prometheus metrics (`owsfs mount --metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Counters of filesystem operations since the mount.
        #[derive(Debug, Default)]
        pub struct Stats {
            $(pub $name: AtomicU64,)*
            /// How long requests took to serve, by [`OpKind`].
            pub latency: [Histogram; OpKind::ALL.len()],
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

/// The kinds of kernel request, as the latency histograms tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Lookup,
    Getattr,
    Setattr,
    Readlink,
    /// mknod, mkdir, symlink, create, tmpfile.
    Create,
    /// unlink, rmdir.
    Remove,
    Rename,
    Link,
    /// open, opendir.
    Open,
    Read,
    Write,
    Flush,
    /// release, releasedir.
    Release,
    /// fsync, fsyncdir.
    Fsync,
    /// readdir, readdirplus.
    Readdir,
    Statfs,
    /// setxattr, getxattr, listxattr, removexattr.
    Xattr,
    Access,
    Fallocate,
    Lseek,
    Ioctl,
    CopyFileRange,
}

impl OpKind {
    pub const ALL: [OpKind; 22] = [
        OpKind::Lookup,
        OpKind::Getattr,
        OpKind::Setattr,
        OpKind::Readlink,
        OpKind::Create,
        OpKind::Remove,
        OpKind::Rename,
        OpKind::Link,
        OpKind::Open,
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Release,
        OpKind::Fsync,
        OpKind::Readdir,
        OpKind::Statfs,
        OpKind::Xattr,
        OpKind::Access,
        OpKind::Fallocate,
        OpKind::Lseek,
        OpKind::Ioctl,
        OpKind::CopyFileRange,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Lookup => "lookup",
            OpKind::Getattr => "getattr",
            OpKind::Setattr => "setattr",
            OpKind::Readlink => "readlink",
            OpKind::Create => "create",
            OpKind::Remove => "remove",
            OpKind::Rename => "rename",
            OpKind::Link => "link",
            OpKind::Open => "open",
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Release => "release",
            OpKind::Fsync => "fsync",
            OpKind::Readdir => "readdir",
            OpKind::Statfs => "statfs",
            OpKind::Xattr => "xattr",
            OpKind::Access => "access",
            OpKind::Fallocate => "fallocate",
            OpKind::Lseek => "lseek",
            OpKind::Ioctl => "ioctl",
            OpKind::CopyFileRange => "copy_file_range",
        }
    }
}

/// Upper bounds of the latency buckets, in seconds (10 µs to 10 s).
pub const BUCKETS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram of atomic counters: recording takes two relaxed additions and no lock,
/// so every FUSE thread records into it at once. Aligned to cache lines, so that requests of
/// different kinds do not contend on one.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is above every bound.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// A histogram read at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub count: u64,
    pub sum_secs: f64,
    /// (upper bound, observations in this bucket alone); the last bound is +∞.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// Records `d`, and returns it.
    #[inline]
    pub fn observe(&self, d: Duration) -> Duration {
        let secs = d.as_secs_f64();
        let i = BUCKETS.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        d
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            sum_secs: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10)); // on a bound: that bucket
        h.observe(Duration::from_micros(11));
        h.observe(Duration::from_secs(60)); // above every bound
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.000_01, 1));
        assert_eq!(s.buckets[1], (0.000_025, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((s.sum_secs - 60.000_021).abs() < 1e-9);
        assert_eq!(
            OpKind::ALL.len(),
            OpKind::ALL
                .iter()
                .map(|k| k.name())
                .collect::<std::collections::HashSet<_>>()
                .len()
        );
    }
}
