//! An S3 (or S3-compatible: MinIO, Garage, R2) binary cache, with aws-sdk-s3.
//!
//! Accepts Nix's store-URL parameters (`region`, `endpoint`, `scheme`, `profile`,
//! `addressing-style`, `storage-class`) plus narflow's tuning (`concurrency`, `retries`,
//! `read-timeout`). Credentials come from the standard AWS chain (environment, profile,
//! SSO, web identity, IMDS).
//!
//! Uploads: a NAR whose compressed size stays below one part goes up with one PutObject
//! under its final key. A larger one goes up as a multipart upload to a staging key (its
//! final name, `nar/<FileHash>`, is only known once the last byte is hashed), then is
//! copied server-side to its final key (CopyObject, or UploadPartCopy parts beyond 5 GiB)
//! and the staging object deleted. An upload dropped before it is committed aborts its
//! multipart upload and deletes its staging object: no orphaned uploads and no partial
//! object under a final name. An answer that is lost or cannot be read leaves the outcome
//! unknown, so it is checked (the object exists with the bytes sent), never assumed.
//!
//! Memory: uploads buffer at most `OpenOptions::upload_memory`, the share of the memory
//! budget the pipeline gives this cache; each buffer reserves its whole part before it is filled (see `UploadMemory`).
//! Orphans that a killed push left under the staging prefix are swept by age.
//!
//! Every request is retried with jittered exponential backoff on 5xx, 503 SlowDown,
//! timeouts and connection errors, honouring Retry-After; a 403, bad credentials or a
//! missing bucket fail at once with a configuration error.
//!
//! The SDK runs on this cache's own tokio runtime. The pipeline calls it from plain
//! threads (never from a runtime worker) and blocks on each request; concurrency comes
//! from the pipeline's finishing threads and from the batch methods, which run their
//! requests concurrently on the runtime.
use super::url::CacheUrl;
use super::{BinaryCache, CacheError, NarUpload, OpenOptions};
use crate::format::store_path::StorePath;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, StorageClass};
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::task::JoinSet;

pub const NARINFO_TYPE: &str = "text/x-nix-narinfo";
pub const NAR_TYPE: &str = "application/x-nix-nar";
pub const CACHE_INFO_TYPE: &str = "text/x-nix-cache-info";

/// Smallest part we upload: S3 requires 5 MiB for every part but the last; a little more
/// keeps the request count down at no memory cost worth counting.
pub(crate) const MIN_PART: u64 = 8 << 20;
/// S3 allows 10,000 parts; leave room for compressed data a little larger than the NAR.
const MAX_PARTS: u64 = 9_000;
/// Most parts of one NAR uploading at once: enough to fill a fast link. Fewer when parts
/// are large next to the upload memory (see [`parts_in_flight`]).
const PARTS_IN_FLIGHT: usize = 4;
/// A part may take at most this share of the upload memory, so that the parts being
/// filled of several NARs assembled at once fit beside each other.
const PART_SHARE: u64 = 4;
/// The smallest part S3 takes (all but the last part of an upload).
pub(crate) const MIN_S3_PART: u64 = 5 << 20;
/// The largest object one CopyObject may copy on AWS (5 GiB); larger staging objects are
/// copied in parts with UploadPartCopy.
const COPY_LIMIT: u64 = 5 << 30;
/// Part size of a multi-part copy: a tenth of the copy limit keeps each server-side copy
/// request short; more parts are used when 10,000 of these would not cover the object.
const COPY_PART: u64 = 512 << 20;
/// Part copies of one object in flight at once (server-side work, no memory here).
const COPY_PARTS_IN_FLIGHT: usize = 8;
/// Environment variable (for tests only, undocumented) that lowers the copy limit, and
/// sets the copy part size, to its value in bytes.
const COPY_PART_ENV: &str = "NARFLOW_S3_COPY_PART_SIZE";
/// Requests of one batch (HEADs, narinfo PUTs) in flight at once.
const BATCH_CONCURRENCY: usize = 64;
/// A batch of at least this many narinfo lookups first tries one listing of the bucket.
const LIST_THRESHOLD: usize = 512;
/// Prefix of staging objects for multipart uploads (never referenced by a narinfo).
const STAGING_PREFIX: &str = ".narflow-staging/";

/// What the pipeline and the batch tasks share.
#[derive(Debug)]
struct Shared {
    client: aws_sdk_s3::Client,
    bucket: String,
    url: String,
    storage_class: Option<StorageClass>,
    retries: u32,
    /// Staging objects larger than this are copied in parts (UploadPartCopy) of this size.
    copy_part: u64,
    /// Smallest multipart part (`S3Tuning::min_part_size`).
    min_part: u64,
    rt: tokio::runtime::Runtime,
    memory: Arc<UploadMemory>,
}

#[derive(Debug)]
pub struct S3Cache {
    shared: Arc<Shared>,
    concurrency: usize,
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

