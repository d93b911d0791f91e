//! A `file://` binary cache: a directory laid out as Nix expects (`nix-cache-info`,
//! `<hash>.narinfo`, `nar/<FileHash>.nar.*`).
//!
//! Every object is written to a temporary file in the same directory and renamed into
//! place only once its bytes are durable, so no crash, power loss included, leaves a
//! partial object under its final name. Durability is batched: a committed NAR waits
//! under its temporary name; a wave of narinfos is written to temporary files, then one
//! `syncfs` makes them and every waiting NAR durable, the NARs are renamed and `nar/` is
//! fsynced, then the narinfos are renamed and the cache directory fsynced. So a
//! narinfo's name is durable only after its NAR's name, and before any narinfo of a later
//! wave (which may refer to it). A small wave (a path published while the pipeline is
//! otherwise idle, or beside a large upload) syncs its few files one by one instead of
//! the whole file system, in the same order: `syncfs` would also wait for every other
//! dirty page, a large NAR being written at that moment included.
//!
//! An object already under its final name is checked before it is trusted: a narinfo
//! must parse, name its store path and point to a NAR of its FileSize; a damaged one is
//! treated as absent and replaced. Narinfos are merged under the cache's rule
//! ([`super::merge_narinfo`]) while holding an exclusive lock on [`LOCK_FILE`], so
//! concurrent writers on one directory keep each other's signatures.
use super::{BinaryCache, CacheError, Merged, NarUpload};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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

/// A committed NAR waiting for the next sync to get its final name.
#[derive(Debug)]
struct PendingNar {
    tmp: tempfile::TempPath,
    target: PathBuf,
}

#[derive(Debug)]
pub struct FileCache {
    root: PathBuf,
    url: String,
    /// Committed NARs not yet renamed (their temp files are deleted if we never get there).
    pending: Arc<Mutex<Vec<PendingNar>>>,
}

