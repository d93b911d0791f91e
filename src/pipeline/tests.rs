//! Pipeline tests on synthetic store paths (no Nix needed): what goes in comes out, in
//! closure order, within the budget, and nothing is published for a failed path.
use super::outcome::*;
use super::publish::*;
use super::*;
use crate::cache::file::FileCache;
use crate::format::compression::Compression;
use crate::format::hash::Sha256;
use crate::format::narinfo::NarInfo;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Forwards each named `BinaryCache` method to the field `$f` (a `FileCache`), for the
/// stand-in caches here that change only a few.
macro_rules! forward_to {
    ($f:tt; $($m:ident),* $(,)?) => { $( forward_to!(@ $f $m); )* };
    (@ $f:tt url) => {
        fn url(&self) -> &str {
            self.$f.url()
        }
    };
    (@ $f:tt ensure_cache_info) => {
        fn ensure_cache_info(&self, store_dir: &str) -> Result<(), crate::cache::CacheError> {
            self.$f.ensure_cache_info(store_dir)
        }
    };
    (@ $f:tt has_narinfo) => {
        fn has_narinfo(&self, path: &StorePath) -> Result<bool, crate::cache::CacheError> {
            self.$f.has_narinfo(path)
        }
    };
    (@ $f:tt has_object) => {
        fn has_object(&self, key: &str) -> Result<bool, crate::cache::CacheError> {
            self.$f.has_object(key)
        }
    };
    (@ $f:tt object_size) => {
        fn object_size(&self, key: &str) -> Result<Option<u64>, crate::cache::CacheError> {
            self.$f.object_size(key)
        }
    };
    (@ $f:tt get_narinfo) => {
        fn get_narinfo(
            &self,
            path: &StorePath,
        ) -> Result<Option<String>, crate::cache::CacheError> {
            self.$f.get_narinfo(path)
        }
    };
    (@ $f:tt get_text) => {
        fn get_text(&self, key: &str) -> Result<Option<String>, crate::cache::CacheError> {
            self.$f.get_text(key)
        }
    };
    (@ $f:tt begin_nar) => {
        fn begin_nar(
            &self,
            nar_size: u64,
        ) -> Result<Box<dyn crate::cache::NarUpload>, crate::cache::CacheError> {
            self.$f.begin_nar(nar_size)
        }
    };
    (@ $f:tt put_narinfo) => {
        fn put_narinfo(
            &self,
            path: &StorePath,
            text: &str,
        ) -> Result<(), crate::cache::CacheError> {
            self.$f.put_narinfo(path, text)
        }
    };
    (@ $f:tt sync) => {
        fn sync(&self) -> Result<(), crate::cache::CacheError> {
            self.$f.sync()
        }
    };
}

/// A fake store: `(store dir, infos)` where each info's NarHash is computed from disk.
pub(super) fn make_store(dir: &Path, specs: &[(&str, usize, &[usize])]) -> Vec<PathInfo> {
    crate::store::make_test_store(dir, "", specs)
}

/// Options whose pipeline share of the budget is `memory` (the cache's half, which a
/// local directory leaves unused, comes on top).
pub(super) fn opts(kind: Compression, chunk: usize, memory: u64) -> PushOptions {
    let key = crate::format::signing::SigningKey::from_seed("test-1", [7; 32]);
    let mut o = PushOptions::new(CompressionSettings::new(kind, None).unwrap(), vec![key]);
    o.chunk_size = chunk;
    o.memory = 2 * memory;
    o
}

pub(super) fn decompress(kind: Compression, data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    match kind {
        Compression::Zstd => zstd::decode_all(data).unwrap(),
        Compression::Xz => {
            let mut v = vec![];
            liblzma::read::XzDecoder::new_multi_decoder(data)
                .read_to_end(&mut v)
                .unwrap();
            v
        }
        Compression::None => data.to_vec(),
    }
}

#[test]
fn uploads_decode_to_the_nar_and_narinfos_verify() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    // Sizes straddle the chunk size (64 KiB here) so paths have 1, 2 and many chunks.
    let infos = make_store(
        store.path(),
        &[
            ("a", 10, &[]),
            ("b", 70_000, &[0]),
            ("c", 1_000_000, &[0, 1]),
            ("d", 65_536, &[2]),
        ],
    );
    for kind in [Compression::Zstd, Compression::Xz, Compression::None] {
        let cache = FileCache::open(cache_dir.path(), "file:///t").unwrap();
        let o = opts(kind, 64 << 10, 256 << 10);
        let report = upload(&cache, sd, &infos, &o, &NoProgress).unwrap();
        assert_eq!(
            report.count(|o| matches!(o, Outcome::Uploaded { .. })),
            4,
            "{kind:?}: {:?}",
            report.results
        );
        let pk = o.keys[0].verifying_key();
        for info in &infos {
            let text = std::fs::read_to_string(
                cache_dir
                    .path()
                    .join(format!("{}.narinfo", info.path.hash_part())),
            )
            .unwrap();
            let ni = NarInfo::parse(&text, sd).unwrap();
            assert_eq!(
                (ni.nar_hash, ni.nar_size, &ni.references),
                (info.nar_hash, info.nar_size, &info.references)
            );
            assert_eq!(ni.compression, kind.nix_name());
            assert_eq!(ni.valid_signatures(sd, std::slice::from_ref(&pk)), 1);
            let file = std::fs::read(cache_dir.path().join(&ni.url)).unwrap();
            assert_eq!(
                (Sha256::digest(&file), file.len() as u64),
                (ni.file_hash.unwrap(), ni.file_size.unwrap())
            );
            let nar = decompress(kind, &file);
            assert_eq!(
                Sha256::digest(&nar),
                info.nar_hash,
                "{kind:?} {}",
                info.path
            );
        }
        std::fs::remove_dir_all(cache_dir.path()).unwrap();
    }
}

