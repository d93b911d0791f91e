//! The store watcher (`narflow daemon --watch-store built|all`): a thread that follows the
//! Nix database's `ValidPaths` past a cursor, about once a second, and queues each new
//! valid path in the queue the hook's hand-offs go to, so a path both handed off and
//! watched is one row. `built` queues the paths Nix built on this machine (`ultimate =
//! 1`), `all` every path that becomes valid (built, substituted, added, copied in).
//! `.drv` files are never queued: they are build recipes, not outputs, and a cache serves
//! them only when asked (`narflow backfill --derivations`).
//!
//! The cursor (the last `ValidPaths.id` looked at) lives in the queue and is written in the
//! same transaction as the paths it queued, so a crash neither loses a path nor queues it
//! twice, and it survives restarts. The first start begins at the store's current end: a
//! backfill covers the past. Nix assigns ids in registration order and never reuses one
//! (`AUTOINCREMENT`), so rows past the cursor are exactly the paths registered since.
//!
//! The database is read read-only and WAL-safe ([`crate::store::db`]). The watcher never
//! uploads and never waits for the upload worker; a path garbage-collected before its
//! upload is dropped by the worker, as a handed-off one is.
use super::queue::{self, Queue, QueueError};
use super::{DaemonError, Shared};
use crate::settings::WatchStore;
use crate::store::db::ValidRow;
use crate::store::{LocalStore, StoreError};
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::Duration;

/// How often the Nix database is looked at: a new path is queued within about a second.
/// One poll of an idle store is one indexed read; nothing is written.
const POLL: Duration = Duration::from_secs(1);
/// Rows read, and queued in one transaction, at a time: bounds the watcher's memory and
/// the queue's transaction; a burst (a `nix copy` of 100,000 paths) is read window after
/// window without waiting for the next poll.
const WINDOW: usize = 1000;

/// Why one poll of the store failed (the watcher tries again at the next).
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("cannot read the Nix database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot queue: {0}")]
    Queue(#[from] QueueError),
}

/// Where the watcher starts: the queue's cursor, or, on the first start, the store's
/// current end, written to the queue at once (so a path registered while the daemon is
/// down is queued on the next start). Also proves that the database can be read.
///
/// # Errors
/// [`DaemonError::WatchStore`] saying why the Nix database cannot be followed (e.g. no
/// permission to read it); [`DaemonError::Queue`]. The daemon then does not start.
pub(super) fn start_cursor(queue: &mut Queue, store: &LocalStore) -> Result<i64, DaemonError> {
    let end = store.last_valid_id().map_err(|e| {
        DaemonError::WatchStore(match e {
            // Its text is about `nix path-info`, which cannot list paths by registration.
            StoreError::Command(why) => why,
            e => format!("cannot read the Nix database: {e}"),
        })
    })?;
    match queue.watch_cursor()? {
        Some(cursor) => Ok(cursor),
        None => {
            queue.enqueue_watched(&[], end, queue::now_ms())?;
            tracing::info!(
                "watch-store: first start; following the store from its current end (ValidPaths id {end}); `narflow backfill` uploads what came before"
            );
            Ok(end)
        }
    }
}

/// Follows the store from `cursor` every [`POLL`] until `stop` is dropped (waiting on it,
/// so a shutdown stops the watcher at once).
pub(super) fn run(shared: &Shared, mode: WatchStore, mut cursor: i64, stop: &Receiver<()>) {
    let mut failing = false;
    loop {
        match poll(shared, mode, &mut cursor, stop) {
            Ok(_) if failing => {
                tracing::info!("watch-store: following the store again (at id {cursor})");
                failing = false;
            }
            Ok(_) => {}
            Err(e) => {
                // Once per outage, not once a second.
                if !failing {
                    tracing::warn!("watch-store: {e}; trying again every second");
                }
                failing = true;
            }
        }
        if !matches!(stop.recv_timeout(POLL), Err(RecvTimeoutError::Timeout)) {
            return;
        }
    }
}

/// Queues the store's new rows past `cursor`, window by window, until there are no more
/// (or `stop` is dropped); returns how many paths it queued.
fn poll(
    shared: &Shared,
    mode: WatchStore,
    cursor: &mut i64,
    stop: &Receiver<()>,
) -> Result<usize, WatchError> {
    let mut queued = 0;
    loop {
        let rows = shared.store.valid_after(*cursor, WINDOW)?;
        let Some(last) = rows.last().map(|r| r.id) else {
            // Ids only grow, so an end below the cursor means the newest paths were
            // collected (no row is missed by moving down), or the database is a new one
            // (its paths so far are treated as a first start treats the store's: a backfill
            // covers them). Either way following on from the store's end is right.
            let end = shared.store.last_valid_id()?;
            if end < *cursor {
                shared.enqueue_watched(&[], end)?;
                tracing::warn!(
                    "watch-store: the Nix database ends at id {end}, before the cursor {cursor}: its newest paths were garbage-collected, or it is a new database; following it from id {end} (paths registered before now are not queued: `narflow backfill` uploads them)"
                );
                *cursor = end;
            }
            return Ok(queued);
        };
        let paths = selected(&rows, mode, shared.store_dir());
        queued += shared.enqueue_watched(&paths, last)?;
        *cursor = last;
        if rows.len() < WINDOW || !matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
            return Ok(queued);
        }
    }
}