impl FileCache {
    /// Opens (creating if needed) the cache directory `root`.
    ///
    /// # Errors
    /// [`CacheError::Io`] when the directory cannot be created.
    pub fn open(root: &Path, url: &str) -> Result<Self, CacheError> {
        let cache = FileCache {
            root: root.to_owned(),
            url: url.to_owned(),
            pending: Arc::default(),
        };
        std::fs::create_dir_all(root.join("nar")).map_err(|e| cache.io("nar/", e))?;
        Ok(cache)
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

    /// Writes `contents` to `key` durably and atomically (temp file, fdatasync, rename,
    /// fsync of the directory). For the rare single object (`nix-cache-info`).
    fn put_atomic(&self, key: &str, contents: &[u8]) -> Result<(), CacheError> {
        let target = self.root.join(key);
        let dir = target.parent().unwrap_or(&self.root);
        let mut tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
            .map_err(|e| self.io(key, e))?;
        tmp.write_all(contents).map_err(|e| self.io(key, e))?;
        set_readable(tmp.as_file()).map_err(|e| self.io(key, e))?;
        tmp.as_file().sync_data().map_err(|e| self.io(key, e))?;
        tmp.persist(&target).map_err(|e| self.io(key, e.error))?;
        fsync_dir(dir).map_err(|e| self.io(key, e))
    }

    /// One `syncfs` of the cache's file system: every byte written so far is durable.
    fn syncfs(&self) -> Result<(), CacheError> {
        let dir = File::open(&self.root).map_err(|e| self.io("", e))?;
        rustix::fs::syncfs(&dir).map_err(|e| self.io("", e.into()))
    }

    /// Makes the bytes of `pending` NARs durable: one by one when they are few (with
    /// `extra` other files the caller syncs itself), else with one `syncfs` (which covers
    /// the caller's files too). Returns whether it was a `syncfs`.
    fn sync_pending(&self, pending: &[PendingNar], extra: usize) -> Result<bool, CacheError> {
        if pending.len() + extra > SMALL_WAVE {
            self.syncfs()?;
            return Ok(true);
        }
        for p in pending {
            let key = p.target.display().to_string();
            File::open(&p.tmp)
                .and_then(|f| f.sync_data())
                .map_err(|e| self.io(&key, e))?;
        }
        Ok(false)
    }

    /// Renames the committed NARs into place and makes the renames durable. Their bytes
    /// must be durable already (the caller has just synced).
    fn rename_pending(&self, pending: Vec<PendingNar>) -> Result<(), CacheError> {
        if pending.is_empty() {
            return Ok(());
        }
        for p in pending {
            p.tmp
                .persist(&p.target)
                .map_err(|e| self.io(&p.target.display().to_string(), e.error))?;
        }
        fsync_dir(&self.root.join("nar")).map_err(|e| self.io("nar/", e))
    }

    fn take_pending(&self) -> Vec<PendingNar> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
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

/// Makes the renames in `dir` durable.
fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl BinaryCache for FileCache {
    fn url(&self) -> &str {
        &self.url
    }

    fn ensure_cache_info(&self, store_dir: &str) -> Result<(), CacheError> {
        let key = "nix-cache-info";
        let existing = match std::fs::read_to_string(self.root.join(key)) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.io(key, e)),
        };
        match super::cache_info_to_write(&self.url, existing.as_deref(), store_dir)? {
            Some(text) => self.put_atomic(key, text.as_bytes()),
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
        match std::fs::symlink_metadata(self.root.join(key)) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(key, e)),
        }
    }

    fn get_narinfo(&self, path: &StorePath) -> Result<Option<String>, CacheError> {
        let key = super::narinfo_key(path);
        match std::fs::read(self.root.join(&key)) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&key, e)),
        }
    }

    fn begin_nar(&self, _nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError> {
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(self.root.join("nar"))
            .map_err(|e| self.io("nar/", e))?;
        let (file, path) = tmp.into_parts();
        Ok(Box::new(FileNarUpload {
            out: BufWriter::with_capacity(NAR_WRITE_BUFFER, file),
            written: 0,
            writeback_from: 0,
            writing: None,
            tmp: path,
            root: self.root.clone(),
            url: self.url.clone(),
            pending: self.pending.clone(),
        }))
    }

    fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), CacheError> {
        self.put_narinfos(&[(path.clone(), text.to_owned())])
    }

    /// Temp files → one `syncfs` → NAR renames, fsync `nar/` → narinfo renames, fsync the
    /// cache directory.
    fn put_narinfos(&self, narinfos: &[(StorePath, String)]) -> Result<(), CacheError> {
        if narinfos.is_empty() {
            return Ok(());
        }
        // Taken before the sync, so every NAR renamed below is covered by it.
        let pending = self.take_pending();
        let one_by_one = pending.len() + narinfos.len() <= SMALL_WAVE;
        let mut temps = Vec::with_capacity(narinfos.len());
        for (path, text) in narinfos {
            let key = super::narinfo_key(path);
            let mut tmp = tempfile::Builder::new()
                .prefix(TEMP_PREFIX)
                .tempfile_in(&self.root)
                .map_err(|e| self.io(&key, e))?;
            tmp.write_all(text.as_bytes())
                .map_err(|e| self.io(&key, e))?;
            set_readable(tmp.as_file()).map_err(|e| self.io(&key, e))?;
            if one_by_one {
                tmp.as_file().sync_data().map_err(|e| self.io(&key, e))?;
            }
            // Closed now: a wave may hold hundreds.
            temps.push((key, tmp.into_temp_path()));
        }
        if one_by_one {
            self.sync_pending(&pending, narinfos.len())?;
        } else {
            self.syncfs()?;
        }
        self.rename_pending(pending)?;
        for (key, tmp) in temps {
            tmp.persist(self.root.join(&key))
                .map_err(|e| self.io(&key, e.error))?;
        }
        fsync_dir(&self.root).map_err(|e| self.io("", e))
    }

    fn publish_narinfos(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
    ) -> Result<Vec<Merged>, CacheError> {
        if narinfos.is_empty() {
            return Ok(Vec::new());
        }
        // Unlocked when `_lock` is closed, after the renames are durable.
        let _lock = self.lock_publishing(PUBLISH_LOCK_WAIT)?;
        super::publish_merged(self, store_dir, narinfos)
    }

    fn put_object(&self, key: &str, bytes: &[u8], _content_type: &str) -> Result<(), CacheError> {
        // An object in a directory of its own (`log/<drv>`) creates it on first use, durably.
        if let Some((sub, _)) = key.rsplit_once('/')
            && !self.root.join(sub).is_dir()
        {
            std::fs::create_dir_all(self.root.join(sub)).map_err(|e| self.io(key, e))?;
            fsync_dir(&self.root).map_err(|e| self.io("", e))?;
        }
        self.put_atomic(key, bytes)
    }

    fn sync(&self) -> Result<(), CacheError> {
        let pending = self.take_pending();
        self.sync_pending(&pending, 0)?;
        self.rename_pending(pending)
    }

    /// One read of the cache's directory: every `<hash part>.narinfo` (a name that is not
    /// a nix32 hash part, or a temporary file, is not a narinfo). The narinfos are not
    /// opened: unlike [`BinaryCache::has_narinfo`] this does not look for damage.
    fn list_narinfos(&self) -> Result<Option<super::NarinfoSet>, CacheError> {
        let mut set = std::collections::HashSet::new();
        let entries = std::fs::read_dir(&self.root).map_err(|e| self.io("", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| self.io("", e))?;
            let name = entry.file_name();
            if let Some(key) = super::narinfo_hash(name.as_encoded_bytes()) {
                set.insert(key);
            }
        }
        Ok(Some(super::NarinfoSet(set)))
    }

    fn sweep_orphans(&self, grace: Duration) -> Result<u64, CacheError> {
        let mut removed = 0;
        for (dir, key) in [(self.root.clone(), ""), (self.root.join("nar"), "nar/")] {
            let entries = match std::fs::read_dir(&dir) {
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
                {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                // An upload still running keeps touching its file: only stale ones go.
                let age = meta.modified().ok().and_then(|m| m.elapsed().ok());
                if !meta.is_file() || age.is_none_or(|a| a < grace) {
                    continue;
                }
                match std::fs::remove_file(entry.path()) {
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
}

/// A NAR being written to a temporary file; the `TempPath` deletes it unless committed.
struct FileNarUpload {
    out: BufWriter<File>,
    /// Bytes accepted so far.
    written: u64,
    /// Where the range not yet handed to writeback starts.
    writeback_from: u64,
    /// The range last handed to writeback, not yet waited for.
    writing: Option<(u64, u64)>,
    tmp: tempfile::TempPath,
    root: PathBuf,
    url: String,
    pending: Arc<Mutex<Vec<PendingNar>>>,
}

impl FileNarUpload {
    /// Once [`WRITEBACK_STEP`] bytes of the file have gathered in the kernel, starts their
    /// writeback and waits for the step before them to be on disk: at most two steps of a
    /// NAR are ever dirty or being written (a step is one write when a chunk's output is
    /// larger: `BufWriter` passes large writes straight through). The `fdatasync`s of a publish wave then find
    /// little to wait for: on ext4 an `fdatasync` of a small file just published commits
    /// the journal, which first writes the data of every file in the transaction, so a
    /// large NAR's gigabyte of dirty pages made a small path wait behind it. The final sync
    /// of the large NAR finds most of it on disk already, too. Only hints: an error
    /// changes nothing but timing.
    fn start_writeback(&mut self) {
        let in_kernel = self.written - self.out.buffer().len() as u64;
        if in_kernel - self.writeback_from < WRITEBACK_STEP {
            return;
        }
        let (from, len) = (self.writeback_from, in_kernel - self.writeback_from);
        let file = self.out.get_ref();
        writeback(file, from, len, false);
        if let Some((before, before_len)) = self.writing.replace((from, len)) {
            writeback(file, before, before_len, true);
            // Written: its clean pages are dropped (the NAR is not read back).
            let _ = rustix::fs::fadvise(
                file,
                before,
                std::num::NonZeroU64::new(before_len),
                rustix::fs::Advice::DontNeed,
            );
        }
        self.writeback_from = in_kernel;
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
        set_readable(&file).map_err(io)?;
        drop(file);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(PendingNar {
                tmp: self.tmp,
                target: self.root.join(key),
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_names_every_narinfo_and_nothing_else() {
        let (dir, c) = cache();
        assert_eq!(
            c.list_narinfos().unwrap(),
            Some(super::super::NarinfoSet::default())
        );
        let a = StorePath::from_base_name("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-a").unwrap();
        let b = StorePath::from_base_name("9zfkprp7xigl4ny63bvmiva5p5sk290q-b").unwrap();
        c.put_narinfo(&a, &narinfo_text(&a, 1)).unwrap();
        c.put_narinfo(&b, &narinfo_text(&b, 1)).unwrap();
        c.ensure_cache_info("/nix/store").unwrap();
        // Not narinfos: a name that is no hash part, another object, a temporary file.
        std::fs::write(dir.path().join("not-a-hash.narinfo"), "x").unwrap();
        std::fs::write(dir.path().join(format!("{}.ls", a.hash_part())), "{}").unwrap();
        std::fs::write(dir.path().join(format!("{TEMP_PREFIX}x.narinfo")), "x").unwrap();
        let set = c.list_narinfos().unwrap().unwrap().0;
        let want: std::collections::HashSet<[u8; 20]> = [&a, &b]
            .iter()
            .map(|p| crate::format::nix32::decode::<20>(p.hash_part().as_bytes()).unwrap())
            .collect();
        assert_eq!(set, want);
    }

    fn cache() -> (tempfile::TempDir, FileCache) {
        let dir = tempfile::tempdir().unwrap();
        let c = FileCache::open(dir.path(), "file:///test").unwrap();
        (dir, c)
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = walk(dir)
            .into_iter()
            .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
            .collect();
        v.sort();
        v
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = vec![];
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p))
            } else {
                out.push(p)
            }
        }
        out
    }

    #[test]
    fn uncommitted_nar_leaves_nothing() {
        let (dir, c) = cache();
        let mut up = c.begin_nar(0).unwrap();
        up.write_all(b"partial").unwrap();
        drop(up);
        assert_eq!(listing(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn committed_nar_is_complete_and_readable() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, c) = cache();
        let mut up = c.begin_nar(0).unwrap();
        up.write_all(b"complete nar").unwrap();
        up.commit("nar/abc.nar.zst").unwrap();
        // Named only once a sync has made its bytes durable.
        assert!(!c.has_object("nar/abc.nar.zst").unwrap());
        c.sync().unwrap();
        assert_eq!(listing(dir.path()), vec!["nar/abc.nar.zst"]);
        let p = dir.path().join("nar/abc.nar.zst");
        assert_eq!(std::fs::read(&p).unwrap(), b"complete nar");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(c.object_size("nar/abc.nar.zst").unwrap(), Some(12));
    }

    #[test]
    fn cache_info_created_once_and_checked() {
        let (dir, c) = cache();
        c.ensure_cache_info("/nix/store").unwrap();
        let text = std::fs::read_to_string(dir.path().join("nix-cache-info")).unwrap();
        assert_eq!(
            text,
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
        );
        c.ensure_cache_info("/nix/store").unwrap();
        let e = c.ensure_cache_info("/other/store").unwrap_err().to_string();
        assert!(
            e.contains("the cache is for store /nix/store, not /other/store"),
            "{e}"
        );
    }

    /// A narinfo for `p` whose NAR is `nar/x.nar` of `size` bytes.
    fn narinfo_text(p: &StorePath, size: u64) -> String {
        use crate::format::hash::Sha256;
        NarInfo {
            store_path: p.clone(),
            url: "nar/x.nar".into(),
            compression: "none".into(),
            file_hash: Some(Sha256::digest(b"x")),
            file_size: Some(size),
            nar_hash: Sha256::digest(b"x"),
            nar_size: size,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
        }
        .render("/nix/store")
    }

    #[test]
    fn narinfo_written_under_hash_part_and_trusted_only_when_sound() {
        let (dir, c) = cache();
        let p = StorePath::from_base_name("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-hi.txt").unwrap();
        let q = StorePath::from_base_name("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-other").unwrap();
        assert!(!c.has_narinfo(&p).unwrap());
        std::fs::write(dir.path().join("nar/x.nar"), b"0123456789").unwrap();
        c.put_narinfo(&p, &narinfo_text(&p, 10)).unwrap();
        assert!(c.has_narinfo(&p).unwrap());
        assert_eq!(
            listing(dir.path()),
            vec!["nar/x.nar", "qs2vcw1sd6lzsvgvq6gggnw1v31qrm28.narinfo"]
        );
        // Damaged ones, as a crash before writeback or another writer could leave them.
        for (text, why) in [
            (String::new(), "empty"),
            ("StorePath: x\n".into(), "does not parse"),
            (narinfo_text(&q, 10), "names another path"),
            (narinfo_text(&p, 11), "its NAR is shorter than FileSize"),
        ] {
            c.put_narinfo(&p, &text).unwrap();
            assert!(!c.has_narinfo(&p).unwrap(), "{why}: trusted");
        }
        std::fs::remove_file(dir.path().join("nar/x.nar")).unwrap();
        c.put_narinfo(&p, &narinfo_text(&p, 10)).unwrap();
        assert!(!c.has_narinfo(&p).unwrap(), "missing NAR: trusted");
    }

    #[test]
    fn a_publishing_lock_held_elsewhere_is_waited_for_a_bounded_time() {
        let (dir, c) = cache();
        let held = File::create(dir.path().join(LOCK_FILE)).unwrap();
        held.lock().unwrap();
        let e = c.lock_publishing(Duration::from_millis(50)).unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().contains("held by another writer"), "{e}");
        drop(held);
        assert!(c.lock_publishing(Duration::from_millis(50)).is_ok());
    }

    #[test]
    fn sweep_removes_only_stale_temporary_files() {
        let (dir, c) = cache();
        let old = std::time::SystemTime::now() - Duration::from_secs(7200);
        let mut expect = vec![];
        for (name, stale) in [
            (".narflow-tmp-a1", true),
            ("nar/.narflow-tmp-b2", true),
            (".narflow-tmp-young", false),
            ("nar/.narflow-tmp-young", false),
            ("stale.narinfo", false),
            ("nar/stale.nar.zst", false),
            (LOCK_FILE, false),
        ] {
            let f = File::create(dir.path().join(name)).unwrap();
            if stale || !name.contains(TEMP_PREFIX) {
                f.set_modified(old).unwrap();
            }
            if !stale {
                expect.push(name.to_owned());
            }
        }
        assert_eq!(c.sweep_orphans(Duration::from_secs(3600)).unwrap(), 2);
        expect.sort();
        assert_eq!(listing(dir.path()), expect);
        assert_eq!(c.sweep_orphans(Duration::from_secs(3600)).unwrap(), 0);
    }
}
