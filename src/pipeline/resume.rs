//! Which recorded unfinished uploads end: a record of the upload journal
//! ([`crate::cache::resume::UploadJournal`]) stays while a later run may resume it, and is
//! ended ([`BinaryCache::abort_recorded`]) once its path is done, dropped, gone from the
//! store, or the record is older than `--resume-max-age`. A path the caller says is still
//! queued keeps its record whatever its age. This module decides and asks the cache to
//! abort; it never writes the journal itself, and it is never called while an upload of
//! this process may be writing a record it could end (callers run it before and after
//! their uploads).
use crate::cache::resume::{RecordedUpload, UploadJournal};
use crate::cache::{BinaryCache, CacheError};
use crate::format::store_path::StorePath;
use crate::store::LocalStore;
use std::collections::HashSet;
use std::time::Duration;

/// What the caller knows of a recorded upload's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// Still to be uploaded (the daemon's queue has it pending): the record stays.
    Queued,
    /// Uploaded, or found in the cache (the daemon's queue says done).
    Done,
    /// Dropped: it left the store before it could be uploaded.
    Dropped,
    /// Nothing said: the store and the cache decide.
    Unknown,
}

/// Why a record was ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EndReason {
    Done,
    Dropped,
    /// The path is no longer valid in the store (garbage-collected).
    Gone,
    /// The cache has the path's narinfo.
    InCache,
    /// Older than `--resume-max-age`.
    TooOld,
}

impl EndReason {
    fn as_str(self) -> &'static str {
        match self {
            EndReason::Done => "its path is done",
            EndReason::Dropped => "its path was dropped",
            EndReason::Gone => "its path is no longer in the store",
            EndReason::InCache => "its path is in the cache",
            EndReason::TooOld => "it is older than --resume-max-age",
        }
    }
}

/// What one pass ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Records ended, by store path, with why.
    pub ended: Vec<(String, EndReason)>,
    /// Records kept for a later run.
    pub kept: usize,
    /// Records whose abort failed (they stay recorded, and are tried again next pass).
    pub failed: usize,
}

/// Why a record ends, or `None` when it stays: a queued path keeps it; a path done or
/// dropped ends it; else it ends when older than `max_age` (by `now_unix`), when its path
/// is not `valid` in the store, or when the cache has its narinfo (`in_cache`).
pub fn decide(
    record: &RecordedUpload,
    state: PathState,
    now_unix: i64,
    max_age: Duration,
    valid: bool,
    in_cache: bool,
) -> Option<EndReason> {
    match state {
        PathState::Queued => return None,
        PathState::Done => return Some(EndReason::Done),
        PathState::Dropped => return Some(EndReason::Dropped),
        PathState::Unknown => {}
    }
    let age = u64::try_from(now_unix.saturating_sub(record.started_unix)).unwrap_or(0);
    if Duration::from_secs(age) > max_age {
        Some(EndReason::TooOld)
    } else if !valid {
        Some(EndReason::Gone)
    } else if in_cache {
        Some(EndReason::InCache)
    } else {
        None
    }
}

/// Ends the records of `cache`'s uploads in `journal` that no run will resume
/// ([`decide`]), the store's validity read from `store`. Each end is logged.
///
/// # Errors
/// [`CacheError`] when the journal cannot be read. A store or cache that cannot be asked
/// keeps the records that depend on its answer (logged); a failed abort is counted in
/// [`Ended::failed`] and logged.
pub fn end_records(
    journal: &dyn UploadJournal,
    cache: &dyn BinaryCache,
    store: &LocalStore,
    max_age: Duration,
    state: &dyn Fn(&str) -> PathState,
) -> Result<Ended, CacheError> {
    end_records_with(
        journal,
        cache,
        store.store_dir(),
        max_age,
        state,
        &|paths| {
            crate::store::lookup::split_valid(store, paths)
                .map(|(valid, _)| valid.into_iter().collect())
                .map_err(|e| CacheError::Config(format!("the store cannot be read: {e}")))
        },
    )
}

/// Which of the paths it is given are valid in the store.
pub type ValidIn<'a> = dyn Fn(&[StorePath]) -> Result<HashSet<StorePath>, CacheError> + 'a;

