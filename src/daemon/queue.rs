//! The daemon's durable queue of store paths to upload: SQLite in WAL mode with
//! `synchronous=FULL`, in `<state dir>/queue.sqlite`.
//!
//! A path is a row, so a path queued twice is one row. Its state is pending (with a time
//! before which it is not retried), done, or dropped (it left the store before it could
//! be uploaded). An enqueue returns only after its transaction is committed and synced,
//! so an acknowledged path survives a crash. Nothing here knows about caches or the
//! pipeline; the worker decides what happened to a path and records it here.
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The queue's file name inside the state directory.
pub const FILE: &str = "queue.sqlite";

/// How long finished rows are kept (for `narflow status`) before they are pruned.
pub const KEEP_FINISHED: Duration = Duration::from_secs(7 * 24 * 3600);

const PENDING: i64 = 0;
const DONE: i64 = 1;
const DROPPED: i64 = 2;

/// A queue error, naming the queue file.
#[derive(Debug, thiserror::Error)]
#[error("queue {path}: {source}")]
pub struct QueueError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

/// A pending path that has failed at least once.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Failing {
    pub path: String,
    pub attempts: u32,
    pub last_error: String,
    /// When the next attempt is due (Unix milliseconds).
    pub next_attempt_ms: i64,
}

/// Row counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Pending, whether due now or waiting for a retry.
    pub pending: u64,
    /// Pending and failed at least once.
    pub failing: u64,
    /// Uploaded (or found in the cache) within the last [`KEEP_FINISHED`].
    pub done: u64,
    /// Gone from the store before they could be uploaded, within [`KEEP_FINISHED`].
    pub dropped: u64,
}

/// What one upload attempt decided for each of its paths.
#[derive(Debug, Default)]
pub struct Outcomes {
    pub done: Vec<String>,
    /// Path and error: retried after [`backoff`].
    pub retry: Vec<(String, String)>,
    /// Path and reason: not retried.
    pub dropped: Vec<(String, String)>,
}

/// The wait before retry number `attempts` (1-based): 5 s, doubling, at most an hour.
pub fn backoff(attempts: u32) -> Duration {
    let secs = 5u64.saturating_mul(1 << attempts.saturating_sub(1).min(20));
    Duration::from_secs(secs.min(3600))
}

/// The queue (one connection; share it behind a mutex).
#[derive(Debug)]
pub struct Queue {
    conn: Connection,
    path: PathBuf,
}

