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
#[derive(Debug)]
pub struct StageClock {
    started: Instant,
    waited: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl StageClock {
    pub fn start() -> Self {
        StageClock {
            started: Instant::now(),
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
    pub fn busy(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.waited)
    }
}
