//! Resumable multipart uploads: a NAR begun with a journal records its upload and each
//! acknowledged part (with its blake3), and a later run of the same identity confirms the
//! recorded parts with ListParts and sends only those the server lacks or whose bytes
//! differ. Also the progress of every multipart upload in flight. This module never
//! decides when a record ends but for the upload it is writing (completed, found gone, or
//! of another identity); the caller ends the others ([`Shared::abort_recorded`]).
use super::retry::{Op, join_error};
use super::{MIN_S3_PART, STAGING_PREFIX, Shared};
use crate::cache::CacheError;
use crate::cache::resume::{
    NarIdentity, RecordedPart, RecordedUpload, UploadJournal, UploadProgress, now_unix,
};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::types::CompletedPart;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a resumable upload carries: its journal and identity, and what the last run left.
pub(crate) struct Resumable {
    journal: Arc<dyn UploadJournal>,
    pub(super) identity: NarIdentity,
    /// Parts the last run recorded that ListParts shows at their recorded size, by number.
    reusable: HashMap<i32, RecordedPart>,
    /// The upload id the journal records for this upload, once it does.
    recorded: Option<String>,
}

/// What to do with a full part.
pub(super) enum PartPlan {
    /// Send it, then record it (with the recorder, for a recorded upload).
    Send(Option<PartRecorder>),
    /// The server has it: complete with this (the recorded ETag).
    Reuse(CompletedPart),
}

/// Records one part once the server acknowledged it.
pub(super) struct PartRecorder {
    journal: Arc<dyn UploadJournal>,
    cache_url: String,
    upload_id: String,
    blake3: [u8; 32],
}

impl PartRecorder {
    /// Records part `number` of `size` bytes with its `etag`, durably, before it returns
    /// (on a blocking thread: the journal syncs).
    pub(super) async fn record(self, number: i32, size: u64, etag: &str) -> Result<(), CacheError> {
        let part = RecordedPart {
            number,
            size,
            blake3: self.blake3,
            etag: etag.to_owned(),
        };
        let url = self.cache_url.clone();
        tokio::task::spawn_blocking(move || {
            self.journal
                .part_done(&self.cache_url, &self.upload_id, &part)
        })
        .await
        .map_err(|e| join_error(&url, e))?
    }
}

impl Resumable {
    /// What to do with part `number` of the upload `upload_id` of `resume` (none: a plain
    /// upload, which sends every part and records nothing), whose bytes are `body`.
    pub(super) fn plan(
        resume: Option<&Resumable>,
        cache_url: &str,
        upload_id: &str,
        number: i32,
        body: &[u8],
    ) -> PartPlan {
        let Some(r) = resume.filter(|r| r.recorded.is_some()) else {
            return PartPlan::Send(None);
        };
        let blake3 = *blake3::hash(body).as_bytes();
        if let Some(p) = r.reusable.get(&number)
            && p.size == body.len() as u64
            && p.blake3 == blake3
        {
            return PartPlan::Reuse(
                CompletedPart::builder()
                    .part_number(number)
                    .e_tag(p.etag.clone())
                    .build(),
            );
        }
        PartPlan::Send(Some(PartRecorder {
            journal: r.journal.clone(),
            cache_url: cache_url.to_owned(),
            upload_id: upload_id.to_owned(),
            blake3,
        }))
    }

    /// Whether the journal records the upload (so a drop keeps it for the next run).
    pub(super) fn is_recorded(&self) -> bool {
        self.recorded.is_some()
    }

    /// Records the upload `upload_id` just started on `staging` in parts of `part_size`.
    ///
    /// # Errors
    /// The journal's; the upload is then not recorded (a drop aborts it).
    pub(super) fn started(
        &mut self,
        cache_url: &str,
        staging: &str,
        upload_id: &str,
        part_size: u64,
    ) -> Result<(), CacheError> {
        self.journal.started(&RecordedUpload {
            cache_url: cache_url.to_owned(),
            identity: self.identity.clone(),
            key: staging.to_owned(),
            upload_id: upload_id.to_owned(),
            part_size,
            started_unix: now_unix(),
            parts: Vec::new(),
        })?;
        self.recorded = Some(upload_id.to_owned());
        Ok(())
    }

