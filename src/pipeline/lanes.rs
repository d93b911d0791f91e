//! A chunk channel with two lanes. A chunk that is a whole job's NAR (its first chunk,
//! carrying the end) goes in the express lane, which the receiver empties first; every
//! other chunk goes in the bulk lane. A small path handed off while a large NAR streams is
//! then never queued behind the large one's chunks: the hash stage and the sink, which
//! take chunks one at a time, take it next.
//!
//! Only a job's chunks among themselves need their order (the hash stage hashes them in
//! sequence), and a whole job is one chunk: which lane it took changes nothing else.
//!
//! The express lane does not starve the bulk one: after [`EXPRESS_RUN`] express chunks in
//! a row, a waiting bulk chunk goes next, so a large NAR still moves (and frees its
//! permits) while a backfill streams small paths through.
use super::stage::Chunk;
use crossbeam_channel::{Receiver, Select, SendError, Sender, TryRecvError};
use std::cell::Cell;

/// Express chunks taken in a row before a waiting bulk chunk goes: a small path then waits
/// behind at most one large chunk in every nine, and a large NAR gets at least a ninth of
/// the stage while small paths keep coming.
pub const EXPRESS_RUN: u32 = 8;

/// The sending side; clones share the lanes, which close once every clone is dropped.
#[derive(Debug, Clone)]
pub struct LaneSender {
    express: Sender<Chunk>,
    bulk: Sender<Chunk>,
}

/// The receiving side (of one thread: it counts the express chunks it took in a row).
#[derive(Debug)]
pub struct LaneReceiver {
    express: Receiver<Chunk>,
    bulk: Receiver<Chunk>,
    run: Cell<u32>,
    /// Told each time `recv` is about to block on empty lanes.
    #[cfg(test)]
    blocking: Option<Sender<()>>,
}

/// Two lanes of `capacity` chunks each. Every chunk holds its budget permit, so the
/// budget bounds the bytes in both; the lengths only decouple the stages.
pub fn bounded(capacity: usize) -> (LaneSender, LaneReceiver) {
    let (express_tx, express_rx) = crossbeam_channel::bounded(capacity);
    let (bulk_tx, bulk_rx) = crossbeam_channel::bounded(capacity);
    (
        LaneSender {
            express: express_tx,
            bulk: bulk_tx,
        },
        LaneReceiver {
            express: express_rx,
            bulk: bulk_rx,
            run: Cell::new(0),
            #[cfg(test)]
            blocking: None,
        },
    )
}

/// Whether `chunk` is the whole of its job's stream.
fn is_whole_job(chunk: &Chunk) -> bool {
    chunk.seq == 0 && chunk.end.is_some()
}

impl LaneSender {
    /// Sends `chunk` in its lane, blocking while that lane is full.
    ///
    /// # Errors
    /// The chunk back, when the receiver is gone.
    pub fn send(&self, chunk: Chunk) -> Result<(), SendError<Chunk>> {
        if is_whole_job(&chunk) {
            self.express.send(chunk)
        } else {
            self.bulk.send(chunk)
        }
    }
}

