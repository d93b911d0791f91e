//! Sweeping what killed uploads left behind: unfinished multipart uploads and staging
//! objects older than a cutoff (never objects under `nar/`), and the registry of what the
//! live uploads of this process own, which a sweep never removes whatever its age.
use super::retry::Op;
use super::{S3Cache, STAGING_PREFIX};
use crate::cache::CacheError;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// What the live uploads of this process own in the bucket: the staging key of each NAR
/// going up in parts (its multipart upload, then the staging object that upload completes
/// to, until the object is copied and deleted or the upload is dropped), and the multipart
/// upload of each copy to a final key in parts. Age tells a sweep what a killed upload
/// left, but not what a slow live one still needs (a NAR taking longer than the grace at
/// a low `--max-rate`, a staging object still being copied): this does.
///
/// Each entry belongs to an [`Owning`] guard and goes when the guard is dropped, so an
/// upload that ends in any way (committed, failed, dropped) leaves nothing behind here.
#[derive(Debug, Default)]
pub(super) struct Owned(Mutex<OwnedSets>);

#[derive(Debug, Default)]
struct OwnedSets {
    /// Staging keys (unique to their upload: see `S3NarUpload::staging_key`).
    keys: HashSet<String>,
    /// Upload ids of multi-part copies (their keys, under `nar/`, are not unique to us).
    uploads: HashSet<String>,
}

impl Owned {
    fn sets(&self) -> std::sync::MutexGuard<'_, OwnedSets> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Owns the staging key `key` until the guard is dropped: every multipart upload on
    /// it and the object under it. Taken before the upload is created, so no sweep ever
    /// lists the upload before it is owned.
    pub(super) fn staging_key(self: &Arc<Self>, key: &str) -> Owning {
        let fresh = self.sets().keys.insert(key.to_owned());
        debug_assert!(fresh, "staging key {key} owned twice");
        Owning {
            owned: self.clone(),
            entry: Entry::Key(key.to_owned()),
        }
    }

    /// Owns the multipart upload `id` until the guard is dropped. Taken as soon as its
    /// CreateMultipartUpload answers; a sweep's cutoff (a day ago by default) cannot take
    /// an upload that young.
    pub(super) fn upload(self: &Arc<Self>, id: &str) -> Owning {
        self.sets().uploads.insert(id.to_owned());
        Owning {
            owned: self.clone(),
            entry: Entry::Upload(id.to_owned()),
        }
    }

    /// Whether the multipart upload `id` on `key` is a live upload's.
    fn owns_upload(&self, key: &str, id: &str) -> bool {
        let sets = self.sets();
        sets.keys.contains(key) || sets.uploads.contains(id)
    }

    /// Whether the object `key` is a live upload's staging object.
    fn owns_object(&self, key: &str) -> bool {
        self.sets().keys.contains(key)
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        let sets = self.sets();
        sets.keys.is_empty() && sets.uploads.is_empty()
    }
}

/// One entry of [`Owned`], removed when this is dropped.
#[derive(Debug)]
#[must_use = "what it owns is unprotected once it is dropped"]
pub(super) struct Owning {
    owned: Arc<Owned>,
    entry: Entry,
}

#[derive(Debug)]
enum Entry {
    Key(String),
    Upload(String),
}

impl Drop for Owning {
    fn drop(&mut self) {
        let mut sets = self.owned.sets();
        match &self.entry {
            Entry::Key(k) => sets.keys.remove(k),
            Entry::Upload(id) => sets.uploads.remove(id),
        };
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
    /// upload of this process owns ([`Owned`]).
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
                        if !key.starts_with(prefix)
                            || !older(u.initiated())
                            || s.owned.owns_upload(key, id)
                        {
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
                    if !key.starts_with(prefix)
                        || !older(o.last_modified())
                        || s.owned.owns_object(key)
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