impl Queue {
    /// Opens (creating) the queue in `state_dir`.
    ///
    /// # Errors
    /// [`QueueError`] when the file cannot be opened or set up.
    pub fn open(state_dir: &Path) -> Result<Queue, QueueError> {
        let path = state_dir.join(FILE);
        let err = |source| QueueError {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        // WAL: enqueues do not wait for the worker's reads; FULL: a commit is fsynced
        // before it returns, so an acknowledged path is on disk.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS paths (
                 path TEXT PRIMARY KEY NOT NULL,
                 drv TEXT,
                 state INTEGER NOT NULL,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 next_attempt INTEGER NOT NULL,
                 last_error TEXT,
                 queued INTEGER NOT NULL,
                 finished INTEGER
             );
             CREATE INDEX IF NOT EXISTS paths_due ON paths (state, next_attempt);",
        )
        .map_err(err)?;
        Ok(Queue { conn, path })
    }

    /// Opens an existing queue read-only (for `narflow status` without a daemon).
    ///
    /// # Errors
    /// [`QueueError`] when there is no queue there or it cannot be read.
    pub fn open_read_only(state_dir: &Path) -> Result<Queue, QueueError> {
        let path = state_dir.join(FILE);
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
            |source| QueueError {
                path: path.clone(),
                source,
            },
        )?;
        Ok(Queue { conn, path })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> QueueError + '_ {
        error_for(&self.path)
    }

    /// Queues `paths` in one durable transaction. A path already pending stays one row
    /// (due now); a finished one becomes pending again (the cache may have lost it; the
    /// upload skips it cheaply if not). Returns how many paths are pending because of
    /// this call.
    ///
    /// # Errors
    /// [`QueueError`]; then nothing was queued.
    pub fn enqueue(
        &mut self,
        paths: &[String],
        drv: Option<&str>,
        now_ms: i64,
    ) -> Result<usize, QueueError> {
        let err = error_for(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO paths (path, drv, state, attempts, next_attempt, queued)
                     VALUES (?1, ?2, 0, 0, ?3, ?3)
                     ON CONFLICT (path) DO UPDATE SET
                         drv = COALESCE(excluded.drv, drv),
                         attempts = CASE WHEN state = 0 THEN attempts ELSE 0 END,
                         last_error = CASE WHEN state = 0 THEN last_error ELSE NULL END,
                         state = 0, next_attempt = ?3, finished = NULL",
                )
                .map_err(&err)?;
            for p in paths {
                insert.execute(params![p, drv, now_ms]).map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)?;
        Ok(paths.len())
    }

    /// Up to `limit` pending paths due at `now_ms`, oldest first.
    ///
    /// # Errors
    /// [`QueueError`].
    pub fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, QueueError> {
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT path FROM paths WHERE state = 0 AND next_attempt <= ?1
                 ORDER BY queued, path LIMIT ?2",
            )
            .map_err(self.err())?;
        q.query_map(params![now_ms, limit as i64], |r| r.get(0))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())
    }

    /// When the earliest pending path is due (Unix ms), if any is pending.
    ///
    /// # Errors
    /// [`QueueError`].
    pub fn next_due(&self) -> Result<Option<i64>, QueueError> {
        self.conn
            .query_row(
                "SELECT MIN(next_attempt) FROM paths WHERE state = 0",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(self.err())
    }

    /// Records an attempt's outcomes in one transaction; a retried path waits
    /// [`backoff`] of its failed attempts so far, this one included.
    ///
    /// # Errors
    /// [`QueueError`]; the paths then stay pending and are attempted again.
    pub fn record(&mut self, outcomes: &Outcomes, now_ms: i64) -> Result<(), QueueError> {
        let err = error_for(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        {
            let mut done = tx
                .prepare_cached(
                    "UPDATE paths SET state = 1, finished = ?2, last_error = NULL
                     WHERE path = ?1 AND state = 0",
                )
                .map_err(&err)?;
            for p in &outcomes.done {
                done.execute(params![p, now_ms]).map_err(&err)?;
            }
            let mut retry = tx
                .prepare_cached(
                    "UPDATE paths SET attempts = attempts + 1, last_error = ?2,
                         next_attempt = ?3 + 1000 * ?4
                     WHERE path = ?1 AND state = 0",
                )
                .map_err(&err)?;
            let mut attempts = tx
                .prepare_cached("SELECT attempts FROM paths WHERE path = ?1")
                .map_err(&err)?;
            for (p, why) in &outcomes.retry {
                let n: u32 = attempts
                    .query_row([p], |r| r.get(0))
                    .optional()
                    .map_err(&err)?
                    .unwrap_or(0);
                let wait = backoff(n + 1).as_secs() as i64;
                retry.execute(params![p, why, now_ms, wait]).map_err(&err)?;
            }
            let mut dropped = tx
                .prepare_cached(
                    "UPDATE paths SET state = 2, finished = ?3, last_error = ?2
                     WHERE path = ?1 AND state = 0",
                )
                .map_err(&err)?;
            for (p, why) in &outcomes.dropped {
                dropped.execute(params![p, why, now_ms]).map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)
    }

    /// Counts by state.
    ///
    /// # Errors
    /// [`QueueError`].
    pub fn counts(&self) -> Result<Counts, QueueError> {
        self.conn
            .query_row(
                "SELECT
                     COALESCE(SUM(state = 0), 0),
                     COALESCE(SUM(state = 0 AND attempts > 0), 0),
                     COALESCE(SUM(state = 1), 0),
                     COALESCE(SUM(state = 2), 0)
                 FROM paths",
                [],
                |r| {
                    Ok(Counts {
                        pending: r.get(0)?,
                        failing: r.get(1)?,
                        done: r.get(2)?,
                        dropped: r.get(3)?,
                    })
                },
            )
            .map_err(self.err())
    }

    /// Up to `limit` pending paths that have failed, most attempts first.
    ///
    /// # Errors
    /// [`QueueError`].
    pub fn failing(&self, limit: usize) -> Result<Vec<Failing>, QueueError> {
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT path, attempts, COALESCE(last_error, ''), next_attempt FROM paths
                 WHERE state = 0 AND attempts > 0 ORDER BY attempts DESC, path LIMIT ?1",
            )
            .map_err(self.err())?;
        q.query_map([limit as i64], |r| {
            Ok(Failing {
                path: r.get(0)?,
                attempts: r.get(1)?,
                last_error: r.get(2)?,
                next_attempt_ms: r.get(3)?,
            })
        })
        .map_err(self.err())?
        .collect::<Result<_, _>>()
        .map_err(self.err())
    }

    /// Dropped paths (most recent first, up to `limit`) with why.
    ///
    /// # Errors
    /// [`QueueError`].
    pub fn dropped(&self, limit: usize) -> Result<Vec<(String, String)>, QueueError> {
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT path, COALESCE(last_error, '') FROM paths WHERE state = 2
                 ORDER BY finished DESC, path LIMIT ?1",
            )
            .map_err(self.err())?;
        q.query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())
    }

    /// Deletes finished rows older than [`KEEP_FINISHED`]; returns how many.
    ///
    /// # Errors
    /// [`QueueError`].
    pub fn prune(&mut self, now_ms: i64) -> Result<usize, QueueError> {
        let before = now_ms - KEEP_FINISHED.as_millis() as i64;
        self.conn
            .execute(
                "DELETE FROM paths WHERE state IN (?1, ?2) AND finished < ?3",
                params![DONE, DROPPED, before],
            )
            .map_err(self.err())
    }

    /// The state of one path (for tests and diagnostics): `pending`, `done` or `dropped`.
    ///
    /// # Errors
    /// [`QueueError`].
    pub fn state_of(&self, path: &str) -> Result<Option<&'static str>, QueueError> {
        let s: Option<i64> = self
            .conn
            .query_row("SELECT state FROM paths WHERE path = ?1", [path], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())?;
        Ok(s.map(|s| match s {
            PENDING => "pending",
            DONE => "done",
            _ => "dropped",
        }))
    }
}

