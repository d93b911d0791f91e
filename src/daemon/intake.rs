//! Intake: checks the tokens of a hand-off (from the socket or the spool) and commits the
//! store paths among them to the queue. A token that cannot be checked for a passing
//! reason is kept (the hook spools it, the spool drain writes it back) rather than lost.
//! The spool drain runs on its own thread every second, so a long batch never holds up
//! the hook's spooled hand-offs.
use super::{Shared, queue};
use crate::format::store_path::StorePath;
use crate::handoff::protocol::{self, EnqueueReply, Request};
use crate::handoff::spool;
use std::time::Duration;

/// How often the spool is checked while the daemon runs (a hook spools when the daemon is
/// busy or restarting, so it must not wait for the next start).
const SPOOL_CHECK: Duration = Duration::from_secs(1);

/// Why a token was not queued; the spool drain keeps a transiently refused hand-off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Rejection {
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

impl Shared {
    /// Validates `tokens` and queues the store paths among them, durably. With no tokens,
    /// queues the outputs of `drv`: Nix 2.8.0 runs the post-build-hook with `$OUT_PATHS`
    /// empty and only `$DRV_PATH` set.
    ///
    /// A token that could not be checked for a passing reason (the store could not be
    /// looked at) makes the whole reply an `ERR`, so the hook spools the hand-off and the
    /// drain tries again later; paths of it queued already are queued twice, harmlessly.
    pub(super) fn enqueue(&self, drv: Option<&str>, tokens: &[String]) -> EnqueueReply {
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
    pub(super) fn enqueue_classified(
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

    /// Queues what the store watcher found (valid paths, full) and moves its cursor to
    /// `cursor`, in one durable transaction; rings the worker when something is new. A
    /// path queued already (a hand-off) keeps its row: see [`queue::Queue::enqueue_watched`].
    ///
    /// # Errors
    /// The queue cannot commit; then nothing was queued and the cursor did not move.
    pub(super) fn enqueue_watched(
        &self,
        paths: &[String],
        cursor: i64,
    ) -> Result<usize, queue::QueueError> {
        let queued = self
            .lock_queue()
            .enqueue_watched(paths, cursor, queue::now_ms())?;
        if queued > 0 {
            let _ = self.bell.try_send(());
            self.metrics.watched(queued as u64);
            tracing::debug!("watch-store: queued {queued} new paths (cursor {cursor})");
        }
        Ok(queued)
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
}

/// Drains the spool every [`SPOOL_CHECK`] until `stop` is dropped.
pub(super) fn drain_spool_every_second(shared: &Shared, stop: &crossbeam_channel::Receiver<()>) {
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stop.recv_timeout(SPOOL_CHECK) {
        drain_spool(shared);
    }
}

/// Queues what the hook spooled. The spool file is removed only after everything in it is
/// committed to the queue: queued, recorded as dropped (the path does not exist, or the
/// token is not a store path), or written back to the spool (a transient error, e.g. the
/// store could not be looked at), for the next check.
pub(super) fn drain_spool(shared: &Shared) {
    loop {
        let taken = match spool::take(&shared.state_dir) {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(e) => {
                tracing::error!("spool in {}: {e}", shared.state_dir.display());
                return;
            }
        };
        if taken.skipped_bytes > 0 {
            tracing::warn!(
                "spool: skipped {} bytes of torn or damaged records",
                taken.skipped_bytes
            );
        }
        let (mut queued, mut dropped, mut kept) = (0, Vec::new(), Vec::new());
        for line in &taken.lines {
            let (drv, paths) = match Request::parse(line) {
                Ok(Request::Enqueue { drv, paths }) => (drv, paths),
                Ok(other) => {
                    tracing::warn!("spool: ignored {other:?}");
                    continue;
                }
                Err(why) => {
                    tracing::warn!(
                        "spool: ignored a bad line ({why}): {:?}",
                        protocol::truncate(line, 200)
                    );
                    continue;
                }
            };
            match shared.enqueue_classified(drv.as_deref(), &paths) {
                Ok((n, rejected)) => {
                    queued += n;
                    let mut again = Vec::new();
                    for (token, r) in rejected {
                        let why = protocol::rejection(&token, r.why());
                        match r {
                            Rejection::Transient(_) => {
                                tracing::warn!("spool: kept for the next check: {why}");
                                again.push(token);
                            }
                            Rejection::NoSuchPath(_) | Rejection::Invalid(_) => {
                                tracing::warn!("spool: not queued, recorded as dropped: {why}");
                                dropped.push((token, why));
                            }
                        }
                    }
                    if !again.is_empty() {
                        // A derivation whose outputs could not be looked up comes back as
                        // the derivation alone.
                        let is_drv = drv.as_deref() == Some(again[0].as_str()) && paths.is_empty();
                        kept.push(Request::Enqueue {
                            drv: drv.clone(),
                            paths: if is_drv { Vec::new() } else { again },
                        });
                    }
                }
                Err(why) => {
                    // The queue cannot commit: keep the whole spool for the next check.
                    tracing::error!("spool: cannot queue: {why}");
                    return;
                }
            }
        }
        if !dropped.is_empty()
            && let Err(e) = shared
                .lock_queue()
                .record_dropped(&dropped, queue::now_ms())
        {
            tracing::error!("spool: cannot record dropped paths: {e}");
            return;
        }
        for r in &kept {
            if let Err(e) = spool::append(&shared.state_dir, &r.to_line(), spool::LOCK_WAIT) {
                tracing::error!("spool: cannot keep a hand-off for the next check: {e}");
                return;
            }
        }
        tracing::info!("spool: queued {queued} paths the hook spooled");
        if let Err(e) = taken.done() {
            tracing::warn!("spool: cannot remove the drained spool (it will be read again): {e}");
            return;
        }
        if !kept.is_empty() {
            // What was kept is for the next check, not this loop.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::queue::Queue;
    use crate::daemon::status::Stats;
    use crate::store::LocalStore;
    use std::path::Path;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::Instant;

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
            metrics: Default::default(),
            started: Instant::now(),
            watch: None,
            cache: std::sync::Weak::<crate::cache::null::NullCache>::new(),
            records: None,
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
        drain_spool(&s);
        assert_eq!(s.lock_queue().state_of(&here).unwrap(), None);
        // The store can be looked at again: the kept hand-off is queued now.
        std::fs::remove_file(&store).unwrap();
        std::fs::create_dir(&store).unwrap();
        std::fs::write(&here, "x").unwrap();
        let line = format!("ENQUEUE - {gone}\n");
        spool::append(&state, &line, spool::LOCK_WAIT).unwrap();
        drain_spool(&s);
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
}
