//! A cache that keeps nothing: every upload is counted and dropped. `narflow bench` and the
//! criterion benches use it to measure the pipeline without the cost of a destination.
use super::{BinaryCache, CacheError, NarUpload};
use crate::format::store_path::StorePath;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct NullCache {
    bytes: Arc<AtomicU64>,
    narinfos: AtomicU64,
}

impl NullCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// Bytes of committed and uncommitted NAR uploads so far.
    pub fn nar_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    /// Narinfos "written" so far.
    pub fn narinfos(&self) -> u64 {
        self.narinfos.load(Ordering::Relaxed)
    }
}

impl BinaryCache for NullCache {
    fn url(&self) -> &str {
        "null://"
    }
    fn ensure_cache_info(&self, _store_dir: &str) -> Result<(), CacheError> {
        Ok(())
    }
    fn has_narinfo(&self, _path: &StorePath) -> Result<bool, CacheError> {
        Ok(false)
    }
    fn has_object(&self, _key: &str) -> Result<bool, CacheError> {
        Ok(false)
    }
    fn object_size(&self, _key: &str) -> Result<Option<u64>, CacheError> {
        Ok(None)
    }
    fn get_narinfo(&self, _path: &StorePath) -> Result<Option<String>, CacheError> {
        Ok(None)
    }
    fn get_text(&self, _key: &str) -> Result<Option<String>, CacheError> {
        Ok(None)
    }
    fn begin_nar(&self, _nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError> {
        Ok(Box::new(NullUpload {
            bytes: self.bytes.clone(),
        }))
    }
    fn put_narinfo(&self, _path: &StorePath, _text: &str) -> Result<(), CacheError> {
        self.narinfos.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn sync(&self) -> Result<(), CacheError> {
        Ok(())
    }
}

struct NullUpload {
    bytes: Arc<AtomicU64>,
}

impl Write for NullUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl NarUpload for NullUpload {
    fn written(&mut self) {}
    fn commit(self: Box<Self>, _key: &str) -> Result<(), CacheError> {
        Ok(())
    }
}
