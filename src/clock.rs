//! The only reader of the wall clock. Tests inject a [`ManualClock`].

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Waker;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// A source of wall-clock time in milliseconds since the Unix epoch.
///
/// mqlite reads time only through this trait: message timestamps, retention by age, lease
/// expiry, delays and dedup expiry. The clock may jump backwards or forwards; mqlite never loses
/// a message because of it (at worst a lease expires early and the message is redelivered).
///
/// # Examples
///
/// ```
/// use mqlite::{Clock, SystemClock};
/// let now = SystemClock.now_ms();
/// assert!(now > 1_600_000_000_000);
/// ```
pub trait Clock: Send + Sync + Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// Registers a waker to call whenever the clock moves other than by real time passing,
    /// so that a consumer blocked until a delay or lease comes due looks again. The system
    /// clock ignores it; [`ManualClock`] wakes on every change.
    fn subscribe(&self, waker: Waker) {
        let _ = waker;
    }
}

/// The operating system's wall clock. The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        system_now_ms()
    }
}

pub(crate) fn system_now_ms() -> u64 {
    // A clock set before 1970 reads as 0 rather than failing.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A clock that moves only when told to; share it between the test and the database.
///
/// # Examples
///
/// ```
/// use mqlite::{Clock, ManualClock};
/// let clock = ManualClock::new(1_000);
/// clock.advance_ms(500);
/// assert_eq!(clock.now_ms(), 1_500);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now_ms: Arc<AtomicU64>,
    wakers: Arc<Mutex<Vec<Waker>>>,
}

impl ManualClock {
    /// A clock reading `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        ManualClock {
            now_ms: Arc::new(AtomicU64::new(now_ms)),
            wakers: Arc::default(),
        }
    }

    /// Moves the clock forward by `delta_ms`.
    pub fn advance_ms(&self, delta_ms: u64) {
        self.now_ms.fetch_add(delta_ms, Ordering::SeqCst);
        self.wake();
    }

    /// Sets the clock to `now_ms`, which may be in the past.
    pub fn set_ms(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        for waker in self.wakers.lock().iter() {
            waker.wake_by_ref();
        }
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }

    fn subscribe(&self, waker: Waker) {
        self.wakers.lock().push(waker);
    }
}