/// [`end_records`] with the store's answer from `valid` (the valid ones among the paths
/// it is given).
///
/// # Errors
/// As [`end_records`].
pub fn end_records_with(
    journal: &dyn UploadJournal,
    cache: &dyn BinaryCache,
    store_dir: &str,
    max_age: Duration,
    state: &dyn Fn(&str) -> PathState,
    valid: &ValidIn<'_>,
) -> Result<Ended, CacheError> {
    let records = journal.all(cache.url())?;
    if records.is_empty() {
        return Ok(Ended::default());
    }
    let states: Vec<PathState> = records
        .iter()
        .map(|r| state(&r.identity.store_path))
        .collect();
    // The store and the cache are asked only about the paths nobody spoke for.
    let unknown: Vec<StorePath> = records
        .iter()
        .zip(&states)
        .filter(|(_, s)| **s == PathState::Unknown)
        .filter_map(|(r, _)| StorePath::from_absolute_path(&r.identity.store_path, store_dir).ok())
        .collect();
    // Whichever of them cannot be asked now: its records stay (as valid, not in the
    // cache) until a later pass; the others still end.
    let (valid, in_cache): (Option<HashSet<StorePath>>, HashSet<StorePath>) = if unknown.is_empty()
    {
        (Some(HashSet::new()), HashSet::new())
    } else {
        let valid = valid(&unknown)
            .inspect_err(|e| tracing::warn!("recorded uploads: {e}"))
            .ok();
        let in_cache = match cache.has_narinfos(&unknown) {
            Ok(present) => unknown
                .iter()
                .zip(present)
                .filter(|(_, p)| *p)
                .map(|(p, _)| p.clone())
                .collect(),
            Err(e) => {
                tracing::warn!("recorded uploads: {}: {e}", cache.url());
                HashSet::new()
            }
        };
        (valid, in_cache)
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut ended = Ended::default();
    for (record, state) in records.iter().zip(states) {
        let path = StorePath::from_absolute_path(&record.identity.store_path, store_dir).ok();
        // A record naming no path of this store cannot be resumed by any run here.
        let is_valid = match (&path, &valid) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(p), Some(v)) => v.contains(p),
        };
        let present = path.as_ref().is_some_and(|p| in_cache.contains(p));
        let Some(why) = decide(record, state, now, max_age, is_valid, present) else {
            ended.kept += 1;
            continue;
        };
        match cache.abort_recorded(record) {
            Ok(()) => {
                tracing::info!(
                    "{}: ended the recorded upload of {} ({})",
                    cache.url(),
                    record.identity.store_path,
                    why.as_str()
                );
                ended.ended.push((record.identity.store_path.clone(), why));
            }
            Err(e) => {
                tracing::warn!(
                    "{}: cannot end the recorded upload of {} ({}): {e}",
                    cache.url(),
                    record.identity.store_path,
                    why.as_str()
                );
                ended.failed += 1;
            }
        }
    }
    Ok(ended)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cache::resume::{NarIdentity, RecordedPart};

    const STORE: &str = "/nix/store";

    /// A journal in memory (not durable), for tests.
    #[derive(Debug, Default)]
    pub(crate) struct MemoryJournal {
        uploads: std::sync::Mutex<Vec<RecordedUpload>>,
    }

    impl MemoryJournal {
        fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RecordedUpload>> {
            self.uploads.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    impl UploadJournal for MemoryJournal {
        fn find(
            &self,
            cache_url: &str,
            store_path: &str,
        ) -> Result<Option<RecordedUpload>, CacheError> {
            Ok(self
                .lock()
                .iter()
                .find(|u| u.cache_url == cache_url && u.identity.store_path == store_path)
                .cloned())
        }
        fn started(&self, upload: &RecordedUpload) -> Result<(), CacheError> {
            let mut all = self.lock();
            all.retain(|u| {
                !(u.cache_url == upload.cache_url
                    && u.identity.store_path == upload.identity.store_path)
            });
            all.push(upload.clone());
            Ok(())
        }
        fn part_done(
            &self,
            cache_url: &str,
            upload_id: &str,
            part: &RecordedPart,
        ) -> Result<(), CacheError> {
            let mut all = self.lock();
            if let Some(u) = all
                .iter_mut()
                .find(|u| u.cache_url == cache_url && u.upload_id == upload_id)
            {
                u.parts.retain(|p| p.number != part.number);
                u.parts.push(part.clone());
                u.parts.sort_by_key(|p| p.number);
            }
            Ok(())
        }
        fn forget(&self, cache_url: &str, upload_id: &str) -> Result<(), CacheError> {
            self.lock()
                .retain(|u| !(u.cache_url == cache_url && u.upload_id == upload_id));
            Ok(())
        }
        fn all(&self, cache_url: &str) -> Result<Vec<RecordedUpload>, CacheError> {
            Ok(self
                .lock()
                .iter()
                .filter(|u| u.cache_url == cache_url)
                .cloned()
                .collect())
        }
    }

    /// A store path whose hash part starts with the name's first letter.
    pub(crate) fn path(name: &str) -> String {
        format!("{STORE}/{}{}-{name}", &name[..1], "0".repeat(31))
    }

    pub(crate) fn record(path: &str, upload_id: &str, started_unix: i64) -> RecordedUpload {
        RecordedUpload {
            cache_url: "file:///c".into(),
            identity: NarIdentity {
                store_path: path.into(),
                nar_hash: "sha256:0".into(),
                compression: "zstd-3/chunk=4194304".into(),
            },
            key: format!("staging/{upload_id}"),
            upload_id: upload_id.into(),
            part_size: 8 << 20,
            started_unix,
            parts: Vec::new(),
        }
    }

    pub(crate) fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// A cache that has the narinfos `present` names and ends a record by forgetting it
    /// in `journal`, as a cache with a journal does.
    #[derive(Debug)]
    pub(crate) struct Cache<'a> {
        pub(crate) journal: &'a MemoryJournal,
        pub(crate) present: Vec<String>,
    }

    impl BinaryCache for Cache<'_> {
        fn url(&self) -> &str {
            "file:///c"
        }
        fn ensure_cache_info(&self, _: &str) -> Result<(), CacheError> {
            Ok(())
        }
        fn has_narinfo(&self, p: &StorePath) -> Result<bool, CacheError> {
            Ok(self.present.contains(&p.to_absolute(STORE)))
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
        fn begin_nar(&self, _: u64) -> Result<Box<dyn crate::cache::NarUpload>, CacheError> {
            Err(CacheError::Config("not here".into()))
        }
        fn put_narinfo(&self, _: &StorePath, _: &str) -> Result<(), CacheError> {
            Ok(())
        }
        fn sync(&self) -> Result<(), CacheError> {
            Ok(())
        }
        fn abort_recorded(&self, upload: &RecordedUpload) -> Result<(), CacheError> {
            if upload.upload_id == "refused" {
                return Err(CacheError::Config("access denied".into()));
            }
            self.journal.forget(&upload.cache_url, &upload.upload_id)
        }
    }

    #[test]
    fn a_record_ends_once_its_path_is_done_dropped_gone_in_the_cache_or_too_old() {
        let journal = MemoryJournal::default();
        let day = 86_400;
        let [queued_old, done, dropped, gone, cached, old, young, refused] = [
            "queued", "done", "dropped", "gone", "cached", "old", "young", "refused",
        ]
        .map(path);
        for (p, id, age) in [
            (&queued_old, "u1", 30 * day),
            (&done, "u2", 0),
            (&dropped, "u3", 0),
            (&gone, "u4", 0),
            (&cached, "u5", 0),
            (&old, "u6", 8 * day),
            (&young, "u7", 6 * day),
            (&refused, "refused", 0),
        ] {
            journal.started(&record(p, id, now() - age)).unwrap();
        }
        let cache = Cache {
            journal: &journal,
            present: vec![cached.clone(), refused.clone()],
        };
        let state = |p: &str| match p {
            p if p == queued_old => PathState::Queued,
            p if p == done => PathState::Done,
            p if p == dropped => PathState::Dropped,
            _ => PathState::Unknown,
        };
        let valid = |paths: &[StorePath]| {
            Ok(paths
                .iter()
                .filter(|p| p.to_absolute(STORE) != gone)
                .cloned()
                .collect())
        };
        let ended = end_records_with(
            &journal,
            &cache,
            STORE,
            Duration::from_secs(7 * day as u64),
            &state,
            &valid,
        )
        .unwrap();
        let mut why = ended.ended.clone();
        why.sort();
        let mut want = vec![
            (done.clone(), EndReason::Done),
            (dropped.clone(), EndReason::Dropped),
            (gone.clone(), EndReason::Gone),
            (cached.clone(), EndReason::InCache),
            (old.clone(), EndReason::TooOld),
        ];
        want.sort();
        assert_eq!(why, want);
        assert_eq!((ended.kept, ended.failed), (2, 1));
        // What stays: the queued path's (whatever its age), the young one's, and the one
        // whose abort failed (tried again next pass).
        let mut left: Vec<String> = journal
            .all("file:///c")
            .unwrap()
            .into_iter()
            .map(|r| r.identity.store_path)
            .collect();
        left.sort();
        let mut want = vec![queued_old, young, refused];
        want.sort();
        assert_eq!(left, want);
    }

    /// A store that cannot be read keeps the records that need its answer; those the
    /// caller spoke for, or too old, still end.
    #[test]
    fn an_unreadable_store_keeps_what_depends_on_it() {
        let journal = MemoryJournal::default();
        let [done, young, old] = ["done", "young", "old"].map(path);
        journal.started(&record(&done, "u1", now())).unwrap();
        journal.started(&record(&young, "u2", now())).unwrap();
        journal
            .started(&record(&old, "u3", now() - 9 * 86_400))
            .unwrap();
        let cache = Cache {
            journal: &journal,
            present: Vec::new(),
        };
        let state = |p: &str| {
            if p == done {
                PathState::Done
            } else {
                PathState::Unknown
            }
        };
        let unreadable = |_: &[StorePath]| Err(CacheError::Config("no database".into()));
        let ended = end_records_with(
            &journal,
            &cache,
            STORE,
            Duration::from_secs(7 * 86_400),
            &state,
            &unreadable,
        )
        .unwrap();
        let mut why = ended.ended;
        why.sort();
        assert_eq!(why, [(done, EndReason::Done), (old, EndReason::TooOld)]);
        assert_eq!(ended.kept, 1);
    }

    #[test]
    fn a_record_naming_no_path_of_this_store_ends() {
        let r = record("/elsewhere/abc", "u", now());
        assert_eq!(
            decide(
                &r,
                PathState::Unknown,
                now(),
                Duration::from_secs(60),
                false,
                false
            ),
            Some(EndReason::Gone)
        );
        assert_eq!(
            decide(
                &r,
                PathState::Unknown,
                now(),
                Duration::from_secs(60),
                true,
                false
            ),
            None
        );
        assert_eq!(
            decide(
                &r,
                PathState::Queued,
                now() + 3600,
                Duration::from_secs(60),
                false,
                true
            ),
            None
        );
    }
}
