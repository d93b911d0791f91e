//! Read-only access to the Nix database (schema 10):
//! `ValidPaths(id, path, hash 'sha256:<base16>', registrationTime, deriver, narSize, ultimate,
//! sigs, ca)`, `Refs(referrer, reference)`. Opened read-only with a busy timeout, never
//! `immutable=1` (that ignores the WAL and misses new paths).
//!
//! Owns one SQLite connection. Must never write to the database, and never hold a read
//! transaction longer than one [`StoreDb::path_infos`] call: a long-lived reader stops Nix's
//! checkpoints and lets its WAL grow.
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};

use super::{PathInfo, StoreError};
use crate::format::hash::Sha256;
use crate::format::signing::Signature;
use crate::format::store_path::StorePath;

/// How long a query waits on a lock before failing. Readers of a WAL database rarely wait,
/// but they do get `SQLITE_BUSY` while a writer (Nix registering paths, a garbage
/// collection) recovers or restarts the WAL; waiting rides that out, and the bound keeps a
/// wedged writer from hanging narflow forever.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// SQLite's page cache for this connection, in KiB (allocated as used, kept until the
/// connection closes). A long-lived reader (the daemon, a backfill of a million paths)
/// touches every page of the database in time, so this is a fixed share of the memory
/// budget, not a fraction of the database: misses are re-read from the kernel's page
/// cache. 8 MiB holds the upper levels of the path and `Refs` indexes of a store of
/// millions of paths and one batch's leaf pages.
pub const PAGE_CACHE_KIB: i64 = 8 * 1024;

/// One valid path by its full path. `path` is UNIQUE, so this is an index lookup.
const QUERY_INFO: &str =
    "SELECT id, hash, deriver, narSize, sigs, ca FROM ValidPaths WHERE path = ?1";
/// The ids of one path's references (answered from `Refs`' primary-key index alone).
const QUERY_REFS: &str = "SELECT reference FROM Refs WHERE referrer = ?1";
/// Valid paths past an id, in id (registration) order; `id` is the primary key.
const QUERY_AFTER: &str = "SELECT id, path, registrationTime, ultimate FROM ValidPaths \
     WHERE id > ?1 ORDER BY id LIMIT ?2";
/// How many valid paths (and their NAR bytes) lie past an id, registered at or after a
/// time, `.drv` files only when ?3 is 1: the total a backfill shows its progress against.
const QUERY_COUNT_AFTER: &str = "SELECT COUNT(*), COALESCE(SUM(narSize), 0) FROM ValidPaths \
     WHERE id > ?1 AND registrationTime >= ?2 AND (?3 OR path NOT LIKE '%.drv')";
/// One valid path's id by its full path (an index lookup).
const QUERY_ID: &str = "SELECT id FROM ValidPaths WHERE path = ?1";
/// A path by id, for references not seen yet in this batch.
const QUERY_PATH: &str = "SELECT path FROM ValidPaths WHERE id = ?1";

/// One row of [`StoreDb::valid_after`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRow {
    /// `ValidPaths.id`: Nix assigns ids in registration order.
    pub id: i64,
    pub path: StorePath,
    /// Seconds since the Unix epoch.
    pub registration_time: i64,
    /// Built on this machine (`ultimate = 1`), not substituted or copied in.
    pub ultimate: bool,
}

/// A read-only connection to a Nix database. `Sync`: queries from several threads take
/// turns on the one connection.
#[derive(Debug)]
pub struct StoreDb {
    store_dir: String,
    /// For error messages.
    db_path: String,
    conn: Mutex<Connection>,
}

