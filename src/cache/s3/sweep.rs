//! Sweeping what killed uploads left behind: unfinished multipart uploads and staging
//! objects older than a cutoff (never objects under `nar/`), and the registry of what the
//! live uploads of this process own, which a sweep never removes whatever its age. Nor
//! does it remove an upload the journal records (or its staging object): a restart
//! resumes it, and the caller ends it (`BinaryCache::abort_recorded`).
use super::retry::Op;
use super::{S3Cache, STAGING_PREFIX};
use crate::cache::CacheError;
use crate::cache::owned::{self, Claim};
use std::sync::Arc;
use std::time::SystemTime;

/// What the live uploads of this process own in the bucket: the staging key of each NAR
/// going up in parts (its multipart upload, then the staging object that upload completes
/// to, until the object is copied and deleted or the upload is dropped), and the multipart
/// upload of each copy to a final key in parts.
#[derive(Debug, Default)]
pub(super) struct Owned {
    /// Staging keys (unique to their upload: see `S3NarUpload::staging_key`).
    keys: Arc<owned::Owned<String>>,
    /// Upload ids of multi-part copies (their keys, under `nar/`, are not unique to us).
    uploads: Arc<owned::Owned<String>>,
}

impl Owned {
    /// Owns the staging key `key` until the claim is dropped: every multipart upload on
    /// it and the object under it. Taken before the upload is created, so no sweep ever
    /// lists the upload before it is owned.
    pub(super) fn staging_key(&self, key: &str) -> Claim<String> {
        debug_assert!(
            !self.keys.contains(&key.to_owned()),
            "staging key {key} owned twice"
        );
        self.keys.claim(key.to_owned())
    }

    /// Owns the multipart upload `id` until the claim is dropped. Taken as soon as its
    /// CreateMultipartUpload answers; a sweep's cutoff (a day ago by default) cannot take
    /// an upload that young.
    pub(super) fn upload(&self, id: &str) -> Claim<String> {
        self.uploads.claim(id.to_owned())
    }

    /// Whether the multipart upload `id` on `key` is a live upload's.
    pub(super) fn owns_upload(&self, key: &str, id: &str) -> bool {
        self.keys.contains(&key.to_owned()) || self.uploads.contains(&id.to_owned())
    }

    /// Whether the object `key` is a live upload's staging object.
    fn owns_object(&self, key: &str) -> bool {
        self.keys.contains(&key.to_owned())
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.uploads.is_empty()
    }
}

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
    /// objects under `object_prefix` that are older than `cutoff`, except what a live
    /// upload of this process owns ([`Owned`]) and what the journal records.
    ///
    /// # Errors
    /// [`CacheError`] when listing fails, or the journal cannot be read (nothing is
    /// removed then).
    pub(super) fn sweep(
        &self,
        upload_prefixes: &[&str],
        object_prefix: &str,
        cutoff: SystemTime,
    ) -> Result<u64, CacheError> {
        let s = &self.shared;
        let recorded = match &s.journal {
            Some(j) => j.all(&s.url)?,
            None => Vec::new(),
        };
        let recorded_upload =
            |key: &str, id: &str| recorded.iter().any(|r| r.key == key && r.upload_id == id);
        let recorded_object = |key: &str| recorded.iter().any(|r| r.key == key);
        self.block_on(async {
            let mut removed = 0u64;
            let older = |t: Option<&aws_sdk_s3::primitives::DateTime>| {
                t.and_then(|t| SystemTime::try_from(*t).ok())
                    .is_some_and(|t| t < cutoff)
            };
            // Unfinished multipart uploads first: completing one would create a staging
            // object the listing below might miss.
            for &prefix in upload_prefixes {
                for u in s.multipart_uploads(Some(prefix)).await? {
                    let (key, id) = (u.key.as_str(), u.upload_id.as_str());
                    if !key.starts_with(prefix)
                        || u.initiated.is_none_or(|t| t >= cutoff)
                        || s.owned.owns_upload(key, id)
                        || recorded_upload(key, id)
                    {
                        continue;
                    }
                    match s.abort(key, id).await {
                        Ok(_) => removed += 1,
                        Err(e) => {
                            tracing::warn!("could not abort the orphaned upload {id} of {key}: {e}")
                        }
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
                    if !key.starts_with(prefix)
                        || !older(o.last_modified())
                        || s.owned.owns_object(key)
                        || recorded_object(key)
                    {
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
