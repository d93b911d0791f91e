//! The walk stage: walker threads taking jobs from the pipeline's input and turning each
//! store path into a stream of fixed-size NAR chunks; and the hash stage after it, which
//! computes NarHash over each job's chunks in order. Each chunk holds a
//! permit of the memory budget from the moment it starts filling until the sink has
//! written it. Neither stage reads another byte once the run stops.
//!
//! Chunk boundaries are at multiples of the chunk size whatever the file layout, so the
//! compressed output is deterministic for given settings.
use super::budget::{ByteBudget, Permit};
use super::buffers::BufferPool;
use super::lanes::{LaneReceiver, LaneSender};
use super::stage::{Chunk, Job, NarEnd, Running, Stop};
use super::stats::StageClock;
use crate::format::hash::Sha256;
use crate::format::nar::listing::{ListingBuilder, NarListing};
use crate::format::nar::writer::NarBuffer;
use crate::nar_fs::dump_path_listed_into;
use crate::store::PathInfo;
use crossbeam_channel::{Receiver, Sender};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::thread::Scope;

/// The [`NarBuffer`] the NAR writer fills in place: chunk buffers, sent on when full.
struct Chunker<'a> {
    job: Arc<Job>,
    seq: u32,
    chunk_size: usize,
    /// NAR bytes the store says this path has; sizes the permits.
    expected: u64,
    written: u64,
    /// The chunk being filled: its length is the chunk's room, of which `filled` bytes
    /// are NAR.
    buf: Vec<u8>,
    filled: usize,
    permit: Option<Permit>,
    budget: &'a ByteBudget,
    pool: &'a BufferPool,
    out: &'a LaneSender,
    clock: &'a mut StageClock,
    stop: &'a Stop,
}

impl Chunker<'_> {
    /// Takes a permit for the next chunk: the memory its buffer holds (see
    /// [`BufferPool::charge`]) for the chunk size, or for what is left of the expected NAR
    /// when that is less (so small paths do not tie up a whole chunk of budget).
    fn start_chunk(&mut self) {
        let left = self.expected.saturating_sub(self.written);
        let want = if left == 0 {
            self.chunk_size as u64
        } else {
            left.min(self.chunk_size as u64)
        };
        let (budget, charge) = (self.budget, self.pool.charge(want as usize));
        self.permit = Some(self.clock.wait(|| budget.acquire(charge)));
        self.buf = self.pool.take_filled(want as usize);
        self.filled = 0;
    }

    fn send(&mut self, end: Option<NarEnd>) -> io::Result<()> {
        let mut data = std::mem::take(&mut self.buf);
        data.truncate(self.filled);
        self.filled = 0;
        let permit = match self.permit.take() {
            Some(p) => p,
            None => self.budget.acquire(0),
        };
        let chunk = Chunk {
            job: self.job.clone(),
            seq: self.seq,
            nar_len: data.len() as u64,
            data,
            permit,
            end,
        };
        self.seq += 1;
        let out = self.out;
        self.clock
            .wait(|| out.send(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "pipeline stopped"))
    }

    fn finish(mut self, listing: Option<Box<NarListing>>) -> io::Result<()> {
        let end = NarEnd::Walked {
            nar_size: self.written,
            listing,
        };
        if self.permit.is_none() {
            self.start_chunk();
        }
        self.send(Some(end))
    }

    fn fail(mut self, why: String) -> io::Result<()> {
        self.filled = 0;
        self.send(Some(NarEnd::Failed(why)))
    }
}

impl NarBuffer for Chunker<'_> {
    fn spare(&mut self) -> io::Result<&mut [u8]> {
        // A stopped run, or a job the sink has failed, stops mid-NAR.
        if self.stop.is_job_stopped(&self.job) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                super::outcome::CANCELLED,
            ));
        }
        if self.permit.is_none() {
            self.start_chunk();
        } else if self.filled == self.buf.len() {
            // A full chunk is sent only once more data arrives, so the last chunk of every
            // job is a real one carrying the end marker.
            self.send(None)?;
            self.start_chunk();
        }
        Ok(&mut self.buf[self.filled..])
    }
    fn commit(&mut self, n: usize) {
        debug_assert!(self.filled + n <= self.buf.len());
        self.filled += n;
        self.written += n as u64;
    }
}

