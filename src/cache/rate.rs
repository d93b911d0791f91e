//! `--max-rate`: a token bucket on the bytes sent to a cache, and [`RateLimited`], the
//! [`BinaryCache`] that [`super::open`] puts around a cache to charge it. The bucket is
//! shared by every thread and upload of the opened cache (one per command: push, backfill
//! and the daemon each open their destination once), so the cap holds for the process.
//!
//! What is counted: the bytes written into each [`NarUpload`] (the compressed NAR, as the
//! cache stores it, or a streamed object: a build log) and the bodies of narinfo and other
//! object PUTs (`.ls` listings). Not counted: request headers, HEAD/GET/list requests and
//! their answers, bytes a retry sends again, and `nix-cache-info`; all small next to NARs.
//! Nor the parts of a resumed upload the server already has ([`NarUpload::resumed_bytes`]):
//! they are written, and charged, but not sent, so the bytes that follow go free until
//! they are paid back.
//!
//! Where it is approximate: a cache may buffer what it is given before sending it. A local
//! directory writes at once. An S3 cache holds a small NAR whole until its PUT and a large
//! one a part at a time (8 MiB or more), and then sends that at the link's speed; so S3
//! sees the cap on average over any window longer than a part takes to fill at the cap,
//! while a shorter window may carry a part at full speed.
//!
//! Hand-written GCRA rather than `governor`, which counts requests in `u32` cells and
//! waits only asynchronously; the writers here are plain threads that must block.
//!
//! It never busy-waits: a taker reserves its bytes under a lock (which gives it the moment
//! they are paid for) and sleeps until then without the lock.
use super::{BinaryCache, CacheError, Merged, NarUpload, NarinfoSet, Published, RequestCount};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use std::io::{self, Write};
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The burst is this much time's worth of bytes: short, so that the cap holds over any
/// window longer than a fraction of a second (what shares the link sees a steady rate, not
/// seconds at full speed after each pause), yet each wait is long enough (tens of
/// milliseconds and up) that sleeping costs nothing next to it.
pub const BURST_TIME: Duration = Duration::from_millis(100);
/// The smallest burst, for very low rates: below it, every few bytes of a write would be a
/// lock and a sleep of their own.
pub const MIN_BURST: u64 = 16 << 10;

/// The burst of a bucket of `rate` bytes per second: [`BURST_TIME`] of bytes, at least
/// [`MIN_BURST`].
pub fn burst_for(rate: NonZeroU64) -> u64 {
    let per_burst = rate.get() as u128 * BURST_TIME.as_nanos() / 1_000_000_000;
    (per_burst as u64).max(MIN_BURST)
}

/// Where a bucket gets the time and how it waits: the system's monotonic clock and
/// `thread::sleep`, or a clock a test controls.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Instant;
    /// Returns at `deadline` or later.
    fn sleep_until(&self, deadline: Instant);
}

/// The monotonic clock; waits by sleeping.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep_until(&self, deadline: Instant) {
        let wait = deadline.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// A token bucket of bytes: `rate` bytes per second on average, at most `burst` at once
/// after an idle spell. Kept as GCRA's "theoretical arrival time": the moment everything
/// reserved so far is paid for at `rate`. A reservation of `n` bytes moves it `n / rate`
/// on (from now, when it lies in the past: idle time is not saved up beyond the burst),
/// and may go once it is at most `burst / rate` ahead of now.
#[derive(Debug)]
pub struct TokenBucket<C: Clock = SystemClock> {
    rate: NonZeroU64,
    burst: u64,
    /// `burst / rate`: how far ahead of now the paid-up moment may be.
    tolerance: Duration,
    clock: C,
    paid_until: Mutex<Instant>,
}

impl TokenBucket<SystemClock> {
    /// A bucket of `rate` bytes per second on the system clock, with [`burst_for`]'s burst.
    pub fn new(rate: NonZeroU64) -> Self {
        TokenBucket::with_clock(rate, burst_for(rate), SystemClock)
    }
}

