//! Sweeping what killed uploads left behind: unfinished multipart uploads and staging
//! objects older than a cutoff (never objects under `nar/`).
use super::retry::Op;
use super::{S3Cache, STAGING_PREFIX};
use crate::cache::CacheError;
use std::time::SystemTime;

impl S3Cache {
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
    pub(super) fn sweep(
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
                        .retry(Op::ListMultipartUploads, prefix, || {
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
                    .retry(Op::ListObjectsV2, prefix, || {
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
