//! NAR uploads: one PutObject for a NAR below one part, else a multipart upload to a
//! staging key copied server-side to its final key; the size of the parts and how many
//! go at once.
//! Other objects streamed in ([`crate::cache::BinaryCache::begin_object`]: build logs) go
//! up the same way, with their own Content-Type.
use super::memory::Reservation;
use super::resume::{PartPlan, Resumable, Tracked};
use super::retry::{Answer, Op, join_error, unreadable_success};
use super::{NAR_TYPE, STAGING_PREFIX, Shared};
use crate::cache::{CacheError, NarUpload};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::task::JoinSet;

/// Default part size (`s3.part-size`): S3 requires 5 MiB for every part but the last; a
/// little more keeps the request count down where the memory allows it.
pub(crate) const MIN_PART: u64 = 8 << 20;
/// Most parts of one NAR uploading at once: enough to keep a link busy while one part
/// waits for its answer. More would only take upload memory that other NARs finishing at
/// the same time (up to `S3Tuning::concurrency` of them) could use; fewer when parts are
/// large next to the upload memory or the concurrency is lower (see [`parts_in_flight`]).
const PARTS_IN_FLIGHT: usize = 4;
/// Parts of one NAR in flight whenever that many fit in the upload memory: one is filled
/// while the other goes up.
const OVERLAPPING_PARTS: u64 = 2;
/// A part may take at most this share of the upload memory, so that the parts being
/// filled of several NARs assembled at once fit beside each other; but never less than
/// S3's smallest part (see [`largest_part`]).
pub(crate) const PART_SHARE: u64 = 4;
/// The smallest part S3 takes (all but the last part of an upload).
pub(crate) const MIN_S3_PART: u64 = 5 << 20;

/// S3's most parts in one multipart upload.
const S3_MAX_PARTS: i32 = 10_000;
/// Parts sent at one size before it doubles, once an object has outgrown the size its
/// parts were planned for (see [`grown_part_size`]).
const GROW_EVERY: i32 = 1_000;

/// Part size for a NAR of `nar_size` bytes with the default part size and memory enough:
/// at least [`MIN_PART`] (8 MiB), and large enough that even a NAR that does not compress
/// at all fits in S3's 10,000 parts.
pub fn part_size(nar_size: u64) -> u64 {
    needed_part(nar_size).max(MIN_PART)
}

/// The smallest part (in whole MiB, at least S3's 5 MiB) that fits a NAR of `nar_size`
/// bytes, compressed or not, in S3's 10,000 parts: 5 MiB up to about 48 GiB.
fn needed_part(nar_size: u64) -> u64 {
    compressed_bound(nar_size)
        .div_ceil(S3_MAX_PARTS as u64)
        .next_multiple_of(1 << 20)
        .max(MIN_S3_PART)
}

/// The largest part `capacity` bytes of upload memory take: a [`PART_SHARE`] of it, but
/// never below S3's smallest part (a memory that small holds fewer parts at once instead:
/// see [`parts_in_flight`]).
pub(super) fn largest_part(capacity: u64) -> u64 {
    (capacity / PART_SHARE).max(MIN_S3_PART)
}

/// Part size for a NAR of `nar_size` bytes, with parts of `preferred` bytes configured
/// (`S3Tuning::min_part_size`) and `capacity` bytes of upload memory: `preferred` as far
/// as the memory allows (S3's 5 MiB at least), larger where the NAR needs larger parts
/// ([`needed_part`]; the caller checks those fit the memory).
fn part_size_for(nar_size: u64, preferred: u64, capacity: u64) -> u64 {
    needed_part(nar_size).max(preferred.min(largest_part(capacity)))
}

/// An upper bound on the compressed size of a NAR of `nar_size` bytes: zstd and xz add
/// well under 1/64 to incompressible data, plus a few hundred bytes of framing per chunk
/// (chunks are at least 64 KiB, so 1/64 covers those too) and per stream.
fn compressed_bound(nar_size: u64) -> u64 {
    nar_size + nar_size / 64 + (64 << 10)
}

/// Whether a NAR of `nar_size` bytes, however it compresses, stays below the smallest
/// part: its upload then sends nothing before its commit (one PutObject), whatever part
/// size it was planned with or resumes.
pub(super) fn one_put_whatever_it_compresses_to(nar_size: u64) -> bool {
    compressed_bound(nar_size) < MIN_S3_PART
}

