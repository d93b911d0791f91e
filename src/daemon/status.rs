//! The daemon's status: what `narflow status` shows. The queue's part is read from the
//! queue file (also when no daemon runs); the rest (the batch in flight, throughput, the
//! last batch) lives in the running daemon.
use super::Shared;
use super::queue::Queue;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

impl Shared {
    /// The status report: queue counts, the batch in flight, failures, throughput.
    pub(super) fn status(&self) -> serde_json::Value {
        let q = self.lock_queue();
        let mut v = status_from_queue(&q);
        drop(q);
        let (paths_per_s, bytes_per_s) = self.stats.recent(RECENT_WINDOW);
        let last = self
            .stats
            .last_batch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        v["daemon"] = serde_json::json!(true);
        v["in_flight"] = serde_json::json!(self.in_flight.load(Ordering::SeqCst));
        v["uptime_seconds"] = serde_json::json!(self.started.elapsed().as_secs());
        v["last_recorded_unix_ms"] =
            serde_json::json!(self.stats.last_recorded_ms.load(Ordering::SeqCst));
        v["since_start"] = serde_json::json!({
            "uploaded": self.stats.uploaded.load(Ordering::Relaxed),
            "nar_bytes": self.stats.nar_bytes.load(Ordering::Relaxed),
        });
        v["recent"] = serde_json::json!({
            "window_seconds": RECENT_WINDOW,
            "uploaded_per_second": paths_per_s,
            "nar_mb_per_second": bytes_per_s / 1e6,
        });
        v["last_batch"] = last.map_or(serde_json::Value::Null, |b| {
            serde_json::json!({
                "seconds_ago": b.at.elapsed().as_secs(),
                "paths": b.paths,
                "uploaded": b.uploaded,
                "already_present": b.present,
                "failed": b.failed,
                "dropped": b.dropped,
                "nar_bytes": b.nar_bytes,
                "seconds": b.seconds,
            })
        });
        v
    }
}

/// How many failing and dropped paths a status report lists (the counts are complete).
const STATUS_LIST: usize = 20;
/// The throughput window of `narflow status`, in seconds.
const RECENT_WINDOW: u64 = 60;

/// The part of the status that the queue alone knows; `narflow status` uses it directly
/// when no daemon is running.
pub fn status_from_queue(q: &Queue) -> serde_json::Value {
    let counts = q.counts();
    let failing = q.failing(STATUS_LIST);
    let dropped = q.dropped(STATUS_LIST);
    match (counts, failing, dropped) {
        (Ok(c), Ok(f), Ok(d)) => serde_json::json!({
            "pending": c.pending,
            "failing": c.failing,
            "needs_attention": c.needs_attention,
            "done": c.done,
            "dropped": c.dropped,
            "failures": f,
            "dropped_paths": d.into_iter().map(|(path, why)| serde_json::json!({"path": path, "why": why})).collect::<Vec<_>>(),
        }),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            serde_json::json!({ "error": e.to_string() })
        }
    }
}

/// A finished batch, for `narflow status`.
#[derive(Debug, Clone)]
pub(super) struct BatchSummary {
    pub(super) at: Instant,
    pub(super) paths: usize,
    pub(super) uploaded: usize,
    pub(super) present: usize,
    pub(super) failed: usize,
    pub(super) dropped: usize,
    pub(super) nar_bytes: u64,
    pub(super) seconds: f64,
}

/// Upload counters, and per-second buckets for recent throughput.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) uploaded: AtomicU64,
    pub(super) nar_bytes: AtomicU64,
    /// (second since start, paths, NAR bytes). Bounded: at most [`RECENT_WINDOW`] entries.
    pub(super) buckets: Mutex<VecDeque<(u64, u64, u64)>>,
    pub(super) last_batch: Mutex<Option<BatchSummary>>,
    /// When the worker last committed a batch's results to the queue (Unix ms; 0: never).
    pub(super) last_recorded_ms: std::sync::atomic::AtomicI64,
    pub(super) origin: std::sync::OnceLock<Instant>,
}

impl Stats {
    pub(super) fn add(&self, paths: u64, bytes: u64) {
        self.uploaded.fetch_add(paths, Ordering::Relaxed);
        self.nar_bytes.fetch_add(bytes, Ordering::Relaxed);
        let now = self.origin.get_or_init(Instant::now).elapsed().as_secs();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match b.back_mut() {
            Some(last) if last.0 == now => {
                last.1 += paths;
                last.2 += bytes;
            }
            _ => b.push_back((now, paths, bytes)),
        }
        while b.front().is_some_and(|f| f.0 + RECENT_WINDOW <= now) {
            b.pop_front();
        }
    }

    /// Paths and NAR bytes per second over the last `window` seconds.
    fn recent(&self, window: u64) -> (f64, f64) {
        let Some(origin) = self.origin.get() else {
            return (0.0, 0.0);
        };
        let now = origin.elapsed().as_secs();
        let b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (p, n) = b
            .iter()
            .filter(|x| x.0 + window > now)
            .fold((0, 0), |(p, n), x| (p + x.1, n + x.2));
        let span = (now + 1).min(window) as f64;
        (p as f64 / span, n as f64 / span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_throughput_counts_only_the_window() {
        let s = Stats::default();
        assert_eq!(s.recent(60), (0.0, 0.0));
        s.add(3, 3_000_000);
        s.add(1, 1_000_000);
        let (p, b) = s.recent(60);
        // Within the first second the span is one second.
        assert_eq!((p, b), (4.0, 4_000_000.0));
        assert_eq!(s.uploaded.load(Ordering::Relaxed), 4);
        assert_eq!(s.buckets.lock().unwrap().len(), 1);
    }
}
