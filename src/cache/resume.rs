//! The durable record of unfinished multipart uploads, so that a NAR interrupted by a
//! restart goes on where it stopped: its identity (what makes two runs' compressed streams
//! byte-identical), its upload on the server, and each acknowledged part with its blake3.
//! Beside them, the narinfos this machine wrote to a cache, each with the ETag the server
//! gave its PUT and the keys it was signed with, so that a later look at the cache that
//! lists the same ETag knows the narinfo unchanged without reading it.
//! This module owns the records and their SQLite tables; it never talks to a server (the
//! S3 cache decides what a record is worth, and when it ends).
use super::CacheError;
use crate::format::signing::VerifyingKey;
use rusqlite::{Connection, OpenFlags, params};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// What makes two runs' compressed NAR streams byte-identical: the same store path, the
/// same NarHash and the same compression settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NarIdentity {
    /// The full store path (`/nix/store/<hash>-<name>`).
    pub store_path: String,
    /// The NarHash as a narinfo writes it (`sha256:<nix32>`).
    pub nar_hash: String,
    /// The compression settings, as one string the pipeline builds
    /// (`crate::format::compression::CompressionSettings` rendered e.g. "zstd-3/chunk=4194304").
    pub compression: String,
}

/// One part the server acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedPart {
    pub number: i32,
    pub size: u64,
    pub blake3: [u8; 32],
    pub etag: String,
}

/// A multipart upload recorded as unfinished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedUpload {
    /// The cache it goes to (its URL as `BinaryCache::url` gives it).
    pub cache_url: String,
    pub identity: NarIdentity,
    /// The key the upload writes (a staging key) and its UploadId.
    pub key: String,
    pub upload_id: String,
    /// The part size the upload was started with (a resumed upload keeps it).
    pub part_size: u64,
    /// When it was started (Unix seconds).
    pub started_unix: i64,
    /// Acknowledged parts, by number.
    pub parts: Vec<RecordedPart>,
}

/// Who signed a narinfo: a digest of a set of public keys (their `<name>:<base64>` texts,
/// sorted and deduplicated), 16 bytes a record. Two sets are the same set of keys exactly
/// when their digests are equal (short of a collision of SHA-256's first 128 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SignerSet(pub [u8; 16]);

impl SignerSet {
    /// The set of `keys`, in whatever order and with whatever repetition.
    pub fn of<'a>(keys: impl IntoIterator<Item = &'a VerifyingKey>) -> Self {
        let mut texts: Vec<String> = keys.into_iter().map(VerifyingKey::to_string).collect();
        texts.sort_unstable();
        texts.dedup();
        let digest = crate::format::hash::Sha256::digest(texts.join("\n").as_bytes());
        let mut out = [0; 16];
        out.copy_from_slice(&digest.0[..16]);
        SignerSet(out)
    }
}

/// A narinfo this machine wrote to a cache ([`UploadJournal::narinfos_written`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenNarinfo {
    /// The 20 bytes its hash part stands for ([`super::NarinfoSet::key`]).
    pub hash: [u8; 20],
    /// The ETag the server answered its PUT with, as [`normalise_etag`] gives it.
    pub etag: String,
    /// The keys whose valid signatures the narinfo carried as written.
    pub signers: SignerSet,
}

/// An ETag as compared: without the quotes around it (S3 sends them; a listing's XML may
/// carry them or not) and without a weak validator's `W/`.
pub fn normalise_etag(etag: &str) -> &str {
    let e = etag.trim();
    let e = e.strip_prefix("W/").unwrap_or(e);
    e.strip_prefix('"')
        .and_then(|e| e.strip_suffix('"'))
        .unwrap_or(e)
}

