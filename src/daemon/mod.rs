//! `narflow daemon`: takes store paths from `narflow hook` over a Unix socket, queues them
//! durably, and uploads their closures through the pipeline, retrying failures.
//!
//! Files: [`queue`] (durable, SQLite); `lifecycle` (start, serve, shut down in order);
//! `socket` (the socket file and the trusted directories); `accept` (the listeners' accept
//! loop); `server` (the socket's requests: validates and queues, nothing more); `intake`
//! (hand-offs and the spool into the queue); `worker` (due paths into one long-lived
//! pipeline, results into the queue); `watch` (`--watch-store`: new valid paths into the
//! queue); `status` (`narflow status`); `metrics` (`/metrics`). The request lines and the
//! spool are the hook's ([`crate::handoff`]).
//!
//! A path is acknowledged only after it is committed to the queue, and marked done only
//! after its narinfo is in the cache; a crash anywhere leaves it pending, and the next
//! start uploads it (skipping what the cache already has). Shutdown is a future passed to
//! [`Daemon::run`], so the CLI (SIGTERM) and tests stop it the same way; it cancels the
//! uploads in flight if they have not finished within half the shutdown timeout.
//!
//! The daemon (root, usually) trusts its state directory and its socket's directory only
//! when they are its own and writable by nobody else, and opens the files there without
//! following symlinks.
mod accept;
mod intake;
mod lifecycle;
mod metrics;
pub mod queue;
mod server;
mod socket;
mod status;
mod watch;
mod worker;

pub use lifecycle::Daemon;
pub use metrics::MetricsBindError;
pub use status::{
    DroppedPath, LargeUpload, LastBatch, Recent, SinceStart, Status, StatusParseError, WatchStatus,
    status_from_queue,
};

use crate::cache::BinaryCache;
use crate::cache::resume::UploadJournal;
use crate::pipeline::PushOptions;
use crate::settings::WatchStore;
use crate::store::LocalStore;
use queue::{Queue, QueueError};
use status::Stats;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Due paths planned at a time. One plan is one closure query and one look at the cache,
/// so planning many at once amortises its cost; the cap bounds how much the feeder submits
/// before it looks at the queue again.
pub const DEFAULT_BATCH: usize = 1000;

/// How old a leftover of an interrupted upload must be before the sweep removes it. Long
/// enough that no upload still running (a multi-GiB NAR on a slow link, or another
/// builder's daemon writing to the same bucket) is ever touched, and leftovers only cost
/// storage, so a day is cheap.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(24 * 3600);

/// How the daemon is set up.
#[derive(Debug)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// Make the socket 0660 and owned by this group (else 0600, owner and root only).
    pub socket_group: Option<u32>,
    pub opts: PushOptions,
    pub batch: usize,
    /// How long a shutdown waits for the batch in flight before leaving it queued.
    pub shutdown_timeout: Duration,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Follow the Nix database and queue new valid paths (`--watch-store`), if set.
    pub watch_store: Option<WatchStore>,
    /// Record unfinished multipart uploads in the queue database so that they resume
    /// after a restart (an S3 cache), ending each record as [`crate::pipeline::resume`]
    /// decides, with this `--resume-max-age`; `None`: no record.
    pub resume_max_age: Option<Duration>,
}

/// Why the daemon cannot start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another narflow daemon is using the state directory {0}")]
    Locked(PathBuf),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket {0}: another daemon is listening there")]
    SocketInUse(PathBuf),
    #[error("{what} {path}: refused: {why}")]
    Unsafe {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error(transparent)]
    Metrics(#[from] MetricsBindError),
    /// `--watch-store` was asked for, and the Nix database cannot be followed.
    #[error("--watch-store: {0}")]
    WatchStore(String),
    /// The queue database cannot hold the journal (its error names the file).
    #[error("{source}")]
    Journal {
        path: PathBuf,
        source: crate::cache::CacheError,
    },
    #[error("the upload worker stopped unexpectedly")]
    WorkerDied,
}

/// State shared by the server and the worker.
#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Where paths are checked, and the outputs of a derivation named without its outputs
    /// (Nix 2.8.0's hook) are looked up; the worker uploads from it.
    store: LocalStore,
    state_dir: PathBuf,
    /// Rung after an enqueue so the worker starts at once.
    bell: crossbeam_channel::Sender<()>,
    stopping: AtomicBool,
    /// Queued paths being planned or uploaded (the paths asked for, not their closures).
    in_flight: AtomicUsize,
    stats: Stats,
    metrics: metrics::Metrics,
    started: Instant,
    /// The store watcher's mode, when it runs.
    watch: Option<WatchStore>,
    /// The cache uploads go to (for its large uploads in flight, in `narflow status`).
    /// Weak: the worker and the helper threads own the cache, so that its runtime is
    /// dropped on one of them, never in the daemon's async context (which tokio forbids).
    cache: std::sync::Weak<dyn BinaryCache>,
    /// The journal of unfinished uploads and `--resume-max-age`, when uploads resume.
    records: Option<(Arc<dyn UploadJournal>, Duration)>,
}

impl Shared {
    fn store_dir(&self) -> &str {
        self.store.store_dir()
    }

    /// The queue. A panic while it was held (none is expected) leaves the connection
    /// usable: the transaction in progress was rolled back when dropped.
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
