//! Requests on one object (PUT, HEAD, GET, DELETE, abort of one multipart upload), each
//! retried; the uploads, batches and the sweep are built from these.
use super::Shared;
use super::retry::Op;
use crate::cache::CacheError;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;

impl Shared {
    pub(super) async fn put(
        &self,
        key: &str,
        body: bytes::Bytes,
        content_type: &str,
    ) -> Result<(), CacheError> {
        self.put_by(key, body, content_type, None).await.map(drop)
    }

    /// [`Shared::put`], sending no attempt after `deadline`; the ETag the server answered
    /// with, when it gave one.
    pub(super) async fn put_by(
        &self,
        key: &str,
        body: bytes::Bytes,
        content_type: &str,
        deadline: Option<std::time::Instant>,
    ) -> Result<Option<String>, CacheError> {
        self.retry_by(Op::PutObject, key, deadline, || {
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
        .map(|out| out.e_tag().map(str::to_owned))
    }

    /// Aborts the multipart upload `id` on `key`. One that is gone already (completed or
    /// aborted: NoSuchUpload) counts as aborted.
    pub(super) async fn abort(&self, key: &str, id: &str) -> Result<(), CacheError> {
        self.retry(Op::AbortMultipartUpload, key, || async {
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

    pub(super) async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        Ok(self.size(key).await?.is_some())
    }

    /// Checks, after an answer that left the outcome of `what` unknown, that `key` exists
    /// with `size` bytes.
    ///
    /// # Errors
    /// A transient [`CacheError::Remote`] when it does not (the caller's cleanup removes
    /// whatever was made).
    pub(super) async fn check_size(
        &self,
        key: &str,
        size: u64,
        what: &str,
    ) -> Result<(), CacheError> {
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

    pub(super) async fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
        let Some(bytes) = self.get_bytes(key).await? else {
            return Ok(None);
        };
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| CacheError::Config(format!("{}: {key} is not UTF-8 text", self.url)))
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.retry(Op::DeleteObject, key, || {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
        })
        .await
        .map(drop)
    }
}

/// Reading existing objects, for the narinfo merge rule.
impl Shared {
    /// The size of `key` from a HEAD, or `None` when it does not exist.
    pub(super) async fn size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        self.retry(Op::HeadObject, key, || async {
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
    pub(super) async fn get_text_lossy(&self, key: &str) -> Result<Option<String>, CacheError> {
        let bytes = self.get_bytes(key).await?;
        Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// The body of `key`, streamed, or `None` when it does not exist.
    pub(super) async fn open(&self, key: &str) -> Result<Option<ByteStream>, CacheError> {
        let out = self
            .retry(Op::GetObject, key, || async {
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
        Ok(out.map(|o| o.body))
    }

    pub(super) async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(body) = self.open(key).await? else {
            return Ok(None);
        };
        let body = body.collect().await.map_err(|e| CacheError::Remote {
            cache: self.url.clone(),
            key: key.to_owned(),
            message: format!("reading the body: {e}"),
            transient: true,
        })?;
        Ok(Some(body.to_vec()))
    }
}
