//! Planning a push: one look at the store (closure, topological order, validity) and one
//! at the cache (what it has, with our signatures added where missing), then the jobs for
//! what is left, each path refused up front whose references cannot be published.
//! The look at the cache waits while a gc of it runs, and gives the jobs its epoch.
use super::PushOptions;
use super::outcome::{Failure, PushError};
use super::publish::{Look, NewJob};
use crate::cache::gc_marker::{Epoch, WAVE_FRESH};
use crate::cache::resume::SignerSet;
use crate::cache::{BinaryCache, FoundNarinfo};
use crate::format::store_path::StorePath;
use crate::store::lookup::split_valid;
use crate::store::{LocalStore, PathInfo};
use std::collections::{HashMap, HashSet};

/// What a push of some paths has to do, from one look at the store and one at the cache.
#[derive(Debug, Default)]
pub struct Plan {
    /// Paths asked for that are not valid in the store (full paths).
    pub not_valid: Vec<String>,
    /// Paths whose narinfo the cache has (now with our signatures), in plan order.
    pub present: Vec<StorePath>,
    /// What to upload, references first.
    pub todo: Vec<PathInfo>,
    /// The paths found in the cache: the references `todo` may name besides its own.
    pub seen: HashSet<StorePath>,
    /// The gc epoch the look at the cache was taken in (its jobs carry it).
    pub epoch: Epoch,
    /// When the last reading of the gc marker in `epoch` was sent.
    pub read_at: Option<std::time::Instant>,
}

impl Plan {
    /// The look the plan's jobs are planned from.
    pub fn look(&self) -> Look {
        Look {
            epoch: self.epoch,
            read_at: self.read_at,
        }
    }
}

/// Plans pushing `paths` (and, with `opts.closure`, everything they reference): their
/// closure in topological order, what the cache has already (adding our signatures where
/// missing; a damaged narinfo is uploaded again), and what is left to upload. The cache's
/// gc marker is read first: while a gc runs, the plan waits ([`super::gc_gate`]).
///
/// # Errors
/// [`PushError`] when the store or the cache cannot be read, or the push was cancelled
/// while it waited for a gc.
pub fn plan(
    store: &LocalStore,
    cache: &dyn BinaryCache,
    paths: &[StorePath],
    opts: &PushOptions,
) -> Result<Plan, PushError> {
    plan_with(store, cache, paths, opts, &super::outcome::NoProgress)
}

/// [`plan`], reporting a wait for a running gc to `progress`.
///
/// # Errors
/// As [`plan`].
pub fn plan_with(
    store: &LocalStore,
    cache: &dyn BinaryCache,
    paths: &[StorePath],
    opts: &PushOptions,
    progress: &dyn super::outcome::Progress,
) -> Result<Plan, PushError> {
    plan_before_writes(store, cache, paths, opts, progress, &mut || Ok(()))
}

/// [`plan_with`] that calls `ready` before it writes anything to the cache (our
/// signatures on narinfos found there), and writes nothing if `ready` fails.
///
/// # Errors
/// As [`plan`], or `ready`'s.
pub fn plan_before_writes(
    store: &LocalStore,
    cache: &dyn BinaryCache,
    paths: &[StorePath],
    opts: &PushOptions,
    progress: &dyn super::outcome::Progress,
    ready: &mut dyn FnMut() -> Result<(), PushError>,
) -> Result<Plan, PushError> {
    let side = store_side(store, paths, opts)?;
    look_before_writes(cache, store.store_dir(), side, opts, progress, ready)
}

/// The store's side of a plan: the paths asked for that are not valid, and the paths to
/// push (with `opts.closure`, the closure of the valid ones) in topological order.
#[derive(Debug)]
pub struct StoreSide {
    pub not_valid: Vec<String>,
    pub infos: Vec<PathInfo>,
}