impl StoreDb {
    /// Opens the Nix database at `db_path` (normally `/nix/var/nix/db/db.sqlite`) read-only,
    /// for the store at `store_dir` (normally `/nix/store`; the database holds full paths).
    ///
    /// # Errors
    /// [`StoreError::Db`] when the file cannot be opened or read (missing, no permission,
    /// its WAL cannot be opened read-only), is not SQLite, or is not a Nix database (no
    /// `ValidPaths`/`Refs` tables with the columns we read). The caller then falls back to
    /// `nix path-info`.
    pub fn open(store_dir: &str, db_path: &Path) -> Result<Self, StoreError> {
        let shown = db_path.display().to_string();
        let db_err = |source| StoreError::Db {
            path: shown.clone(),
            source,
        };
        // A plain file name, no URI: nothing can add `immutable=1` (or `mode=ro` tricks).
        let conn = Connection::open_with_flags(
            db_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
        conn.pragma_update(None, "cache_size", -PAGE_CACHE_KIB)
            .map_err(db_err)?;
        // Compiling the queries reads the schema, so every reason we cannot use this
        // database shows here rather than on the first query; they stay cached for later.
        conn.prepare_cached(QUERY_INFO).map_err(db_err)?;
        conn.prepare_cached(QUERY_REFS).map_err(db_err)?;
        conn.prepare_cached(QUERY_PATH).map_err(db_err)?;
        Ok(Self {
            store_dir: store_dir.to_owned(),
            db_path: shown,
            conn: Mutex::new(conn),
        })
    }

    /// The store directory the database's paths are in.
    pub fn store_dir(&self) -> &str {
        &self.store_dir
    }

    /// See [`super::LocalStore::path_infos`]. All paths are read in one read transaction
    /// (one consistent snapshot) on cached statements: one indexed lookup per path, one per
    /// path for its reference ids, and one per distinct reference (most paths share their
    /// references: glibc and friends are looked up and parsed once per call).
    ///
    /// # Errors
    /// [`StoreError::NotValid`] for the first path (in input order) that is not in the
    /// database; [`StoreError::Corrupt`] naming the path and column when a row cannot be
    /// parsed; [`StoreError::Db`] when SQLite fails (e.g. still locked after the busy
    /// timeout; retrying can help).
    pub fn path_infos(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
        // A panic while the lock was held leaves the connection usable: the transaction
        // was rolled back when it was dropped.
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn.unchecked_transaction().map_err(|e| self.db_err(e))?;
        let infos = {
            let mut info_stmt = tx.prepare_cached(QUERY_INFO).map_err(|e| self.db_err(e))?;
            let mut refs_stmt = tx.prepare_cached(QUERY_REFS).map_err(|e| self.db_err(e))?;
            let mut path_stmt = tx.prepare_cached(QUERY_PATH).map_err(|e| self.db_err(e))?;
            let mut by_id: HashMap<i64, StorePath> = HashMap::with_capacity(paths.len());
            let mut ref_ids: Vec<i64> = Vec::new();
            let mut infos = Vec::with_capacity(paths.len());
            let mut full = String::new();
            for path in paths {
                self.full_path_into(&mut full, path);
                let mut rows = info_stmt.query([&full]).map_err(|e| self.db_err(e))?;
                let Some(row) = rows.next().map_err(|e| self.db_err(e))? else {
                    return Err(StoreError::NotValid(full));
                };
                let (id, mut info) = self.parse_row(path, &full, row)?;
                drop(rows);
                by_id.entry(id).or_insert_with(|| path.clone());

                ref_ids.clear();
                let mut rows = refs_stmt.query([id]).map_err(|e| self.db_err(e))?;
                while let Some(row) = rows.next().map_err(|e| self.db_err(e))? {
                    let r = row.get_ref(0).ok().and_then(|v| v.as_i64().ok());
                    ref_ids.push(r.ok_or_else(|| {
                        corrupt(
                            &full,
                            "reference",
                            "Refs.reference is not an integer".into(),
                        )
                    })?);
                }
                drop(rows);
                for &r in &ref_ids {
                    if let Some(p) = by_id.get(&r) {
                        info.references.push(p.clone());
                        continue;
                    }
                    let mut rows = path_stmt.query([r]).map_err(|e| self.db_err(e))?;
                    let row = rows.next().map_err(|e| self.db_err(e))?.ok_or_else(|| {
                        corrupt(&full, "reference", format!("id {r} is not in ValidPaths"))
                    })?;
                    let p = text(row, 0)
                        .and_then(|s| self.parse_path(s.unwrap_or_default()))
                        .map_err(|reason| corrupt(&full, "reference", reason))?;
                    info.references.push(p.clone());
                    by_id.insert(r, p);
                }
                info.references.sort_unstable();
                infos.push(info);
            }
            infos
        };
        // Ends the read snapshot (nothing was written).
        tx.commit().map_err(|e| self.db_err(e))?;
        Ok(infos)
    }

    /// Writes `path`'s full path (as `ValidPaths` has it) into `full`, reusing its buffer.
    fn full_path_into(&self, full: &mut String, path: &StorePath) {
        full.clear();
        full.push_str(&self.store_dir);
        full.push('/');
        full.push_str(path.base_name());
    }

    /// See [`super::LocalStore::ids`].
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn ids(&self, paths: &[StorePath]) -> Result<Vec<Option<i64>>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn.unchecked_transaction().map_err(|e| self.db_err(e))?;
        let ids = {
            let mut stmt = tx.prepare_cached(QUERY_ID).map_err(|e| self.db_err(e))?;
            let mut ids = Vec::with_capacity(paths.len());
            let mut full = String::new();
            for path in paths {
                self.full_path_into(&mut full, path);
                let id: Option<i64> = stmt
                    .query_row([&full], |r| r.get(0))
                    .optional()
                    .map_err(|e| self.db_err(e))?;
                ids.push(id);
            }
            ids
        };
        tx.commit().map_err(|e| self.db_err(e))?;
        Ok(ids)
    }

