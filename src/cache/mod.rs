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
    /// Writes any other object (e.g. a `.ls` listing) atomically under `key`, with
    /// `content_type` where the cache keeps one. A cache that stores only NARs and
    /// narinfos refuses.
    ///
    /// # Errors
    /// [`CacheError`]; [`CacheError::Config`] from a cache that cannot store such objects.
    fn put_object(&self, key: &str, _bytes: &[u8], _content_type: &str) -> Result<(), CacheError> {
        Err(CacheError::Config(format!(
            "{}: this cache cannot store {key}",
            self.url()
        )))
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

/// Opens the cache a URL names.
///
/// # Errors
/// [`CacheError::Config`] for a URL narflow cannot serve.
pub fn open(url: &url::CacheUrl) -> Result<Box<dyn BinaryCache>, CacheError> {
    match &url.location {
        url::CacheLocation::File(dir) => Ok(Box::new(file::FileCache::open(dir, &url.original)?)),
        url::CacheLocation::S3 { bucket } => Ok(Box::new(s3::S3Cache::open(bucket, url)?)),
    }
}

/// What to write as `nix-cache-info`, given what the cache has (`existing`; `None` when it
/// has none): `None` when the file is right as it is.
///
/// A new cache gets `StoreDir`, `WantMassQuery` and `Priority`, the last two from the
/// cache URL's (`url`) `want-mass-query=` and `priority=` or else narflow's defaults. An
/// existing file is checked against `store_dir`, and rewritten only where the URL asks for
/// a value it does not have (other lines stay): the URL is the writer's explicit wish, and
/// without it a file keeps whatever it says. Two writers whose URLs disagree rewrite it in
/// turn; each rewrite is logged.
///
/// # Errors
/// [`CacheError::Config`] naming the cache when `existing` does not parse or is for
/// another store directory, or `url` is not a cache URL.
pub(crate) fn cache_info_to_write(
    url: &str,
    existing: Option<&str>,
    store_dir: &str,
) -> Result<Option<String>, CacheError> {
    use crate::format::cache_info::CacheInfo;
    let wanted = url::CacheUrl::parse(url)
        .map_err(|e| CacheError::Config(e.to_string()))?
        .cache_info_wanted();
    match existing {
        None => {
            let text = new_cache_info(store_dir);
            Ok(Some(CacheInfo::update_text(&text, &wanted).unwrap_or(text)))
        }
        Some(text) => {
            check_cache_info(url, text, store_dir)?;
            let update = CacheInfo::update_text(text, &wanted);
            if let Some(new) = &update {
                tracing::warn!(
                    "{url}: rewriting nix-cache-info as the URL's parameters ask: {:?} becomes {:?}",
                    text,
                    new
                );
            }
            Ok(update)
        }
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

/// The Content-Type of a NAR listing, as Nix sets it.
pub const NAR_LISTING_TYPE: &str = "application/json";

/// Writes `<hash part>.ls`, the listing of `path`'s NAR (Nix's `write-nar-listing`).
///
/// # Errors
/// As [`BinaryCache::put_object`].
pub fn put_nar_listing(
    cache: &dyn BinaryCache,
    path: &StorePath,
    listing: &crate::format::nar::listing::NarListing,
) -> Result<(), CacheError> {
    let key = format!("{}.ls", path.hash_part());
    cache.put_object(&key, listing.json(), NAR_LISTING_TYPE)
}
