//! Binary cache destinations behind one trait: where NARs, narinfos and `nix-cache-info`
//! go. This module owns object naming and durability; it never decides what to upload or
//! in which order (that is the pipeline's job).

#[cfg(test)]
pub(crate) mod fault;
pub mod file;
pub mod gc_marker;
pub mod null;
pub(crate) mod owned;
pub mod rate;
pub mod resume;
pub mod s3;
pub mod url;

use crate::format::narinfo::NarInfo;
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
    /// The cache could not be reached at all, even after retries (its first request of a
    /// run failed): nothing can go up now, but it may come back. `narflow push` treats it
    /// like a configuration error (exit 2); the daemon retries with its usual backoff.
    #[error("{0}")]
    Unreachable(String),
    /// A narinfo was not named because its NAR is not in the cache at its FileSize: a
    /// failed write, sync or rename lost it. Uploading the path again mends it.
    #[error(
        "{cache}: {narinfo}: not published: its NAR {nar} is not in the cache (a failed write or sync lost it); the path goes up again"
    )]
    NarLost {
        cache: String,
        narinfo: String,
        nar: String,
    },
    /// A narinfo write (or a retry of one) was not sent: it would have started later than
    /// gc's protocol allows after its wave read the gc marker
    /// ([`BinaryCache::publish_narinfos_by`]). Uploading the path again mends it.
    #[error(
        "{cache}: {key}: not written: too late after its wave read the gc marker {marker} (the path goes up again on a retry)",
        marker = gc_marker::MARKER_KEY
    )]
    Late { cache: String, key: String },
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
    /// True when the same request may succeed later: what heals by itself (a full disk,
    /// a quota, timeouts, a dropped connection, 5xx, throttling); false for what needs a
    /// person (permissions, a missing bucket, a bad configuration).
    pub fn is_transient(&self) -> bool {
        match self {
            CacheError::Io { source, .. } => io_is_transient(source),
            CacheError::Config(_) => false,
            CacheError::Unreachable(_) | CacheError::NarLost { .. } | CacheError::Late { .. } => {
                true
            }
            CacheError::Remote { transient, .. } => *transient,
        }
    }
}

/// Whether an I/O error may pass by itself: the one rule for every file and socket
/// operation. A full disk or quota frees up, an interrupted or timed-out call or a dropped
/// connection may go through next time, and so may an `EIO` (a flaky disk or network file
/// system; a dead one keeps failing, and each failure is reported). Permissions, a
/// read-only file system or a missing directory need a person.
pub fn io_is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        Interrupted
            | TimedOut
            | WouldBlock
            | StorageFull
            | QuotaExceeded
            | ResourceBusy
            | ConnectionReset
            | ConnectionAborted
            | ConnectionRefused
            | NotConnected
            | BrokenPipe
            | HostUnreachable
            | NetworkUnreachable
            | NetworkDown
            | UnexpectedEof
    ) || rustix::io::Errno::from_io_error(e) == Some(rustix::io::Errno::IO)
}

/// What publishing one narinfo of a wave came to: [`Merged`], or the error that kept it
/// from being named (its NAR is not in the cache), while the rest of the wave went on.
pub type Published = Result<Merged, CacheError>;