/// The size of the parts after part number `parts` of an upload whose parts of `part`
/// bytes were planned for `planned` bytes, `sent` bytes of which are sent: the same while
/// the object stays within its plan (a NAR always does: its plan is a bound on its
/// compressed size); beyond it (an object whose size was only a hint, such as a
/// compressed log's), doubled every [`GROW_EVERY`] parts, as far as `largest`
/// ([`largest_part`] of the upload memory) allows. From [`MIN_PART`], doubling every
/// 1,000 parts reaches S3's largest object (5 TiB) within its 10,000 parts.
fn grown_part_size(part: u64, parts: i32, sent: u64, planned: u64, largest: u64) -> u64 {
    if sent <= planned || parts % GROW_EVERY != 0 {
        return part;
    }
    (part * 2).min(largest).max(part)
}

/// Parts of one upload held at once (the one being filled counts while the others are in
/// flight), for parts of `part` bytes and `capacity` bytes of upload memory: a
/// [`PART_SHARE`] of the memory's worth, or [`OVERLAPPING_PARTS`] where those fit, at
/// most [`PARTS_IN_FLIGHT`] and `concurrency`; one (fill, send, wait) when only one fits.
fn parts_in_flight(part: u64, capacity: u64, concurrency: usize) -> usize {
    let part = part.max(1);
    let parts = (capacity / PART_SHARE / part).max((capacity / part).min(OVERLAPPING_PARTS));
    usize::try_from(parts)
        .unwrap_or(usize::MAX)
        .clamp(1, PARTS_IN_FLIGHT.min(concurrency).max(1))
}

/// NARs committing at once (the pipeline's finishing threads) for `concurrency`, each in
/// one PutObject (or, with a permit of `concurrency`, completing a multipart upload):
/// twice `concurrency`, within `small_in_flight`. A NAR's bytes are held in the upload
/// memory from the moment it is written, whether it waits for a finisher or is in
/// flight, so more at once hold no more of it, only a thread and a connection each.
/// Measured with `scripts/bench-latency` (1,000 small paths, Garage on the same 2 cores,
/// answers held back 30 ms): 32 at once kept the NARs waiting on round trips; 256 (as
/// many as the small requests) had the server queue them (280 ms an answer against
/// 45 ms) and doubled the peak RSS; 64 kept it busy without a queue.
pub(super) fn one_put_commits(concurrency: usize, small_in_flight: usize) -> usize {
    concurrency.saturating_mul(2).min(small_in_flight).max(1)
}

/// `bytes` in MiB, rounded up, as `--memory` takes it (`123M`).
fn human_size(bytes: u64) -> String {
    format!("{}M", bytes.div_ceil(1 << 20))
}

