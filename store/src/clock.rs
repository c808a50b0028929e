//! Time as a seam. The store is the lowest crate that needs time, so the [`Clock`] lives here
//! and the crates above (the sync agent, the lease keeper) take it from the store's options.
//!
//! Two kinds of time, never mixed: a monotonic [`Clock::now`] for every decision that depends
//! on elapsed time (retry backoff, lease lapse), and a wall clock [`Clock::unix_ms`] for the
//! informational time stamps written into records. [`Clock::sleep`] is how code waits, so a
//! test with a [`ManualClock`] runs a backoff of seconds in no time and sees every wait.
//!
//! Direct calls of `SystemTime::now`, `Instant::now`, `std::thread::sleep` and
//! `rand::thread_rng` are refused by clippy in this crate (`store/clippy.toml`); this module
//! is the one place that reads the system's clocks.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

/// A source of time. Shared as `Arc<dyn Clock>`.
pub trait Clock: Send + Sync + Debug + 'static {
    /// Monotonic time: never goes backwards, unaffected by wall-clock changes.
    fn now(&self) -> Instant;

    /// Wall-clock milliseconds since the Unix epoch. Only for time stamps a person reads:
    /// never compared with another node's clock, never the basis of a decision.
    fn unix_ms(&self) -> u64;

    /// Waits `d` on the calling thread.
    fn sleep(&self, d: Duration);

    /// A channel that receives this clock's `now()` once, `d` from now: the deadline arm of
    /// a `select!` (background threads wait on messages, a deadline and a stop channel, so a
    /// test with a [`ManualClock`] drives them by advancing it).
    fn after(&self, d: Duration) -> Receiver<Instant>;

    /// A channel that receives this clock's `now()` once it has reached `deadline`. Prefer it
    /// to [`Clock::after`] for a deadline computed earlier: time that passes in between is
    /// not added to the wait.
    fn at(&self, deadline: Instant) -> Receiver<Instant> {
        self.after(deadline.saturating_duration_since(self.now()))
    }
}

/// The system's clocks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl SystemClock {
    /// The system clock, shared.
    pub fn shared() -> Arc<dyn Clock> {
        Arc::new(SystemClock)
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "the system clock is the one implementation that reads real time"
)]
impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }

    fn after(&self, d: Duration) -> Receiver<Instant> {
        crossbeam_channel::after(d)
    }
}

/// A clock for tests that moves only when told. `sleep` does not block: it advances the
/// clock by the duration at once and records it ([`ManualClock::sleeps`]), so code that backs
/// off or waits runs instantly and its waits can be checked. Both clocks move together on
/// [`ManualClock::advance`]; [`ManualClock::set_unix_ms`] jumps the wall clock alone (as an
/// NTP step would), leaving monotonic time where it is.
#[derive(Debug)]
pub struct ManualClock {
    origin: Instant,
    state: Mutex<ManualState>,
}

#[derive(Debug)]
struct ManualState {
    elapsed: Duration,
    unix_ms: u64,
    sleeps: Vec<Duration>,
    /// Channels of [`Clock::after`] not fired yet: when (elapsed), and where.
    timers: Vec<(Duration, Sender<Instant>)>,
}

impl ManualState {
    /// Moves time forward by `d` and fires the timers that are due.
    fn forward(&mut self, origin: Instant, d: Duration) {
        self.elapsed += d;
        self.unix_ms = self.unix_ms.saturating_add(d.as_millis() as u64);
        let now = self.elapsed;
        self.timers.retain(|(at, tx)| {
            if *at <= now {
                let _ = tx.send(origin + now);
                false
            } else {
                true
            }
        });
    }
}

