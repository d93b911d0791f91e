//! What a push reports: each path's [`Outcome`] (and [`Failure`], with whether a retry can
//! help), the run's [`PushReport`], the [`PushError`] that stops a whole run, and the
//! [`Progress`] callbacks. Values only: nothing here talks to a store or a cache.
use super::stats::StageStats;
use crate::format::hash::Sha256;
use crate::store::StoreError;
use std::time::Duration;

/// What happened to one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Uploaded {
        nar_size: u64,
        file_size: u64,
    },
    /// Its narinfo was in the cache already.
    AlreadyPresent,
    Failed(Failure),
}

/// Bytes of the paths a push uploaded: NAR bytes read from the store, file bytes written
/// to the cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UploadedBytes {
    pub nar: u64,
    pub file: u64,
}

impl UploadedBytes {
    /// Counts `outcome` when it is an upload; returns whether it was one.
    pub fn add(&mut self, outcome: &Outcome) -> bool {
        match outcome {
            Outcome::Uploaded {
                nar_size,
                file_size,
            } => {
                self.nar += nar_size;
                self.file += file_size;
                true
            }
            Outcome::AlreadyPresent | Outcome::Failed(_) => false,
        }
    }
}

/// Whether retrying a failed path can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The same attempt may succeed later: a network error, a timeout, a cache that is
    /// busy, an upload cancelled by a shutdown.
    Transient,
    /// Retrying as it is cannot help until someone acts: a corrupt store path, access
    /// denied, a missing bucket, a path that is not in the store.
    Permanent,
}

/// What kind of thing went wrong with one path (a stable label for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    /// The path could not be read from the store, or is not (or no longer) valid there.
    Store,
    /// The store's copy does not match its registration (NarHash, NarSize).
    Corrupt,
    /// The cache refused or failed a request.
    Cache,
    /// A path it references failed or is missing from the cache.
    Reference,
    /// The push was cancelled (a shutdown) before the path was finished.
    Cancelled,
    /// Anything else (an upload that returned no result).
    Other,
}

impl FailureKind {
    /// The label: `store`, `corrupt`, `cache`, `reference`, `cancelled`, `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Store => "store",
            FailureKind::Corrupt => "corrupt",
            FailureKind::Cache => "cache",
            FailureKind::Reference => "reference",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Other => "other",
        }
    }
}

/// Why one path failed: what went wrong, with the values involved, and whether retrying
/// can help ([`Failure::retry`]). The `Display` text is the message users see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The path is not valid in the store (never built, or garbage-collected).
    #[error("{path} is not a valid path in the Nix store")]
    NotValid { path: String },
    /// Reading the path from the store failed (an I/O error, or it changed under us).
    #[error("{message}")]
    Read { message: String },
    /// The store's copy does not match its registration in the Nix database.
    #[error(
        "{path} is corrupt: its contents hash to {actual_hash} ({actual_size} bytes) but the \
         Nix database records {expected_hash} ({expected_size} bytes); not uploaded (repair \
         it with `nix-store --repair-path {path}`)"
    )]
    Corrupt {
        path: String,
        expected_hash: Sha256,
        expected_size: u64,
        actual_hash: Sha256,
        actual_size: u64,
    },
    /// The cache refused or failed a request: its error's text and retry class (a
    /// [`crate::cache::CacheError`] is not `Clone`). `context` says what was being done
    /// (`"writing the NAR: "`, or empty).
    #[error("{context}{message}")]
    Cache {
        context: &'static str,
        message: String,
        transient: bool,
    },
    /// A reference failed in this run; the path inherits its retry class.
    #[error("not published: its reference {reference} failed")]
    ReferenceFailed { reference: String, retry: Retry },
    /// A reference is neither in this run nor in the cache.
    #[error("its reference {reference} is not in the cache (push without --no-closure)")]
    ReferenceMissing { reference: String },
    /// A gc of the cache ran since the push found `object` there (a reference's narinfo,
    /// or the NAR it did not write again), and removed it: the narinfo is not written.
    #[error(
        "not published: {object} was in the cache when the push looked, and a gc of the cache has removed it since (a retry uploads it again)"
    )]
    RemovedByGc { object: String },
    /// Its references never became durable (a path the run lost).
    #[error("not published: its references never became durable")]
    ReferencesNotDurable,
    /// The push was cancelled (a shutdown) before the path was finished.
    #[error("{}", CANCELLED)]
    Cancelled,
    /// Anything else, described by its message, kind and retry class.
    #[error("{message}")]
    Other {
        message: String,
        kind: FailureKind,
        retry: Retry,
    },
}

