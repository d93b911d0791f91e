//! A `file://` binary cache: a directory laid out as Nix expects (`nix-cache-info`,
//! `<hash>.narinfo`, `nar/<FileHash>.nar.*`).
//!
//! Every object is written to a temporary file and renamed into place only once its bytes
//! are durable, so no crash, power loss included, leaves a partial object under its final
//! name. A committed NAR waits under its temporary name for the next wave of narinfos,
//! which syncs its own temporary files and every waiting NAR (one `syncfs` per file
//! system involved, or `fdatasync` file by file when they are few), renames the NARs and
//! fsyncs `nar/`, then renames each narinfo whose NAR is there at its FileSize and fsyncs
//! the cache directory. A narinfo's name is therefore durable only after its NAR's name.
//!
//! Errors never lose what this process still owns nor publish past them: a wave that fails
//! before its sync puts the waiting NARs back; a failed sync (whose data Linux may have
//! dropped) or rename discards only the NARs it covered, and a narinfo whose NAR is not in
//! place is refused, so its path fails transiently and goes up again. Temporary files of
//! this process are never swept, however old.
//!
//! An object already under its final name is checked before it is trusted: a narinfo
//! must parse, name its store path and point to a NAR of its FileSize; a damaged one is
//! treated as absent and replaced. Narinfos are merged under the cache's rule
//! ([`super::merge_narinfo`]) while holding an exclusive lock on [`LOCK_FILE`], so
//! concurrent writers on one directory keep each other's signatures.
//!
//! Every file operation goes through one [`FsHook`] seam, which tests use to fail the k-th
//! operation and to watch the cache's durable state.
use super::{BinaryCache, CacheError, NarUpload, Published};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Write buffer for NAR files: large enough that compressed output reaches the kernel in
/// few syscalls, small enough to be irrelevant next to the compressor's own buffers.
const NAR_WRITE_BUFFER: usize = 256 * 1024;

/// How much of a NAR file gathers in the page cache before its writeback is started.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Longest a writer waits for another's publishing lock. A wave holds it for one
/// `syncfs` and some renames (well under a second even on a slow disk); a minute means
/// the holder is stopped or stuck.
const PUBLISH_LOCK_WAIT: Duration = Duration::from_secs(60);

/// Files (NARs and narinfos) up to which a wave is made durable file by file
/// (`fdatasync` each) rather than with one `syncfs`: a few fsyncs cost less than waiting
/// for all the file system's dirty data, and past this many one sync is cheaper.
const SMALL_WAVE: usize = 16;

/// Prefix of temporary files; Nix ignores them and [`BinaryCache::sweep_orphans`] removes
/// stale ones.
pub const TEMP_PREFIX: &str = ".narflow-tmp-";

/// The lock narinfo writers take (`flock`, exclusive) from reading a wave's existing
/// narinfos until their renames are durable. Nix ignores it.
pub const LOCK_FILE: &str = ".narflow-lock";