/// Reads the store's side of a plan of pushing `paths`.
///
/// # Errors
/// [`PushError`] when the store cannot be read.
pub fn store_side(
    store: &LocalStore,
    paths: &[StorePath],
    opts: &PushOptions,
) -> Result<StoreSide, PushError> {
    let (valid, invalid) = split_valid(store, paths)?;
    let infos = if opts.closure {
        store.closure(&valid)?
    } else {
        crate::store::closure::topo_sort(store.path_infos(&valid)?)
    };
    Ok(StoreSide {
        not_valid: invalid.into_iter().map(|(p, _)| p).collect(),
        infos,
    })
}

/// The cache's side of a plan, from the store's: [`plan_before_writes`] once the store
/// has been read.
///
/// # Errors
/// As [`plan_before_writes`].
pub fn look_before_writes(
    cache: &dyn BinaryCache,
    store_dir: &str,
    side: StoreSide,
    opts: &PushOptions,
    progress: &dyn super::outcome::Progress,
    ready: &mut dyn FnMut() -> Result<(), PushError>,
) -> Result<Plan, PushError> {
    let StoreSide { not_valid, infos } = side;
    let store_dir = store_dir.to_owned();
    // One look at the cache for the run's paths and, with --no-closure, the references
    // outside them: what it finds is what the publisher may refer to.
    let in_plan: HashSet<&StorePath> = infos.iter().map(|i| &i.path).collect();
    let mut asked: Vec<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
    let outside: std::collections::BTreeSet<&StorePath> = infos
        .iter()
        .flat_map(|i| i.references.iter())
        .filter(|r| !in_plan.contains(r))
        .collect();
    asked.extend(outside.into_iter().cloned());
    let our_signers = SignerSet::of(
        &opts
            .keys
            .iter()
            .map(|k| k.verifying_key())
            .collect::<Vec<_>>(),
    );
    let mut gate = super::gc_gate::Gate::new(opts.gc_wait);
    // The last reading that let the plan go on: its jobs' publisher may take it as its own.
    let last = std::cell::Cell::new(None::<super::gc_gate::Reading>);
    let mut settle = || -> Result<super::gc_gate::Reading, PushError> {
        let reading = gate
            .settle(cache, &|| opts.cancel.is_cancelled(), progress)?
            .ok_or_else(|| crate::cache::CacheError::Remote {
                cache: cache.url().to_owned(),
                key: crate::cache::gc_marker::MARKER_KEY.to_owned(),
                message: "cancelled while waiting for a running gc".into(),
                transient: true,
            })?;
        last.set(Some(reading));
        Ok(reading)
    };
    let (seen, epoch) = loop {
        let epoch = settle()?.epoch;
        // With keys, every narinfo found is read (for our signatures) as it is found, but
        // for one the cache knows unchanged since this machine wrote it signed by exactly
        // our keys: it has our signatures, and it parsed (`known_signed`).
        let mut known_signed: HashSet<StorePath> = HashSet::new();
        let (mut seen, mut texts): (HashSet<StorePath>, HashMap<StorePath, String>) =
            if opts.keys.is_empty() {
                let seen = asked
                    .iter()
                    .cloned()
                    .zip(cache.has_narinfos(&asked)?)
                    .filter(|(_, p)| *p)
                    .map(|(p, _)| p)
                    .collect();
                (seen, HashMap::new())
            } else {
                let mut texts = HashMap::new();
                let mut unread = Vec::new();
                for (path, found) in asked.iter().zip(cache.find_narinfos(&asked)?) {
                    match found {
                        None => {}
                        Some(FoundNarinfo::Text(t)) => {
                            texts.insert(path.clone(), t);
                        }
                        Some(FoundNarinfo::Unchanged(by)) if by == our_signers => {
                            known_signed.insert(path.clone());
                        }
                        // Written here with other keys: read, as without a record.
                        Some(FoundNarinfo::Unchanged(_)) => unread.push(path.clone()),
                    }
                }
                let read = cache.get_narinfos(&unread)?;
                for (path, t) in unread.into_iter().zip(read) {
                    if let Some(t) = t {
                        texts.insert(path, t);
                    }
                }
                let seen = texts.keys().chain(&known_signed).cloned().collect();
                (seen, texts)
            };
        let present: Vec<(&PathInfo, String)> = infos
            .iter()
            .filter(|i| seen.contains(&i.path) && !known_signed.contains(&i.path))
            .map(|i| (i, texts.remove(&i.path).unwrap_or_default()))
            .collect();
        // The signatures' wave is a publishing wave: it reads the marker again, and a gc
        // that ran since the look means looking again.
        let mut still = || {
            ready()?;
            settle().map(|now| (now.epoch == epoch).then_some(now.at + WAVE_FRESH))
        };
        let Some(damaged) = add_our_signatures(cache, &store_dir, &present, opts, &mut still)?
        else {
            tracing::info!(
                "{}: a gc ran while the push looked at the cache: looking again",
                cache.url()
            );
            continue;
        };
        for p in &damaged {
            seen.remove(p);
        }
        break (seen, epoch);
    };
    let mut plan = Plan {
        not_valid,
        ..Plan::default()
    };
    for info in infos {
        if seen.contains(&info.path) {
            plan.present.push(info.path);
        } else {
            plan.todo.push(info);
        }
    }
    plan.seen = seen;
    plan.epoch = epoch;
    plan.read_at = last.get().filter(|r| r.epoch == epoch).map(|r| r.at);
    Ok(plan)
}