impl Failure {
    /// A failure described only by a message, that may pass on a retry.
    pub fn transient(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure::Other {
            message: message.into(),
            kind,
            retry: Retry::Transient,
        }
    }
    /// A failure described only by a message, that needs someone to act.
    pub fn permanent(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure::Other {
            message: message.into(),
            kind,
            retry: Retry::Permanent,
        }
    }
    /// A cache error, classed by [`crate::cache::CacheError::is_transient`].
    pub fn from_cache(e: &crate::cache::CacheError) -> Self {
        Failure::Cache {
            context: "",
            message: e.to_string(),
            transient: e.is_transient(),
        }
    }
    /// What each path of a push that stopped with `e` failed of.
    pub fn from_push(e: &PushError) -> Self {
        Failure::Other {
            message: format!("{e:#}"),
            kind: e.kind(),
            retry: if e.is_transient() {
                Retry::Transient
            } else {
                Retry::Permanent
            },
        }
    }
    pub fn is_transient(&self) -> bool {
        self.retry() == Retry::Transient
    }
    /// Whether retrying can help.
    pub fn retry(&self) -> Retry {
        match self {
            // The path changed or vanished under us, or the disk hiccuped: the next look
            // may find it readable (a path that is gone for good is dropped by its caller).
            Failure::Read { .. }
            | Failure::Cancelled
            | Failure::ReferencesNotDurable
            | Failure::RemovedByGc { .. } => Retry::Transient,
            Failure::NotValid { .. }
            | Failure::Corrupt { .. }
            | Failure::ReferenceMissing { .. } => Retry::Permanent,
            Failure::Cache { transient, .. } => {
                if *transient {
                    Retry::Transient
                } else {
                    Retry::Permanent
                }
            }
            Failure::ReferenceFailed { retry, .. } | Failure::Other { retry, .. } => *retry,
        }
    }
    /// The kind, for metrics and logs.
    pub fn kind(&self) -> FailureKind {
        match self {
            Failure::NotValid { .. } | Failure::Read { .. } => FailureKind::Store,
            Failure::Corrupt { .. } => FailureKind::Corrupt,
            Failure::Cache { .. } => FailureKind::Cache,
            Failure::ReferenceFailed { .. }
            | Failure::ReferenceMissing { .. }
            | Failure::ReferencesNotDurable
            | Failure::RemovedByGc { .. } => FailureKind::Reference,
            Failure::Cancelled => FailureKind::Cancelled,
            Failure::Other { kind, .. } => *kind,
        }
    }
}

/// The message of a path that a cancelled push did not finish.
pub const CANCELLED: &str = "not finished: the upload was cancelled (shutdown)";

#[derive(Debug, Clone)]
pub struct PathResult {
    /// The full path as the user would name it.
    pub path: String,
    pub outcome: Outcome,
}

/// The result of a push: one entry per path considered, in processing order.
#[derive(Debug, Default)]
pub struct PushReport {
    pub results: Vec<PathResult>,
    /// What the uploaded paths (of `results`) weigh.
    pub bytes: UploadedBytes,
    pub elapsed: Duration,
    /// Per-stage statistics of the upload phase (empty when nothing was uploaded).
    pub stages: Vec<StageStats>,
    /// Paths asked for that are not valid in the store (never built, or garbage-collected);
    /// each is also in `results` as failed.
    pub not_valid: Vec<String>,
}

impl PushReport {
    pub fn failed(&self) -> impl Iterator<Item = &PathResult> {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
    }
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }
}

/// Receives progress from a push. Called from the pushing thread.
pub trait Progress: Send + Sync {
    /// The plan: how many paths will be uploaded and their total NAR size.
    fn planned(&self, _paths: usize, _nar_bytes: u64) {}
    /// NAR bytes written to the cache (called often; keep it cheap).
    fn nar_bytes(&self, _bytes: u64) {}
    /// A path finished (uploaded, skipped or failed).
    fn finished(&self, _result: &PathResult) {}
    /// A gc of the cache is running: the push waits until it is done (called once a wait).
    fn waiting_for_gc(&self) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// Errors that stop a whole push (per-path failures are in [`PushReport`] instead).
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PushError {
    /// What kind of failure this is for each path of the push.
    pub fn kind(&self) -> FailureKind {
        match self {
            PushError::Cache(_) => FailureKind::Cache,
            PushError::Store(_) => FailureKind::Store,
        }
    }
    /// True when the same push may succeed later (the cache or store was unreachable or
    /// busy); false when someone must act first (bad credentials, missing bucket, wrong
    /// StoreDir, a corrupt store database).
    pub fn is_transient(&self) -> bool {
        match self {
            PushError::Cache(e) => e.is_transient(),
            PushError::Store(e) => e.is_transient(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploaded_bytes_count_uploads_only() {
        let mut bytes = UploadedBytes::default();
        let up = |nar_size, file_size| Outcome::Uploaded {
            nar_size,
            file_size,
        };
        assert!(bytes.add(&up(10, 4)));
        assert!(bytes.add(&up(5, 2)));
        assert!(!bytes.add(&Outcome::AlreadyPresent));
        assert!(!bytes.add(&Outcome::Failed(Failure::Cancelled)));
        assert_eq!(bytes, UploadedBytes { nar: 15, file: 6 });
    }
}
