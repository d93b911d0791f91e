//! Listing the whole bucket: every object with its size and modification time
//! (ListObjectsV2, 1,000 keys a page) and every unfinished multipart upload
//! (ListMultipartUploads). Read-only: nothing here writes or deletes.
use super::retry::Op;
use super::{S3Cache, Shared};
use crate::cache::{CacheError, ObjectInfo, UnfinishedUpload};
use std::time::SystemTime;

/// An S3 timestamp as a `SystemTime`, when it is one.
fn time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

impl S3Cache {
    /// Every object of the bucket, page after page, each page through the retry loop.
    pub(super) fn list_all(&self, visit: &mut dyn FnMut(ObjectInfo<'_>)) -> Result<(), CacheError> {
        let s = &self.shared;
        self.block_on(async {
            let mut token = None::<String>;
            loop {
                let page = s
                    .retry(Op::ListObjectsV2, "", || {
                        s.client
                            .list_objects_v2()
                            .bucket(&s.bucket)
                            .set_continuation_token(token.clone())
                            .send()
                    })
                    .await?;
                for o in page.contents() {
                    let Some(key) = o.key() else { continue };
                    visit(ObjectInfo {
                        key,
                        size: o.size().and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
                        modified: time(o.last_modified()),
                    });
                }
                match page.next_continuation_token() {
                    Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                    _ => return Ok(()),
                }
            }
        })
    }

    /// Every unfinished multipart upload of the bucket.
    pub(super) fn unfinished_uploads(&self) -> Result<Vec<UnfinishedUpload>, CacheError> {
        self.block_on(self.shared.multipart_uploads(None))
    }
}

impl Shared {
    /// The unfinished multipart uploads under `prefix` (all of the bucket's with `None`),
    /// page after page, each page through the retry loop.
    pub(super) async fn multipart_uploads(
        &self,
        prefix: Option<&str>,
    ) -> Result<Vec<UnfinishedUpload>, CacheError> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .retry(Op::ListMultipartUploads, prefix.unwrap_or(""), || {
                    self.client
                        .list_multipart_uploads()
                        .bucket(&self.bucket)
                        .set_prefix(prefix.map(str::to_owned))
                        .set_key_marker(key_marker.clone())
                        .set_upload_id_marker(id_marker.clone())
                        .send()
                })
                .await?;
            for u in page.uploads() {
                let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                out.push(UnfinishedUpload {
                    key: key.to_owned(),
                    upload_id: id.to_owned(),
                    initiated: time(u.initiated()),
                });
            }
            match (page.next_key_marker(), page.next_upload_id_marker()) {
                (Some(k), id) if page.is_truncated() == Some(true) => {
                    key_marker = Some(k.to_owned());
                    id_marker = id.map(str::to_owned);
                }
                _ => return Ok(out),
            }
        }
    }
}
