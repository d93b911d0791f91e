//! The ceiling: the workload's NAR bytes compressed by zstd alone, the speed the pipeline cannot beat.

use super::*;

/// Compression alone on the workload's NAR bytes: the speed the pipeline cannot beat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ceiling {
    pub workload: String,
    pub threads: usize,
    /// NAR bytes compressed (a sample spread over the whole workload when it is larger
    /// than the limit).
    pub sample_bytes: u64,
    pub compressed_bytes: u64,
    pub chunks: usize,
    /// Best pass.
    pub seconds: f64,
    /// CPU time of the best pass (process-wide, user + system).
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    pub mb_per_s: f64,
}

/// CPU times are counted in 10 ms ticks: below this they are too coarse to compare.
pub(super) const MIN_CPU_SECONDS: f64 = 0.2;

impl Ceiling {
    /// CPU seconds per GB of NAR, when the pass was long enough to measure.
    pub fn cpu_seconds_per_gb(&self) -> Option<f64> {
        self.cpu_seconds
            .filter(|c| *c >= MIN_CPU_SECONDS && self.sample_bytes > 0)
            .map(|c| c / (self.sample_bytes as f64 / 1e9))
    }
}

/// Cuts each path's NAR into chunks as the pipeline does and keeps every `stride`-th.
pub(super) struct Sampler {
    pub(super) chunk_size: usize,
    pub(super) stride: u64,
    pub(super) index: u64,
    pub(super) current: Option<Vec<u8>>,
    pub(super) filled: usize,
    pub(super) kept: Vec<Vec<u8>>,
}

impl Sampler {
    pub(super) fn end_path(&mut self) {
        if self.filled > 0 {
            if let Some(c) = self.current.take() {
                self.kept.push(c);
            }
            self.index += 1;
            self.filled = 0;
        }
    }
}

impl Write for Sampler {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            if self.filled == self.chunk_size {
                if let Some(c) = self.current.take() {
                    self.kept.push(c);
                }
                self.index += 1;
                self.filled = 0;
            }
            let take = (self.chunk_size - self.filled).min(data.len());
            if self.filled == 0 && self.index.is_multiple_of(self.stride) {
                self.current = Some(Vec::with_capacity(self.chunk_size));
            }
            if let Some(c) = self.current.as_mut() {
                c.extend_from_slice(&data[..take]);
            }
            self.filled += take;
            data = &data[take..];
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Measures the ceiling: up to `limit` bytes of `w`'s NAR (chunked per path exactly as the
/// pipeline chunks it, sampled evenly across the workload) are loaded into memory, then
/// compressed `passes` times on a rayon pool of `jobs` threads with
/// [`compress_chunk`]; the best pass counts. No hashing, no I/O: zstd alone.
///
/// # Errors
/// [`BenchError::Nar`] when the workload cannot be read.
pub fn measure_ceiling(
    w: &Workload,
    settings: CompressionSettings,
    chunk_size: usize,
    jobs: usize,
    limit: u64,
    passes: usize,
) -> Result<Ceiling, BenchError> {
    use rayon::prelude::*;
    let chunk = chunk_size.max(1) as u64;
    // Every `stride`-th chunk: about `total / stride` bytes, at most about `limit`.
    let stride = w.nar_bytes().div_ceil(limit.max(chunk)).max(1);
    let mut sampler = Sampler {
        chunk_size: chunk_size.max(1),
        stride,
        index: 0,
        current: None,
        filled: 0,
        kept: Vec::new(),
    };
    for info in &w.infos {
        dump_path(
            Path::new(&info.path.to_absolute(&w.store_dir)),
            &mut sampler,
        )?;
        sampler.end_path();
    }
    let sample = sampler.kept;
    let sample_bytes: u64 = sample.iter().map(|c| c.len() as u64).sum();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.max(1))
        .build()
        .map_err(|e| BenchError::Io {
            path: w.dir.clone(),
            source: io::Error::other(format!("starting threads: {e}")),
        })?;
    let mut best: Option<(f64, u64, Option<f64>)> = None;
    for _ in 0..passes.max(1) {
        let started = Instant::now();
        let cpu_start = process_cpu_seconds();
        let out: io::Result<u64> = pool.install(|| {
            sample
                .par_iter()
                .map(|c| compress_chunk(settings, c).map(|z| z.len() as u64))
                .try_reduce(|| 0, |a, b| Ok(a + b))
        });
        let secs = started.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds()
            .zip(cpu_start)
            .map(|(end, start)| end - start);
        let out = out.map_err(io_error(&w.dir))?;
        if best.is_none_or(|(s, _, _)| secs < s) {
            best = Some((secs, out, cpu));
        }
    }
    let (seconds, compressed_bytes, cpu_seconds) = best.unwrap_or((0.0, 0, None));
    Ok(Ceiling {
        workload: w.spec.kind.name().to_owned(),
        threads: pool.current_num_threads(),
        sample_bytes,
        compressed_bytes,
        chunks: sample.len(),
        seconds,
        cpu_seconds,
        mb_per_s: rate(sample_bytes as f64 / MB, seconds),
    })
}

pub(super) fn rate(amount: f64, seconds: f64) -> f64 {
    if seconds > 0.0 { amount / seconds } else { 0.0 }
}