/// Aborts every multipart upload on `key` but `keep` (all of them when `keep` is empty;
/// best effort: failures are logged).
async fn abort_others(s: &Shared, key: &str, keep: &str) {
    let listed = s
        .retry(Op::ListMultipartUploads, key, || {
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

/// A multipart upload to a staging key.
struct Multipart {
    staging: String,
    /// The staging key is this upload's: no sweep removes its upload or its object.
    /// Dropped last, once both are gone (or the upload is dropped).
    _owning: crate::cache::owned::Claim<String>,
    /// Cleared once the upload is known to be complete (nothing left to abort).
    upload_id: String,
    /// Bytes sent in parts so far: what the staging object must hold once complete.
    sent: u64,
    /// A CompleteMultipartUpload was sent: the staging object may exist.
    completing: bool,
    /// The server refused the upload for good (its Complete refused, or a part's upload
    /// gone): no later run can finish it, so a drop ends it, record and all.
    refused: Arc<AtomicBool>,
    next_part: i32,
    in_flight: JoinSet<Result<CompletedPart, CacheError>>,
    done: Vec<CompletedPart>,
    /// Its line in `BinaryCache::large_uploads` while it lives.
    progress: Tracked,
}

impl Multipart {
    /// The multipart upload `upload_id` on `staging` (which `owning` holds for it), from
    /// its first part.
    fn new(
        staging: String,
        owning: crate::cache::owned::Claim<String>,
        upload_id: String,
        progress: Tracked,
    ) -> Self {
        Multipart {
            staging,
            _owning: owning,
            upload_id,
            sent: 0,
            completing: false,
            refused: Arc::default(),
            next_part: 1,
            in_flight: JoinSet::new(),
            done: Vec::new(),
            progress,
        }
    }
}

/// A NAR (or another object) on its way to S3: buffered until it is known to be small (one
/// PUT) or a part is full (multipart). Dropped without commit, it cleans up after itself.
pub(super) struct S3NarUpload {
    shared: Arc<Shared>,
    /// The Content-Type of the object ([`NAR_TYPE`] for a NAR).
    content_type: String,
    part_size: usize,
    parts_in_flight: usize,
    /// The bytes `part_size` was chosen for; parts grow once more are sent
    /// ([`grown_part_size`]).
    planned: u64,
    /// What the first buffer reserves: the whole compressed NAR when it fits in a part.
    first_reserve: u64,
    buf: Vec<u8>,
    /// The upload memory reserved for `buf` (taken before its first byte).
    reservation: Option<Reservation>,
    /// Every byte is written ([`NarUpload::written`]).
    written: bool,
    multipart: Option<Multipart>,
    /// A resumable upload's journal and what the last run left
    /// ([`crate::cache::BinaryCache::begin_nar_resumable`]).
    resume: Option<Resumable>,
    /// Bytes of parts the server had, not sent again.
    resumed: u64,
}

impl S3NarUpload {
    /// Starts the upload of a NAR of `nar_size` bytes (nothing is sent yet).
    ///
    /// # Errors
    /// [`CacheError::Config`] when its parts cannot fit the upload memory.
    pub(super) fn begin(shared: &Arc<Shared>, nar_size: u64) -> Result<Self, CacheError> {
        Self::begin_as(shared, "a NAR", nar_size, NAR_TYPE)
    }

    /// [`S3NarUpload::begin`] for the NAR `identity` names, resumable when the cache has
    /// a journal: it goes on with the upload recorded for it, if any ([`Resumable::find`]).
    ///
    /// # Errors
    /// As [`S3NarUpload::begin`] and [`Resumable::find`].
    pub(super) fn begin_resumable(
        shared: &Arc<Shared>,
        nar_size: u64,
        identity: &crate::cache::resume::NarIdentity,
    ) -> Result<Self, CacheError> {
        let mut up = Self::begin(shared, nar_size)?;
        if let Some((resume, record)) = Resumable::find(shared, identity)? {
            up.resume = Some(resume);
            if let Some(r) = record {
                up.continue_multipart(r.key, r.upload_id, r.part_size);
            }
        }
        Ok(up)
    }

    /// Starts the upload of another object of about `size_hint` bytes, stored with
    /// `content_type` (nothing is sent yet). It may turn out larger: its parts then grow.
    ///
    /// # Errors
    /// [`CacheError::Config`] when its parts cannot fit the upload memory.
    pub(super) fn begin_object(
        shared: &Arc<Shared>,
        size_hint: u64,
        content_type: &str,
    ) -> Result<Self, CacheError> {
        Self::begin_as(shared, "an object", size_hint, content_type)
    }

    /// Starts the upload of `what`, of `size` bytes (a NAR's uncompressed size).
    fn begin_as(
        shared: &Arc<Shared>,
        what: &str,
        size: u64,
        content_type: &str,
    ) -> Result<Self, CacheError> {
        let capacity = shared.memory.capacity;
        let part = part_size_for(size, shared.min_part, capacity);
        if part > largest_part(capacity) {
            return Err(CacheError::Config(format!(
                "{}: {what} of {size} bytes needs S3 parts of {} to fit in S3's \
                 {S3_MAX_PARTS} parts, which need --memory {} or more",
                shared.url,
                crate::memory::Human(part),
                human_size(crate::cache::S3Tuning::memory_for_part(part))
            )));
        }
        Ok(S3NarUpload {
            shared: shared.clone(),
            content_type: content_type.to_owned(),
            part_size: part as usize,
            parts_in_flight: parts_in_flight(part, capacity, shared.concurrency),
            planned: compressed_bound(size),
            // The first buffer holds the whole NAR when it stays below one part.
            first_reserve: compressed_bound(size).min(part),
            buf: Vec::new(),
            reservation: None,
            written: false,
            multipart: None,
            resume: None,
            resumed: 0,
        })
    }

    /// Goes on with the multipart upload `upload_id` on `staging`, in parts of `part`
    /// bytes (those it was started with), from its first part.
    fn continue_multipart(&mut self, staging: String, upload_id: String, part: u64) {
        let s = &self.shared;
        self.part_size = part as usize;
        self.parts_in_flight = parts_in_flight(part, s.memory.capacity, s.concurrency);
        let owning = s.owned.staging_key(&staging);
        self.multipart = Some(Multipart::new(staging, owning, upload_id, self.track()));
    }

    /// This upload's line in the progress of the uploads in flight.
    fn track(&self) -> Tracked {
        let path = self.resume.as_ref().map(|r| r.identity.store_path.clone());
        self.shared
            .uploads
            .track(path, self.part_size as u64, self.planned)
    }

    fn staging_key() -> String {
        // Random (fastrand seeds each thread randomly), with the process id beside it.
        format!(
            "{STAGING_PREFIX}{:016x}{:08x}",
            fastrand::u64(..),
            std::process::id()
        )
    }

    /// Sends the buffer as the next part (starting the multipart upload if needed), then
    /// waits while too many parts are in flight.
    fn send_part(&mut self) -> Result<(), CacheError> {
        let s = self.shared.clone();
        if self.multipart.is_none() {
            let staging = Self::staging_key();
            // Before the upload exists, so that no sweep can see it unowned.
            let owning = s.owned.staging_key(&staging);
            let created =
                s.rt.block_on(s.retry(Op::CreateMultipartUpload, &staging, || {
                    s.client
                        .create_multipart_upload()
                        .bucket(&s.bucket)
                        .key(&staging)
                        .content_type(&self.content_type)
                        .set_storage_class(s.storage_class.clone())
                        .send()
                }));
            let id = match created {
                Ok(id) => id,
                Err(e) => {
                    // An answer lost or unreadable may hide an upload the server started:
                    // the staging key is this upload's own, so whatever is there is.
                    if e.is_transient() {
                        s.rt.block_on(abort_others(&s, &staging, ""));
                    }
                    return Err(e);
                }
            };
            let upload_id = id.upload_id().unwrap_or_default().to_owned();
            let progress = self.track();
            self.multipart = Some(Multipart::new(staging, owning, upload_id, progress));
            if let Some(r) = &mut self.resume {
                let m = self.multipart.as_ref().expect("set above");
                r.started(&s.url, &m.staging, &m.upload_id, self.part_size as u64)?;
            }
        }
        let m = self.multipart.as_mut().expect("started above");
        if m.next_part > S3_MAX_PARTS {
            return Err(CacheError::Config(format!(
                "{}: {} bytes sent in {S3_MAX_PARTS} parts (S3's most) of up to {} bytes, \
                 and more to come; larger parts need a larger --memory",
                s.url, m.sent, self.part_size
            )));
        }
        let body = bytes::Bytes::from(std::mem::take(&mut self.buf));
        m.sent += body.len() as u64;
        let reservation = self.reservation.take().map(Reservation::handed_on);
        let (number, key, id, task_shared) = (
            m.next_part,
            m.staging.clone(),
            m.upload_id.clone(),
            s.clone(),
        );
        m.next_part += 1;
        let grown = grown_part_size(
            self.part_size as u64,
            number,
            m.sent,
            self.planned,
            largest_part(s.memory.capacity),
        );
        if grown != self.part_size as u64 {
            self.part_size = grown as usize;
            self.parts_in_flight = parts_in_flight(grown, s.memory.capacity, s.concurrency);
        }
        let recorder = match Resumable::plan(self.resume.as_ref(), &s.url, &id, number, &body) {
            PartPlan::Send(recorder) => recorder,
            PartPlan::Reuse(part) => {
                // The server has these bytes: their buffer and memory go at once.
                let size = body.len() as u64;
                drop((body, reservation));
                m.progress.part_done(size, true);
                s.uploads.resumed(size);
                self.resumed += size;
                m.done.push(part);
                return Ok(());
            }
        };
        let progress = m.progress.line();
        let refused = m.refused.clone();
        let _guard = s.rt.enter();
        m.in_flight.spawn(async move {
            let s = task_shared;
            let out = s
                .retry(Op::UploadPart, &key, || async {
                    let r = s
                        .client
                        .upload_part()
                        .bucket(&s.bucket)
                        .key(&key)
                        .upload_id(&id)
                        .part_number(number)
                        .body(ByteStream::from(body.clone()))
                        .send()
                        .await;
                    if let Err(e) = &r
                        && e.code() == Some("NoSuchUpload")
                    {
                        refused.store(true, Ordering::Relaxed);
                    }
                    r
                })
                .await?;
            drop(reservation); // the part's bytes are sent: give their memory back
            if let (Some(r), Some(etag)) = (recorder, out.e_tag()) {
                r.record(number, body.len() as u64, etag).await?;
            }
            progress.part_done(body.len() as u64, false);
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
        let s = self.shared.clone();
        // Never closed, so never an error.
        let _permit = s.rt.block_on(s.multipart_commits.acquire());
        if !self.buf.is_empty() {
            self.send_part()?;
        }
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
        let sent_before = AtomicBool::new(false);
        let answer =
            s.rt.block_on(s.retry(Op::CompleteMultipartUpload, &staging, || async {
                let retried = sent_before.swap(true, Ordering::Relaxed);
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
            }))
            .and_then(|answer| match answer {
                Answer::Unknown => {
                    s.rt.block_on(s.check_size(&staging, size, "CompleteMultipartUpload"))
                }
                Answer::Done => Ok(()),
            });
        if let Err(e) = answer {
            // Refused for good (a part or its ETag the server does not take, say): every
            // later Complete of this upload would be too.
            if !e.is_transient() {
                m.refused.store(true, Ordering::Relaxed);
            }
            return Err(e);
        }
        // The staging object exists and is complete: nothing is left to abort.
        m.upload_id.clear();
        // A CreateMultipartUpload whose response was lost and retried leaves another
        // upload on the same (unique) staging key: abort any such orphan.
        s.rt.block_on(abort_others(&s, &staging, &upload_id));
        if size > s.copy_part {
            s.rt.block_on(s.copy_in_parts(&staging, key, size, &self.content_type))?;
        } else {
            s.rt.block_on(s.copy(&staging, key, size, &self.content_type))?;
        }
        let staging = std::mem::take(&mut m.staging);
        // Owned until it is deleted: the staging key stays this upload's till then.
        let done = self.multipart.take();
        if let Err(e) = s.rt.block_on(s.delete(&staging)) {
            tracing::warn!("could not delete the staging object {staging}: {e}");
        }
        drop(done);
        if let Some(r) = &mut self.resume {
            r.forget(&s.url);
        }
        Ok(())
    }
}

impl Write for S3NarUpload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        debug_assert!(!self.written, "a write after NarUpload::written");
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
                    // Exactly what is reserved: a buffer grown by doubling would hold up
                    // to twice its bytes, and copy them, beyond what the memory counts.
                    self.buf.reserve_exact(bytes as usize);
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
                self.buf.reserve_exact(self.part_size - self.buf.len());
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
    fn written(&mut self) {
        self.written = true;
        self.reservation = self.reservation.take().map(Reservation::handed_on);
    }

    /// A NAR whose bytes all fit in one part goes up in one PutObject: no dearer than
    /// the HeadObject that would look for it.
    fn resend_is_cheap(&self) -> bool {
        self.multipart.is_none()
    }

    fn commit(mut self: Box<Self>, key: &str) -> Result<(), CacheError> {
        if self.multipart.is_some() {
            return self.finish_multipart(key);
        }
        let body = bytes::Bytes::from(std::mem::take(&mut self.buf));
        // Released when the PUT is done, without waiting for anyone.
        let _reservation = self.reservation.take().map(Reservation::handed_on);
        let s = self.shared.clone();
        s.rt.block_on(s.put(key, body, &self.content_type))
    }

    fn resumed_bytes(&self) -> u64 {
        self.resumed
    }
}

impl Drop for S3NarUpload {
    fn drop(&mut self) {
        let Some(m) = self.multipart.take() else {
            return;
        };
        let s = self.shared.clone();
        let mut in_flight = m.in_flight;
        // A recorded upload not yet complete stays for the next run to resume, unless the
        // server refused it for good: the next run then starts afresh.
        let recorded = self.resume.as_ref().is_some_and(Resumable::is_recorded);
        let refused = m.refused.load(Ordering::Relaxed);
        if recorded && refused {
            tracing::warn!(
                "{}: the server refused the recorded upload on {}: it is ended; the next \
                 attempt starts afresh",
                s.url,
                m.staging
            );
        }
        let keep = recorded && !refused && !m.upload_id.is_empty();
        s.rt.block_on(async {
            in_flight.shutdown().await;
            if keep {
                return;
            }
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
        // Gone on the server (completed, then left by a failed copy): nothing to resume.
        if !keep && let Some(r) = &mut self.resume {
            r.forget(&s.url);
        }
        // Only now may a sweep take what this cleanup could not remove.
        drop(m._owning);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::cache::BinaryCache;
    use std::time::Duration;

    /// A NAR goes ahead of the look only while even incompressible it stays below S3's
    /// smallest part: the default chunk (4 MiB) does; a NAR of 5 MiB may not.
    #[test]
    fn only_a_nar_below_the_smallest_part_whatever_it_compresses_to_goes_in_one_put() {
        assert!(one_put_whatever_it_compresses_to(0));
        assert!(one_put_whatever_it_compresses_to(
            crate::memory::DEFAULT_CHUNK_SIZE as u64
        ));
        assert!(!one_put_whatever_it_compresses_to(MIN_S3_PART - (64 << 10)));
        assert!(!one_put_whatever_it_compresses_to(MIN_S3_PART));
    }

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

    /// Two NARs of about 620 GiB (parts of 65 MiB) assembled at once by one thread, as
    /// the sink does, both go on: each buffer reserves its whole part before it is filled.
    #[test]
    fn two_huge_nars_assembled_together_do_not_deadlock() {
        let endpoint = accepting_server();
        let nar: u64 = 620 << 30;
        let memory = 320 << 20;
        let stuck = "the two uploads wait for each other's memory";
        within_deadline(Duration::from_secs(60), stuck, move || {
            let cache = cache_at(&endpoint, memory);
            let part = part_size(nar);
            assert!(part > (128 << 20) / 2, "parts over half of 128 MiB: {part}");
            let mut a = cache.begin_nar(nar).unwrap();
            let mut b = cache.begin_nar(nar).unwrap();
            let chunk = vec![7u8; 4 << 20];
            // Three parts' worth each, interleaved chunk by chunk.
            for _ in 0..(3 * part / chunk.len() as u64 + 1) {
                a.write_all(&chunk).unwrap();
                b.write_all(&chunk).unwrap();
            }
            drop((a, b)); // aborts both uploads
        });
    }

    #[test]
    fn a_nar_too_large_for_the_memory_fails_naming_the_memory_it_needs() {
        let cache = cache_at("http://127.0.0.1:1", 64 << 20);
        let nar: u64 = 1100 << 30;
        let e = match cache.begin_nar(nar) {
            Ok(_) => panic!("a {nar}-byte NAR was accepted with 64 MiB"),
            Err(e) => e.to_string(),
        };
        let part = part_size(nar);
        let least = crate::cache::S3Tuning::memory_for_part(part);
        assert!(
            e.ends_with(&format!(
                "needs S3 parts of 115.0 MiB to fit in S3's 10000 parts, which need --memory \
                 {} or more",
                human_size(least)
            )),
            "{e}"
        );
        assert!(e.contains(&format!("{nar} bytes")), "{e}");
        assert!(!e.contains("upload memory"), "{e}");
        // And that much memory does take it (the cache gets half), and no less.
        let share = crate::memory::Budget::cache_share(least);
        assert!(cache_at("http://127.0.0.1:1", share).begin_nar(nar).is_ok());
        assert!(
            cache_at("http://127.0.0.1:1", share - 1)
                .begin_nar(nar)
                .is_err()
        );
    }

    /// The part size and the parts in flight, from the memory: S3's 5 MiB parts, two at
    /// once, in the 16 MiB that `--memory 32M` gives S3; the default part size from the
    /// default budget's 64 MiB up; larger parts only where the NAR needs them.
    #[test]
    fn parts_are_as_large_as_the_memory_allows_down_to_s3s_smallest() {
        const MIB: u64 = 1 << 20;
        let nar = 300 * MIB;
        assert_eq!(part_size_for(nar, MIN_PART, 16 * MIB), MIN_S3_PART);
        assert_eq!(parts_in_flight(MIN_S3_PART, 16 * MIB, 32), 2);
        assert_eq!(part_size_for(nar, MIN_PART, 24 * MIB), 6 * MIB);
        assert_eq!(part_size_for(nar, MIN_PART, 32 * MIB), MIN_PART);
        assert_eq!(part_size_for(nar, MIN_PART, 64 * MIB), MIN_PART);
        assert_eq!(parts_in_flight(MIN_PART, 64 * MIB, 32), 2);
        // A part size asked for is used where the memory allows it.
        assert_eq!(part_size_for(nar, 16 * MIB, 64 * MIB), 16 * MIB);
        assert_eq!(part_size_for(nar, MIN_S3_PART, 64 * MIB), MIN_S3_PART);
        // 5 MiB parts cover NARs up to about 48 GiB, incompressible, in 10,000 parts.
        let largest_nar = 48 * 1024 * MIB;
        assert_eq!(part_size_for(largest_nar, MIN_PART, 16 * MIB), MIN_S3_PART);
        assert!(compressed_bound(largest_nar).div_ceil(MIN_S3_PART) <= 10_000);
        let beyond = 49 * 1024 * MIB;
        assert_eq!(part_size_for(beyond, MIN_PART, 16 * MIB), 6 * MIB);
        assert!(6 * MIB > largest_part(16 * MIB), "refused at begin");
        assert_eq!(crate::cache::S3Tuning::memory_for_part(6 * MIB), 48 * MIB);
        // The least memory S3 takes: one part, filled, sent and waited for.
        assert_eq!(parts_in_flight(MIN_S3_PART, MIN_S3_PART, 32), 1);
        assert_eq!(parts_in_flight(MIN_S3_PART, 2 * MIN_S3_PART - 1, 32), 1);
        assert_eq!(parts_in_flight(MIN_S3_PART, 2 * MIN_S3_PART, 32), 2);
    }

    /// With the 16 MiB `--memory 32M` gives S3, a NAR of many parts goes up in parts of
    /// S3's smallest size, at most two at once, and its buffers never go beyond the memory.
    #[test]
    fn a_small_memory_sends_parts_of_s3s_smallest_two_at_a_time() {
        let (endpoint, seen) = stand_in(1);
        let memory = 16 << 20;
        let cache = cache_at(&endpoint, memory);
        let nar: u64 = 30 << 20;
        let mut up = cache.begin_nar(nar).unwrap();
        let chunk = vec![5u8; 1 << 20];
        for _ in 0..nar >> 20 {
            up.write_all(&chunk).unwrap();
            assert!(cache.shared.memory.reserved() <= memory);
        }
        up.written();
        up.commit("nar/small-memory.nar").unwrap();
        let parts = seen.lengths_of("partNumber=");
        assert_eq!(parts, vec![MIN_S3_PART; 6], "{:?}", seen.requests());
        assert!(seen.most_in_flight() <= 2, "{}", seen.most_in_flight());
        assert_eq!(cache.shared.memory.reserved(), 0);
    }

    /// Small NARs all written and waiting for a finisher to commit them (as the sink
    /// hands them on) hold their buffers until they are committed or dropped, on another
    /// thread: a new upload waits for them instead of going beyond the memory.
    #[test]
    fn an_upload_waits_for_nars_all_written_that_a_finisher_will_release() {
        let memory: u64 = 32 << 20;
        let cache = Arc::new(cache_at(&accepting_server(), memory));
        let nar: u64 = 6 << 20;
        let data = vec![7u8; nar as usize];
        let mut waiting = Vec::new();
        while cache.shared.memory.reserved() + compressed_bound(nar) <= memory {
            let mut u = cache.begin_nar(nar).unwrap();
            u.write_all(&data).unwrap();
            u.written();
            waiting.push(u);
        }
        assert_eq!(waiting.len(), 5, "6 MiB NARs in 32 MiB");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let next = {
            let (cache, data) = (cache.clone(), data.clone());
            std::thread::spawn(move || {
                let mut u = cache.begin_nar(nar).unwrap();
                u.write_all(&data).unwrap();
                tx.send(()).unwrap();
                u
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a sixth NAR's buffer was granted beyond the memory"
        );
        assert!(cache.shared.memory.reserved() <= memory);
        // A finisher commits one (or drops it): its memory goes to the waiting upload.
        waiting.pop().unwrap().commit("nar/one.nar.zst").unwrap();
        rx.recv_timeout(Duration::from_secs(30))
            .expect("granted once one NAR is committed");
        let next = next.join().unwrap();
        assert!(cache.shared.memory.reserved() <= memory);
        drop((next, waiting));
        assert_eq!(cache.shared.memory.reserved(), 0);
    }

    /// A NAR going up in parts owns its staging key (no sweep takes its upload or its
    /// staging object) until it is committed or dropped, and not a moment longer.
    #[test]
    fn a_multipart_upload_owns_its_staging_key_until_it_is_committed_or_dropped() {
        let cache = cache_at(&accepting_server(), 64 << 20);
        let owned = &cache.shared.owned;
        let data = vec![7u8; 2 * MIN_PART as usize + 1];
        for commit in [true, false] {
            let mut u = cache.begin_nar(data.len() as u64).unwrap();
            u.write_all(&data).unwrap();
            assert!(!owned.is_empty(), "a live multipart upload owns nothing");
            if commit {
                u.commit("nar/x.nar.zst").unwrap();
            } else {
                drop(u);
            }
            assert!(owned.is_empty(), "owned after commit={commit}: {owned:?}");
        }
    }

    #[test]
    fn parts_grow_only_past_the_plan_and_within_the_memory() {
        let (part, largest) = (MIN_PART, 64 << 20);
        // Within the plan: never, whatever the part number.
        assert_eq!(
            grown_part_size(part, 1000, 100 << 30, 200 << 30, largest),
            part
        );
        // Past it: doubled at every thousandth part, not between.
        assert_eq!(grown_part_size(part, 999, 8 << 30, 1 << 20, largest), part);
        assert_eq!(
            grown_part_size(part, 1000, 8 << 30, 1 << 20, largest),
            2 * part
        );
        // Never beyond a part's share of the memory, and never smaller.
        assert_eq!(
            grown_part_size(48 << 20, 3000, 1 << 40, 1 << 20, largest),
            largest
        );
        assert_eq!(
            grown_part_size(largest, 4000, 1 << 40, 1 << 20, largest),
            largest
        );
        assert_eq!(
            grown_part_size(part, 1000, 8 << 30, 1 << 20, part / 2),
            part
        );
        // Doubling from the smallest part covers S3's largest object (5 TiB) in its parts.
        let (mut part, mut sent) = (MIN_PART, 0u64);
        for n in 1..=S3_MAX_PARTS {
            sent += part;
            part = grown_part_size(part, n, sent, 0, u64::MAX);
        }
        assert!(sent >= 5 << 40, "{sent}");
    }

    /// An object whose size was a low estimate (a compressed log's) goes up whole with its
    /// Content-Type, one part more than a single PUT takes.
    #[test]
    fn an_object_larger_than_its_hint_goes_up_in_parts() {
        let (endpoint, seen) = stand_in(1);
        let cache = cache_at(&endpoint, 64 << 20);
        let mut up = cache
            .begin_object(4096, "text/plain; charset=utf-8")
            .unwrap();
        for _ in 0..5 {
            up.write_all(&[b'x'; 4 << 20]).unwrap();
        }
        up.written();
        up.commit("log/x.drv").unwrap();
        let requests = seen.requests();
        let typed = |what: &str, pick: &dyn Fn(&str) -> bool| {
            let (line, content_type) = requests
                .iter()
                .find(|(line, _)| pick(line))
                .unwrap_or_else(|| panic!("no {what} in {requests:?}"));
            assert_eq!(
                content_type.as_deref(),
                Some("text/plain; charset=utf-8"),
                "{what}: {line}"
            );
        };
        // The staging upload and the copy to the final key both name the object's type.
        typed("CreateMultipartUpload", &|l| {
            l.starts_with("POST") && l.contains("?uploads")
        });
        typed("CopyObject", &|l| l.starts_with("PUT /b/log/x.drv"));
        let parts = requests
            .iter()
            .filter(|(l, _)| l.contains("partNumber="))
            .count();
        assert_eq!(parts, 3, "{requests:?}");
        assert_eq!(cache.shared.memory.reserved(), 0);
    }

    /// `S3Tuning::min_part_size` (`--s3-part-size`) is the part size of a NAR that needs
    /// no larger parts, below the default as well as above it.
    #[test]
    fn the_configured_part_size_is_the_part_size_of_a_small_enough_nar() {
        for (min, parts) in [(MIN_S3_PART, 4), (MIN_PART, 3), (16 << 20, 2)] {
            let cache = cache_with(&accepting_server(), 128 << 20, |t| t.min_part_size = min);
            let mut nar = cache.begin_nar(20 << 20).unwrap();
            nar.write_all(&vec![2; 20 << 20]).unwrap();
            nar.commit("nar/large.nar").unwrap();
            let sent = cache
                .request_counts()
                .into_iter()
                .find(|c| c.operation == "UploadPart")
                .unwrap()
                .requests;
            assert_eq!(sent, parts, "20 MiB in parts of at least {min} bytes");
        }
    }

    #[test]
    fn parts_in_flight_shrink_as_parts_grow_but_never_below_one() {
        assert_eq!(parts_in_flight(8 << 20, 128 << 20, 32), 4);
        assert_eq!(parts_in_flight(16 << 20, 128 << 20, 32), 2);
        // Two while two fit: one is filled while the other goes up.
        assert_eq!(parts_in_flight(32 << 20, 128 << 20, 32), 2);
        assert_eq!(parts_in_flight(64 << 20, 128 << 20, 32), 2);
        assert_eq!(parts_in_flight(128 << 20, 128 << 20, 32), 1);
        // Never more than the requests the tuning allows at once.
        assert_eq!(parts_in_flight(8 << 20, 128 << 20, 2), 2);
        assert_eq!(parts_in_flight(8 << 20, 1 << 30, 1), 1);
    }
}
