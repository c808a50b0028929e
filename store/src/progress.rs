//! Progress of long work (a restore, a hydration, a GC), reported by the libraries and drawn by
//! the command line (`indicatif` there). Reports are totals so far, not increments, so a
//! reporter may skip some without drawing anything wrong.

/// Where long work stands.
pub trait Progress: Send + Sync {
    /// A phase begins: what it does, and its totals (0 when unknown).
    fn begin(&self, what: &str, total_bytes: u64, total_items: u64);
    /// Done so far in this phase.
    fn update(&self, bytes: u64, items: u64);
    /// The work is over (successful or not).
    fn finish(&self);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &str, _: u64, _: u64) {}
    fn update(&self, _: u64, _: u64) {}
    fn finish(&self) {}
}
