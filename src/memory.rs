//! The one memory budget (`--memory`): its default, its split into shares and its floor,
//! and the default number of compression threads the split is made for. Settings, the
//! pipeline, backfill, the daemon and the caches all ask [`Budget`] for their share; none
//! of them divides `--memory` itself. Std only: this module never allocates a buffer,
//! reads a setting or opens a cache (a cache states what it needs as a [`CacheNeed`]).
use std::fmt;

/// Default budget: the whole run's NAR data in flight, the cache's upload buffers
/// included. Half goes to the pipeline's chunks (14 chunks of the default size beside two
/// compression outputs: work for both walkers, every compressor and the sink's reorder
/// buffer), half to the cache (S3: 64 MiB of parts on their way out).
pub const DEFAULT_MEMORY: u64 = 128 << 20;

/// What the process needs besides its budget, at most: code, the tokio runtime and HTTP
/// client of S3, one zstd or xz context per compressing thread, SQLite's page cache,
/// thread stacks and the allocator's slack. Peak RSS stays under the budget plus this, for
/// every cache (`tests/it/memory.rs` measures it).
pub const MEMORY_OVERHEAD: u64 = 64 << 20;

/// Default chunk size: each chunk becomes one independent zstd frame (or xz stream).
/// Larger chunks compress slightly better; smaller ones spread a large path over more
/// cores sooner and need less budget. 4 MiB loses well under 1% of ratio at zstd -3.
pub const DEFAULT_CHUNK_SIZE: usize = 4 << 20;

/// Chunk sizes allowed: below 64 KiB frames cost ratio, above 256 MiB one chunk would be
/// most of any sensible budget.
pub const CHUNK_SIZES: std::ops::RangeInclusive<usize> = (64 << 10)..=(256 << 20);

/// The cache's share of the budget, as a fraction: half.
const CACHE_SHARE_DIVISOR: u64 = 2;

/// Compression outputs take at most this fraction of the pipeline's share, so a small
/// budget runs fewer compressors instead of starving the walkers of chunks.
const OUTPUT_SHARE_DIVISOR: u64 = 2;

/// Compression threads when none are configured: one per core.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A configured chunk size brought into [`CHUNK_SIZES`].
pub fn chunk_size(bytes: u64) -> usize {
    let max = *CHUNK_SIZES.end();
    usize::try_from(bytes)
        .unwrap_or(max)
        .clamp(*CHUNK_SIZES.start(), max)
}

/// The buffer a chunk of `len` bytes is compressed into: compressed data can be slightly
/// larger than the input (zstd and xz add well under 1/128, plus framing).
pub fn output_bound(len: usize) -> usize {
    len + len / 128 + 1024
}

/// What a cache needs of its share at least, and what for (said in the error when the
/// budget cannot give it, in words of the user's settings). A local directory needs
/// nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheNeed {
    pub bytes: u64,
    /// E.g. `to fill one S3 part of 5.0 MiB, the smallest S3 takes`.
    pub what: String,
}

/// A budget too small to work, with the least that would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} is too small: at least {} is needed ({why}); raise --memory",
    Human(*memory),
    WholeMib(*minimum)
)]
pub struct TooSmall {
    pub memory: u64,
    pub minimum: u64,
    why: String,
}

/// A budget that works: at least one chunk and its compression output beside what the
/// cache needs of its half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    memory: u64,
    chunk_size: usize,
}

/// How a [`Budget`] is spent by a run with a given number of compression threads. The
/// shares add up to at most the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// The cache's upload buffers (S3's parts; a local directory leaves it unused).
    pub cache: u64,
    /// Compression threads: the ones asked for, fewer when their outputs would take more
    /// than half of the pipeline's share.
    pub compress_jobs: usize,
    /// One compression output buffer (and every pooled chunk buffer) in bytes.
    pub output_buffer: u64,
    /// NAR chunks held from the walker to the sink, each charged a whole output buffer.
    pub chunks: u64,
}

impl Budget {
    /// Checks `memory` against the floor for chunks of `chunk_size` bytes and a cache
    /// that needs `cache` of its share.
    ///
    /// # Errors
    /// [`TooSmall`] naming the least budget that works and what it pays for.
    pub fn new(memory: u64, chunk_size: usize, cache: &CacheNeed) -> Result<Budget, TooSmall> {
        let minimum = Self::minimum(chunk_size, cache);
        if memory < minimum {
            let out = output_bound(chunk_size) as u64;
            let why = if Self::memory_for_cache(cache.bytes) > Self::pipeline_floor(out) {
                cache.what.clone()
            } else {
                format!(
                    "to read and compress one {} chunk (chunk-size) at a time",
                    Human(chunk_size as u64)
                )
            };
            return Err(TooSmall {
                memory,
                minimum,
                why,
            });
        }
        Ok(Budget { memory, chunk_size })
    }

    /// The least budget for chunks of `chunk_size` bytes and a cache that needs `cache`.
    pub fn minimum(chunk_size: usize, cache: &CacheNeed) -> u64 {
        let out = output_bound(chunk_size) as u64;
        Self::pipeline_floor(out).max(Self::memory_for_cache(cache.bytes))
    }

    /// The least budget whose cache share ([`Budget::cache_share`]) is `bytes`: what a
    /// cache names as `--memory` when it needs a share that large.
    pub fn memory_for_cache(bytes: u64) -> u64 {
        bytes.saturating_mul(CACHE_SHARE_DIVISOR)
    }

    /// The least budget whose pipeline share holds one chunk and one compression output.
    fn pipeline_floor(out: u64) -> u64 {
        2 * out * CACHE_SHARE_DIVISOR
    }

    /// The whole budget in bytes.
    pub fn memory(&self) -> u64 {
        self.memory
    }