#[test]
fn output_is_deterministic_across_thread_counts() {
    let store = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(store.path(), &[("big", 3_000_000, &[])]);
    let mut urls = vec![];
    for jobs in [1, 2, 4] {
        let cache = crate::cache::null::NullCache::new();
        let dir = tempfile::tempdir().unwrap();
        let file = FileCache::open(dir.path(), "file:///t").unwrap();
        let mut o = opts(Compression::Zstd, 256 << 10, 4 << 20);
        o.jobs = jobs;
        assert_eq!(Capacities::new(&o, 1).unwrap().compress_jobs, jobs);
        upload(&cache, sd, &infos, &o, &NoProgress).unwrap();
        upload(&file, sd, &infos, &o, &NoProgress).unwrap();
        let text = std::fs::read_to_string(
            dir.path()
                .join(format!("{}.narinfo", infos[0].path.hash_part())),
        )
        .unwrap();
        urls.push(NarInfo::parse(&text, sd).unwrap().url);
    }
    assert!(urls.windows(2).all(|w| w[0] == w[1]), "{urls:?}");
}

#[test]
fn a_corrupt_path_and_its_referrers_are_not_published() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let mut infos = make_store(
        store.path(),
        &[
            ("ok", 100, &[]),
            ("bad", 200_000, &[0]),
            ("user", 100, &[1]),
            ("other", 100, &[0]),
        ],
    );
    infos[1].nar_hash = Sha256([0; 32]);
    let cache = FileCache::open(cache_dir.path(), "file:///t").unwrap();
    let report = upload(
        &cache,
        sd,
        &infos,
        &opts(Compression::Zstd, 64 << 10, 256 << 10),
        &NoProgress,
    )
    .unwrap();
    let failed: Vec<&str> = report
        .failed()
        .map(|r| r.path.rsplit('-').next().unwrap())
        .collect();
    assert_eq!(failed.len(), 2, "{:?}", report.results);
    assert!(failed.contains(&"bad") && failed.contains(&"user"));
    let why = |n: &str| match &report
        .results
        .iter()
        .find(|r| r.path.ends_with(n))
        .unwrap()
        .outcome
    {
        Outcome::Failed(w) => w.to_string(),
        o => panic!("{o:?}"),
    };
    assert!(why("-bad").contains("is corrupt"), "{}", why("-bad"));
    // The failures carry what went wrong, not only a message.
    let failure = |n: &str| match &report
        .results
        .iter()
        .find(|r| r.path.ends_with(n))
        .unwrap()
        .outcome
    {
        Outcome::Failed(w) => w.clone(),
        o => panic!("{o:?}"),
    };
    let bad_path = infos[1].path.to_absolute(sd);
    assert_eq!(
        failure("-bad"),
        Failure::Corrupt {
            path: bad_path.clone(),
            expected_hash: Sha256([0; 32]),
            expected_size: infos[1].nar_size,
            actual_hash: make_store(
                tempfile::tempdir().unwrap().path(),
                &[("ok", 100, &[]), ("bad", 200_000, &[0])]
            )[1]
            .nar_hash,
            actual_size: infos[1].nar_size,
        }
    );
    assert_eq!(
        (failure("-bad").kind(), failure("-bad").retry()),
        (FailureKind::Corrupt, Retry::Permanent)
    );
    assert_eq!(
        failure("-user"),
        Failure::ReferenceFailed {
            reference: bad_path,
            retry: Retry::Permanent
        }
    );
    assert_eq!(failure("-user").kind(), FailureKind::Reference);
    assert!(
        why("-user").contains("its reference") && why("-user").contains("-bad failed"),
        "{}",
        why("-user")
    );
    for (i, published) in [(0, true), (1, false), (2, false), (3, true)] {
        let p = cache_dir
            .path()
            .join(format!("{}.narinfo", infos[i].path.hash_part()));
        assert_eq!(p.exists(), published, "{}", infos[i].path);
    }
    // The corrupt NAR's upload was aborted: only the three good NARs exist, no temp files.
    let nars: Vec<String> = std::fs::read_dir(cache_dir.path().join("nar"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(nars.len(), 3, "{nars:?}");
    assert!(nars.iter().all(|n| n.ends_with(".nar.zst")));
}

#[test]
fn a_path_that_vanished_fails_with_its_name() {
    let store = tempfile::tempdir().unwrap();
    let cache = crate::cache::null::NullCache::new();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(store.path(), &[("gone", 10, &[])]);
    std::fs::remove_dir_all(store.path().join(infos[0].path.base_name())).unwrap();
    let report = upload(
        &cache,
        sd,
        &infos,
        &opts(Compression::Zstd, 64 << 10, 256 << 10),
        &NoProgress,
    )
    .unwrap();
    match &report.results[0].outcome {
        Outcome::Failed(why) => {
            assert!(why.to_string().contains(infos[0].path.base_name()), "{why}")
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(cache.narinfos(), 0);
}

/// A directory cache that claims to want concurrent commits, to run the finisher threads;
/// with `.1` set, it refuses every NAR byte written to it (as S3 does a part upload when
/// access is denied).
#[derive(Debug)]
struct Concurrent(FileCache, bool, std::sync::atomic::AtomicUsize);

/// An upload whose every write fails with a permanent cache error.
struct Refused;

impl std::io::Write for Refused {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other(crate::cache::CacheError::Remote {
            cache: "test://refusing".into(),
            key: "nar".into(),
            message: "access denied".into(),
            transient: false,
        }))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl crate::cache::NarUpload for Refused {
    fn written(&mut self) {}
    fn commit(self: Box<Self>, _: &str) -> Result<(), crate::cache::CacheError> {
        unreachable!("a refused upload is never committed")
    }
}

impl BinaryCache for Concurrent {
    forward_to!(
        0;
        url, ensure_cache_info, has_narinfo, has_object, object_size, get_narinfo, get_text,
        put_narinfo,
    );
    fn begin_nar(
        &self,
        nar_size: u64,
    ) -> Result<Box<dyn crate::cache::NarUpload>, crate::cache::CacheError> {
        if self.1 {
            return Ok(Box::new(Refused));
        }
        self.0.begin_nar(nar_size)
    }
    fn put_narinfos(&self, n: &[(StorePath, String)]) -> Result<(), crate::cache::CacheError> {
        self.0.put_narinfos(n)
    }
    fn publish_narinfos(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
    ) -> Result<Vec<crate::cache::Published>, crate::cache::CacheError> {
        self.0.publish_narinfos(store_dir, narinfos)
    }
    fn sync(&self) -> Result<(), crate::cache::CacheError> {
        self.2.fetch_add(1, Ordering::SeqCst);
        self.0.sync()
    }
    fn upload_concurrency(&self) -> usize {
        4
    }
}

#[test]
fn concurrent_commits_publish_every_path_in_closure_order() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    // A chain and a fan: each path refers to the previous one and to the first.
    let names: Vec<String> = (0..40).map(|i| format!("p{i}")).collect();
    let refs: Vec<Vec<usize>> = (0..40)
        .map(|i| if i == 0 { vec![] } else { vec![0, i - 1] })
        .collect();
    let specs: Vec<(&str, usize, &[usize])> = names
        .iter()
        .zip(&refs)
        .enumerate()
        .map(|(i, (n, r))| (n.as_str(), 100 + i * 5000, r.as_slice()))
        .collect();
    let infos = make_store(store.path(), &specs);
    let cache = Concurrent(
        FileCache::open(cache_dir.path(), "file:///t").unwrap(),
        false,
        Default::default(),
    );
    let report = upload(
        &cache,
        sd,
        &infos,
        &opts(Compression::Zstd, 64 << 10, 256 << 10),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(
        report.count(|o| matches!(o, Outcome::Uploaded { .. })),
        40,
        "{:?}",
        report.failed().collect::<Vec<_>>()
    );
    // Results are reported as narinfos are published: every path after its references.
    let position: HashMap<String, usize> = report
        .results
        .iter()
        .enumerate()
        .map(|(i, r)| (r.path.clone(), i))
        .collect();
    for info in &infos {
        let me = position[&info.path.to_absolute(sd)];
        for r in info.references.iter().filter(|r| **r != info.path) {
            assert!(
                position[&r.to_absolute(sd)] < me,
                "{} published before its reference {r}",
                info.path
            );
        }
    }
}

/// Cancels the push at the first NAR bytes the sink writes, and counts what it saw.
struct CancelOnFirstBytes {
    cancel: Cancel,
    bytes: std::sync::atomic::AtomicU64,
}

impl Progress for CancelOnFirstBytes {
    fn nar_bytes(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
        self.cancel.cancel();
    }
}

#[test]
fn a_cancelled_push_stops_mid_nar_and_publishes_nothing_more() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(store.path(), &[("big", 16 << 20, &[]), ("after", 10, &[0])]);
    let cache = FileCache::open(cache_dir.path(), "file:///t").unwrap();
    let o = opts(Compression::Zstd, 64 << 10, 256 << 10);
    let progress = CancelOnFirstBytes {
        cancel: o.cancel.clone(),
        bytes: Default::default(),
    };
    let report = upload(&cache, sd, &infos, &o, &progress).unwrap();
    assert_eq!(report.results.len(), 2, "{:?}", report.results);
    for r in &report.results {
        match &r.outcome {
            Outcome::Failed(f) => assert!(f.is_transient(), "{}: {f}", r.path),
            other => panic!("{}: {other:?}", r.path),
        }
    }
    // The budget (256 KiB) bounds how far the walker got past the cancel: far from 16 MiB.
    let written = progress.bytes.load(Ordering::SeqCst);
    assert!(
        written < 4 << 20,
        "{written} NAR bytes written after the cancel"
    );
    // The aborted upload left nothing: no narinfo, no temporary file. (The small path's
    // NAR may have been committed before the cancel: a complete NAR that no narinfo names.)
    let left: Vec<_> = walkdir(cache_dir.path())
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".narinfo") || name.starts_with(crate::cache::file::TEMP_PREFIX)
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The narinfo text of `path` in a file:// cache at `dir`.
fn narinfo_in(dir: &Path, path: &StorePath) -> Option<String> {
    std::fs::read_to_string(dir.join(format!("{}.narinfo", path.hash_part()))).ok()
}

#[test]
fn a_refused_path_fails_every_referrer_and_nothing_of_them_goes_up() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    // r <- m <- q <- top; `other` refers to r only. The run has m, q, top and other; r is
    // not in the cache, so m is refused, and q and top with it; other too.
    let all = make_store(
        store.path(),
        &[
            ("r", 100, &[]),
            ("m", 100, &[0]),
            ("q", 100, &[1]),
            ("top", 100, &[2]),
            ("free", 100, &[]),
        ],
    );
    let run: Vec<PathInfo> = all[1..].to_vec();
    let cache = FileCache::open(cache_dir.path(), "file:///t").unwrap();
    let o = opts(Compression::Zstd, 64 << 10, 256 << 10);
    let report = upload_after(
        &cache,
        sd,
        &run,
        &HashSet::new(),
        super::publish::Look::default(),
        &o,
        &NoProgress,
    )
    .unwrap();
    let outcome = |name: &str| {
        report
            .results
            .iter()
            .find(|r| r.path.ends_with(&format!("-{name}")))
            .map(|r| r.outcome.clone())
            .unwrap()
    };
    match outcome("m") {
        Outcome::Failed(f) => assert!(f.to_string().contains("-r is not in the cache"), "{f}"),
        other => panic!("{other:?}"),
    }
    for (name, cause) in [("q", "-m failed"), ("top", "-q failed")] {
        match outcome(name) {
            Outcome::Failed(f) => assert!(f.to_string().contains(cause), "{name}: {f}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    assert!(matches!(outcome("free"), Outcome::Uploaded { .. }));
    for info in &run[..3] {
        assert_eq!(
            narinfo_in(cache_dir.path(), &info.path),
            None,
            "{}",
            info.path
        );
    }
    // Nothing of the refused paths was even uploaded: one NAR, the free path's.
    assert_eq!(
        std::fs::read_dir(cache_dir.path().join("nar"))
            .unwrap()
            .count(),
        1
    );

    // Once r is seen in the cache, the same run publishes everything.
    let seen: HashSet<StorePath> = [all[0].path.clone()].into();
    let report = upload_after(
        &cache,
        sd,
        &run,
        &seen,
        super::publish::Look::default(),
        &o,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(report.failed().count(), 0, "{:?}", report.results);
}

#[test]
fn a_truncated_nar_and_an_empty_narinfo_under_final_names_are_replaced() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(store.path(), &[("a", 300_000, &[]), ("b", 100, &[0])]);
    let cache = FileCache::open(cache_dir.path(), "file:///t").unwrap();
    let o = opts(Compression::Zstd, 64 << 10, 256 << 10);
    upload(&cache, sd, &infos, &o, &NoProgress).unwrap();
    let a = NarInfo::parse(&narinfo_in(cache_dir.path(), &infos[0].path).unwrap(), sd).unwrap();
    // What a crash between rename and writeback leaves: a short NAR, an empty narinfo.
    let nar = cache_dir.path().join(&a.url);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&nar)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let b_key = cache_dir
        .path()
        .join(format!("{}.narinfo", infos[1].path.hash_part()));
    std::fs::write(&b_key, "").unwrap();
    // Neither is taken for present...
    assert!(
        !cache.has_narinfo(&infos[0].path).unwrap(),
        "short NAR trusted"
    );
    assert!(
        !cache.has_narinfo(&infos[1].path).unwrap(),
        "empty narinfo trusted"
    );
    // ...and uploading again replaces both.
    let report = upload(&cache, sd, &infos, &o, &NoProgress).unwrap();
    assert_eq!(report.failed().count(), 0, "{:?}", report.results);
    let file = std::fs::read(&nar).unwrap();
    assert_eq!(
        (Sha256::digest(&file), file.len() as u64),
        (a.file_hash.unwrap(), a.file_size.unwrap())
    );
    let b = NarInfo::parse(&std::fs::read_to_string(&b_key).unwrap(), sd).unwrap();
    assert_eq!(b.store_path, infos[1].path);
    assert!(
        cache.has_narinfo(&infos[0].path).unwrap() && cache.has_narinfo(&infos[1].path).unwrap()
    );
    // No temporary file is left behind.
    let left: Vec<_> = walkdir(cache_dir.path())
        .into_iter()
        .filter(|p| {
            p.to_string_lossy()
                .contains(crate::cache::file::TEMP_PREFIX)
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_second_key_adds_its_signature_and_keeps_the_first() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(store.path(), &[("a", 1000, &[]), ("b", 100, &[0])]);
    let cache = FileCache::open(cache_dir.path(), "file:///t").unwrap();
    let first = opts(Compression::Zstd, 64 << 10, 256 << 10);
    let mut second = opts(Compression::Xz, 64 << 10, 256 << 10);
    second.keys = vec![crate::format::signing::SigningKey::from_seed(
        "test-2", [9; 32],
    )];
    upload(&cache, sd, &infos, &first, &NoProgress).unwrap();
    let before =
        NarInfo::parse(&narinfo_in(cache_dir.path(), &infos[0].path).unwrap(), sd).unwrap();
    // A second writer uploads the same paths (another compression: another NAR file).
    let report = upload(&cache, sd, &infos, &second, &NoProgress).unwrap();
    assert_eq!(report.failed().count(), 0, "{:?}", report.results);
    let keys = [
        first.keys[0].verifying_key(),
        second.keys[0].verifying_key(),
    ];
    for info in &infos {
        let n = NarInfo::parse(&narinfo_in(cache_dir.path(), &info.path).unwrap(), sd).unwrap();
        for k in &keys {
            assert_eq!(
                n.valid_signatures(sd, std::slice::from_ref(k)),
                1,
                "{}: {k:?}",
                info.path
            );
        }
    }
    // The narinfo there was kept (its NAR intact), only signed again.
    let after = NarInfo::parse(&narinfo_in(cache_dir.path(), &infos[0].path).unwrap(), sd).unwrap();
    assert_eq!(after.url, before.url);
    // A third upload with the first key changes nothing: it is signed already.
    let report = upload(&cache, sd, &infos, &first, &NoProgress).unwrap();
    assert_eq!(report.count(|o| matches!(o, Outcome::AlreadyPresent)), 2);
}

#[test]
fn a_narinfo_for_another_nar_is_kept_while_its_nar_is_intact() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(store.path(), &[("a", 1000, &[])]);
    let cache = FileCache::open(cache_dir.path(), "file:///t").unwrap();
    let o = opts(Compression::Zstd, 64 << 10, 256 << 10);
    // Another builder's NAR of the same path: other bytes, another NarHash.
    let mut theirs = NarInfo {
        store_path: infos[0].path.clone(),
        url: "nar/theirs.nar".into(),
        compression: "none".into(),
        file_hash: Some(Sha256::digest(b"their nar")),
        file_size: Some(9),
        nar_hash: Sha256::digest(b"their nar"),
        nar_size: 9,
        references: vec![],
        deriver: None,
        sigs: vec![],
        ca: None,
    };
    let other = crate::format::signing::SigningKey::from_seed("other-1", [3; 32]);
    theirs.sign(&other, sd);
    let key = cache_dir
        .path()
        .join(format!("{}.narinfo", infos[0].path.hash_part()));
    std::fs::write(cache_dir.path().join("nar/theirs.nar"), b"their nar").unwrap();
    std::fs::write(&key, theirs.render(sd)).unwrap();
    let report = upload(&cache, sd, &infos, &o, &NoProgress).unwrap();
    assert_eq!(
        report.count(|o| matches!(o, Outcome::AlreadyPresent)),
        1,
        "{:?}",
        report.results
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), theirs.render(sd));
    // Its NAR gone, ours replaces it.
    std::fs::remove_file(cache_dir.path().join("nar/theirs.nar")).unwrap();
    let report = upload(&cache, sd, &infos, &o, &NoProgress).unwrap();
    assert_eq!(report.count(|o| matches!(o, Outcome::Uploaded { .. })), 1);
    let n = NarInfo::parse(&std::fs::read_to_string(&key).unwrap(), sd).unwrap();
    assert_eq!(
        (n.nar_hash, n.nar_size),
        (infos[0].nar_hash, infos[0].nar_size)
    );
    assert_eq!(n.valid_signatures(sd, &[o.keys[0].verifying_key()]), 1);
}

#[test]
fn a_cancelled_push_compresses_nothing_more() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(store.path(), &[("big", 24 << 20, &[])]);
    let cache = FileCache::open(cache_dir.path(), "file:///t").unwrap();
    // xz on one thread, and a budget that lets the walker queue 16 MiB of chunks ahead of
    // the compressor: those must not be compressed once the push is cancelled.
    let mut o = opts(Compression::Xz, 64 << 10, 16 << 20);
    o.jobs = 1;
    let progress = CancelOnFirstBytes {
        cancel: o.cancel.clone(),
        bytes: Default::default(),
    };
    let report = upload(&cache, sd, &infos, &o, &progress).unwrap();
    assert!(matches!(&report.results[0].outcome, Outcome::Failed(f) if f.is_transient()));
    let compress = report.stages.iter().find(|s| s.name == "compress").unwrap();
    assert!(
        compress.bytes_out < 1 << 20,
        "{} compressed bytes after the cancel",
        compress.bytes_out
    );
}

#[test]
fn a_path_the_cache_refuses_is_not_read_any_further() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(store.path(), &[("big", 32 << 20, &[])]);
    let cache = Concurrent(
        FileCache::open(cache_dir.path(), "file:///t").unwrap(),
        true,
        Default::default(),
    );
    let o = opts(Compression::Zstd, 64 << 10, 512 << 10);
    let report = upload(&cache, sd, &infos, &o, &NoProgress).unwrap();
    match &report.results[..] {
        [r] => match &r.outcome {
            Outcome::Failed(f) => {
                assert_eq!(
                    (f.kind(), f.retry()),
                    (FailureKind::Cache, Retry::Permanent)
                );
                assert!(f.to_string().contains("access denied"), "{f}");
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    // The first chunk failed: the walker, hasher and compressors stop on that job instead
    // of reading, hashing and compressing the other 31 MiB of it.
    for stage in ["hash", "compress"] {
        let s = report.stages.iter().find(|s| s.name == stage).unwrap();
        assert!(
            s.bytes_in < 4 << 20,
            "{stage}: {} NAR bytes after the job failed",
            s.bytes_in
        );
    }
}

#[test]
fn the_budget_is_split_between_cache_chunks_and_compressors() {
    let mut o = opts(Compression::Zstd, 4 << 20, 0);
    o.memory = 128 << 20;
    o.jobs = 2;
    let c = Capacities::new(&o, 32).unwrap();
    let out = (4 << 20) + (4 << 20) / 128 + 1024;
    assert_eq!(o.cache_options(Default::default()).upload_memory, 64 << 20);
    assert_eq!(c.chunk_memory, (64 << 20) - 2 * out);
    assert_eq!((c.compress_jobs, c.finishers), (2, 32));
    // Everything the run may hold of NAR data adds up to the budget.
    assert!(
        crate::memory::Budget::cache_share(o.memory)
            + c.chunk_memory
            + c.compress_jobs as u64 * out
            <= o.memory
    );
    // A small budget runs fewer compressors rather than holding more than it was given.
    o.memory = 32 << 20;
    o.jobs = 16;
    let c = Capacities::new(&o, 1).unwrap();
    assert_eq!(c.compress_jobs, 1);
    assert_eq!(c.chunk_memory, (16 << 20) - out);
    // Too small for one chunk and its compression output beside the cache's half.
    o.memory = 12 << 20;
    let e = Capacities::new(&o, 1).unwrap_err().to_string();
    assert!(e.starts_with("12.0 MiB is too small: at least 17M"), "{e}");
}

#[test]
fn the_last_wave_makes_the_nars_durable_without_another_sync() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(store.path(), &[("a", 300_000, &[]), ("b", 100, &[0])]);
    let cache = Concurrent(
        FileCache::open(cache_dir.path(), "file:///t").unwrap(),
        false,
        Default::default(),
    );
    let o = opts(Compression::Zstd, 64 << 10, 256 << 10);
    let report = upload(&cache, sd, &infos, &o, &NoProgress).unwrap();
    assert_eq!(report.failed().count(), 0, "{:?}", report.results);
    // Each sync waits on the disk: the narinfos' own wave made every NAR durable.
    assert_eq!(
        cache.2.load(Ordering::SeqCst),
        0,
        "syncs after the last wave"
    );
    let files = walkdir(cache_dir.path());
    let temps: Vec<_> = files
        .iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(crate::cache::file::TEMP_PREFIX)
        })
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
    let nars = files
        .iter()
        .filter(|p| p.to_string_lossy().contains("/nar/"))
        .count();
    assert_eq!(nars, 2, "{files:?}");
}

/// A local directory whose large NAR uploads wait at their commit until the gate opens
/// (on a finisher thread of their own: the cache says it commits 4 at once). Each large
/// upload checks that the sink said it was all written before handing it to a finisher,
/// as S3's upload memory needs, and that no byte came after.
#[derive(Debug)]
struct Gated(FileCache, Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

struct GatedUpload(
    Box<dyn crate::cache::NarUpload>,
    Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    /// `written` was called.
    bool,
);

impl std::io::Write for GatedUpload {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        assert!(
            !self.2,
            "a write after the upload was said to be all written"
        );
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl crate::cache::NarUpload for GatedUpload {
    fn written(&mut self) {
        self.2 = true;
        self.0.written();
    }
    fn commit(self: Box<Self>, key: &str) -> Result<(), crate::cache::CacheError> {
        assert!(self.2, "committed before the sink said it was all written");
        let (open, cv) = &*self.1;
        let mut o = open.lock().unwrap();
        while !*o {
            o = cv.wait(o).unwrap();
        }
        drop(o);
        self.0.commit(key)
    }
}

impl BinaryCache for Gated {
    forward_to!(
        0;
        url, ensure_cache_info, has_narinfo, has_object, object_size, get_narinfo, get_text,
        put_narinfo, sync,
    );
    fn upload_concurrency(&self) -> usize {
        4
    }
    fn begin_nar(
        &self,
        nar_size: u64,
    ) -> Result<Box<dyn crate::cache::NarUpload>, crate::cache::CacheError> {
        let u = self.0.begin_nar(nar_size)?;
        if nar_size < 1 << 20 {
            return Ok(u);
        }
        Ok(Box::new(GatedUpload(u, self.1.clone(), false)))
    }
    fn put_narinfos(&self, n: &[(StorePath, String)]) -> Result<(), crate::cache::CacheError> {
        self.0.put_narinfos(n)
    }
}

#[test]
fn a_path_submitted_behind_a_large_one_is_published_while_the_large_one_uploads() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(
        store.path(),
        &[("large", 4 << 20, &[]), ("lib", 10, &[]), ("app", 20, &[1])],
    );
    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let cache = Gated(
        FileCache::open(cache_dir.path(), "file:///t").unwrap(),
        gate.clone(),
    );
    let o = opts(Compression::Zstd, 64 << 10, 1 << 20);
    let job = |i: usize, waits: &[usize]| NewJob {
        waits_for: waits.iter().map(|&j| infos[j].path.clone()).collect(),
        ..NewJob::waiting_for(infos[i].clone(), Default::default(), |_| false)
    };
    let ((), _) = stream(
        &cache,
        sd,
        &o,
        &NoProgress,
        OnPublishError::FailPaths,
        |feeder, settled| {
            feeder.submit(vec![job(0, &[])]);
            // Submitted after the large path, as one closure, while its upload is stuck.
            feeder.submit(vec![job(1, &[]), job(2, &[1])]);
            let mut order = Vec::new();
            for _ in 0..2 {
                let s = settled
                    .recv_timeout(Duration::from_secs(60))
                    .expect("the small paths wait behind the large one");
                assert!(
                    matches!(s.result.outcome, Outcome::Uploaded { .. }),
                    "{s:?}"
                );
                assert!(narinfo_in(cache_dir.path(), &s.path).is_some());
                order.push(s.path);
            }
            // Closure order: the reference before its referrer.
            assert_eq!(order, [infos[1].path.clone(), infos[2].path.clone()]);
            assert!(narinfo_in(cache_dir.path(), &infos[0].path).is_none());
            *gate.0.lock().unwrap() = true;
            gate.1.notify_all();
            let s = settled.recv_timeout(Duration::from_secs(60)).unwrap();
            assert_eq!(s.path, infos[0].path);
            assert!(
                matches!(s.result.outcome, Outcome::Uploaded { .. }),
                "{s:?}"
            );
            // Everything settled: the publisher remembers nothing of it.
            assert_eq!(feeder.unsettled(), 0);
            assert_eq!(feeder.remembered(), (0, 0, 0));
            // The same paths again: one job each (merged as present), as long as unsettled.
            assert_eq!(
                feeder.submit(vec![job(1, &[]), job(1, &[]), job(2, &[1])]),
                2
            );
            for _ in 0..2 {
                let s = settled.recv_timeout(Duration::from_secs(60)).unwrap();
                assert!(!matches!(s.result.outcome, Outcome::Failed(_)), "{s:?}");
            }
            assert_eq!(feeder.remembered(), (0, 0, 0));
        },
    )
    .unwrap();
}

/// A directory cache that records what each NAR upload was begun with.
#[derive(Debug)]
struct Resumable(
    FileCache,
    std::sync::Mutex<Vec<Option<crate::cache::resume::NarIdentity>>>,
);

impl BinaryCache for Resumable {
    forward_to!(
        0;
        url, ensure_cache_info, has_narinfo, has_object, object_size, get_narinfo, get_text,
        put_narinfo, sync,
    );
    fn begin_nar(
        &self,
        nar_size: u64,
    ) -> Result<Box<dyn crate::cache::NarUpload>, crate::cache::CacheError> {
        self.1.lock().unwrap().push(None);
        self.0.begin_nar(nar_size)
    }
    fn begin_nar_resumable(
        &self,
        nar_size: u64,
        identity: &crate::cache::resume::NarIdentity,
    ) -> Result<Box<dyn crate::cache::NarUpload>, crate::cache::CacheError> {
        self.1.lock().unwrap().push(Some(identity.clone()));
        self.0.begin_nar(nar_size)
    }
}

/// Every NAR is begun as a resumable upload named by its store path, its NarHash as the
/// narinfo writes it, and the settings that decide its compressed bytes.
#[test]
fn every_nar_is_begun_resumable_with_its_path_nar_hash_and_compression_settings() {
    let store = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(store.path(), &[("a", 300_000, &[]), ("b", 10, &[0])]);
    for (kind, chunk, want) in [
        (Compression::Zstd, 64 << 10, "zstd-3/chunk=65536"),
        (Compression::Xz, 128 << 10, "xz-6/chunk=131072"),
    ] {
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = Resumable(
            FileCache::open(cache_dir.path(), "file:///t").unwrap(),
            Default::default(),
        );
        let o = opts(kind, chunk, 4 << 20);
        let report = upload(&cache, sd, &infos, &o, &NoProgress).unwrap();
        assert_eq!(report.count(|o| matches!(o, Outcome::Uploaded { .. })), 2);
        let mut begun: Vec<_> = cache
            .1
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|i| i.expect("begun resumable"))
            .collect();
        begun.sort_by(|a, b| a.store_path.cmp(&b.store_path));
        let mut want_ids: Vec<_> = infos
            .iter()
            .map(|i| crate::cache::resume::NarIdentity {
                store_path: i.path.to_absolute(sd),
                nar_hash: NarInfo::parse(&narinfo_in(cache_dir.path(), &i.path).unwrap(), sd)
                    .unwrap()
                    .nar_hash
                    .to_string(),
                compression: want.to_owned(),
            })
            .collect();
        want_ids.sort_by(|a, b| a.store_path.cmp(&b.store_path));
        assert_eq!(begun, want_ids);
        assert!(begun[0].nar_hash.starts_with("sha256:"), "{begun:?}");
    }
}

/// A local directory that says it publishes narinfos concurrently, and holds the wave
/// with `held`'s narinfo until the gate opens, telling `entered` once that wave is in.
#[derive(Debug)]
struct HeldWave {
    inner: FileCache,
    held: StorePath,
    entered: crossbeam_channel::Sender<()>,
    gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl BinaryCache for HeldWave {
    forward_to!(
        inner;
        url, ensure_cache_info, has_narinfo, has_object, object_size, get_narinfo, get_text,
        begin_nar, put_narinfo, sync,
    );
    fn upload_concurrency(&self) -> usize {
        4
    }
    fn publish_narinfos_by(
        &self,
        store_dir: &str,
        narinfos: Vec<crate::format::narinfo::NarInfo>,
        _deadline: std::time::Instant,
    ) -> Result<Vec<crate::cache::Published>, crate::cache::CacheError> {
        if narinfos.iter().any(|n| n.store_path == self.held) {
            let _ = self.entered.send(());
            let (open, cv) = &*self.gate;
            let o = open.lock().unwrap();
            // Bounded, so that a publisher that waits for this wave fails the test
            // instead of hanging it.
            drop(
                cv.wait_timeout_while(o, Duration::from_secs(60), |o| !*o)
                    .unwrap(),
            );
        }
        self.inner.publish_narinfos(store_dir, narinfos)
    }
}

/// On a cache that publishes concurrently, a wave in flight holds up only its own
/// narinfos: a closure submitted meanwhile is published, reference first, while it waits.
#[test]
fn a_wave_in_flight_holds_up_only_its_own_narinfos() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(
        store.path(),
        &[("held", 10, &[]), ("lib", 10, &[]), ("app", 20, &[1])],
    );
    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let (entered_tx, entered) = crossbeam_channel::bounded(4);
    let cache = HeldWave {
        inner: FileCache::open(cache_dir.path(), "file:///t").unwrap(),
        held: infos[0].path.clone(),
        entered: entered_tx,
        gate: gate.clone(),
    };
    let o = opts(Compression::Zstd, 64 << 10, 1 << 20);
    let job = |i: usize, waits: &[usize]| NewJob {
        waits_for: waits.iter().map(|&j| infos[j].path.clone()).collect(),
        ..NewJob::waiting_for(infos[i].clone(), Default::default(), |_| false)
    };
    let ((), _) = stream(
        &cache,
        sd,
        &o,
        &NoProgress,
        OnPublishError::FailPaths,
        |feeder, settled| {
            feeder.submit(vec![job(0, &[])]);
            entered
                .recv_timeout(Duration::from_secs(60))
                .expect("the held path's wave starts");
            feeder.submit(vec![job(1, &[]), job(2, &[1])]);
            let mut order = Vec::new();
            for _ in 0..2 {
                let s = settled
                    .recv_timeout(Duration::from_secs(30))
                    .expect("the closure waits behind the held wave");
                assert!(
                    matches!(s.result.outcome, Outcome::Uploaded { .. }),
                    "{s:?}"
                );
                order.push(s.path);
            }
            assert_eq!(order, [infos[1].path.clone(), infos[2].path.clone()]);
            assert!(narinfo_in(cache_dir.path(), &infos[0].path).is_none());
            *gate.0.lock().unwrap() = true;
            gate.1.notify_all();
            let s = settled.recv_timeout(Duration::from_secs(60)).unwrap();
            assert_eq!(s.path, infos[0].path);
            assert!(
                matches!(s.result.outcome, Outcome::Uploaded { .. }),
                "{s:?}"
            );
        },
    )
    .unwrap();
}

/// A local directory that says it publishes narinfos concurrently and reads for the
/// merge before a wave waits for its references (as S3 does). It tells each narinfo read
/// and written, and holds the write of `held`'s narinfo until the gate opens, then writes
/// it, or (with `fail`) refuses it.
#[derive(Debug)]
struct HeldWrite {
    inner: FileCache,
    held: StorePath,
    fail: bool,
    events: crossbeam_channel::Sender<(&'static str, StorePath)>,
    gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl BinaryCache for HeldWrite {
    forward_to!(
        inner;
        url, ensure_cache_info, has_narinfo, has_object, object_size, get_text, begin_nar, sync,
    );
    fn upload_concurrency(&self) -> usize {
        4
    }
    fn get_narinfo(&self, path: &StorePath) -> Result<Option<String>, crate::cache::CacheError> {
        let _ = self.events.send(("read", path.clone()));
        self.inner.get_narinfo(path)
    }
    fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), crate::cache::CacheError> {
        if *path == self.held {
            let (open, cv) = &*self.gate;
            let o = open.lock().unwrap();
            // Bounded, so that a publisher that waits for this write fails the test
            // instead of hanging it.
            drop(
                cv.wait_timeout_while(o, Duration::from_secs(60), |o| !*o)
                    .unwrap(),
            );
            if self.fail {
                return Err(crate::cache::CacheError::Remote {
                    cache: self.url().to_owned(),
                    key: crate::cache::narinfo_key(path),
                    message: "refused".into(),
                    transient: true,
                });
            }
        }
        self.inner
            .put_narinfos(&[(path.clone(), text.to_owned())])?;
        let _ = self.events.send(("written", path.clone()));
        Ok(())
    }
    fn publish_narinfos_after(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
        _deadline: std::time::Instant,
        gate: &dyn crate::cache::WaveGate,
    ) -> Result<Option<Vec<crate::cache::Published>>, crate::cache::CacheError> {
        crate::cache::publish_merged_after(self, store_dir, narinfos, Some(gate), |writes| {
            Ok(writes
                .iter()
                .map(|n| self.put_narinfo(&n.store_path, &n.render(store_dir)))
                .collect())
        })
    }
}

/// Pushes `lib` and `app` (which refers to `lib`) to a [`HeldWrite`] that holds `lib`'s
/// narinfo write: `app`'s merge read is sent while that write is unanswered. Returns the
/// events up to that read, and how each path settled, once the gate opened.
fn push_behind_a_held_write(fail: bool) -> (Vec<(&'static str, StorePath)>, Vec<Settled>) {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let infos = make_store(store.path(), &[("lib", 10, &[]), ("app", 20, &[0])]);
    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    // Every read and write of the run: a few each.
    let (events_tx, events) = crossbeam_channel::bounded(64);
    let cache = HeldWrite {
        inner: FileCache::open(cache_dir.path(), "file:///t").unwrap(),
        held: infos[0].path.clone(),
        fail,
        events: events_tx,
        gate: gate.clone(),
    };
    let o = opts(Compression::Zstd, 64 << 10, 1 << 20);
    let job = |i: usize, waits: &[usize]| NewJob {
        waits_for: waits.iter().map(|&j| infos[j].path.clone()).collect(),
        ..NewJob::waiting_for(infos[i].clone(), Default::default(), |_| false)
    };
    let ((seen, settled), _) = stream(
        &cache,
        sd,
        &o,
        &NoProgress,
        OnPublishError::FailPaths,
        |feeder, settled| {
            feeder.submit(vec![job(0, &[]), job(1, &[0])]);
            let mut seen = Vec::new();
            while !seen.contains(&("read", infos[1].path.clone())) {
                let e = events
                    .recv_timeout(Duration::from_secs(60))
                    .expect("app's merge read is sent while lib's write is held");
                seen.push(e);
            }
            *gate.0.lock().unwrap() = true;
            gate.1.notify_all();
            let settled: Vec<Settled> = (0..2)
                .map(|_| settled.recv_timeout(Duration::from_secs(60)).unwrap())
                .collect();
            (seen, settled)
        },
    )
    .unwrap();
    let app_there = narinfo_in(cache_dir.path(), &infos[1].path).is_some();
    assert_eq!(app_there, !fail, "app's narinfo in the cache: {settled:?}");
    assert_eq!(settled[0].path, infos[0].path, "lib settles first");
    (seen, settled)
}

/// A wave's merge read goes as soon as its reference's write is sent, not answered, and
/// it writes once that write has landed.
#[test]
fn a_merge_read_is_sent_before_the_reference_write_is_answered() {
    let (seen, settled) = push_behind_a_held_write(false);
    assert!(
        !seen.iter().any(|(what, _)| *what == "written"),
        "nothing written before the gate opened: {seen:?}"
    );
    for s in &settled {
        assert!(
            matches!(s.result.outcome, Outcome::Uploaded { .. }),
            "{s:?}"
        );
    }
}

/// A reference whose write fails discards what its referrer read: the referrer is not
/// published, and fails naming the reference.
#[test]
fn a_failed_reference_write_publishes_nothing_that_read_behind_it() {
    let (_, settled) = push_behind_a_held_write(true);
    assert!(
        matches!(settled[0].result.outcome, Outcome::Failed(_)),
        "{settled:?}"
    );
    match &settled[1].result.outcome {
        Outcome::Failed(Failure::ReferenceFailed { reference, .. }) => {
            assert_eq!(*reference, settled[0].result.path)
        }
        other => panic!("app: {other:?}"),
    }
}
