//! The daemon's durable queue of store paths to upload: SQLite in WAL mode with
//! `synchronous=FULL`, in `<state dir>/queue.sqlite`.
//!
//! A path is a row, so a path queued twice is one row. Its state is pending (with a time
//! before which it is not retried), done, or dropped (it left the store before it could
//! be uploaded). An enqueue returns only after its transaction is committed and synced,
//! so an acknowledged path survives a crash. Nothing here knows about caches or the
//! pipeline; the worker decides what happened to a path and records it here.
//!
//! Every enqueue bumps the row's generation, and a result is recorded only for the
//! generation it was computed for ([`Due`]): a path queued again while its upload was
//! running (a rebuild after a garbage collection) is never marked done or dropped by the
//! old attempt.
//!
//! The queue also keeps the store watcher's cursor (`--watch-store`: the last Nix
//! database row it looked at), written in the same transaction as the paths it queued.
//!
//! Retry times are wall-clock (they must survive a restart), so each row also keeps when
//! its retry was scheduled: a row scheduled "after" now means the clock went back, and it
//! is due at once instead of waiting for the old clock to come back.
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The queue's file name inside the state directory.
pub const FILE: &str = "queue.sqlite";

/// How long finished rows are kept (for `narflow status`) before they are pruned.
pub const KEEP_FINISHED: Duration = Duration::from_secs(7 * 24 * 3600);

/// The store watcher's state: one row, `cursor` = the last `ValidPaths.id` it looked at.
const CREATE_WATCH: &str =
    "CREATE TABLE IF NOT EXISTS watch (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL)";

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

/// How long a path whose last failure needs someone to act (a corrupt store path, access
/// denied, a missing bucket) waits before the next try: retrying sooner cannot help, and
/// an hour keeps the cost of a stuck path to one attempt per hour until it is fixed (a
/// new enqueue of the path tries it at once).
pub const ATTENTION_RETRY: Duration = Duration::from_secs(3600);

/// A pending path as taken for an attempt: its result is recorded for this generation only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub path: String,
    pub generation: i64,
    /// When the path was handed off (Unix ms): its first enqueue since it last finished.
    pub queued: i64,
}

/// A pending path that has failed at least once.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failing {
    pub path: String,
    pub attempts: u32,
    pub last_error: String,
    /// What kind of thing went wrong last: a [`crate::pipeline::outcome::FailureKind`] label.
    pub kind: String,
    /// Whether retrying the last failure can help.
    pub retry: RetryClass,
    /// The last failure cannot go away by retrying: someone must act.
    pub needs_attention: bool,
    /// When the next attempt is due (Unix milliseconds).
    pub next_attempt_ms: i64,
}

/// Whether retrying a failure can help, as the queue records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryClass {
    Transient,
    Permanent,
}

impl RetryClass {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryClass::Transient => "transient",
            RetryClass::Permanent => "permanent",
        }
    }
}

/// Why an attempt failed, as the queue records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// A [`crate::pipeline::outcome::FailureKind`] label (the queue stores it as given).
    pub kind: &'static str,
    pub message: String,
}

/// Row counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Pending, whether due now or waiting for a retry.
    pub pending: u64,
    /// Pending and failed at least once.
    pub failing: u64,
    /// Failing, and the last failure needs someone to act.
    pub needs_attention: u64,
    /// Uploaded (or found in the cache) within the last [`KEEP_FINISHED`].
    pub done: u64,
    /// Gone from the store before they could be uploaded, within [`KEEP_FINISHED`].
    pub dropped: u64,
}