/// The full paths of the rows `mode` queues: with `built` only those built here; never a
/// `.drv` file.
fn selected(rows: &[ValidRow], mode: WatchStore, store_dir: &str) -> Vec<String> {
    rows.iter()
        .filter(|r| mode == WatchStore::All || r.ultimate)
        .filter(|r| !r.path.name().ends_with(".drv"))
        .map(|r| r.path.to_absolute(store_dir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::store_path::StorePath;
    use crate::store::db::testdb::{Row, TestDb};

    fn row(id: i64, name: &str, ultimate: bool) -> ValidRow {
        ValidRow {
            id,
            path: StorePath::from_absolute_path(
                &format!("/nix/store/{}-{name}", "0".repeat(32)),
                "/nix/store",
            )
            .unwrap(),
            registration_time: 0,
            ultimate,
        }
    }

    #[test]
    fn built_takes_what_was_built_here_all_takes_every_path_neither_takes_drv_files() {
        let rows = [
            row(1, "built", true),
            row(2, "added", false),
            row(3, "x.drv", false),
            row(4, "odd.drv", true),
        ];
        let names = |mode| {
            selected(&rows, mode, "/nix/store")
                .into_iter()
                .map(|p| p.rsplit_once('-').unwrap().1.to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(WatchStore::Built), ["built"]);
        assert_eq!(names(WatchStore::All), ["built", "added"]);
    }

    /// A daemon's shared state on the test database `db`, without a running daemon.
    fn shared_on(db: &TestDb, state: &std::path::Path) -> Shared {
        let (bell, _) = crossbeam_channel::bounded(1);
        Shared {
            queue: std::sync::Mutex::new(Queue::open(state).unwrap()),
            store: LocalStore::open("/nix/store", &db.path),
            state_dir: state.to_owned(),
            bell,
            stopping: Default::default(),
            in_flight: Default::default(),
            stats: Default::default(),
            metrics: Default::default(),
            started: std::time::Instant::now(),
            watch: Some(WatchStore::All),
            cache: std::sync::Weak::<crate::cache::null::NullCache>::new(),
            records: None,
        }
    }

    /// Registers `name` (a fresh store path) in `db`; returns its full path.
    fn register(db: &TestDb, i: usize, name: &str, ultimate: bool) -> String {
        let path = format!("/nix/store/{i:0>32}-{name}");
        let id = db.add(&Row {
            path: &path,
            hash: "sha256:00",
            ..Row::default()
        });
        if ultimate {
            db.conn
                .execute("UPDATE ValidPaths SET ultimate = 1 WHERE id = ?1", [id])
                .unwrap();
        }
        path
    }

    #[test]
    fn the_watcher_queues_new_rows_window_by_window_and_follows_a_database_that_shrinks() {
        let db = TestDb::new(true);
        let state = tempfile::tempdir().unwrap();
        let before = register(&db, 0, "before", true);
        let s = shared_on(&db, state.path());
        let start = start_cursor(&mut s.lock_queue(), &s.store).unwrap();
        // The first start begins at the end, and says so in the queue at once.
        assert_eq!(s.lock_queue().watch_cursor().unwrap(), Some(start));
        let n = WINDOW + 5;
        let new: Vec<String> = (1..=n)
            .map(|i| register(&db, i, &format!("p{i}"), i % 2 == 0))
            .collect();
        register(&db, n + 1, "x.drv", false);
        let (_keep, stop) = crossbeam_channel::bounded::<()>(0);
        let mut cursor = start;
        // More than one window: all read in one poll.
        assert_eq!(poll(&s, WatchStore::All, &mut cursor, &stop).unwrap(), n);
        let end = s.store.last_valid_id().unwrap();
        assert_eq!(cursor, end);
        let q = s.lock_queue();
        assert_eq!(q.watch_cursor().unwrap(), Some(end));
        assert_eq!(q.counts().unwrap().pending, n as u64);
        assert_eq!(q.state_of(&new[n - 1]).unwrap(), Some("pending"));
        assert_eq!(q.state_of(&before).unwrap(), None);
        drop(q);
        assert_eq!(s.metrics.watched_total(), n as u64);
        // Nothing new: nothing queued, nothing moved.
        assert_eq!(poll(&s, WatchStore::All, &mut cursor, &stop).unwrap(), 0);
        assert_eq!(cursor, end);
        // The newest rows are collected: the database ends before the cursor, which
        // follows it down; the next path (its id is past the old end) is queued.
        db.conn
            .execute("DELETE FROM ValidPaths WHERE id > ?1", [end - 3])
            .unwrap();
        assert_eq!(poll(&s, WatchStore::All, &mut cursor, &stop).unwrap(), 0);
        assert_eq!(cursor, end - 3);
        assert_eq!(s.lock_queue().watch_cursor().unwrap(), Some(end - 3));
        let built = register(&db, n + 2, "built", true);
        register(&db, n + 3, "added", false);
        assert_eq!(poll(&s, WatchStore::Built, &mut cursor, &stop).unwrap(), 1);
        assert_eq!(s.lock_queue().state_of(&built).unwrap(), Some("pending"));
    }

    #[test]
    fn a_store_without_a_readable_database_refuses_to_be_watched_saying_why() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        let store = LocalStore::open("/nix/store", &dir.path().join("no-db"));
        match start_cursor(&mut q, &store) {
            Err(e @ DaemonError::WatchStore(_)) => {
                let e = e.to_string();
                assert!(e.starts_with("--watch-store: "), "{e}");
                assert!(e.contains("read access to the Nix database"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // Nothing was written: a later start with a readable database is a first start.
        assert_eq!(q.watch_cursor().unwrap(), None);
    }
}