    /// [`S3Cache::open`], with fixed credentials instead of the AWS chain when given.
    fn build(
        bucket: &str,
        url: &CacheUrl,
        opts: &OpenOptions,
        credentials: Option<aws_sdk_s3::config::Credentials>,
    ) -> Result<Self, CacheError> {
        let config_err = |why: String| CacheError::Config(format!("{}: {why}", url.original));
        let rt = tokio::runtime::Builder::new_multi_thread()
            // I/O only: the requests' CPU work (signing, TLS) is small next to compression.
            .worker_threads(2)
            .thread_name("narflow-s3")
            .enable_all()
            .build()
            .map_err(|e| config_err(format!("starting the S3 runtime: {e}")))?;
        let endpoint = url.param("endpoint").map(|e| {
            if e.contains("://") {
                e.to_owned()
            } else {
                format!("{}://{e}", url.param("scheme").unwrap_or("https"))
            }
        });
        let path_style = match url.param("addressing-style").unwrap_or("auto") {
            "path" => true,
            "virtual" => false,
            // S3-compatible servers behind a custom endpoint rarely have per-bucket DNS.
            "auto" => endpoint.is_some(),
            other => {
                return Err(config_err(format!(
                    "addressing-style {other:?} is not path, virtual or auto"
                )));
            }
        };
        let tuning = &opts.s3;
        tuning.check().map_err(config_err)?;
        let retries = tuning.retries;
        let concurrency = tuning.concurrency;
        let storage_class = url.param("storage-class").map(StorageClass::from);
        // Undocumented, for tests: exercise the multi-part copy with small objects.
        let copy_part = match std::env::var(COPY_PART_ENV) {
            Err(_) => COPY_LIMIT,
            Ok(v) => match v.parse::<u64>() {
                Ok(n) if (MIN_S3_PART..=COPY_LIMIT).contains(&n) => n,
                _ => {
                    return Err(config_err(format!(
                        "{COPY_PART_ENV}={v:?} is not a number of bytes from {MIN_S3_PART} to {COPY_LIMIT}"
                    )));
                }
            },
        };

        let region = url
            .param("region")
            .map(|r| aws_config::Region::new(r.to_owned()));
        let profile = url.param("profile").map(str::to_owned);
        let sdk = rt.block_on(async {
            let region = aws_config::meta::region::RegionProviderChain::first_try(region)
                .or_default_provider()
                .or_else("us-east-1");
            let mut loader =
                aws_config::defaults(aws_config::BehaviorVersion::latest()).region(region);
            if let Some(p) = profile {
                loader = loader.profile_name(p);
            }
            loader.load().await
        });
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(tuning.connect_timeout)
            .read_timeout(tuning.read_timeout)
            .build();
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(path_style)
            // Checksums only where S3 requires them: Garage, R2 and older MinIO reject
            // the newer default checksum headers.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            // Retries are ours (see `retry`), so Retry-After is honoured and fatal errors
            // are told apart.
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(e) = endpoint {
            conf = conf.endpoint_url(e);
        }
        if let Some(c) = credentials {
            conf = conf.credentials_provider(c);
        }
        let client = aws_sdk_s3::Client::from_conf(conf.build());
        Ok(S3Cache {
            shared: Arc::new(Shared {
                client,
                bucket: bucket.to_owned(),
                url: url.original.clone(),
                storage_class,
                retries,
                copy_part,
                rt,
                memory: Arc::new(UploadMemory::new(
                    opts.upload_memory.max(tuning.min_part_size),
                )),
                min_part: tuning.min_part_size,
            }),
            concurrency,
        })
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.shared.rt.block_on(f)
    }

    /// [`BinaryCache::sweep_orphans`] for the keys that start with `STAGING_PREFIX` +
    /// `under` (uploads and objects) or `nar/` + `under` (uploads only), removing what is
    /// older than `cutoff` (for tests, which share a bucket: they sweep only their own
    /// keys, at a cutoff of their choosing).
    ///
    /// # Errors
    /// [`CacheError`] when listing fails; a failed delete or abort is logged and skipped.
    #[doc(hidden)]
    pub fn sweep_staging(&self, under: &str, cutoff: SystemTime) -> Result<u64, CacheError> {
        let prefix = format!("{STAGING_PREFIX}{under}");
        self.sweep(&[&prefix, &format!("nar/{under}")], &prefix, cutoff)
    }

    /// Aborts the multipart uploads under each of `upload_prefixes` and deletes the
    /// objects under `object_prefix` that are older than `cutoff`.
    fn sweep(
        &self,
        upload_prefixes: &[&str],
        object_prefix: &str,
        cutoff: SystemTime,
    ) -> Result<u64, CacheError> {
        let s = &self.shared;
        self.block_on(async {
            let mut removed = 0u64;
            let older = |t: Option<&aws_sdk_s3::primitives::DateTime>| {
                t.and_then(|t| SystemTime::try_from(*t).ok())
                    .is_some_and(|t| t < cutoff)
            };
            // Unfinished multipart uploads first: completing one would create a staging
            // object the listing below might miss.
            for &prefix in upload_prefixes {
                let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
                loop {
                    let page = s
                        .retry("ListMultipartUploads", prefix, || {
                            s.client
                                .list_multipart_uploads()
                                .bucket(&s.bucket)
                                .prefix(prefix)
                                .set_key_marker(key_marker.clone())
                                .set_upload_id_marker(id_marker.clone())
                                .send()
                        })
                        .await?;
                    for u in page.uploads() {
                        let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                            continue;
                        };
                        if !key.starts_with(prefix) || !older(u.initiated()) {
                            continue;
                        }
                        let r = s.abort(key, id).await;
                        match r {
                            Ok(_) => removed += 1,
                            Err(e) => {
                                tracing::warn!(
                                    "could not abort the orphaned upload {id} of {key}: {e}"
                                )
                            }
                        }
                    }
                    match (page.next_key_marker(), page.next_upload_id_marker()) {
                        (Some(k), id) if page.is_truncated() == Some(true) => {
                            key_marker = Some(k.to_owned());
                            id_marker = id.map(str::to_owned);
                        }
                        _ => break,
                    }
                }
            }
            let prefix = object_prefix;
            let mut token = None::<String>;
            loop {
                let page = s
                    .retry("ListObjectsV2", prefix, || {
                        s.client
                            .list_objects_v2()
                            .bucket(&s.bucket)
                            .prefix(prefix)
                            .set_continuation_token(token.clone())
                            .send()
                    })
                    .await?;
                for o in page.contents() {
                    let Some(key) = o.key() else { continue };
                    if !key.starts_with(prefix) || !older(o.last_modified()) {
                        continue;
                    }
                    match s.delete(key).await {
                        Ok(()) => removed += 1,
                        Err(e) => tracing::warn!(
                            "could not delete the orphaned staging object {key}: {e}"
                        ),
                    }
                }
                match page.next_continuation_token() {
                    Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                    _ => break,
                }
            }
            Ok(removed)
        })
    }
}

/// Part size for a NAR of `nar_size` bytes: at least [`MIN_PART`], and large enough that
/// even a NAR that does not compress at all fits in [`MAX_PARTS`] parts.
pub fn part_size(nar_size: u64) -> u64 {
    let worst = nar_size + nar_size / 64 + (1 << 20);
    worst
        .div_ceil(MAX_PARTS)
        .next_multiple_of(1 << 20)
        .max(MIN_PART)
}

