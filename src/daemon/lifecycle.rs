//! The daemon's life: [`Daemon::bind`] takes the state directory, the queue and the socket
//! before any thread starts; [`Daemon::run`] starts the threads, serves until the shutdown
//! future resolves, and stops in order (socket first, then the helpers (the spool drain,
//! the sweep, the store watcher), then the batch in flight, cancelled after half the
//! shutdown timeout). With `--watch-store`, a Nix database that cannot be followed stops
//! the start before anything runs.
use super::queue::Queue;
use super::socket::{bind_socket, check_private_dir, remove_socket_if_ours};
use super::status::Stats;
use super::{
    DaemonConfig, DaemonError, ORPHAN_GRACE, Shared, intake, metrics, server, watch, worker,
};
use crate::cache::BinaryCache;
use crate::cache::resume::{SqliteJournal, UploadJournal};
use crate::store::LocalStore;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A daemon with its state directory locked, its queue open and its socket bound, ready
/// to [`Daemon::run`].
#[derive(Debug)]
pub struct Daemon {
    cfg: DaemonConfig,
    listener: std::os::unix::net::UnixListener,
    /// (device, inode) of the socket we bound: shutdown removes the path only if it is
    /// still ours.
    socket_id: (u64, u64),
    /// Bound to `cfg.metrics_listen`, when given.
    metrics: Option<std::net::TcpListener>,
    queue: Queue,
    /// The journal of unfinished uploads, in the queue database (`resume_max_age` set).
    journal: Option<Arc<dyn UploadJournal>>,
    _lock: File,
}

impl Daemon {
    /// Locks the state directory, opens the queue, binds the metrics address (if any) and
    /// the socket. Call it before anything starts threads: the socket is created under a
    /// umask that keeps it private.
    ///
    /// # Errors
    /// [`DaemonError`] naming the directory, queue, address or socket that is unusable.
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
        let journal = match cfg.resume_max_age {
            Some(_) => {
                let path = dir.join(super::queue::FILE);
                let j = SqliteJournal::open(&path)
                    .map_err(|source| DaemonError::Journal { path, source })?;
                Some(Arc::new(j) as Arc<dyn UploadJournal>)
            }
            None => None,
        };
        // Before the socket: a taken address then leaves no socket behind.
        let metrics = cfg.metrics_listen.map(metrics::bind).transpose()?;
        let (listener, socket_id) = bind_socket(&cfg.socket, cfg.socket_group)?;
        Ok(Daemon {
            cfg,
            listener,
            socket_id,
            metrics,
            queue,
            journal,
            _lock: lock,
        })
    }

    /// The journal the cache is to record its unfinished uploads in
    /// ([`crate::cache::OpenOptions::journal`]), when uploads resume.
    pub fn journal(&self) -> Option<Arc<dyn UploadJournal>> {
        self.journal.clone()
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
    /// [`DaemonError::WatchStore`] (before anything runs, the socket removed) when
    /// `--watch-store` is set and the Nix database cannot be followed;
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
            metrics,
            mut queue,
            journal,
            _lock,
        } = self;
        let watch_from = match cfg.watch_store {
            Some(mode) => match watch::start_cursor(&mut queue, &store) {
                Ok(cursor) => Some((mode, cursor)),
                Err(e) => {
                    remove_socket_if_ours(&cfg.socket, socket_id);
                    return Err(e);
                }
            },
            None => None,
        };
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
            metrics: metrics::Metrics::default(),
            started: Instant::now(),
            watch: cfg.watch_store,
            cache: Arc::downgrade(&cache),
            records: journal.zip(cfg.resume_max_age),
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
            let _ = tokio::task::spawn_blocking(move || intake::drain_spool(&shared)).await;
        }
        let metrics_err = |source| {
            DaemonError::Metrics(metrics::MetricsBindError {
                addr: cfg.metrics_listen.expect("bound, so given"),
                source,
            })
        };
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
                .spawn(move || intake::drain_spool_every_second(&shared, &stop))
                .map_err(spawn_err)?;
        }
        if let Some((mode, cursor)) = watch_from {
            tracing::info!(
                "narflow daemon: watching the store ({}) past ValidPaths id {cursor}",
                mode.as_str()
            );
            let (shared, stop) = (shared.clone(), helpers_stop.clone());
            std::thread::Builder::new()
                .name("narflow-watch".into())
                .spawn(move || watch::run(&shared, mode, cursor, &stop))
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
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics_server = match metrics {
            Some(l) => {
                let addr = l.local_addr().map_err(metrics_err)?;
                let l = tokio::net::TcpListener::from_std(l).map_err(metrics_err)?;
                // The address as bound: with port 0 the kernel picked the port.
                tracing::info!("narflow daemon: serving metrics on http://{addr}/metrics");
                Some(tokio::spawn(metrics::serve(
                    l,
                    shared.clone(),
                    stop_rx.clone(),
                )))
            }
            None => None,
        };
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

        let policy = server::PeerPolicy::new(cfg.socket_group);
        let server = tokio::spawn(server::serve(listener, shared.clone(), policy, stop_rx));
        let worker_died = tokio::select! {
            () = shutdown => false,
            _ = &mut dead_rx => true,
        };
        let _ = stop_tx.send(true);
        let _ = server.await;
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
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