    /// Forgets the upload (complete, or gone): best effort, a failure is logged (a stale
    /// record is found gone by the next run and forgotten then).
    pub(super) fn forget(&mut self, cache_url: &str) {
        if let Some(id) = self.recorded.take()
            && let Err(e) = self.journal.forget(cache_url, &id)
        {
            tracing::warn!("could not forget the finished multipart upload {id}: {e}");
        }
    }
}

impl Resumable {
    /// What an upload of the NAR `identity` names resumes, when the cache has a journal:
    /// the upload the journal records for it, to go on with (its parts confirmed by
    /// ListParts are not sent again when their bytes match), or none (a record of another
    /// identity, or one the server no longer has, is ended: the upload starts afresh).
    /// `None` without a journal: the upload is a plain one.
    ///
    /// # Errors
    /// The journal's; a failed ListParts.
    pub(super) fn find(
        shared: &Shared,
        identity: &NarIdentity,
    ) -> Result<Option<(Resumable, Option<RecordedUpload>)>, CacheError> {
        let Some(journal) = shared.journal.clone() else {
            return Ok(None);
        };
        let record = journal.find(&shared.url, &identity.store_path)?;
        let mut resume = Resumable {
            journal,
            identity: identity.clone(),
            reusable: HashMap::new(),
            recorded: None,
        };
        let Some(record) = record else {
            return Ok(Some((resume, None)));
        };
        let Some(reusable) = shared
            .rt
            .block_on(shared.reusable_parts(&record, identity))?
        else {
            return Ok(Some((resume, None)));
        };
        tracing::info!(
            "{}: resuming the upload of {} ({} parts recorded, {} on the server)",
            shared.url,
            identity.store_path,
            record.parts.len(),
            reusable.len()
        );
        resume.reusable = reusable;
        resume.recorded = Some(record.upload_id.clone());
        Ok(Some((resume, Some(record))))
    }
}

impl Shared {
    /// The parts of `record` an upload of `identity` may reuse: its recorded parts that
    /// ListParts shows at their recorded size, with their recorded ETag where it names one. `None` when the record cannot go on (another
    /// identity, a part size this cache's memory cannot hold, the upload gone from the
    /// server): it is ended (aborted, forgotten).
    async fn reusable_parts(
        &self,
        record: &RecordedUpload,
        identity: &NarIdentity,
    ) -> Result<Option<HashMap<i32, RecordedPart>>, CacheError> {
        let why_not = if record.identity != *identity {
            Some("its NarHash or compression differ")
        } else if !record.key.starts_with(STAGING_PREFIX) || record.part_size < MIN_S3_PART {
            Some("it is not a staging upload of narflow's")
        } else if record.part_size > self.largest_part() {
            Some("its parts are too large for the upload memory")
        } else {
            None
        };
        if let Some(why) = why_not {
            tracing::info!(
                "{}: not resuming the recorded upload of {}: {why}",
                self.url,
                identity.store_path
            );
            if let Err(e) = self.abort_recorded(record).await {
                tracing::warn!(
                    "could not abort the recorded upload {} of {}: {e}",
                    record.upload_id,
                    record.key
                );
            }
            return Ok(None);
        }
        let Some(listed) = self.list_parts(&record.key, &record.upload_id).await? else {
            tracing::info!(
                "{}: the recorded upload of {} is gone from the server; starting afresh",
                self.url,
                identity.store_path
            );
            // Completed before a kill, it may have left its staging object.
            self.abort_recorded(record).await?;
            return Ok(None);
        };
        Ok(Some(
            record
                .parts
                .iter()
                .filter(|p| {
                    listed.get(&p.number).is_some_and(|(size, etag)| {
                        *size == p.size && etag.as_deref().is_none_or(|e| same_etag(e, &p.etag))
                    })
                })
                .map(|p| (p.number, p.clone()))
                .collect(),
        ))
    }

