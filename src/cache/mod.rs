//! Binary cache destinations behind one trait: where NARs, narinfos and `nix-cache-info`
//! go. This module owns object naming and durability; it never decides what to upload or
//! in which order (that is the pipeline's job).

pub mod file;
pub mod null;
pub mod s3;
pub mod url;

use crate::format::store_path::StorePath;
use std::io::Write;

/// Errors from a cache. [`CacheError::is_transient`] says whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// An I/O error on object `key` (or the cache root when `key` is empty).
    #[error("{cache}: {key}: {source}")]
    Io {
        cache: String,
        key: String,
        source: std::io::Error,
    },
    /// The cache cannot be used as configured (wrong StoreDir, bad URL, credentials
    /// refused, bucket missing, ...). Not retryable.
    #[error("{0}")]
    Config(String),
    /// A request to a remote cache failed (after retries when `transient`).
    #[error("{cache}: {key}: {message}")]
    Remote {
        cache: String,
        key: String,
        message: String,
        transient: bool,
    },
}

impl CacheError {
    /// True when the same request may succeed later (interrupted or timed-out I/O).
    pub fn is_transient(&self) -> bool {
        use std::io::ErrorKind::*;
        match self {
            CacheError::Io { source, .. } => {
                matches!(source.kind(), Interrupted | TimedOut | WouldBlock)
            }
            CacheError::Config(_) => false,
            CacheError::Remote { transient, .. } => *transient,
        }
    }
}

/// A NAR being uploaded. Bytes go in through `Write`; [`NarUpload::commit`] publishes them
/// under their final key. Dropping an upload without committing aborts it: nothing appears
/// under a final name.
pub trait NarUpload: Write + Send {
    /// Publishes the uploaded bytes as `key` (e.g. `nar/<FileHash>.nar.zst`).
    ///
    /// # Errors
    /// [`CacheError`]; the upload is aborted.
    fn commit(self: Box<Self>, key: &str) -> Result<(), CacheError>;
}

/// A binary cache.
///
/// Callers uphold Nix's closure invariant; implementations provide the durability it needs:
/// after [`BinaryCache::sync`] returns, every object written before it survives a crash.
pub trait BinaryCache: Send + Sync + std::fmt::Debug {
    /// The cache's URL, for messages.
    fn url(&self) -> &str;
    /// Creates `nix-cache-info` for `store_dir` if missing.
    ///
    /// # Errors
    /// [`CacheError::Config`] when the cache exists for another StoreDir.
    fn ensure_cache_info(&self, store_dir: &str) -> Result<(), CacheError>;
    /// Whether `<hash part>.narinfo` exists.
    fn has_narinfo(&self, path: &StorePath) -> Result<bool, CacheError>;
    /// [`BinaryCache::has_narinfo`] for many paths, in order. Remote caches answer these
    /// concurrently or with one listing; the default asks one at a time.
    fn has_narinfos(&self, paths: &[StorePath]) -> Result<Vec<bool>, CacheError> {
        paths.iter().map(|p| self.has_narinfo(p)).collect()
    }
    /// Whether an object exists (e.g. a NAR under its final key).
    fn has_object(&self, key: &str) -> Result<bool, CacheError>;
    /// Starts a NAR upload. `nar_size` (the uncompressed size) lets a remote cache choose
    /// how to upload it (one request, or parts of a size that fits any NAR).
    fn begin_nar(&self, nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError>;
    /// Writes `<hash part>.narinfo` atomically.
    fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), CacheError>;
    /// [`BinaryCache::put_narinfo`] for many narinfos, none of which depends on another
    /// (the caller orders dependent ones into separate calls). Remote caches write them
    /// concurrently; the default writes one at a time.
    fn put_narinfos(&self, narinfos: &[(StorePath, String)]) -> Result<(), CacheError> {
        narinfos
            .iter()
            .try_for_each(|(p, text)| self.put_narinfo(p, text))
    }
    /// How many NAR uploads may be finishing (committing) at once. A local directory
    /// commits with a rename, so 1; a remote cache hides per-request latency with more.
    fn upload_concurrency(&self) -> usize {
        1
    }
    /// Makes everything written so far durable.
    fn sync(&self) -> Result<(), CacheError>;
    /// Removes what interrupted uploads left behind (temporary files, staging objects,
    /// unfinished multipart uploads) that is older than `grace`, so that an upload still
    /// running elsewhere is never touched. Returns how many leftovers were removed.
    ///
    /// # Errors
    /// [`CacheError`] when the cache cannot be listed.
    fn sweep_orphans(&self, _grace: std::time::Duration) -> Result<u64, CacheError> {
        Ok(0)
    }
}

/// Opens the cache a URL names. `memory` is the push's memory budget
/// (`PushOptions::memory`), from which a remote cache sizes its upload buffers.
///
/// # Errors
/// [`CacheError::Config`] for a URL narflow cannot serve.
pub fn open(url: &url::CacheUrl, memory: u64) -> Result<Box<dyn BinaryCache>, CacheError> {
    match &url.location {
        url::CacheLocation::File(dir) => Ok(Box::new(file::FileCache::open(dir, &url.original)?)),
        url::CacheLocation::S3 { bucket } => Ok(Box::new(s3::S3Cache::open(bucket, url, memory)?)),
    }
}

/// Checks a cache's existing `nix-cache-info` (`text`) against the store it is being
/// filled from.
///
/// # Errors
/// [`CacheError::Config`] naming the cache (`url`) when the text does not parse or is for
/// another store directory.
pub(crate) fn check_cache_info(url: &str, text: &str, store_dir: &str) -> Result<(), CacheError> {
    let info = crate::format::cache_info::CacheInfo::parse(text)
        .map_err(|e| CacheError::Config(format!("{url}: {e}")))?;
    if info.store_dir != store_dir {
        return Err(CacheError::Config(format!(
            "{url}: the cache is for store {}, not {store_dir}",
            info.store_dir
        )));
    }
    Ok(())
}

/// The `nix-cache-info` a new cache for `store_dir` gets.
pub(crate) fn new_cache_info(store_dir: &str) -> String {
    crate::format::cache_info::CacheInfo {
        store_dir: store_dir.to_owned(),
        ..Default::default()
    }
    .render()
}

/// The narinfo object key of a store path.
pub fn narinfo_key(path: &StorePath) -> String {
    format!("{}.narinfo", path.hash_part())
}