/// A NAR being uploaded (or another object, [`BinaryCache::begin_object`]). Bytes go in
/// through `Write`; [`NarUpload::commit`] publishes them under their final key. Dropping an
/// upload without committing aborts it (but for a resumable one a journal records, which
/// stays for the next run: [`BinaryCache::begin_nar_resumable`]): nothing appears under a
/// final name.
pub trait NarUpload: Write + Send {
    /// Every byte of the NAR is written; `commit` or a drop follows, on this thread or
    /// another. A cache that reserves memory for the bytes it buffers (S3) stops counting
    /// them as held by a writer that could still add to them, so other uploads wait for
    /// them to be released instead of going beyond the memory. No write may follow.
    fn written(&mut self);
    /// Whether sending the bytes costs no more than asking whether an object is already
    /// under the final key: one request either way (a NAR that goes up in one PutObject).
    /// Asked once every byte is written; the sink then commits without looking first (the
    /// same FileHash names the same bytes, so an object there is replaced by itself).
    fn resend_is_cheap(&self) -> bool {
        false
    }
    /// Publishes the uploaded bytes as `key` (e.g. `nar/<FileHash>.nar.zst`): at once, or
    /// (a NAR in a local directory, which batches durability) no later than the next
    /// [`BinaryCache::put_narinfos`] or [`BinaryCache::sync`], and only once the bytes are
    /// durable.
    ///
    /// # Errors
    /// [`CacheError`]; the upload is aborted.
    fn commit(self: Box<Self>, key: &str) -> Result<(), CacheError>;
    /// Bytes written so far that go to the cache without being sent (parts of a resumed
    /// upload that the server has): a wrapper that charges bytes sent uncharges these.
    fn resumed_bytes(&self) -> u64 {
        0
    }
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
    /// The size of an object in bytes, or `None` when it does not exist.
    fn object_size(&self, key: &str) -> Result<Option<u64>, CacheError>;
    /// The text of `<hash part>.narinfo`, or `None` when there is none. Text that is not
    /// UTF-8 comes back lossily converted (it then fails to parse: a damaged narinfo).
    fn get_narinfo(&self, path: &StorePath) -> Result<Option<String>, CacheError>;
    /// [`BinaryCache::get_narinfo`] for many paths, in order. Remote caches ask
    /// concurrently; the default asks one at a time.
    fn get_narinfos(&self, paths: &[StorePath]) -> Result<Vec<Option<String>>, CacheError> {
        paths.iter().map(|p| self.get_narinfo(p)).collect()
    }
    /// A look at the cache that reads what it finds: for each of `paths` whose narinfo
    /// [`BinaryCache::has_narinfos`] would find, its text, or (a cache that records what
    /// it writes, `OpenOptions::journal`) that it is unchanged since this machine wrote it
    /// ([`FoundNarinfo::Unchanged`]); `None` for the others, in order. The default asks
    /// `has_narinfos`, then reads the narinfos found; a remote cache reads each as soon as
    /// it is found (S3: a GET answers what a HEAD would, and a listing's pages are read
    /// while the next page is asked for, but for a narinfo listed with the ETag recorded
    /// when it was written).
    ///
    /// # Errors
    /// The first [`CacheError`].
    fn find_narinfos(&self, paths: &[StorePath]) -> Result<Vec<Option<FoundNarinfo>>, CacheError> {
        let present = self.has_narinfos(paths)?;
        let found: Vec<StorePath> = paths
            .iter()
            .zip(&present)
            .filter(|(_, there)| **there)
            .map(|(p, _)| p.clone())
            .collect();
        let mut texts = self.get_narinfos(&found)?.into_iter();
        Ok(present
            .into_iter()
            .map(|there| {
                if there {
                    texts.next().flatten().map(FoundNarinfo::Text)
                } else {
                    None
                }
            })
            .collect())
    }
    /// The text of a small object (a narinfo, the gc marker), or `None` when there is none;
    /// text that is not UTF-8 comes back lossily converted.
    fn get_text(&self, key: &str) -> Result<Option<String>, CacheError>;
    /// Opens object `key` for reading, streamed (a NAR: never read whole into memory), or
    /// `None` when there is none. A cache that cannot read objects back refuses.
    ///
    /// # Errors
    /// [`CacheError`]; [`CacheError::Config`] from a cache that cannot read objects.
    fn read_object(&self, key: &str) -> Result<Option<Box<dyn std::io::Read + Send>>, CacheError> {
        Err(CacheError::Config(format!(
            "{}: this cache cannot read {key} back",
            self.url()
        )))
    }
    /// Starts a NAR upload. `nar_size` (the uncompressed size) lets a remote cache choose
    /// how to upload it (one request, or parts of a size that fits any NAR).
    fn begin_nar(&self, nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError>;
    /// [`BinaryCache::begin_nar`] for the NAR `identity` names, resumable: with a journal
    /// (`OpenOptions::journal`), a remote cache records the upload and each acknowledged
    /// part, and a later upload of the same identity sends only the parts the server lacks
    /// or that differ. Dropped uncommitted, a resumable upload is not aborted: it stays
    /// recorded for the next run. A cache that cannot resume begins a plain upload.
    fn begin_nar_resumable(
        &self,
        nar_size: u64,
        _identity: &resume::NarIdentity,
    ) -> Result<Box<dyn NarUpload>, CacheError> {
        self.begin_nar(nar_size)
    }
    /// Ends a recorded upload: aborts it on the server (one that is gone counts as
    /// aborted), deletes its staging object if any, and forgets it in the journal.
    ///
    /// # Errors
    /// [`CacheError`] when the server or the journal fails; the record then stays.
    fn abort_recorded(&self, _upload: &resume::RecordedUpload) -> Result<(), CacheError> {
        Ok(())
    }
    /// Every multipart upload in flight in this process, with its progress.
    fn large_uploads(&self) -> Vec<resume::UploadProgress> {
        Vec::new()
    }
    /// Bytes not sent again because a recorded part matched, since the cache was opened.
    fn resumed_bytes(&self) -> u64 {
        0
    }
    /// Writes `<hash part>.narinfo` atomically, as [`BinaryCache::put_narinfos`] does.
    fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), CacheError>;
    /// [`BinaryCache::put_narinfo`] for many narinfos, none of which depends on another
    /// (the caller orders dependent ones into separate calls). Remote caches write them
    /// concurrently; the default writes one at a time.
    ///
    /// Durability contract: no narinfo gets its final name before every NAR committed
    /// before the call is durable under its final name, and every narinfo of the call is
    /// durable when it returns (so a later call's narinfos may refer to them).
    fn put_narinfos(&self, narinfos: &[(StorePath, String)]) -> Result<(), CacheError> {
        narinfos
            .iter()
            .try_for_each(|(p, text)| self.put_narinfo(p, text))
    }
    /// Publishes a wave of narinfos (none depending on another) under [`merge_narinfo`]'s
    /// rule against what the cache holds: signatures already there are kept, and a
    /// narinfo for another NAR of the same path is never replaced while its NAR is intact.
    /// Returns, in order, what happened to each. A local directory holds a lock across
    /// reading and renaming, so concurrent writers cannot drop each other's signatures,
    /// and refuses a narinfo whose NAR is not in place (that path alone fails); the
    /// default reads, then writes.
    ///
    /// # Errors
    /// When the wave as a whole failed: no narinfo of it was named.
    fn publish_narinfos(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
    ) -> Result<Vec<Published>, CacheError> {
        publish_merged(self, store_dir, narinfos)
    }
    /// [`BinaryCache::publish_narinfos`] by a writer beside a gc: no narinfo write, nor a
    /// retry of one, is sent after `deadline` (gc's protocol: each starts within
    /// [`gc_marker::WAVE_FRESH`] of a reading of the marker); a narinfo not written by
    /// then fails alone with [`CacheError::Late`]. A cache that sends no requests that
    /// could take that long (a local directory) publishes as `publish_narinfos` does.
    ///
    /// # Errors
    /// As [`BinaryCache::publish_narinfos`].
    fn publish_narinfos_by(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
        _deadline: std::time::Instant,
    ) -> Result<Vec<Published>, CacheError> {
        self.publish_narinfos(store_dir, narinfos)
    }
    /// [`BinaryCache::publish_narinfos_by`] for a wave whose references' narinfos are
    /// being written by other waves, not durable yet: `gate.wait()` blocks until they
    /// are, and says whether the wave may go on (false: a reference failed, and nothing
    /// of this wave is written: `Ok(None)`). A remote cache reads what it holds for the
    /// wave (the merge's reads) before it waits, so a wave costs one round trip after
    /// its references land instead of two; it calls `gate.writing()` once it waits for
    /// nothing more and its writes follow. The default waits, tells `writing`, then
    /// publishes as `publish_narinfos_by` does.
    ///
    /// # Errors
    /// As [`BinaryCache::publish_narinfos`].
    fn publish_narinfos_after(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
        deadline: std::time::Instant,
        gate: &dyn WaveGate,
    ) -> Result<Option<Vec<Published>>, CacheError> {
        if !gate.wait() {
            return Ok(None);
        }
        gate.writing();
        self.publish_narinfos_by(store_dir, narinfos, deadline)
            .map(Some)
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
    /// Starts the streamed upload of any other object (a build log), whatever its size:
    /// bytes go in through `Write` and the cache holds no more of them than its upload
    /// memory allows; [`NarUpload::commit`] publishes them atomically under `key` with
    /// `content_type` where the cache keeps one, durable when it returns (unlike a NAR's,
    /// whose name may wait for the next sync). Dropped uncommitted, the upload leaves
    /// nothing under a final name.
    ///
    /// `size_hint` is the expected size: a remote cache plans its requests by it (one, or
    /// parts). The object may turn out larger (a compressed log's size is known only once
    /// it is read): parts then grow as it goes.
    ///
    /// # Errors
    /// [`CacheError`]; [`CacheError::Config`] from a cache that cannot store such objects.
    fn begin_object(
        &self,
        _size_hint: u64,
        _content_type: &str,
    ) -> Result<Box<dyn NarUpload>, CacheError> {
        Err(CacheError::Config(format!(
            "{}: this cache cannot store objects other than NARs and narinfos",
            self.url()
        )))
    }
    /// Whether a push may walk and compress a NAR of `nar_size` bytes while it is still
    /// looking at this cache (dropping it if the look finds the path): true where a look costs round
    /// trips worth overlapping and an upload of such a NAR sends nothing before its
    /// commit, so one the look finds in the cache costs the cache nothing. Default: false.
    fn compresses_during_look(&self, _nar_size: u64) -> bool {
        false
    }
    /// How many NAR uploads may be finishing (committing) at once. A local directory
    /// commits with a rename, so 1; a remote cache hides per-request latency with more.
    fn upload_concurrency(&self) -> usize {
        1
    }
    /// How many narinfos one call of [`BinaryCache::publish_narinfos_by`] writes at once: a
    /// publishing wave goes to the cache in slices of this many (1: the whole wave at once,
    /// as a local directory names it with a rename each). A remote cache hides each
    /// request's round trip with more.
    fn narinfos_in_flight(&self) -> usize {
        self.upload_concurrency()
    }
    /// Makes everything written so far durable.
    fn sync(&self) -> Result<(), CacheError>;

    /// Every narinfo the cache holds, by the hash part of its store path, read from a
    /// listing of the cache (one request per 1,000 keys on S3, one directory read for a
    /// local cache) instead of a request per path. `None` when the cache cannot list;
    /// callers then ask with [`BinaryCache::has_narinfos`].
    fn list_narinfos(&self) -> Result<Option<NarinfoSet>, CacheError> {
        Ok(None)
    }
    /// Every object of the cache, each handed to `visit` with its size and modification
    /// time as one listing gives them (ListObjectsV2 pages on S3; one read of the cache's
    /// directory and of `nar/` and `log/` for a local one), never a request per object.
    /// Returns false when the cache cannot list (nothing was visited).
    ///
    /// # Errors
    /// [`CacheError`] when the listing fails part-way (some objects may have been visited).
    fn list_objects(&self, _visit: &mut dyn FnMut(ObjectInfo<'_>)) -> Result<bool, CacheError> {
        Ok(false)
    }
    /// The multipart uploads started and neither completed nor aborted (S3); none for a
    /// cache that has no such thing.
    ///
    /// # Errors
    /// [`CacheError`] when they cannot be listed.
    fn list_unfinished_uploads(&self) -> Result<Vec<UnfinishedUpload>, CacheError> {
        Ok(Vec::new())
    }
    /// The text of each object `keys` names (as [`BinaryCache::get_text`] reads one), in
    /// order. Remote caches ask concurrently; the default asks one at a time.
    ///
    /// # Errors
    /// The first [`CacheError`].
    fn get_texts(&self, keys: &[String]) -> Result<Vec<Option<String>>, CacheError> {
        keys.iter().map(|k| self.get_text(k)).collect()
    }
    /// Deletes the objects `keys` names, which the caller has ordered so that they may go
    /// in any order among themselves: a local directory removes each file and then makes
    /// the removals durable (an fsync of each directory involved) before it returns; S3
    /// sends DeleteObjects requests of at most [`MAX_DELETE`] keys. A key that is not
    /// there counts as deleted. Returns the keys that are still there, each with why; an
    /// answer that is lost or cannot be read is checked (the key is looked up), never
    /// taken for done.
    ///
    /// # Errors
    /// [`CacheError`] when what happened cannot be known (the removals could not be made
    /// durable, or the check after a lost answer failed too); [`CacheError::Config`] from
    /// a cache that cannot delete.
    fn delete_objects(&self, _keys: &[String]) -> Result<Vec<(String, CacheError)>, CacheError> {
        Err(CacheError::Config(format!(
            "{}: this cache cannot delete objects",
            self.url()
        )))
    }
    /// Removes what interrupted uploads left behind (temporary files, staging objects,
    /// unfinished multipart uploads) that is older than `grace`, so that an upload still
    /// running elsewhere is never touched. Returns how many leftovers were removed.
    ///
    /// # Errors
    /// [`CacheError`] when the cache cannot be listed.
    fn sweep_orphans(&self, _grace: std::time::Duration) -> Result<u64, CacheError> {
        Ok(0)
    }
    /// Requests sent so far, by operation (for metrics). A cache that sends no requests
    /// (a local directory) has none.
    fn request_counts(&self) -> Vec<RequestCount> {
        Vec::new()
    }
}

/// A narinfo a look at the cache found ([`BinaryCache::find_narinfos`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FoundNarinfo {
    /// Its text, as read.
    Text(String),
    /// Not read: the cache lists it as the very object this machine wrote (the same
    /// ETag), when it carried valid signatures by exactly the keys `SignerSet` stands for.
    Unchanged(resume::SignerSet),
}

impl FoundNarinfo {
    /// The text, when it was read.
    pub fn text(&self) -> Option<&str> {
        match self {
            FoundNarinfo::Text(t) => Some(t),
            FoundNarinfo::Unchanged(_) => None,
        }
    }
}

/// Most keys one S3 DeleteObjects request takes.
pub const MAX_DELETE: usize = 1000;

/// One object of a listing ([`BinaryCache::list_objects`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectInfo<'a> {
    /// Its key (`<hash part>.narinfo`, `nar/<FileHash>.nar.zst`, ...).
    pub key: &'a str,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, where the cache says.
    pub modified: Option<std::time::SystemTime>,
}

