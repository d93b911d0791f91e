//! Retrying S3 requests: which failures are worth another try (5xx, SlowDown, timeouts,
//! connection errors), jittered exponential backoff that honours Retry-After, and answers
//! whose outcome is unknown and must be checked.
use super::Shared;
use crate::cache::{CacheError, RequestCount};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The S3 operations narflow sends; every request goes through [`Shared::retry`] under one
/// of these, which counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    PutObject,
    HeadObject,
    GetObject,
    DeleteObject,
    DeleteObjects,
    CopyObject,
    CreateMultipartUpload,
    UploadPart,
    UploadPartCopy,
    CompleteMultipartUpload,
    AbortMultipartUpload,
    ListMultipartUploads,
    ListParts,
    ListObjectsV2,
}

impl Op {
    const ALL: [Op; 14] = [
        Op::PutObject,
        Op::HeadObject,
        Op::GetObject,
        Op::DeleteObject,
        Op::DeleteObjects,
        Op::CopyObject,
        Op::CreateMultipartUpload,
        Op::UploadPart,
        Op::UploadPartCopy,
        Op::CompleteMultipartUpload,
        Op::AbortMultipartUpload,
        Op::ListMultipartUploads,
        Op::ListParts,
        Op::ListObjectsV2,
    ];

    /// The operation's name in the S3 API.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Op::PutObject => "PutObject",
            Op::HeadObject => "HeadObject",
            Op::GetObject => "GetObject",
            Op::DeleteObject => "DeleteObject",
            Op::DeleteObjects => "DeleteObjects",
            Op::CopyObject => "CopyObject",
            Op::CreateMultipartUpload => "CreateMultipartUpload",
            Op::UploadPart => "UploadPart",
            Op::UploadPartCopy => "UploadPartCopy",
            Op::CompleteMultipartUpload => "CompleteMultipartUpload",
            Op::AbortMultipartUpload => "AbortMultipartUpload",
            Op::ListMultipartUploads => "ListMultipartUploads",
            Op::ListParts => "ListParts",
            Op::ListObjectsV2 => "ListObjectsV2",
        }
    }
}

/// Requests sent and retries, per [`Op`], since the cache was opened.
#[derive(Debug, Default)]
pub(super) struct Counts {
    requests: [AtomicU64; Op::ALL.len()],
    retries: [AtomicU64; Op::ALL.len()],
}