impl<C: Clock> TokenBucket<C> {
    /// A bucket of `rate` bytes per second and `burst` bytes (at least 1) on `clock`,
    /// starting full.
    pub fn with_clock(rate: NonZeroU64, burst: u64, clock: C) -> Self {
        let burst = burst.max(1);
        let now = clock.now();
        TokenBucket {
            rate,
            burst,
            tolerance: time_for(burst, rate),
            clock,
            paid_until: Mutex::new(now),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate.get()
    }

    /// The most bytes that go at once after an idle spell; writers take at most this much
    /// at a time, so that bytes go out evenly.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Reserves `bytes` and returns the moment they may be sent (now or earlier: at once).
    /// Reservations are served in the order they are made, whichever thread makes them.
    pub fn reserve(&self, bytes: u64) -> Instant {
        let now = self.clock.now();
        let mut paid = self.paid_until.lock().unwrap_or_else(|e| e.into_inner());
        let from = (*paid).max(now);
        *paid = from + time_for(bytes, self.rate);
        // `checked_sub` fails only where the clock's epoch is too recent for the
        // subtraction; then the bytes may go at once, as they would from a full bucket.
        paid.checked_sub(self.tolerance).unwrap_or(now)
    }

    /// Waits until `bytes` may be sent (sleeping, not spinning). Takes of more than the
    /// burst are allowed and wait for the excess.
    pub fn take(&self, bytes: u64) {
        let at = self.reserve(bytes);
        if at > self.clock.now() {
            self.clock.sleep_until(at);
        }
    }
}

/// How long `bytes` take at `rate`, rounded up to the nanosecond (so rounding never lets
/// more through than the rate).
fn time_for(bytes: u64, rate: NonZeroU64) -> Duration {
    let rate = rate.get();
    let secs = bytes / rate;
    let nanos = ((bytes % rate) as u128 * 1_000_000_000).div_ceil(rate as u128) as u64;
    Duration::from_secs(secs) + Duration::from_nanos(nanos)
}

/// A cache whose uploads are charged to one [`TokenBucket`]. Every call is the inner
/// cache's; the writing ones wait for the bucket first.
#[derive(Debug)]
pub struct RateLimited<C: Clock + 'static = SystemClock> {
    inner: Box<dyn BinaryCache>,
    bucket: Arc<TokenBucket<C>>,
}

impl RateLimited {
    /// `inner`, capped at `rate` bytes per second.
    pub fn new(inner: Box<dyn BinaryCache>, rate: NonZeroU64) -> Self {
        RateLimited::with_bucket(inner, Arc::new(TokenBucket::new(rate)))
    }
}

impl<C: Clock + 'static> RateLimited<C> {
    /// `inner`, charging `bucket`.
    pub fn with_bucket(inner: Box<dyn BinaryCache>, bucket: Arc<TokenBucket<C>>) -> Self {
        RateLimited { inner, bucket }
    }

    /// The bucket uploads are charged to.
    pub fn bucket(&self) -> &TokenBucket<C> {
        &self.bucket
    }

    /// Publishes `narinfos` with `publish` (the inner cache decides what it writes, under
    /// its own lock for a local directory) and charges the narinfos written afterwards,
    /// at the size of ours (a merged one differs by a signature line or so).
    fn charged(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
        publish: impl FnOnce(Vec<NarInfo>) -> Result<Vec<Published>, CacheError>,
    ) -> Result<Vec<Published>, CacheError> {
        let sizes: Vec<u64> = narinfos
            .iter()
            .map(|n| n.render(store_dir).len() as u64)
            .collect();
        let merged = publish(narinfos)?;
        let written = merged
            .iter()
            .zip(sizes)
            .filter(|(m, _)| matches!(m, Ok(Merged::Written)))
            .map(|(_, s)| s)
            .sum();
        self.bucket.take(written);
        Ok(merged)
    }
}

