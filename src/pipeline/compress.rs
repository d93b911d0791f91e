//! The compress stage, and the codecs it runs: a streaming [`Encoder`] and
//! [`compress_chunk`], which makes one chunk a self-contained zstd frame or xz stream.
use crate::format::compression::{Compression, CompressionSettings};
use std::io::{self, Write};

/// A streaming compressor over `W`.
pub enum Encoder<W: Write> {
    Zstd(zstd::stream::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
    None(W),
}

impl<W: Write> std::fmt::Debug for Encoder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Encoder::Zstd(_) => "Encoder::Zstd",
            Encoder::Xz(_) => "Encoder::Xz",
            Encoder::None(_) => "Encoder::None",
        })
    }
}

impl<W: Write> Encoder<W> {
    /// # Errors
    /// When the compressor cannot be set up (allocation failure in the C library).
    pub fn new(settings: CompressionSettings, out: W) -> io::Result<Self> {
        Ok(match settings.kind {
            Compression::Zstd => Encoder::Zstd(zstd::stream::Encoder::new(out, settings.level)?),
            Compression::Xz => {
                Encoder::Xz(liblzma::write::XzEncoder::new(out, settings.level as u32))
            }
            Compression::None => Encoder::None(out),
        })
    }
    /// Ends the stream and returns the output.
    ///
    /// # Errors
    /// Write errors from the output.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
            Encoder::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Xz(e) => e.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Zstd(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn every_kind_round_trips_through_its_decoder() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for kind in [Compression::Zstd, Compression::Xz, Compression::None] {
            let mut e =
                Encoder::new(CompressionSettings::new(kind, None).unwrap(), Vec::new()).unwrap();
            e.write_all(&data).unwrap();
            let out = e.finish().unwrap();
            let back = match kind {
                Compression::Zstd => zstd::decode_all(&out[..]).unwrap(),
                Compression::Xz => {
                    let mut v = vec![];
                    liblzma::read::XzDecoder::new(&out[..])
                        .read_to_end(&mut v)
                        .unwrap();
                    v
                }
                Compression::None => out.clone(),
            };
            assert_eq!(back, data, "{kind:?}");
            if kind != Compression::None {
                assert!(out.len() < data.len() / 10, "{kind:?} did not compress");
            }
        }
    }

    #[test]
    fn levels_are_checked() {
        assert!(CompressionSettings::new(Compression::Zstd, Some(19)).is_ok());
        let e = CompressionSettings::new(Compression::Zstd, Some(20)).unwrap_err();
        assert_eq!(e, "compression level 20 is out of range for zstd (1..=19)");
        assert!(CompressionSettings::new(Compression::Xz, Some(10)).is_err());
        assert_eq!(
            Compression::parse("gzip").unwrap_err(),
            "unsupported compression \"gzip\" (zstd, xz or none)"
        );
    }
}

/// Compresses one chunk as a self-contained frame (zstd) or stream (xz). A sequence of
/// such frames is one valid stream for every decoder, Nix's included; `none` returns
/// the data as it is.
///
/// # Errors
/// Only when the compression library fails (out of memory).
pub fn compress_chunk(settings: CompressionSettings, data: &[u8]) -> io::Result<Vec<u8>> {
    compress_chunk_into(settings, data, Vec::new())
}

/// [`compress_chunk`] into `out` (emptied first), so callers can recycle buffers.
///
/// # Errors
/// As [`compress_chunk`].
pub fn compress_chunk_into(
    settings: CompressionSettings,
    data: &[u8],
    mut out: Vec<u8>,
) -> io::Result<Vec<u8>> {
    out.clear();
    match settings.kind {
        Compression::None => {
            out.extend_from_slice(data);
            Ok(out)
        }
        Compression::Zstd => ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            // Contexts are reused per thread: setting one up costs more than compressing a
            // small path.
            if slot
                .as_ref()
                .is_none_or(|(level, _)| *level != settings.level)
            {
                *slot = Some((settings.level, zstd::bulk::Compressor::new(settings.level)?));
            }
            let (_, c) = slot.as_mut().expect("set above");
            out.reserve(zstd::zstd_safe::compress_bound(data.len()));
            c.compress_to_buffer(data, &mut out)?;
            Ok(out)
        }),
        Compression::Xz => {
            out.reserve(data.len() / 3 + 64);
            let mut e =
                liblzma::write::XzEncoder::new_stream(out, xz_stream(settings.level, data.len())?);
            e.write_all(data)?;
            e.finish()
        }
    }
}

/// An xz encoder at `level` whose dictionary is no larger than the chunk: a bigger one
/// cannot help a self-contained stream and would cost memory per compressing thread.
fn xz_stream(level: i32, len: usize) -> io::Result<liblzma::stream::Stream> {
    use liblzma::stream::{Check, Filters, LzmaOptions, Stream};
    let mut opts = LzmaOptions::new_preset(level as u32).map_err(io::Error::other)?;
    let dict = (len as u64)
        .next_power_of_two()
        .clamp(4096, u64::from(u32::MAX)) as u32;
    opts.dict_size(dict.min(1 << 26));
    let mut filters = Filters::new();
    filters.lzma2(&opts);
    Stream::new_stream_encoder(&filters, Check::Crc64).map_err(io::Error::other)
}