impl Counts {
    fn sent(&self, op: Op, retry: bool) {
        let i = op as usize;
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        if retry {
            self.retries[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every operation, those not sent yet with zeros (so a metric exists from the start).
    pub(super) fn snapshot(&self) -> Vec<RequestCount> {
        Op::ALL
            .iter()
            .map(|&op| RequestCount {
                operation: op.as_str(),
                requests: self.requests[op as usize].load(Ordering::Relaxed),
                retries: self.retries[op as usize].load(Ordering::Relaxed),
            })
            .collect()
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
        // the code, not the status, says whether to retry. A 2xx with no code is a
        // success whose document could not be read: its outcome is unknown, as after a
        // lost answer (callers that must know it check, see `unreadable_success`).
        SdkError::ServiceError(_) => match (status, e.code()) {
            (Some(408 | 429) | Some(500..=599), _)
            | (Some(200..=299), None)
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
    pub(super) async fn retry<T, E, F, Fut>(
        &self,
        operation: Op,
        key: &str,
        op: F,
    ) -> Result<T, CacheError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<
                Output = Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
            >,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        self.retry_by(operation, key, None, op).await
    }

    /// [`Shared::retry`], sending no attempt after `deadline`: [`CacheError::Late`] then.
    pub(super) async fn retry_by<T, E, F, Fut>(
        &self,
        operation: Op,
        key: &str,
        deadline: Option<std::time::Instant>,
        mut op: F,
    ) -> Result<T, CacheError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<
                Output = Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
            >,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let what = operation.as_str();
        let mut attempt = 0u32;
        loop {
            if deadline.is_some_and(|d| std::time::Instant::now() > d) {
                return Err(CacheError::Late {
                    cache: self.url.clone(),
                    key: key.to_owned(),
                });
            }
            // Counted when sent: a request dropped before its answer (a cancelled upload)
            // was sent all the same.
            self.counts.sent(operation, attempt > 0);
            let e = match op().await {
                Ok(v) => {
                    self.answered.store(true, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => e,
            };
            let status = e.raw_response().map(|r| r.status().as_u16());
            // Before the server has answered anything, missing credentials and a refused
            // connection are the configuration (no source of credentials; a wrong endpoint
            // or port): retrying cannot mend them. Later they are a passing failure (a
            // credentials refresh, a server restarting) and are retried like any other.
            let first_contact = if status.is_some() {
                self.answered.store(true, Ordering::Relaxed);
                false
            } else {
                !self.answered.load(Ordering::Relaxed)
            };
            if first_contact {
                if let Some(m) = super::credentials::missing_in(&e) {
                    return Err(CacheError::Config(format!("{}: {m}", self.url)));
                }
                if refused(&e) {
                    return Err(CacheError::Remote {
                        cache: self.url.clone(),
                        key: key.to_owned(),
                        message: format!(
                            "{what}: {} (not retried: nothing has answered there yet)",
                            describe(&e, status)
                        ),
                        transient: true,
                    });
                }
            }
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

    fn fatal<E: ProvideErrorMetadata>(
        &self,
        what: &str,
        key: &str,
        e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
        status: Option<u16>,
    ) -> CacheError
    where
        SdkError<E, aws_sdk_s3::config::http::HttpResponse>: std::error::Error + 'static,
    {
        let code = e.code().unwrap_or_default();
        let expected = expected_region(e).filter(|r| *r != self.region);
        let hint = match (status, code) {
            (_, "NoSuchBucket") => Some(format!("bucket {:?} does not exist", self.bucket)),
            _ if expected.is_some() => Some(format!(
                "region {:?} is wrong for bucket {:?}: its server expects {:?}; give \
                 region={} in the cache URL",
                self.region,
                self.bucket,
                expected.as_deref().unwrap_or_default(),
                expected.as_deref().unwrap_or_default()
            )),
            (Some(301), _) | (_, "PermanentRedirect" | "IllegalLocationConstraintException") => {
                Some(format!(
                    "bucket {:?} is not in region {:?}: give its region as region= in the \
                     cache URL",
                    self.bucket, self.region
                ))
            }
            (_, "InvalidAccessKeyId") => Some(
                "the server does not know the access key: check AWS_ACCESS_KEY_ID, or the \
                 profile (profile= in the cache URL)"
                    .to_owned(),
            ),
            (_, "SignatureDoesNotMatch") => Some(
                "the secret key does not match the access key: check \
                 AWS_SECRET_ACCESS_KEY, or the profile (profile= in the cache URL)"
                    .to_owned(),
            ),
            (Some(401 | 403), _) | (_, "AccessDenied") => Some(format!(
                "access denied to bucket {:?}: check the credentials (AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or the profile) and the key's permissions on the bucket",
                self.bucket
            )),
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
}

/// Whether the request's connection was refused (nothing listens at the endpoint).
fn refused<E, R>(e: &SdkError<E, R>) -> bool
where
    SdkError<E, R>: std::error::Error + 'static,
{
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The region the server says the bucket is in, when an answer says it: AWS's
/// `x-amz-bucket-region` header or its "expecting 'REGION'", or a signing scope the server
/// expected instead of ours ("expected: 'DATE/REGION/s3/aws4_request'", as Garage says).
fn expected_region<E: ProvideErrorMetadata>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Option<String> {
    if let Some(r) = e
        .raw_response()
        .and_then(|r| r.headers().get("x-amz-bucket-region"))
    {
        return Some(r.to_owned());
    }
    let msg = e.message()?;
    let quoted = |after: &str| {
        let rest = &msg[msg.find(after)? + after.len()..];
        Some(rest[..rest.find('\'')?].to_owned())
    };
    quoted("expecting '").or_else(|| {
        let scope = quoted("expected: '")?;
        scope.split('/').nth(1).map(str::to_owned)
    })
}

/// Jittered exponential backoff: a random wait up to 200 ms × 2^attempt, at most 10 s.
pub(super) fn backoff(attempt: u32) -> Duration {
    let cap = (200u64 << attempt.min(10)).min(10_000);
    Duration::from_millis(fastrand::u64(cap / 2..=cap))
}

fn describe<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>, status: Option<u16>) -> String
where
    SdkError<E, R>: std::error::Error + 'static,
{
    match (e.code(), e.message(), status) {
        (Some(code), Some(msg), Some(s)) => format!("HTTP {s} {code}: {msg}"),
        (Some(code), None, Some(s)) => format!("HTTP {s} {code}"),
        (None, _, Some(s)) => format!("HTTP {s}"),
        _ => super::credentials::one_line(e),
    }
}

pub(super) fn join_error(url: &str, e: tokio::task::JoinError) -> CacheError {
    CacheError::Remote {
        cache: url.to_owned(),
        key: String::new(),
        message: format!("request task failed: {e}"),
        transient: false,
    }
}

/// What a request whose outcome must be known did, as far as its answer tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    Done,
    /// The answer was lost, unreadable, or says the work is already done: check it.
    Unknown,
}

/// A `2xx` answer whose document the SDK could not read (some S3-compatible servers send
/// another root element for CompleteMultipartUpload): the server may well have done the
/// work, so the outcome is unknown, not a failure. A 200 carrying an S3 error document has
/// a code and is handled as that error.
pub(super) fn unreadable_success<E: ProvideErrorMetadata>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    e.raw_response().is_some_and(|r| r.status().is_success()) && e.code().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A narinfo write by a writer beside gc is sent, and retried, only until its
    /// deadline: past it, nothing more goes out and each narinfo fails alone, transiently.
    #[test]
    fn narinfo_writes_and_their_retries_are_sent_only_until_the_deadline() {
        use crate::cache::{BinaryCache, CacheError, Merged};
        use std::time::{Duration, Instant};
        let (endpoint, _) = super::super::testing::stand_in(1);
        let cache = super::super::testing::cache_with(&endpoint, 128 << 20, |t| t.retries = 3);
        let puts = |cache: &super::super::S3Cache| {
            let c = cache
                .request_counts()
                .into_iter()
                .find(|c| c.operation == "PutObject")
                .unwrap();
            (c.requests, c.retries)
        };
        let narinfo = |name: &str| crate::format::narinfo::NarInfo {
            store_path: crate::format::store_path::StorePath::from_base_name(&format!(
                "qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-{name}"
            ))
            .unwrap(),
            url: format!("nar/{name}.nar"),
            compression: "none".into(),
            file_hash: None,
            file_size: Some(1),
            nar_hash: crate::format::hash::Sha256::digest(name.as_bytes()),
            nar_size: 1,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        let past = Instant::now() - Duration::from_millis(1);
        let r = cache
            .publish_narinfos_by("/nix/store", vec![narinfo("a"), narinfo("b")], past)
            .unwrap();
        assert_eq!(r.len(), 2);
        for p in &r {
            let e = p.as_ref().unwrap_err();
            assert!(
                matches!(e, CacheError::Late { .. }) && e.is_transient(),
                "{e}"
            );
            assert!(e.to_string().contains("narflow-gc"), "{e}");
        }
        assert_eq!(puts(&cache), (0, 0));
        let r = cache
            .publish_narinfos_by(
                "/nix/store",
                vec![narinfo("a")],
                Instant::now() + Duration::from_secs(600),
            )
            .unwrap();
        assert!(matches!(r[..], [Ok(Merged::Written)]), "{r:?}");
        assert_eq!(puts(&cache), (1, 0));
        // Answered 503 first; the retry waits at least 100 ms, past the deadline.
        let soon = Instant::now() + Duration::from_millis(50);
        let late = cache
            .shared
            .rt
            .block_on(cache.shared.put_by(
                "fail-once",
                bytes::Bytes::from_static(b"x"),
                "text/plain",
                Some(soon),
            ))
            .unwrap_err();
        assert!(matches!(late, CacheError::Late { .. }), "{late}");
        let (requests, retries) = puts(&cache);
        assert!(
            requests <= 2 && retries == 0,
            "{requests} PUTs, {retries} retries"
        );
    }

    /// Every request is counted under its operation, and a retry as a retry: one small
    /// NAR is one PutObject, a NAR of three parts the whole multipart sequence.
    #[test]
    fn requests_and_retries_are_counted_by_operation() {
        use crate::cache::BinaryCache;
        use std::io::Write;
        let (endpoint, _) = super::super::testing::stand_in(1);
        let cache = super::super::testing::cache_with(&endpoint, 128 << 20, |t| t.retries = 2);
        let sent = |cache: &super::super::S3Cache| {
            cache
                .request_counts()
                .into_iter()
                .filter(|c| c.requests > 0)
                .map(|c| (c.operation, (c.requests, c.retries)))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert_eq!(sent(&cache), Default::default());
        assert_eq!(cache.request_counts().len(), Op::ALL.len());

        // Answered 503 once, then accepted.
        cache.put_object("fail-once", b"x", "text/plain").unwrap();
        assert!(cache.has_object("a").unwrap());
        let mut nar = cache.begin_nar(100).unwrap();
        nar.write_all(&[1; 100]).unwrap();
        nar.commit("nar/small.nar").unwrap();
        assert_eq!(
            sent(&cache),
            [("PutObject", (3, 1)), ("HeadObject", (1, 0))].into()
        );

        // 20 MiB in parts of 8 MiB: three parts to a staging key, then copied to its name.
        let mut nar = cache.begin_nar(20 << 20).unwrap();
        nar.write_all(&vec![2; 20 << 20]).unwrap();
        nar.commit("nar/large.nar").unwrap();
        assert_eq!(
            sent(&cache),
            [
                ("PutObject", (3, 1)),
                ("HeadObject", (1, 0)),
                ("CreateMultipartUpload", (1, 0)),
                ("UploadPart", (3, 0)),
                ("CompleteMultipartUpload", (1, 0)),
                ("ListMultipartUploads", (1, 0)),
                ("CopyObject", (1, 0)),
                ("DeleteObject", (1, 0)),
            ]
            .into()
        );
    }
}
