//! Read-only access to the Nix database (schema 10):
//! `ValidPaths(id, path, hash 'sha256:<base16>', registrationTime, deriver, narSize, ultimate,
//! sigs, ca)`, `Refs(referrer, reference)`. Opened read-only with a busy timeout, never
//! `immutable=1` (that ignores the WAL and misses new paths).
use super::{PathInfo, StoreError};
use crate::format::store_path::StorePath;

#[derive(Debug)]
pub struct StoreDb {
    store_dir: String,
    conn: rusqlite::Connection,
}

impl StoreDb {
    pub fn open(store_dir: &str, db_path: &std::path::Path) -> Result<Self, StoreError> {
        let _ = (store_dir, db_path);
        unimplemented!()
    }
    pub fn store_dir(&self) -> &str {
        &self.store_dir
    }
    /// See [`super::LocalStore::path_infos`].
    pub fn path_infos(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
        let _ = (&self.conn, paths);
        unimplemented!()
    }
}
