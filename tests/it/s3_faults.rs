//! Fault injection into an S3 cache under the whole pipeline, as `pipeline::faults` does
//! for a `file://` cache: for every k over the requests of a representative run, the
//! proxy (`proxy.rs`) fails the k-th request narflow sends, once.
//!
//! The run: eleven paths, one of them a slow reference two others wait for, a large NAR
//! that goes up as a multipart upload of three parts (create, parts, complete, copy to its
//! final key, delete the staging object), two paths whose narinfo is already in the cache
//! under another key (ours is merged in, theirs kept), and one the cache has for another
//! NAR (uncompressed, signed by our key: its narinfo is kept). The cache URL goes through
//! the proxy with `retries=0`, so narflow's own retries do not hide a fault, and a 2 s
//! read timeout.
//!
//! The fault of request k, by k in rotation: a 503 SlowDown and a reset (neither reaches
//! the server), a lost answer (the server does the work, the connection closes before its
//! answer) and a stall (the same, the answer held past the read timeout). After the last
//! two the outcome is unknown: narflow must check it, or fail transiently, never assume
//! it. A stall costs a read timeout, so every k gets a fault but only every fourth a
//! stall; the lost answer, which costs nothing, covers the same outcome on another
//! quarter. The read timeout is 2 s: the code takes any fraction of a second, but with no
//! retries a request answered later fails the healed run, and on a loaded machine a part
//! can take a good part of a second (a run in which the server took nearly the timeout to
//! answer is void, as below). A `200 OK` whose document cannot be read applies
//! where narflow reads the answer's document to learn the outcome
//! (CreateMultipartUpload, CompleteMultipartUpload, CopyObject; elsewhere it would be a
//! server lying about an object's bytes): it has runs of its own, one for each.
//!
//! Each k runs in push's mode (`upload`, a failed wave halts) and in the daemon's
//! (`stream`, failed paths fail and the pipeline goes on), two runs at a time. After
//! each, looking at the bucket straight (not through the proxy): every narinfo of the
//! run's paths parses, its NAR is there with its FileSize (in the clean run also with its
//! FileHash, decompressing to its NarHash), and each reference has a narinfo; every job
//! settled (a run not ended within a minute is a wedge); every path reported published
//! has its narinfo; every failure is transient; and once the fault has fired, a second
//! push of what the cache lacks (or the same daemon pipeline, resubmitting what failed)
//! brings every path to the cache with our signature, beside the other key's on the paths
//! it had, and no staging object or multipart upload of the run is left, but one whose
//! removal was the request that failed (with no retries narflow can only log it; the
//! sweep removes it once old).
//!
//! A run whose checks fail while the server itself failed a request (a 5xx the proxy
//! forwarded: moto does under concurrent requests on one multipart upload; or an answer
//! that took the server nearly the read timeout, on a loaded machine) had two
//! faults, not the one planned: it is run again with fresh paths, a few times at most.
//!
//! The bucket is shared: each run makes store paths (and NARs) of its own, checks only
//! their objects, and deletes its large NAR afterwards.
use crate::helpers::{S3Client, S3Env, open_options, s3_env, unique};
use crate::proxy::{Fault, Kind, Proxy, Rule};
use crate::s3::{STAGING_PREFIX, assert_no_staging_leftovers, staging_keys};
use narflow::cache::s3::S3Cache;
use narflow::cache::url::CacheUrl;
use narflow::cache::{S3Tuning, narinfo_key};
use narflow::format::compression::{Compression, CompressionSettings};
use narflow::format::hash::Sha256;
use narflow::format::narinfo::NarInfo;
use narflow::format::signing::SigningKey;
use narflow::format::store_path::StorePath;
use narflow::pipeline::outcome::{NoProgress, Outcome};
use narflow::pipeline::publish::{NewJob, OnPublishError, Settled};
use narflow::pipeline::{Feeder, PushOptions, stream, upload, upload_after};
use narflow::store::PathInfo;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Longer than any of these runs takes (a few seconds at most): past it, a run is wedged.
const WEDGED: Duration = Duration::from_secs(60);

