//! An S3 (or S3-compatible) binary cache, with aws-sdk-s3: the cache type and its
//! [`BinaryCache`] methods. Accepts Nix's store-URL parameters (`region`, `endpoint`,
//! `scheme`, `profile`, `addressing-style`, `storage-class`) and narflow's tuning
//! (`concurrency`, `retries`, `read-timeout`); credentials come from the standard AWS chain.
//!
//! It never leaves a partial object under a final name: a NAR larger than one part goes
//! up to a staging key and is copied to `nar/<FileHash>` once whole, and an upload dropped
//! uncommitted aborts and deletes what it made (but for a recorded resumable upload, kept
//! for the next run to go on with). A lost or unreadable answer is checked
//! (the object exists with the bytes sent), never assumed. It buffers at most
//! `OpenOptions::upload_memory`. Requests run on this cache's own tokio runtime; callers
//! are plain threads that block on them, never a runtime's workers.
//!
//! Files: `config` (the client, from the URL and options), `retry` (what is retried and
//! how long to wait), `object` (requests on one object), `upload` (NARs and other objects
//! going up, part sizes), `memory` (the upload memory), `copy` (server-side copies),
//! `batch` (many requests at once), `delete` (DeleteObjects), `list` (the whole bucket), `sweep` (what killed uploads left behind, by age,
//! never what a live upload owns or the journal records), `resume` (resumable uploads:
//! their record, the parts a restart need not send again, the progress of uploads in flight),
//! `record` (the narinfos written, with their ETags, so a listing answers for them).

mod batch;
mod config;
mod copy;
mod credentials;
mod delete;
mod list;
mod memory;
mod object;
mod record;
mod resume;
mod retry;
mod sweep;
#[cfg(test)]
mod testing;
mod upload;

use super::url::CacheUrl;
use super::{BinaryCache, CacheError, NarUpload, OpenOptions};
use crate::format::store_path::StorePath;
use aws_sdk_s3::types::StorageClass;
use batch::{LIST_THRESHOLD, concurrently};
pub use config::http_client;
use memory::UploadMemory;
use retry::join_error;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::task::JoinSet;
pub use upload::part_size;
pub(crate) use upload::{MIN_PART, MIN_S3_PART, PART_SHARE};

pub const NARINFO_TYPE: &str = "text/x-nix-narinfo";
pub const NAR_TYPE: &str = "application/x-nix-nar";
pub const CACHE_INFO_TYPE: &str = "text/x-nix-cache-info";

/// Prefix of staging objects for multipart uploads (never referenced by a narinfo).
pub const STAGING_PREFIX: &str = ".narflow-staging/";

/// What the pipeline and the batch tasks share.
#[derive(Debug)]
struct Shared {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// The region requests are signed for.
    region: String,
    url: String,
    /// Whether the server has answered any request yet: before it has, a refused
    /// connection or missing credentials are a configuration to fix, not retried.
    answered: std::sync::atomic::AtomicBool,
    storage_class: Option<StorageClass>,
    retries: u32,
    /// Requests in flight at once (`S3Tuning::concurrency`): of the multipart uploads
    /// completing (`multipart_commits`), and at most that many parts or part copies of
    /// one NAR.
    concurrency: usize,
    /// Small requests in flight at once, of one batch (HEADs, GETs) or publishing wave
    /// (narinfo GETs and PUTs): [`batch::small_in_flight`] of `concurrency`.
    small_in_flight: usize,
    /// A permit for each multipart upload completing (its last parts, the Complete and
    /// the copy to its final key): `concurrency` at once, however many NARs commit.
    multipart_commits: tokio::sync::Semaphore,
    /// Staging objects larger than this are copied in parts (UploadPartCopy) of this size.
    copy_part: u64,
    /// Multipart part size where the upload memory allows it (`S3Tuning::min_part_size`).
    min_part: u64,
    rt: tokio::runtime::Runtime,
    memory: Arc<UploadMemory>,
    /// Requests sent and retried, by operation.
    counts: retry::Counts,
    /// What live uploads own: never swept.
    owned: sweep::Owned,
    /// Where multipart uploads begun resumable are recorded (`OpenOptions::journal`).
    journal: Option<Arc<dyn super::resume::UploadJournal>>,
    /// The bucket as the journal's narinfo record knows it: its name and endpoint.
    bucket_id: String,
    /// Public keys a narinfo written is recorded with when it carries their signatures
    /// (`OpenOptions::signers`).
    signers: Vec<crate::format::signing::VerifyingKey>,
    /// The multipart uploads in flight, with their progress, and the bytes resumed.
    uploads: resume::InFlight,
}