/// A file operation of a [`FileCache`], as its [`FsHook`] sees it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsOp<'a> {
    /// Creating a temporary file in this directory.
    Create(&'a Path),
    /// Writing bytes to this file.
    Write(&'a Path),
    /// `fdatasync` of this file.
    SyncData(&'a Path),
    /// `syncfs` of the file system that holds this directory.
    SyncFs(&'a Path),
    /// `fsync` of this directory (its renames).
    SyncDir(&'a Path),
    Rename {
        from: &'a Path,
        to: &'a Path,
    },
    Read(&'a Path),
    Stat(&'a Path),
    /// Reading this directory.
    List(&'a Path),
    Remove(&'a Path),
}

/// A seam around every file operation of a [`FileCache`]: `before` may fail the operation
/// instead of letting it run (fault injection); `after` learns whether it succeeded.
#[doc(hidden)]
pub trait FsHook: Send + Sync + std::fmt::Debug {
    /// # Errors
    /// The error the operation returns instead of running.
    fn before(&self, op: FsOp<'_>) -> io::Result<()>;
    fn after(&self, op: FsOp<'_>, ok: bool);
}

/// The file system as the cache uses it: each operation through the hook, if any.
#[derive(Debug, Clone, Default)]
struct Fs(Option<Arc<dyn FsHook>>);

impl Fs {
    fn run<T>(&self, op: FsOp<'_>, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let Some(hook) = &self.0 else { return f() };
        hook.before(op)?;
        let r = f();
        hook.after(op, r.is_ok());
        r
    }

    fn temp_in(&self, dir: &Path) -> io::Result<tempfile::NamedTempFile> {
        self.run(FsOp::Create(dir), || {
            tempfile::Builder::new()
                .prefix(TEMP_PREFIX)
                .tempfile_in(dir)
        })
    }

    fn sync_data(&self, path: &Path, f: &File) -> io::Result<()> {
        self.run(FsOp::SyncData(path), || f.sync_data())
    }

    /// Makes the renames in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.run(FsOp::SyncDir(dir), || File::open(dir)?.sync_all())
    }

    fn persist(&self, tmp: tempfile::TempPath, to: &Path) -> io::Result<()> {
        let from = tmp.to_path_buf();
        self.run(FsOp::Rename { from: &from, to }, || {
            tmp.persist(to).map_err(|e| e.error)
        })
    }
}

/// The temporary files of this process's uploads: a sweep leaves them, however old (a NAR
/// written for days at `--max-rate`, or committed and waiting for a slow reference).
type Owned = Arc<super::owned::Owned<PathBuf>>;

/// One temporary file owned while this value lives (its file is deleted with it unless
/// taken first).
#[derive(Debug)]
struct OwnedTemp {
    // Fields drop in order: the file is deleted before its name is released.
    path: Option<tempfile::TempPath>,
    at: PathBuf,
    _claim: super::owned::Claim<PathBuf>,
}

impl OwnedTemp {
    fn new(path: tempfile::TempPath, owned: &Owned) -> Self {
        let at = path.to_path_buf();
        OwnedTemp {
            path: Some(path),
            _claim: owned.claim(at.clone()),
            at,
        }
    }
    fn path(&self) -> &Path {
        &self.at
    }
    /// The path, to be renamed: it stays protected from sweeps until this value drops.
    fn take(&mut self) -> tempfile::TempPath {
        self.path.take().expect("a temporary file is taken once")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A committed NAR waiting for the next sync to get its final name.
#[derive(Debug)]
struct PendingNar {
    tmp: OwnedTemp,
    target: PathBuf,
}

#[derive(Debug)]
pub struct FileCache {
    root: PathBuf,
    url: String,
    /// `nar/` is on another file system than the cache directory: a sync covers both.
    nar_elsewhere: bool,
    fs: Fs,
    /// Committed NARs not yet renamed (their temp files are deleted if we never get there).
    pending: Arc<Mutex<Vec<PendingNar>>>,
    /// Held from taking the waiting NARs until the last rename of a wave (or sync) is
    /// durable, so a narinfo is never named while its NAR's rename, made by another
    /// thread, is not.
    naming: Mutex<Unsynced>,
    owned: Owned,
}

/// Directories with renames that are not durable yet (an fsync of them failed): the next
/// wave fsyncs them before it names any narinfo, since a narinfo named there may refer to
/// what they hold.
#[derive(Debug, Default)]
struct Unsynced {
    nar_dir: bool,
    root: bool,
}

/// What a wave is to check before naming a narinfo: its NAR's key and FileSize.
type NarRef<'a> = Option<(&'a str, Option<u64>)>;

impl FileCache {
    /// Opens (creating if needed) the cache directory `root`.
    ///
    /// # Errors
    /// [`CacheError::Io`] when the directory cannot be created.
    pub fn open(root: &Path, url: &str) -> Result<Self, CacheError> {
        Self::open_with_hook(root, url, None)
    }

    /// [`FileCache::open`] with every file operation going through `hook`.
    ///
    /// # Errors
    /// As [`FileCache::open`].
    #[doc(hidden)]
    pub fn open_with_hook(
        root: &Path,
        url: &str,
        hook: Option<Arc<dyn FsHook>>,
    ) -> Result<Self, CacheError> {
        let mut cache = FileCache {
            root: root.to_owned(),
            url: url.to_owned(),
            nar_elsewhere: false,
            fs: Fs(hook),
            pending: Arc::default(),
            naming: Mutex::default(),
            owned: Owned::default(),
        };
        let nar = cache.nar_dir();
        std::fs::create_dir_all(&nar).map_err(|e| cache.io("nar/", e))?;
        let dev = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).map(|m| m.dev())
        };
        cache.nar_elsewhere = dev(root).map_err(|e| cache.io("", e))?
            != dev(&nar).map_err(|e| cache.io("nar/", e))?;
        Ok(cache)
    }

    fn nar_dir(&self) -> PathBuf {
        self.root.join("nar")
    }

    /// Takes the lock that orders the publishing of concurrent writers, waiting at most
    /// `wait`: a writer that holds it longer is stopped or stuck, and waiting for it
    /// forever would wedge this one (a daemon would upload nothing more).
    ///
    /// # Errors
    /// [`CacheError::Io`] with [`io::ErrorKind::TimedOut`] (transient) past `wait`.
    fn lock_publishing(&self, wait: Duration) -> Result<File, CacheError> {
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(LOCK_FILE))
            .map_err(|e| self.io(LOCK_FILE, e))?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            match lock.try_lock() {
                Ok(()) => return Ok(lock),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let why = format!("held by another writer for more than {wait:?}");
                    return Err(self.io(LOCK_FILE, io::Error::new(io::ErrorKind::TimedOut, why)));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(self.io(LOCK_FILE, e)),
            }
        }
    }

    fn io(&self, key: &str, source: io::Error) -> CacheError {
        CacheError::Io {
            cache: self.url.clone(),
            key: key.to_owned(),
            source,
        }
    }

    /// One `syncfs` of each file system the cache's files are on: every byte written
    /// so far is durable.
    fn syncfs(&self) -> Result<(), CacheError> {
        let nar = self.nar_dir();
        let dirs = if self.nar_elsewhere {
            vec![(self.root.as_path(), ""), (nar.as_path(), "nar/")]
        } else {
            vec![(self.root.as_path(), "")]
        };
        for (dir, key) in dirs {
            self.fs
                .run(FsOp::SyncFs(dir), || {
                    rustix::fs::syncfs(&File::open(dir)?).map_err(io::Error::from)
                })
                .map_err(|e| self.io(key, e))?;
        }
        Ok(())
    }

    /// Makes the bytes of `pending` NARs durable: one by one when they are few (with
    /// `extra` other files the caller syncs itself), else with [`FileCache::syncfs`]
    /// (which covers the caller's files too).
    fn sync_pending(&self, pending: &[PendingNar], extra: usize) -> Result<(), CacheError> {
        if pending.len() + extra > SMALL_WAVE {
            return self.syncfs();
        }
        for p in pending {
            let key = p.target.display().to_string();
            File::open(p.tmp.path())
                .and_then(|f| self.fs.sync_data(p.tmp.path(), &f))
                .map_err(|e| self.io(&key, e))?;
        }
        Ok(())
    }

    /// Renames the committed NARs into place and makes the renames durable. Their bytes
    /// must be durable already (the caller has just synced). A NAR that cannot be renamed
    /// is discarded: its narinfo then finds it missing, and its path goes up again.
    ///
    /// # Errors
    /// The first rename's error, once the others are done; or the fsync's of `nar/` (then
    /// no narinfo is named until an fsync of `nar/` succeeds).
    fn rename_pending(
        &self,
        pending: Vec<PendingNar>,
        unsynced: &mut Unsynced,
    ) -> Result<(), CacheError> {
        let mut first = None;
        for mut p in pending {
            let key = p.target.display().to_string();
            match self.fs.persist(p.tmp.take(), &p.target) {
                Ok(()) => unsynced.nar_dir = true,
                Err(e) => {
                    tracing::warn!("{}: {key}: {e}; its path will be uploaded again", self.url);
                    first.get_or_insert(self.io(&key, e));
                }
            }
        }
        self.sync_dirs(unsynced, false)?;
        first.map_or(Ok(()), Err)
    }

    /// Fsyncs `nar/` if it has renames that are not durable, and the cache directory too
    /// if it has or `root` says it is about to be renamed into.
    ///
    /// # Errors
    /// The fsync's; what it did not make durable stays marked.
    fn sync_dirs(&self, unsynced: &mut Unsynced, root: bool) -> Result<(), CacheError> {
        if unsynced.nar_dir {
            self.fs
                .sync_dir(&self.nar_dir())
                .map_err(|e| self.io("nar/", e))?;
            unsynced.nar_dir = false;
        }
        if unsynced.root || root {
            unsynced.root = true;
            self.fs.sync_dir(&self.root).map_err(|e| self.io("", e))?;
            unsynced.root = false;
        }
        Ok(())
    }

    fn take_pending(&self) -> Vec<PendingNar> {
        std::mem::take(&mut *lock(&self.pending))
    }

    /// Puts NARs taken for a wave that failed before syncing them back in the queue: they
    /// are still the jobs' that committed them, and the next wave tries them again.
    fn restore_pending(&self, mut nars: Vec<PendingNar>) {
        let mut pending = lock(&self.pending);
        nars.append(&mut pending);
        *pending = nars;
    }

    /// Writes a wave of narinfos (none depending on another): temp files, one sync (with
    /// every waiting NAR), NAR renames and fsync of `nar/`, then each narinfo whose NAR
    /// (`nar`, when given) is in place at its FileSize is renamed, and the cache directory
    /// fsynced. Returns, in order, whether each narinfo was named.
    ///
    /// # Errors
    /// When no narinfo can be named: the waiting NARs are put back if nothing was synced
    /// yet, and discarded if their sync failed (their data may be lost).
    fn write_wave(
        &self,
        narinfos: &[(&StorePath, &str, NarRef<'_>)],
    ) -> Result<Vec<Result<(), CacheError>>, CacheError> {
        if narinfos.is_empty() {
            return Ok(Vec::new());
        }
        let mut unsynced = lock(&self.naming);
        // Taken before the sync, so every NAR renamed below is covered by it.
        let pending = self.take_pending();
        let one_by_one = pending.len() + narinfos.len() <= SMALL_WAVE;
        let temps = match self.write_temps(narinfos, one_by_one) {
            Ok(t) => t,
            Err(e) => {
                self.restore_pending(pending);
                return Err(e);
            }
        };
        if one_by_one {
            self.sync_pending(&pending, narinfos.len())?;
        } else {
            self.syncfs()?;
        }
        // A NAR that failed to get its name fails its own path below (missing), not the
        // wave: only a failed fsync stops every narinfo (a reference of one may be a
        // narinfo named by an earlier wave whose fsync failed).
        let _ = self.rename_pending(pending, &mut unsynced);
        self.sync_dirs(&mut unsynced, false)?;
        let mut out = Vec::with_capacity(narinfos.len());
        for ((_, _, nar), (key, tmp)) in narinfos.iter().zip(temps) {
            let missing = match nar {
                Some((url, size)) => match self.object_size(url) {
                    Ok(there) if there.is_some() && (size.is_none() || there == *size) => None,
                    Ok(_) => Some(CacheError::NarLost {
                        cache: self.url.clone(),
                        narinfo: key.clone(),
                        nar: (*url).to_owned(),
                    }),
                    Err(e) => Some(e),
                },
                None => None,
            };
            out.push(match missing {
                Some(e) => Err(e),
                None => self
                    .fs
                    .persist(tmp, &self.root.join(&key))
                    .map_err(|e| self.io(&key, e)),
            });
        }
        self.sync_dirs(&mut unsynced, true)?;
        Ok(out)
    }

    /// The temporary files of a wave's narinfos, each synced when `one_by_one`.
    fn write_temps(
        &self,
        narinfos: &[(&StorePath, &str, NarRef<'_>)],
        one_by_one: bool,
    ) -> Result<Vec<(String, tempfile::TempPath)>, CacheError> {
        let mut temps = Vec::with_capacity(narinfos.len());
        for (path, text, _) in narinfos {
            let key = super::narinfo_key(path);
            let mut tmp = self.fs.temp_in(&self.root).map_err(|e| self.io(&key, e))?;
            let at = tmp.path().to_owned();
            self.fs
                .run(FsOp::Write(&at), || tmp.write_all(text.as_bytes()))
                .map_err(|e| self.io(&key, e))?;
            set_readable(tmp.as_file()).map_err(|e| self.io(&key, e))?;
            if one_by_one {
                self.fs
                    .sync_data(&at, tmp.as_file())
                    .map_err(|e| self.io(&key, e))?;
            }
            // Closed now: a wave may hold hundreds.
            temps.push((key, tmp.into_temp_path()));
        }
        Ok(temps)
    }

    /// Why the narinfo text at `key` cannot be trusted for `path`, if it cannot.
    fn narinfo_damage(&self, path: &StorePath, text: &str) -> Result<Option<String>, CacheError> {
        // The cache's StoreDir is the one the narinfo names (ensure_cache_info checked it
        // against the store's); what matters here is that it parses and names `path`.
        let Some(store_dir) = text
            .lines()
            .find_map(|l| l.strip_prefix("StorePath: "))
            .and_then(|p| p.rsplit_once('/'))
            .map(|(dir, _)| dir)
        else {
            return Ok(Some("no StorePath".into()));
        };
        let n = match NarInfo::parse(text, store_dir) {
            Ok(n) => n,
            Err(e) => return Ok(Some(e.to_string())),
        };
        if n.store_path != *path {
            return Ok(Some(format!("it names {}", n.store_path)));
        }
        if !super::nar_intact(self, &n)? {
            return Ok(Some(format!(
                "its NAR {} is missing or not {} bytes",
                n.url,
                n.file_size.unwrap_or_default()
            )));
        }
        Ok(None)
    }
}

/// Temp files are created 0600; cache objects are meant to be served, so make them 0644.
fn set_readable(f: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
}

/// An object of a local cache being read: its errors name the object.
struct ObjectReader {
    file: std::fs::File,
    key: String,
    url: String,
}

impl io::Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut self.file, buf)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {}: {e}", self.url, self.key)))
    }
}

impl BinaryCache for FileCache {
    fn url(&self) -> &str {
        &self.url
    }

    fn ensure_cache_info(&self, store_dir: &str) -> Result<(), CacheError> {
        let key = "nix-cache-info";
        let at = self.root.join(key);
        let existing = match self
            .fs
            .run(FsOp::Read(&at), || std::fs::read_to_string(&at))
        {
            Ok(text) => Some(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.io(key, e)),
        };
        match super::cache_info_to_write(&self.url, existing.as_deref(), store_dir)? {
            Some(text) => self.put_object(key, text.as_bytes(), "text/x-nix-cache-info"),
            None => Ok(()),
        }
    }

    fn has_narinfo(&self, path: &StorePath) -> Result<bool, CacheError> {
        let key = super::narinfo_key(path);
        let Some(text) = self.get_narinfo(path)? else {
            return Ok(false);
        };
        match self.narinfo_damage(path, &text)? {
            None => Ok(true),
            Some(why) => {
                tracing::warn!(
                    "{}: {key} is damaged ({why}); it will be replaced",
                    self.url
                );
                Ok(false)
            }
        }
    }

    fn has_object(&self, key: &str) -> Result<bool, CacheError> {
        Ok(self.object_size(key)?.is_some())
    }

    fn object_size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        let at = self.root.join(key);
        match self
            .fs
            .run(FsOp::Stat(&at), || std::fs::symlink_metadata(&at))
        {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(key, e)),
        }
    }

    fn get_narinfo(&self, path: &StorePath) -> Result<Option<String>, CacheError> {
        let key = super::narinfo_key(path);
        let at = self.root.join(&key);
        match self.fs.run(FsOp::Read(&at), || std::fs::read(&at)) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&key, e)),
        }
    }

    fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
        let at = self.root.join(key);
        match self.fs.run(FsOp::Read(&at), || std::fs::read(&at)) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(key, e)),
        }
    }

    fn read_object(&self, key: &str) -> Result<Option<Box<dyn io::Read + Send>>, CacheError> {
        // A key names an object inside the cache, never a file beside it.
        if key.starts_with('/') || key.split('/').any(|c| c == "..") {
            return Ok(None);
        }
        match std::fs::File::open(self.root.join(key)) {
            Ok(f) => Ok(Some(Box::new(ObjectReader {
                file: f,
                key: key.to_owned(),
                url: self.url.clone(),
            }))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(key, e)),
        }
    }

    fn begin_nar(&self, _nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError> {
        let tmp = self
            .fs
            .temp_in(&self.nar_dir())
            .map_err(|e| self.io("nar/", e))?;
        let (file, path) = tmp.into_parts();
        let tmp = OwnedTemp::new(path, &self.owned);
        let out = HookedFile {
            file,
            path: tmp.path().to_owned(),
            fs: self.fs.clone(),
        };
        Ok(Box::new(FileNarUpload {
            out: BufWriter::with_capacity(NAR_WRITE_BUFFER, out),
            written: 0,
            writeback: Writeback::default(),
            tmp,
            root: self.root.clone(),
            url: self.url.clone(),
            pending: self.pending.clone(),
        }))
    }

    fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), CacheError> {
        self.put_narinfos(&[(path.clone(), text.to_owned())])
    }

    /// Temp files → one sync → NAR renames, fsync `nar/` → narinfo renames, fsync the
    /// cache directory.
    fn put_narinfos(&self, narinfos: &[(StorePath, String)]) -> Result<(), CacheError> {
        let wave: Vec<_> = narinfos
            .iter()
            .map(|(p, text)| (p, text.as_str(), None))
            .collect();
        self.write_wave(&wave)?.into_iter().collect()
    }

    fn publish_narinfos(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
    ) -> Result<Vec<Published>, CacheError> {
        if narinfos.is_empty() {
            return Ok(Vec::new());
        }
        // Unlocked when `_lock` is closed, after the renames are durable.
        let _lock = self.lock_publishing(PUBLISH_LOCK_WAIT)?;
        super::publish_merged_with(self, store_dir, narinfos, |writes| {
            let texts: Vec<String> = writes.iter().map(|n| n.render(store_dir)).collect();
            let wave: Vec<_> = writes
                .iter()
                .zip(&texts)
                .map(|(n, text)| (&n.store_path, text.as_str(), Some((&*n.url, n.file_size))))
                .collect();
            self.write_wave(&wave)
        })
    }

    /// An object written whole: [`BinaryCache::begin_object`]'s upload in one piece.
    fn put_object(&self, key: &str, bytes: &[u8], content_type: &str) -> Result<(), CacheError> {
        let mut up = self.begin_object(bytes.len() as u64, content_type)?;
        up.write_all(bytes).map_err(|e| self.io(key, e))?;
        up.written();
        up.commit(key)
    }

    /// Syncs and renames the waiting NARs. On a failed sync they are discarded (Linux may
    /// have dropped their data): their narinfos then find them missing.
    fn sync(&self) -> Result<(), CacheError> {
        let mut unsynced = lock(&self.naming);
        let pending = self.take_pending();
        self.sync_pending(&pending, 0)?;
        self.rename_pending(pending, &mut unsynced)?;
        self.sync_dirs(&mut unsynced, false)
    }

    /// One read of the cache's directory: every `<hash part>.narinfo` (a name that is not
    /// a nix32 hash part, or a temporary file, is not a narinfo). The narinfos are not
    /// opened: unlike [`BinaryCache::has_narinfo`] this does not look for damage.
    fn list_narinfos(&self) -> Result<Option<super::NarinfoSet>, CacheError> {
        let mut set = Vec::new();
        let entries = self
            .fs
            .run(FsOp::List(&self.root), || std::fs::read_dir(&self.root))
            .map_err(|e| self.io("", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| self.io("", e))?;
            let name = entry.file_name();
            if let Some(key) = super::narinfo_hash(name.as_encoded_bytes()) {
                set.push(key);
            }
        }
        Ok(Some(set.into_iter().collect()))
    }

    /// One read each of the cache's directory, `nar/` and `log/` (a missing `nar/` or
    /// `log/` is empty). Subdirectories are not objects; names that are not UTF-8 are
    /// passed on lossily converted.
    fn list_objects(
        &self,
        visit: &mut dyn FnMut(super::ObjectInfo<'_>),
    ) -> Result<bool, CacheError> {
        let mut key = String::new();
        for (dir, prefix) in [
            (self.root.clone(), ""),
            (self.nar_dir(), "nar/"),
            (self.root.join("log"), "log/"),
        ] {
            let entries = match self.fs.run(FsOp::List(&dir), || std::fs::read_dir(&dir)) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound && !prefix.is_empty() => continue,
                Err(e) => return Err(self.io(prefix, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.io(prefix, e))?;
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Renamed or removed by a writer since the directory was read.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(self.io(prefix, e)),
                };
                if !meta.is_file() {
                    continue;
                }
                key.clear();
                key.push_str(prefix);
                key.push_str(&entry.file_name().to_string_lossy());
                visit(super::ObjectInfo {
                    key: &key,
                    size: meta.len(),
                    modified: meta.modified().ok(),
                });
            }
        }
        Ok(true)
    }

    /// Stale temporary files (older than `grace`) that no upload of this process owns.
    fn sweep_orphans(&self, grace: Duration) -> Result<u64, CacheError> {
        let mut removed = 0;
        for (dir, key) in [(self.root.clone(), ""), (self.nar_dir(), "nar/")] {
            let entries = match self.fs.run(FsOp::List(&dir), || std::fs::read_dir(&dir)) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(key, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.io(key, e))?;
                if !entry
                    .file_name()
                    .as_encoded_bytes()
                    .starts_with(TEMP_PREFIX.as_bytes())
                    || self.owned.contains(&entry.path())
                {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                // An upload still running elsewhere keeps touching its file: only stale
                // ones go.
                let age = meta.modified().ok().and_then(|m| m.elapsed().ok());
                if !meta.is_file() || age.is_none_or(|a| a < grace) {
                    continue;
                }
                let at = entry.path();
                match self.fs.run(FsOp::Remove(&at), || std::fs::remove_file(&at)) {
                    Ok(()) => removed += 1,
                    // Another sweeper or its own upload got there first.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        let name = entry.file_name();
                        return Err(self.io(&format!("{key}{}", name.to_string_lossy()), e));
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Removes each file, then fsyncs every directory a file was removed from, so that
    /// the next call's removals cannot outlive these in a crash (a narinfo's removal is
    /// durable before its NAR's is made). A key that leaves the cache directory (an
    /// absolute path, `..`) is refused.
    fn delete_objects(&self, keys: &[String]) -> Result<Vec<(String, CacheError)>, CacheError> {
        let mut failed = Vec::new();
        let mut dirs: Vec<(PathBuf, String)> = Vec::new();
        for key in keys {
            let inside = Path::new(key)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !inside || key.is_empty() {
                let e = CacheError::Config(format!("{}: {key:?} is not an object key", self.url));
                failed.push((key.clone(), e));
                continue;
            }
            let at = self.root.join(key);
            match self.fs.run(FsOp::Remove(&at), || std::fs::remove_file(&at)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    failed.push((key.clone(), self.io(key, e)));
                    continue;
                }
            }
            let dir = at.parent().unwrap_or(&self.root).to_owned();
            if !dirs.iter().any(|(d, _)| *d == dir) {
                dirs.push((dir, key.clone()));
            }
        }
        for (dir, key) in dirs {
            // Whether the removals in `dir` survive a crash is unknown: the caller must
            // not go on to what they protect.
            self.fs.sync_dir(&dir).map_err(|e| {
                let at = key.rsplit_once('/').map_or("", |(d, _)| d);
                self.io(&format!("{at}/ (the removal of {key} and others)"), e)
            })?;
        }
        Ok(failed)
    }

    /// A temporary file in the cache directory (where [`BinaryCache::sweep_orphans`] looks
    /// for what a killed upload left, and leaves this one), renamed into place by the
    /// commit.
    fn begin_object(
        &self,
        _size_hint: u64,
        _content_type: &str,
    ) -> Result<Box<dyn NarUpload>, CacheError> {
        let tmp = self.fs.temp_in(&self.root).map_err(|e| self.io("", e))?;
        let (file, path) = tmp.into_parts();
        let tmp = OwnedTemp::new(path, &self.owned);
        Ok(Box::new(FileObjectUpload {
            out: HookedFile {
                file,
                path: tmp.path().to_owned(),
                fs: self.fs.clone(),
            },
            written: 0,
            writeback: Writeback::default(),
            tmp,
            root: self.root.clone(),
            url: self.url.clone(),
        }))
    }
}

/// A NAR's (or another object's) temporary file, each write through the cache's [`FsHook`].
struct HookedFile {
    file: File,
    path: PathBuf,
    fs: Fs,
}

impl Write for HookedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = &mut self.file;
        self.fs.run(FsOp::Write(&self.path), || file.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A NAR being written to a temporary file, deleted unless committed.
struct FileNarUpload {
    out: BufWriter<HookedFile>,
    /// Bytes accepted so far.
    written: u64,
    writeback: Writeback,
    tmp: OwnedTemp,
    root: PathBuf,
    url: String,
    pending: Arc<Mutex<Vec<PendingNar>>>,
}

impl FileNarUpload {
    fn start_writeback(&mut self) {
        let in_kernel = self.written - self.out.buffer().len() as u64;
        self.writeback.advance(&self.out.get_ref().file, in_kernel);
    }
}

/// The bounded writeback of a file being written (a NAR's or another object's).
#[derive(Debug, Default)]
struct Writeback {
    /// Where the range not yet handed to writeback starts.
    from: u64,
    /// The range last handed to writeback, not yet waited for.
    writing: Option<(u64, u64)>,
}

impl Writeback {
    /// Once [`WRITEBACK_STEP`] bytes of `file` have gathered in the kernel (`in_kernel`:
    /// the bytes handed to it so far), starts their writeback and waits for the step
    /// before them to be on disk, so at most two steps are ever dirty or being written (a
    /// step is one write when a chunk's output is larger: `BufWriter` passes large writes
    /// straight through). On ext4 an `fdatasync` of a small file commits the journal,
    /// which first writes the data of every file in the transaction: with this bound, a
    /// small path published beside a large NAR finds little to wait for, and so does the
    /// large NAR's own final sync. Only hints: an error changes nothing but timing.
    fn advance(&mut self, file: &File, in_kernel: u64) {
        if in_kernel - self.from < WRITEBACK_STEP {
            return;
        }
        let (from, len) = (self.from, in_kernel - self.from);
        writeback(file, from, len, false);
        if let Some((before, before_len)) = self.writing.replace((from, len)) {
            writeback(file, before, before_len, true);
            // Written: its clean pages are dropped (the file is not read back).
            let _ = rustix::fs::fadvise(
                file,
                before,
                std::num::NonZeroU64::new(before_len),
                rustix::fs::Advice::DontNeed,
            );
        }
        self.from = in_kernel;
    }
}

/// Starts writeback of `len` bytes of `file` from `from`; with `wait`, waits until they
/// are written.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // the one foreign call: neither rustix nor nix has sync_file_range
fn writeback(file: &File, from: u64, len: u64, wait: bool) {
    use std::os::fd::AsRawFd;
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    if let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) {
        // SAFETY: `file` is borrowed, so its descriptor stays open for the call, which
        // reads and writes no memory of this process.
        let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), from, len, flags) };
    }
}

