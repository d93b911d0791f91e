//! gc's roots as the user names them: a store path (`/nix/store/<hash>-<name>`, or a path
//! below one), its basename, or a bare hash part, one per `--keep-closure-of` or one a
//! line of a `--keep-file`. This file only parses; it never reads the cache or the store.

use super::index::{HashPart, parse_hash_part};
use crate::format::store_path::StorePath;

/// A root that names no store path, with where it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {text:?} is not a store path, a store path's basename or a hash part")]
pub struct BadRoot {
    /// 1-based line of a `--keep-file` (1 for a single argument).
    pub line: usize,
    pub text: String,
}

/// The hash part a root names.
///
/// # Errors
/// [`BadRoot`] (line 1) when `text` names none.
pub fn parse_root(text: &str, store_dir: &str) -> Result<HashPart, BadRoot> {
    let bad = || BadRoot {
        line: 1,
        text: text.to_owned(),
    };
    let path = if text.starts_with('/') {
        StorePath::from_absolute_path_prefix(text, store_dir).map_err(|_| bad())?
    } else if let Some(h) = parse_hash_part(text) {
        return Ok(h);
    } else {
        StorePath::from_base_name(text).map_err(|_| bad())?
    };
    parse_hash_part(path.hash_part()).ok_or_else(bad)
}

/// The roots of a `--keep-file`: one a line; blank lines and lines starting with `#` are
/// skipped, and surrounding whitespace is ignored.
///
/// # Errors
/// Every line that names no store path (a typo must not let gc delete what it meant to
/// keep, so one bad line refuses the whole file).
pub fn parse_keep_file(text: &str, store_dir: &str) -> Result<Vec<HashPart>, Vec<BadRoot>> {
    let mut roots = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_root(line, store_dir) {
            Ok(h) => roots.push(h),
            Err(e) => bad.push(BadRoot { line: i + 1, ..e }),
        }
    }
    if bad.is_empty() { Ok(roots) } else { Err(bad) }
}