/// An upper bound on the compressed size of a NAR of `nar_size` bytes: zstd and xz add
/// well under 1/64 to incompressible data, plus a few hundred bytes of framing per chunk
/// (chunks are at least 64 KiB, so 1/64 covers those too) and per stream.
fn compressed_bound(nar_size: u64) -> u64 {
    nar_size + nar_size / 64 + (64 << 10)
}

/// Parts of one upload in flight at once, for parts of `part` bytes and `capacity` bytes
/// of upload memory: at most [`PARTS_IN_FLIGHT`], and together no more than a
/// [`PART_SHARE`] of the memory (at least one).
fn parts_in_flight(part: u64, capacity: u64) -> usize {
    usize::try_from(capacity / PART_SHARE / part.max(1))
        .unwrap_or(usize::MAX)
        .clamp(1, PARTS_IN_FLIGHT)
}

/// The S3 upload memory: bytes of NAR data buffered on their way to S3.
///
/// A buffer reserves the whole part it will hold before the first byte goes in (no
/// hold-and-wait: a writer never holds part of a buffer while waiting for the rest), and
/// a part in flight keeps its reservation until its request is done. Reservations of
/// buffers still being filled are counted apart: they are only released by the thread
/// that fills them, which may be the very thread that waits. So a reservation waits only
/// while parts in flight (which finish on their own) can still free enough; when only
/// buffers being filled hold the memory, waiting could never end, and the reservation is
/// granted beyond the capacity instead (by at most those buffers) — never a deadlock.
#[derive(Debug)]
struct UploadMemory {
    capacity: u64,
    state: std::sync::Mutex<MemoryState>,
    freed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct MemoryState {
    /// Bytes reserved in all.
    reserved: u64,
    /// Of those, reserved by buffers being filled.
    filling: u64,
}

impl UploadMemory {
    fn new(capacity: u64) -> Self {
        UploadMemory {
            capacity,
            state: std::sync::Mutex::new(MemoryState::default()),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Reserves `bytes` for a buffer about to be filled.
    fn reserve(self: &Arc<Self>, bytes: u64) -> Reservation {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.reserved + bytes > self.capacity
            && st.filling + bytes <= self.capacity
            && st.reserved > st.filling
        {
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.reserved + bytes > self.capacity {
            tracing::debug!(
                "S3 upload memory: {bytes} bytes granted beyond {} ({} held by buffers being filled)",
                self.capacity,
                st.filling
            );
        }
        st.reserved += bytes;
        st.filling += bytes;
        Reservation {
            memory: self.clone(),
            bytes,
            filling: true,
        }
    }
}

/// Bytes of [`UploadMemory`], returned when dropped.
#[derive(Debug)]
struct Reservation {
    memory: Arc<UploadMemory>,
    bytes: u64,
    /// Held by a buffer being filled (else by a request in flight).
    filling: bool,
}

impl Reservation {
    /// The buffer is full and goes out in a request, which releases it on its own.
    fn in_flight(mut self) -> Self {
        if self.filling {
            let mut st = self.memory.state.lock().unwrap_or_else(|e| e.into_inner());
            st.filling -= self.bytes;
            self.filling = false;
            drop(st);
            // A waiter may now see that waiting can succeed.
            self.memory.freed.notify_all();
        }
        self
    }
}

impl Reservation {
    /// Takes over `other`'s bytes (both held by the same buffer being filled).
    fn absorb(&mut self, mut other: Reservation) {
        debug_assert!(self.filling && other.filling);
        self.bytes += other.bytes;
        other.bytes = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = self.memory.state.lock().unwrap_or_else(|e| e.into_inner());
        st.reserved -= self.bytes;
        if self.filling {
            st.filling -= self.bytes;
        }
        drop(st);
        self.memory.freed.notify_all();
    }
}

/// How a failed request should be handled.
enum Failure {
    /// Worth another try, after at least this long (from Retry-After).
    Retry(Option<Duration>),
    /// Retrying cannot help.
    Fatal,
}

fn classify<E: ProvideErrorMetadata, R>(
    e: &SdkError<E, R>,
    status: Option<u16>,
    retry_after: Option<Duration>,
) -> Failure {
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Failure::Retry(retry_after)
        }
        // S3 may answer 200 with an error document (CompleteMultipartUpload, CopyObject):
        // the code, not the status, says whether to retry.
        SdkError::ServiceError(_) => match (status, e.code()) {
            (Some(408 | 429) | Some(500..=599), _)
            | (_, Some("InternalError" | "SlowDown" | "ServiceUnavailable" | "RequestTimeout")) => {
                Failure::Retry(retry_after)
            }
            _ => Failure::Fatal,
        },
        _ => Failure::Fatal,
    }
}

impl Shared {
    /// Runs `op` until it succeeds, fails fatally or runs out of retries.
    async fn retry<T, E, F, Fut>(&self, what: &str, key: &str, mut op: F) -> Result<T, CacheError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<
                Output = Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
            >,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mut attempt = 0u32;
        loop {
            let e = match op().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let status = e.raw_response().map(|r| r.status().as_u16());
            let retry_after = e
                .raw_response()
                .and_then(|r| r.headers().get("retry-after"))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|s| Duration::from_secs_f64(s.clamp(0.0, 60.0)));
            match classify(&e, status, retry_after) {
                Failure::Retry(after) if attempt < self.retries => {
                    let wait = backoff(attempt).max(after.unwrap_or_default());
                    tracing::debug!(
                        "{what} {key}: {} (retry {} in {wait:?})",
                        describe(&e, status),
                        attempt + 1
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Failure::Retry(_) => {
                    return Err(CacheError::Remote {
                        cache: self.url.clone(),
                        key: key.to_owned(),
                        message: format!(
                            "{what}: {} (gave up after {} retries)",
                            describe(&e, status),
                            attempt
                        ),
                        transient: true,
                    });
                }
                Failure::Fatal => return Err(self.fatal(what, key, &e, status)),
            }
        }
    }