/// Durable record of unfinished multipart uploads, and the record of narinfos written.
/// Every method about uploads returns only once what it wrote is durable (synced); the
/// narinfo record is not synced (a record lost to a crash costs a read of its narinfo,
/// never a wrong answer). Implementations: [`SqliteJournal`] (one file, or tables in the
/// daemon's queue database), and test stand-ins (which record no narinfos).
pub trait UploadJournal: Send + Sync + std::fmt::Debug {
    /// The recorded upload of `store_path` to `cache_url`, whatever its NarHash and
    /// compression (the caller compares the identity, and aborts a record that differs).
    fn find(&self, cache_url: &str, store_path: &str)
    -> Result<Option<RecordedUpload>, CacheError>;
    /// Records a new upload (no parts yet), replacing any record of the same store path
    /// and cache.
    fn started(&self, upload: &RecordedUpload) -> Result<(), CacheError>;
    /// Records one acknowledged part of the upload `upload_id` (replacing a part of that number).
    fn part_done(
        &self,
        cache_url: &str,
        upload_id: &str,
        part: &RecordedPart,
    ) -> Result<(), CacheError>;
    /// Forgets the upload (completed, aborted, or found gone on the server).
    fn forget(&self, cache_url: &str, upload_id: &str) -> Result<(), CacheError>;
    /// Every recorded upload of `cache_url` (for sweeps, status and cleanup).
    fn all(&self, cache_url: &str) -> Result<Vec<RecordedUpload>, CacheError>;
    /// Records narinfos written to the cache `cache` (the bucket and endpoint, not the
    /// URL: its options do not change what the bucket holds), each replacing the record
    /// of the same narinfo, in one transaction, not synced.
    fn narinfos_written(
        &self,
        _cache: &str,
        _written: &[WrittenNarinfo],
    ) -> Result<(), CacheError> {
        Ok(())
    }
    /// The record of each narinfo of `cache` whose hash part `hashes` holds, in order.
    fn written_narinfos(
        &self,
        _cache: &str,
        hashes: &[[u8; 20]],
    ) -> Result<Vec<Option<WrittenNarinfo>>, CacheError> {
        Ok(vec![None; hashes.len()])
    }
    /// Forgets the records of the narinfos of `cache` whose hash part `hashes` holds (found
    /// gone or rewritten by someone else), in one transaction, not synced.
    fn forget_narinfos(&self, _cache: &str, _hashes: &[[u8; 20]]) -> Result<(), CacheError> {
        Ok(())
    }
}

/// A multipart upload in flight in this process ([`super::BinaryCache::large_uploads`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UploadProgress {
    /// The store path, when the upload was begun with `begin_nar_resumable`.
    pub store_path: Option<String>,
    pub parts_done: u64,
    /// Parts expected in all (the compressed size is bounded by the NAR's).
    pub parts_total: u64,
    /// Bytes acknowledged (sent or resumed) and expected in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Of `bytes_done`, the bytes a restart did not send again.
    pub bytes_resumed: u64,
    /// Seconds since this upload (this run's part of it) started.
    pub seconds: f64,
}

