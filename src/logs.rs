//! `--upload-logs`: the build logs of uploaded paths' derivations, read from Nix's log
//! directory and written to the cache as `log/<drv base name>` with Content-Type
//! `text/plain; charset=utf-8`: where Nix's binary-cache stores look for them (`nix log
//! --store URL PATH` reads the path's narinfo for its Deriver, then that object).
//!
//! A log is streamed, whatever its size: read (and bzip2-decompressed) a
//! [`COPY_BUFFER`] at a time into a [`BinaryCache::begin_object`] upload, never held whole.
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
/// Bytes of a log copied at once from its file (or decoder) to its upload: large enough
/// that a copy costs few calls, small enough to be nothing next to `--memory`.
pub const COPY_BUFFER: usize = 64 << 10;
/// Logs read and uploaded at once at most (fewer when the cache commits with less): enough
/// to hide a remote cache's request latency.
///
/// What each costs is fixed, whatever the log's size: a [`COPY_BUFFER`], and for a
/// compressed log a bzip2 decoder (some 3.5 MiB for the 900 kB blocks Nix writes) and its
/// 8 KiB read buffer: at most some 15 MiB for all of them, part of what the process needs
/// beside `--memory` (`memory::MEMORY_OVERHEAD`). What the cache holds of a log on its way
/// out is inside the budget: a local directory holds nothing (the log goes to a temporary
/// file), and S3 buffers parts in the upload memory it reserves from the cache's half of
/// `--memory`, shared with the NARs of any push running beside the logs (backfill's next
/// windows, the daemon's next batch).
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
}

impl Default for LogDir {
    fn default() -> Self {
        LogDir::new(DEFAULT_LOG_DIR)
    }
}

impl LogDir {
    /// The log directory at `root` (as Nix's `NIX_LOG_DIR`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LogDir { root: root.into() }
    }

    /// The build log of `drv`, opened for reading, or `None` when Nix kept none. Looked up
    /// where Nix 2.8 keeps them: `drvs/<first two characters of the base name>/<the rest>`,
    /// then the older flat `drvs/<base name>`; each plain or bzip2-compressed (`.bz2`,
    /// Nix's default).
    ///
    /// # Errors
    /// [`LogError::Read`] for a log that exists but cannot be opened (unlike Nix, which
    /// then looks further: a damaged log is worth a warning).
    pub fn open(&self, drv: &StorePath) -> Result<Option<BuildLog>, LogError> {
        let base = drv.base_name();
        let drvs = self.root.join("drvs");
        let (head, rest) = base.split_at(2);
        for file in [drvs.join(head).join(rest), drvs.join(base)] {
            if let Some(log) = BuildLog::open(&file, false)? {
                return Ok(Some(log));
            }
            let mut bz2 = file.into_os_string();
            bz2.push(".bz2");
            if let Some(log) = BuildLog::open(Path::new(&bz2), true)? {
                return Ok(Some(log));
            }
        }
        Ok(None)
    }
}

/// A build log being read: its text, decompressed as it is read when Nix compressed it.
pub struct BuildLog {
    path: PathBuf,
    reader: Box<dyn Read + Send>,
    /// The file's size.
    file_size: u64,
}

impl std::fmt::Debug for BuildLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildLog")
            .field("path", &self.path)
            .field("file_size", &self.file_size)
            .finish_non_exhaustive()
    }
}