    /// See [`super::LocalStore::derivation_outputs`].
    ///
    /// # Errors
    /// [`StoreError::NotValid`] when `drv` is not in the database; [`StoreError::Db`].
    pub fn derivation_outputs(&self, drv: &StorePath) -> Result<Vec<StorePath>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let full = drv.to_absolute(&self.store_dir);
        let mut q = conn
            .prepare_cached(
                "SELECT o.path FROM DerivationOutputs o JOIN ValidPaths v ON o.drv = v.id
                 WHERE v.path = ?1 ORDER BY o.path",
            )
            .map_err(|e| self.db_err(e))?;
        let rows: Vec<String> = q
            .query_map([&full], |r| r.get(0))
            .map_err(|e| self.db_err(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.db_err(e))?;
        if rows.is_empty() {
            // An error here (the database busy) is an error, not "not valid".
            let valid = conn
                .query_row("SELECT 1 FROM ValidPaths WHERE path = ?1", [&full], |_| {
                    Ok(())
                })
                .optional()
                .map_err(|e| self.db_err(e))?
                .is_some();
            if !valid {
                return Err(StoreError::NotValid(full));
            }
        }
        rows.iter()
            .map(|p| {
                self.parse_path(p)
                    .map_err(|reason| corrupt(&full, "output", reason))
            })
            .collect()
    }

    /// Up to `limit` valid paths registered after the one with id `after` (a
    /// `ValidPaths.id`; 0 for the start), in id order: the order Nix registered them in.
    /// One short read transaction; a path whose row cannot be parsed is an error naming it.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for a row whose path is not a store path; [`StoreError::Db`].
    pub fn valid_after(&self, after: i64, limit: usize) -> Result<Vec<ValidRow>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let mut stmt = conn
            .prepare_cached(QUERY_AFTER)
            .map_err(|e| self.db_err(e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = stmt
            .query(rusqlite::params![after, limit])
            .map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| self.db_err(e))? {
            let id: i64 = row.get(0).map_err(|e| self.db_err(e))?;
            let full: String = row.get(1).map_err(|e| self.db_err(e))?;
            let path = self
                .parse_path(&full)
                .map_err(|reason| corrupt(&full, "path", reason))?;
            let registration_time: i64 = row
                .get::<_, Option<i64>>(2)
                .map_err(|e| self.db_err(e))?
                .unwrap_or(0);
            let ultimate = row
                .get::<_, Option<i64>>(3)
                .map_err(|e| self.db_err(e))?
                .unwrap_or(0)
                != 0;
            out.push(ValidRow {
                id,
                path,
                registration_time,
                ultimate,
            });
        }
        Ok(out)
    }