/// A multipart upload neither completed nor aborted ([`BinaryCache::list_unfinished_uploads`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnfinishedUpload {
    /// The key it would complete to.
    pub key: String,
    pub upload_id: String,
    /// When it was started, where the server says.
    pub initiated: Option<std::time::SystemTime>,
}

/// What a publishing wave waits on between reading what the cache holds for its
/// narinfos and writing them ([`BinaryCache::publish_narinfos_after`]).
pub trait WaveGate {
    /// Blocks until every narinfo the wave's narinfos refer to is durable or failed;
    /// true when the wave may be written (every one is durable).
    fn wait(&self) -> bool;
    /// The wave waits for nothing more: its writes are sent next.
    fn writing(&self);
}

/// What publishing one narinfo did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// Ours was written (with the signatures the cache had for the same NAR added), or
    /// the cache's was given our signatures.
    Written,
    /// The cache's narinfo stays as it was: it already has every signature of ours, or it
    /// is for another NAR of the path and that NAR is intact.
    Kept,
}

/// What to do with a narinfo the cache may already have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    Write(Box<NarInfo>),
    Keep,
}

/// The merge rule for writing `ours` where the cache holds `old` (its text, if any).
///
/// - none, or text that does not parse or names another store path (damaged): write ours;
/// - the same NAR (NarHash, NarSize, References), its NAR intact: keep it, adding our
///   signatures when it lacks some (signatures cover only the fingerprint, so they stay
///   valid whatever URL the narinfo names);
/// - the same NAR, its NAR missing or damaged: write ours with its signatures added;
/// - another NAR of the path: keep it while its NAR is intact, else write ours.
///
/// `nar_intact` says whether an old narinfo's NAR is there with its FileSize.
///
/// # Errors
/// What `nar_intact` returns.
pub fn merge_narinfo(
    mut ours: NarInfo,
    old: Option<&str>,
    store_dir: &str,
    nar_intact: impl FnOnce(&NarInfo) -> Result<bool, CacheError>,
) -> Result<Merge, CacheError> {
    let Some(old) = old
        .and_then(|t| NarInfo::parse(t, store_dir).ok())
        .filter(|o| o.store_path == ours.store_path)
    else {
        return Ok(Merge::Write(Box::new(ours)));
    };
    let same_nar = (old.nar_hash, old.nar_size, &old.references)
        == (ours.nar_hash, ours.nar_size, &ours.references);
    let intact = nar_intact(&old)?;
    match (same_nar, intact) {
        (true, true) => {
            if ours.sigs.iter().all(|s| old.sigs.contains(s)) {
                return Ok(Merge::Keep);
            }
            let mut merged = old;
            let sigs = std::mem::take(&mut ours.sigs);
            add_signatures(&mut merged, sigs);
            Ok(Merge::Write(Box::new(merged)))
        }
        (true, false) => {
            add_signatures(&mut ours, old.sigs);
            Ok(Merge::Write(Box::new(ours)))
        }
        (false, true) => Ok(Merge::Keep),
        (false, false) => Ok(Merge::Write(Box::new(ours))),
    }
}