impl BuildLog {
    /// The log at `path` (bzip2-compressed when `bzip2`); `None` when there is no such file.
    fn open(path: &Path, bzip2: bool) -> Result<Option<BuildLog>, LogError> {
        let read_err = |source| LogError::Read {
            path: path.to_owned(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let file_size = file.metadata().map_err(read_err)?.len();
        let reader: Box<dyn Read + Send> = if bzip2 {
            // Nix compresses each log as one bzip2 stream; more than one are read as one.
            // The decoder reads the file through a buffer of its own.
            Box::new(bzip2::read::MultiBzDecoder::new(file))
        } else {
            Box::new(file)
        };
        Ok(Some(BuildLog {
            path: path.to_owned(),
            reader,
            file_size,
        }))
    }

    /// The file the log is read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the log's size is likely to be: exact for a plain log; for a compressed one,
    /// its compressed size, a low estimate (its real size is known only once it is read).
    pub fn size_hint(&self) -> u64 {
        self.file_size
    }
}

impl Read for BuildLog {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
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
    results: impl IntoIterator<Item = &'a crate::pipeline::outcome::PathResult>,
    store_dir: &str,
) -> Vec<StorePath> {
    results
        .into_iter()
        .filter(|r| {
            matches!(
                r.outcome,
                crate::pipeline::outcome::Outcome::Uploaded { .. }
            )
        })
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

/// Uploads the build logs of derivations `drvs` from `dir` to `cache`, a few at a time
/// ([`LOG_THREADS`]).
pub fn upload_logs_of(cache: &dyn BinaryCache, drvs: &[StorePath], dir: &LogDir) -> LogReport {
    let next = AtomicUsize::new(0);
    let report = Mutex::new(LogReport::default());
    let threads = cache
        .upload_concurrency()
        .clamp(1, LOG_THREADS)
        .min(drvs.len());
    let work = || {
        let mut buf = vec![0; COPY_BUFFER];
        while let Some(drv) = drvs.get(next.fetch_add(1, Ordering::Relaxed)) {
            let outcome = upload_one(cache, drv, dir, &mut buf);
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

/// Uploads one log, streamed through `buf`; false when there is none. On an error the
/// upload is dropped, so nothing appears under the log's key.
fn upload_one(
    cache: &dyn BinaryCache,
    drv: &StorePath,
    dir: &LogDir,
    buf: &mut [u8],
) -> Result<bool, LogError> {
    let Some(mut log) = dir.open(drv)? else {
        return Ok(false);
    };
    let key = log_key(drv);
    let mut up = cache.begin_object(log.size_hint(), LOG_TYPE)?;
    loop {
        let n = match log.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(LogError::Read {
                    path: log.path().to_owned(),
                    source,
                });
            }
        };
        up.write_all(&buf[..n])
            .map_err(|e| upload_error(cache, &key, e))?;
    }
    up.written();
    up.commit(&key)?;
    Ok(true)
}

/// The cache error behind a failed write into an upload of `key`: a remote cache's failed
/// request comes back through `Write` as the [`CacheError`] it is; anything else is I/O.
fn upload_error(cache: &dyn BinaryCache, key: &str, e: io::Error) -> LogError {
    if e.get_ref().is_some_and(|inner| inner.is::<CacheError>()) {
        let inner = e.into_inner().expect("checked above");
        return LogError::Cache(*inner.downcast::<CacheError>().expect("checked above"));
    }
    LogError::Cache(CacheError::Io {
        cache: cache.url().to_owned(),
        key: key.to_owned(),
        source: e,
    })
}

/// For tests: a log of `parts` parts of about 1 MiB, each after a line naming its
/// number: its text, and a bzip2 file of it with one stream per name and per part (the
/// part is compressed once: cheap to make; the names make a part lost, repeated or out of
/// place show).
///
/// # Panics
/// Never in practice: compressing into memory cannot fail.
#[doc(hidden)]
pub fn large_test_log(parts: usize) -> (Vec<u8>, Vec<u8>) {
    use std::io::Write;
    let bzip2 = |text: &[u8]| {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        e.write_all(text).expect("compressing into memory");
        e.finish().expect("compressing into memory")
    };
    let part: Vec<u8> = (0..30_000)
        .flat_map(|i| format!("{i:06} a line of a large build log\n").into_bytes())
        .collect();
    let packed_part = bzip2(&part);
    let (mut text, mut packed) = (Vec::new(), Vec::new());
    for i in 0..parts {
        let name = format!("part {i}\n");
        text.extend_from_slice(name.as_bytes());
        text.extend_from_slice(&part);
        packed.extend(bzip2(name.as_bytes()));
        packed.extend_from_slice(&packed_part);
    }
    (text, packed)
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

    /// The whole text of `drv`'s log in `dir`.
    fn read(dir: &LogDir, drv: &StorePath) -> Option<Vec<u8>> {
        let mut log = dir.open(drv).unwrap()?;
        let mut text = Vec::new();
        log.read_to_end(&mut text).unwrap();
        Some(text)
    }

    /// The names in `dir` and its subdirectories, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names = Vec::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    names.push(p.strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
        names.sort();
        names
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
        assert_eq!(read(&dir, &drv("plain")).unwrap(), b"plain\n");
        assert_eq!(read(&dir, &drv("packed")).unwrap(), b"packed\n");
        assert_eq!(read(&dir, &drv("flat")).unwrap(), b"flat\n");
        assert_eq!(read(&dir, &drv("missing")), None);
        // A plain log wins over a compressed one, as in Nix.
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-packed.drv",
            b"new\n",
        );
        assert_eq!(read(&dir, &drv("packed")).unwrap(), b"new\n");
    }

    #[test]
    fn a_damaged_log_is_an_error_naming_the_file_and_leaves_nothing_in_the_cache() {
        let root = tempfile::tempdir().unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(cache_dir.path(), "file:///c").unwrap();
        // Damaged past its first block: some of it is uploaded before the error.
        let mut bad = bzip2(&vec![b'x'; 2 << 20]);
        bad.extend_from_slice(b"not bzip2");
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-bad.drv.bz2",
            &bad,
        );
        let mut buf = vec![0; COPY_BUFFER];
        let e = upload_one(&cache, &drv("bad"), &LogDir::new(root.path()), &mut buf).unwrap_err();
        assert!(matches!(e, LogError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("-bad.drv.bz2"), "{e}");
        assert_eq!(listing(cache_dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_log_of_any_size_is_streamed_whole_into_the_cache() {
        let root = tempfile::tempdir().unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(cache_dir.path(), "file:///c").unwrap();
        // 80 MiB of text, far more than any buffer on its way, in a file of a few MiB.
        let (text, packed) = large_test_log(80);
        assert!(text.len() > 80 << 20 && packed.len() < text.len() / 8);
        put(
            root.path(),
            "qs/2vcw1sd6lzsvgvq6gggnw1v31qrm28-big.drv.bz2",
            &packed,
        );
        let r = upload_logs_of(&cache, &[drv("big")], &LogDir::new(root.path()));
        assert_eq!(
            r,
            LogReport {
                uploaded: 1,
                missing: 0,
                failed: 0
            }
        );
        let key = log_key(&drv("big"));
        let got = std::fs::read(cache_dir.path().join(&key)).unwrap();
        assert_eq!(got.len(), text.len());
        assert!(got == text, "the log's bytes differ");
        // Named at once, with nothing left beside it.
        assert_eq!(listing(cache_dir.path()), vec![key]);
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