    /// The chunk size the budget was checked for.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The cache's share of a `memory` budget: what a cache is opened with.
    pub fn cache_share(memory: u64) -> u64 {
        memory / CACHE_SHARE_DIVISOR
    }

    /// The shares of a run with `jobs` compression threads asked for.
    pub fn split(&self, jobs: usize) -> Split {
        let cache = Self::cache_share(self.memory);
        let pipeline = self.memory - cache;
        let out = output_bound(self.chunk_size) as u64;
        let most = usize::try_from((pipeline / OUTPUT_SHARE_DIVISOR) / out)
            .unwrap_or(usize::MAX)
            .max(1);
        let compress_jobs = jobs.clamp(1, most);
        let chunks = pipeline - compress_jobs as u64 * out;
        debug_assert!(chunks >= out, "one full chunk fits");
        Split {
            cache,
            compress_jobs,
            output_buffer: out,
            chunks,
        }
    }
}

/// Bytes for people, in powers of 1024 with one decimal (`512 B`, `1.0 KiB`, `8.0 MiB`).
#[derive(Debug)]
pub struct Human(pub u64);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        for unit in ["KiB", "MiB", "GiB", "TiB"] {
            if value < 1024.0 || unit == "TiB" {
                return write!(f, "{value:.1} {unit}");
            }
            value /= 1024.0;
        }
        unreachable!("the loop ends at TiB")
    }
}

/// Bytes in whole MiB, rounded up, as `--memory` takes them (`17M`).
struct WholeMib(u64);

impl fmt::Display for WholeMib {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}M", self.0.div_ceil(1 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: u64 = (4 << 20) + (4 << 20) / 128 + 1024;

    fn s3() -> CacheNeed {
        CacheNeed {
            bytes: 5 << 20,
            what: "to fill one S3 part of 5.0 MiB".into(),
        }
    }

    #[test]
    fn the_shares_add_up_to_the_budget() {
        let b = Budget::new(128 << 20, 4 << 20, &CacheNeed::default()).unwrap();
        let s = b.split(2);
        assert_eq!(s.cache, 64 << 20);
        assert_eq!((s.compress_jobs, s.output_buffer), (2, OUT));
        assert_eq!(s.chunks, (64 << 20) - 2 * OUT);
        assert_eq!(
            s.cache + s.compress_jobs as u64 * s.output_buffer + s.chunks,
            128 << 20
        );
        // An odd budget: nothing is lost or counted twice.
        let b = Budget::new((100 << 20) + 1, 4 << 20, &CacheNeed::default()).unwrap();
        let s = b.split(3);
        assert_eq!(s.cache + 3 * OUT + s.chunks, (100 << 20) + 1);
    }

    #[test]
    fn a_small_budget_runs_fewer_compressors() {
        let b = Budget::new(32 << 20, 4 << 20, &CacheNeed::default()).unwrap();
        let s = b.split(16);
        assert_eq!(s.compress_jobs, 1);
        assert_eq!(s.chunks, (16 << 20) - OUT);
        // None asked for is one.
        assert_eq!(b.split(0).compress_jobs, 1);
    }

    #[test]
    fn the_floor_is_one_chunk_and_its_output_beside_the_caches_half() {
        let floor = 4 * OUT;
        assert_eq!(Budget::minimum(4 << 20, &CacheNeed::default()), floor);
        assert!(Budget::new(floor, 4 << 20, &CacheNeed::default()).is_ok());
        let e = Budget::new(floor - 1, 4 << 20, &CacheNeed::default()).unwrap_err();
        assert_eq!(e.minimum, floor);
        assert_eq!(
            e.to_string(),
            "16.1 MiB is too small: at least 17M is needed (to read and compress one 4.0 MiB \
             chunk (chunk-size) at a time); raise --memory"
        );
        let e = Budget::new(8 << 20, 4 << 20, &CacheNeed::default()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("8.0 MiB is too small: at least 17M"),
            "{e}"
        );
        // Smaller chunks need less.
        assert!(Budget::new(8 << 20, 1 << 20, &CacheNeed::default()).is_ok());
    }

    #[test]
    fn a_cache_that_needs_more_raises_the_floor_and_says_why() {
        // With 4 MiB chunks the pipeline's floor is above S3's: 32M is plenty.
        assert_eq!(Budget::minimum(4 << 20, &s3()), 4 * OUT);
        assert!(Budget::new(32 << 20, 4 << 20, &s3()).is_ok());
        // With 1 MiB chunks S3's one part is the floor, and the error says so.
        assert_eq!(Budget::minimum(1 << 20, &s3()), 10 << 20);
        assert!(Budget::new(10 << 20, 1 << 20, &s3()).is_ok());
        let e = Budget::new(8 << 20, 1 << 20, &s3()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "8.0 MiB is too small: at least 10M is needed (to fill one S3 part of 5.0 MiB); \
             raise --memory"
        );
        // The cache's share is what it needs, never silently more.
        assert_eq!(Budget::cache_share(10 << 20), s3().bytes);
        assert_eq!(Budget::memory_for_cache(s3().bytes), 10 << 20);
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(Human(512).to_string(), "512 B");
        assert_eq!(Human(1024).to_string(), "1.0 KiB");
        assert_eq!(Human(8 << 20).to_string(), "8.0 MiB");
        assert_eq!(Human(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(WholeMib((16 << 20) + 1).to_string(), "17M");
    }

    #[test]
    fn chunk_sizes_are_brought_into_range() {
        assert_eq!(chunk_size(1), 64 << 10);
        assert_eq!(chunk_size(4 << 20), 4 << 20);
        assert_eq!(chunk_size(u64::MAX), 256 << 20);
    }
}
