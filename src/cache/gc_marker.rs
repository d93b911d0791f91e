//! The marker a running `narflow gc` keeps in a cache (`narflow-gc`), and a writer's
//! reading of it: whether a gc is running (wait), or which gc the cache is past (the
//! epoch a job is planned in; a later one before its narinfo is written means a check
//! again of what the job relies on).
//! This file owns the marker's text and the timing rules; it never reads or writes a
//! cache itself (callers hand it what they read, and the time on their monotonic clock).

use std::time::{Duration, Instant};

/// The marker's key, at the cache's root (Nix ignores it).
pub const MARKER_KEY: &str = "narflow-gc";

/// How often a running gc rewrites its marker.
pub const HEARTBEAT: Duration = Duration::from_secs(20);

/// A gc deletes a batch only this soon after its last heartbeat was written, so it stops
/// before any writer can take it for dead.
pub const DELETE_DEADLINE: Duration = Duration::from_secs(40);

/// A writer takes a running marker whose heartbeat has not changed for this long (on
/// the writer's own clock) for a gc that died.
pub const STALE: Duration = Duration::from_secs(60);

/// A writer's narinfo writes start within this long of its last reading of the marker;
/// later ones read it again.
pub const WAVE_FRESH: Duration = Duration::from_secs(10);

/// How often a writer waiting for a running gc reads the marker again.
pub const WAIT_POLL: Duration = Duration::from_secs(5);

/// How long a gc waits after announcing itself before it lists the cache: a wave that read
/// the marker before it appeared has finished its writes by then ([`WAVE_FRESH`] to start
/// them, each attempt within the request timeouts: 5 s to connect, 30 s to read), with
/// room for a listing that lags.
pub const SETTLE: Duration = Duration::from_secs(120);

// A gc beats before its delete deadline, and stops deleting before a writer can take it
// for dead.
const _: () = assert!(HEARTBEAT.as_secs() < DELETE_DEADLINE.as_secs());
const _: () = assert!(DELETE_DEADLINE.as_secs() < STALE.as_secs());
// A wave that read the marker before it appeared is done by the time gc lists: WAVE_FRESH
// to start its writes, 5 s to connect and 30 s to read per attempt.
const _: () = assert!(WAVE_FRESH.as_secs() + 35 < SETTLE.as_secs());

/// What the marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// Chosen at random by each gc run.
    pub generation: u64,
    /// Whether that gc is still running (or died while running).
    pub running: bool,
    /// Counts the heartbeats of a running gc.
    pub beat: u64,
}

impl Marker {
    /// The marker's text.
    #[must_use]
    pub fn render(&self) -> String {
        let state = if self.running { "running" } else { "done" };
        format!(
            "generation {:016x}\nstate {state}\nbeat {}\n",
            self.generation, self.beat
        )
    }

    /// Parses a marker's text; `None` when it is not one this version wrote. A writer takes
    /// an unreadable marker for a running gc (see [`MarkerWatch`]).
    #[must_use]
    pub fn parse(text: &str) -> Option<Marker> {
        let mut generation = None;
        let mut running = None;
        let mut beat = None;
        for line in text.lines() {
            let (k, v) = line.split_once(' ')?;
            match k {
                "generation" => generation = Some(u64::from_str_radix(v, 16).ok()?),
                "state" => {
                    running = Some(match v {
                        "running" => true,
                        "done" => false,
                        _ => return None,
                    });
                }
                "beat" => beat = Some(v.parse().ok()?),
                _ => return None,
            }
        }
        Some(Marker {
            generation: generation?,
            running: running?,
            beat: beat?,
        })
    }
}

/// The gc a writer's look at the cache postdates. Every job planned from that look
/// carries it; a job whose epoch differs from the one read before its publishing wave
/// saw the cache before a gc that has run since: what it relies on (the narinfos it
/// refers to that it found in the cache, the NAR it found instead of writing) is checked
/// again before its narinfo is written, and what vanished is uploaded again or fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(Seen);

impl Default for Epoch {
    /// The epoch of a cache that has never had a gc marker.
    fn default() -> Self {
        Epoch(Seen::Nothing)
    }
}

/// Which marker an epoch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// There was no marker.
    Nothing,
    /// The marker of this gc generation, done (or running and dead).
    Generation(u64),
    /// A marker that does not parse, unchanged for [`STALE`].
    Unreadable,
}

/// A reading of the marker: `None` when there is none, `Some(None)` when it does not parse.
pub type Reading = Option<Option<Marker>>;

/// A writer's reading of the marker over time: tells a running gc from a dead one by
/// whether its heartbeat changes.
#[derive(Debug, Clone)]
pub struct MarkerWatch {
    /// The running marker last read, and when it was first read like that.
    beat: Option<(Marker, Instant)>,
    /// When an unparsable marker was first read (in a row).
    unreadable_since: Option<Instant>,
    /// How long an unchanged running (or unreadable) marker is waited for: [`STALE`].
    stale: Duration,
}

impl Default for MarkerWatch {
    fn default() -> Self {
        MarkerWatch::with_stale(STALE)
    }
}