/// Adds `sigs` to `n`'s, keeping them unique and sorted by their text (as Nix does).
fn add_signatures(n: &mut NarInfo, sigs: Vec<crate::format::signing::Signature>) {
    n.sigs.extend(sigs);
    n.sigs
        .sort_by_cached_key(crate::format::signing::Signature::to_string);
    n.sigs.dedup();
}

/// Whether the NAR a narinfo names is in `cache` with the narinfo's FileSize (only its
/// existence when the narinfo has no FileSize).
///
/// # Errors
/// [`CacheError`] when the cache cannot be asked.
pub fn nar_intact<C: BinaryCache + ?Sized>(cache: &C, n: &NarInfo) -> Result<bool, CacheError> {
    let size = cache.object_size(&n.url)?;
    Ok(match n.file_size {
        Some(want) => size == Some(want),
        None => size.is_some(),
    })
}

/// [`BinaryCache::publish_narinfos`] without a lock: read what the cache has, merge, write.
///
/// # Errors
/// The first cache error.
pub fn publish_merged<C: BinaryCache + ?Sized>(
    cache: &C,
    store_dir: &str,
    narinfos: Vec<NarInfo>,
) -> Result<Vec<Published>, CacheError> {
    publish_merged_with(cache, store_dir, narinfos, |writes| {
        let writes: Vec<(StorePath, String)> = writes
            .iter()
            .map(|n| (n.store_path.clone(), n.render(store_dir)))
            .collect();
        cache.put_narinfos(&writes)?;
        Ok(writes.iter().map(|_| Ok(())).collect())
    })
}

