//! Resumable multipart uploads: the durable record of unfinished uploads
//! ([`UploadJournal`]), what identifies a NAR's compressed bytes ([`NarIdentity`]), and
//! what a cache reports of its large uploads in flight ([`UploadProgress`]). This module
//! never sends a request; the S3 cache reads and writes the journal.
//!
//! This copy carries the agreed interface only (and a `SqliteJournal` that records
//! nothing); the cache layer's own version replaces it.
use super::CacheError;
use std::path::Path;

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

/// Durable record of unfinished multipart uploads. Every method returns only once what it
/// wrote is durable (synced). Implementations: `SqliteJournal` (one file, or a table in
/// the daemon's queue database), and test stand-ins.
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
}

/// A large upload in flight, as a cache reports it ([`super::BinaryCache::large_uploads`]).
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

/// The journal kept in an SQLite file (its own tables; the daemon's queue database may
/// hold them).
#[derive(Debug)]
pub struct SqliteJournal {}

impl SqliteJournal {
    /// Opens (creating) the journal's tables in the SQLite file `path`.
    ///
    /// # Errors
    /// [`CacheError`] when the file cannot be opened or set up.
    pub fn open(_path: &Path) -> Result<SqliteJournal, CacheError> {
        Ok(SqliteJournal {})
    }
}

/// This copy records nothing.
impl UploadJournal for SqliteJournal {
    fn find(&self, _: &str, _: &str) -> Result<Option<RecordedUpload>, CacheError> {
        Ok(None)
    }
    fn started(&self, _: &RecordedUpload) -> Result<(), CacheError> {
        Ok(())
    }
    fn part_done(&self, _: &str, _: &str, _: &RecordedPart) -> Result<(), CacheError> {
        Ok(())
    }
    fn forget(&self, _: &str, _: &str) -> Result<(), CacheError> {
        Ok(())
    }
    fn all(&self, _: &str) -> Result<Vec<RecordedUpload>, CacheError> {
        Ok(Vec::new())
    }
}
