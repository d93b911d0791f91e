//! Compressing while the push looks at the cache. A push's look at a remote cache (its gc
//! marker, then the listing of its narinfos) takes round trips in series before the plan
//! knows what to upload; meanwhile the cores would be idle. So a push sends the small
//! paths of its closure into the pipeline *ahead* of the look: they are walked, hashed and
//! compressed at once, but nothing of them reaches the cache or the publisher before the
//! look has decided. Then each one the plan uploads is registered with the publisher as it
//! is, and each one it does not (found in the cache, refused) is aborted and dropped.
//!
//! Only NARs whose upload sends nothing before its commit go ahead
//! ([`crate::cache::BinaryCache::compresses_during_look`]): a path the look finds in the
//! cache then costs the cache nothing at all, only some compressing.
use super::publish::{Book, NewJob};
use super::stage::{Gate, Job, Stop};
use crate::format::store_path::StorePath;
use crate::store::PathInfo;
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What was sent ahead, and whether the look has decided.
#[derive(Debug, Default)]
struct Sent {
    decided: bool,
    jobs: Vec<Arc<Job>>,
}

/// The jobs of one push sent ahead of its look at the cache, from [`super::Feeder::ahead`],
/// each with one [`Gate`] that opens once the look has decided on all of them.
/// [`Ahead::send`] sends them (on a thread of its own: it blocks while the pipeline is
/// full); [`Ahead::decide`], once the plan is known, lets the planned ones go on. Dropped
/// undecided, it aborts every job it sent.
#[derive(Debug)]
pub struct Ahead<'p> {
    gate: Arc<Gate>,
    sent: Mutex<Sent>,
    book: &'p Mutex<Book>,
    jobs: Sender<Arc<Job>>,
    stop: Stop,
}

impl<'p> Ahead<'p> {
    pub(super) fn new(book: &'p Mutex<Book>, jobs: Sender<Arc<Job>>, stop: Stop) -> Self {
        Ahead {
            gate: Arc::default(),
            sent: Mutex::default(),
            book,
            jobs,
            stop,
        }
    }

    /// Sends a job for each of `infos` in turn until the look has decided (or the run
    /// stopped); blocks while the pipeline is full. Returns how many went.
    pub fn send<'i>(&self, infos: impl IntoIterator<Item = &'i PathInfo>) -> usize {
        let mut n = 0;
        for info in infos {
            let job = {
                let mut sent = lock(&self.sent);
                if sent.decided {
                    break;
                }
                let id = lock(self.book).take_id();
                let job = Job::ahead(id, info.clone(), self.gate.clone());
                sent.jobs.push(job.clone());
                job
            };
            // A job listed and not yet received is decided like the others: its verdict
            // is on it when a walker takes it.
            if self.stop.is_stopped() || self.jobs.send(job).is_err() {
                break;
            }
            n += 1;
        }
        n
    }

    /// The look has planned `jobs` (references first): each one sent ahead is registered
    /// with the publisher as it is, the others sent ahead are aborted (no stage works on
    /// them any more, and nothing of them reaches the cache), and the gate opens. Returns
    /// the jobs of `jobs` still to send, registered: pass them to
    /// [`super::Feeder::send`].
    pub fn decide(&self, jobs: Vec<NewJob>) -> Vec<Arc<Job>> {
        let mut sent = lock(&self.sent);
        sent.decided = true;
        let mut ahead: HashMap<StorePath, Arc<Job>> = std::mem::take(&mut sent.jobs)
            .into_iter()
            .map(|j| (j.info.path.clone(), j))
            .collect();
        let rest = lock(self.book).register_after(jobs, &mut ahead);
        for job in ahead.values() {
            self.stop.abort(job);
        }
        self.gate.open();
        rest
    }

    /// Decides, if nothing has yet, that no job sent ahead goes on: the gate opens.
    pub fn abandon(&self) {
        if !lock(&self.sent).decided {
            self.decide(Vec::new());
        }
    }

    /// A guard that [abandons](Ahead::abandon) when dropped undecided: held while the look
    /// runs, it opens the gate even when the look panics, so that a sender blocked on the
    /// pipeline (which waits at the gate) ends and its scope can pass the panic on.
    pub fn abandon_on_drop(&self) -> Abandon<'_, 'p> {
        Abandon(self)
    }
}

/// See [`Ahead::abandon_on_drop`].
#[derive(Debug)]
pub struct Abandon<'a, 'p>(&'a Ahead<'p>);

impl Drop for Abandon<'_, '_> {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

impl Drop for Ahead<'_> {
    fn drop(&mut self) {
        self.abandon();
    }
}
