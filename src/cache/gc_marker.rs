//! The marker a running `narflow gc` keeps in a cache (`narflow-gc`), and the writer's
//! reading of it: whether a publishing wave may go, must wait for a gc, or must first
//! check again what it relies on because a gc ran since the writer looked at the cache.
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

/// What a writer may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No gc ran since the writer looked at the cache: publish.
    Publish,
    /// A gc is running: read the marker again later (after about [`HEARTBEAT`]).
    Wait,
    /// A gc ran since the writer looked at the cache: check that every narinfo the wave
    /// refers to outside the run and every NAR it found instead of writing is still there,
    /// then call [`MarkerWatch::rechecked`] and publish what passed.
    Recheck,
}

/// Which marker a writer's view of the cache is known to postdate.
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

/// A writer's view of the marker: the gc its look at the cache postdates, and the
/// heartbeat it last saw change.
#[derive(Debug, Clone, Default)]
pub struct MarkerWatch {
    /// `None` until the writer first looks at the cache.
    looked_after: Option<Seen>,
    /// What a [`Verdict::Recheck`] moves `looked_after` to once the caller has checked.
    recheck_to: Option<Seen>,
    /// The running marker last read, and when it was first read like that.
    beat: Option<(Marker, Instant)>,
    /// When an unparsable marker was first read (in a row).
    unreadable_since: Option<Instant>,
}

impl MarkerWatch {
    /// The verdict before the writer looks at the cache (plans, reads a listing), from the
    /// marker read just before: [`Verdict::Wait`] while a gc runs, else
    /// [`Verdict::Publish`] (go and look).
    pub fn before_look(&mut self, reading: Reading, now: Instant) -> Verdict {
        match self.settled(reading, now) {
            None => Verdict::Wait,
            Some(seen) => {
                self.looked_after = Some(seen);
                self.recheck_to = None;
                Verdict::Publish
            }
        }
    }

    /// The verdict for a publishing wave, from the marker read just before it (its writes
    /// start within [`WAVE_FRESH`] of that reading).
    pub fn before_wave(&mut self, reading: Reading, now: Instant) -> Verdict {
        let Some(seen) = self.settled(reading, now) else {
            return Verdict::Wait;
        };
        if self.looked_after == Some(seen) {
            return Verdict::Publish;
        }
        self.recheck_to = Some(seen);
        Verdict::Recheck
    }

    /// The caller checked, after a [`Verdict::Recheck`], that what its waves rely on is
    /// still there: its view of the cache now postdates that gc.
    pub fn rechecked(&mut self) {
        if let Some(seen) = self.recheck_to.take() {
            self.looked_after = Some(seen);
        }
    }

    /// Which marker is settled (no gc running), or `None` while one runs.
    fn settled(&mut self, reading: Reading, now: Instant) -> Option<Seen> {
        let marker = match reading {
            None => {
                self.beat = None;
                self.unreadable_since = None;
                return Some(Seen::Nothing);
            }
            Some(None) => {
                self.beat = None;
                let since = *self.unreadable_since.get_or_insert(now);
                return (now.duration_since(since) >= STALE).then_some(Seen::Unreadable);
            }
            Some(Some(m)) => m,
        };
        self.unreadable_since = None;
        if !marker.running {
            self.beat = None;
            return Some(Seen::Generation(marker.generation));
        }
        let since = match self.beat {
            Some((last, since)) if last == marker => since,
            _ => {
                self.beat = Some((marker, now));
                now
            }
        };
        (now.duration_since(since) >= STALE).then_some(Seen::Generation(marker.generation))
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

    #[test]
    fn with_no_gc_ever_every_wave_publishes() {
        let t = Instant::now();
        let mut w = MarkerWatch::default();
        assert_eq!(w.before_look(None, t), Verdict::Publish);
        assert_eq!(w.before_wave(None, t), Verdict::Publish);
    }

    #[test]
    fn a_gc_that_ran_since_the_look_at_the_cache_makes_the_wave_recheck_once() {
        let t = Instant::now();
        let mut w = MarkerWatch::default();
        assert_eq!(w.before_look(done(1), t), Verdict::Publish);
        assert_eq!(w.before_wave(done(1), t), Verdict::Publish);
        // A gc started, beating: the wave waits.
        assert_eq!(w.before_wave(running(2, 0), t), Verdict::Wait);
        assert_eq!(w.before_wave(running(2, 1), t + HEARTBEAT), Verdict::Wait);
        // It is done: whatever the writer found in the cache may be gone.
        assert_eq!(w.before_wave(done(2), t + 2 * HEARTBEAT), Verdict::Recheck);
        assert_eq!(w.before_wave(done(2), t + 2 * HEARTBEAT), Verdict::Recheck);
        w.rechecked();
        assert_eq!(w.before_wave(done(2), t + 2 * HEARTBEAT), Verdict::Publish);
        // A gc that ran and finished between two waves is caught too.
        assert_eq!(w.before_wave(done(3), t + 3 * HEARTBEAT), Verdict::Recheck);
    }

    #[test]
    fn a_writer_looks_at_the_cache_only_after_a_running_gc() {
        let t = Instant::now();
        let mut w = MarkerWatch::default();
        assert_eq!(w.before_look(running(4, 0), t), Verdict::Wait);
        assert_eq!(w.before_look(done(4), t + HEARTBEAT), Verdict::Publish);
        assert_eq!(w.before_wave(done(4), t + HEARTBEAT), Verdict::Publish);
    }

    #[test]
    fn a_heartbeat_that_stops_is_a_dead_gc_after_stale_and_its_work_is_rechecked() {
        let t = Instant::now();
        let mut w = MarkerWatch::default();
        assert_eq!(w.before_look(None, t), Verdict::Publish);
        assert_eq!(w.before_wave(running(5, 3), t), Verdict::Wait);
        assert_eq!(
            w.before_wave(running(5, 3), t + STALE - Duration::from_secs(1)),
            Verdict::Wait
        );
        // Beating again restarts the count.
        assert_eq!(w.before_wave(running(5, 4), t + STALE), Verdict::Wait);
        assert_eq!(
            w.before_wave(running(5, 4), t + 2 * STALE - Duration::from_secs(1)),
            Verdict::Wait
        );
        assert_eq!(
            w.before_wave(running(5, 4), t + 2 * STALE),
            Verdict::Recheck
        );
        w.rechecked();
        assert_eq!(
            w.before_wave(running(5, 4), t + 2 * STALE),
            Verdict::Publish
        );
    }

    #[test]
    fn an_unreadable_marker_is_waited_on_then_rechecked() {
        let t = Instant::now();
        let mut w = MarkerWatch::default();
        assert_eq!(w.before_look(None, t), Verdict::Publish);
        assert_eq!(w.before_wave(Some(None), t), Verdict::Wait);
        assert_eq!(w.before_wave(Some(None), t + STALE), Verdict::Recheck);
        w.rechecked();
        assert_eq!(w.before_wave(Some(None), t + STALE), Verdict::Publish);
        // A marker that vanishes after one was seen: a gc may have run in between.
        assert_eq!(w.before_wave(None, t + STALE), Verdict::Recheck);
    }
}