/// Wraps SQLite errors with the queue file's path (owned, so the closure outlives borrows
/// of the connection).
fn error_for(path: &Path) -> impl Fn(rusqlite::Error) -> QueueError + use<> {
    let path = path.to_owned();
    move |source| QueueError {
        path: path.clone(),
        source,
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        format!("/nix/store/{s}")
    }

    #[test]
    fn duplicates_collapse_and_queued_paths_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        q.enqueue(&[p("a"), p("b")], Some("/nix/store/x.drv"), 1000)
            .unwrap();
        q.enqueue(&[p("b"), p("c")], None, 2000).unwrap();
        drop(q);
        let q = Queue::open(dir.path()).unwrap();
        let due = q.due(5000, 10).unwrap();
        // b was re-queued at 2000, so a (1000) comes first.
        assert_eq!(due, [p("a"), p("b"), p("c")]);
        assert_eq!(q.counts().unwrap().pending, 3);
        // The read-only view sees the same.
        let ro = Queue::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.counts().unwrap().pending, 3);
    }

    #[test]
    fn failures_back_off_and_stay_visible_done_and_dropped_are_final() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        q.enqueue(&[p("a"), p("b"), p("c")], None, 0).unwrap();
        let out = Outcomes {
            done: vec![p("a")],
            retry: vec![(p("b"), "HTTP 503".into())],
            dropped: vec![(p("c"), "garbage-collected".into())],
        };
        q.record(&out, 10_000).unwrap();
        assert!(q.due(10_000, 10).unwrap().is_empty());
        assert_eq!(q.next_due().unwrap(), Some(15_000));
        let f = q.failing(10).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].attempts, f[0].last_error.as_str()), (1, "HTTP 503"));
        // Second failure: twice the wait.
        let retry = Outcomes {
            retry: vec![(p("b"), "HTTP 503 again".into())],
            ..Outcomes::default()
        };
        q.record(&retry, 15_000).unwrap();
        assert_eq!(q.next_due().unwrap(), Some(25_000));
        assert_eq!(q.due(25_000, 10).unwrap(), [p("b")]);
        assert_eq!(q.failing(10).unwrap()[0].attempts, 2);
        let c = q.counts().unwrap();
        assert_eq!((c.pending, c.failing, c.done, c.dropped), (1, 1, 1, 1));
        assert_eq!(q.state_of(&p("c")).unwrap(), Some("dropped"));
        assert_eq!(q.dropped(5).unwrap()[0].1, "garbage-collected");
        // Re-queueing a done path makes it pending again, with a clean slate.
        q.enqueue(&[p("a")], None, 30_000).unwrap();
        assert_eq!(q.state_of(&p("a")).unwrap(), Some("pending"));
        // Re-queueing a failing path keeps its count but makes it due now.
        q.enqueue(&[p("b")], None, 16_000).unwrap();
        assert_eq!(q.due(16_000, 10).unwrap(), [p("b")]);
        assert_eq!(q.failing(10).unwrap()[0].attempts, 2);
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(5), Duration::from_secs(80));
        assert_eq!(backoff(30), Duration::from_secs(3600));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(3600));
    }

    #[test]
    fn old_finished_rows_are_pruned_pending_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        q.enqueue(&[p("a"), p("b")], None, 0).unwrap();
        let out = Outcomes {
            done: vec![p("a")],
            ..Outcomes::default()
        };
        q.record(&out, 1).unwrap();
        let later = KEEP_FINISHED.as_millis() as i64 + 10;
        assert_eq!(q.prune(later).unwrap(), 1);
        assert_eq!(q.state_of(&p("a")).unwrap(), None);
        assert_eq!(q.state_of(&p("b")).unwrap(), Some("pending"));
    }
}
