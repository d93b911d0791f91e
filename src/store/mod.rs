//! The local Nix store, read-only: path info (NarHash, NarSize, references, deriver,
//! signatures, CA) for store paths, closures, and an order in which every path comes after
//! its references.
//!
//! Reads `/nix/var/nix/db/db.sqlite` directly (read-only, WAL-safe, short transactions);
//! falls back to `nix path-info --json` when the database cannot be opened. Never writes.

pub mod closure;
pub mod db;
pub mod path_info_cmd;

use crate::format::hash::Sha256;
use crate::format::signing::Signature;
use crate::format::store_path::StorePath;

/// What the store knows about one valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted; may contain `path` itself (self-reference).
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    /// Signatures the store already has (unparseable ones are dropped with a warning).
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The path is not valid (not registered) in the store.
    #[error("{0} is not a valid path in the Nix store")]
    NotValid(String),
    #[error("Nix database {path}: {source}")]
    Db {
        path: String,
        source: rusqlite::Error,
    },
    #[error("`nix path-info`: {0}")]
    Command(String),
    /// The store returned something we cannot parse (names the path and field).
    #[error("{path}: bad {field} in store: {reason}")]
    Corrupt {
        path: String,
        field: &'static str,
        reason: String,
    },
}

/// Where to read path info from. Opening tries the DB first, then the `nix` command.
#[derive(Debug)]
pub enum LocalStore {
    Db(db::StoreDb),
    Command(path_info_cmd::PathInfoCommand),
}

impl LocalStore {
    /// Opens the store at `store_dir` with its database at `db_path`
    /// (normally `/nix/store` and `/nix/var/nix/db/db.sqlite`).
    pub fn open(store_dir: &str, db_path: &std::path::Path) -> Self {
        match db::StoreDb::open(store_dir, db_path) {
            Ok(db) => LocalStore::Db(db),
            Err(e) => {
                tracing::debug!("cannot read the Nix database ({e}); using `nix path-info`");
                LocalStore::Command(path_info_cmd::PathInfoCommand::new(store_dir))
            }
        }
    }

    pub fn store_dir(&self) -> &str {
        match self {
            LocalStore::Db(d) => d.store_dir(),
            LocalStore::Command(c) => c.store_dir(),
        }
    }

    /// Path info for each of `paths`, in the same order. One query batch, not one per path.
    ///
    /// # Errors
    /// [`StoreError::NotValid`] for the first path that is not valid.
    pub fn path_infos(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
        match self {
            LocalStore::Db(d) => d.path_infos(paths),
            LocalStore::Command(c) => c.path_infos(paths),
        }
    }

    /// The closure of `paths` (every path reachable through references), in an order where
    /// each path comes after all its references.
    pub fn closure(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
        closure::closure(self, paths)
    }
}