    /// How many valid paths lie past the id `after` that were registered at or after
    /// `since` (seconds since the epoch), counting `.drv` files only with `derivations`,
    /// and the sum of their NAR sizes. One aggregate query (no rows are read out).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn count_after(
        &self,
        after: i64,
        since: i64,
        derivations: bool,
    ) -> Result<(u64, u64), StoreError> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.query_row(
            QUERY_COUNT_AFTER,
            rusqlite::params![after, since, derivations],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )
        .map(|(n, bytes)| (n.max(0) as u64, bytes.max(0) as u64))
        .map_err(|e| self.db_err(e))
    }

    /// The lowest id of a path registered at or after `since` (seconds since the epoch),
    /// `None` when there is none: where a walk of the paths registered since then starts.
    /// One aggregate query (a scan: `registrationTime` has no index).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn first_id_since(&self, since: i64) -> Result<Option<i64>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.query_row(
            "SELECT MIN(id) FROM ValidPaths WHERE registrationTime >= ?1",
            [since],
            |r| r.get(0),
        )
        .map_err(|e| self.db_err(e))
    }

    /// The highest `ValidPaths.id` (0 for an empty store): where a follower that should
    /// see only paths registered from now on starts.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn last_valid_id(&self) -> Result<i64, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.query_row("SELECT COALESCE(MAX(id), 0) FROM ValidPaths", [], |r| {
            r.get(0)
        })
        .map_err(|e| self.db_err(e))
    }

    fn db_err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db {
            path: self.db_path.clone(),
            source,
        }
    }

    fn parse_path(&self, s: &str) -> Result<StorePath, String> {
        StorePath::from_absolute_path(s, &self.store_dir).map_err(|e| e.to_string())
    }

    /// A `QUERY_INFO` row: the path's id and its info without references.
    fn parse_row(
        &self,
        path: &StorePath,
        full: &str,
        row: &Row<'_>,
    ) -> Result<(i64, PathInfo), StoreError> {
        let id = row
            .get_ref(0)
            .ok()
            .and_then(|v| v.as_i64().ok())
            .ok_or_else(|| corrupt(full, "id", "not an integer".into()))?;

        let hash = text(row, 1)
            .and_then(|s| s.ok_or_else(|| "missing (NULL)".to_owned()))
            .and_then(|s| Sha256::parse(s).map_err(|e| e.to_string()))
            .map_err(|reason| corrupt(full, "hash", reason))?;

        let deriver = text(row, 2)
            .and_then(|s| match s {
                None | Some("") => Ok(None),
                Some(s) => self.parse_path(s).map(Some),
            })
            .map_err(|reason| corrupt(full, "deriver", reason))?;

        let nar_size = match row.get_ref(3) {
            Ok(ValueRef::Integer(n)) => {
                u64::try_from(n).map_err(|_| corrupt(full, "narSize", format!("{n} < 0")))?
            }
            Ok(ValueRef::Null) => return Err(corrupt(full, "narSize", "missing (NULL)".into())),
            _ => return Err(corrupt(full, "narSize", "not an integer".into())),
        };

        let sigs = text(row, 4)
            .map_err(|reason| corrupt(full, "sigs", reason))?
            .map(|s| parse_sigs(full, [s]))
            .unwrap_or_default();

        let ca = text(row, 5)
            .map_err(|reason| corrupt(full, "ca", reason))?
            .filter(|s| !s.is_empty())
            .map(str::to_owned);

        Ok((
            id,
            PathInfo {
                path: path.clone(),
                nar_hash: hash,
                nar_size,
                references: Vec::new(),
                deriver,
                sigs,
                ca,
            },
        ))
    }
}

/// A text column that may be NULL.
fn text<'r>(row: &'r Row<'_>, idx: usize) -> Result<Option<&'r str>, String> {
    match row.get_ref(idx).map_err(|e| e.to_string())? {
        ValueRef::Null => Ok(None),
        ValueRef::Text(b) => std::str::from_utf8(b)
            .map(Some)
            .map_err(|_| "not UTF-8".to_owned()),
        _ => Err("not text".to_owned()),
    }
}

fn corrupt(path: &str, field: &'static str, reason: String) -> StoreError {
    StoreError::Corrupt {
        path: path.to_owned(),
        field,
        reason,
    }
}