impl<C: Clock + 'static> BinaryCache for RateLimited<C> {
    fn url(&self) -> &str {
        self.inner.url()
    }
    fn ensure_cache_info(&self, store_dir: &str) -> Result<(), CacheError> {
        self.inner.ensure_cache_info(store_dir)
    }
    fn has_narinfo(&self, path: &StorePath) -> Result<bool, CacheError> {
        self.inner.has_narinfo(path)
    }
    fn has_narinfos(&self, paths: &[StorePath]) -> Result<Vec<bool>, CacheError> {
        self.inner.has_narinfos(paths)
    }
    fn has_object(&self, key: &str) -> Result<bool, CacheError> {
        self.inner.has_object(key)
    }
    fn object_size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        self.inner.object_size(key)
    }
    fn get_narinfo(&self, path: &StorePath) -> Result<Option<String>, CacheError> {
        self.inner.get_narinfo(path)
    }
    fn get_narinfos(&self, paths: &[StorePath]) -> Result<Vec<Option<String>>, CacheError> {
        self.inner.get_narinfos(paths)
    }
    fn find_narinfos(
        &self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<super::FoundNarinfo>>, CacheError> {
        self.inner.find_narinfos(paths)
    }
    fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
        self.inner.get_text(key)
    }
    fn begin_nar(&self, nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError> {
        Ok(Box::new(RateLimitedUpload::new(
            self.inner.begin_nar(nar_size)?,
            self.bucket.clone(),
        )))
    }
    fn begin_nar_resumable(
        &self,
        nar_size: u64,
        identity: &super::resume::NarIdentity,
    ) -> Result<Box<dyn NarUpload>, CacheError> {
        Ok(Box::new(RateLimitedUpload::new(
            self.inner.begin_nar_resumable(nar_size, identity)?,
            self.bucket.clone(),
        )))
    }
    fn abort_recorded(&self, upload: &super::resume::RecordedUpload) -> Result<(), CacheError> {
        self.inner.abort_recorded(upload)
    }
    fn large_uploads(&self) -> Vec<super::resume::UploadProgress> {
        self.inner.large_uploads()
    }
    fn resumed_bytes(&self) -> u64 {
        self.inner.resumed_bytes()
    }
    fn begin_object(
        &self,
        size_hint: u64,
        content_type: &str,
    ) -> Result<Box<dyn NarUpload>, CacheError> {
        Ok(Box::new(RateLimitedUpload::new(
            self.inner.begin_object(size_hint, content_type)?,
            self.bucket.clone(),
        )))
    }
    fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), CacheError> {
        self.bucket.take(text.len() as u64);
        self.inner.put_narinfo(path, text)
    }
    fn put_narinfos(&self, narinfos: &[(StorePath, String)]) -> Result<(), CacheError> {
        self.bucket
            .take(narinfos.iter().map(|(_, t)| t.len() as u64).sum());
        self.inner.put_narinfos(narinfos)
    }
    fn publish_narinfos(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
    ) -> Result<Vec<Published>, CacheError> {
        self.charged(store_dir, narinfos, |n| {
            self.inner.publish_narinfos(store_dir, n)
        })
    }
    fn publish_narinfos_by(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
        deadline: std::time::Instant,
    ) -> Result<Vec<Published>, CacheError> {
        self.charged(store_dir, narinfos, |n| {
            self.inner.publish_narinfos_by(store_dir, n, deadline)
        })
    }
    fn publish_narinfos_after(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
        deadline: std::time::Instant,
        gate: &dyn super::WaveGate,
    ) -> Result<Option<Vec<Published>>, CacheError> {
        let mut discarded = false;
        let merged = self.charged(store_dir, narinfos, |n| {
            let merged = self
                .inner
                .publish_narinfos_after(store_dir, n, deadline, gate)?;
            discarded = merged.is_none();
            Ok(merged.unwrap_or_default())
        })?;
        Ok((!discarded).then_some(merged))
    }
    fn put_object(&self, key: &str, bytes: &[u8], content_type: &str) -> Result<(), CacheError> {
        self.bucket.take(bytes.len() as u64);
        self.inner.put_object(key, bytes, content_type)
    }
    fn upload_concurrency(&self) -> usize {
        self.inner.upload_concurrency()
    }
    fn narinfos_in_flight(&self) -> usize {
        self.inner.narinfos_in_flight()
    }
    fn sync(&self) -> Result<(), CacheError> {
        self.inner.sync()
    }
    fn list_narinfos(&self) -> Result<Option<NarinfoSet>, CacheError> {
        self.inner.list_narinfos()
    }
    fn sweep_orphans(&self, grace: Duration) -> Result<u64, CacheError> {
        self.inner.sweep_orphans(grace)
    }
    fn list_objects(
        &self,
        visit: &mut dyn FnMut(super::ObjectInfo<'_>),
    ) -> Result<bool, CacheError> {
        self.inner.list_objects(visit)
    }
    fn list_unfinished_uploads(&self) -> Result<Vec<super::UnfinishedUpload>, CacheError> {
        self.inner.list_unfinished_uploads()
    }
    fn get_texts(&self, keys: &[String]) -> Result<Vec<Option<String>>, CacheError> {
        self.inner.get_texts(keys)
    }
    // Reads and deletes are not uploads: the cap is on bytes sent.
    fn read_object(&self, key: &str) -> Result<Option<Box<dyn std::io::Read + Send>>, CacheError> {
        self.inner.read_object(key)
    }
    fn delete_objects(&self, keys: &[String]) -> Result<Vec<(String, CacheError)>, CacheError> {
        self.inner.delete_objects(keys)
    }
    fn request_counts(&self) -> Vec<RequestCount> {
        self.inner.request_counts()
    }
}

