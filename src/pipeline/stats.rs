//! Per-stage statistics: how long each stage worked (not waited) and how many bytes went
//! through it. `narflow bench` derives per-stage throughput and the bottleneck from these.
use std::time::{Duration, Instant};

/// Statistics of one stage, summed over its threads.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StageStats {
    pub name: &'static str,
    pub threads: usize,
    /// Time spent working, summed over threads.
    pub busy: Duration,
    /// Bytes in (NAR bytes for every stage but the sink's compressed input).
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl StageStats {
    /// Fraction of the run's wall time this stage's threads were busy (1.0 = saturated).
    pub fn utilisation(&self, wall: Duration) -> f64 {
        if self.threads == 0 || wall.is_zero() {
            return 0.0;
        }
        self.busy.as_secs_f64() / (wall.as_secs_f64() * self.threads as f64)
    }
    /// Adds one thread's clock.
    pub fn absorb(&mut self, clock: &StageClock) {
        self.threads += 1;
        self.busy += clock.busy();
        self.bytes_in += clock.bytes_in;
        self.bytes_out += clock.bytes_out;
    }
}

/// One thread's clock: total time minus time spent waiting on channels and the budget.
/// [`StageClock::stop`] freezes it when the thread's work ends, so a thread joined late is
/// not counted busy while it waited to be joined.
#[derive(Debug)]
pub struct StageClock {
    started: Instant,
    stopped: Option<Instant>,
    waited: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl StageClock {
    pub fn start() -> Self {
        StageClock {
            started: Instant::now(),
            stopped: None,
            waited: Duration::ZERO,
            bytes_in: 0,
            bytes_out: 0,
        }
    }
    /// Runs `f` (a blocking receive, send or acquire) and counts its time as waiting.
    pub fn wait<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.waited += t.elapsed();
        r
    }
    pub fn add_bytes(&mut self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in += bytes_in;
        self.bytes_out += bytes_out;
    }
    /// Ends the measurement (idempotent: the first stop counts).
    #[must_use]
    pub fn stop(mut self) -> Self {
        self.stopped.get_or_insert_with(Instant::now);
        self
    }
    /// This thread's share of its stage's statistics (stopping the clock).
    pub fn into_stats(self, name: &'static str) -> StageStats {
        let c = self.stop();
        StageStats {
            name,
            threads: 1,
            busy: c.busy(),
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
        }
    }
    pub fn busy(&self) -> Duration {
        let end = self.stopped.unwrap_or_else(Instant::now);
        end.saturating_duration_since(self.started)
            .saturating_sub(self.waited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_clock_stops_counting() {
        let mut c = StageClock::start();
        c.wait(|| std::thread::sleep(Duration::from_millis(30)));
        let c = c.stop();
        let busy = c.busy();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.busy(), busy, "no time passes for a stopped clock");
        assert!(
            busy < Duration::from_millis(25),
            "waiting is not busy: {busy:?}"
        );
    }
}