impl MarkerWatch {
    /// A watch that takes a marker unchanged for `stale` for a dead gc ([`STALE`]
    /// everywhere but in tests, which cannot wait a minute).
    pub fn with_stale(stale: Duration) -> Self {
        MarkerWatch {
            beat: None,
            unreadable_since: None,
            stale,
        }
    }

    /// The epoch, from the marker read just now, or `None` while a gc runs: the writer
    /// reads the marker again after [`WAIT_POLL`], and neither looks at the cache
    /// nor writes a narinfo meanwhile.
    pub fn settled(&mut self, reading: Reading, now: Instant) -> Option<Epoch> {
        let marker = match reading {
            None => {
                self.beat = None;
                self.unreadable_since = None;
                return Some(Epoch(Seen::Nothing));
            }
            Some(None) => {
                self.beat = None;
                let since = *self.unreadable_since.get_or_insert(now);
                return (now.duration_since(since) >= self.stale)
                    .then_some(Epoch(Seen::Unreadable));
            }
            Some(Some(m)) => m,
        };
        self.unreadable_since = None;
        let settled = Some(Epoch(Seen::Generation(marker.generation)));
        if !marker.running {
            self.beat = None;
            return settled;
        }
        let since = match self.beat {
            Some((last, since)) if last == marker => since,
            _ => {
                self.beat = Some((marker, now));
                now
            }
        };
        if now.duration_since(since) >= self.stale {
            settled
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(generation: u64, beat: u64) -> Reading {
        Some(Some(Marker {
            generation,
            running: true,
            beat,
        }))
    }

    fn done(generation: u64) -> Reading {
        Some(Some(Marker {
            generation,
            running: false,
            beat: 9,
        }))
    }

    #[test]
    fn the_marker_text_round_trips_and_anything_else_is_unreadable() {
        for m in [
            Marker {
                generation: 0xfeed_0000_0000_0001,
                running: true,
                beat: 0,
            },
            Marker {
                generation: 7,
                running: false,
                beat: 123,
            },
        ] {
            assert_eq!(Marker::parse(&m.render()), Some(m));
        }
        for bad in [
            "",
            "generation 1\nstate maybe\nbeat 0\n",
            "generation 1\nbeat 0\n",
            "x",
        ] {
            assert_eq!(Marker::parse(bad), None, "{bad:?}");
        }
    }

    fn epoch(reading: Reading) -> Epoch {
        MarkerWatch::default()
            .settled(reading, Instant::now())
            .expect("settled")
    }

    #[test]
    fn with_no_gc_ever_the_epoch_never_changes() {
        let t = Instant::now();
        let mut w = MarkerWatch::default();
        assert_eq!(w.settled(None, t), Some(epoch(None)));
        assert_eq!(w.settled(None, t + STALE), Some(epoch(None)));
    }

    #[test]
    fn a_running_gc_is_waited_for_and_a_gc_that_ran_is_a_new_epoch() {
        let t = Instant::now();
        let mut w = MarkerWatch::default();
        let planned = w.settled(done(1), t).unwrap();
        assert_eq!(w.settled(done(1), t), Some(planned));
        // A gc started, beating: nothing settles.
        assert_eq!(w.settled(running(2, 0), t), None);
        assert_eq!(w.settled(running(2, 1), t + HEARTBEAT), None);
        assert_eq!(w.settled(running(2, 2), t + 2 * HEARTBEAT), None);
        // Done: a new epoch, so what was planned before it is checked again.
        let after = w.settled(done(2), t + 3 * HEARTBEAT).unwrap();
        assert_ne!(after, planned);
        // A gc that ran and finished between two readings is a new epoch too.
        assert_ne!(w.settled(done(3), t + 4 * HEARTBEAT).unwrap(), after);
        // And one that removed the marker.
        assert_ne!(w.settled(None, t + 4 * HEARTBEAT).unwrap(), after);
    }

    #[test]
    fn a_heartbeat_that_stops_is_a_dead_gc_after_stale() {
        let t = Instant::now();
        let mut w = MarkerWatch::default();
        let s = Duration::from_secs(1);
        assert_eq!(w.settled(running(5, 3), t), None);
        assert_eq!(w.settled(running(5, 3), t + STALE - s), None);
        // Beating again restarts the count.
        assert_eq!(w.settled(running(5, 4), t + STALE), None);
        assert_eq!(w.settled(running(5, 4), t + 2 * STALE - s), None);
        let dead = w.settled(running(5, 4), t + 2 * STALE).unwrap();
        // The dead gc's epoch is the one it leaves when it is done.
        assert_eq!(dead, epoch(done(5)));
    }

    #[test]
    fn an_unreadable_marker_is_waited_on_then_is_an_epoch_of_its_own() {
        let t = Instant::now();
        let mut w = MarkerWatch::default();
        assert_eq!(w.settled(Some(None), t), None);
        assert_eq!(
            w.settled(Some(None), t + STALE - Duration::from_secs(1)),
            None
        );
        let e = w.settled(Some(None), t + STALE).unwrap();
        assert_ne!(e, epoch(None));
        assert_ne!(e, epoch(done(0)));
    }
}