/// The read timeout in the cache URL, in seconds, and a stall just past it.
const READ_TIMEOUT: &str = "2";
const STALL: Duration = Duration::from_millis(2200);
/// An answer the server itself took this long to give (the proxy's overhead short of the
/// read timeout) may have reached narflow after it gave up: on a loaded machine that is a
/// fault of the server's own, like a 5xx ([`ServerFailed`]).
const SLOW_ANSWER: Duration = Duration::from_millis(1800);
/// The server does the work and the connection closes before its answer: a lost answer,
/// as after a stall, without the wait.
const LOST: Fault = Fault::Stall(Duration::ZERO);

/// Tries of a run that met a fault of the server's own ([`ServerFailed`]).
const TRIES: usize = 3;

/// Runs of one mode going at once: a run waits on the server (and a stall on the read
/// timeout) much of its time.
const RUNS_AT_ONCE: usize = 2;

/// Threads that look at the bucket after a run (its requests wait on the server).
const LOOKERS: usize = 4;

/// The smallest part S3 takes (but for the last): `S3Tuning::check` refuses less.
const MIN_S3_PART: u64 = 5 << 20;

/// The paths of the run: (name, size, references). The large one, incompressible in the
/// 64 KiB chunks of the run, is more than two parts of [`MIN_S3_PART`].
const PATHS: &[(&str, usize, &[usize])] = &[
    ("slow-reference", 768 << 10, &[]),
    ("large", 11 << 20, &[]),
    ("a", 10, &[]),
    ("b", 2_000, &[]),
    ("c", 300, &[2]),
    ("d", 40_000, &[2, 3]),
    ("waits-for-slow", 100, &[0]),
    ("waits-for-slow-too", 5_000, &[0, 2]),
    ("present", 1_000, &[2]),
    ("top", 50, &[6, 7, 8, 1]),
    ("kept", 3_000, &[]),
];
const LARGE: usize = 1;
/// Paths the cache has before the run, signed by another key only.
const PRESENT: &[usize] = &[2, 8];
/// A path the cache has before the run for another NAR (uncompressed), signed by our key:
/// its narinfo is kept.
const KEPT: usize = 10;

fn our_key() -> SigningKey {
    SigningKey::from_seed("narflow-s3-faults-1", [7; 32])
}

/// The key that signed what the cache had before the run.
fn other_key() -> SigningKey {
    SigningKey::from_seed("narflow-s3-faults-other-1", [9; 32])
}

fn opts(compression: Compression, key: SigningKey) -> PushOptions {
    let mut o = PushOptions::new(
        CompressionSettings::new(compression, None).unwrap(),
        vec![key],
    );
    o.chunk_size = 64 << 10;
    // The cache's half, 64 MiB, lets three parts of 5 MiB go up at once.
    o.memory = 128 << 20;
    o
}

/// What every run of a mode shares: the server, a client straight to it to look at the
/// bucket, and a cache straight to it that puts the run's pre-existing narinfos there.
struct Suite {
    env: S3Env,
    client: S3Client,
    direct: Box<dyn narflow::cache::BinaryCache>,
}

/// One run: fresh store paths (and NARs: the names, in the NARs, are fresh too), the
/// cache already holding [`PRESENT`] and [`KEPT`], and the proxy in front of the server.
struct Run {
    suite: Arc<Suite>,
    what: String,
    /// No fault is planned.
    clean: bool,
    _store: tempfile::TempDir,
    sd: String,
    infos: Vec<PathInfo>,
    opts: PushOptions,
    proxy: Proxy,
    cache: S3Cache,
}

impl Suite {
    fn new(env: S3Env) -> Suite {
        let client = env.client();
        let url = CacheUrl::parse(&env.url("")).unwrap();
        let direct = narflow::cache::open(&url, &open_options(&url)).unwrap();
        Suite {
            env,
            client,
            direct,
        }
    }

