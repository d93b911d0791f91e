//! A writer's side of gc's protocol (README, "What may run beside gc"): the marker is
//! read before a look at the cache and before each publishing wave; while a live gc runs
//! the writer waits; the reading that lets it go on gives the epoch of what it plans or
//! publishes.
//!
//! Owns the waiting and its bound (a gc whose heartbeat stops is dead after
//! [`GcWait::stale`]). It never decides what is checked again after a gc (the publisher
//! does) and never writes the marker.
use super::outcome::Progress;
use crate::cache::gc_marker::{self, Epoch, MarkerWatch};
use crate::cache::{BinaryCache, CacheError};
use std::time::{Duration, Instant};

/// How a writer waits for a running gc: the protocol's timing, which real runs never
/// change ([`GcWait::default`]); tests shorten it, since they cannot wait a minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcWait {
    /// A running marker whose heartbeat has not changed for this long is a gc that died
    /// ([`gc_marker::STALE`]).
    pub stale: Duration,
    /// How often the marker is read while waiting ([`gc_marker::WAIT_POLL`]).
    pub poll: Duration,
    /// How long a reading that found no gc running serves the publisher's waves before
    /// it reads the marker again: half of [`gc_marker::WAVE_FRESH`], so a wave's writes
    /// start well within it. A gc lists the cache only [`gc_marker::SETTLE`] after it
    /// announced itself, so a reading this young (the publisher's own, or the one the
    /// jobs were planned from) tells every wave it serves which gc the cache is past.
    /// Tests of a gc that runs whole between a look and a wave (faster than the protocol
    /// lets it) set 0: every wave reads the marker.
    pub fresh: Duration,
}

impl Default for GcWait {
    fn default() -> Self {
        GcWait {
            stale: gc_marker::STALE,
            poll: gc_marker::WAIT_POLL,
            fresh: gc_marker::WAVE_FRESH.checked_div(2).expect("2 is not 0"),
        }
    }
}

/// A reading of the marker that lets the writer go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub epoch: Epoch,
    /// When the reading's request was sent: writes that rely on it start within
    /// [`gc_marker::WAVE_FRESH`] of this.
    pub at: Instant,
}

/// One writer's reading of the marker over time (a plan's, a publisher's).
#[derive(Debug, Clone)]
pub struct Gate {
    wait: GcWait,
    watch: MarkerWatch,
}

/// Slices of the wait between two readings, so a stop is noticed soon.
const STOP_CHECK: Duration = Duration::from_millis(50);

impl Gate {
    pub fn new(wait: GcWait) -> Self {
        Gate {
            wait,
            watch: MarkerWatch::with_stale(wait.stale),
        }
    }

    /// Reads `cache`'s marker until no live gc runs: at once when there is none or its gc
    /// is done, else again every [`GcWait::poll`] until it is done or its heartbeat has
    /// stopped for [`GcWait::stale`]. A wait is logged and reported to `progress` once.
    /// `None` when `stopped` turned true while waiting.
    ///
    /// # Errors
    /// The [`CacheError`] of a reading that failed.
    pub fn settle(
        &mut self,
        cache: &dyn BinaryCache,
        stopped: &dyn Fn() -> bool,
        progress: &dyn Progress,
    ) -> Result<Option<Reading>, CacheError> {
        let mut waited = false;
        loop {
            let at = Instant::now();
            let read = crate::cache::read_gc_marker(cache)?;
            if let Some(epoch) = self.watch.settled(read, at) {
                if let Some(running) = read.map(|m| m.is_none_or(|m| m.running))
                    && running
                {
                    tracing::warn!(
                        "{}: the gc marker {} has not changed for {:?}: taking its gc for dead and going on",
                        cache.url(),
                        gc_marker::MARKER_KEY,
                        self.wait.stale
                    );
                } else if waited {
                    tracing::info!("{}: the gc is done; going on", cache.url());
                }
                return Ok(Some(Reading { epoch, at }));
            }
            if !waited {
                waited = true;
                let what = match read {
                    Some(Some(m)) => format!("a gc (generation {:016x}) is running", m.generation),
                    _ => format!("its gc marker {} does not parse", gc_marker::MARKER_KEY),
                };
                tracing::warn!(
                    "{}: {what}: waiting until it is done (or its marker stays unchanged for {:?})",
                    cache.url(),
                    self.wait.stale
                );
                progress.waiting_for_gc();
            }
            let until = Instant::now() + self.wait.poll;
            loop {
                if stopped() {
                    return Ok(None);
                }
                let now = Instant::now();
                if now >= until {
                    break;
                }
                std::thread::sleep((until - now).min(STOP_CHECK));
            }
        }
    }
}
