//! `narflow daemon`: takes store paths from `narflow hook` over a Unix socket, queues them
//! durably, and uploads their closures through the pipeline, retrying failures.
//!
//! - [`protocol`]: the request/reply lines (std only; the hook links it).
//! - [`spool`]: the file the hook appends to when the daemon is unreachable (std only).
//! - [`queue`]: the durable queue (SQLite, WAL, `synchronous=FULL`).
//! - `server`: the socket, on a tokio runtime; it validates and queues, nothing more.
//! - `worker`: one thread that takes due paths in batches and runs [`crate::pipeline::push`];
//!   one that drains the spool every second; one that sweeps orphaned uploads hourly.
//!
//! A path is acknowledged only after it is committed to the queue, and marked done only
//! after its narinfo is in the cache; a crash anywhere leaves it pending, and the next
//! start uploads it (skipping what the cache already has). Shutdown is a future passed to
//! [`Daemon::run`], so the CLI (SIGTERM) and tests stop it the same way; it cancels the
//! upload in flight if it has not finished within half the shutdown timeout.
//!
//! The daemon (root, usually) trusts its state directory and its socket's directory only
//! when they are its own and writable by nobody else, and opens the files there without
//! following symlinks.
pub mod protocol;
pub mod queue;
mod server;
pub mod spool;
mod worker;

use crate::cache::BinaryCache;
use crate::format::store_path::StorePath;
use crate::pipeline::PushOptions;
use crate::store::LocalStore;
use protocol::EnqueueReply;
use queue::{Queue, QueueError};
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Paths per upload batch. One batch is one closure query, one cache listing and one
/// pipeline run, so batches amortise per-run costs; the cap bounds how long a shutdown
/// waits for the batch in flight.
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
    #[error("the upload worker stopped unexpectedly")]
    WorkerDied,
}

/// A daemon with its state directory locked, its queue open and its socket bound, ready
/// to [`Daemon::run`].
#[derive(Debug)]
pub struct Daemon {
    cfg: DaemonConfig,
    listener: std::os::unix::net::UnixListener,
    /// (device, inode) of the socket we bound: shutdown removes the path only if it is
    /// still ours.
    socket_id: (u64, u64),
    queue: Queue,
    _lock: File,
}

impl Daemon {
    /// Locks the state directory, opens the queue and binds the socket. Call it before
    /// anything starts threads: the socket is created under a umask that keeps it private.
    ///
    /// # Errors
    /// [`DaemonError`] naming the directory, queue or socket that is unusable.
    pub fn bind(cfg: DaemonConfig) -> Result<Daemon, DaemonError> {
        let dir = &cfg.state_dir;
        let dir_err = |source| DaemonError::StateDir {
            path: dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(dir_err)?;
        check_private_dir("state directory", dir)?;
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(dir.join("lock"))
            .map_err(dir_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(DaemonError::Locked(dir.clone())),
            Err(std::fs::TryLockError::Error(e)) => return Err(dir_err(e)),
        }
        let queue = Queue::open(dir)?;
        let (listener, socket_id) = bind_socket(&cfg.socket, cfg.socket_group)?;
        Ok(Daemon {
            cfg,
            listener,
            socket_id,
            queue,
            _lock: lock,
        })
    }

    /// Gives up a daemon that will not run: removes its socket (if it is still ours).
    pub fn release(self) {
        remove_socket_if_ours(&self.cfg.socket, self.socket_id);
    }

    /// Serves until `shutdown` resolves, then stops taking requests, removes the socket
    /// (if it is still ours), and waits for the batch in flight: up to half the shutdown
    /// timeout for it to finish, then cancels it (the upload is aborted mid-NAR) and waits
    /// up to the rest. Whatever is not done stays queued for the next start, and a
    /// cancelled path does not count as a failed attempt. Must be called within a tokio
    /// runtime; the worker is a thread of its own, so returning never waits for it.
    ///
    /// # Errors
    /// [`DaemonError::WorkerDied`] when the upload worker stopped on its own.
    pub async fn run(
        self,
        store: LocalStore,
        cache: Box<dyn BinaryCache>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        let Daemon {
            cfg,
            listener,
            socket_id,
            queue,
            _lock,
        } = self;
        let sock_err = |source| DaemonError::Socket {
            path: cfg.socket.clone(),
            source,
        };
        listener.set_nonblocking(true).map_err(sock_err)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(sock_err)?;
        let cache: Arc<dyn BinaryCache> = Arc::from(cache);
        // Capacity 1: a doorbell. One pending ring is enough, because the worker takes
        // everything due when it wakes.
        let (bell_tx, bell_rx) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(queue),
            store,
            state_dir: cfg.state_dir.clone(),
            bell: bell_tx,
            stopping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            stats: Stats::default(),
            started: Instant::now(),
        });
        tracing::info!(
            "narflow daemon: listening on {}, uploading to {}, state in {}",
            cfg.socket.display(),
            cache.url(),
            cfg.state_dir.display()
        );