    /// A run whose proxy applies `rules`; `what` names it in messages.
    fn run(self: &Arc<Self>, what: String, rules: Vec<Rule>) -> Run {
        // On tmpfs where there is one: the run's time is the cache's, not the disk's.
        let store = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let sd = store.path().to_str().unwrap().to_owned();
        let tag = unique("s3fault");
        let names: Vec<String> = PATHS.iter().map(|(n, _, _)| format!("{n}-{tag}")).collect();
        let specs: Vec<(&str, usize, &[usize])> = PATHS
            .iter()
            .zip(&names)
            .map(|((_, size, refs), name)| (name.as_str(), *size, *refs))
            .collect();
        let infos = narflow::store::make_test_store(store.path(), &tag, &specs);
        let present: Vec<PathInfo> = PRESENT.iter().map(|&i| infos[i].clone()).collect();
        let r = upload(
            &*self.direct,
            &sd,
            &present,
            &opts(Compression::Zstd, other_key()),
            &NoProgress,
        )
        .unwrap();
        assert_eq!(r.failed().count(), 0, "{:?}", r.results);
        let kept = std::slice::from_ref(&infos[KEPT]);
        let r = upload(
            &*self.direct,
            &sd,
            kept,
            &opts(Compression::None, our_key()),
            &NoProgress,
        )
        .unwrap();
        assert_eq!(r.failed().count(), 0, "{:?}", r.results);

        let clean = rules.is_empty();
        let proxy = Proxy::start(&self.env.endpoint, rules);
        let url = CacheUrl::parse(&self.env.url_at(
            &proxy.endpoint(),
            &format!("&retries=0&read-timeout={READ_TIMEOUT}"),
        ))
        .unwrap();
        let mut tuning = S3Tuning::from_url(&url).unwrap();
        tuning.min_part_size = MIN_S3_PART;
        let smaller = S3Tuning {
            min_part_size: MIN_S3_PART - 1,
            ..tuning.clone()
        };
        assert!(
            smaller.check().is_err(),
            "S3 takes parts below {MIN_S3_PART}"
        );
        let opts = opts(Compression::Zstd, our_key());
        let cache = S3Cache::open(&self.env.bucket, &url, &opts.cache_options(tuning)).unwrap();
        Run {
            suite: self.clone(),
            what,
            clean,
            _store: store,
            sd,
            infos,
            opts,
            proxy,
            cache,
        }
    }
}

impl Run {
    /// Jobs for the paths `which` takes, each waiting for the references `in_cache` says
    /// the cache lacks.
    fn jobs(
        &self,
        which: impl Fn(usize) -> bool,
        in_cache: impl Fn(&StorePath) -> bool,
    ) -> Vec<NewJob> {
        self.infos
            .iter()
            .enumerate()
            .filter(|(i, _)| which(*i))
            .map(|(_, info)| {
                NewJob::waiting_for(info.clone(), Default::default(), |r| !in_cache(r))
            })
            .collect()
    }

    fn index(&self, path: &StorePath) -> usize {
        self.infos
            .iter()
            .position(|i| i.path == *path)
            .unwrap_or_else(|| panic!("{}: {path} is not a path of the run", self.what))
    }

    /// Fails the test with `why`, the run's name and the proxy's log.
    fn fail(&self, why: impl std::fmt::Display) -> ! {
        let server: Vec<String> = self
            .proxy
            .log()
            .iter()
            .filter(|r| {
                r.fault.is_none()
                    && (r.status.is_some_and(|s| s >= 500)
                        || r.waited.is_some_and(|w| w >= SLOW_ANSWER))
            })
            .map(|r| {
                format!(
                    "{} {} -> {:?} after {:?}",
                    r.method, r.target, r.status, r.waited
                )
            })
            .collect();
        if !server.is_empty() {
            // Leave no staging behind for the next runs, whatever is there.
            let c = &self.suite.client;
            for key in staging_keys(&self.proxy) {
                for (k, id) in c.multipart_uploads(&key) {
                    c.abort_multipart(&k, &id);
                }
                c.delete(&key);
            }
            std::panic::panic_any(ServerFailed(format!(
                "{}: {why}; the server itself failed {server:?}",
                self.what
            )));
        }
        panic!("{}: {why}\n{}", self.what, self.proxy.dump())
    }