thread_local! {
    static ZSTD: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The compress stage: a dispatcher thread that hands each chunk to the stage's rayon
/// pool and forwards the compressed chunk to the sink. In-flight work is bounded by the
/// memory budget each chunk holds a permit of, and by the pool's size.
///
/// The dispatcher keeps no more tasks running than the pool has threads and picks the
/// next chunk from those waiting by its path's NAR size, smallest first (then in arrival
/// order): a small path that arrives while a large NAR's chunks queue up is compressed as
/// soon as a thread is free, not after them. The sink puts each job's chunks back in
/// order, so the order here changes nothing in the output.
#[derive(Debug)]
pub struct CompressStage {
    pool: rayon::ThreadPool,
    settings: CompressionSettings,
    buffers: super::buffers::BufferPool,
    stop: super::stage::Stop,
}

impl CompressStage {
    /// A stage compressing with `settings` on `jobs` threads.
    ///
    /// # Errors
    /// When the threads cannot be started.
    pub fn new(
        jobs: usize,
        settings: CompressionSettings,
        buffers: super::buffers::BufferPool,
        stop: super::stage::Stop,
    ) -> io::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(jobs.max(1))
            .thread_name(|i| format!("narflow-compress-{i}"))
            .build()
            .map_err(io::Error::other)?;
        Ok(CompressStage {
            pool,
            settings,
            buffers,
            stop,
        })
    }

    /// Starts the dispatcher; the stage ends once `chunks` closes and every chunk taken
    /// has been compressed and sent on (or dropped, once the run stopped).
    pub fn spawn<'scope>(
        &'scope self,
        s: &'scope std::thread::Scope<'scope, '_>,
        chunks: crossbeam_channel::Receiver<super::stage::Chunk>,
        out: super::lanes::LaneSender,
    ) -> super::stage::Running<'scope> {
        let t = s.spawn(move || self.run(chunks, out));
        super::stage::Running::new("compress", vec![t])
    }

    /// Returns the pool's summed busy time and bytes.
    fn run(
        &self,
        chunks: crossbeam_channel::Receiver<super::stage::Chunk>,
        out: super::lanes::LaneSender,
    ) -> super::stats::StageStats {
        use std::sync::Mutex;
        let totals = Mutex::new(super::stats::StageStats {
            name: "compress",
            ..Default::default()
        });
        let settings = self.settings;
        let buffers = &self.buffers;
        let stop = &self.stop;
        let threads = self.pool.current_num_threads().max(1);
        // One token per running task: a task sends its token when done. Never more than
        // `threads` tasks run, so the channel never blocks.
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(threads);
        self.pool.in_place_scope(|scope| {
            // Chunks waiting for a thread, by (NAR size of their path, arrival): each
            // holds its permit, so the budget bounds this.
            let mut waiting: std::collections::BTreeMap<(u64, u64), super::stage::Chunk> =
                std::collections::BTreeMap::new();
            let (mut arrived, mut running, mut open) = (0u64, 0usize, true);
            while open || !waiting.is_empty() {
                if open {
                    crossbeam_channel::select! {
                        recv(chunks) -> c => match c {
                            Ok(c) => {
                                waiting.insert((c.job.info.nar_size, arrived), c);
                                arrived += 1;
                            }
                            Err(_) => open = false,
                        },
                        recv(done_rx) -> _ => running -= 1,
                    }
                } else if done_rx.recv().is_ok() {
                    // Input closed: only the running tasks can free a thread.
                    running -= 1;
                }
                while running < threads
                    && let Some((_, chunk)) = waiting.pop_first()
                {
                    // A stopped run (or job) compresses nothing more: the chunk (and its
                    // permit) is dropped, and the sink, seeing the stop, commits none of it.
                    if stop.is_job_stopped(&chunk.job) {
                        continue;
                    }
                    running += 1;
                    let (out, totals, done) = (out.clone(), &totals, done_tx.clone());
                    scope.spawn(move |_| {
                        compress_one(settings, buffers, stop, chunk, &out, totals);
                        let _ = done.send(());
                    });
                }
                if !open && running == 0 && waiting.is_empty() {
                    break;
                }
            }
        });
        let mut totals = totals.into_inner().unwrap_or_else(|e| e.into_inner());
        totals.threads = self.pool.current_num_threads();
        totals
    }
}

/// Compresses one chunk on a pool thread and sends it on.
fn compress_one(
    settings: CompressionSettings,
    buffers: &super::buffers::BufferPool,
    stop: &super::stage::Stop,
    mut chunk: super::stage::Chunk,
    out: &super::lanes::LaneSender,
    totals: &std::sync::Mutex<super::stats::StageStats>,
) {
    if stop.is_job_stopped(&chunk.job) {
        return;
    }
    let started = std::time::Instant::now();
    let passthrough = settings.kind == Compression::None
        || matches!(chunk.end, Some(super::stage::NarEnd::Failed(_)));
    if !passthrough {
        // The permit stays as it is: it covers the output buffer too (see
        // `BufferPool::charge`), which the sink recycles.
        let out = buffers.take_output(chunk.data.len());
        match compress_chunk_into(settings, &chunk.data, out) {
            Ok(c) => {
                buffers.give(std::mem::replace(&mut chunk.data, c));
            }
            Err(e) => {
                chunk.data.clear();
                chunk.end = Some(super::stage::NarEnd::Failed(format!("compressing: {e}")));
            }
        }
    }
    {
        let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
        t.busy += started.elapsed();
        t.bytes_in += chunk.nar_len;
        t.bytes_out += chunk.data.len() as u64;
    }
    // A closed channel means the run is being torn down; the chunk is dropped.
    let _ = out.send(chunk);
}