/// The tables of the journal: one row per recorded upload, one per acknowledged part.
/// Their own names, so that they can live in a database that holds other tables (the
/// daemon's queue).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS multipart_uploads (
    cache_url TEXT NOT NULL,
    store_path TEXT NOT NULL,
    nar_hash TEXT NOT NULL,
    compression TEXT NOT NULL,
    key TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    part_size INTEGER NOT NULL,
    started INTEGER NOT NULL,
    PRIMARY KEY (cache_url, store_path)
);
CREATE UNIQUE INDEX IF NOT EXISTS multipart_uploads_id ON multipart_uploads (cache_url, upload_id);
CREATE TABLE IF NOT EXISTS multipart_parts (
    cache_url TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    size INTEGER NOT NULL,
    blake3 BLOB NOT NULL,
    etag TEXT NOT NULL,
    PRIMARY KEY (cache_url, upload_id, number)
);
CREATE TABLE IF NOT EXISTS narinfo_caches (
    id INTEGER PRIMARY KEY,
    cache TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS written_narinfos (
    cache INTEGER NOT NULL,
    hash BLOB NOT NULL,
    etag TEXT NOT NULL,
    signers BLOB NOT NULL,
    PRIMARY KEY (cache, hash)
) WITHOUT ROWID;";

/// An [`UploadJournal`] in a SQLite database file (its own, or one shared with other
/// tables such as the daemon's queue), in WAL mode with `synchronous=FULL`: each change is
/// fsynced before its method returns.
#[derive(Debug)]
pub struct SqliteJournal {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl SqliteJournal {
    /// Opens (creating) the journal in the database file `path`, adding its tables to a
    /// database that lacks them.
    ///
    /// # Errors
    /// [`CacheError::Config`] naming the file once, and what is wrong, when it cannot be
    /// opened or set up.
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let err = open_error(path);
        // NOFOLLOW: the daemon runs as root; a file planted as a symlink is refused.
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(&err)?;
        // WAL: other connections to the same file (the daemon's queue) are not blocked by
        // reads; FULL: a commit is fsynced before it returns.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(&err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(&err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(&err)?;
        conn.execute_batch(SCHEMA).map_err(&err)?;
        Ok(SqliteJournal {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, CacheError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn).map_err(error_for(&self.path))
    }
}

/// A SQLite error opening or setting up the journal `path`, naming the file once.
fn open_error(path: &Path) -> impl Fn(rusqlite::Error) -> CacheError + use<> {
    let path = path.to_owned();
    move |e| {
        let file = path.display().to_string();
        let what = e.to_string();
        // SQLite's own message of a failed open ends with the file's name.
        let what = what
            .strip_suffix(file.as_str())
            .and_then(|w| w.strip_suffix(": "))
            .unwrap_or(&what);
        CacheError::Config(format!("upload journal {file}: {what}"))
    }
}

/// A SQLite error as a [`CacheError::Io`] on the journal's file: a busy database or a
/// full disk is transient, anything else is not.
fn error_for(path: &Path) -> impl Fn(rusqlite::Error) -> CacheError + use<> {
    let path = path.to_owned();
    move |e| {
        use rusqlite::ErrorCode::*;
        let kind = match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked) => std::io::ErrorKind::ResourceBusy,
            Some(DiskFull) => std::io::ErrorKind::StorageFull,
            _ => std::io::ErrorKind::Other,
        };
        CacheError::Io {
            cache: path.display().to_string(),
            key: "multipart_uploads".to_owned(),
            source: std::io::Error::new(kind, e.to_string()),
        }
    }
}