/// Everything a walker needs; shared by all walker threads.
#[derive(Debug)]
pub struct WalkStage<'a> {
    pub store_dir: &'a str,
    pub chunk_size: usize,
    pub budget: ByteBudget,
    pub pool: BufferPool,
    pub stop: Stop,
    /// Build each NAR's listing while writing it.
    pub nar_listing: bool,
    /// Walker threads.
    pub walkers: usize,
}

impl<'env> WalkStage<'env> {
    /// Starts the walkers, which take jobs from `jobs` (in submission order: references
    /// first) and send their chunks into `out`. The stage ends once `jobs` is closed and
    /// drained, or the run stopped.
    pub fn spawn<'scope>(
        &'scope self,
        s: &'scope Scope<'scope, 'env>,
        jobs_rx: Receiver<Arc<Job>>,
        out: LaneSender,
    ) -> Running<'scope> {
        let mut threads = Vec::new();
        for _ in 0..self.walkers.max(1) {
            let (jobs, out) = (jobs_rx.clone(), out.clone());
            threads.push(s.spawn(move || self.run(jobs, out).into_stats("walk")));
        }
        Running::new("walk", threads)
    }

    /// Runs one walker until `jobs` closes or the run stops. Returns its clock.
    fn run(&self, jobs: Receiver<Arc<Job>>, out: LaneSender) -> StageClock {
        let mut clock = StageClock::start();
        while let Some(job) = clock.wait(|| jobs.recv().ok()) {
            if self.stop.is_stopped() {
                break;
            }
            // Sent ahead of the look, which found it unneeded.
            if self.stop.is_job_stopped(&job) {
                continue;
            }
            let info: &PathInfo = &job.info;
            let full = info.path.to_absolute(self.store_dir);
            let mut chunker = Chunker {
                job: job.clone(),
                seq: 0,
                chunk_size: self.chunk_size,
                expected: info.nar_size,
                written: 0,
                buf: Vec::new(),
                filled: 0,
                permit: None,
                budget: &self.budget,
                pool: &self.pool,
                out: &out,
                clock: &mut clock,
                stop: &self.stop,
            };
            let mut listing = self.nar_listing.then(ListingBuilder::new);
            let sent = match dump_path_listed_into(Path::new(&full), &mut chunker, listing.as_mut())
            {
                Ok(_) => chunker.finish(listing.map(|l| Box::new(l.finish()))),
                // Stopped mid-NAR: nothing more of this job is worth sending (its failure
                // is reported by the sink, or the run is over).
                Err(_) if self.stop.is_stopped() => break,
                // The job's end still goes down the line, so the stages after drop what
                // they keep of it.
                Err(_) if self.stop.is_job_stopped(&job) => {
                    chunker.fail(super::outcome::CANCELLED.into())
                }
                Err(e) => chunker.fail(e.to_string()),
            };
            if sent.is_err() {
                break; // the downstream stages are gone: the run is being torn down
            }
            clock.add_bytes(info.nar_size, info.nar_size);
        }
        clock.stop()
    }
}

/// The hash stage: NarHash over each job's chunks, which arrive in order (each job is
/// walked by one walker, and a channel keeps each sender's order). It runs on its own
/// thread so that hashing overlaps with reading files instead of adding to it.
pub fn spawn_hash<'scope>(
    s: &'scope Scope<'scope, '_>,
    stop: &'scope Stop,
    chunks: LaneReceiver,
    out: Sender<Chunk>,
) -> Running<'scope> {
    let t = s.spawn(move || hash(stop, chunks, out).into_stats("hash"));
    Running::new("hash", vec![t])
}

