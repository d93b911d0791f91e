//! narflow: upload Nix store paths to binary caches, fast and with bounded memory.
//!
//! Modules:
//! - [`format`]: pure Nix formats (nix32, hashes, store paths, NAR, narinfo, signing).
//! - `store`: the local Nix store, read-only (path info, closures, order).
//! - `cache`: binary cache destinations (`file://`).
//! - `push`: uploading a set of paths to a cache.
//!
//! ```text
//! // Public API:
//! let store = store::LocalStore::open("/nix/store", Path::new("/nix/var/nix/db/db.sqlite"));
//! let cache = cache::Cache::open(&url)?;
//! let report = push::push(&store, &cache, &paths, &push::PushOptions { .. });
//! ```

pub mod format;
#[cfg(feature = "full")]
pub mod store;
