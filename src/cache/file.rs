//! A `file://` binary cache: a directory laid out as Nix expects (`nix-cache-info`,
//! `<hash>.narinfo`, `nar/<FileHash>.nar.*`).
//!
//! Every object is written to a temporary file in the same directory and renamed into
//! place, so a crash never leaves a partial object under its final name. Durability is
//! batched: [`FileCache::sync`] is one `syncfs`, not an fsync per file.
use super::{BinaryCache, CacheError, NarUpload};
use crate::format::store_path::StorePath;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Write buffer for NAR files: large enough that compressed output reaches the kernel in
/// few syscalls, small enough to be irrelevant next to the compressor's own buffers.
const NAR_WRITE_BUFFER: usize = 256 * 1024;

/// How much of a NAR file gathers in the page cache before its writeback is started.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Prefix of temporary files; Nix ignores them and a later push may delete stale ones.
pub const TEMP_PREFIX: &str = ".narflow-tmp-";

#[derive(Debug)]
pub struct FileCache {
    root: PathBuf,
    url: String,
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
        };
        std::fs::create_dir_all(root.join("nar")).map_err(|e| cache.io("nar/", e))?;
        Ok(cache)
    }

    fn io(&self, key: &str, source: io::Error) -> CacheError {
        CacheError::Io {
            cache: self.url.clone(),
            key: key.to_owned(),
            source,
        }
    }

    /// Writes `contents` to `key` atomically (temp file + rename).
    fn put_atomic(&self, key: &str, contents: &[u8]) -> Result<(), CacheError> {
        let target = self.root.join(key);
        let dir = target.parent().unwrap_or(&self.root);
        let mut tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
            .map_err(|e| self.io(key, e))?;
        tmp.write_all(contents).map_err(|e| self.io(key, e))?;
        set_readable(tmp.as_file()).map_err(|e| self.io(key, e))?;
        tmp.persist(&target).map_err(|e| self.io(key, e.error))?;
        Ok(())
    }
}

/// Temp files are created 0600; cache objects are meant to be served, so make them 0644.
fn set_readable(f: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
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
        self.has_object(&super::narinfo_key(path))
    }

    fn has_object(&self, key: &str) -> Result<bool, CacheError> {
        self.root
            .join(key)
            .try_exists()
            .map_err(|e| self.io(key, e))
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
            tmp: path,
            root: self.root.clone(),
            url: self.url.clone(),
        }))
    }

    fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), CacheError> {
        self.put_atomic(&super::narinfo_key(path), text.as_bytes())
    }

    fn put_object(&self, key: &str, bytes: &[u8], _content_type: &str) -> Result<(), CacheError> {
        self.put_atomic(key, bytes)
    }

    fn sync(&self) -> Result<(), CacheError> {
        let dir = File::open(&self.root).map_err(|e| self.io("", e))?;
        rustix::fs::syncfs(&dir).map_err(|e| self.io("", e.into()))
    }
}

/// A NAR being written to a temporary file; the `TempPath` deletes it unless committed.
struct FileNarUpload {
    out: BufWriter<File>,
    /// Bytes accepted so far.
    written: u64,
    /// Where the range not yet handed to writeback starts.
    writeback_from: u64,
    tmp: tempfile::TempPath,
    root: PathBuf,
    url: String,
}

impl FileNarUpload {
    /// Starts writeback of what the kernel has of the file once [`WRITEBACK_STEP`] bytes
    /// have gathered. The `syncfs` before the narinfo then finds most of a large NAR on disk
    /// already instead of writing it all while the pipeline waits.
    fn start_writeback(&mut self) {
        let in_kernel = self.written - self.out.buffer().len() as u64;
        if in_kernel - self.writeback_from >= WRITEBACK_STEP {
            // DONTNEED starts writeback of the dirty range without waiting for it (and drops
            // the range's clean pages: the NAR is not read back). Advice only: an error
            // changes nothing but timing.
            let len = std::num::NonZeroU64::new(in_kernel - self.writeback_from);
            let _ = rustix::fs::fadvise(
                self.out.get_ref(),
                self.writeback_from,
                len,
                rustix::fs::Advice::DontNeed,
            );
            self.writeback_from = in_kernel;
        }
    }
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
    fn commit(self: Box<Self>, key: &str) -> Result<(), CacheError> {
        let io = |e: io::Error| CacheError::Io {
            cache: self.url.clone(),
            key: key.to_owned(),
            source: e,
        };
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        set_readable(&file).map_err(io)?;
        self.tmp
            .persist(self.root.join(key))
            .map_err(|e| io(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(listing(dir.path()), vec!["nar/abc.nar.zst"]);
        let p = dir.path().join("nar/abc.nar.zst");
        assert_eq!(std::fs::read(&p).unwrap(), b"complete nar");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(c.has_object("nar/abc.nar.zst").unwrap());
        c.sync().unwrap();
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

    #[test]
    fn narinfo_written_under_hash_part() {
        let (dir, c) = cache();
        let p = StorePath::from_base_name("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-hi.txt").unwrap();
        assert!(!c.has_narinfo(&p).unwrap());
        c.put_narinfo(&p, "StorePath: x\n").unwrap();
        assert!(c.has_narinfo(&p).unwrap());
        assert_eq!(
            listing(dir.path()),
            vec!["qs2vcw1sd6lzsvgvq6gggnw1v31qrm28.narinfo"]
        );
    }
}
