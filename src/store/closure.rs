//! Closures and topological order (references before referrers; self-references ignored).
use super::{LocalStore, PathInfo, StoreError};
use crate::format::store_path::StorePath;

/// See [`LocalStore::closure`]. Queries the store level by level (one batch per level).
pub fn closure(store: &LocalStore, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
    let _ = (store, paths);
    unimplemented!()
}

/// Orders `infos` so each path comes after its references that are in the set. Ties are
/// broken by store path, so the order is deterministic.
pub fn topo_sort(infos: Vec<PathInfo>) -> Vec<PathInfo> {
    let _ = infos;
    unimplemented!()
}