/// Space-separated signatures as Nix stores them. One we cannot parse is dropped with a
/// warning: the path is still usable, and we add our own signature anyway.
pub(super) fn parse_sigs<'a>(
    path: &str,
    sigs: impl IntoIterator<Item = &'a str>,
) -> Vec<Signature> {
    sigs.into_iter()
        .flat_map(str::split_ascii_whitespace)
        .filter_map(|s| match Signature::parse(s) {
            Ok(sig) => Some(sig),
            Err(e) => {
                tracing::warn!("{path}: ignoring the unparseable signature {s:?}: {e}");
                None
            }
        })
        .collect()
}

/// A schema-10 Nix database built by tests (writable, in a temporary directory).
#[cfg(test)]
pub(crate) mod testdb {
    use rusqlite::{Connection, params};

    /// Nix 2.8's schema, as `sqlite3 /nix/var/nix/db/db.sqlite .schema` prints it.
    pub const SCHEMA: &str = "
        CREATE TABLE ValidPaths (
            id               integer primary key autoincrement not null,
            path             text unique not null,
            hash             text not null,
            registrationTime integer not null,
            deriver          text,
            narSize          integer,
            ultimate         integer,
            sigs             text,
            ca               text
        );
        CREATE TABLE Refs (
            referrer  integer not null,
            reference integer not null,
            primary key (referrer, reference),
            foreign key (referrer) references ValidPaths(id) on delete cascade,
            foreign key (reference) references ValidPaths(id) on delete restrict
        );
        CREATE INDEX IndexReferrer on Refs(referrer);
        CREATE INDEX IndexReference on Refs(reference);
        CREATE TABLE DerivationOutputs (
            drv  integer not null,
            id   text not null,
            path text not null,
            primary key (drv, id),
            foreign key (drv) references ValidPaths(id) on delete cascade
        );
        CREATE INDEX IndexDerivationOutputs on DerivationOutputs(path);";

    #[derive(Debug)]
    pub struct TestDb {
        pub dir: tempfile::TempDir,
        pub path: std::path::PathBuf,
        /// The writer, like a running Nix.
        pub conn: Connection,
    }