        // The spool first: once the socket answers, what the hook spooled while the
        // daemon was down is in the queue (and in `narflow status`).
        {
            let shared = shared.clone();
            let _ = tokio::task::spawn_blocking(move || worker::drain_spool(&shared)).await;
        }
        let spawn_err = |e| DaemonError::StateDir {
            path: cfg.state_dir.clone(),
            source: e,
        };
        // Capacity 0: nothing is ever sent; dropping the sender stops the helper threads.
        let (stop_helpers, helpers_stop) = crossbeam_channel::bounded::<()>(0);
        {
            let (shared, stop) = (shared.clone(), helpers_stop.clone());
            std::thread::Builder::new()
                .name("narflow-spool".into())
                .spawn(move || worker::drain_spool_every_second(&shared, &stop))
                .map_err(spawn_err)?;
        }
        {
            let (cache, stop) = (cache.clone(), helpers_stop);
            std::thread::Builder::new()
                .name("narflow-sweep".into())
                .spawn(move || {
                    worker::sweep_orphans(cache.as_ref(), ORPHAN_GRACE, worker::SWEEP_EVERY, &stop)
                })
                .map_err(spawn_err)?;
        }
        let cancel = cfg.opts.cancel.clone();
        let (dead_tx, mut dead_rx) = tokio::sync::oneshot::channel::<()>();
        {
            let shared = shared.clone();
            let (opts, batch) = (cfg.opts, cfg.batch.max(1));
            std::thread::Builder::new()
                .name("narflow-worker".into())
                .spawn(move || {
                    // Dropped when the worker returns or panics: the server then stops.
                    let _dead = dead_tx;
                    worker::run(&shared, cache.as_ref(), &opts, batch, &bell_rx);
                })
                .map_err(spawn_err)?;
        }

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let policy = server::PeerPolicy::new(cfg.socket_group);
        let server = tokio::spawn(server::serve(listener, shared.clone(), policy, stop_rx));
        let worker_died = tokio::select! {
            () = shutdown => false,
            _ = &mut dead_rx => true,
        };
        let _ = stop_tx.send(true);
        let _ = server.await;
        remove_socket_if_ours(&cfg.socket, socket_id);
        drop(stop_helpers);
        shared.stopping.store(true, Ordering::SeqCst);
        let _ = shared.bell.try_send(());
        if worker_died {
            return Err(DaemonError::WorkerDied);
        }
        tracing::info!("narflow daemon: stopping; no new requests, finishing the batch in flight");
        let half = cfg.shutdown_timeout / 2;
        if tokio::time::timeout(half, &mut dead_rx).await.is_err() {
            tracing::info!(
                "narflow daemon: the batch in flight is not done after {half:?}; cancelling it (its unfinished paths stay queued)"
            );
            cancel.cancel();
            if tokio::time::timeout(cfg.shutdown_timeout - half, &mut dead_rx)
                .await
                .is_err()
            {
                tracing::warn!(
                    "narflow daemon: {} paths still uploading after {:?}; they stay queued and are uploaded on the next start",
                    shared.in_flight.load(Ordering::SeqCst),
                    cfg.shutdown_timeout
                );
                return Ok(());
            }
        }
        tracing::info!("narflow daemon: stopped");
        Ok(())
    }
}

