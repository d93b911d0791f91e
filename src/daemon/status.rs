//! The daemon's status: what `narflow status` shows. The queue's part (the watcher's
//! cursor included) is read from the queue file (also when no daemon runs); the rest (the
//! batch in flight, throughput, the last batch, the watcher's mode) lives in the running
//! daemon.
use super::Shared;
use super::queue::{Failing, Queue, QueueError};
use crate::settings::WatchStore;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The daemon's status, as the daemon sends it and `narflow status` reads and prints it
/// (`--json` prints it as it is). Every field is always there, `null` where it does not
/// apply (the running daemon's parts when only the queue file was read), so a reader
/// tells a missing field (another version of narflow) from a zero: reading one that is
/// missing, unknown or of the wrong type fails, naming the field.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// A daemon answered (false: this was read from its queue file).
    pub daemon: bool,
    /// Why no daemon answered.
    #[serde(deserialize_with = "required")]
    pub daemon_error: Option<String>,
    /// Pending, whether due now or waiting for a retry.
    pub pending: u64,
    /// Pending and failed at least once.
    pub failing: u64,
    /// Failing, and the last failure needs someone to act.
    pub needs_attention: u64,
    /// Uploaded (or found in the cache) within the queue's keeping time.
    pub done: u64,
    /// Gone from the store before they could be uploaded.
    pub dropped: u64,
    /// Up to `STATUS_LIST` failing paths, those that need attention first.
    pub failures: Vec<Failing>,
    /// Up to `STATUS_LIST` dropped paths, most recent first.
    pub dropped_paths: Vec<DroppedPath>,
    /// Queued paths being planned or uploaded (the paths asked for, not their closures).
    #[serde(deserialize_with = "required")]
    pub in_flight: Option<u64>,
    #[serde(deserialize_with = "required")]
    pub uptime_seconds: Option<u64>,
    /// When the worker last committed a batch's results to the queue (Unix ms; 0: never).
    #[serde(deserialize_with = "required")]
    pub last_recorded_unix_ms: Option<i64>,
    #[serde(deserialize_with = "required")]
    pub since_start: Option<SinceStart>,
    #[serde(deserialize_with = "required")]
    pub recent: Option<Recent>,
    /// `null` also while the daemon has finished no batch yet.
    #[serde(deserialize_with = "required")]
    pub last_batch: Option<LastBatch>,
    /// The store watcher (`--watch-store`); `null` when it is off (without a daemon: when
    /// none ever ran on this queue).
    #[serde(deserialize_with = "required")]
    pub watch: Option<WatchStatus>,
    /// The large (multipart) NARs uploading now; `null` when no daemon answered.
    #[serde(deserialize_with = "required")]
    pub large_uploads: Option<Vec<LargeUpload>>,
}

/// A large NAR uploading in parts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LargeUpload {
    /// Its store path; `null` for an upload not of a NAR (a build log).
    #[serde(deserialize_with = "required")]
    pub store_path: Option<String>,
    pub parts_done: u64,
    pub parts_total: u64,
    /// Compressed bytes the server has acknowledged (sent or resumed), and expected in all
    /// (at most: the compressed size is known only at the end).
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Of `bytes_done`, what a restart did not send again (the server had those parts).
    pub bytes_resumed: u64,
    /// Bytes sent per second since this run of the upload began.
    pub bytes_per_second: f64,
    /// Seconds left at that rate; `null` before anything was sent.
    #[serde(deserialize_with = "required")]
    pub eta_seconds: Option<f64>,
}

impl LargeUpload {
    /// A cache's report of an upload, with its rate and the time left at that rate.
    pub fn from_progress(p: &crate::cache::resume::UploadProgress) -> Self {
        let sent = p.bytes_done.saturating_sub(p.bytes_resumed);
        let rate = if p.seconds > 0.0 {
            sent as f64 / p.seconds
        } else {
            0.0
        };
        let left = p.bytes_total.saturating_sub(p.bytes_done);
        LargeUpload {
            store_path: p.store_path.clone(),
            parts_done: p.parts_done,
            parts_total: p.parts_total,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            bytes_resumed: p.bytes_resumed,
            bytes_per_second: rate,
            eta_seconds: (rate > 0.0).then(|| left as f64 / rate),
        }
    }
}

/// The store watcher's part of the status.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchStatus {
    /// `built` or `all`; `null` when read from the queue file (no daemon answered).
    #[serde(deserialize_with = "required")]
    pub mode: Option<WatchStore>,
    /// The last Nix database row (`ValidPaths.id`) looked at: every path registered up to
    /// it has been queued or passed over.
    pub cursor: i64,
    /// Paths the watcher queued since the daemon started (not those a hand-off had queued).
    #[serde(deserialize_with = "required")]
    pub queued_since_start: Option<u64>,
}

/// A dropped path and why it was dropped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DroppedPath {
    pub path: String,
    pub why: String,
}

/// Totals since the daemon started.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinceStart {
    pub uploaded: u64,
    pub nar_bytes: u64,
}