fn hash(stop: &Stop, chunks: LaneReceiver, out: Sender<Chunk>) -> StageClock {
    use sha2::Digest;
    let mut clock = StageClock::start();
    // Only the jobs being walked: an entry goes with its job's last chunk.
    let mut hashers: std::collections::HashMap<super::stage::JobId, sha2::Sha256> =
        std::collections::HashMap::new();
    while let Some(mut chunk) = clock.wait(|| chunks.recv()) {
        if stop.is_job_stopped(&chunk.job) {
            // Dropping the chunk frees its permit, so a walker waiting on the budget
            // wakes up and sees the stop too; the stage drains its input and ends.
            hashers.remove(&chunk.job.id);
            continue;
        }
        let hasher = hashers.entry(chunk.job.id).or_default();
        hasher.update(&chunk.data);
        clock.add_bytes(chunk.nar_len, chunk.nar_len);
        match chunk.end {
            Some(NarEnd::Walked { nar_size, listing }) => {
                let h = hashers.remove(&chunk.job.id).expect("inserted above");
                let nar_hash = Sha256(h.finalize().into());
                chunk.end = Some(NarEnd::Complete {
                    nar_hash,
                    nar_size,
                    listing,
                });
            }
            Some(_) => {
                hashers.remove(&chunk.job.id);
            }
            None => {}
        }
        if clock.wait(|| out.send(chunk)).is_err() {
            break;
        }
    }
    clock.stop()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::store_path::StorePath;

    /// With full-size buffers free in the pool (a large path just went through), a path of
    /// a few hundred KiB and a large path's short last chunk are sent in recycled buffers
    /// whose every page is resident: each permit covers its whole buffer, so the budget
    /// counts what the queues really hold.
    #[test]
    fn every_chunk_permit_covers_its_whole_buffer() {
        const CHUNK: usize = 1 << 20;
        let store = tempfile::tempdir().unwrap();
        let mut jobs = Vec::new();
        for (i, size) in [300usize << 10, (2 * CHUNK) + (300 << 10), 600 << 10]
            .into_iter()
            .enumerate()
        {
            let name = format!("{}{i}-p{i}", "0".repeat(31));
            let path = StorePath::from_base_name(&name).unwrap();
            let full = store.path().join(path.base_name());
            std::fs::create_dir_all(&full).unwrap();
            std::fs::write(full.join("data"), vec![i as u8; size]).unwrap();
            let info = PathInfo::of_tree(path, &full, vec![], None).unwrap();
            jobs.push(Job::new(i as u64, info));
        }
        let pool = BufferPool::new(8, CHUNK);
        for _ in 0..8 {
            let mut b = pool.take_filled(CHUNK);
            b.fill(1);
            pool.give(b);
        }
        let stage = WalkStage {
            store_dir: store.path().to_str().unwrap(),
            chunk_size: CHUNK,
            budget: ByteBudget::new(64 << 20),
            pool: pool.clone(),
            stop: Stop::new(Default::default()),
            nar_listing: false,
            walkers: 1,
        };
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(jobs.len());
        let (out_tx, out_rx) = super::super::lanes::bounded(16);
        for j in jobs {
            jobs_tx.send(j).unwrap();
        }
        drop(jobs_tx);
        let chunks: Vec<Chunk> = std::thread::scope(|s| {
            let running = stage.spawn(s, jobs_rx, out_tx);
            let chunks = std::iter::from_fn(|| out_rx.recv()).collect();
            drop(running);
            chunks
        });
        assert_eq!(chunks.len(), 1 + 3 + 1, "a chunk per MiB or part of one");
        let mut short = 0;
        for c in &chunks {
            assert!(
                c.data.capacity() as u64 <= c.permit.bytes(),
                "chunk {} of job {}: {} bytes of buffer on a permit of {}",
                c.seq,
                c.job.id,
                c.data.capacity(),
                c.permit.bytes()
            );
            short += usize::from(c.data.len() < CHUNK);
        }
        assert_eq!(short, 3, "the short chunks were checked too");
    }
}
