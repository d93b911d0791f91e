//! `--upload-logs`: the build logs of uploaded paths' derivations, read from Nix's log
//! directory and written to the cache as `log/<drv base name>` with Content-Type
//! `text/plain; charset=utf-8`: where Nix's binary-cache stores look for them (`nix log
//! --store URL PATH` reads the path's narinfo for its Deriver, then that object).
//!
//! A log never fails a path: a missing one is normal (the path was substituted, or Nix
//! runs with `keep-build-log = false`) and only counted; one that cannot be read or
//! uploaded is a warning, counted as failed.
use crate::cache::{BinaryCache, CacheError};
use crate::format::store_path::StorePath;
use crate::store::LocalStore;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Nix's log directory (its `NIX_LOG_DIR`); build logs are under `drvs/`.
pub const DEFAULT_LOG_DIR: &str = "/nix/var/log/nix";
/// The Content-Type of a build log, as Nix writes it.
pub const LOG_TYPE: &str = "text/plain; charset=utf-8";
/// The largest log uploaded (after decompression). A log is held whole in memory for its
/// PUT, so this bounds what one costs; a larger one is a warning, not uploaded.
pub const MAX_LOG_SIZE: u64 = 64 << 20;
/// Logs read and uploaded at once at most (fewer when the cache commits with less): enough
/// to hide a remote cache's request latency, few enough that
/// `LOG_THREADS * MAX_LOG_SIZE` stays a modest worst case.
pub const LOG_THREADS: usize = 4;

/// What became of the build logs of a set of paths, counted by derivation (outputs of one
/// derivation share its log).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LogReport {
    /// Logs written to the cache.
    pub uploaded: usize,
    /// Derivations Nix kept no log of.
    pub missing: usize,
    /// Logs that could not be read or uploaded (each logged as a warning).
    pub failed: usize,
}

/// Why one build log did not go up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log file exists but cannot be read or decompressed.
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The log is larger than [`MAX_LOG_SIZE`].
    #[error("{}: the log is larger than {limit} bytes; not uploaded", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    /// The cache refused it.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The store could not say which derivations built the paths.
    #[error("cannot look up the paths' derivers: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Nix's log directory: where build logs of derivations are found.
#[derive(Debug, Clone)]
pub struct LogDir {
    root: PathBuf,
    /// The largest log read ([`MAX_LOG_SIZE`]).
    limit: u64,
}

impl Default for LogDir {
    fn default() -> Self {
        LogDir::new(DEFAULT_LOG_DIR)
    }
}

impl LogDir {
    /// The log directory at `root` (as Nix's `NIX_LOG_DIR`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LogDir {
            root: root.into(),
            limit: MAX_LOG_SIZE,
        }
    }

    /// The same directory, reading logs of at most `limit` bytes.
    pub fn with_limit(self, limit: u64) -> Self {
        LogDir { limit, ..self }
    }

    /// The build log of `drv`, or `None` when Nix kept none. Looked up where Nix 2.8 keeps
    /// them: `drvs/<first two characters of the base name>/<the rest>`, then the older flat
    /// `drvs/<base name>`; each plain or bzip2-compressed (`.bz2`, Nix's default).
    ///
    /// # Errors
    /// [`LogError::Read`] for a log that exists but cannot be read or decompressed (unlike
    /// Nix, which then looks further: a damaged log is worth a warning), and
    /// [`LogError::TooLarge`].
    pub fn read(&self, drv: &StorePath) -> Result<Option<Vec<u8>>, LogError> {
        let base = drv.base_name();
        let drvs = self.root.join("drvs");
        let (head, rest) = base.split_at(2);
        for file in [drvs.join(head).join(rest), drvs.join(base)] {
            if let Some(log) = read_limited(&file, false, self.limit)? {
                return Ok(Some(log));
            }
            let mut bz2 = file.into_os_string();
            bz2.push(".bz2");
            if let Some(log) = read_limited(Path::new(&bz2), true, self.limit)? {
                return Ok(Some(log));
            }
        }
        Ok(None)
    }
}

