//! Questions about the paths a user names: which store path an argument names, whether it
//! exists on disk, which of a set are valid in the store. Read-only, like the whole store.
use super::{LocalStore, StoreError};
use crate::format::store_path::StorePath;

/// Resolves a command-line argument to the store path it names: a store path, a path
/// inside one (`/nix/store/...-hello/bin/hello`), or a symlink to one (`./result`).
///
/// # Errors
/// A message naming the argument: missing, or outside the store.
pub fn resolve_argument(arg: &str, store_dir: &str) -> Result<StorePath, String> {
    let direct = StorePath::from_absolute_path_prefix(arg, store_dir);
    let path = match direct {
        Ok(p) => p,
        Err(_) => {
            let real = std::fs::canonicalize(arg).map_err(|e| format!("{arg}: {e}"))?;
            let real = real
                .to_str()
                .ok_or_else(|| format!("{arg}: not a UTF-8 path"))?;
            StorePath::from_absolute_path_prefix(real, store_dir)
                .map_err(|e| format!("{arg}: {e}"))?
        }
    };
    check_exists(&path, store_dir)?;
    Ok(path)
}

/// Checks that `path` exists in `store_dir` (without following a symlink).
///
/// # Errors
/// A message naming the full path: missing, or why it cannot be looked at.
pub fn check_exists(path: &StorePath, store_dir: &str) -> Result<(), String> {
    let full = path.to_absolute(store_dir);
    match std::fs::symlink_metadata(&full) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{full}: no such store path"))
        }
        Err(e) => Err(format!("{full}: {e}")),
    }
}

/// Paths valid in the store, and (full path, reason) for those that are not.
pub type ValidSplit = (Vec<StorePath>, Vec<(String, String)>);

/// Splits `paths` into those valid in the store (sorted, each once) and those that are
/// not (full path, reason): never built, or garbage-collected since.
///
/// # Errors
/// [`StoreError`] when the store cannot be read at all.
pub fn split_valid(store: &LocalStore, paths: &[StorePath]) -> Result<ValidSplit, StoreError> {
    let mut valid: Vec<StorePath> = paths.to_vec();
    valid.sort();
    valid.dedup();
    let mut invalid = Vec::new();
    loop {
        match store.path_infos(&valid) {
            Ok(_) => return Ok((valid, invalid)),
            Err(StoreError::NotValid(full)) => {
                let before = valid.len();
                valid.retain(|p| p.to_absolute(store.store_dir()) != full);
                if valid.len() == before {
                    return Err(StoreError::NotValid(full));
                }
                invalid.push((
                    full.clone(),
                    format!("{full} is not a valid path in the Nix store"),
                ));
            }
            Err(e) => return Err(e),
        }
    }
}