/// Throughput over the last `window_seconds`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recent {
    pub window_seconds: u64,
    pub uploaded_per_second: f64,
    pub nar_mb_per_second: f64,
}

/// The last finished batch.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastBatch {
    pub seconds_ago: u64,
    /// Paths asked for (not their closures).
    pub paths: u64,
    pub uploaded: u64,
    pub already_present: u64,
    pub failed: u64,
    pub dropped: u64,
    pub nar_bytes: u64,
    pub seconds: f64,
}

/// An `Option` field that must be present (`null` for `None`): serde takes a missing
/// `Option` for `None` unless its deserializer is given.
fn required<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d)
}

/// Why a status text could not be read: the field (a path like `failures[0].kind`) and
/// what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("status field {field}: {source}")]
pub struct StatusParseError {
    pub field: String,
    #[source]
    pub source: serde_json::Error,
}

impl Status {
    /// Reads a status as the daemon sends it.
    ///
    /// # Errors
    /// [`StatusParseError`] naming the field that is missing, unknown or of the wrong
    /// type.
    pub fn from_json(text: &str) -> Result<Status, StatusParseError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let status: Status =
            serde_path_to_error::deserialize(&mut de).map_err(|e| StatusParseError {
                field: match e.path().to_string() {
                    p if p == "." => "(the whole status)".to_owned(),
                    p => p,
                },
                source: e.into_inner(),
            })?;
        de.end().map_err(|source| StatusParseError {
            field: "(after the status)".to_owned(),
            source,
        })?;
        Ok(status)
    }

    /// The status text: one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a status always serialises")
    }
}

impl Shared {
    /// The status report: queue counts, the batch in flight, failures, throughput.
    ///
    /// # Errors
    /// [`QueueError`] when the queue cannot be read.
    pub(super) fn status(&self) -> Result<Status, QueueError> {
        let mut s = status_from_queue(&self.lock_queue())?;
        let (paths_per_s, bytes_per_s) = self.stats.recent(RECENT_WINDOW);
        let last = self
            .stats
            .last_batch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        s.daemon = true;
        s.in_flight = Some(self.in_flight.load(Ordering::SeqCst) as u64);
        s.uptime_seconds = Some(self.started.elapsed().as_secs());
        s.last_recorded_unix_ms = Some(self.stats.last_recorded_ms.load(Ordering::SeqCst));
        s.since_start = Some(SinceStart {
            uploaded: self.stats.uploaded.load(Ordering::Relaxed),
            nar_bytes: self.stats.nar_bytes.load(Ordering::Relaxed),
        });
        s.recent = Some(Recent {
            window_seconds: RECENT_WINDOW,
            uploaded_per_second: paths_per_s,
            nar_mb_per_second: bytes_per_s / 1e6,
        });
        s.last_batch = last.map(|b| LastBatch {
            seconds_ago: b.at.elapsed().as_secs(),
            paths: b.paths as u64,
            uploaded: b.uploaded as u64,
            already_present: b.present as u64,
            failed: b.failed as u64,
            dropped: b.dropped as u64,
            nar_bytes: b.nar_bytes,
            seconds: b.seconds,
        });
        // Upgraded on a blocking thread (the status is made on one), where the cache may
        // be dropped if the worker let go of it meanwhile.
        s.large_uploads = Some(
            self.cache
                .upgrade()
                .map(|c| c.large_uploads())
                .unwrap_or_default()
                .iter()
                .map(LargeUpload::from_progress)
                .collect(),
        );
        s.watch = self.watch.map(|mode| WatchStatus {
            mode: Some(mode),
            cursor: s.watch.as_ref().map_or(0, |w| w.cursor),
            queued_since_start: Some(self.metrics.watched_total()),
        });
        Ok(s)
    }
}

/// How many failing and dropped paths a status report lists (the counts are complete).
pub const STATUS_LIST: usize = 20;
/// The throughput window of `narflow status`, in seconds.
const RECENT_WINDOW: u64 = 60;