/// Reads what the cache has for `narinfos`, merges each under [`merge_narinfo`]'s rule,
/// and hands those to write to `write`, which says, in order, whether each was written.
///
/// # Errors
/// The first cache error of reading, merging, or of `write` as a whole.
pub fn publish_merged_with<C: BinaryCache + ?Sized>(
    cache: &C,
    store_dir: &str,
    narinfos: Vec<NarInfo>,
    write: impl FnOnce(&[NarInfo]) -> Result<Vec<Result<(), CacheError>>, CacheError>,
) -> Result<Vec<Published>, CacheError> {
    Ok(publish_merged_after(cache, store_dir, narinfos, None, write)?.unwrap_or_default())
}

/// [`publish_merged_with`], waiting at `gate` (when given) between the reads and the
/// merge ([`BinaryCache::publish_narinfos_after`]): what the cache holds is read while
/// the references are still being written, so the wait and the reads overlap, and what
/// is merged was read no earlier than those writes were sent, about a round trip before
/// this wave's. `None` when the gate says not to write.
///
/// # Errors
/// As [`publish_merged_with`].
pub fn publish_merged_after<C: BinaryCache + ?Sized>(
    cache: &C,
    store_dir: &str,
    narinfos: Vec<NarInfo>,
    gate: Option<&dyn WaveGate>,
    write: impl FnOnce(&[NarInfo]) -> Result<Vec<Result<(), CacheError>>, CacheError>,
) -> Result<Option<Vec<Published>>, CacheError> {
    if narinfos.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let paths: Vec<StorePath> = narinfos.iter().map(|n| n.store_path.clone()).collect();
    let olds = cache.get_narinfos(&paths)?;
    if let Some(gate) = gate
        && !gate.wait()
    {
        return Ok(None);
    }
    let mut writes = Vec::new();
    // Per narinfo: the index of its write, or `None` when kept.
    let mut slots = Vec::with_capacity(narinfos.len());
    for (ours, old) in narinfos.into_iter().zip(olds) {
        match merge_narinfo(ours, old.as_deref(), store_dir, |o| nar_intact(cache, o))? {
            Merge::Write(n) => {
                slots.push(Some(writes.len()));
                writes.push(*n);
            }
            Merge::Keep => slots.push(None),
        }
    }
    if let Some(gate) = gate {
        gate.writing();
    }
    let mut written: Vec<Option<Result<(), CacheError>>> = if writes.is_empty() {
        Vec::new()
    } else {
        write(&writes)?.into_iter().map(Some).collect()
    };
    Ok(Some(
        slots
            .into_iter()
            .map(|slot| match slot {
                None => Ok(Merged::Kept),
                Some(i) => written[i]
                    .take()
                    .expect("one result per write")
                    .map(|()| Merged::Written),
            })
            .collect(),
    ))
}