    /// The narinfo of each of the run's paths in the bucket (None where there is none),
    /// checked whole: it parses, its NAR is there with its FileSize (and, with `read_nars`,
    /// its FileHash, decompressing to its NarHash), and each reference has a narinfo. The
    /// paths are looked at a few at a time.
    fn look(&self, c: &S3Client, read_nars: bool) -> Vec<Option<NarInfo>> {
        let one = |info: &PathInfo| -> Result<Option<NarInfo>, String> {
            let key = narinfo_key(&info.path);
            let Some(text) = c.get_text(&key) else {
                return Ok(None);
            };
            let n = NarInfo::parse(&text, &self.sd).map_err(|e| format!("{key}: {e}\n{text}"))?;
            let missing = || format!("{key} names {}, which is not there", n.url);
            let size = c.head(&n.url).ok_or_else(missing)?.size;
            if Some(size) != n.file_size {
                return Err(format!(
                    "{key} says FileSize {:?}, its NAR {} has {size} bytes",
                    n.file_size, n.url
                ));
            }
            if read_nars {
                let nar = c.get(&n.url).ok_or_else(missing)?;
                if Some(Sha256::digest(&nar)) != n.file_hash {
                    return Err(format!("{key}: its NAR {} is not its FileHash", n.url));
                }
                let nar = match n.compression.as_str() {
                    "none" => nar,
                    "zstd" => zstd::decode_all(nar.as_slice()).map_err(|e| e.to_string())?,
                    other => return Err(format!("{key}: compression {other}")),
                };
                if Sha256::digest(&nar) != n.nar_hash {
                    return Err(format!("{key}: its NAR {} is not its NarHash", n.url));
                }
            }
            Ok(Some(n))
        };
        let found: Vec<Option<NarInfo>> = std::thread::scope(|s| {
            let lookers: Vec<_> = (0..LOOKERS)
                .map(|t| {
                    s.spawn(move || {
                        self.infos
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| i % LOOKERS == t)
                            .map(|(i, info)| (i, one(info)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let mut all: Vec<_> = lookers
                .into_iter()
                .flat_map(|l| l.join().expect("a looker"))
                .collect();
            all.sort_by_key(|(i, _)| *i);
            all.into_iter()
                .map(|(_, r)| r.unwrap_or_else(|e| self.fail(e)))
                .collect()
        });
        for n in found.iter().flatten() {
            for r in &n.references {
                if found[self.index(r)].is_none() {
                    self.fail(format_args!(
                        "{} is in the cache, its reference {r} is not",
                        n.store_path
                    ));
                }
            }
        }
        found
    }

    /// Whether a narinfo of `found` (from [`Run::look`]) has our signature.
    fn ours(&self, n: &NarInfo) -> bool {
        n.valid_signatures(&self.sd, &[our_key().verifying_key()]) == 1
    }

    /// Checks what one path's outcome says against the bucket (`found`, from
    /// [`Run::look`]): published means its narinfo is there; a failure must be transient,
    /// since every fault here heals.
    fn check_outcome(&self, found: &[Option<NarInfo>], path: &StorePath, outcome: &Outcome) {
        match outcome {
            Outcome::Uploaded { .. } | Outcome::AlreadyPresent => {
                if found[self.index(path)].is_none() {
                    self.fail(format_args!("{path} reported published but absent"));
                }
            }
            Outcome::Failed(f) => {
                if !f.is_transient() {
                    self.fail(format_args!(
                        "{path} failed permanently of a transient fault: {f}"
                    ));
                }
            }
        }
    }

    /// The staging keys whose cleanup request (DeleteObject, AbortMultipartUpload) the
    /// fault kept from the server: with no retries, narflow can only log what it leaves
    /// there.
    fn cleanup_failed(&self) -> Vec<String> {
        self.proxy
            .log()
            .iter()
            .filter(|r| matches!(r.fault, Some(Fault::Reset | Fault::SlowDown)))
            .filter(|r| r.is(Kind::Delete) || r.is(Kind::AbortMultipart))
            .filter(|r| r.key().starts_with(STAGING_PREFIX))
            .map(|r| r.key().to_owned())
            .collect()
    }

    /// After the healed part of the run: every path is there, whole, with our signature
    /// (and the other key's on the paths it had), the kept path's narinfo is the cache's,
    /// and nothing of the run's staging is left. Then the large NAR is deleted, to spare the server's disk.
    fn check_healed(&self, c: &S3Client) {
        // Reading every NAR back would take most of a run's time: the clean run does.
        let found = self.look(c, self.clean);
        let other = other_key().verifying_key();
        for (i, n) in found.iter().enumerate() {
            let path = &self.infos[i].path;
            let Some(n) = n else {
                self.fail(format_args!("{path} never reached the cache"));
            };
            if !self.ours(n) {
                self.fail(format_args!("{path}: our signature is missing"));
            }
            if PRESENT.contains(&i)
                && n.valid_signatures(&self.sd, std::slice::from_ref(&other)) != 1
            {
                self.fail(format_args!(
                    "{path}: the other key's signature was dropped"
                ));
            }
        }
        if found[KEPT]
            .as_ref()
            .is_some_and(|n| n.compression != "none")
        {
            self.fail("the cache's narinfo of the kept path was replaced");
        }
        let mut keys = staging_keys(&self.proxy);
        for key in self.cleanup_failed() {
            // Left by design: narflow logs it, and the sweep removes it once old.
            for (k, id) in c.multipart_uploads(&key) {
                c.abort_multipart(&k, &id);
            }
            c.delete(&key);
            keys.remove(&key);
        }
        let left = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_no_staging_leftovers(c, &keys)
        }));
        if let Err(e) = left {
            let why = e
                .downcast_ref::<String>()
                .map_or("a leftover", String::as_str);
            self.fail(why);
        }
        if let Some(n) = &found[LARGE] {
            c.delete(&n.url);
        }
    }
}

/// A run whose checks failed while the server itself had failed a request (a 5xx the
/// proxy forwarded, or an answer it took [`SLOW_ANSWER`] to give): a fault beside the one
/// planned, which the run cannot be judged by.
struct ServerFailed(String);

/// Runs `f` on a thread of its own and returns its result (or its panic), or fails the
/// test when it has not ended within [`WEDGED`].
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(WEDGED) {
        Ok(Ok(t)) => t,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
            panic!("{what}: the run did not end: wedged")
        }
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
            panic!("{what}: the run panicked")
        }
    }
}