/// The contents of `path` (bzip2-decompressed when `bzip2`), at most `limit` bytes; `None`
/// when there is no such file.
fn read_limited(path: &Path, bzip2: bool, limit: u64) -> Result<Option<Vec<u8>>, LogError> {
    let read_err = |source| LogError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let reader: Box<dyn Read> = if bzip2 {
        // Nix compresses each log as one bzip2 stream; more than one are read as one.
        Box::new(bzip2::read::MultiBzDecoder::new(io::BufReader::new(file)))
    } else {
        Box::new(file)
    };
    let mut log = Vec::new();
    reader
        .take(limit + 1)
        .read_to_end(&mut log)
        .map_err(read_err)?;
    if log.len() as u64 > limit {
        return Err(LogError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(Some(log))
}

/// The cache key of `drv`'s build log.
pub fn log_key(drv: &StorePath) -> String {
    format!("log/{}", drv.base_name())
}

/// Uploads the build logs of `paths` (paths just uploaded; those without a deriver have
/// none) from Nix's log directory. See [`upload_build_logs_from`].
pub fn upload_build_logs(
    cache: &dyn BinaryCache,
    store: &LocalStore,
    paths: &[StorePath],
) -> LogReport {
    upload_build_logs_from(cache, store, paths, &LogDir::default())
}

/// [`upload_build_logs`] from the log directory `dir`. Never fails: what goes wrong is
/// logged and counted.
pub fn upload_build_logs_from(
    cache: &dyn BinaryCache,
    store: &LocalStore,
    paths: &[StorePath],
    dir: &LogDir,
) -> LogReport {
    match derivers(store, paths) {
        Ok(drvs) => upload_logs_of(cache, &drvs, dir),
        Err(e) => {
            tracing::warn!("build logs of {} paths: {e}", paths.len());
            LogReport {
                failed: paths.len(),
                ..LogReport::default()
            }
        }
    }
}

/// The paths of `results` that were uploaded (not those the cache had): the ones whose
/// logs go up.
pub fn uploaded_paths<'a>(
    results: impl IntoIterator<Item = &'a crate::pipeline::PathResult>,
    store_dir: &str,
) -> Vec<StorePath> {
    results
        .into_iter()
        .filter(|r| matches!(r.outcome, crate::pipeline::Outcome::Uploaded { .. }))
        .filter_map(|r| StorePath::from_absolute_path(&r.path, store_dir).ok())
        .collect()
}

/// The derivations that built `paths`, each once, in the order first seen. A path no
/// longer in the store (collected since its upload) is left out.
///
/// # Errors
/// [`LogError::Store`] when the store cannot be read.
pub fn derivers(store: &LocalStore, paths: &[StorePath]) -> Result<Vec<StorePath>, LogError> {
    let infos = match store.path_infos(paths) {
        Err(crate::store::StoreError::NotValid(_)) => {
            let mut infos = Vec::with_capacity(paths.len());
            for p in paths {
                match store.path_infos(std::slice::from_ref(p)) {
                    Ok(i) => infos.extend(i),
                    Err(crate::store::StoreError::NotValid(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            infos
        }
        r => r?,
    };
    let mut seen = std::collections::HashSet::new();
    Ok(infos
        .into_iter()
        .filter_map(|i| i.deriver)
        .filter(|d| seen.insert(d.clone()))
        .collect())
}

/// Uploads the build logs of derivations `drvs` from `dir` to `cache`, a few at a time.
pub fn upload_logs_of(cache: &dyn BinaryCache, drvs: &[StorePath], dir: &LogDir) -> LogReport {
    let next = AtomicUsize::new(0);
    let report = Mutex::new(LogReport::default());
    let threads = cache
        .upload_concurrency()
        .clamp(1, LOG_THREADS)
        .min(drvs.len());
    let work = || {
        while let Some(drv) = drvs.get(next.fetch_add(1, Ordering::Relaxed)) {
            let outcome = upload_one(cache, drv, dir);
            let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
            match outcome {
                Ok(true) => r.uploaded += 1,
                Ok(false) => r.missing += 1,
                Err(e) => {
                    tracing::warn!("build log of {}: {e}", drv.base_name());
                    r.failed += 1;
                }
            }
        }
    };
    if threads <= 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(work);
            }
        });
    }
    report.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// Uploads one log; false when there is none.
fn upload_one(cache: &dyn BinaryCache, drv: &StorePath, dir: &LogDir) -> Result<bool, LogError> {
    let Some(log) = dir.read(drv)? else {
        return Ok(false);
    };
    cache.put_object(&log_key(drv), &log, LOG_TYPE)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::file::FileCache;
    use std::io::Write;

    fn drv(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-{name}.drv")).unwrap()
    }

    fn bzip2(text: &[u8]) -> Vec<u8> {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        e.write_all(text).unwrap();
        e.finish().unwrap()
    }

    /// Writes `bytes` as `drvs/<rel>` under `root`.
    fn put(root: &Path, rel: &str, bytes: &[u8]) {
        let f = root.join("drvs").join(rel);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, bytes).unwrap();
    }

    #[test]
    fn logs_are_found_plain_or_bzip2_in_either_layout() {
        let root = tempfile::tempdir().unwrap();
        let dir = LogDir::new(root.path());
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-plain.drv",
            b"plain\n",
        );
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-packed.drv.bz2",
            &bzip2(b"packed\n"),
        );
        put(
            root.path(),
            "qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-flat.drv.bz2",
            &bzip2(b"flat\n"),
        );
        assert_eq!(dir.read(&drv("plain")).unwrap().unwrap(), b"plain\n");
        assert_eq!(dir.read(&drv("packed")).unwrap().unwrap(), b"packed\n");
        assert_eq!(dir.read(&drv("flat")).unwrap().unwrap(), b"flat\n");
        assert_eq!(dir.read(&drv("missing")).unwrap(), None);
        // A plain log wins over a compressed one, as in Nix.
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-packed.drv",
            b"new\n",
        );
        assert_eq!(dir.read(&drv("packed")).unwrap().unwrap(), b"new\n");
    }

    #[test]
    fn a_damaged_log_is_an_error_naming_the_file() {
        let root = tempfile::tempdir().unwrap();
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-bad.drv.bz2",
            b"not bzip2",
        );
        let e = LogDir::new(root.path()).read(&drv("bad")).unwrap_err();
        assert!(matches!(e, LogError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("-bad.drv.bz2"), "{e}");
    }

    #[test]
    fn a_log_larger_than_the_limit_is_refused() {
        let root = tempfile::tempdir().unwrap();
        // A small file that decompresses past the limit, and one just at it.
        let big = bzip2(&[b'x'; 100_001]);
        assert!(big.len() < 1_000);
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-big.drv.bz2",
            &big,
        );
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-fits.drv",
            &[b'x'; 100_000],
        );
        let dir = LogDir::new(root.path()).with_limit(100_000);
        let e = dir.read(&drv("big")).unwrap_err();
        assert!(matches!(e, LogError::TooLarge { .. }), "{e:?}");
        assert_eq!(dir.read(&drv("fits")).unwrap().unwrap().len(), 100_000);
    }

    #[test]
    fn uploads_count_uploaded_missing_and_failed_logs() {
        let root = tempfile::tempdir().unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(cache_dir.path(), "file:///c").unwrap();
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-a.drv",
            b"log a\n",
        );
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-b.drv.bz2",
            &bzip2(b"log b\n"),
        );
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-c.drv.bz2",
            b"junk",
        );
        let drvs = ["a", "b", "c", "d"].map(drv);
        let r = upload_logs_of(&cache, &drvs, &LogDir::new(root.path()));
        assert_eq!(
            r,
            LogReport {
                uploaded: 2,
                missing: 1,
                failed: 1
            }
        );
        let log = |n| std::fs::read(cache_dir.path().join(log_key(&drv(n)))).ok();
        assert_eq!(log("a").unwrap(), b"log a\n");
        assert_eq!(log("b").unwrap(), b"log b\n");
        assert_eq!(log("c"), None);
        assert_eq!(log("d"), None);
    }
}