/// Reads the gc marker ([`gc_marker::MARKER_KEY`]) of `cache`.
///
/// # Errors
/// [`CacheError`] when the cache cannot be read.
pub fn read_gc_marker<C: BinaryCache + ?Sized>(
    cache: &C,
) -> Result<gc_marker::Reading, CacheError> {
    Ok(cache
        .get_text(gc_marker::MARKER_KEY)?
        .map(|t| gc_marker::Marker::parse(&t)))
}

/// Opens the cache a URL names. `opts.upload_memory` sizes a remote cache's upload
/// buffers; with `opts.max_rate`, everything sent to the cache is charged to one
/// [`rate::TokenBucket`] ([`rate::RateLimited`]).
///
/// # Errors
/// [`CacheError::Config`] for a URL narflow cannot serve, or a `max_rate` of 0.
pub fn open(url: &url::CacheUrl, opts: &OpenOptions) -> Result<Box<dyn BinaryCache>, CacheError> {
    let rate = opts
        .max_rate
        .map(|r| {
            std::num::NonZeroU64::new(r).ok_or_else(|| {
                CacheError::Config(format!(
                    "{}: max-rate 0: the upload rate must be at least 1 byte per second",
                    url.original
                ))
            })
        })
        .transpose()?;
    let cache: Box<dyn BinaryCache> = match &url.location {
        url::CacheLocation::File(dir) => Box::new(file::FileCache::open(dir, &url.original)?),
        url::CacheLocation::S3 { bucket } => Box::new(s3::S3Cache::open(bucket, url, opts)?),
    };
    Ok(match rate {
        Some(rate) => Box::new(rate::RateLimited::new(cache, rate)),
        None => cache,
    })
}

/// The hash parts of the narinfos a cache holds ([`BinaryCache::list_narinfos`]), kept as
/// the 20 bytes each nix32 hash part stands for, sorted: 20 bytes a narinfo (a cache of a
/// million paths lists into 20 MB), looked up by binary search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NarinfoSet(Vec<[u8; 20]>);

impl FromIterator<[u8; 20]> for NarinfoSet {
    fn from_iter<I: IntoIterator<Item = [u8; 20]>>(keys: I) -> Self {
        let mut v: Vec<[u8; 20]> = keys.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        v.shrink_to_fit();
        NarinfoSet(v)
    }
}

impl NarinfoSet {
    /// Narinfos in the set.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Whether the set holds the hash part `key` stands for.
    pub fn contains_key(&self, key: &[u8; 20]) -> bool {
        self.0.binary_search(key).is_ok()
    }
    /// The 20 bytes `path`'s hash part stands for: what the set holds.
    pub fn key(path: &StorePath) -> [u8; 20] {
        crate::format::nix32::decode::<20>(path.hash_part().as_bytes())
            .expect("a store path's hash part is 32 nix32 characters")
    }
    /// Whether the cache listed a narinfo for `path`.
    pub fn contains(&self, path: &StorePath) -> bool {
        self.contains_key(&Self::key(path))
    }
}

/// The 20 bytes of the hash part a narinfo's key (`<hash part>.narinfo`) names, or `None`
/// for a key that is not a narinfo's.
pub fn narinfo_hash(key: &[u8]) -> Option<[u8; 20]> {
    let hash = key.strip_suffix(b".narinfo")?;
    crate::format::nix32::decode::<20>(hash).ok()
}