/// What one run came to before healing: faults fired, requests, and UploadParts that
/// succeeded.
struct Ran {
    fired: usize,
    requests: usize,
    parts: usize,
}

impl Ran {
    fn of(run: &Run) -> Ran {
        Ran {
            fired: run.proxy.faults(|_| true),
            requests: run.proxy.log().len(),
            parts: run.proxy.succeeded(Kind::UploadPart),
        }
    }
}

/// One run in push's mode: `upload` under the proxy's faults; then, healed, a second push
/// of what the cache lacks, as `narflow push` plans it (paths without a narinfo that has
/// our signature; the rest are found in the cache).
fn push_once(suite: &Arc<Suite>, what: String, rules: Vec<Rule>) -> Ran {
    let run = Arc::new(suite.run(what, rules));
    let what = run.what.clone();
    let first = {
        let run = run.clone();
        bounded(&what, move || {
            upload(&run.cache, &run.sd, &run.infos, &run.opts, &NoProgress)
        })
    };
    let ran = Ran::of(&run);
    run.proxy.heal();
    let c = &suite.client;
    let found = run.look(c, false);
    match &first {
        Ok(report) => {
            if report.results.len() != run.infos.len() {
                run.fail(format_args!("not every path settled: {:?}", report.results));
            }
            for r in &report.results {
                let path = StorePath::from_absolute_path(&r.path, &run.sd).unwrap();
                run.check_outcome(&found, &path, &r.outcome);
            }
        }
        Err(e) if e.is_transient() => {}
        Err(e) => run.fail(format_args!("the push failed permanently: {e:#}")),
    }
    let (todo, seen): (Vec<_>, Vec<_>) = run
        .infos
        .iter()
        .zip(&found)
        .partition(|(_, n)| !n.as_ref().is_some_and(|n| run.ours(n)));
    let todo: Vec<PathInfo> = todo.into_iter().map(|(i, _)| i.clone()).collect();
    let seen: HashSet<StorePath> = seen.into_iter().map(|(i, _)| i.path.clone()).collect();
    let again = {
        let run = run.clone();
        bounded(&what, move || {
            upload_after(
                &run.cache,
                &run.sd,
                &todo,
                &seen,
                narflow::pipeline::publish::Look::default(),
                &run.opts,
                &NoProgress,
            )
        })
    }
    .unwrap_or_else(|e| run.fail(format_args!("healed, the push still failed: {e:#}")));
    if again.failed().count() > 0 {
        run.fail(format_args!("healed: {:?}", again.results));
    }
    run.check_healed(c);
    ran
}

