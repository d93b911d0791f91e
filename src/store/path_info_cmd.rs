//! Fallback path info from `nix path-info --json` (Nix 2.8's JSON: an array of objects with
//! path, narHash, narSize, references, deriver, signatures, ca, valid).
use super::{PathInfo, StoreError};
use crate::format::store_path::StorePath;

#[derive(Debug)]
pub struct PathInfoCommand {
    store_dir: String,
}

impl PathInfoCommand {
    pub fn new(store_dir: &str) -> Self {
        Self {
            store_dir: store_dir.to_owned(),
        }
    }
    pub fn store_dir(&self) -> &str {
        &self.store_dir
    }
    pub fn path_infos(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
        let _ = paths;
        unimplemented!()
    }
}