impl Shared {
    /// The largest part this cache's upload memory takes (see [`upload::largest_part`]).
    fn largest_part(&self) -> u64 {
        upload::largest_part(self.memory.capacity)
    }
}

#[derive(Debug)]
pub struct S3Cache {
    shared: Arc<Shared>,
}

impl S3Cache {
    /// Builds the client for `s3://bucket?...`. Nothing is sent yet.
    ///
    /// # Errors
    /// [`CacheError::Config`] for bad parameters.
    /// Uploads buffer at most `opts.upload_memory` bytes; `opts.s3` says how to talk to
    /// the server.
    pub fn open(bucket: &str, url: &CacheUrl, opts: &OpenOptions) -> Result<Self, CacheError> {
        Self::build(bucket, url, opts, None)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.shared.rt.block_on(f)
    }
}

/// An object's body being read: each read waits on this cache's runtime for the next
/// piece the server sends (the caller is a plain thread, never one of its workers). It
/// holds one piece of the body at a time.
struct ObjectReader {
    shared: Arc<Shared>,
    key: String,
    body: aws_sdk_s3::primitives::ByteStream,
    chunk: bytes::Bytes,
}

impl std::io::Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.shared.rt.block_on(self.body.next()) {
                None => return Ok(0),
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => {
                    return Err(std::io::Error::other(format!(
                        "{}: {}: reading the body: {e}",
                        self.shared.url, self.key
                    )));
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

impl S3Cache {
    /// PUTs `writes` concurrently ([`Shared::small_in_flight`] at once), no attempt sent
    /// after `deadline`: each narinfo's outcome, in order.
    fn put_narinfos_by(
        &self,
        store_dir: &str,
        writes: &[crate::format::narinfo::NarInfo],
        deadline: std::time::Instant,
    ) -> Result<Vec<Result<(), CacheError>>, CacheError> {
        let s = self.shared.clone();
        let items: Vec<(String, bytes::Bytes)> = writes
            .iter()
            .map(|n| {
                let text = n.render(store_dir);
                (super::narinfo_key(&n.store_path), bytes::Bytes::from(text))
            })
            .collect();
        // Who signed each, for its record: verified here, on the caller's thread.
        let signers: Vec<_> = writes
            .iter()
            .map(|n| {
                (
                    super::NarinfoSet::key(&n.store_path),
                    s.signed_by(n, store_dir),
                )
            })
            .collect();
        let out = self.block_on(async move {
            let mut out: Vec<Option<Result<Option<String>, CacheError>>> =
                (0..items.len()).map(|_| None).collect();
            let mut items = items.into_iter().enumerate();
            let mut set = JoinSet::new();
            loop {
                while set.len() < s.small_in_flight {
                    let Some((i, (key, body))) = items.next() else {
                        break;
                    };
                    let s = s.clone();
                    set.spawn(async move {
                        (i, s.put_by(&key, body, NARINFO_TYPE, Some(deadline)).await)
                    });
                }
                let Some(done) = set.join_next().await else {
                    break;
                };
                let (i, r) = done.map_err(|e| join_error(&s.url, e))?;
                out[i] = Some(r);
            }
            Ok::<_, CacheError>(
                out.into_iter()
                    .map(|r| r.expect("every narinfo answered"))
                    .collect::<Vec<_>>(),
            )
        })?;
        // The wave's records, in one transaction: each written narinfo's ETag. A failed
        // PUT may have landed all the same: its record goes (the next look reads it).
        self.shared
            .record_written(out.iter().zip(signers).map(|(r, (hash, signers))| match r {
                Ok(etag) => (hash, etag.clone(), signers),
                Err(_) => (hash, None, None),
            }));
        Ok(out.into_iter().map(|r| r.map(drop)).collect())
    }
}

impl BinaryCache for S3Cache {
    fn url(&self) -> &str {
        &self.shared.url
    }

    fn ensure_cache_info(&self, store_dir: &str) -> Result<(), CacheError> {
        let s = &self.shared;
        // The first request of a run: if the endpoint cannot be reached even after the
        // retries, no path can go up, so it fails the run (exit 2), not each path; the
        // daemon retries it as the transient error it is.
        let unreachable = |e: CacheError| match e {
            CacheError::Remote {
                transient: true,
                message,
                ..
            } => CacheError::Unreachable(format!(
                "{}: cannot reach the S3 endpoint: {message}",
                s.url
            )),
            other => other,
        };
        self.block_on(async {
            let existing = s.get_text("nix-cache-info").await.map_err(unreachable)?;
            match super::cache_info_to_write(&s.url, existing.as_deref(), store_dir)? {
                Some(text) => s.put("nix-cache-info", text.into(), CACHE_INFO_TYPE).await,
                None => Ok(()),
            }
        })
    }

    fn has_narinfo(&self, path: &StorePath) -> Result<bool, CacheError> {
        self.block_on(self.shared.exists(&super::narinfo_key(path)))
    }

    fn has_narinfos(&self, paths: &[StorePath]) -> Result<Vec<bool>, CacheError> {
        let s = self.shared.clone();
        let keys: Vec<String> = paths.iter().map(super::narinfo_key).collect();
        self.block_on(async move {
            if keys.len() >= LIST_THRESHOLD {
                // One listing page answers 1,000 keys: cheaper than the HEADs while the
                // cache holds no more than a few times the paths asked about.
                let pages = keys.len().div_ceil(1000) * 4;
                if let Some(present) = s.list_narinfos(pages).await? {
                    return Ok(paths.iter().map(|p| present.contains(p)).collect());
                }
            }
            concurrently(&s, keys, |s, key| async move { s.exists(&key).await }).await
        })
    }

    /// Many paths: one listing, each narinfo it finds read while the next page is asked
    /// for, but for one listed with the ETag recorded when this machine wrote it
    /// (`record`); few: a GET each (it answers what a HEAD would, and reads the text too).
    fn find_narinfos(
        &self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<super::FoundNarinfo>>, CacheError> {
        let s = self.shared.clone();
        let keys: Vec<String> = paths.iter().map(super::narinfo_key).collect();
        let wanted: Vec<[u8; 20]> = paths.iter().map(super::NarinfoSet::key).collect();
        let listing = keys.len() >= LIST_THRESHOLD;
        // Only a listing shows ETags without a request per narinfo.
        let recorded = if listing {
            s.recorded(&wanted)
        } else {
            Default::default()
        };
        let (found, stale) = self.block_on(async move {
            if listing {
                // As in `has_narinfos`: while the cache holds no more than a few times the
                // paths asked about.
                let pages = keys.len().div_ceil(1000) * 4;
                if let Some(l) = s.find_listed_narinfos(&wanted, &recorded, pages).await? {
                    return Ok((l.found, l.stale));
                }
            }
            let texts = concurrently(
                &s,
                keys,
                |s, key| async move { s.get_text_lossy(&key).await },
            )
            .await?;
            Ok::<_, CacheError>((
                texts
                    .into_iter()
                    .map(|t| t.map(super::FoundNarinfo::Text))
                    .collect(),
                Vec::new(),
            ))
        })?;
        self.shared.forget_recorded(&stale);
        Ok(found)
    }

    fn has_object(&self, key: &str) -> Result<bool, CacheError> {
        self.block_on(self.shared.exists(key))
    }

    fn begin_nar(&self, nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError> {
        Ok(Box::new(upload::S3NarUpload::begin(
            &self.shared,
            nar_size,
        )?))
    }

    /// With a journal: finds the upload's record, checks its identity, confirms its
    /// parts with ListParts, and sends only those the server lacks or that differ.
    fn begin_nar_resumable(
        &self,
        nar_size: u64,
        identity: &super::resume::NarIdentity,
    ) -> Result<Box<dyn NarUpload>, CacheError> {
        Ok(Box::new(upload::S3NarUpload::begin_resumable(
            &self.shared,
            nar_size,
            identity,
        )?))
    }

    fn abort_recorded(&self, upload: &super::resume::RecordedUpload) -> Result<(), CacheError> {
        self.block_on(self.shared.abort_recorded(upload))
    }

    fn large_uploads(&self) -> Vec<super::resume::UploadProgress> {
        self.shared.uploads.snapshot()
    }

    fn resumed_bytes(&self) -> u64 {
        self.shared.uploads.resumed_total()
    }

    /// The NAR upload's way, with `content_type`: one PUT when it stays below a part,
    /// else parts (reserved from the upload memory like a NAR's) to a staging key, copied
    /// to `key` by the commit.
    fn begin_object(
        &self,
        size_hint: u64,
        content_type: &str,
    ) -> Result<Box<dyn NarUpload>, CacheError> {
        Ok(Box::new(upload::S3NarUpload::begin_object(
            &self.shared,
            size_hint,
            content_type,
        )?))
    }

    fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), CacheError> {
        let body = bytes::Bytes::copy_from_slice(text.as_bytes());
        self.block_on(
            self.shared
                .put(&super::narinfo_key(path), body, NARINFO_TYPE),
        )
    }

    fn put_object(&self, key: &str, bytes: &[u8], content_type: &str) -> Result<(), CacheError> {
        let body = bytes::Bytes::copy_from_slice(bytes);
        self.block_on(self.shared.put(key, body, content_type))
    }

    fn put_narinfos(&self, narinfos: &[(StorePath, String)]) -> Result<(), CacheError> {
        let s = self.shared.clone();
        let items: Vec<(String, bytes::Bytes)> = narinfos
            .iter()
            .map(|(p, t)| (super::narinfo_key(p), bytes::Bytes::from(t.clone())))
            .collect();
        self.block_on(async move {
            let mut set = JoinSet::new();
            let mut items = items.into_iter();
            let mut first_error = None;
            loop {
                while set.len() < s.small_in_flight {
                    let Some((key, body)) = items.next() else {
                        break;
                    };
                    let s = s.clone();
                    set.spawn(async move { s.put(&key, body, NARINFO_TYPE).await });
                }
                match set.join_next().await {
                    None => break,
                    Some(r) => {
                        if let Err(e) = r.map_err(|e| join_error(&s.url, e)).and_then(|r| r) {
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }

    /// The merge of [`super::publish_merged`], each narinfo PUT (every attempt) sent only
    /// until `deadline`, concurrently; each narinfo has its own outcome.
    fn publish_narinfos_by(
        &self,
        store_dir: &str,
        narinfos: Vec<crate::format::narinfo::NarInfo>,
        deadline: std::time::Instant,
    ) -> Result<Vec<super::Published>, CacheError> {
        super::publish_merged_with(self, store_dir, narinfos, |writes| {
            self.put_narinfos_by(store_dir, writes, deadline)
        })
    }

    /// [`S3Cache::publish_narinfos_by`], its GETs sent before `gate` is waited for.
    fn publish_narinfos_after(
        &self,
        store_dir: &str,
        narinfos: Vec<crate::format::narinfo::NarInfo>,
        deadline: std::time::Instant,
        gate: &dyn super::WaveGate,
    ) -> Result<Option<Vec<super::Published>>, CacheError> {
        super::publish_merged_after(self, store_dir, narinfos, Some(gate), |writes| {
            self.put_narinfos_by(store_dir, writes, deadline)
        })
    }

    fn sync(&self) -> Result<(), CacheError> {
        // A successful PUT or CompleteMultipartUpload is durable on S3.
        Ok(())
    }

    /// [`upload::one_put_commits`]: most NARs are small and go up in one PutObject; a
    /// multipart upload completing takes one of `concurrency` permits besides.
    fn upload_concurrency(&self) -> usize {
        upload::one_put_commits(self.shared.concurrency, self.shared.small_in_flight)
    }

    fn narinfos_in_flight(&self) -> usize {
        self.shared.small_in_flight
    }

    /// A NAR that goes up in one PutObject sends nothing before its commit.
    fn compresses_during_look(&self, nar_size: u64) -> bool {
        upload::one_put_whatever_it_compresses_to(nar_size)
    }

    fn object_size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        self.block_on(self.shared.size(key))
    }

    fn get_narinfo(&self, path: &StorePath) -> Result<Option<String>, CacheError> {
        self.block_on(self.shared.get_text_lossy(&super::narinfo_key(path)))
    }

    fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
        self.block_on(self.shared.get_text_lossy(key))
    }

    fn read_object(&self, key: &str) -> Result<Option<Box<dyn std::io::Read + Send>>, CacheError> {
        let body = self.block_on(self.shared.open(key))?;
        Ok(body.map(|body| {
            Box::new(ObjectReader {
                shared: self.shared.clone(),
                key: key.to_owned(),
                body,
                chunk: bytes::Bytes::new(),
            }) as Box<dyn std::io::Read + Send>
        }))
    }

    fn get_narinfos(&self, paths: &[StorePath]) -> Result<Vec<Option<String>>, CacheError> {
        let s = self.shared.clone();
        let keys: Vec<String> = paths.iter().map(super::narinfo_key).collect();
        self.block_on(async move {
            concurrently(
                &s,
                keys,
                |s, key| async move { s.get_text_lossy(&key).await },
            )
            .await
        })
    }

    fn request_counts(&self) -> Vec<super::RequestCount> {
        self.shared.counts.snapshot()
    }

    /// The whole listing of the bucket's root, page after page (a cache of a million
    /// paths takes a thousand requests: callers list only when they would otherwise ask
    /// about more paths than that).
    fn list_narinfos(&self) -> Result<Option<super::NarinfoSet>, CacheError> {
        let s = self.shared.clone();
        let set = self.block_on(async move { s.list_narinfos(usize::MAX).await })?;
        Ok(set)
    }

    fn list_objects(
        &self,
        visit: &mut dyn FnMut(super::ObjectInfo<'_>),
    ) -> Result<bool, CacheError> {
        self.list_all(visit)?;
        Ok(true)
    }

    fn list_unfinished_uploads(&self) -> Result<Vec<super::UnfinishedUpload>, CacheError> {
        self.unfinished_uploads()
    }

    fn get_texts(&self, keys: &[String]) -> Result<Vec<Option<String>>, CacheError> {
        let s = self.shared.clone();
        let keys = keys.to_vec();
        self.block_on(async move {
            concurrently(
                &s,
                keys,
                |s, key| async move { s.get_text_lossy(&key).await },
            )
            .await
        })
    }

    fn delete_objects(&self, keys: &[String]) -> Result<Vec<(String, CacheError)>, CacheError> {
        let s = self.shared.clone();
        let keys = keys.to_vec();
        self.block_on(async move { s.delete_many(&keys).await })
    }

    /// Aborts the multipart uploads under the staging prefix and under `nar/` (a
    /// multi-part copy to a final key whose push was killed), and deletes the staging
    /// objects, that were started (Initiated) or written (LastModified) more than `grace`
    /// ago by this machine's clock; younger ones may belong to an upload running elsewhere.
    /// What a live upload of this process owns stays, however old (`sweep::Owned`), and
    /// so does an upload the journal records, with its staging object: the caller ends
    /// those ([`BinaryCache::abort_recorded`]). Objects under `nar/` are never deleted here.
    fn sweep_orphans(&self, grace: Duration) -> Result<u64, CacheError> {
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.sweep(&[STAGING_PREFIX, "nar/"], STAGING_PREFIX, cutoff)
    }
}