/// The jobs that upload `todo` (references first) given `seen`, the paths found in the
/// cache by `look` (its gc epoch, and when its reading of the marker was sent), and the
/// paths of `todo` refused before any upload (a reference neither in `todo` nor seen, or
/// refused itself), with why, by index into `todo`.
pub fn jobs_for(
    todo: &[PathInfo],
    seen: &HashSet<StorePath>,
    store_dir: &str,
    look: impl Into<Look>,
) -> (Vec<NewJob>, Vec<(usize, Failure)>) {
    let look = look.into();
    let refused = refuse_unreachable(todo, seen, store_dir);
    let mut skip = vec![false; todo.len()];
    for (i, _) in &refused {
        skip[*i] = true;
    }
    let in_run: HashSet<&StorePath> = todo.iter().map(|i| &i.path).collect();
    let jobs = todo
        .iter()
        .zip(&skip)
        .filter(|(_, skip)| !**skip)
        // A reference in the run is waited for; the others are seen (the refusal took
        // out every path with a reference that is neither).
        .map(|(info, _)| NewJob::waiting_for(info.clone(), look, |r| in_run.contains(r)))
        .collect();
    (jobs, refused)
}

/// Gives the narinfos the cache already has for `present` (each with the text the look
/// read) the signatures of our keys they lack (merged under the cache's rule, so the
/// signatures there stay). A narinfo for
/// another NAR of the path is left alone: our keys vouch only for the NAR in our store.
/// Returns the paths whose narinfo turned out damaged (it does not parse, or its NAR is
/// missing or short): they are uploaded again. `still` is asked right before the
/// narinfos are written whether the gc epoch is still the look's, and until when they may
/// be written if so; `None` when it is not (nothing was written).
///
/// # Errors
/// [`PushError::Cache`] when the cache cannot be read or written.
fn add_our_signatures(
    cache: &dyn BinaryCache,
    store_dir: &str,
    present: &[(&PathInfo, String)],
    opts: &PushOptions,
    still: &mut dyn FnMut() -> Result<Option<std::time::Instant>, PushError>,
) -> Result<Option<Vec<StorePath>>, PushError> {
    if opts.keys.is_empty() || present.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let ours: Vec<_> = opts.keys.iter().map(|k| k.verifying_key()).collect();
    let mut damaged = Vec::new();
    let mut resign = Vec::new();
    for (info, text) in present {
        let old = crate::format::narinfo::NarInfo::parse(text, store_dir)
            .ok()
            .filter(|o| o.store_path == info.path);
        let Some(mut old) = old else {
            damaged.push(info.path.clone());
            continue;
        };
        let same_nar = (old.nar_hash, old.nar_size, &old.references)
            == (info.nar_hash, info.nar_size, &info.references);
        if !same_nar {
            continue;
        }
        // Ed25519 signatures are deterministic: one of our keys' over this fingerprint is
        // found by signing it again (a fraction of a verification's work); any other
        // signature with the key's name is verified.
        let fingerprint = old.fingerprint(store_dir);
        let signed = opts.keys.iter().zip(&ours).all(|(key, vk)| {
            old.sigs.contains(&key.sign(&fingerprint))
                || old.valid_signatures(store_dir, std::slice::from_ref(vk)) > 0
        });
        if signed {
            continue;
        }
        if !crate::cache::nar_intact(cache, &old)? {
            damaged.push(info.path.clone());
            continue;
        }
        for key in &opts.keys {
            old.sign(key, store_dir);
        }
        resign.push(old);
    }
    if resign.is_empty() {
        return Ok(Some(damaged));
    }
    let Some(deadline) = still()? else {
        return Ok(None);
    };
    let paths: Vec<StorePath> = resign.iter().map(|n| n.store_path.clone()).collect();
    let mut signed = 0;
    for (path, r) in paths
        .into_iter()
        .zip(cache.publish_narinfos_by(store_dir, resign, deadline)?)
    {
        match r {
            Ok(_) => signed += 1,
            // Its NAR went missing meanwhile: uploaded again, like any damaged one.
            Err(e) => {
                tracing::warn!("{}: {e}", cache.url());
                damaged.push(path);
            }
        }
    }
    if signed > 0 {
        tracing::info!("added our signatures to {signed} narinfos already in the cache");
    }
    Ok(Some(damaged))
}