/// Refuses `dir` unless it is owned by this process's user and writable by nobody else:
/// whoever can write there can plant files the daemon trusts (spooled paths it signs and
/// uploads, or a socket the hook talks to).
fn check_private_dir(what: &'static str, dir: &Path) -> Result<(), DaemonError> {
    let meta = std::fs::metadata(dir).map_err(|source| DaemonError::StateDir {
        path: dir.to_owned(),
        source,
    })?;
    let me = rustix::process::geteuid().as_raw();
    let why = if meta.uid() != me {
        format!(
            "owned by uid {}, not by the daemon's uid {me}; chown it, or use another",
            meta.uid()
        )
    } else if meta.mode() & 0o022 != 0 {
        format!(
            "writable by group or others (mode {:o}); chmod go-w it, or use another",
            meta.mode() & 0o7777
        )
    } else {
        return Ok(());
    };
    Err(DaemonError::Unsafe {
        what,
        path: dir.to_owned(),
        why,
    })
}

/// Removes the socket at `path` only if it is the one we bound (`id`): another daemon may
/// have bound the path since.
fn remove_socket_if_ours(path: &Path, id: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == id => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => tracing::info!(
            "{}: the socket is another's now; left in place",
            path.display()
        ),
        Err(_) => {}
    }
}