/// One run in the daemon's mode: one long-lived pipeline takes every path (the kept one
/// alone first, so the pipeline goes idle once) under the proxy's faults, settles each,
/// and, healed, takes the failed ones again.
fn daemon_once(suite: &Arc<Suite>, what: String, rules: Vec<Rule>) -> Ran {
    let run = Arc::new(suite.run(what, rules));
    let what = run.what.clone();
    let ran = {
        let (suite, run) = (suite.clone(), run.clone());
        bounded(&what, move || {
            let c = &suite.client;
            let body = |feeder: Feeder<'_>, settled: crossbeam_channel::Receiver<Settled>| {
                let mut outcomes = Vec::new();
                let settle = |n: usize, outcomes: &mut Vec<Settled>| {
                    for _ in 0..n {
                        let done = settled
                            .recv_timeout(WEDGED)
                            .unwrap_or_else(|_| run.fail("a job never settled"));
                        outcomes.push(done);
                    }
                };
                let present = |p: &StorePath| {
                    PRESENT
                        .iter()
                        .chain([&KEPT])
                        .any(|&i| run.infos[i].path == *p)
                };
                let sent = feeder.submit(run.jobs(|i| i == KEPT, present));
                settle(sent, &mut outcomes);
                let more = feeder.submit(run.jobs(|i| i != KEPT, present));
                assert_eq!(sent + more, run.infos.len());
                settle(more, &mut outcomes);
                let ran = Ran::of(&run);
                run.proxy.heal();
                let found = run.look(c, false);
                let mut failed = Vec::new();
                for done in outcomes {
                    run.check_outcome(&found, &done.path, &done.result.outcome);
                    if matches!(done.result.outcome, Outcome::Failed(_)) {
                        failed.push(run.index(&done.path));
                    }
                }
                // As the daemon retries: what failed, planned against the cache.
                let has = |p: &StorePath| found[run.index(p)].is_some();
                let sent = feeder.submit(run.jobs(|i| failed.contains(&i), has));
                for _ in 0..sent {
                    let done = settled
                        .recv_timeout(WEDGED)
                        .unwrap_or_else(|_| run.fail("a retried job never settled"));
                    if let Outcome::Failed(f) = &done.result.outcome {
                        run.fail(format_args!("healed, {} still failed: {f}", done.path));
                    }
                }
                ran
            };
            let (ran, _) = stream(
                &run.cache,
                &run.sd,
                &run.opts,
                &NoProgress,
                OnPublishError::FailPaths,
                body,
            )
            .unwrap_or_else(|e| run.fail(format_args!("the daemon's pipeline ended: {e:#}")));
            ran
        })
    };
    run.check_healed(&suite.client);
    ran
}

/// The fault of request k: SlowDown, reset, a lost answer and a stall in turn.
fn fault_for(k: usize) -> Fault {
    match k % 4 {
        0 => Fault::SlowDown,
        1 => Fault::Reset,
        2 => LOST,
        _ => Fault::Stall(STALL),
    }
}