    /// The size and ETag of each part the server has of the upload `id` on `key`, by
    /// number (ListParts, page after page); `None` when the upload is gone (NoSuchUpload).
    async fn list_parts(
        &self,
        key: &str,
        id: &str,
    ) -> Result<Option<HashMap<i32, (u64, Option<String>)>>, CacheError> {
        let mut out = HashMap::new();
        let mut marker = None::<String>;
        loop {
            let page = self
                .retry(Op::ListParts, key, || async {
                    let r = self
                        .client
                        .list_parts()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(id)
                        .set_part_number_marker(marker.clone())
                        .send()
                        .await;
                    match r {
                        Ok(page) => Ok(Some(PartsPage {
                            parts: page
                                .parts()
                                .iter()
                                .filter_map(|p| {
                                    Some((
                                        p.part_number()?,
                                        p.size()?,
                                        p.e_tag().map(str::to_owned),
                                    ))
                                })
                                .collect(),
                            next_marker: page.next_part_number_marker().map(str::to_owned),
                            truncated: page.is_truncated() == Some(true),
                        })),
                        Err(e) if e.code() == Some("NoSuchUpload") => Ok(None),
                        // A success the SDK cannot read may still be a listing of parts.
                        Err(e) => match e
                            .raw_response()
                            .filter(|r| r.status().is_success())
                            .and_then(|r| r.body().bytes())
                            .and_then(PartsPage::parse)
                        {
                            Some(page) => Ok(Some(page)),
                            None => Err(e),
                        },
                    }
                })
                .await?;
            let Some(page) = page else { return Ok(None) };
            for (n, size, etag) in page.parts {
                out.insert(n, (u64::try_from(size).unwrap_or(0), etag));
            }
            match page.next_marker {
                Some(m) if page.truncated => marker = Some(m),
                _ => return Ok(Some(out)),
            }
        }
    }

    /// [`crate::cache::BinaryCache::abort_recorded`]: aborts the upload (one gone counts
    /// as aborted), deletes its staging object, and forgets it. An upload a live upload of
    /// this process is writing is left alone.
    pub(super) async fn abort_recorded(&self, u: &RecordedUpload) -> Result<(), CacheError> {
        if u.cache_url != self.url {
            return Err(CacheError::Config(format!(
                "{}: the recorded upload {} is for another cache, {}",
                self.url, u.upload_id, u.cache_url
            )));
        }
        if self.owned.owns_upload(&u.key, &u.upload_id) {
            tracing::debug!("{}: {} is being written: not aborted", self.url, u.key);
            return Ok(());
        }
        self.abort(&u.key, &u.upload_id).await?;
        // A Complete may have made the staging object; deleting a missing key succeeds.
        if u.key.starts_with(STAGING_PREFIX) {
            self.delete(&u.key).await?;
        }
        if let Some(j) = &self.journal {
            j.forget(&u.cache_url, &u.upload_id)?;
        }
        Ok(())
    }
}

/// Whether two ETags name the same part (servers quote them, or not).
fn same_etag(a: &str, b: &str) -> bool {
    a.trim_matches('"') == b.trim_matches('"')
}

/// One page of a ListParts answer.
#[derive(Debug, PartialEq)]
struct PartsPage {
    /// Each part's number, size and ETag (when listed).
    parts: Vec<(i32, i64, Option<String>)>,
    next_marker: Option<String>,
    truncated: bool,
}