/// Binds the socket at `path` with mode 0600 (0660 and group `group` when given),
/// replacing a stale socket file but never a live daemon's (one that accepts, or whose
/// backlog is full because it is busy or stopped). Returns the listener and the socket's
/// (device, inode).
fn bind_socket(
    path: &Path,
    group: Option<u32>,
) -> Result<(std::os::unix::net::UnixListener, (u64, u64)), DaemonError> {
    let err = |source| DaemonError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(err)?;
        check_private_dir("socket directory", parent)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if protocol::is_listening(path).map_err(err)? {
            return Err(DaemonError::SocketInUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // The umask makes the socket private from the moment it exists; the process has no
    // other threads yet, so no other file is created under it.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.map_err(err)?;
    if let Some(gid) = group {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|e| err(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    }
    let m = std::fs::symlink_metadata(path).map_err(err)?;
    Ok((listener, (m.dev(), m.ino())))
}

/// Why a token was not queued; the spool drain keeps a transiently refused hand-off.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rejection {
    /// Not a store path at all (never queueable).
    Invalid(String),
    /// The path (or the derivation's outputs) is not in the store.
    NoSuchPath(String),
    /// The store could not be looked at; the same request may succeed later.
    Transient(String),
}

impl Rejection {
    fn is_transient(&self) -> bool {
        matches!(self, Rejection::Transient(_))
    }

    fn why(&self) -> &str {
        match self {
            Rejection::Invalid(w) | Rejection::NoSuchPath(w) | Rejection::Transient(w) => w,
        }
    }
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
    /// Paths in the batch being uploaded (the paths asked for, not their closures).
    in_flight: AtomicUsize,
    stats: Stats,
    started: Instant,
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

    /// Validates `tokens` and queues the store paths among them, durably. With no tokens,
    /// queues the outputs of `drv`: Nix 2.8.0 runs the post-build-hook with `$OUT_PATHS`
    /// empty and only `$DRV_PATH` set.
    ///
    /// A token that could not be checked for a passing reason (the store could not be
    /// looked at) makes the whole reply an `ERR`, so the hook spools the hand-off and the
    /// drain tries again later; paths of it queued already are queued twice, harmlessly.
    fn enqueue(&self, drv: Option<&str>, tokens: &[String]) -> EnqueueReply {
        match self.enqueue_classified(drv, tokens) {
            Ok((_, rejected)) if rejected.iter().any(|(_, r)| r.is_transient()) => {
                let (token, why) = rejected
                    .iter()
                    .find(|(_, r)| r.is_transient())
                    .expect("checked above");
                EnqueueReply::Err(format!(
                    "cannot check {token} now: {}",
                    protocol::one_line(why.why())
                ))
            }
            Ok((queued, rejected)) => EnqueueReply::Ok {
                queued,
                rejected: rejected
                    .into_iter()
                    .map(|(t, r)| (t, r.why().to_owned()))
                    .collect(),
            },
            Err(why) => EnqueueReply::Err(why),
        }
    }

    /// [`Shared::enqueue`], saying why each refused token was refused. A derivation whose
    /// outputs cannot be looked up is refused as the derivation's token.
    ///
    /// # Errors
    /// Why nothing could be queued (the queue cannot commit).
    fn enqueue_classified(
        &self,
        drv: Option<&str>,
        tokens: &[String],
    ) -> Result<(usize, Vec<(String, Rejection)>), String> {
        let mut paths = Vec::with_capacity(tokens.len());
        let mut rejected = Vec::new();
        let outputs;
        let tokens = match (tokens.is_empty(), drv) {
            (true, Some(d)) => match self.outputs_of(d) {
                Ok(o) => {
                    outputs = o;
                    &outputs[..]
                }
                Err(why) => return Ok((0, vec![(protocol::truncate(d, 512).to_owned(), why)])),
            },
            _ => tokens,
        };
        for t in tokens {
            match self.check(t) {
                Ok(full) => paths.push(full),
                Err(why) => rejected.push((protocol::truncate(t, 512).to_owned(), why)),
            }
        }
        let drv = drv.filter(|d| StorePath::from_absolute_path(d, self.store_dir()).is_ok());
        if paths.is_empty() {
            return Ok((0, rejected));
        }
        let result = self.lock_queue().enqueue(&paths, drv, queue::now_ms());
        match result {
            Ok(queued) => {
                let _ = self.bell.try_send(());
                tracing::debug!("queued {queued} paths (drv {drv:?})");
                Ok((queued, rejected))
            }
            Err(e) => {
                tracing::error!("cannot queue {} paths: {e:#}", paths.len());
                Err(format!("{e}"))
            }
        }
    }

    /// The output paths of the derivation `drv`, or why there are none.
    fn outputs_of(&self, drv: &str) -> Result<Vec<String>, Rejection> {
        let d = StorePath::from_absolute_path(drv, self.store_dir())
            .map_err(|e| Rejection::Invalid(e.to_string()))?;
        // Only a derivation the store says is not valid is gone; any other error (the
        // database busy, unreadable or odd) may pass, and the hand-off is kept.
        let outs = self.store.derivation_outputs(&d).map_err(|e| {
            let why = format!("cannot find the outputs of the derivation: {e}");
            match e {
                crate::store::StoreError::NotValid(_) => Rejection::NoSuchPath(why),
                _ => Rejection::Transient(why),
            }
        })?;
        if outs.is_empty() {
            return Err(Rejection::NoSuchPath(
                "the derivation has no outputs in the store".into(),
            ));
        }
        Ok(outs
            .iter()
            .map(|p| p.to_absolute(self.store_dir()))
            .collect())
    }

    /// The full store path a token names, or why it is refused.
    fn check(&self, token: &str) -> Result<String, Rejection> {
        let p = StorePath::from_absolute_path(token, self.store_dir())
            .map_err(|e| Rejection::Invalid(e.to_string()))?;
        let full = p.to_absolute(self.store_dir());
        match std::fs::symlink_metadata(&full) {
            Ok(_) => Ok(full),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Rejection::NoSuchPath(format!("{full}: no such store path")))
            }
            // The path may well exist: the store could not be looked at.
            Err(e) => Err(Rejection::Transient(format!("{full}: {e}"))),
        }
    }

    /// The status report: queue counts, the batch in flight, failures, throughput.
    fn status(&self) -> serde_json::Value {
        let q = self.lock_queue();
        let mut v = status_from_queue(&q);
        drop(q);
        let (paths_per_s, bytes_per_s) = self.stats.recent(RECENT_WINDOW);
        let last = self
            .stats
            .last_batch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        v["daemon"] = serde_json::json!(true);
        v["in_flight"] = serde_json::json!(self.in_flight.load(Ordering::SeqCst));
        v["uptime_seconds"] = serde_json::json!(self.started.elapsed().as_secs());
        v["last_recorded_unix_ms"] =
            serde_json::json!(self.stats.last_recorded_ms.load(Ordering::SeqCst));
        v["since_start"] = serde_json::json!({
            "uploaded": self.stats.uploaded.load(Ordering::Relaxed),
            "nar_bytes": self.stats.nar_bytes.load(Ordering::Relaxed),
        });
        v["recent"] = serde_json::json!({
            "window_seconds": RECENT_WINDOW,
            "uploaded_per_second": paths_per_s,
            "nar_mb_per_second": bytes_per_s / 1e6,
        });
        v["last_batch"] = last.map_or(serde_json::Value::Null, |b| {
            serde_json::json!({
                "seconds_ago": b.at.elapsed().as_secs(),
                "paths": b.paths,
                "uploaded": b.uploaded,
                "already_present": b.present,
                "failed": b.failed,
                "dropped": b.dropped,
                "nar_bytes": b.nar_bytes,
                "seconds": b.seconds,
            })
        });
        v
    }
}