/// Runs `once`; a run that met a fault of the server's own ([`ServerFailed`]) is run again
/// with fresh paths, up to [`TRIES`] times in all, and counted in `voided`.
fn judged(
    suite: &Arc<Suite>,
    once: fn(&Arc<Suite>, String, Vec<Rule>) -> Ran,
    what: String,
    rules: Vec<Rule>,
    voided: &AtomicUsize,
) -> Ran {
    for attempt in 1..=TRIES {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            once(suite, what.clone(), rules.clone())
        }));
        match r.map_err(|p| p.downcast::<ServerFailed>()) {
            Ok(ran) => return ran,
            Err(Ok(f)) if attempt < TRIES => {
                eprintln!("void, run again: {}", f.0);
                voided.fetch_add(1, Ordering::SeqCst);
            }
            Err(Ok(f)) => panic!("{} (void {TRIES} times in a row)", f.0),
            Err(Err(p)) => std::panic::resume_unwind(p),
        }
    }
    unreachable!("the last try returns or panics")
}

/// Runs `once` for every k over the requests of a clean run (and a few past them: runs
/// differ a little in order and count), and with an unreadable answer to each request
/// whose document tells narflow the outcome, [`RUNS_AT_ONCE`] at a time; checks that
/// nearly every k found a request to fail.
fn every_k(mode: &str, once: fn(&Arc<Suite>, String, Vec<Rule>) -> Ran) {
    let Some(env) = s3_env() else { return };
    let started = Instant::now();
    let suite = Arc::new(Suite::new(env));
    let voided = AtomicUsize::new(0);
    let clean = judged(&suite, once, format!("{mode}: clean"), vec![], &voided);
    assert_eq!(clean.fired, 0);
    assert!(
        clean.parts > 2,
        "{mode}: the large NAR took {} parts",
        clean.parts
    );
    let requests = clean.requests;
    assert!(requests > 30, "a representative run: {requests} requests");

    let unreadable = [
        Kind::CreateMultipart,
        Kind::CompleteMultipart,
        Kind::CopyObject,
    ];
    let mut planned: Vec<(String, Vec<Rule>)> = unreadable
        .iter()
        .map(|&kind| {
            (
                format!("{mode}: the first {kind:?} answered unreadably"),
                vec![Rule::after(kind, 0, 1, Fault::UnreadableIn200)],
            )
        })
        .collect();
    planned.extend((0..requests + 3).map(|k| {
        let fault = fault_for(k);
        (
            format!("{mode}: k={k} {fault:?}"),
            vec![Rule::after(Kind::Any, k, 1, fault)],
        )
    }));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let mut ran: Vec<(usize, Ran)> = std::thread::scope(|s| {
        let runners: Vec<_> = (0..RUNS_AT_ONCE)
            .map(|_| {
                s.spawn(|| {
                    let mut ran = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= planned.len() || failed.load(Ordering::SeqCst) {
                            return ran;
                        }
                        let (what, rules) = planned[i].clone();
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            judged(&suite, once, what, rules, &voided)
                        }));
                        match r {
                            Ok(r) => ran.push((i, r)),
                            Err(p) => {
                                // The other runners stop at their next run.
                                failed.store(true, Ordering::SeqCst);
                                std::panic::resume_unwind(p)
                            }
                        }
                    }
                })
            })
            .collect();
        runners
            .into_iter()
            .flat_map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    ran.sort_by_key(|(i, _)| *i);
    for ((what, _), (_, r)) in planned.iter().zip(&ran).take(unreadable.len()) {
        assert_eq!(r.fired, 1, "{what}: no such request in the run");
    }
    let fired: usize = ran[unreadable.len()..].iter().map(|(_, r)| r.fired).sum();
    assert!(
        fired >= requests * 9 / 10,
        "{mode}: {fired} faults fired over {requests} requests"
    );
    println!(
        "{mode} on {}: {requests} requests in a clean run; {} runs ({fired} faults at k, {} \
         unreadable answers; {} run again after a fault of the server's own) in {:.1?}",
        suite.env.server,
        planned.len() + 1,
        unreadable.len(),
        voided.load(Ordering::SeqCst),
        started.elapsed()
    );
}

#[test]
fn every_s3_request_failing_in_a_push_leaves_the_cache_whole_and_a_rerun_completes_it() {
    every_k("push", push_once);
}

#[test]
fn every_s3_request_failing_under_the_daemon_settles_every_job_and_retries_complete_it() {
    every_k("daemon", daemon_once);
}