/// What a cache's constructor is given: its share of the one memory budget
/// ([`crate::memory::Budget::cache_share`]), and the S3 tuning.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Bytes of NAR data the cache may buffer on their way out (S3: small NARs whole
    /// until their PUT, large ones part by part). A local directory buffers nothing.
    pub upload_memory: u64,
    /// Cap on the bytes per second sent to the cache (`--max-rate`); `None`: no cap.
    pub max_rate: Option<u64>,
    pub s3: S3Tuning,
    /// Where multipart uploads are recorded so that a restart resumes them
    /// ([`BinaryCache::begin_nar_resumable`]); `None`: no upload is resumable. A remote
    /// cache also records there the narinfos it writes ([`FoundNarinfo::Unchanged`]).
    pub journal: Option<std::sync::Arc<dyn resume::UploadJournal>>,
    /// The public keys of the keys this writer signs with: a narinfo the cache writes is
    /// recorded with those whose valid signatures it carries (each is verified).
    pub signers: Vec<crate::format::signing::VerifyingKey>,
}

/// Options are equal when their journals are the same one.
impl PartialEq for OpenOptions {
    fn eq(&self, other: &Self) -> bool {
        let same_journal = match (&self.journal, &other.journal) {
            (None, None) => true,
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        };
        (self.upload_memory, self.max_rate, &self.s3, &self.signers)
            == (
                other.upload_memory,
                other.max_rate,
                &other.s3,
                &other.signers,
            )
            && same_journal
    }
}

/// How an S3 cache talks to its server. Ignored by other caches.
#[derive(Debug, Clone, PartialEq)]
pub struct S3Tuning {
    /// Requests in flight at once over all uploads (URL parameter `concurrency=`).
    pub concurrency: usize,
    /// Retries of a request that failed transiently (URL parameter `retries=`).
    pub retries: u32,
    /// How long to wait for a connection.
    pub connect_timeout: std::time::Duration,
    /// How long a response may be silent (URL parameter `read-timeout=`, seconds).
    pub read_timeout: std::time::Duration,
    /// Multipart part size when the memory allows it (`s3.part-size`): a smaller upload
    /// memory gets smaller parts, down to S3's 5 MiB; larger NARs get larger parts, to
    /// stay in S3's 10,000.
    pub min_part_size: u64,
}

impl Default for S3Tuning {
    fn default() -> Self {
        S3Tuning {
            concurrency: 32,
            retries: 6,
            connect_timeout: std::time::Duration::from_secs(5),
            read_timeout: std::time::Duration::from_secs(30),
            min_part_size: s3::MIN_PART,
        }
    }
}

impl S3Tuning {
    /// The defaults, with the URL's `concurrency=`, `retries=` and `read-timeout=` applied
    /// (narflow's own parameters).
    ///
    /// # Errors
    /// [`CacheError::Config`] naming the URL and the parameter with a bad value.
    pub fn from_url(url: &url::CacheUrl) -> Result<Self, CacheError> {
        fn param<T: std::str::FromStr>(
            url: &url::CacheUrl,
            key: &str,
        ) -> Result<Option<T>, CacheError> {
            url.param(key)
                .map(|v| {
                    v.parse().map_err(|_| {
                        CacheError::Config(format!("{}: bad value {v:?} for {key}", url.original))
                    })
                })
                .transpose()
        }
        let mut t = S3Tuning::default();
        if let Some(c) = param::<usize>(url, "concurrency")? {
            t.concurrency = c.max(1);
        }
        if let Some(r) = param(url, "retries")? {
            t.retries = r;
        }
        if let Some(secs) = param::<f64>(url, "read-timeout")? {
            t.read_timeout = std::time::Duration::try_from_secs_f64(secs).map_err(|_| {
                CacheError::Config(format!(
                    "{}: bad value {secs:?} for read-timeout",
                    url.original
                ))
            })?;
        }
        t.check()
            .map_err(|e| CacheError::Config(format!("{}: {e}", url.original)))?;
        Ok(t)
    }

    /// Checks the values are usable.
    ///
    /// # Errors
    /// [`TuningError`] naming the value that is out of range.
    pub fn check(&self) -> Result<(), TuningError> {
        if self.concurrency == 0 {
            return Err(TuningError::Concurrency);
        }
        if self.min_part_size < s3::MIN_S3_PART {
            return Err(TuningError::PartSize(self.min_part_size));
        }
        Ok(())
    }

    /// What an S3 cache needs of its share of the memory budget at least: one part of
    /// S3's smallest size, filled and sent one at a time. A larger share gets larger parts
    /// (up to `min_part_size`) and more of them in flight.
    pub fn memory_need(&self) -> crate::memory::CacheNeed {
        crate::memory::CacheNeed {
            bytes: s3::MIN_S3_PART,
            what: format!(
                "to fill one S3 part of {}, the smallest S3 takes",
                crate::memory::Human(s3::MIN_S3_PART)
            ),
        }
    }

    /// The least `--memory` whose S3 share takes parts of `part` bytes at the full size
    /// (a part takes at most a [`s3::PART_SHARE`] of the share): what an explicit
    /// `s3.part-size` and a NAR needing large parts ask for.
    pub fn memory_for_part(part: u64) -> u64 {
        crate::memory::Budget::memory_for_cache(part.saturating_mul(s3::PART_SHARE))
    }
}