/// How many failing and dropped paths a status report lists (the counts are complete).
const STATUS_LIST: usize = 20;
/// The throughput window of `narflow status`, in seconds.
const RECENT_WINDOW: u64 = 60;

/// The part of the status that the queue alone knows; `narflow status` uses it directly
/// when no daemon is running.
pub fn status_from_queue(q: &Queue) -> serde_json::Value {
    let counts = q.counts();
    let failing = q.failing(STATUS_LIST);
    let dropped = q.dropped(STATUS_LIST);
    match (counts, failing, dropped) {
        (Ok(c), Ok(f), Ok(d)) => serde_json::json!({
            "pending": c.pending,
            "failing": c.failing,
            "needs_attention": c.needs_attention,
            "done": c.done,
            "dropped": c.dropped,
            "failures": f,
            "dropped_paths": d.into_iter().map(|(path, why)| serde_json::json!({"path": path, "why": why})).collect::<Vec<_>>(),
        }),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            serde_json::json!({ "error": e.to_string() })
        }
    }
}

/// A finished batch, for `narflow status`.
#[derive(Debug, Clone)]
struct BatchSummary {
    at: Instant,
    paths: usize,
    uploaded: usize,
    present: usize,
    failed: usize,
    dropped: usize,
    nar_bytes: u64,
    seconds: f64,
}

/// Upload counters, and per-second buckets for recent throughput.
#[derive(Debug, Default)]
struct Stats {
    uploaded: AtomicU64,
    nar_bytes: AtomicU64,
    /// (second since start, paths, NAR bytes). Bounded: at most [`RECENT_WINDOW`] entries.
    buckets: Mutex<VecDeque<(u64, u64, u64)>>,
    last_batch: Mutex<Option<BatchSummary>>,
    /// When the worker last committed a batch's results to the queue (Unix ms; 0: never).
    last_recorded_ms: std::sync::atomic::AtomicI64,
    origin: std::sync::OnceLock<Instant>,
}

impl Stats {
    fn add(&self, paths: u64, bytes: u64) {
        self.uploaded.fetch_add(paths, Ordering::Relaxed);
        self.nar_bytes.fetch_add(bytes, Ordering::Relaxed);
        let now = self.origin.get_or_init(Instant::now).elapsed().as_secs();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match b.back_mut() {
            Some(last) if last.0 == now => {
                last.1 += paths;
                last.2 += bytes;
            }
            _ => b.push_back((now, paths, bytes)),
        }
        while b.front().is_some_and(|f| f.0 + RECENT_WINDOW <= now) {
            b.pop_front();
        }
    }