    fn fatal<E: ProvideErrorMetadata, R>(
        &self,
        what: &str,
        key: &str,
        e: &SdkError<E, R>,
        status: Option<u16>,
    ) -> CacheError
    where
        SdkError<E, R>: std::error::Error,
    {
        let code = e.code().unwrap_or_default();
        let hint = match (status, code) {
            (_, "NoSuchBucket") => Some(format!("bucket {:?} does not exist", self.bucket)),
            (Some(401 | 403), _)
            | (_, "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied") => {
                Some(format!(
                    "access denied to bucket {:?}: check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) and the bucket policy",
                    self.bucket
                ))
            }
            _ => None,
        };
        match hint {
            Some(h) => CacheError::Config(format!("{}: {h} ({})", self.url, describe(e, status))),
            None => CacheError::Remote {
                cache: self.url.clone(),
                key: key.to_owned(),
                message: format!("{what}: {}", describe(e, status)),
                transient: false,
            },
        }
    }

    async fn put(
        &self,
        key: &str,
        body: bytes::Bytes,
        content_type: &str,
    ) -> Result<(), CacheError> {
        self.retry("PutObject", key, || {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_type(content_type)
                .set_storage_class(self.storage_class.clone())
                .body(ByteStream::from(body.clone()))
                .send()
        })
        .await
        .map(drop)
    }

    /// Aborts the multipart upload `id` on `key`. One that is gone already (completed or
    /// aborted: NoSuchUpload) counts as aborted.
    async fn abort(&self, key: &str, id: &str) -> Result<(), CacheError> {
        self.retry("AbortMultipartUpload", key, || async {
            match self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(id)
                .send()
                .await
            {
                Err(e) if e.code() == Some("NoSuchUpload") => Ok(()),
                r => r.map(drop),
            }
        })
        .await
    }

    async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        Ok(self.size(key).await?.is_some())
    }

    /// Checks, after an answer that left the outcome of `what` unknown, that `key` exists
    /// with `size` bytes.
    ///
    /// # Errors
    /// A transient [`CacheError::Remote`] when it does not (the caller's cleanup removes
    /// whatever was made).
    async fn check_size(&self, key: &str, size: u64, what: &str) -> Result<(), CacheError> {
        // A missing Content-Length reads as 0: never the size of a multipart upload.
        let found = self.size(key).await?;
        let problem = match found {
            Some(n) if n == size => return Ok(()),
            Some(n) => format!("it has {n} bytes, not {size}"),
            None => "it does not exist".to_owned(),
        };
        Err(CacheError::Remote {
            cache: self.url.clone(),
            key: key.to_owned(),
            message: format!("{what} answered with nothing narflow can read, and {problem}"),
            transient: true,
        })
    }

