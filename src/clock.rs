//! Time as a parameter.
//!
//! Every scheduling decision (delays, backoff, lifetimes, the expired-id memory) reads a
//! [`Clock`], so tests drive the engine with a [`FakeClock`] they advance by hand instead of
//! sleeping. Advancing a fake clock also wakes the scheduler thread at once, so an engine driven
//! by a fake clock reacts to time without waiting for a real tick.
//!
//! Fetch deadlines are the one exception: they bound real network I/O inside libgit2 and are
//! measured on the real monotonic clock.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

/// A source of time for the engine.
///
/// `now` must never go backwards. `wall` is the calendar time, used only where time must be
/// compared across process restarts.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current monotonic instant.
    fn now(&self) -> Instant;

    /// The current wall-clock time.
    fn wall(&self) -> SystemTime;

    /// A channel that receives a message whenever this clock jumps forward by itself
    /// (a fake clock being advanced). Real clocks return `None`.
    fn subscribe(&self) -> Option<Receiver<()>> {
        None
    }
}

/// The real clock: [`Instant::now`] and [`SystemTime::now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// ```
/// use purgatory_sync::{Clock, FakeClock};
/// use std::time::Duration;
///
/// let clock = FakeClock::new();
/// let start = clock.now();
/// clock.advance(Duration::from_secs(20));
/// assert_eq!(clock.now() - start, Duration::from_secs(20));
/// ```
#[derive(Clone)]
pub struct FakeClock {
    inner: Arc<FakeInner>,
}

struct FakeInner {
    base: Instant,
    base_wall: SystemTime,
    offset_nanos: AtomicU64,
    wall_skew_nanos: Mutex<i128>,
    subscribers: Mutex<Vec<Sender<()>>>,
}

impl FakeClock {
    /// A fake clock starting at the real current instant and wall time.
    pub fn new() -> Self {
        Self::with_wall(SystemTime::now())
    }

    /// A fake clock whose wall time starts at `wall`.
    pub fn with_wall(wall: SystemTime) -> Self {
        FakeClock {
            inner: Arc::new(FakeInner {
                base: Instant::now(),
                base_wall: wall,
                offset_nanos: AtomicU64::new(0),
                wall_skew_nanos: Mutex::new(0),
                subscribers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Moves both the monotonic and the wall time forward by `by`, and wakes subscribers.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.inner.offset_nanos.fetch_add(nanos, Ordering::SeqCst);
        self.notify();
    }

    /// Moves only the wall time, forwards or backwards (an NTP correction), by `nanos`.
    pub fn skew_wall(&self, nanos: i128) {
        *self.inner.wall_skew_nanos.lock() += nanos;
    }

    /// How far this clock has been advanced since it was made.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.inner.offset_nanos.load(Ordering::SeqCst))
    }

    fn notify(&self) {
        // Drop subscribers whose receiver is gone (an engine that shut down).
        self.inner.subscribers.lock().retain(|tx| {
            !matches!(
                tx.try_send(()),
                Err(crossbeam_channel::TrySendError::Disconnected(_))
            )
        });
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for FakeClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeClock")
            .field("elapsed", &self.elapsed())
            .finish()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.inner.base + self.elapsed()
    }

    fn wall(&self) -> SystemTime {
        let skew = *self.inner.wall_skew_nanos.lock();
        let advanced = self.inner.base_wall + self.elapsed();
        if skew >= 0 {
            advanced + Duration::from_nanos(u64::try_from(skew).unwrap_or(u64::MAX))
        } else {
            let back = Duration::from_nanos(u64::try_from(-skew).unwrap_or(u64::MAX));
            advanced.checked_sub(back).unwrap_or(SystemTime::UNIX_EPOCH)
        }
    }

    fn subscribe(&self) -> Option<Receiver<()>> {
        // Capacity 1: a wake that is already pending covers any number of advances.
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.inner.subscribers.lock().push(tx);
        Some(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_time_and_wall_moves_with_it() {
        let a = FakeClock::with_wall(SystemTime::UNIX_EPOCH + Duration::from_secs(1000));
        let b = a.clone();
        let t0 = b.now();
        a.advance(Duration::from_millis(1500));
        assert_eq!(b.now() - t0, Duration::from_millis(1500));
        assert_eq!(
            b.wall(),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_001_500)
        );
    }

    #[test]
    fn wall_can_jump_backwards_without_moving_monotonic_time() {
        let c = FakeClock::with_wall(SystemTime::UNIX_EPOCH + Duration::from_secs(100));
        let t0 = c.now();
        c.skew_wall(-50_000_000_000);
        assert_eq!(c.now(), t0);
        assert_eq!(c.wall(), SystemTime::UNIX_EPOCH + Duration::from_secs(50));
    }

    #[test]
    fn advancing_wakes_subscribers_and_coalesces() {
        let c = FakeClock::new();
        let rx = c.subscribe().expect("fake clocks wake");
        assert!(rx.try_recv().is_err());
        c.advance(Duration::from_secs(1));
        c.advance(Duration::from_secs(1));
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "pending wakes coalesce into one");
        drop(rx);
        c.advance(Duration::from_secs(1));
        assert!(
            c.inner.subscribers.lock().is_empty(),
            "gone subscribers are dropped"
        );
    }

    #[test]
    fn system_clock_does_not_subscribe() {
        assert!(SystemClock.subscribe().is_none());
    }
}