/// The wall-clock time a [`ManualClock::new`] starts at: 2023-11-14T22:13:20Z.
pub const MANUAL_CLOCK_START_UNIX_MS: u64 = 1_700_000_000_000;

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A clock at [`MANUAL_CLOCK_START_UNIX_MS`].
    pub fn new() -> ManualClock {
        ManualClock::starting_at_unix_ms(MANUAL_CLOCK_START_UNIX_MS)
    }

    /// A clock whose wall time starts at `unix_ms`.
    pub fn starting_at_unix_ms(unix_ms: u64) -> ManualClock {
        #[expect(
            clippy::disallowed_methods,
            reason = "an Instant can only be made from the system's monotonic clock; only the origin is read"
        )]
        let origin = Instant::now();
        ManualClock {
            origin,
            state: Mutex::new(ManualState {
                elapsed: Duration::ZERO,
                unix_ms,
                sleeps: Vec::new(),
                timers: Vec::new(),
            }),
        }
    }

    /// Moves both clocks forward by `d`, firing the [`Clock::after`] channels that fall due.
    pub fn advance(&self, d: Duration) {
        self.state.lock().forward(self.origin, d);
    }

    /// [`Clock::after`] channels waiting to fire.
    pub fn pending_timers(&self) -> usize {
        self.state.lock().timers.len()
    }

    /// Sets the wall clock (forwards or backwards); monotonic time does not move.
    pub fn set_unix_ms(&self, unix_ms: u64) {
        self.state.lock().unix_ms = unix_ms;
    }

    /// Monotonic time since the clock was made.
    pub fn elapsed(&self) -> Duration {
        self.state.lock().elapsed
    }

    /// Every `sleep` so far, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.state.lock().sleeps.clone()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.origin + self.state.lock().elapsed
    }

    fn unix_ms(&self) -> u64 {
        self.state.lock().unix_ms
    }

    fn sleep(&self, d: Duration) {
        let mut s = self.state.lock();
        s.sleeps.push(d);
        s.forward(self.origin, d);
    }

    fn after(&self, d: Duration) -> Receiver<Instant> {
        let at = self.state.lock().elapsed + d;
        self.timer(at)
    }

    fn at(&self, deadline: Instant) -> Receiver<Instant> {
        self.timer(deadline.saturating_duration_since(self.origin))
    }
}

impl ManualClock {
    /// A timer that fires once the clock's elapsed time reaches `at`.
    fn timer(&self, at: Duration) -> Receiver<Instant> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let mut s = self.state.lock();
        if at <= s.elapsed {
            let _ = tx.send(self.origin + s.elapsed);
        } else {
            s.timers.push((at, tx));
        }
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = ManualClock::new();
        let t0 = c.now();
        assert_eq!(c.now(), t0);
        assert_eq!(c.unix_ms(), MANUAL_CLOCK_START_UNIX_MS);
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now() - t0, Duration::from_millis(1500));
        assert_eq!(c.unix_ms(), MANUAL_CLOCK_START_UNIX_MS + 1500);
        c.sleep(Duration::from_secs(3600));
        assert_eq!(c.now() - t0, Duration::from_millis(3_601_500));
        assert_eq!(c.sleeps(), vec![Duration::from_secs(3600)]);
        // A wall-clock step backwards leaves monotonic time alone.
        c.set_unix_ms(5);
        assert_eq!(c.unix_ms(), 5);
        assert_eq!(c.elapsed(), Duration::from_millis(3_601_500));
    }

    #[test]
    fn manual_timers_fire_when_the_clock_passes_them() {
        let c = ManualClock::new();
        let t0 = c.now();
        let soon = c.after(Duration::from_secs(1));
        let later = c.after(Duration::from_secs(10));
        assert!(
            c.after(Duration::ZERO).try_recv().is_ok(),
            "a zero wait fires at once"
        );
        assert!(soon.try_recv().is_err());
        c.advance(Duration::from_millis(999));
        assert!(soon.try_recv().is_err());
        c.advance(Duration::from_millis(1));
        assert_eq!(soon.try_recv(), Ok(t0 + Duration::from_secs(1)));
        assert!(later.try_recv().is_err());
        c.sleep(Duration::from_secs(20));
        assert_eq!(later.try_recv(), Ok(t0 + Duration::from_secs(21)));
        assert_eq!(c.pending_timers(), 0);
    }

    #[test]
    fn the_system_clock_is_monotonic_and_after_2020() {
        let c = SystemClock;
        let a = c.now();
        assert!(c.now() >= a);
        assert!(c.unix_ms() > 1_577_836_800_000);
    }
}