    /// Copies `staging` (`size` bytes) to `key` with one CopyObject.
    async fn copy(&self, staging: &str, key: &str, size: u64) -> Result<(), CacheError> {
        let source = format!("{}/{staging}", self.bucket);
        let answer = self
            .retry("CopyObject", key, || async {
                let r = self
                    .client
                    .copy_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .copy_source(&source)
                    .content_type(NAR_TYPE)
                    .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
                    .set_storage_class(self.storage_class.clone())
                    .send()
                    .await;
                match r {
                    Ok(_) => Ok(Answer::Done),
                    Err(e) if unreadable_success(&e) => Ok(Answer::Unknown),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if answer == Answer::Unknown {
            self.check_size(key, size, "CopyObject").await?;
        }
        Ok(())
    }

    /// Copies `staging` (`size` bytes) to `key` server-side in parts (UploadPartCopy),
    /// for objects beyond what one CopyObject may copy. A failure aborts the copy's
    /// multipart upload.
    async fn copy_in_parts(
        self: &Arc<Self>,
        staging: &str,
        key: &str,
        size: u64,
    ) -> Result<(), CacheError> {
        let part = self
            .copy_part
            .min(COPY_PART)
            .max(size.div_ceil(10_000).next_multiple_of(1 << 20))
            .max(MIN_S3_PART);
        let created = self
            .retry("CreateMultipartUpload", key, || {
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .content_type(NAR_TYPE)
                    .set_storage_class(self.storage_class.clone())
                    .send()
            })
            .await?;
        let id = created.upload_id().unwrap_or_default().to_owned();
        let r = self.copy_parts(staging, key, &id, size, part).await;
        if r.is_err() {
            let abort = self.abort(key, &id).await;
            if let Err(e) = abort {
                tracing::warn!("could not abort the multi-part copy {id} to {key}: {e}");
            }
        }
        r
    }

    async fn copy_parts(
        self: &Arc<Self>,
        staging: &str,
        key: &str,
        id: &str,
        size: u64,
        part: u64,
    ) -> Result<(), CacheError> {
        let source = format!("{}/{staging}", self.bucket);
        let ranges: Vec<(i32, u64, u64)> = (0..size.div_ceil(part))
            .map(|i| {
                let start = i * part;
                (i as i32 + 1, start, (start + part).min(size) - 1)
            })
            .collect();
        let mut done = Vec::with_capacity(ranges.len());
        let mut parts = ranges.into_iter();
        let mut set = JoinSet::new();
        loop {
            while set.len() < COPY_PARTS_IN_FLIGHT {
                let Some((number, first, last)) = parts.next() else {
                    break;
                };
                let (s, source, key, id) =
                    (self.clone(), source.clone(), key.to_owned(), id.to_owned());
                set.spawn(async move {
                    let out = s
                        .retry("UploadPartCopy", &key, || {
                            s.client
                                .upload_part_copy()
                                .bucket(&s.bucket)
                                .key(&key)
                                .upload_id(&id)
                                .part_number(number)
                                .copy_source(&source)
                                .copy_source_range(format!("bytes={first}-{last}"))
                                .send()
                        })
                        .await?;
                    Ok::<_, CacheError>(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(
                                out.copy_part_result()
                                    .and_then(|r| r.e_tag())
                                    .map(str::to_owned),
                            )
                            .build(),
                    )
                });
            }
            match set.join_next().await {
                None => break,
                Some(r) => done.push(r.map_err(|e| join_error(&self.url, e))??),
            }
        }
        done.sort_by_key(|p| p.part_number());
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(done))
            .build();
        let answer = self
            .retry("CompleteMultipartUpload", key, || async {
                let r = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(id)
                    .multipart_upload(completed.clone())
                    .send()
                    .await;
                match r {
                    Ok(_) => Ok(Answer::Done),
                    Err(e) if e.code() == Some("NoSuchUpload") || unreadable_success(&e) => {
                        Ok(Answer::Unknown)
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        if answer == Answer::Unknown {
            self.check_size(key, size, "CompleteMultipartUpload")
                .await?;
        }
        Ok(())
    }

    async fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
        let Some(bytes) = self.get_bytes(key).await? else {
            return Ok(None);
        };
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| CacheError::Config(format!("{}: {key} is not UTF-8 text", self.url)))
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.retry("DeleteObject", key, || {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
        })
        .await
        .map(drop)
    }

    /// Lists the narinfo keys at the bucket's root, giving up (None) once the listing
    /// would take more requests than `budget`.
    async fn list_narinfos(
        &self,
        budget: usize,
    ) -> Result<Option<std::collections::HashSet<String>>, CacheError> {
        let mut keys = std::collections::HashSet::new();
        let mut token: Option<String> = None;
        for _ in 0..budget.max(1) {
            let page = self
                .retry("ListObjectsV2", "", || {
                    self.client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .delimiter("/")
                        .set_continuation_token(token.clone())
                        .send()
                })
                .await?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter(|k| k.ends_with(".narinfo"))
                    .map(str::to_owned),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(Some(keys)),
            }
        }
        Ok(None)
    }
}

/// Jittered exponential backoff: a random wait up to 200 ms × 2^attempt, at most 10 s.
fn backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let cap = (200u64 << attempt.min(10)).min(10_000);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    Duration::from_millis(cap / 2 + h.finish() % (cap / 2 + 1))
}

fn describe<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>, status: Option<u16>) -> String
where
    SdkError<E, R>: std::error::Error,
{
    match (e.code(), e.message(), status) {
        (Some(code), Some(msg), Some(s)) => format!("HTTP {s} {code}: {msg}"),
        (Some(code), None, Some(s)) => format!("HTTP {s} {code}"),
        (None, _, Some(s)) => format!("HTTP {s}"),
        _ => format!("{}", aws_sdk_s3::error::DisplayErrorContext(e)),
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
                    return Ok(keys.iter().map(|k| present.contains(k)).collect());
                }
            }
            concurrently(&s, keys, |s, key| async move { s.exists(&key).await }).await
        })
    }

    fn has_object(&self, key: &str) -> Result<bool, CacheError> {
        self.block_on(self.shared.exists(key))
    }

    fn begin_nar(&self, nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError> {
        let part = part_size(nar_size).max(self.shared.min_part);
        let capacity = self.shared.memory.capacity;
        if part > capacity / PART_SHARE {
            let memory = part * PART_SHARE;
            return Err(CacheError::Config(format!(
                "{}: a NAR of {nar_size} bytes goes up in parts of {part} bytes, more than \
                 1/{PART_SHARE} of the S3 upload memory ({capacity} bytes); it needs an upload \
                 memory of {} or more (raise --memory)",
                self.shared.url,
                human_size(memory)
            )));
        }
        Ok(Box::new(S3NarUpload {
            shared: self.shared.clone(),
            part_size: part as usize,
            parts_in_flight: parts_in_flight(part, capacity),
            // The first buffer holds the whole NAR when it stays below one part.
            first_reserve: compressed_bound(nar_size).min(part),
            buf: Vec::new(),
            reservation: None,
            multipart: None,
        }))
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
                while set.len() < BATCH_CONCURRENCY {
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

    fn sync(&self) -> Result<(), CacheError> {
        // A successful PUT or CompleteMultipartUpload is durable on S3.
        Ok(())
    }

    fn upload_concurrency(&self) -> usize {
        self.concurrency
    }

    fn object_size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        self.block_on(self.shared.size(key))
    }

    fn get_narinfo(&self, path: &StorePath) -> Result<Option<String>, CacheError> {
        self.block_on(self.shared.get_text_lossy(&super::narinfo_key(path)))
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

    /// Aborts the multipart uploads under the staging prefix and under `nar/` (a
    /// multi-part copy to a final key whose push was killed), and deletes the staging
    /// objects, that were started (Initiated) or written (LastModified) more than `grace`
    /// ago by this machine's clock; younger ones may belong to an upload running elsewhere.
    /// Objects under `nar/` are never deleted here.
    fn sweep_orphans(&self, grace: Duration) -> Result<u64, CacheError> {
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.sweep(&[STAGING_PREFIX, "nar/"], STAGING_PREFIX, cutoff)
    }
}

/// Reading existing objects, for the narinfo merge rule.
impl Shared {
    /// The size of `key` from a HEAD, or `None` when it does not exist.
    async fn size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        self.retry("HeadObject", key, || async {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(o) => Ok(Some(o.content_length().unwrap_or_default().max(0) as u64)),
                Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// The text of `key`, or `None` when it does not exist. Text that is not UTF-8 is
    /// converted lossily (a damaged narinfo, which then fails to parse and is replaced).
    async fn get_text_lossy(&self, key: &str) -> Result<Option<String>, CacheError> {
        let bytes = self.get_bytes(key).await?;
        Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let out = self
            .retry("GetObject", key, || async {
                match self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await
                {
                    Ok(o) => Ok(Some(o)),
                    Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        let Some(out) = out else { return Ok(None) };
        let body = out.body.collect().await.map_err(|e| CacheError::Remote {
            cache: self.url.clone(),
            key: key.to_owned(),
            message: format!("reading the body: {e}"),
            transient: true,
        })?;
        Ok(Some(body.to_vec()))
    }
}

/// `bytes` in MiB, rounded up, as `--memory` takes it (`123M`).
fn human_size(bytes: u64) -> String {
    format!("{}M", bytes.div_ceil(1 << 20))
}

/// Aborts every multipart upload on `key` but `keep` (best effort: failures are logged).
async fn abort_others(s: &Shared, key: &str, keep: &str) {
    let listed = s
        .retry("ListMultipartUploads", key, || {
            s.client
                .list_multipart_uploads()
                .bucket(&s.bucket)
                .prefix(key)
                .send()
        })
        .await;
    let uploads = match listed {
        Ok(l) => l.uploads().to_vec(),
        Err(e) => return tracing::warn!("could not list multipart uploads of {key}: {e}"),
    };
    for u in uploads {
        let (Some(k), Some(id)) = (u.key(), u.upload_id()) else {
            continue;
        };
        if k != key || id == keep {
            continue;
        }
        let r = s.abort(key, id).await;
        if let Err(e) = r {
            tracing::warn!("could not abort the orphaned multipart upload {id} of {key}: {e}");
        }
    }
}

/// Runs `op` on every key, [`BATCH_CONCURRENCY`] at a time; the answers in the keys'
/// order. The first error is returned (the requests still running are dropped).
async fn concurrently<T, Fut>(
    s: &Arc<Shared>,
    keys: Vec<String>,
    op: impl Fn(Arc<Shared>, String) -> Fut,
) -> Result<Vec<T>, CacheError>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = Result<T, CacheError>> + Send + 'static,
{
    let mut out: Vec<Option<T>> = (0..keys.len()).map(|_| None).collect();
    let mut keys = keys.into_iter().enumerate();
    let mut set = JoinSet::new();
    loop {
        while set.len() < BATCH_CONCURRENCY {
            let Some((i, key)) = keys.next() else { break };
            let request = op(s.clone(), key);
            set.spawn(async move { (i, request.await) });
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        let (i, answer) = done.map_err(|e| join_error(&s.url, e))?;
        out[i] = Some(answer?);
    }
    Ok(out
        .into_iter()
        .map(|a| a.expect("every request was answered"))
        .collect())
}

fn join_error(url: &str, e: tokio::task::JoinError) -> CacheError {
    CacheError::Remote {
        cache: url.to_owned(),
        key: String::new(),
        message: format!("request task failed: {e}"),
        transient: false,
    }
}

/// What a request whose outcome must be known did, as far as its answer tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Done,
    /// The answer was lost, unreadable, or says the work is already done: check it.
    Unknown,
}

/// A `2xx` answer whose document the SDK could not read (some S3-compatible servers send
/// another root element for CompleteMultipartUpload): the server may well have done the
/// work, so the outcome is unknown, not a failure. A 200 carrying an S3 error document has
/// a code and is handled as that error.
fn unreadable_success<E: ProvideErrorMetadata>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    e.raw_response().is_some_and(|r| r.status().is_success()) && e.code().is_none()
}

/// A multipart upload to a staging key.
struct Multipart {
    staging: String,
    /// Cleared once the upload is known to be complete (nothing left to abort).
    upload_id: String,
    /// Bytes sent in parts so far: what the staging object must hold once complete.
    sent: u64,
    /// A CompleteMultipartUpload was sent: the staging object may exist.
    completing: bool,
    next_part: i32,
    in_flight: JoinSet<Result<CompletedPart, CacheError>>,
    done: Vec<CompletedPart>,
}

/// A NAR on its way to S3: buffered until it is known to be small (one PUT) or a part is
/// full (multipart). Dropped without commit, it cleans up after itself.
struct S3NarUpload {
    shared: Arc<Shared>,
    part_size: usize,
    parts_in_flight: usize,
    /// What the first buffer reserves: the whole compressed NAR when it fits in a part.
    first_reserve: u64,
    buf: Vec<u8>,
    /// The upload memory reserved for `buf` (taken before its first byte).
    reservation: Option<Reservation>,
    multipart: Option<Multipart>,
}

impl S3NarUpload {
    fn staging_key() -> String {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        format!(
            "{STAGING_PREFIX}{:016x}{:08x}",
            h.finish(),
            std::process::id()
        )
    }

    /// Sends the buffer as the next part (starting the multipart upload if needed), then
    /// waits while too many parts are in flight.
    fn send_part(&mut self) -> Result<(), CacheError> {
        let s = self.shared.clone();
        if self.multipart.is_none() {
            let staging = Self::staging_key();
            let id =
                s.rt.block_on(s.retry("CreateMultipartUpload", &staging, || {
                    s.client
                        .create_multipart_upload()
                        .bucket(&s.bucket)
                        .key(&staging)
                        .content_type(NAR_TYPE)
                        .set_storage_class(s.storage_class.clone())
                        .send()
                }))?;
            let upload_id = id.upload_id().unwrap_or_default().to_owned();
            self.multipart = Some(Multipart {
                staging,
                upload_id,
                sent: 0,
                completing: false,
                next_part: 1,
                in_flight: JoinSet::new(),
                done: Vec::new(),
            });
        }
        let m = self.multipart.as_mut().expect("started above");
        let body = bytes::Bytes::from(std::mem::take(&mut self.buf));
        m.sent += body.len() as u64;
        let reservation = self.reservation.take().map(Reservation::in_flight);
        let (number, key, id, task_shared) = (
            m.next_part,
            m.staging.clone(),
            m.upload_id.clone(),
            s.clone(),
        );
        m.next_part += 1;
        let _guard = s.rt.enter();
        m.in_flight.spawn(async move {
            let s = task_shared;
            let out = s
                .retry("UploadPart", &key, || {
                    s.client
                        .upload_part()
                        .bucket(&s.bucket)
                        .key(&key)
                        .upload_id(&id)
                        .part_number(number)
                        .body(ByteStream::from(body.clone()))
                        .send()
                })
                .await?;
            drop(reservation); // the part's bytes are sent: give their memory back
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .build())
        });
        while m.in_flight.len() >= self.parts_in_flight {
            Self::join_one(&s, m)?;
        }
        Ok(())
    }

    fn join_one(s: &Shared, m: &mut Multipart) -> Result<(), CacheError> {
        if let Some(r) = s.rt.block_on(m.in_flight.join_next()) {
            m.done.push(r.map_err(|e| join_error(&s.url, e))??);
        }
        Ok(())
    }

    fn finish_multipart(&mut self, key: &str) -> Result<(), CacheError> {
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        let s = self.shared.clone();
        let m = self.multipart.as_mut().expect("multipart upload");
        while !m.in_flight.is_empty() {
            Self::join_one(&s, m)?;
        }
        m.done.sort_by_key(|p| p.part_number());
        let parts = CompletedMultipartUpload::builder()
            .set_parts(Some(m.done.clone()))
            .build();
        let (staging, upload_id, size) = (m.staging.clone(), m.upload_id.clone(), m.sent);
        // From the first Complete on, the staging object may exist: Drop deletes it too.
        m.completing = true;
        let sent_before = std::sync::atomic::AtomicBool::new(false);
        let answer =
            s.rt.block_on(s.retry("CompleteMultipartUpload", &staging, || async {
                let retried = sent_before.swap(true, std::sync::atomic::Ordering::Relaxed);
                let r = s
                    .client
                    .complete_multipart_upload()
                    .bucket(&s.bucket)
                    .key(&staging)
                    .upload_id(&upload_id)
                    .multipart_upload(parts.clone())
                    .send()
                    .await;
                match r {
                    Ok(_) => Ok(Answer::Done),
                    // A retry after a lost response: the first attempt may have completed it.
                    Err(e) if e.code() == Some("NoSuchUpload") => Ok(Answer::Unknown),
                    Err(e) if unreadable_success(&e) => Ok(Answer::Unknown),
                    // A retry after an attempt whose outcome is unknown: some servers (moto)
                    // answer a completed upload's id with a 500, not NoSuchUpload.
                    Err(_)
                        if retried
                            && s.check_size(&staging, size, "CompleteMultipartUpload")
                                .await
                                .is_ok() =>
                    {
                        Ok(Answer::Done)
                    }
                    Err(e) => Err(e),
                }
            }))?;
        if answer == Answer::Unknown {
            s.rt.block_on(s.check_size(&staging, size, "CompleteMultipartUpload"))?;
        }
        // The staging object exists and is complete: nothing is left to abort.
        m.upload_id.clear();
        // A CreateMultipartUpload whose response was lost and retried leaves another
        // upload on the same (unique) staging key: abort any such orphan.
        s.rt.block_on(abort_others(&s, &staging, &upload_id));
        if size > s.copy_part {
            s.rt.block_on(s.copy_in_parts(&staging, key, size))?;
        } else {
            s.rt.block_on(s.copy(&staging, key, size))?;
        }
        let staging = std::mem::take(&mut m.staging);
        self.multipart = None;
        if let Err(e) = s.rt.block_on(s.delete(&staging)) {
            tracing::warn!("could not delete the staging object {staging}: {e}");
        }
        Ok(())
    }
}

impl Write for S3NarUpload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            let reserved = match &mut self.reservation {
                Some(r) => r.bytes,
                None => {
                    let bytes = if self.multipart.is_none() && self.buf.is_empty() {
                        self.first_reserve
                    } else {
                        self.part_size as u64
                    };
                    self.reservation = Some(self.shared.memory.reserve(bytes));
                    bytes
                }
            };
            let room = (self.part_size - self.buf.len()).min(rest.len());
            let (now, later) = rest.split_at(room);
            let needed = (self.buf.len() + now.len()) as u64;
            if needed > reserved {
                // The compressed NAR outgrew its estimate: reserve the whole part (the
                // buffer's bytes stay counted meanwhile, so this is no hold-and-wait).
                let more = self.shared.memory.reserve(self.part_size as u64 - reserved);
                self.reservation
                    .as_mut()
                    .expect("reserved above")
                    .absorb(more);
            }
            self.buf.extend_from_slice(now);
            rest = later;
            if self.buf.len() >= self.part_size {
                self.send_part().map_err(io::Error::other)?;
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl NarUpload for S3NarUpload {
    fn commit(mut self: Box<Self>, key: &str) -> Result<(), CacheError> {
        if self.multipart.is_some() {
            return self.finish_multipart(key);
        }
        let body = bytes::Bytes::from(std::mem::take(&mut self.buf));
        // Released when the PUT is done, without waiting for anyone.
        let _reservation = self.reservation.take().map(Reservation::in_flight);
        let s = self.shared.clone();
        s.rt.block_on(s.put(key, body, NAR_TYPE))
    }
}

impl Drop for S3NarUpload {
    fn drop(&mut self) {
        let Some(m) = self.multipart.take() else {
            return;
        };
        let s = self.shared.clone();
        let mut in_flight = m.in_flight;
        s.rt.block_on(async {
            in_flight.shutdown().await;
            if !m.upload_id.is_empty() {
                // Completed (or aborted) already counts as aborted: the staging object
                // below is what may be left.
                let r = s.abort(&m.staging, &m.upload_id).await;
                if let Err(e) = r {
                    tracing::warn!("could not abort the multipart upload of {}: {e}", m.staging);
                }
            }
            // Once a Complete was sent the staging object may exist, whatever its answer
            // said; deleting a missing key succeeds.
            if (m.completing || m.upload_id.is_empty())
                && !m.staging.is_empty()
                && let Err(e) = s.delete(&m.staging).await
            {
                tracing::warn!("could not delete the staging object {}: {e}", m.staging);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::S3Tuning;

    #[test]
    fn part_sizes_fit_any_nar_in_the_part_limit() {
        assert_eq!(part_size(0), MIN_PART);
        assert_eq!(part_size(100 << 20), MIN_PART);
        for nar in [1u64 << 30, 100 << 30, 5 << 40] {
            let p = part_size(nar);
            assert!(p >= MIN_PART && p.is_multiple_of(1 << 20));
            // Even incompressible data (zstd adds < 1/64) fits in 10,000 parts.
            assert!((nar + nar / 64).div_ceil(p) <= 10_000, "{nar}: {p}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..20 {
            let b = backoff(attempt);
            let cap = (200u64 << attempt.min(10)).min(10_000);
            assert!(
                b.as_millis() as u64 >= cap / 2 && b.as_millis() as u64 <= cap,
                "{attempt}: {b:?}"
            );
        }
    }

    #[test]
    fn bad_parameters_are_config_errors() {
        let url = CacheUrl::parse("s3://b?addressing-style=sideways").unwrap();
        let opts = OpenOptions {
            upload_memory: 128 << 20,
            s3: S3Tuning::default(),
        };
        let e = S3Cache::open("b", &url, &opts).unwrap_err().to_string();
        assert!(e.contains("addressing-style \"sideways\""), "{e}");
        let url = CacheUrl::parse("s3://b?retries=many").unwrap();
        let e = S3Tuning::from_url(&url).unwrap_err().to_string();
        assert!(e.contains("bad value \"many\" for retries"), "{e}");
    }

    /// A stand-in S3 endpoint on loopback that accepts every request: it starts
    /// multipart uploads, takes parts (reading their bodies), and answers 200/204.
    fn accepting_server() -> String {
        use std::io::{BufRead, BufReader, Read};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { return };
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut w = conn;
                    loop {
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            head.push_str(&line);
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let len: u64 = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse().ok())?
                            })
                            .unwrap_or(0);
                        io::copy(&mut (&mut r).take(len), &mut io::sink()).unwrap();
                        let first = head.lines().next().unwrap_or_default().to_owned();
                        let body = if first.starts_with("POST") && first.contains("uploads") {
                            "<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>\
                             <UploadId>u</UploadId></InitiateMultipartUploadResult>"
                        } else {
                            ""
                        };
                        let status = if first.starts_with("DELETE") {
                            "204 No Content"
                        } else {
                            "200 OK"
                        };
                        let resp = format!(
                            "HTTP/1.1 {status}\r\nETag: \"e\"\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if w.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    fn cache_at(endpoint: &str, memory: u64) -> S3Cache {
        let url = CacheUrl::parse(&format!(
            "s3://b?endpoint={endpoint}&region=us-east-1&retries=0"
        ))
        .unwrap();
        let creds = aws_sdk_s3::config::Credentials::new("test", "test", None, None, "tests");
        let opts = OpenOptions {
            upload_memory: memory,
            s3: S3Tuning::from_url(&url).unwrap(),
        };
        S3Cache::build("b", &url, &opts, Some(creds)).unwrap()
    }

    /// Two NARs of about 560 GiB (parts of 65 MiB) assembled at once by one thread, as
    /// the sink does: with a budget taken a write at a time, each buffer held half the
    /// memory and waited for the rest forever. Reserving whole parts, both go on.
    #[test]
    fn two_huge_nars_assembled_together_do_not_deadlock() {
        let endpoint = accepting_server();
        let nar: u64 = 560 << 30;
        let memory = 320 << 20;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let worker = std::thread::spawn(move || {
            let cache = cache_at(&endpoint, memory);
            let part = part_size(nar);
            assert!(part > (128 << 20) / 2, "the case that deadlocked: {part}");
            let mut a = cache.begin_nar(nar).unwrap();
            let mut b = cache.begin_nar(nar).unwrap();
            let chunk = vec![7u8; 4 << 20];
            // Three parts' worth each, interleaved chunk by chunk.
            for _ in 0..(3 * part / chunk.len() as u64 + 1) {
                a.write_all(&chunk).unwrap();
                b.write_all(&chunk).unwrap();
            }
            drop((a, b)); // aborts both uploads
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !worker.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the two uploads are stuck waiting for each other's memory"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        worker.join().unwrap();
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// A NAR whose parts cannot fit the upload memory fails at once, saying which
    /// --memory would do (it used to wait forever for memory that could never be free).
    #[test]
    fn a_nar_too_large_for_the_memory_fails_naming_the_memory_it_needs() {
        let cache = cache_at("http://127.0.0.1:1", 64 << 20);
        let nar: u64 = 1100 << 30;
        let e = match cache.begin_nar(nar) {
            Ok(_) => panic!("a {nar}-byte NAR was accepted with 64 MiB"),
            Err(e) => e.to_string(),
        };
        let part = part_size(nar);
        let needed = part * PART_SHARE;
        assert!(
            e.contains(&format!("upload memory of {} or more", human_size(needed))),
            "{e}"
        );
        assert!(e.contains(&format!("{nar} bytes")), "{e}");
        // And that much memory does take it.
        let cache = cache_at("http://127.0.0.1:1", needed);
        assert!(cache.begin_nar(nar).is_ok());
    }

    /// Runs `f` on a thread and fails (instead of hanging) if it takes more than 30 s.
    fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let worker = std::thread::spawn(f);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !worker.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "stuck waiting for memory"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        worker.join().unwrap()
    }

    /// Three buffers filled by one thread, as the sink fills its open uploads: the third
    /// does not fit, and nothing but the other two (which only this thread can finish)
    /// holds the memory, so waiting would never end; it is granted instead.
    #[test]
    fn a_reservation_only_buffers_being_filled_could_free_is_granted() {
        let memory = Arc::new(UploadMemory::new(100));
        let held = within_deadline({
            let memory = memory.clone();
            move || [memory.reserve(40), memory.reserve(40), memory.reserve(40)]
        });
        assert_eq!(memory.state.lock().unwrap().reserved, 120);
        drop(held);
        assert_eq!(memory.state.lock().unwrap().reserved, 0);
    }

    /// While parts in flight hold the memory, a reservation waits for them (they finish
    /// on their own) instead of going beyond the capacity.
    #[test]
    fn a_reservation_waits_for_parts_in_flight() {
        let memory = Arc::new(UploadMemory::new(100));
        let part = memory.reserve(70).in_flight();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let waiter = {
            let memory = memory.clone();
            std::thread::spawn(move || {
                let r = memory.reserve(50);
                tx.send(()).unwrap();
                r
            })
        };
        // Not granted while the part is in flight: 70 + 50 > 100.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(part);
        rx.recv_timeout(Duration::from_secs(30))
            .expect("granted once the part is done");
        let r = waiter.join().unwrap();
        assert_eq!(memory.state.lock().unwrap().reserved, 50);
        drop(r);
    }

    #[test]
    fn parts_in_flight_shrink_as_parts_grow_but_never_below_one() {
        assert_eq!(parts_in_flight(8 << 20, 128 << 20), 4);
        assert_eq!(parts_in_flight(16 << 20, 128 << 20), 2);
        assert_eq!(parts_in_flight(32 << 20, 128 << 20), 1);
        assert_eq!(parts_in_flight(64 << 20, 128 << 20), 1);
    }
}