/// The part of the status that the queue alone knows, with `daemon` false and the running
/// daemon's parts `null`; `narflow status` uses it directly when no daemon is running.
///
/// # Errors
/// [`QueueError`] when the queue cannot be read.
pub fn status_from_queue(q: &Queue) -> Result<Status, QueueError> {
    let c = q.counts()?;
    Ok(Status {
        daemon: false,
        daemon_error: None,
        pending: c.pending,
        failing: c.failing,
        needs_attention: c.needs_attention,
        done: c.done,
        dropped: c.dropped,
        failures: q.failing(STATUS_LIST)?,
        dropped_paths: q
            .dropped(STATUS_LIST)?
            .into_iter()
            .map(|(path, why)| DroppedPath { path, why })
            .collect(),
        in_flight: None,
        uptime_seconds: None,
        last_recorded_unix_ms: None,
        since_start: None,
        recent: None,
        last_batch: None,
        watch: q.watch_cursor()?.map(|cursor| WatchStatus {
            mode: None,
            cursor,
            queued_since_start: None,
        }),
        large_uploads: None,
    })
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
    use crate::daemon::queue::RetryClass;

    fn sample() -> Status {
        Status {
            daemon: true,
            daemon_error: None,
            pending: 3,
            failing: 1,
            needs_attention: 0,
            done: 7,
            dropped: 0,
            failures: vec![Failing {
                path: "/nix/store/a".into(),
                attempts: 2,
                last_error: "HTTP 503".into(),
                kind: "cache".into(),
                retry: RetryClass::Transient,
                needs_attention: false,
                next_attempt_ms: 5,
            }],
            dropped_paths: Vec::new(),
            in_flight: Some(2),
            uptime_seconds: Some(9),
            last_recorded_unix_ms: Some(0),
            since_start: Some(SinceStart {
                uploaded: 7,
                nar_bytes: 700,
            }),
            recent: Some(Recent {
                window_seconds: 60,
                uploaded_per_second: 0.5,
                nar_mb_per_second: 0.0,
            }),
            last_batch: None,
            watch: Some(WatchStatus {
                mode: Some(WatchStore::All),
                cursor: 12,
                queued_since_start: Some(3),
            }),
            large_uploads: Some(vec![LargeUpload {
                store_path: Some("/nix/store/b".into()),
                parts_done: 3,
                parts_total: 4,
                bytes_done: 3 << 23,
                bytes_total: 4 << 23,
                bytes_resumed: 2 << 23,
                bytes_per_second: 1e6,
                eta_seconds: Some(8.4),
            }]),
        }
    }

    /// The sample's JSON with `edit` applied to its object.
    fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        edit(&mut v);
        v.to_string()
    }

    #[test]
    fn a_status_reads_back_as_it_was_sent() {
        let s = sample();
        assert_eq!(Status::from_json(&s.to_json()).unwrap(), s);
        // Without a daemon the daemon's parts are null, and still there.
        let v: serde_json::Value = serde_json::from_str(
            &Status {
                in_flight: None,
                ..s
            }
            .to_json(),
        )
        .unwrap();
        assert!(
            v["in_flight"].is_null() && v.get("in_flight").is_some(),
            "{v}"
        );
        assert_eq!(v["failures"][0]["kind"], "cache");
        assert_eq!(v["failures"][0]["retry"], "transient");
        assert_eq!(v["watch"]["mode"], "all");
        assert_eq!(v["watch"]["cursor"], 12);
    }

    #[test]
    fn a_missing_unknown_or_mistyped_field_is_an_error_naming_it_not_a_zero() {
        let missing = edited(|v| {
            v.as_object_mut().unwrap().remove("failing");
        });
        let e = Status::from_json(&missing).unwrap_err().to_string();
        assert!(e.contains("missing field `failing`"), "{e}");
        // A daemon-only part may be null, but not absent.
        let absent = edited(|v| {
            v.as_object_mut().unwrap().remove("in_flight");
        });
        let e = Status::from_json(&absent).unwrap_err().to_string();
        assert!(e.contains("`in_flight`"), "{e}");
        let unknown = edited(|v| v["queue_depth"] = 4.into());
        let e = Status::from_json(&unknown).unwrap_err().to_string();
        assert!(e.contains("unknown field `queue_depth`"), "{e}");
        let mistyped = edited(|v| v["failures"][0]["attempts"] = "two".into());
        let e = Status::from_json(&mistyped).unwrap_err().to_string();
        assert!(e.contains("status field failures[0].attempts: "), "{e}");
        let watch = edited(|v| v["watch"]["mode"] = "some".into());
        let e = Status::from_json(&watch).unwrap_err().to_string();
        assert!(e.contains("watch.mode"), "{e}");
        let kind = edited(|v| v["failures"][0]["retry"] = "sometimes".into());
        let e = Status::from_json(&kind).unwrap_err().to_string();
        assert!(e.contains("failures[0].retry"), "{e}");
    }

    #[test]
    fn a_large_uploads_rate_counts_only_what_this_run_sent() {
        let u = LargeUpload::from_progress(&crate::cache::resume::UploadProgress {
            store_path: Some("/nix/store/b".into()),
            parts_done: 9,
            parts_total: 10,
            bytes_done: 900,
            bytes_total: 1000,
            bytes_resumed: 800,
            seconds: 10.0,
        });
        assert_eq!(u.bytes_per_second, 10.0);
        assert_eq!(u.eta_seconds, Some(10.0));
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(v["large_uploads"][0]["bytes_resumed"], 2 << 23);
        let absent = edited(|v| {
            v["large_uploads"][0]
                .as_object_mut()
                .unwrap()
                .remove("eta_seconds");
        });
        let e = Status::from_json(&absent).unwrap_err().to_string();
        assert!(e.contains("large_uploads[0]"), "{e}");
        let none = LargeUpload::from_progress(&crate::cache::resume::UploadProgress {
            store_path: None,
            parts_done: 0,
            parts_total: 10,
            bytes_done: 0,
            bytes_total: 1000,
            bytes_resumed: 0,
            seconds: 0.0,
        });
        assert_eq!((none.bytes_per_second, none.eta_seconds), (0.0, None));
    }

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