impl LaneReceiver {
    /// The next chunk, from the express lane whenever it has one; blocks while both lanes
    /// are empty. `None` once both are closed and drained.
    pub fn recv(&self) -> Option<Chunk> {
        loop {
            if self.run.get() >= EXPRESS_RUN
                && let Ok(c) = self.bulk.try_recv()
            {
                self.run.set(0);
                return Some(c);
            }
            let express_open = match self.express.try_recv() {
                Ok(c) => {
                    self.run.set(self.run.get() + 1);
                    return Some(c);
                }
                Err(TryRecvError::Empty) => true,
                Err(TryRecvError::Disconnected) => false,
            };
            let bulk_open = match self.bulk.try_recv() {
                Ok(c) => {
                    self.run.set(0);
                    return Some(c);
                }
                Err(TryRecvError::Empty) => true,
                Err(TryRecvError::Disconnected) => false,
            };
            // Wait on the lanes still open (a closed one would always be ready), then look
            // again, express first.
            let mut ready = Select::new();
            match (express_open, bulk_open) {
                (false, false) => return None,
                (true, true) => {
                    ready.recv(&self.express);
                    ready.recv(&self.bulk);
                }
                (true, false) => {
                    ready.recv(&self.express);
                }
                (false, true) => {
                    ready.recv(&self.bulk);
                }
            }
            #[cfg(test)]
            if let Some(tell) = &self.blocking {
                let _ = tell.try_send(());
            }
            ready.ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::budget::ByteBudget;
    use crate::pipeline::stage::Job;
    use crate::pipeline::stage::NarEnd;
    use std::sync::Arc;

    fn chunk(job: &Arc<Job>, seq: u32, last: bool, budget: &ByteBudget) -> Chunk {
        Chunk {
            job: job.clone(),
            seq,
            data: vec![],
            nar_len: 0,
            permit: budget.acquire(0),
            end: last.then(|| NarEnd::Failed(String::new())),
        }
    }

    /// A whole small job sent after a large job's chunks comes out before them; the large
    /// job's chunks keep their order; both lanes drain before the end.
    #[test]
    fn a_whole_job_overtakes_queued_chunks_of_a_large_one() {
        let budget = ByteBudget::new(1);
        let (tx, rx) = bounded(8);
        let (large, small) = (Job::for_test(1), Job::for_test(2));
        for seq in 0..5 {
            tx.send(chunk(&large, seq, seq == 4, &budget)).unwrap();
        }
        tx.send(chunk(&small, 0, true, &budget)).unwrap();
        drop(tx);
        let order: Vec<(u64, u32)> = std::iter::from_fn(|| rx.recv())
            .map(|c| (c.job.id, c.seq))
            .collect();
        assert_eq!(order, [(2, 0), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]);
    }

    /// While whole jobs keep coming, a large job's chunk still goes after every
    /// [`EXPRESS_RUN`] of them.
    #[test]
    fn a_stream_of_whole_jobs_lets_a_large_ones_chunk_through_every_run() {
        let budget = ByteBudget::new(1);
        let (tx, rx) = bounded(32);
        let large = Job::for_test(0);
        for seq in 0..2 {
            tx.send(chunk(&large, seq, seq == 1, &budget)).unwrap();
        }
        for i in 1..=20 {
            tx.send(chunk(&Job::for_test(i), 0, true, &budget)).unwrap();
        }
        drop(tx);
        let order: Vec<u64> = std::iter::from_fn(|| rx.recv()).map(|c| c.job.id).collect();
        let run = EXPRESS_RUN as usize;
        let large_at: Vec<usize> = (0..order.len()).filter(|&i| order[i] == 0).collect();
        assert_eq!(large_at, [run, 2 * run + 1], "{order:?}");
        assert_eq!(order.len(), 22);
    }

    /// Waits until `thread` (a `/proc` task path) sleeps, having said it is about to block.
    fn blocked(told: &Receiver<()>, thread: &str) {
        told.recv_timeout(std::time::Duration::from_secs(60))
            .expect("the receiver reaches its wait");
        // It said so just before blocking: wait until the kernel has it asleep.
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{thread}/stat")).unwrap();
            let state = stat.rsplit(") ").next().unwrap().as_bytes()[0];
            if state == b'S' {
                return;
            }
            std::thread::yield_now();
        }
    }

    /// A receiver blocked on empty lanes wakes for a chunk in either lane, and for their end.
    #[test]
    fn a_waiting_receiver_takes_a_chunk_from_either_lane() {
        let budget = ByteBudget::new(1);
        let (tx, mut rx) = bounded(1);
        let (tell, told) = crossbeam_channel::bounded(1);
        rx.blocking = Some(tell);
        let (got_tx, got) = crossbeam_channel::bounded(1);
        let (id_tx, id) = crossbeam_channel::bounded(1);
        let waiter = std::thread::spawn(move || {
            let me = std::fs::read_link("/proc/thread-self").unwrap();
            id_tx.send(me.to_string_lossy().into_owned()).unwrap();
            while let Some(c) = rx.recv() {
                got_tx.send((c.seq, c.end.is_some())).unwrap();
            }
        });
        let thread = id.recv().unwrap();
        let next = || {
            got.recv_timeout(std::time::Duration::from_secs(60))
                .expect("the blocked receiver wakes for the chunk")
        };
        let j = Job::for_test(1);
        blocked(&told, &thread);
        tx.send(chunk(&j, 3, false, &budget)).unwrap();
        assert_eq!(next(), (3, false), "a bulk chunk wakes it");
        blocked(&told, &thread);
        tx.send(chunk(&Job::for_test(2), 0, true, &budget)).unwrap();
        assert_eq!(next(), (0, true), "an express chunk wakes it");
        blocked(&told, &thread);
        drop(tx);
        waiter.join().unwrap();
        assert!(got.try_recv().is_err(), "the end, and nothing else");
    }
}
