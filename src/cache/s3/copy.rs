//! Server-side copies of a staging object to its final key: one CopyObject up to
//! [`COPY_LIMIT`], UploadPartCopy in parts beyond it. Nothing here holds object data.
use super::Shared;
use super::retry::{Answer, Op, join_error, unreadable_success};
use super::upload::MIN_S3_PART;
use crate::cache::CacheError;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use std::sync::Arc;
use tokio::task::JoinSet;

/// The largest object one CopyObject may copy on AWS (5 GiB); larger staging objects are
/// copied in parts with UploadPartCopy.
pub(super) const COPY_LIMIT: u64 = 5 << 30;
/// Part size of a multi-part copy: a tenth of the copy limit keeps each server-side copy
/// request short; more parts are used when 10,000 of these would not cover the object.
const COPY_PART: u64 = 512 << 20;
/// Most part copies of one object in flight at once (server-side work, no memory here;
/// fewer when `S3Tuning::concurrency` is lower).
const COPY_PARTS_IN_FLIGHT: usize = 8;

impl Shared {
    /// Copies `staging` (`size` bytes) to `key`, stored with `content_type`, with one
    /// CopyObject.
    pub(super) async fn copy(
        &self,
        staging: &str,
        key: &str,
        size: u64,
        content_type: &str,
    ) -> Result<(), CacheError> {
        let source = format!("{}/{staging}", self.bucket);
        let answer = self
            .retry(Op::CopyObject, key, || async {
                let r = self
                    .client
                    .copy_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .copy_source(&source)
                    .content_type(content_type)
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

    /// Copies `staging` (`size` bytes) to `key`, stored with `content_type`, server-side
    /// in parts (UploadPartCopy), for objects beyond what one CopyObject may copy. A
    /// failure aborts the copy's multipart upload.
    pub(super) async fn copy_in_parts(
        self: &Arc<Self>,
        staging: &str,
        key: &str,
        size: u64,
        content_type: &str,
    ) -> Result<(), CacheError> {
        let part = self
            .copy_part
            .min(COPY_PART)
            .max(size.div_ceil(10_000).next_multiple_of(1 << 20))
            .max(MIN_S3_PART);
        let created = self
            .retry(Op::CreateMultipartUpload, key, || {
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .content_type(content_type)
                    .set_storage_class(self.storage_class.clone())
                    .send()
            })
            .await?;
        let id = created.upload_id().unwrap_or_default().to_owned();
        // Owned (never swept) until it is completed or aborted.
        let _owning = self.owned.upload(&id);
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
            while set.len() < COPY_PARTS_IN_FLIGHT.min(self.concurrency) {
                let Some((number, first, last)) = parts.next() else {
                    break;
                };
                let (s, source, key, id) =
                    (self.clone(), source.clone(), key.to_owned(), id.to_owned());
                set.spawn(async move {
                    let out = s
                        .retry(Op::UploadPartCopy, &key, || {
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
            .retry(Op::CompleteMultipartUpload, key, || async {
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
}