    /// Paths and NAR bytes per second over the last `window` seconds.
    fn recent(&self, window: u64) -> (f64, f64) {
        let Some(origin) = self.origin.get() else {
            return (0.0, 0.0);
        };
        let now = origin.elapsed().as_secs();
        let b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (p, n) = b
            .iter()
            .filter(|x| x.0 + window > now)
            .fold((0, 0), |(p, n), x| (p + x.1, n + x.2));
        let span = (now + 1).min(window) as f64;
        (p as f64 / span, n as f64 / span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon's shared state for `store_dir` and the state directory `state`, without
    /// a running daemon.
    fn shared(store_dir: &Path, state: &Path) -> Shared {
        let (bell, _) = crossbeam_channel::bounded(1);
        Shared {
            queue: Mutex::new(Queue::open(state).unwrap()),
            store: LocalStore::open(store_dir.to_str().unwrap(), &state.join("no-db")),
            state_dir: state.to_owned(),
            bell,
            stopping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            stats: Stats::default(),
            started: Instant::now(),
        }
    }

    #[test]
    fn the_spool_drain_keeps_what_it_could_not_queue_and_records_what_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let store = dir.path().join("store");
        // A store that cannot be looked at (a symlink loop: ELOOP), as a passing failure
        // would.
        std::os::unix::fs::symlink(&store, &store).unwrap();
        let sd = store.display();
        let here = format!("{sd}/00000000000000000000000000000000-here");
        let gone = format!("{sd}/11111111111111111111111111111111-gone");
        let line = format!("ENQUEUE - {here}\n");
        spool::append(&state, &line, spool::LOCK_WAIT).unwrap();
        let s = shared(&store, &state);
        worker::drain_spool(&s);
        assert_eq!(s.lock_queue().state_of(&here).unwrap(), None);
        // The store can be looked at again: the kept hand-off is queued now.
        std::fs::remove_file(&store).unwrap();
        std::fs::create_dir(&store).unwrap();
        std::fs::write(&here, "x").unwrap();
        let line = format!("ENQUEUE - {gone}\n");
        spool::append(&state, &line, spool::LOCK_WAIT).unwrap();
        worker::drain_spool(&s);
        let q = s.lock_queue();
        assert_eq!(q.state_of(&here).unwrap(), Some("pending"));
        // A spooled path that does not exist is recorded, as dropped, with why.
        assert_eq!(q.state_of(&gone).unwrap(), Some("dropped"));
        assert!(q.dropped(5).unwrap()[0].1.contains("no such store path"));
        assert!(spool::take(&state).unwrap().is_none());
    }

    #[test]
    fn a_hand_off_that_cannot_be_checked_now_is_refused_so_the_hook_spools_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let store = dir.path().join("store");
        // A store that cannot be looked at (ELOOP), as a passing failure would.
        std::os::unix::fs::symlink(&store, &store).unwrap();
        let here = format!("{}/00000000000000000000000000000000-here", store.display());
        let s = shared(&store, &state);
        // Not "OK 0 with a REJECT line", which the hook takes as handled: an ERR, so the
        // hook spools the hand-off and the drain tries it again.
        match s.enqueue(None, std::slice::from_ref(&here)) {
            protocol::EnqueueReply::Err(why) => assert!(why.contains(&here), "{why}"),
            other => panic!("{other:?}"),
        }
        // A token that is no store path at all is still refused by name, not spooled.
        match s.enqueue(None, &["/etc/passwd".to_owned()]) {
            protocol::EnqueueReply::Ok {
                queued: 0,
                rejected,
            } => {
                assert_eq!(rejected[0].0, "/etc/passwd")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unsafe_directories_are_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_private_dir("state directory", &open).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("writable by group or others (mode 775)"),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1);
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_private_dir("state directory", &open).is_ok());
    }

    #[test]
    fn recent_throughput_counts_only_the_window() {
        let s = Stats::default();
        assert_eq!(s.recent(60), (0.0, 0.0));
        s.add(3, 3_000_000);
        s.add(1, 1_000_000);
        let (p, b) = s.recent(60);
        // Within the first second the span is one second.
        assert_eq!((p, b), (4.0, 4_000_000.0));
        assert_eq!(s.uploaded.load(Ordering::Relaxed), 4);
        assert_eq!(s.buckets.lock().unwrap().len(), 1);
    }
}