impl PartsPage {
    /// Reads a ListParts document whatever its root element is called (S3 names it
    /// ListPartsResult, which the SDK insists on; moto ListPartsResponse). `None` when it
    /// is not such a document.
    fn parse(body: &[u8]) -> Option<PartsPage> {
        use aws_smithy_xml::decode::{Document, try_data};
        let mut doc = Document::try_from(body).ok()?;
        let mut root = doc.root_element().ok()?;
        if !root.start_el().local().starts_with("ListParts") {
            return None;
        }
        let mut page = PartsPage {
            parts: Vec::new(),
            next_marker: None,
            truncated: false,
        };
        while let Some(mut tag) = root.next_tag() {
            match tag.start_el().local() {
                "Part" => {
                    let (mut number, mut size, mut etag) = (None, None, None);
                    while let Some(mut field) = tag.next_tag() {
                        match field.start_el().local() {
                            "PartNumber" => number = try_data(&mut field).ok()?.parse().ok(),
                            "Size" => size = try_data(&mut field).ok()?.parse().ok(),
                            "ETag" => etag = Some(try_data(&mut field).ok()?.into_owned()),
                            _ => {}
                        }
                    }
                    page.parts.push((number?, size?, etag));
                }
                "NextPartNumberMarker" => {
                    page.next_marker = Some(try_data(&mut tag).ok()?.into_owned());
                }
                "IsTruncated" => page.truncated = try_data(&mut tag).ok()? == "true",
                _ => {}
            }
        }
        Some(page)
    }
}

/// The multipart uploads in flight in this process, and the bytes resumed since the
/// cache was opened.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    lines: Arc<Mutex<HashMap<u64, Arc<Line>>>>,
    next: AtomicU64,
    resumed: AtomicU64,
}

/// The progress of one upload.
#[derive(Debug)]
pub(super) struct Line {
    store_path: Option<String>,
    part_size: u64,
    /// A bound on the bytes it will send.
    bytes_total: u64,
    started: Instant,
    parts_done: AtomicU64,
    bytes_done: AtomicU64,
    bytes_resumed: AtomicU64,
}

impl Line {
    /// A part of `size` bytes is acknowledged, or (`resumed`) was found on the server.
    pub(super) fn part_done(&self, size: u64, resumed: bool) {
        self.parts_done.fetch_add(1, Ordering::Relaxed);
        self.bytes_done.fetch_add(size, Ordering::Relaxed);
        if resumed {
            self.bytes_resumed.fetch_add(size, Ordering::Relaxed);
        }
    }
}

/// An upload's [`Line`], listed until this is dropped.
#[derive(Debug)]
pub(super) struct Tracked {
    lines: Arc<Mutex<HashMap<u64, Arc<Line>>>>,
    id: u64,
    line: Arc<Line>,
}

impl Tracked {
    pub(super) fn line(&self) -> Arc<Line> {
        self.line.clone()
    }

    pub(super) fn part_done(&self, size: u64, resumed: bool) {
        self.line.part_done(size, resumed);
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl InFlight {
    /// Lists an upload of `store_path` (when known) in parts of `part_size`, of at most
    /// `bytes_total` bytes, until the returned [`Tracked`] is dropped.
    pub(super) fn track(
        &self,
        store_path: Option<String>,
        part_size: u64,
        bytes_total: u64,
    ) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let line = Arc::new(Line {
            store_path,
            part_size: part_size.max(1),
            bytes_total,
            started: Instant::now(),
            parts_done: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            bytes_resumed: AtomicU64::new(0),
        });
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, line.clone());
        Tracked {
            lines: self.lines.clone(),
            id,
            line,
        }
    }

