//! Store paths: `<store dir>/<32-char nix32 hash>-<name>`.
//!
//! Name rules (Nix's): 1..=211 characters from `[A-Za-z0-9+\-._?=]`, not starting with `.`.
use std::fmt;

pub const DEFAULT_STORE_DIR: &str = "/nix/store";
/// Length of the hash part (20 bytes in nix32).
pub const HASH_PART_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("{path:?} is not in the Nix store {store_dir}")]
    NotInStore { path: String, store_dir: String },
    #[error("{path:?}: {reason}")]
    Invalid { path: String, reason: String },
}

/// A store path, independent of the store dir. Ordered as Nix orders them (bytewise on the
/// base name, which is bytewise on the full path for one store dir).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    /// `<hash>-<name>`, validated.
    base_name: String,
}

impl StorePath {
    /// Parses a base name `<hash>-<name>`.
    ///
    /// # Errors
    /// [`StorePathError::Invalid`] naming the input and what is wrong.
    pub fn from_base_name(s: &str) -> Result<Self, StorePathError> {
        let _ = s;
        unimplemented!()
    }
    /// Parses an absolute path directly inside `store_dir` (a trailing `/` is accepted;
    /// a path below a store path, `/nix/store/x-foo/bin`, is rejected: use
    /// [`Self::from_absolute_path_prefix`] for that).
    pub fn from_absolute_path(path: &str, store_dir: &str) -> Result<Self, StorePathError> {
        let _ = (path, store_dir);
        unimplemented!()
    }
    /// Like [`Self::from_absolute_path`] but accepts paths below a store path and returns
    /// the store path that contains them.
    pub fn from_absolute_path_prefix(path: &str, store_dir: &str) -> Result<Self, StorePathError> {
        let _ = (path, store_dir);
        unimplemented!()
    }
    /// The 32-character nix32 hash part (the narinfo's file stem).
    pub fn hash_part(&self) -> &str {
        &self.base_name[..HASH_PART_LEN]
    }
    pub fn name(&self) -> &str {
        &self.base_name[HASH_PART_LEN + 1..]
    }
    pub fn base_name(&self) -> &str {
        &self.base_name
    }
    /// `<store_dir>/<base name>`.
    pub fn to_absolute(&self, store_dir: &str) -> String {
        format!("{store_dir}/{}", self.base_name)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base_name)
    }
}
impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base_name)
    }
}