/// Reads the uploads a query selects (its columns in [`SCHEMA`]'s order of
/// `multipart_uploads`), each with its parts.
fn read_uploads(
    conn: &Connection,
    sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<Vec<RecordedUpload>> {
    let mut uploads: Vec<RecordedUpload> = conn
        .prepare(sql)?
        .query_map(args, |r| {
            Ok(RecordedUpload {
                cache_url: r.get(0)?,
                identity: NarIdentity {
                    store_path: r.get(1)?,
                    nar_hash: r.get(2)?,
                    compression: r.get(3)?,
                },
                key: r.get(4)?,
                upload_id: r.get(5)?,
                part_size: r.get::<_, i64>(6)? as u64,
                started_unix: r.get(7)?,
                parts: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut parts = conn.prepare(
        "SELECT number, size, blake3, etag FROM multipart_parts
         WHERE cache_url = ?1 AND upload_id = ?2 ORDER BY number",
    )?;
    for u in &mut uploads {
        u.parts = parts
            .query_map(params![u.cache_url, u.upload_id], |r| {
                let hash: Vec<u8> = r.get(2)?;
                let blake3 = <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| {
                    rusqlite::Error::FromSqlConversionFailure(
                        2,
                        rusqlite::types::Type::Blob,
                        format!("a blake3 of {} bytes", hash.len()).into(),
                    )
                })?;
                Ok(RecordedPart {
                    number: r.get(0)?,
                    size: r.get::<_, i64>(1)? as u64,
                    blake3,
                    etag: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
    }
    Ok(uploads)
}

const UPLOAD_COLUMNS: &str =
    "cache_url, store_path, nar_hash, compression, key, upload_id, part_size, started";

impl UploadJournal for SqliteJournal {
    fn find(
        &self,
        cache_url: &str,
        store_path: &str,
    ) -> Result<Option<RecordedUpload>, CacheError> {
        self.with(|c| {
            Ok(read_uploads(
                c,
                &format!(
                    "SELECT {UPLOAD_COLUMNS} FROM multipart_uploads
                     WHERE cache_url = ?1 AND store_path = ?2"
                ),
                &[&cache_url, &store_path],
            )?
            .pop())
        })
    }

    fn started(&self, u: &RecordedUpload) -> Result<(), CacheError> {
        self.with(|c| {
            let tx = c.transaction()?;
            // The record it replaces, with its parts (and any of the same upload id).
            tx.execute(
                "DELETE FROM multipart_parts WHERE cache_url = ?1 AND upload_id IN
                     (SELECT upload_id FROM multipart_uploads
                      WHERE cache_url = ?1 AND (store_path = ?2 OR upload_id = ?3))",
                params![u.cache_url, u.identity.store_path, u.upload_id],
            )?;
            tx.execute(
                "DELETE FROM multipart_parts WHERE cache_url = ?1 AND upload_id = ?2",
                params![u.cache_url, u.upload_id],
            )?;
            tx.execute(
                "DELETE FROM multipart_uploads
                 WHERE cache_url = ?1 AND (store_path = ?2 OR upload_id = ?3)",
                params![u.cache_url, u.identity.store_path, u.upload_id],
            )?;
            tx.execute(
                &format!(
                    "INSERT INTO multipart_uploads ({UPLOAD_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ),
                params![
                    u.cache_url,
                    u.identity.store_path,
                    u.identity.nar_hash,
                    u.identity.compression,
                    u.key,
                    u.upload_id,
                    u.part_size as i64,
                    u.started_unix
                ],
            )?;
            let mut part = tx.prepare(
                "INSERT OR REPLACE INTO multipart_parts
                 (cache_url, upload_id, number, size, blake3, etag)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for p in &u.parts {
                part.execute(params![
                    u.cache_url,
                    u.upload_id,
                    p.number,
                    p.size as i64,
                    p.blake3.as_slice(),
                    p.etag
                ])?;
            }
            drop(part);
            tx.commit()
        })
    }

    /// A part of an upload not (or no longer) recorded is not recorded either.
    fn part_done(
        &self,
        cache_url: &str,
        upload_id: &str,
        p: &RecordedPart,
    ) -> Result<(), CacheError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO multipart_parts
                 (cache_url, upload_id, number, size, blake3, etag)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS
                     (SELECT 1 FROM multipart_uploads WHERE cache_url = ?1 AND upload_id = ?2)",
                params![
                    cache_url,
                    upload_id,
                    p.number,
                    p.size as i64,
                    p.blake3.as_slice(),
                    p.etag
                ],
            )
            .map(drop)
        })
    }

    fn forget(&self, cache_url: &str, upload_id: &str) -> Result<(), CacheError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM multipart_parts WHERE cache_url = ?1 AND upload_id = ?2",
                params![cache_url, upload_id],
            )?;
            tx.execute(
                "DELETE FROM multipart_uploads WHERE cache_url = ?1 AND upload_id = ?2",
                params![cache_url, upload_id],
            )?;
            tx.commit()
        })
    }

    fn all(&self, cache_url: &str) -> Result<Vec<RecordedUpload>, CacheError> {
        self.with(|c| {
            read_uploads(
                c,
                &format!(
                    "SELECT {UPLOAD_COLUMNS} FROM multipart_uploads
                     WHERE cache_url = ?1 ORDER BY started, store_path"
                ),
                &[&cache_url],
            )
        })
    }

    fn narinfos_written(&self, cache: &str, written: &[WrittenNarinfo]) -> Result<(), CacheError> {
        if written.is_empty() {
            return Ok(());
        }
        self.unsynced(|tx| {
            let id = Self::cache_id(tx, cache, true)?.expect("the cache was just recorded");
            let mut put = tx.prepare(
                "INSERT OR REPLACE INTO written_narinfos (cache, hash, etag, signers)
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for w in written {
                put.execute(params![
                    id,
                    w.hash.as_slice(),
                    w.etag,
                    w.signers.0.as_slice()
                ])?;
            }
            Ok(())
        })
    }

    fn written_narinfos(
        &self,
        cache: &str,
        hashes: &[[u8; 20]],
    ) -> Result<Vec<Option<WrittenNarinfo>>, CacheError> {
        use rusqlite::OptionalExtension;
        self.with(|c| {
            let Some(id) = Self::cache_id(c, cache, false)? else {
                return Ok(vec![None; hashes.len()]);
            };
            let mut get = c.prepare(
                "SELECT etag, signers FROM written_narinfos WHERE cache = ?1 AND hash = ?2",
            )?;
            hashes
                .iter()
                .map(|h| {
                    get.query_row(params![id, h.as_slice()], |r| {
                        let (etag, signers): (String, Vec<u8>) = (r.get(0)?, r.get(1)?);
                        // A row of another size is not ours to trust: no record.
                        Ok(<[u8; 16]>::try_from(signers.as_slice())
                            .ok()
                            .map(|s| WrittenNarinfo {
                                hash: *h,
                                etag,
                                signers: SignerSet(s),
                            }))
                    })
                    .optional()
                    .map(Option::flatten)
                })
                .collect()
        })
    }

    fn forget_narinfos(&self, cache: &str, hashes: &[[u8; 20]]) -> Result<(), CacheError> {
        if hashes.is_empty() {
            return Ok(());
        }
        self.unsynced(|tx| {
            let Some(id) = Self::cache_id(tx, cache, false)? else {
                return Ok(());
            };
            let mut del =
                tx.prepare("DELETE FROM written_narinfos WHERE cache = ?1 AND hash = ?2")?;
            for h in hashes {
                del.execute(params![id, h.as_slice()])?;
            }
            Ok(())
        })
    }
}

/// The narinfo record's SQL: a row per narinfo written, its cache by number (a cache's
/// name is stored once), about 95 bytes a row on disk with its key: a million narinfos
/// in some 95 MB.
impl SqliteJournal {
    /// The number of `cache` in `narinfo_caches`, made when `create`.
    fn cache_id(c: &Connection, cache: &str, create: bool) -> rusqlite::Result<Option<i64>> {
        use rusqlite::OptionalExtension;
        if create {
            c.execute(
                "INSERT OR IGNORE INTO narinfo_caches (cache) VALUES (?1)",
                params![cache],
            )?;
        }
        c.query_row(
            "SELECT id FROM narinfo_caches WHERE cache = ?1",
            params![cache],
            |r| r.get(0),
        )
        .optional()
    }

    /// Runs `f` in one transaction that is not synced on commit (WAL with
    /// `synchronous=NORMAL`: it survives a crash of the process, maybe not of the
    /// machine), then goes back to syncing every commit.
    fn unsynced(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
    ) -> Result<(), CacheError> {
        self.with(|c| {
            c.pragma_update(None, "synchronous", "NORMAL")?;
            let done = c.transaction().and_then(|tx| {
                f(&tx)?;
                tx.commit()
            });
            let restored = c.pragma_update(None, "synchronous", "FULL");
            done.and(restored)
        })
    }
}

/// Now, in Unix seconds.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CACHE: &str = "s3://b?endpoint=http://127.0.0.1:1";

    /// A file that cannot be a journal is named once, with what is wrong, also in the
    /// daemon's error.
    #[test]
    fn a_journal_that_cannot_be_opened_is_named_once() {
        let dir = tempfile::tempdir().unwrap();
        let name = dir.path().display().to_string();
        let not_a_db = dir.path().join("not-a-db");
        std::fs::write(&not_a_db, [0xa5; 4096]).unwrap();
        for (path, what) in [
            (dir.path().to_owned(), "unable to open database file"),
            (not_a_db, "file is not a database"),
        ] {
            let e = SqliteJournal::open(&path).unwrap_err();
            let daemon = crate::daemon::DaemonError::Journal {
                path: path.clone(),
                source: e,
            };
            let text = daemon.to_string();
            assert_eq!(text.matches(&name).count(), 1, "{text}");
            assert!(text.starts_with("upload journal "), "{text}");
            assert!(text.ends_with(what), "{text}");
        }
    }

    fn upload(path: &str, id: &str) -> RecordedUpload {
        RecordedUpload {
            cache_url: CACHE.into(),
            identity: NarIdentity {
                store_path: format!("/nix/store/{path}"),
                nar_hash: "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into(),
                compression: "zstd-3/chunk=4194304".into(),
            },
            key: format!(".narflow-staging/{id}"),
            upload_id: id.into(),
            part_size: 8 << 20,
            started_unix: 1_700_000_000,
            parts: Vec::new(),
        }
    }

    fn part(number: i32, byte: u8) -> RecordedPart {
        RecordedPart {
            number,
            size: 8 << 20,
            blake3: [byte; 32],
            etag: format!("\"etag-{number}-{byte}\""),
        }
    }

    #[test]
    fn records_parts_and_finds_them_by_store_path_and_cache() {
        let dir = tempfile::tempdir().unwrap();
        let j = SqliteJournal::open(&dir.path().join("resume.sqlite")).unwrap();
        let a = upload("aaaa-a", "id-a");
        j.started(&a).unwrap();
        assert_eq!(
            j.find(CACHE, &a.identity.store_path).unwrap(),
            Some(a.clone())
        );
        j.part_done(CACHE, "id-a", &part(2, 2)).unwrap();
        j.part_done(CACHE, "id-a", &part(1, 1)).unwrap();
        // Another acknowledgement of part 1 replaces it.
        j.part_done(CACHE, "id-a", &part(1, 9)).unwrap();
        let found = j.find(CACHE, &a.identity.store_path).unwrap().unwrap();
        assert_eq!(found.parts, [part(1, 9), part(2, 2)]);
        // Another cache, or another path, has no record.
        assert_eq!(j.find("s3://other", &a.identity.store_path).unwrap(), None);
        assert_eq!(j.find(CACHE, "/nix/store/bbbb-b").unwrap(), None);
        // A part of an upload nobody recorded is not kept.
        j.part_done(CACHE, "id-unknown", &part(1, 1)).unwrap();
        assert_eq!(j.all(CACHE).unwrap(), [found]);
    }

    #[test]
    fn a_new_upload_of_a_path_replaces_its_record_and_forget_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = SqliteJournal::open(&dir.path().join("resume.sqlite")).unwrap();
        let old = upload("aaaa-a", "id-old");
        j.started(&old).unwrap();
        j.part_done(CACHE, "id-old", &part(1, 1)).unwrap();
        let other = upload("bbbb-b", "id-b");
        j.started(&other).unwrap();
        let mut new = upload("aaaa-a", "id-new");
        new.identity.compression = "xz".into();
        j.started(&new).unwrap();
        assert_eq!(
            j.find(CACHE, &new.identity.store_path).unwrap(),
            Some(new.clone())
        );
        // The old upload's parts went with it: a late acknowledgement is not recorded.
        j.part_done(CACHE, "id-old", &part(2, 2)).unwrap();
        let mut all = j.all(CACHE).unwrap();
        all.sort_by(|a, b| a.upload_id.cmp(&b.upload_id));
        assert_eq!(all, [other.clone(), new.clone()]);
        j.forget(CACHE, "id-new").unwrap();
        assert_eq!(j.find(CACHE, &new.identity.store_path).unwrap(), None);
        assert_eq!(j.all(CACHE).unwrap(), [other]);
    }

    #[test]
    fn everything_recorded_is_there_after_the_journal_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resume.sqlite");
        let a = upload("aaaa-a", "id-a");
        {
            let j = SqliteJournal::open(&path).unwrap();
            j.started(&a).unwrap();
            j.part_done(CACHE, "id-a", &part(1, 1)).unwrap();
            j.part_done(CACHE, "id-a", &part(2, 2)).unwrap();
        }
        let j = SqliteJournal::open(&path).unwrap();
        let found = j.find(CACHE, &a.identity.store_path).unwrap().unwrap();
        assert_eq!(found.parts, [part(1, 1), part(2, 2)]);
        assert_eq!(found.key, a.key);
        assert_eq!(found.part_size, a.part_size);
    }

    /// The daemon keeps its journal in its queue database: the tables go beside the
    /// queue's, which stay as they were.
    #[test]
    fn it_shares_a_database_file_with_other_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite");
        let queue = Connection::open(&path).unwrap();
        queue
            .execute_batch(
                "PRAGMA journal_mode=WAL;
                 CREATE TABLE paths (path TEXT PRIMARY KEY);
                 INSERT INTO paths VALUES ('/nix/store/x');",
            )
            .unwrap();
        let j = SqliteJournal::open(&path).unwrap();
        j.started(&upload("aaaa-a", "id-a")).unwrap();
        let n: i64 = queue
            .query_row("SELECT count(*) FROM paths", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        let n: i64 = queue
            .query_row("SELECT count(*) FROM multipart_uploads", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    /// A narinfo's record is replaced when it is written again, kept per cache, there
    /// after the journal is opened again, and gone once forgotten; a set of signers is
    /// the same set in any order.
    #[test]
    fn a_narinfo_record_is_replaced_on_rewrite_and_kept_per_cache() {
        use crate::format::signing::SigningKey;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uploads.sqlite");
        let (a, b) = (
            SigningKey::from_seed("a-1", [1; 32]).verifying_key(),
            SigningKey::from_seed("b-1", [2; 32]).verifying_key(),
        );
        assert_eq!(SignerSet::of([&a, &b]), SignerSet::of([&b, &a, &b]));
        assert_ne!(SignerSet::of([&a]), SignerSet::of([&a, &b]));
        let w = |hash: u8, etag: &str| WrittenNarinfo {
            hash: [hash; 20],
            etag: etag.into(),
            signers: SignerSet::of([&a]),
        };
        {
            let j = SqliteJournal::open(&path).unwrap();
            j.narinfos_written("s3://b at x", &[w(1, "e1"), w(2, "e2")])
                .unwrap();
            j.narinfos_written("s3://b at x", &[w(1, "e3")]).unwrap();
            j.narinfos_written("s3://c at x", &[w(1, "e4")]).unwrap();
        }
        let j = SqliteJournal::open(&path).unwrap();
        let hashes = [[1; 20], [2; 20], [3; 20]];
        assert_eq!(
            j.written_narinfos("s3://b at x", &hashes).unwrap(),
            vec![Some(w(1, "e3")), Some(w(2, "e2")), None]
        );
        assert_eq!(
            j.written_narinfos("s3://c at x", &hashes).unwrap(),
            vec![Some(w(1, "e4")), None, None]
        );
        j.forget_narinfos("s3://b at x", &[[2; 20]]).unwrap();
        assert_eq!(
            j.written_narinfos("s3://b at x", &hashes).unwrap(),
            vec![Some(w(1, "e3")), None, None]
        );
        assert_eq!(
            j.written_narinfos("s3://d at x", &hashes).unwrap(),
            vec![None, None, None]
        );
        assert_eq!(normalise_etag("\"abc\""), "abc");
        assert_eq!(normalise_etag("W/\"abc\""), "abc");
        assert_eq!(normalise_etag("abc"), "abc");
    }
}
