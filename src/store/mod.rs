//! The local Nix store, read-only: path info (NarHash, NarSize, references, deriver,
//! signatures, CA) for store paths, closures, and an order in which every path comes after
//! its references.
//!
//! Reads `/nix/var/nix/db/db.sqlite` directly (read-only, WAL-safe, short transactions);
//! falls back to `nix path-info --json` when the database cannot be opened (no permission,
//! not a Nix database). Never writes, and never makes Nix build or download anything.
//!
//! - [`db`]: the database reader.
//! - [`path_info_cmd`]: the `nix path-info` fallback; it gives the same [`PathInfo`]s.
//! - [`closure`]: closures, one store query per level, and [`closure::topo_sort`].
//! - [`lookup`]: which store path a user's argument names, and which paths are valid.

pub mod closure;
pub mod db;
pub mod lookup;
pub mod path_info_cmd;

use crate::format::hash::Sha256;
use crate::format::signing::Signature;
use crate::format::store_path::StorePath;

/// What the store knows about one valid path.
///
/// Read from the database or from `nix path-info`, the same path gives an equal value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    /// SHA-256 of the path's NAR serialisation.
    pub nar_hash: Sha256,
    /// Length of the NAR serialisation in bytes.
    pub nar_size: u64,
    /// Sorted; may contain `path` itself (self-reference).
    pub references: Vec<StorePath>,
    /// The `.drv` that built the path, when the store knows it.
    pub deriver: Option<StorePath>,
    /// Signatures the store already has (unparseable ones are dropped with a warning).
    pub sigs: Vec<Signature>,
    /// Content-address assertion as Nix writes it (`fixed:r:sha256:…`, `text:sha256:…`).
    pub ca: Option<String>,
}

impl PathInfo {
    /// The path info Nix would register for `path` whose tree is at `full` on disk: NarHash
    /// and NarSize computed from the tree, references sorted, no signatures. For synthetic
    /// stores (`narflow bench`, tests, benchmarks).
    ///
    /// # Errors
    /// When the tree cannot be read ([`crate::nar_fs::hash_path`]).
    pub fn of_tree(
        path: StorePath,
        full: &std::path::Path,
        mut references: Vec<StorePath>,
        deriver: Option<StorePath>,
    ) -> Result<PathInfo, crate::nar_fs::NarWriteError> {
        let (nar_hash, nar_size) = crate::nar_fs::hash_path(full)?;
        references.sort();
        Ok(PathInfo {
            path,
            nar_hash,
            nar_size,
            references,
            deriver,
            sigs: vec![],
            ca: None,
        })
    }
}

/// Makes a synthetic store in `dir` for tests: one path per `(name, size, references)`
/// (references by index into the earlier specs), each a directory with `data` (`size`
/// bytes, partly compressible, different per path) and `small`, its hash part derived
/// from `tag` and the name, so each tag gives fresh store paths. Returns their path
/// infos, NarHash computed from disk.
///
/// # Panics
/// When the files cannot be written or a reference index is not an earlier spec.
#[doc(hidden)]
pub fn make_test_store(
    dir: &std::path::Path,
    tag: &str,
    specs: &[(&str, usize, &[usize])],
) -> Vec<PathInfo> {
    let mut infos: Vec<PathInfo> = Vec::new();
    for (i, (name, size, refs)) in specs.iter().enumerate() {
        let digest = Sha256::digest(format!("{tag}{name}").as_bytes());
        let hash = crate::format::nix32::encode(&digest.0[..20]);
        let path = StorePath::from_base_name(&format!("{hash}-{name}")).expect("a store path");
        let full = dir.join(path.base_name());
        std::fs::create_dir_all(&full).expect("a path's directory");
        let content: Vec<u8> = (0..*size)
            .map(|j| {
                if j % 7 < 4 {
                    (j / 7 % 251) as u8
                } else {
                    (j * 31 + i) as u8
                }
            })
            .collect();
        std::fs::write(full.join("data"), &content).expect("a path's data");
        std::fs::write(full.join("small"), name.as_bytes()).expect("a path's file");
        let references = refs.iter().map(|&r| infos[r].path.clone()).collect();
        infos.push(PathInfo::of_tree(path, &full, references, None).expect("a readable tree"));
    }
    infos
}

/// Why path info could not be read. Only [`StoreError::Db`] (a lock held past the busy
/// timeout) and [`StoreError::Command`] can be worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The path is not valid (not registered) in the store.
    #[error("{0} is not a valid path in the Nix store")]
    NotValid(String),
    /// SQLite failed on the database file at `path`.
    #[error("Nix database {path}: {source}")]
    Db {
        path: String,
        source: rusqlite::Error,
    },
    /// `nix path-info` could not run or failed (with its stderr).
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

impl StoreError {
    /// True when reading again may succeed (the database was busy or locked, or `nix`
    /// could not run); false for a path that is not valid or data that does not parse.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::NotValid(_) | StoreError::Corrupt { .. } => false,
            StoreError::Db { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            StoreError::Command(_) => true,
        }
    }
}

/// Why listing by registration needs the database.
const NEEDS_DB: &str = "following the store in registration order needs read access to the \
     Nix database (/nix/var/nix/db/db.sqlite); run as root or as the store's owner";