/// The paths of `infos` that cannot be published, with why: a reference neither in
/// `infos` nor `seen` in the cache, or a reference refused itself (transitively).
fn refuse_unreachable(
    infos: &[PathInfo],
    seen: &HashSet<StorePath>,
    store_dir: &str,
) -> Vec<(usize, Failure)> {
    let index: HashMap<&StorePath, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, p)| (&p.path, i))
        .collect();
    let mut refused: HashMap<usize, Failure> = HashMap::new();
    // Until nothing changes, so the order of `infos` does not matter.
    loop {
        let before = refused.len();
        for (i, info) in infos.iter().enumerate() {
            if refused.contains_key(&i) {
                continue;
            }
            let why = info
                .references
                .iter()
                .filter(|r| **r != info.path)
                .find_map(|r| match index.get(r) {
                    Some(j) => refused.get(j).map(|f| Failure::ReferenceFailed {
                        reference: r.to_absolute(store_dir),
                        retry: f.retry(),
                    }),
                    None if seen.contains(r) => None,
                    None => Some(Failure::ReferenceMissing {
                        reference: r.to_absolute(store_dir),
                    }),
                });
            if let Some(why) = why {
                refused.insert(i, why);
            }
        }
        if refused.len() == before {
            break;
        }
    }
    let mut out: Vec<(usize, Failure)> = refused.into_iter().collect();
    out.sort_by_key(|(i, _)| *i);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheError;
    use crate::cache::file::FileCache;
    use crate::format::compression::{Compression, CompressionSettings};
    use crate::format::narinfo::NarInfo;
    use crate::format::signing::SigningKey;
    use crate::store::db::testdb::{Row, TestDb};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A local directory that answers a look at it as an S3 cache with a record does:
    /// each narinfo there "unchanged since written, signed by `says`", and counts the
    /// narinfos read.
    #[derive(Debug)]
    struct Recorded {
        inner: FileCache,
        says: SignerSet,
        reads: AtomicUsize,
    }

    impl BinaryCache for Recorded {
        fn url(&self) -> &str {
            self.inner.url()
        }
        fn ensure_cache_info(&self, store_dir: &str) -> Result<(), CacheError> {
            self.inner.ensure_cache_info(store_dir)
        }
        fn has_narinfo(&self, path: &StorePath) -> Result<bool, CacheError> {
            self.inner.has_narinfo(path)
        }
        fn find_narinfos(
            &self,
            paths: &[StorePath],
        ) -> Result<Vec<Option<FoundNarinfo>>, CacheError> {
            Ok(self
                .inner
                .has_narinfos(paths)?
                .into_iter()
                .map(|there| there.then_some(FoundNarinfo::Unchanged(self.says)))
                .collect())
        }
        fn has_object(&self, key: &str) -> Result<bool, CacheError> {
            self.inner.has_object(key)
        }
        fn object_size(&self, key: &str) -> Result<Option<u64>, CacheError> {
            self.inner.object_size(key)
        }
        fn get_narinfo(&self, path: &StorePath) -> Result<Option<String>, CacheError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.get_narinfo(path)
        }
        fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
            self.inner.get_text(key)
        }
        fn begin_nar(&self, n: u64) -> Result<Box<dyn crate::cache::NarUpload>, CacheError> {
            self.inner.begin_nar(n)
        }
        fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), CacheError> {
            self.inner.put_narinfo(path, text)
        }
        fn sync(&self) -> Result<(), CacheError> {
            self.inner.sync()
        }
    }

    /// A path found unchanged since it was written by exactly this push's keys is present
    /// without being read; one written with other keys is read, and given our signature as
    /// without a record.
    #[test]
    fn a_narinfo_written_with_these_keys_is_not_read_and_with_others_is() {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        std::fs::create_dir(&store_dir).unwrap();
        let sd = store_dir.to_str().unwrap();
        let db = TestDb::new(true);
        let path = StorePath::from_base_name("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-p").unwrap();
        let full = path.to_absolute(sd);
        std::fs::write(&full, "p").unwrap();
        let (hash, size) = crate::nar_fs::hash_path(std::path::Path::new(&full)).unwrap();
        db.add(&Row {
            path: &full,
            hash: &format!("sha256:{}", hash.to_base16()),
            nar_size: Some(size as i64),
            ..Row::default()
        });
        let store = LocalStore::open(sd, &db.path);
        let info = store
            .path_infos(std::slice::from_ref(&path))
            .unwrap()
            .remove(0);
        let (ours, theirs) = (
            SigningKey::from_seed("ours-1", [1; 32]),
            SigningKey::from_seed("theirs-1", [2; 32]),
        );
        let opts = PushOptions::new(
            CompressionSettings::new(Compression::None, None).unwrap(),
            vec![SigningKey::from_seed("ours-1", [1; 32])],
        );
        for (says, read) in [
            (SignerSet::of([&ours.verifying_key()]), false),
            (SignerSet::of([&theirs.verifying_key()]), true),
        ] {
            let cache_dir = tempfile::tempdir().unwrap();
            let inner = FileCache::open(cache_dir.path(), "file:///t").unwrap();
            inner.ensure_cache_info(sd).unwrap();
            inner.put_object("nar/p.nar", b"p", "").unwrap();
            let mut theirs_narinfo = NarInfo {
                store_path: path.clone(),
                url: "nar/p.nar".into(),
                compression: "none".into(),
                file_hash: None,
                file_size: Some(1),
                nar_hash: info.nar_hash,
                nar_size: info.nar_size,
                references: vec![],
                deriver: None,
                sigs: vec![],
                ca: None,
            };
            theirs_narinfo.sign(&theirs, sd);
            inner
                .put_narinfo(&path, &theirs_narinfo.render(sd))
                .unwrap();
            let cache = Recorded {
                inner,
                says,
                reads: AtomicUsize::new(0),
            };
            let planned = plan(&store, &cache, std::slice::from_ref(&path), &opts).unwrap();
            assert_eq!(planned.present, vec![path.clone()], "read {read}");
            assert!(planned.todo.is_empty(), "read {read}");
            assert_eq!(cache.reads.load(Ordering::SeqCst) > 0, read);
            let now = NarInfo::parse(
                &cache
                    .get_text(&crate::cache::narinfo_key(&path))
                    .unwrap()
                    .unwrap(),
                sd,
            )
            .unwrap();
            let signed_by_us = now.valid_signatures(sd, &[ours.verifying_key()]) == 1;
            assert_eq!(signed_by_us, read, "{now:?}");
        }
    }
}