/// Elsewhere, DONTNEED is only advice: it starts writeback of the dirty range where the
/// kernel does so (Linux does; FreeBSD does not), and nothing is waited for.
#[cfg(not(target_os = "linux"))]
fn writeback(file: &File, from: u64, len: u64, _wait: bool) {
    let _ = rustix::fs::fadvise(
        file,
        from,
        std::num::NonZeroU64::new(len),
        rustix::fs::Advice::DontNeed,
    );
}

impl Write for FileNarUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.written += n as u64;
        self.start_writeback();
        Ok(n)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)?;
        self.written += buf.len() as u64;
        self.start_writeback();
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl NarUpload for FileNarUpload {
    /// Nothing is held in memory: the bytes are in the temporary file.
    fn written(&mut self) {}

    /// Flushes the NAR to its temporary file and queues it for the next sync, which makes
    /// its bytes durable and then gives it its final name (one sync for many NARs).
    fn commit(self: Box<Self>, key: &str) -> Result<(), CacheError> {
        let io = |e: io::Error| CacheError::Io {
            cache: self.url.clone(),
            key: key.to_owned(),
            source: e,
        };
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        set_readable(&file.file).map_err(io)?;
        drop(file);
        lock(&self.pending).push(PendingNar {
            tmp: self.tmp,
            target: self.root.join(key),
        });
        Ok(())
    }
}