    /// `bytes` were not sent again: the server had them.
    pub(super) fn resumed(&self, bytes: u64) {
        self.resumed.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(super) fn resumed_total(&self) -> u64 {
        self.resumed.load(Ordering::Relaxed)
    }

    /// Every upload in flight, oldest first.
    pub(super) fn snapshot(&self) -> Vec<UploadProgress> {
        let mut lines: Vec<(u64, Arc<Line>)> = self
            .lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, l)| (*id, l.clone()))
            .collect();
        lines.sort_by_key(|(id, _)| *id);
        lines
            .into_iter()
            .map(|(_, l)| {
                let parts_done = l.parts_done.load(Ordering::Relaxed);
                let bytes_done = l.bytes_done.load(Ordering::Relaxed);
                let bytes_total = l.bytes_total.max(bytes_done);
                UploadProgress {
                    store_path: l.store_path.clone(),
                    parts_done,
                    parts_total: bytes_total.div_ceil(l.part_size).max(parts_done),
                    bytes_done,
                    bytes_total,
                    bytes_resumed: l.bytes_resumed.load(Ordering::Relaxed),
                    seconds: l.started.elapsed().as_secs_f64(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::MIN_PART;
    use super::super::testing::{accepting_server, cache_at};
    use super::*;
    use crate::cache::BinaryCache;
    use std::io::Write;

    /// Every multipart upload in flight is listed with its progress (a plain one without
    /// a store path), from its first part until it is committed or dropped.
    #[test]
    fn a_multipart_upload_is_listed_while_it_lives() {
        let cache = cache_at(&accepting_server(), 64 << 20);
        let nar = 3 * MIN_PART;
        for commit in [true, false] {
            let mut u = cache.begin_nar(nar).unwrap();
            assert_eq!(cache.large_uploads(), [], "listed before its first part");
            // Two parts at most in flight (a quarter of 64 MiB): the second waits for one.
            u.write_all(&vec![1; 2 * MIN_PART as usize]).unwrap();
            let listed = cache.large_uploads();
            assert_eq!(listed.len(), 1, "{listed:?}");
            let p = &listed[0];
            assert_eq!(p.store_path, None);
            assert!(
                p.parts_done >= 1 && p.bytes_done == p.parts_done * MIN_PART,
                "{p:?}"
            );
            assert!(p.parts_total >= 3 && p.bytes_total >= nar, "{p:?}");
            assert_eq!(p.bytes_resumed, 0);
            if commit {
                u.commit("nar/x.nar").unwrap();
            } else {
                drop(u);
            }
            assert_eq!(
                cache.large_uploads(),
                [],
                "listed once over (commit={commit})"
            );
        }
        assert_eq!(cache.resumed_bytes(), 0);
    }

    /// A ListParts answer is read whatever its root element is called (moto's is not
    /// S3's), and nothing else passes for one.
    #[test]
    fn a_list_of_parts_is_read_from_s3_and_moto_documents() {
        let doc = |root: &str| {
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                 <{root} xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>b</Bucket>\
                 <Key>k</Key><UploadId>u</UploadId><PartNumberMarker>0</PartNumberMarker>\
                 <NextPartNumberMarker>2</NextPartNumberMarker><MaxParts>2</MaxParts>\
                 <IsTruncated>true</IsTruncated>\
                 <Part><PartNumber>1</PartNumber><ETag>&quot;a&quot;</ETag><Size>5242880</Size></Part>\
                 <Part><LastModified>2026-01-01T00:00:00Z</LastModified><PartNumber>2</PartNumber>\
                 <Size>12345</Size></Part></{root}>"
            )
        };
        let want = PartsPage {
            parts: vec![(1, 5 << 20, Some("\"a\"".into())), (2, 12345, None)],
            next_marker: Some("2".into()),
            truncated: true,
        };
        for root in ["ListPartsResult", "ListPartsResponse"] {
            assert_eq!(
                PartsPage::parse(doc(root).as_bytes()).as_ref(),
                Some(&want),
                "{root}"
            );
        }
        assert_eq!(PartsPage::parse(doc("ListBucketResult").as_bytes()), None);
        assert_eq!(
            PartsPage::parse(b"<Error><Code>NoSuchUpload</Code></Error>"),
            None
        );
        assert_eq!(PartsPage::parse(b"not xml"), None);
    }
}
