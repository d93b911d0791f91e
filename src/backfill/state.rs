//! The backfill's resume state: one small JSON file per destination cache recording the
//! cursor below which everything is durable in the cache (or deliberately skipped).
//!
//! Owns reading, checking and atomically replacing that file (temporary file in the same
//! directory, fsync, rename, fsync of the directory), so a kill at any moment leaves the
//! old state or the new one, never a torn file. It never decides when the cursor moves.
use std::io::Write;
use std::path::{Path, PathBuf};

/// The version written and the only one read.
const VERSION: u32 = 1;

/// What the state file says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// The destination, as given (a state file is only used for the URL it was made for).
    pub url: String,
    /// What was being backfilled, with the rules that decided what counts as done
    /// ([`super::Selection::fingerprint`]): a cursor means nothing for another selection.
    pub selection: String,
    /// Walking the store: the `ValidPaths.id` up to which (inclusive) every selected path
    /// is durable in the cache or skipped. Naming paths: how many of the named paths have
    /// their whole closure done.
    pub cursor: i64,
    /// Naming paths: how far into the closure of the group that starts at `cursor` the
    /// walk got (absent: not into it at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<Within>,
}

/// How many windows of one group's closure are done (durable in the cache or skipped).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Within {
    /// The group's first windows done, in the walk's order.
    pub windows: u64,
    /// A digest of the group's closure in that order: the count means nothing for
    /// another closure (a named path that was not valid then, or is no longer).
    pub closure: String,
}

impl State {
    pub fn new(url: &str, selection: &str, cursor: i64) -> Self {
        State {
            version: VERSION,
            url: url.to_owned(),
            selection: selection.to_owned(),
            cursor,
            within: None,
        }
    }

    /// The same, `within` the group at `cursor`.
    #[must_use]
    pub fn within(mut self, within: Option<Within>) -> Self {
        self.within = within;
        self
    }
}

/// Why the state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("backfill state {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not a state file of this version (damaged, or written by something else): the
    /// user decides, since guessing could skip paths that never went up.
    #[error(
        "backfill state {}: not a narflow backfill state file ({why}); remove it to start over",
        path.display()
    )]
    Unreadable { path: PathBuf, why: String },
    /// A state file of another cache, given with `--state`.
    #[error(
        "backfill state {} is for {found}, not {wanted}; give another --state file",
        path.display()
    )]
    ForeignUrl {
        path: PathBuf,
        found: String,
        wanted: String,
    },
}

/// The default state file of the cache at `url`: `<state_dir>/backfill-<16 hex digits of
/// SHA-256 of the URL>.json`, one per destination.
pub fn default_path(state_dir: &Path, url: &str) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(url.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    state_dir.join(format!("backfill-{hex}.json"))
}

/// Reads the state at `path` for `url`: `None` when there is none yet.
///
/// # Errors
/// [`StateError::Unreadable`] for a file that does not parse as a state file of this
/// version, [`StateError::ForeignUrl`] for one of another cache, [`StateError::Io`].
pub fn load(path: &Path, url: &str) -> Result<Option<State>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let unreadable = |why: String| StateError::Unreadable {
        path: path.to_owned(),
        why,
    };
    let state: State = serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))?;
    if state.version != VERSION {
        return Err(unreadable(format!("version {}", state.version)));
    }
    if state.url != url {
        return Err(StateError::ForeignUrl {
            path: path.to_owned(),
            found: state.url,
            wanted: url.to_owned(),
        });
    }
    Ok(Some(state))
}

/// Replaces the state at `path` atomically and durably (its directory is created).
///
/// # Errors
/// [`StateError::Io`].
pub fn save(path: &Path, state: &State) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".backfill-state-")
        .tempfile_in(dir)
        .map_err(io)?;
    let text = serde_json::to_vec(state).expect("a state serialises");
    tmp.write_all(&text).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_state_loads_back_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert_eq!(load(&path, "file:///c").unwrap(), None);
        save(&path, &State::new("file:///c", "all", 7)).unwrap();
        save(&path, &State::new("file:///c", "all", 42)).unwrap();
        assert_eq!(
            load(&path, "file:///c").unwrap(),
            Some(State::new("file:///c", "all", 42))
        );
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"], "no temporary file is left behind");
    }

    #[test]
    fn a_cursor_within_a_group_loads_back_and_one_without_is_written_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let within = Within {
            windows: 3,
            closure: "0123456789abcdef".into(),
        };
        let s = State::new("file:///c", "2 paths", 0).within(Some(within));
        save(&path, &s).unwrap();
        assert_eq!(load(&path, "file:///c").unwrap(), Some(s));
        save(&path, &State::new("file:///c", "2 paths", 2)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("within"), "{text}");
    }

    #[test]
    fn a_torn_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let full = serde_json::to_string(&State::new("file:///c", "all", 42)).unwrap();
        std::fs::write(&path, &full[..full.len() / 2]).unwrap();
        let e = load(&path, "file:///c").unwrap_err();
        assert!(matches!(e, StateError::Unreadable { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("remove it"), "{msg}");
        std::fs::write(
            &path,
            r#"{"version":2,"url":"file:///c","selection":"all","cursor":1}"#,
        )
        .unwrap();
        assert!(matches!(
            load(&path, "file:///c"),
            Err(StateError::Unreadable { .. })
        ));
    }

    #[test]
    fn a_state_file_of_another_cache_is_an_error_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        save(&path, &State::new("file:///a", "all", 3)).unwrap();
        let msg = load(&path, "file:///b").unwrap_err().to_string();
        assert!(
            msg.contains("file:///a") && msg.contains("file:///b") && msg.contains("state.json"),
            "{msg}"
        );
    }

    #[test]
    fn the_default_path_is_one_per_url_in_the_state_dir() {
        let a = default_path(Path::new("/var/lib/narflow"), "s3://a");
        let b = default_path(Path::new("/var/lib/narflow"), "s3://b");
        assert_ne!(a, b);
        assert!(a.starts_with("/var/lib/narflow"));
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("backfill-") && name.ends_with(".json") && name.len() == 30);
    }
}