/// An object other than a NAR (a build log) being written to a temporary file, deleted
/// unless committed. Its commit makes it durable and names it at once, by itself: no
/// narinfo's publishing wave covers it, so it must not wait in [`FileCache`]'s pending
/// NARs. Nothing is buffered here (callers write in pieces of tens of KiB), and what the
/// kernel holds is written back as it goes, as for a NAR.
struct FileObjectUpload {
    out: HookedFile,
    /// Bytes written so far.
    written: u64,
    writeback: Writeback,
    tmp: OwnedTemp,
    root: PathBuf,
    url: String,
}

impl FileObjectUpload {
    fn start_writeback(&mut self) {
        self.writeback.advance(&self.out.file, self.written);
    }
}

impl Write for FileObjectUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.written += n as u64;
        self.start_writeback();
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl NarUpload for FileObjectUpload {
    /// Nothing is held in memory: the bytes are in the temporary file.
    fn written(&mut self) {}

    /// fdatasync, rename to `key` (creating its directory, durably, on first use), fsync
    /// of that directory.
    fn commit(mut self: Box<Self>, key: &str) -> Result<(), CacheError> {
        let io = |e: io::Error| CacheError::Io {
            cache: self.url.clone(),
            key: key.to_owned(),
            source: e,
        };
        let fs = self.out.fs.clone();
        let target = self.root.join(key);
        let dir = target.parent().unwrap_or(&self.root);
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(io)?;
            fs.sync_dir(dir.parent().unwrap_or(&self.root))
                .map_err(io)?;
        }
        set_readable(&self.out.file).map_err(io)?;
        fs.sync_data(&self.out.path, &self.out.file).map_err(io)?;
        let tmp = self.tmp.take();
        fs.persist(tmp, &target).map_err(io)?;
        fs.sync_dir(dir).map_err(io)
    }
}

#[cfg(test)]
mod tests;