/// What one upload attempt decided for each of its paths. A path it has no outcome for
/// (an upload cancelled by a shutdown) stays as it was: that was not a failed attempt.
#[derive(Debug, Default)]
pub struct Outcomes {
    pub done: Vec<Due>,
    /// Path and error: transient, retried after [`backoff`].
    pub retry: Vec<(Due, Failed)>,
    /// Path and error: retrying cannot help until someone acts; shown as needing
    /// attention and retried after [`ATTENTION_RETRY`].
    pub attention: Vec<(Due, Failed)>,
    /// Path and error: the cache itself refused (credentials, bucket, endpoint), so the
    /// path needs attention, but one check of the cache retries every such path at once:
    /// retried after [`backoff`], to go on as soon as the cache is fixed.
    pub cache_refused: Vec<(Due, Failed)>,
    /// Path and reason: not retried.
    pub dropped: Vec<(Due, String)>,
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
        // NOFOLLOW: the daemon runs as root; a queue file planted as a symlink is refused.
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(err)?;
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
        // Columns added since the first version; a queue from before gets them here.
        let have: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('paths')")
            .and_then(|mut q| q.query_map([], |r| r.get(0))?.collect())
            .map_err(err)?;
        for (name, decl) in [
            ("generation", "INTEGER NOT NULL DEFAULT 0"),
            ("scheduled", "INTEGER NOT NULL DEFAULT 0"),
            ("attention", "INTEGER NOT NULL DEFAULT 0"),
            // A failure recorded before kinds were: nothing tells what it was.
            ("kind", "TEXT NOT NULL DEFAULT 'other'"),
        ] {
            if !have.iter().any(|h| h == name) {
                conn.execute_batch(&format!("ALTER TABLE paths ADD COLUMN {name} {decl}"))
                    .map_err(err)?;
            }
        }
        // Tables added since the first version.
        conn.execute_batch(CREATE_WATCH).map_err(err)?;
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
                    "INSERT INTO paths (path, drv, state, attempts, next_attempt, queued,
                                        scheduled, generation)
                     VALUES (?1, ?2, 0, 0, ?3, ?3, ?3, 1)
                     ON CONFLICT (path) DO UPDATE SET
                         drv = COALESCE(excluded.drv, drv),
                         attempts = CASE WHEN state = 0 THEN attempts ELSE 0 END,
                         last_error = CASE WHEN state = 0 THEN last_error ELSE NULL END,
                         attention = CASE WHEN state = 0 THEN attention ELSE 0 END,
                         generation = generation + 1,
                         queued = CASE WHEN state = 0 THEN queued ELSE excluded.queued END,
                         state = 0, next_attempt = ?3, scheduled = ?3, finished = NULL",
                )
                .map_err(&err)?;
            for p in paths {
                insert.execute(params![p, drv, now_ms]).map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)?;
        Ok(paths.len())
    }

    /// Records paths that were never queued because they do not exist (a spooled
    /// hand-off of a path collected since) as dropped, with why, so they do not vanish
    /// without a trace. A path that has a row already keeps it.
    ///
    /// # Errors
    /// [`QueueError`]; then nothing was recorded.
    pub fn record_dropped(
        &mut self,
        paths: &[(String, String)],
        now_ms: i64,
    ) -> Result<(), QueueError> {
        let err = error_for(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO paths (path, state, attempts, next_attempt, queued, scheduled,
                                        finished, last_error)
                     VALUES (?1, 2, 0, ?2, ?2, ?2, ?2, ?3)
                     ON CONFLICT (path) DO NOTHING",
                )
                .map_err(&err)?;
            for (p, why) in paths {
                insert.execute(params![p, now_ms, why]).map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)
    }

    /// Up to `limit` pending paths due at `now_ms`, oldest first. A row scheduled after
    /// `now_ms` (the clock went back) is due.
    ///
    /// # Errors
    /// [`QueueError`].
    pub fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<Due>, QueueError> {
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT path, generation, queued FROM paths
                 WHERE state = 0 AND (next_attempt <= ?1 OR scheduled > ?1)
                 ORDER BY queued, path LIMIT ?2",
            )
            .map_err(self.err())?;
        q.query_map(params![now_ms, limit as i64], |r| {
            Ok(Due {
                path: r.get(0)?,
                generation: r.get(1)?,
                queued: r.get(2)?,
            })
        })
        .map_err(self.err())?
        .collect::<Result<_, _>>()
        .map_err(self.err())
    }

    /// When the earliest pending path is due (Unix ms), if any is pending; `now_ms` for a
    /// row scheduled after `now_ms` (see [`Queue::due`]).
    ///
    /// # Errors
    /// [`QueueError`].
    pub fn next_due(&self, now_ms: i64) -> Result<Option<i64>, QueueError> {
        self.conn
            .query_row(
                "SELECT MIN(CASE WHEN scheduled > ?1 THEN ?1 ELSE next_attempt END)
                 FROM paths WHERE state = 0",
                [now_ms],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(self.err())
    }

    /// Records an attempt's outcomes in one transaction, each only if its row is still
    /// pending at the generation the attempt took; a retried path waits [`backoff`] of
    /// its failed attempts so far, this one included, or [`ATTENTION_RETRY`].
    ///
    /// # Errors
    /// [`QueueError`]; the paths then stay pending and are attempted again.
    pub fn record(&mut self, outcomes: &Outcomes, now_ms: i64) -> Result<(), QueueError> {
        let err = error_for(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        {
            let mut done = tx
                .prepare_cached(
                    "UPDATE paths SET state = 1, finished = ?3, last_error = NULL, attention = 0
                     WHERE path = ?1 AND generation = ?2 AND state = 0",
                )
                .map_err(&err)?;
            for d in &outcomes.done {
                done.execute(params![d.path, d.generation, now_ms])
                    .map_err(&err)?;
            }
            let mut retry = tx
                .prepare_cached(
                    "UPDATE paths SET attempts = attempts + 1, last_error = ?3,
                         next_attempt = ?4 + 1000 * ?5, scheduled = ?4, attention = ?6,
                         kind = ?7
                     WHERE path = ?1 AND generation = ?2 AND state = 0",
                )
                .map_err(&err)?;
            let mut attempts = tx
                .prepare_cached("SELECT attempts FROM paths WHERE path = ?1")
                .map_err(&err)?;
            // (outcome, needs attention, waits ATTENTION_RETRY)
            let failed = (outcomes.retry.iter().map(|r| (r, false, false)))
                .chain(outcomes.attention.iter().map(|r| (r, true, true)))
                .chain(outcomes.cache_refused.iter().map(|r| (r, true, false)));
            for ((d, why), attention, slow) in failed {
                let n: u32 = attempts
                    .query_row([&d.path], |r| r.get(0))
                    .optional()
                    .map_err(&err)?
                    .unwrap_or(0);
                let wait = if slow {
                    ATTENTION_RETRY
                } else {
                    backoff(n + 1)
                };
                retry
                    .execute(params![
                        d.path,
                        d.generation,
                        why.message,
                        now_ms,
                        wait.as_secs() as i64,
                        attention,
                        why.kind
                    ])
                    .map_err(&err)?;
            }
            let mut dropped = tx
                .prepare_cached(
                    "UPDATE paths SET state = 2, finished = ?4, last_error = ?3, attention = 0
                     WHERE path = ?1 AND generation = ?2 AND state = 0",
                )
                .map_err(&err)?;
            for (d, why) in &outcomes.dropped {
                dropped
                    .execute(params![d.path, d.generation, why, now_ms])
                    .map_err(&err)?;
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
                     COALESCE(SUM(state = 0 AND attempts > 0 AND attention), 0),
                     COALESCE(SUM(state = 1), 0),
                     COALESCE(SUM(state = 2), 0)
                 FROM paths",
                [],
                |r| {
                    Ok(Counts {
                        pending: r.get(0)?,
                        failing: r.get(1)?,
                        needs_attention: r.get(2)?,
                        done: r.get(3)?,
                        dropped: r.get(4)?,
                    })
                },
            )
            .map_err(self.err())
    }

    /// Up to `limit` pending paths that have failed, those that need attention first,
    /// then most attempts first.
    ///
    /// # Errors
    /// [`QueueError`].
    pub fn failing(&self, limit: usize) -> Result<Vec<Failing>, QueueError> {
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT path, attempts, COALESCE(last_error, ''), next_attempt, attention, kind
                 FROM paths WHERE state = 0 AND attempts > 0
                 ORDER BY attention DESC, attempts DESC, path LIMIT ?1",
            )
            .map_err(self.err())?;
        q.query_map([limit as i64], |r| {
            let needs_attention: bool = r.get(4)?;
            Ok(Failing {
                path: r.get(0)?,
                attempts: r.get(1)?,
                last_error: r.get(2)?,
                next_attempt_ms: r.get(3)?,
                needs_attention,
                kind: r.get(5)?,
                // Only a failure retrying cannot fix needs attention (a refusing cache's
                // included), so the attention flag is the retry class.
                retry: if needs_attention {
                    RetryClass::Permanent
                } else {
                    RetryClass::Transient
                },
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

    /// Where the store watcher (`--watch-store`) left off: the last `ValidPaths.id` it
    /// looked at, or `None` when no watcher ever ran on this queue (also for a queue file
    /// from before watchers, opened read-only).
    ///
    /// # Errors
    /// [`QueueError`].
    pub fn watch_cursor(&self) -> Result<Option<i64>, QueueError> {
        let has_table: bool = self
            .conn
            .query_row(
                "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'watch'",
                [],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        if !has_table {
            return Ok(None);
        }
        self.conn
            .query_row("SELECT value FROM watch WHERE key = 'cursor'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())
    }

    /// Queues the paths the store watcher found and moves its cursor to `cursor`, in one
    /// durable transaction: after a crash either both are there or neither, so a path is
    /// neither lost nor queued twice. A path the queue has already (handed off by the
    /// hook, pending or done) is left as it is: the watcher sees every path that becomes
    /// valid, and must not re-open work a hand-off has done. Only a path dropped earlier
    /// (it left the store, and is valid again) is pending again. Returns how many paths
    /// are pending because of this call.
    ///
    /// # Errors
    /// [`QueueError`]; then nothing was queued and the cursor did not move.
    pub fn enqueue_watched(
        &mut self,
        paths: &[String],
        cursor: i64,
        now_ms: i64,
    ) -> Result<usize, QueueError> {
        let err = error_for(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        let mut queued = 0;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO paths (path, state, attempts, next_attempt, queued, scheduled,
                                        generation)
                     VALUES (?1, 0, 0, ?2, ?2, ?2, 1)
                     ON CONFLICT (path) DO UPDATE SET
                         state = 0, attempts = 0, last_error = NULL, attention = 0,
                         generation = generation + 1, queued = excluded.queued,
                         next_attempt = excluded.next_attempt, scheduled = excluded.scheduled,
                         finished = NULL
                     WHERE state = 2",
                )
                .map_err(&err)?;
            for p in paths {
                queued += insert.execute(params![p, now_ms]).map_err(&err)?;
            }
        }
        tx.execute(
            "INSERT INTO watch (key, value) VALUES ('cursor', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [cursor],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(queued)
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

    fn paths(due: &[Due]) -> Vec<String> {
        due.iter().map(|d| d.path.clone()).collect()
    }

    fn failed(kind: &'static str, message: &str) -> Failed {
        Failed {
            kind,
            message: message.into(),
        }
    }

    /// The row of `path` as due now.
    fn due_row(q: &Queue, path: &str) -> Due {
        q.due(i64::MAX / 2, 1000)
            .unwrap()
            .into_iter()
            .find(|d| d.path == path)
            .unwrap()
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
        assert_eq!(paths(&due), [p("a"), p("b"), p("c")]);
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
            done: vec![due_row(&q, &p("a"))],
            retry: vec![(due_row(&q, &p("b")), failed("cache", "HTTP 503"))],
            dropped: vec![(due_row(&q, &p("c")), "garbage-collected".into())],
            ..Outcomes::default()
        };
        q.record(&out, 10_000).unwrap();
        assert!(q.due(10_000, 10).unwrap().is_empty());
        assert_eq!(q.next_due(10_000).unwrap(), Some(15_000));
        let f = q.failing(10).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].attempts, f[0].last_error.as_str()), (1, "HTTP 503"));
        assert!(!f[0].needs_attention);
        // Second failure: twice the wait.
        let retry = Outcomes {
            retry: vec![(due_row(&q, &p("b")), failed("cache", "HTTP 503 again"))],
            ..Outcomes::default()
        };
        q.record(&retry, 15_000).unwrap();
        assert_eq!(q.next_due(15_000).unwrap(), Some(25_000));
        assert_eq!(paths(&q.due(25_000, 10).unwrap()), [p("b")]);
        assert_eq!(q.failing(10).unwrap()[0].attempts, 2);
        let c = q.counts().unwrap();
        assert_eq!((c.pending, c.failing, c.done, c.dropped), (1, 1, 1, 1));
        assert_eq!(q.state_of(&p("c")).unwrap(), Some("dropped"));
        assert_eq!(q.dropped(5).unwrap()[0].1, "garbage-collected");
        // Re-queueing a done path makes it pending again, with a clean slate: handed off
        // anew.
        q.enqueue(&[p("a")], None, 30_000).unwrap();
        assert_eq!(q.state_of(&p("a")).unwrap(), Some("pending"));
        assert_eq!(due_row(&q, &p("a")).queued, 30_000);
        // Re-queueing a failing path keeps its count (and its hand-off time) but makes it
        // due now.
        q.enqueue(&[p("b")], None, 16_000).unwrap();
        assert_eq!(due_row(&q, &p("b")).queued, 0);
        assert!(paths(&q.due(16_000, 10).unwrap()).contains(&p("b")));
        assert_eq!(q.failing(10).unwrap()[0].attempts, 2);
    }

    #[test]
    fn a_result_changes_only_the_generation_it_was_computed_for() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        q.enqueue(&[p("a"), p("b")], None, 0).unwrap();
        // The worker takes both; meanwhile the hook queues them again (a rebuild).
        let taken = q.due(0, 10).unwrap();
        q.enqueue(&[p("a"), p("b")], None, 1).unwrap();
        let out = Outcomes {
            dropped: vec![(taken[0].clone(), "garbage-collected".into())],
            done: vec![taken[1].clone()],
            ..Outcomes::default()
        };
        q.record(&out, 2).unwrap();
        // The acknowledged re-enqueue stands: both still pending, neither failing.
        assert_eq!(q.state_of(&p("a")).unwrap(), Some("pending"));
        assert_eq!(q.state_of(&p("b")).unwrap(), Some("pending"));
        // A result for the current generation is recorded.
        let now = q.due(2, 10).unwrap();
        let out = Outcomes {
            done: now.clone(),
            ..Outcomes::default()
        };
        q.record(&out, 3).unwrap();
        assert_eq!(q.counts().unwrap().done, 2);
    }

    #[test]
    fn a_backward_clock_step_does_not_stall_pending_paths() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        let day = 24 * 3600 * 1000;
        // Queued and failed once while the clock was a day ahead.
        q.enqueue(&[p("a")], None, 10 * day).unwrap();
        let out = Outcomes {
            retry: vec![(due_row(&q, &p("a")), failed("cache", "HTTP 503"))],
            ..Outcomes::default()
        };
        q.record(&out, 10 * day).unwrap();
        assert!(q.due(10 * day, 10).unwrap().is_empty());
        // The clock is corrected: the retry, due "in a day and 5 s", is due now.
        let now = 9 * day;
        assert_eq!(paths(&q.due(now, 10).unwrap()), [p("a")]);
        assert_eq!(q.next_due(now).unwrap(), Some(now));
        // Rescheduled on the corrected clock, it waits its backoff from there.
        let out = Outcomes {
            retry: vec![(due_row(&q, &p("a")), failed("cache", "HTTP 503"))],
            ..Outcomes::default()
        };
        q.record(&out, now).unwrap();
        assert!(q.due(now, 10).unwrap().is_empty());
        assert_eq!(q.next_due(now).unwrap(), Some(now + 10_000));
    }

    #[test]
    fn permanent_failures_need_attention_and_retry_slowly() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        q.enqueue(&[p("a"), p("b")], None, 0).unwrap();
        q.enqueue(&[p("c")], None, 0).unwrap();
        let out = Outcomes {
            attention: vec![(due_row(&q, &p("a")), failed("corrupt", "NarHash mismatch"))],
            retry: vec![(due_row(&q, &p("b")), failed("cache", "HTTP 503"))],
            cache_refused: vec![(due_row(&q, &p("c")), failed("cache", "no such bucket"))],
            ..Outcomes::default()
        };
        q.record(&out, 0).unwrap();
        let c = q.counts().unwrap();
        assert_eq!((c.failing, c.needs_attention), (3, 2));
        // A refusing cache is checked again soon: one check retries every path.
        assert_eq!(q.next_due(0).unwrap(), Some(5000));
        let f = q.failing(10).unwrap();
        assert_eq!(
            (f[0].path.as_str(), f[0].needs_attention),
            (p("a").as_str(), true)
        );
        // Each keeps its kind and retry class.
        assert_eq!(
            (f[0].kind.as_str(), f[0].retry),
            ("corrupt", RetryClass::Permanent)
        );
        assert_eq!(
            (f[1].kind.as_str(), f[1].retry),
            ("cache", RetryClass::Permanent)
        );
        assert_eq!(f[2].retry, RetryClass::Transient);
        assert_eq!(f[0].next_attempt_ms, ATTENTION_RETRY.as_millis() as i64);
        assert_eq!(
            (f[1].path.as_str(), f[1].needs_attention),
            (p("c").as_str(), true)
        );
        assert!(!f[2].needs_attention);
    }

    #[test]
    fn dropped_spool_paths_are_recorded_without_touching_queued_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        q.enqueue(&[p("a")], None, 0).unwrap();
        q.record_dropped(&[(p("a"), "gone".into()), (p("b"), "gone".into())], 1)
            .unwrap();
        assert_eq!(q.state_of(&p("a")).unwrap(), Some("pending"));
        assert_eq!(q.state_of(&p("b")).unwrap(), Some("dropped"));
        assert_eq!(q.dropped(5).unwrap(), [(p("b"), "gone".to_owned())]);
    }

    #[test]
    fn a_queue_from_before_generations_and_kinds_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let c = Connection::open(dir.path().join(FILE)).unwrap();
        c.execute_batch(
            "CREATE TABLE paths (path TEXT PRIMARY KEY NOT NULL, drv TEXT,
                 state INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                 next_attempt INTEGER NOT NULL, last_error TEXT, queued INTEGER NOT NULL,
                 finished INTEGER);
             INSERT INTO paths (path, state, next_attempt, queued)
                 VALUES ('/nix/store/a', 0, 5, 5);
             INSERT INTO paths (path, state, attempts, next_attempt, queued, last_error)
                 VALUES ('/nix/store/b', 0, 1, 99, 5, 'HTTP 503');",
        )
        .unwrap();
        drop(c);
        let mut q = Queue::open(dir.path()).unwrap();
        // A failure from before kinds were recorded reads as `other`, and transient.
        let f = q.failing(10).unwrap();
        assert_eq!(
            (f[0].path.as_str(), f[0].kind.as_str(), f[0].retry),
            (p("b").as_str(), "other", RetryClass::Transient)
        );
        let due = q.due(5, 10).unwrap();
        assert_eq!(paths(&due), [p("a")]);
        let out = Outcomes {
            done: due,
            ..Outcomes::default()
        };
        q.record(&out, 6).unwrap();
        assert_eq!(q.state_of(&p("a")).unwrap(), Some("done"));
    }

    #[test]
    fn a_queue_from_before_the_watcher_is_upgraded_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        q.enqueue(&[p("a")], None, 5).unwrap();
        // A queue file as it was before the watcher: no watch table.
        q.conn.execute_batch("DROP TABLE watch").unwrap();
        drop(q);
        // `narflow status` without a daemon reads it as it is: no watcher ever ran.
        let ro = Queue::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.watch_cursor().unwrap(), None);
        drop(ro);
        let mut q = Queue::open(dir.path()).unwrap();
        assert_eq!(q.watch_cursor().unwrap(), None);
        assert_eq!(q.enqueue_watched(&[p("b")], 42, 6).unwrap(), 1);
        drop(q);
        let q = Queue::open(dir.path()).unwrap();
        assert_eq!(q.watch_cursor().unwrap(), Some(42));
        assert_eq!(paths(&q.due(10, 10).unwrap()), [p("a"), p("b")]);
    }

    #[test]
    fn watched_paths_and_the_cursor_commit_together_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        q.enqueue_watched(&[], 7, 0).unwrap();
        // The cursor's write fails after the path's row was written: neither stays.
        q.conn
            .execute_batch("ALTER TABLE watch RENAME TO watch_gone")
            .unwrap();
        assert!(q.enqueue_watched(&[p("a")], 9, 1).is_err());
        assert_eq!(q.state_of(&p("a")).unwrap(), None);
        q.conn
            .execute_batch("ALTER TABLE watch_gone RENAME TO watch")
            .unwrap();
        assert_eq!(q.watch_cursor().unwrap(), Some(7));
        assert_eq!(q.enqueue_watched(&[p("a")], 9, 1).unwrap(), 1);
        assert_eq!(q.watch_cursor().unwrap(), Some(9));
        assert_eq!(q.state_of(&p("a")).unwrap(), Some("pending"));
    }

    #[test]
    fn a_watched_path_the_queue_has_keeps_its_row_unless_it_was_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        q.enqueue(
            &[p("pending"), p("done"), p("gone")],
            Some("/nix/store/x.drv"),
            0,
        )
        .unwrap();
        let out = Outcomes {
            done: vec![due_row(&q, &p("done"))],
            dropped: vec![(due_row(&q, &p("gone")), "garbage-collected".into())],
            ..Outcomes::default()
        };
        q.record(&out, 1).unwrap();
        let pending = due_row(&q, &p("pending"));
        let watched = [p("pending"), p("done"), p("gone"), p("new")];
        // Only the dropped path (valid again) and the new one are queued by the watcher.
        assert_eq!(q.enqueue_watched(&watched, 3, 2).unwrap(), 2);
        // A hand-off's row is untouched: same generation, so its attempt's result stands.
        assert_eq!(due_row(&q, &p("pending")), pending);
        assert_eq!(q.state_of(&p("done")).unwrap(), Some("done"));
        assert_eq!(q.state_of(&p("gone")).unwrap(), Some("pending"));
        assert_eq!(due_row(&q, &p("gone")).queued, 2);
        assert_eq!(q.state_of(&p("new")).unwrap(), Some("pending"));
        // Seeing them all again queues nothing more.
        assert_eq!(q.enqueue_watched(&watched, 4, 3).unwrap(), 0);
        assert_eq!(q.counts().unwrap().pending, 3);
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
            done: vec![due_row(&q, &p("a"))],
            ..Outcomes::default()
        };
        q.record(&out, 1).unwrap();
        let later = KEEP_FINISHED.as_millis() as i64 + 10;
        assert_eq!(q.prune(later).unwrap(), 1);
        assert_eq!(q.state_of(&p("a")).unwrap(), None);
        assert_eq!(q.state_of(&p("b")).unwrap(), Some("pending"));
    }
}