/// A value of [`S3Tuning`] that cannot be used. None is transient.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TuningError {
    /// `concurrency` is 0.
    #[error("concurrency must be at least 1")]
    Concurrency,
    /// `min_part_size` is below what S3 takes.
    #[error("part size {0} is below S3's smallest part ({min} bytes)", min = s3::MIN_S3_PART)]
    PartSize(u64),
}

/// What the cache `url` names needs of its share of the memory budget, tuned by `s3`
/// (nothing for a local directory, which buffers nothing).
pub fn memory_need(url: &url::CacheUrl, s3: &S3Tuning) -> crate::memory::CacheNeed {
    match url.location {
        url::CacheLocation::File(_) => crate::memory::CacheNeed::default(),
        url::CacheLocation::S3 { .. } => s3.memory_need(),
    }
}

/// One kind of request a cache sent, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestCount {
    /// The operation, e.g. `PutObject`, `HeadObject`, `UploadPart`.
    pub operation: &'static str,
    /// Requests sent, retries included.
    pub requests: u64,
    /// Of those, retries of a request that had failed transiently.
    pub retries: u64,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::hash::Sha256;
    use crate::format::signing::SigningKey;

    const SD: &str = "/nix/store";

    fn narinfo(nar: &[u8], url: &str, key: &SigningKey) -> NarInfo {
        let mut n = NarInfo {
            store_path: StorePath::from_base_name("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-p").unwrap(),
            url: url.into(),
            compression: "none".into(),
            file_hash: Some(Sha256::digest(nar)),
            file_size: Some(nar.len() as u64),
            nar_hash: Sha256::digest(nar),
            nar_size: nar.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        n.sign(key, SD);
        n
    }

    fn merge(ours: &NarInfo, old: Option<&str>, intact: bool) -> Merge {
        merge_narinfo(ours.clone(), old, SD, |_| Ok(intact)).unwrap()
    }

    fn written(m: Merge) -> NarInfo {
        match m {
            Merge::Write(n) => *n,
            Merge::Keep => panic!("kept"),
        }
    }

    #[test]
    fn what_heals_by_itself_is_transient_whatever_the_object() {
        use std::io::{Error, ErrorKind};
        let io = |source: Error| CacheError::Io {
            cache: "file:///c".into(),
            key: "x.narinfo".into(),
            source,
        };
        for heals in [
            Error::new(ErrorKind::StorageFull, "no space left on device"),
            Error::new(ErrorKind::QuotaExceeded, "disk quota exceeded"),
            Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error()),
            Error::new(ErrorKind::TimedOut, "timed out"),
            Error::new(ErrorKind::ConnectionReset, "reset"),
        ] {
            let what = heals.to_string();
            assert!(io_is_transient(&heals), "{what}");
            assert!(io(heals).is_transient(), "{what}");
        }
        for needs_a_person in [
            Error::new(ErrorKind::PermissionDenied, "permission denied"),
            Error::new(ErrorKind::ReadOnlyFilesystem, "read-only file system"),
            Error::new(ErrorKind::NotFound, "no such directory"),
        ] {
            let what = needs_a_person.to_string();
            assert!(!io(needs_a_person).is_transient(), "{what}");
        }
    }

    #[test]
    fn the_merge_rule() {
        let (a, b) = (
            SigningKey::from_seed("a-1", [1; 32]),
            SigningKey::from_seed("b-1", [2; 32]),
        );
        let ours = narinfo(b"nar", "nar/ours.nar", &a);
        // Nothing there, or damage: ours.
        assert_eq!(written(merge(&ours, None, true)), ours);
        assert_eq!(written(merge(&ours, Some(""), true)), ours);
        assert_eq!(
            written(merge(&ours, Some("StorePath: /nix/store/x\n"), true)),
            ours
        );
        // The same NAR signed by another key: theirs stays (its URL), with both signatures.
        let theirs = narinfo(b"nar", "nar/theirs.nar.xz", &b);
        let m = written(merge(&ours, Some(&theirs.render(SD)), true));
        assert_eq!(m.url, "nar/theirs.nar.xz");
        for k in [&a, &b] {
            assert_eq!(
                m.valid_signatures(SD, &[k.verifying_key()]),
                1,
                "{}",
                k.name()
            );
        }
        // ... and nothing to write when it has ours already.
        assert_eq!(merge(&ours, Some(&m.render(SD)), true), Merge::Keep);
        // The same NAR, but its file is gone: ours, keeping their signature.
        let m = written(merge(&ours, Some(&theirs.render(SD)), false));
        assert_eq!(m.url, "nar/ours.nar");
        assert_eq!(m.sigs.len(), 2);
        // Another NAR of the path: kept while intact, replaced (without its now foreign
        // signature) once its NAR is missing or damaged.
        let other = narinfo(b"other nar", "nar/other.nar", &b);
        assert_eq!(merge(&ours, Some(&other.render(SD)), true), Merge::Keep);
        assert_eq!(written(merge(&ours, Some(&other.render(SD)), false)), ours);
    }
}