/// An upload (a NAR or a streamed object) whose bytes wait for the bucket before they go in,
/// at most a burst at a time.
struct RateLimitedUpload<C: Clock> {
    inner: Box<dyn NarUpload>,
    bucket: Arc<TokenBucket<C>>,
    /// Of the inner upload's resumed bytes, those already paid back (written uncharged).
    repaid: u64,
}

impl<C: Clock> RateLimitedUpload<C> {
    fn new(inner: Box<dyn NarUpload>, bucket: Arc<TokenBucket<C>>) -> Self {
        RateLimitedUpload {
            inner,
            bucket,
            repaid: 0,
        }
    }
}

impl<C: Clock> Write for RateLimitedUpload<C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.bucket.burst() as usize);
        if n == 0 {
            return Ok(0);
        }
        // Bytes charged for parts that were then not sent pay for these first.
        let credit = self.inner.resumed_bytes().saturating_sub(self.repaid);
        let free = credit.min(n as u64);
        self.repaid += free;
        if free < n as u64 {
            self.bucket.take(n as u64 - free);
        }
        self.inner.write_all(&buf[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<C: Clock> NarUpload for RateLimitedUpload<C> {
    fn written(&mut self) {
        self.inner.written();
    }
    fn resend_is_cheap(&self) -> bool {
        self.inner.resend_is_cheap()
    }
    fn commit(self: Box<Self>, key: &str) -> Result<(), CacheError> {
        self.inner.commit(key)
    }
    fn resumed_bytes(&self) -> u64 {
        self.inner.resumed_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that moves only when a taker sleeps (to the end of its sleep) or when a
    /// test advances it.
    #[derive(Debug)]
    struct TestClock {
        now: Mutex<Instant>,
        slept: Mutex<Vec<Duration>>,
    }

    fn test_clock() -> Arc<TestClock> {
        Arc::new(TestClock {
            now: Mutex::new(Instant::now()),
            slept: Mutex::default(),
        })
    }

    impl TestClock {
        fn advance(&self, d: Duration) {
            *self.now.lock().unwrap() += d;
        }
        fn now(&self) -> Instant {
            *self.now.lock().unwrap()
        }
        fn sleeps(&self) -> Vec<Duration> {
            self.slept.lock().unwrap().clone()
        }
    }

    impl Clock for Arc<TestClock> {
        fn now(&self) -> Instant {
            TestClock::now(self)
        }
        fn sleep_until(&self, deadline: Instant) {
            let mut now = self.now.lock().unwrap();
            if deadline > *now {
                self.slept.lock().unwrap().push(deadline - *now);
                *now = deadline;
            }
        }
    }

    fn rate(r: u64) -> NonZeroU64 {
        NonZeroU64::new(r).unwrap()
    }

    #[test]
    fn the_rate_holds_over_many_takes() {
        let clock = test_clock();
        let start = clock.now();
        let b = TokenBucket::with_clock(rate(1_000_000), 100_000, clock.clone());
        // 10 MB in 4 KiB pieces at 1 MB/s: all but the burst is paid for at the rate.
        let mut sent = 0u64;
        while sent < 10_000_000 {
            let n = 4096.min(10_000_000 - sent);
            b.take(n);
            sent += n;
        }
        assert_eq!(clock.now() - start, Duration::from_millis(9_900));
    }

    #[test]
    fn a_full_bucket_lets_a_burst_through_at_once_and_idle_time_is_not_saved_up() {
        let clock = test_clock();
        let b = TokenBucket::with_clock(rate(1_000), 500, clock.clone());
        b.take(500);
        assert!(
            clock.sleeps().is_empty(),
            "the first burst waits for nothing"
        );
        b.take(1);
        assert_eq!(clock.sleeps(), [Duration::from_millis(1)]);
        // A minute idle refills the bucket only up to the burst: of 5,000 bytes then,
        // 4,500 wait.
        clock.advance(Duration::from_secs(60));
        let before = clock.now();
        b.take(5_000);
        assert_eq!(clock.now() - before, Duration::from_millis(4_500));
        // The bucket is full again after burst / rate = half a second, not before.
        clock.advance(Duration::from_millis(499));
        b.take(500);
        assert_eq!(clock.sleeps().last(), Some(&Duration::from_millis(1)));
        clock.advance(Duration::from_millis(500));
        let n = clock.sleeps().len();
        b.take(500);
        assert_eq!(clock.sleeps().len(), n);
    }

    #[test]
    fn threads_share_one_bucket() {
        // The clock stands still: each reservation says when its bytes may go. Eight
        // threads of 200 reservations of 1,000 bytes at 10 kB/s with a 5,000-byte burst.
        let clock = test_clock();
        let start = clock.now();
        let b = TokenBucket::with_clock(rate(10_000), 5_000, clock.clone());
        let mut at: Vec<Instant> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..200).map(|_| b.reserve(1_000)).collect::<Vec<_>>()))
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        at.sort();
        // No reservation is lost between threads: the last goes when all 1.6 MB minus the
        // burst are paid for, at the one rate (a bucket per thread would end 8 times
        // sooner).
        assert_eq!(at.len(), 1_600);
        assert_eq!(*at.last().unwrap() - start, Duration::from_millis(159_500));
        // At no moment has more gone than the burst plus the rate times the time.
        for (i, t) in at.iter().enumerate() {
            let sent = (i as u64 + 1) * 1_000;
            let allowed = 5_000 + (*t - start).as_millis() as u64 * 10;
            assert!(sent <= allowed, "{sent} bytes by {:?}", *t - start);
        }
        // Only the burst goes at once.
        assert_eq!(at.iter().filter(|t| **t <= start).count(), 5);
    }

    #[test]
    fn the_burst_is_a_tenth_of_a_second_and_never_tiny() {
        assert_eq!(burst_for(rate(50 << 20)), 5 << 20);
        assert_eq!(burst_for(rate(1_000_000)), 100_000);
        assert_eq!(burst_for(rate(1_000)), MIN_BURST);
    }

    #[test]
    fn time_for_rounds_up() {
        assert_eq!(time_for(1, rate(3)), Duration::from_nanos(333_333_334));
        assert_eq!(time_for(7, rate(3)), Duration::new(2, 333_333_334));
        assert_eq!(time_for(u64::MAX, rate(1)), Duration::from_secs(u64::MAX));
    }

    #[test]
    fn nar_bytes_streamed_objects_and_object_bodies_are_charged_and_reads_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let inner = super::super::file::FileCache::open(dir.path(), "file:///x").unwrap();
        // 1 GB/s, so a byte is a nanosecond; a standing clock and a burst so large nothing
        // waits: how far the paid-up moment moved is what was charged.
        let clock = test_clock();
        let bucket = Arc::new(TokenBucket::with_clock(
            rate(1_000_000_000),
            1 << 30,
            clock.clone(),
        ));
        let cache = RateLimited::with_bucket(Box::new(inner), bucket.clone());
        let charged = || *bucket.paid_until.lock().unwrap() - clock.now();
        cache.ensure_cache_info("/nix/store").unwrap();
        let mut up = cache.begin_nar(3 << 20).unwrap();
        up.write_all(&vec![7u8; 3 << 20]).unwrap();
        up.commit("nar/x.nar").unwrap();
        assert_eq!(charged(), Duration::from_nanos(3 << 20));
        cache
            .put_object("x.ls", &[0; 1000], "application/json")
            .unwrap();
        let mut log = cache.begin_object(10, "text/plain").unwrap();
        log.write_all(&[b'x'; 2000]).unwrap();
        log.commit("log/x.drv").unwrap();
        let p = StorePath::from_base_name("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-p").unwrap();
        cache.put_narinfos(&[(p.clone(), "x".repeat(300))]).unwrap();
        cache.sync().unwrap();
        assert_eq!(charged(), Duration::from_nanos((3 << 20) + 3300));
        cache.has_narinfo(&p).unwrap();
        cache.get_narinfo(&p).unwrap();
        assert_eq!(cache.object_size("nar/x.nar").unwrap(), Some(3 << 20));
        assert_eq!(cache.object_size("x.ls").unwrap(), Some(1000));
        assert_eq!(cache.object_size("log/x.drv").unwrap(), Some(2000));
        // Objects read back and deleted through the limiter, free.
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut cache.read_object("x.ls").unwrap().unwrap(), &mut back)
            .unwrap();
        assert_eq!(back, [0; 1000]);
        cache.delete_objects(&["x.ls".to_owned()]).unwrap();
        assert_eq!(cache.object_size("x.ls").unwrap(), None);
        assert_eq!(charged(), Duration::from_nanos((3 << 20) + 3300));
        assert!(clock.sleeps().is_empty());
    }

    #[test]
    fn a_large_write_goes_in_at_most_a_burst_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let inner = super::super::file::FileCache::open(dir.path(), "file:///x").unwrap();
        let clock = test_clock();
        let bucket = Arc::new(TokenBucket::with_clock(
            rate(1_000_000),
            100_000,
            clock.clone(),
        ));
        let cache = RateLimited::with_bucket(Box::new(inner), bucket);
        let mut up = cache.begin_nar(1_000_000).unwrap();
        assert_eq!(up.write(&vec![1u8; 1_000_000]).unwrap(), 100_000);
        up.write_all(&vec![1u8; 900_000]).unwrap();
        // Nine bursts waited 0.1 s each, after the first went at once.
        assert_eq!(clock.sleeps(), vec![Duration::from_millis(100); 9]);
    }

    /// A cache whose uploads find their first `resumed` bytes on the server.
    #[derive(Debug)]
    struct Resumes {
        resumed: u64,
    }

    struct ResumedUpload {
        written: u64,
        resumed: u64,
    }

    impl Write for ResumedUpload {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl NarUpload for ResumedUpload {
        fn written(&mut self) {}
        fn commit(self: Box<Self>, _key: &str) -> Result<(), CacheError> {
            Ok(())
        }
        fn resumed_bytes(&self) -> u64 {
            self.written.min(self.resumed)
        }
    }

    impl BinaryCache for Resumes {
        fn url(&self) -> &str {
            "test://resumes"
        }
        fn ensure_cache_info(&self, _: &str) -> Result<(), CacheError> {
            Ok(())
        }
        fn has_narinfo(&self, _: &StorePath) -> Result<bool, CacheError> {
            Ok(false)
        }
        fn has_object(&self, _: &str) -> Result<bool, CacheError> {
            Ok(false)
        }
        fn object_size(&self, _: &str) -> Result<Option<u64>, CacheError> {
            Ok(None)
        }
        fn get_narinfo(&self, _: &StorePath) -> Result<Option<String>, CacheError> {
            Ok(None)
        }
        fn get_text(&self, _: &str) -> Result<Option<String>, CacheError> {
            Ok(None)
        }
        fn begin_nar(&self, _: u64) -> Result<Box<dyn NarUpload>, CacheError> {
            Ok(Box::new(ResumedUpload {
                written: 0,
                resumed: 0,
            }))
        }
        fn begin_nar_resumable(
            &self,
            _: u64,
            _: &super::super::resume::NarIdentity,
        ) -> Result<Box<dyn NarUpload>, CacheError> {
            Ok(Box::new(ResumedUpload {
                written: 0,
                resumed: self.resumed,
            }))
        }
        fn put_narinfo(&self, _: &StorePath, _: &str) -> Result<(), CacheError> {
            Ok(())
        }
        fn sync(&self) -> Result<(), CacheError> {
            Ok(())
        }
    }

    /// Parts a resumed upload did not send again are not charged: the bytes after them
    /// go free until what was charged for them is paid back.
    #[test]
    fn bytes_a_resumed_upload_does_not_send_are_not_charged() {
        let clock = test_clock();
        let bucket = Arc::new(TokenBucket::with_clock(
            rate(1_000_000_000),
            1 << 30,
            clock.clone(),
        ));
        let cache =
            RateLimited::with_bucket(Box::new(Resumes { resumed: 2 << 20 }), bucket.clone());
        let charged = || *bucket.paid_until.lock().unwrap() - clock.now();
        let identity = super::super::resume::NarIdentity {
            store_path: "/nix/store/qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-p".into(),
            nar_hash: "sha256:x".into(),
            compression: "zstd".into(),
        };
        let mut up = cache.begin_nar_resumable(6 << 20, &identity).unwrap();
        up.write_all(&vec![7u8; 3 << 20]).unwrap();
        up.write_all(&vec![7u8; 3 << 20]).unwrap();
        assert_eq!(up.resumed_bytes(), 2 << 20);
        up.commit("nar/x.nar").unwrap();
        assert_eq!(charged(), Duration::from_nanos(4 << 20));
    }
}