    /// A row to insert; `None` columns are NULL.
    #[derive(Debug, Clone, Default)]
    pub struct Row<'a> {
        pub path: &'a str,
        pub hash: &'a str,
        pub deriver: Option<&'a str>,
        pub nar_size: Option<i64>,
        pub sigs: Option<&'a str>,
        pub ca: Option<&'a str>,
        /// Full paths, inserted earlier (or `path` itself).
        pub refs: &'a [&'a str],
    }

    impl TestDb {
        pub fn new(wal: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db.sqlite");
            let conn = Connection::open(&path).unwrap();
            if wal {
                let mode: String = conn
                    .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(mode, "wal");
                // Keep everything in the WAL, as a busy Nix does between checkpoints.
                conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
            }
            conn.execute_batch(SCHEMA).unwrap();
            Self { dir, path, conn }
        }

        pub fn add(&self, row: &Row<'_>) -> i64 {
            add(&self.conn, row)
        }
    }

    pub fn add(conn: &Connection, row: &Row<'_>) -> i64 {
        conn.prepare_cached(
            "INSERT INTO ValidPaths (path, hash, registrationTime, deriver, narSize, sigs, ca)
             VALUES (?1, ?2, 1700000000, ?3, ?4, ?5, ?6)",
        )
        .unwrap()
        .execute(params![
            row.path,
            row.hash,
            row.deriver,
            row.nar_size,
            row.sigs,
            row.ca
        ])
        .unwrap();
        let id = conn.last_insert_rowid();
        for r in row.refs {
            conn.prepare_cached(
                "INSERT INTO Refs (referrer, reference)
                 SELECT ?1, id FROM ValidPaths WHERE path = ?2",
            )
            .unwrap()
            .execute(params![id, r])
            .unwrap();
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::testdb::{Row, TestDb};
    use super::*;
    use crate::store::LocalStore;

    const HASH: &str = "sha256:10551daed7fa467d0b58826e7eb9a0f2af7d693de319f2ef775fffcda244b9f6";
    const A: &str = "/nix/store/qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-a";
    const B: &str = "/nix/store/9zfkprp7xigl4ny63bvmiva5p5sk290q-b";
    const C: &str = "/nix/store/nv3v6fjvj5dhh814srann0mh8hw0g41v-c";
    const C_DRV: &str = "/nix/store/mclgkg09ls67lzyidmax66nyy9sc0hh7-c.drv";
    const MISSING: &str = "/nix/store/00000000000000000000000000000000-missing";

    fn sp(full: &str) -> StorePath {
        StorePath::from_absolute_path(full, "/nix/store").unwrap()
    }

    fn row(path: &'static str) -> Row<'static> {
        Row {
            path,
            hash: HASH,
            nar_size: Some(120),
            ..Row::default()
        }
    }

    /// a <- b <- c (c also refers to itself), c has a deriver and a CA; b's deriver is "".
    fn chain(wal: bool) -> TestDb {
        let db = TestDb::new(wal);
        db.add(&Row {
            ca: Some("fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h"),
            ..row(A)
        });
        db.add(&Row {
            deriver: Some(""),
            ca: Some(""),
            refs: &[A],
            ..row(B)
        });
        db.add(&Row {
            deriver: Some(C_DRV),
            nar_size: Some(4096),
            sigs: Some(""),
            refs: &[C, B, A],
            ..row(C)
        });
        db
    }

    fn open(db: &TestDb) -> StoreDb {
        StoreDb::open("/nix/store", &db.path).unwrap()
    }

    #[test]
    fn valid_after_lists_rows_in_registration_order_past_the_cursor() {
        let db = chain(false);
        db.conn
            .execute("UPDATE ValidPaths SET ultimate = 1 WHERE path = ?1", [B])
            .unwrap();
        let store = open(&db);
        let all = store.valid_after(0, 10).unwrap();
        let paths: Vec<StorePath> = all.iter().map(|r| r.path.clone()).collect();
        assert_eq!(paths, vec![sp(A), sp(B), sp(C)]);
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(
            all.iter().map(|r| r.ultimate).collect::<Vec<_>>(),
            [false, true, false]
        );
        assert_eq!(all[0].registration_time, 1_700_000_000);
        let rest = store.valid_after(all[0].id, 1).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].path, sp(B));
        assert_eq!(store.last_valid_id().unwrap(), all[2].id);
        assert!(store.valid_after(all[2].id, 10).unwrap().is_empty());
    }

    #[test]
    fn count_after_counts_past_the_cursor_since_a_time_and_drvs_on_request() {
        let db = chain(false);
        db.add(&Row {
            nar_size: Some(100),
            ..row(C_DRV)
        });
        db.conn
            .execute(
                "UPDATE ValidPaths SET registrationTime = 1800000000 WHERE path = ?1",
                [C],
            )
            .unwrap();
        let store = open(&db);
        let ids: Vec<i64> = store
            .valid_after(0, 10)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        let a_size = store.path_infos(&[sp(A)]).unwrap()[0].nar_size;
        let b_size = store.path_infos(&[sp(B)]).unwrap()[0].nar_size;
        assert_eq!(
            store.count_after(0, 0, false).unwrap(),
            (3, a_size + b_size + 4096)
        );
        assert_eq!(
            store.count_after(0, 0, true).unwrap(),
            (4, a_size + b_size + 4096 + 100)
        );
        assert_eq!(
            store.count_after(ids[0], 0, false).unwrap(),
            (2, b_size + 4096)
        );
        assert_eq!(
            store.count_after(0, 1_800_000_000, true).unwrap(),
            (1, 4096)
        );
        assert_eq!(store.count_after(ids[3], 0, true).unwrap(), (0, 0));
        assert_eq!(store.first_id_since(1_800_000_000).unwrap(), Some(ids[2]));
        assert_eq!(store.first_id_since(0).unwrap(), Some(ids[0]));
        assert_eq!(store.first_id_since(1_900_000_000).unwrap(), None);
    }

    #[test]
    fn reads_rows_in_input_order() {
        let db = chain(false);
        let store = open(&db);
        let infos = store.path_infos(&[sp(C), sp(A), sp(C)]).unwrap();
        let hash = Sha256::parse(HASH).unwrap();
        let mut c_refs = vec![sp(A), sp(B), sp(C)];
        c_refs.sort();
        let c = PathInfo {
            path: sp(C),
            nar_hash: hash,
            nar_size: 4096,
            references: c_refs,
            deriver: Some(sp(C_DRV)),
            sigs: Vec::new(),
            ca: None,
        };
        let a = PathInfo {
            path: sp(A),
            nar_hash: hash,
            nar_size: 120,
            references: Vec::new(),
            deriver: None,
            sigs: Vec::new(),
            ca: Some("fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h".into()),
        };
        assert_eq!(infos, [c.clone(), a, c]);
        let b = &store.path_infos(&[sp(B)]).unwrap()[0];
        assert_eq!(
            (&b.deriver, &b.ca, &b.references),
            (&None, &None, &vec![sp(A)])
        );
        assert!(store.path_infos(&[]).unwrap().is_empty());
    }

    #[test]
    fn missing_path_is_not_valid_and_named() {
        let db = chain(false);
        let store = open(&db);
        let other = "/nix/store/11111111111111111111111111111111-also-missing";
        match store.path_infos(&[sp(A), sp(MISSING), sp(other)]) {
            Err(StoreError::NotValid(p)) => assert_eq!(p, MISSING),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn bad_rows_are_corrupt_naming_path_and_field() {
        let db = chain(false);
        let p = |i: usize| -> &'static str {
            [
                "/nix/store/21111111111111111111111111111111-bad-hash",
                "/nix/store/31111111111111111111111111111111-bad-deriver",
                "/nix/store/41111111111111111111111111111111-null-size",
                "/nix/store/51111111111111111111111111111111-negative-size",
                "/nix/store/61111111111111111111111111111111-bad-ref",
            ][i]
        };
        db.add(&Row {
            hash: "sha256:xyz",
            ..row(p(0))
        });
        db.add(&Row {
            deriver: Some("/elsewhere/x.drv"),
            ..row(p(1))
        });
        db.add(&Row {
            nar_size: None,
            ..row(p(2))
        });
        db.add(&Row {
            nar_size: Some(-1),
            ..row(p(3))
        });
        let bad_ref = db.add(&row(p(4)));
        db.conn
            .execute(
                "INSERT INTO ValidPaths (path, hash, registrationTime, narSize)
                 VALUES ('/nix/store/not-a-store-path', 'x', 0, 0)",
                [],
            )
            .unwrap();
        db.conn
            .execute(
                "INSERT INTO Refs VALUES (?1, last_insert_rowid())",
                [bad_ref],
            )
            .unwrap();
        let store = open(&db);
        for (i, field) in ["hash", "deriver", "narSize", "narSize", "reference"]
            .into_iter()
            .enumerate()
        {
            match store.path_infos(&[sp(A), sp(p(i))]) {
                Err(StoreError::Corrupt { path, field: f, .. }) => {
                    assert_eq!((path.as_str(), f), (p(i), field));
                }
                r => panic!("{}: {r:?}", p(i)),
            }
        }
        let dangling = "/nix/store/a1111111111111111111111111111111-dangling-ref";
        let id = db.add(&row(dangling));
        // Only a corrupt database has this; the bundled SQLite enforces foreign keys.
        db.conn.pragma_update(None, "foreign_keys", false).unwrap();
        db.conn
            .execute("INSERT INTO Refs VALUES (?1, 999999)", [id])
            .unwrap();
        match store.path_infos(&[sp(dangling)]) {
            Err(StoreError::Corrupt {
                path,
                field,
                reason,
            }) => {
                assert_eq!((path.as_str(), field), (dangling, "reference"));
                assert!(reason.contains("999999"), "{reason}");
            }
            r => panic!("{r:?}"),
        }
        let e = store.path_infos(&[sp(p(0))]).unwrap_err().to_string();
        assert!(
            e.contains(p(0)) && e.contains("hash") && e.contains("sha256:xyz"),
            "{e}"
        );
    }

    /// Needs `Signature::parse` (src/format/signing.rs).
    #[test]
    fn signatures_parsed_and_bad_ones_dropped() {
        let db = chain(false);
        let sig = "exp-1:94rROnOPCqq2vDnjrLvWRNL/57w3rvHVPrR0LfL4pF6V5V/n9IHAnHkuFiENZMH9iJUtsmnAG4E7dcL6e35BDQ==";
        let signed = "/nix/store/71111111111111111111111111111111-signed";
        db.add(&Row {
            sigs: Some(&format!("{sig} not-a-signature  {sig}")),
            ..row(signed)
        });
        let store = open(&db);
        let info = &store.path_infos(&[sp(signed)]).unwrap()[0];
        let parsed = Signature::parse(sig).unwrap();
        assert_eq!(parsed.key_name, "exp-1");
        assert_eq!(info.sigs, [parsed.clone(), parsed]);
    }

    #[test]
    fn ids_are_the_registration_ids_and_none_for_paths_not_valid() {
        let db = chain(true);
        let store = open(&db);
        let rows = store.valid_after(0, 100).unwrap();
        assert!(rows.len() >= 2);
        let mut paths: Vec<StorePath> = rows.iter().rev().map(|r| r.path.clone()).collect();
        paths.push(sp("/nix/store/00000000000000000000000000000000-gone"));
        let ids = store.ids(&paths).unwrap();
        let want: Vec<Option<i64>> = rows
            .iter()
            .rev()
            .map(|r| Some(r.id))
            .chain([None])
            .collect();
        assert_eq!(ids, want);
    }

    #[test]
    fn the_page_cache_is_a_fixed_size() {
        let db = chain(true);
        let store = open(&db);
        let conn = store.conn.lock().unwrap();
        let kib: i64 = conn
            .query_row("PRAGMA cache_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kib, -PAGE_CACHE_KIB);
    }

    /// The `immutable=1` trap: rows a writer has committed to the WAL but not checkpointed
    /// into the main file must be seen, both when opening and on later queries.
    #[test]
    fn sees_rows_still_in_the_wal() {
        let db = chain(true);
        let store = open(&db);
        assert!(store.path_infos(&[sp(MISSING)]).is_err());
        let late = "/nix/store/81111111111111111111111111111111-late";
        db.add(&Row {
            refs: &[C],
            ..row(late)
        });
        let wal = db.dir.path().join("db.sqlite-wal");
        assert!(
            std::fs::metadata(&wal).unwrap().len() > 0,
            "rows are in the WAL"
        );
        let infos = store.path_infos(&[sp(late)]).unwrap();
        assert_eq!(infos[0].references, [sp(C)]);
        let fresh = open(&db);
        assert_eq!(fresh.path_infos(&[sp(late)]).unwrap(), infos);
        let closure = LocalStore::Db(fresh).closure(&[sp(late)]).unwrap();
        assert_eq!(closure.len(), 4);
    }

    #[test]
    fn closure_is_complete_and_ordered() {
        let db = chain(false);
        let d = "/nix/store/91111111111111111111111111111111-d";
        db.add(&Row {
            refs: &[A],
            ..row(d)
        });
        let store = LocalStore::open("/nix/store", &db.path);
        assert!(matches!(store, LocalStore::Db(_)));
        let paths: Vec<StorePath> = store
            .closure(&[sp(d), sp(C), sp(d)])
            .unwrap()
            .into_iter()
            .map(|i| i.path)
            .collect();
        // After a, both b and d are ready: b goes first (c waits for it; nothing waits
        // for d), then d ("911…") sorts before c ("nv3…").
        assert_eq!(paths, [sp(A), sp(B), sp(d), sp(C)]);
        match store.closure(&[sp(A), sp(MISSING)]) {
            Err(StoreError::NotValid(p)) => assert_eq!(p, MISSING),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn unusable_files_fail_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sqlite");
        let garbage = dir.path().join("garbage.sqlite");
        std::fs::write(&garbage, vec![b'x'; 8192]).unwrap();
        let other = dir.path().join("other.sqlite");
        rusqlite::Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        for f in [&missing, &garbage, &other] {
            let e = StoreDb::open("/nix/store", f).unwrap_err();
            assert!(matches!(e, StoreError::Db { .. }), "{f:?}: {e:?}");
            assert!(e.to_string().contains(&f.display().to_string()), "{e}");
            assert!(matches!(
                LocalStore::open("/nix/store", f),
                LocalStore::Command(_)
            ));
        }
        assert!(!missing.exists(), "opening must not create the file");
    }

    #[test]
    fn store_db_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<StoreDb>();
        check::<LocalStore>();
    }
}