/// Where to read path info from. Opening tries the DB first, then the `nix` command.
///
/// `Send + Sync`: share one (e.g. in an `Arc`) between threads; database queries take turns
/// on one connection.
#[derive(Debug)]
pub enum LocalStore {
    Db(db::StoreDb),
    Command(path_info_cmd::PathInfoCommand),
}

impl LocalStore {
    /// Opens the store at `store_dir` with its database at `db_path`
    /// (normally `/nix/store` and `/nix/var/nix/db/db.sqlite`). Cannot fail: when the
    /// database is unusable (logged at debug level) it uses `nix path-info`, whose errors
    /// show on the first query.
    pub fn open(store_dir: &str, db_path: &std::path::Path) -> Self {
        match db::StoreDb::open(store_dir, db_path) {
            Ok(db) => LocalStore::Db(db),
            Err(e) => {
                tracing::debug!("cannot read the Nix database ({e}); using `nix path-info`");
                LocalStore::Command(path_info_cmd::PathInfoCommand::new(store_dir))
            }
        }
    }

    /// The store directory (`/nix/store`).
    pub fn store_dir(&self) -> &str {
        match self {
            LocalStore::Db(d) => d.store_dir(),
            LocalStore::Command(c) => c.store_dir(),
        }
    }

    /// Path info for each of `paths`, in the same order (repeats included). One query batch,
    /// not one per path: one read transaction, or one `nix path-info` per 1,000 paths.
    ///
    /// # Errors
    /// [`StoreError::NotValid`] for the first path that is not valid;
    /// [`StoreError::Corrupt`] naming the path and field the store gave us that we cannot
    /// parse; [`StoreError::Db`] or [`StoreError::Command`] when the store cannot be read.
    pub fn path_infos(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
        match self {
            LocalStore::Db(d) => d.path_infos(paths),
            LocalStore::Command(c) => c.path_infos(paths),
        }
    }

    /// The output paths of the derivation `drv` (a `.drv` store path), as the store
    /// records them. Nix 2.8.0 runs the post-build-hook with `$OUT_PATHS` empty (fixed in
    /// 2.8.1); the daemon then finds the outputs from `$DRV_PATH` with this.
    ///
    /// # Errors
    /// [`StoreError::NotValid`] when `drv` is not valid; [`StoreError::Db`] or
    /// [`StoreError::Command`] when the store cannot be read.
    pub fn derivation_outputs(&self, drv: &StorePath) -> Result<Vec<StorePath>, StoreError> {
        match self {
            LocalStore::Db(d) => d.derivation_outputs(drv),
            LocalStore::Command(c) => c.derivation_outputs(drv),
        }
    }

    /// The `ValidPaths.id` of each of `paths`, in order (`None`: not valid), in one read
    /// transaction; `None` when the store is read through `nix path-info`, which has no
    /// ids.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn ids(&self, paths: &[StorePath]) -> Result<Option<Vec<Option<i64>>>, StoreError> {
        match self {
            LocalStore::Db(d) => d.ids(paths).map(Some),
            LocalStore::Command(_) => Ok(None),
        }
    }

    /// See [`db::StoreDb::valid_after`]: valid paths in registration order, past an id.
    ///
    /// # Errors
    /// As there; [`StoreError::Command`] when the database cannot be read (`nix
    /// path-info` cannot list paths by registration).
    pub fn valid_after(&self, after: i64, limit: usize) -> Result<Vec<db::ValidRow>, StoreError> {
        match self {
            LocalStore::Db(d) => d.valid_after(after, limit),
            LocalStore::Command(_) => Err(StoreError::Command(NEEDS_DB.into())),
        }
    }

    /// See [`db::StoreDb::count_after`]: how many paths (and NAR bytes) a walk past `after`
    /// will see.
    ///
    /// # Errors
    /// As [`Self::valid_after`].
    pub fn count_after(
        &self,
        after: i64,
        since: i64,
        derivations: bool,
    ) -> Result<(u64, u64), StoreError> {
        match self {
            LocalStore::Db(d) => d.count_after(after, since, derivations),
            LocalStore::Command(_) => Err(StoreError::Command(NEEDS_DB.into())),
        }
    }

    /// See [`db::StoreDb::first_id_since`].
    ///
    /// # Errors
    /// As [`Self::valid_after`].
    pub fn first_id_since(&self, since: i64) -> Result<Option<i64>, StoreError> {
        match self {
            LocalStore::Db(d) => d.first_id_since(since),
            LocalStore::Command(_) => Err(StoreError::Command(NEEDS_DB.into())),
        }
    }

    /// See [`db::StoreDb::last_valid_id`].
    ///
    /// # Errors
    /// As [`Self::valid_after`].
    pub fn last_valid_id(&self) -> Result<i64, StoreError> {
        match self {
            LocalStore::Db(d) => d.last_valid_id(),
            LocalStore::Command(_) => Err(StoreError::Command(NEEDS_DB.into())),
        }
    }

    /// The closure of `paths` (every path reachable through references, each once), in an
    /// order where each path comes after all its references; ties in store-path order.
    ///
    /// # Errors
    /// As [`Self::path_infos`], for any path of the closure.
    pub fn closure(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
        closure::closure(self, paths)
    }
}
