//! Store paths: `<store dir>/<32-char nix32 hash>-<name>`.
//!
//! Name rules (Nix 2.8's): 1..=211 characters from `[A-Za-z0-9+\-._?=]`; we also refuse the
//! names `.` and `..`, which no Nix can create.
use std::fmt;

pub const DEFAULT_STORE_DIR: &str = "/nix/store";
/// Length of the hash part (20 bytes in nix32).
pub const HASH_PART_LEN: usize = 32;
/// Longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("{path:?} is not in the Nix store {store_dir}")]
    NotInStore { path: String, store_dir: String },
    #[error("{path:?}: {reason}")]
    Invalid { path: String, reason: String },
}

impl StorePathError {
    /// The same error, naming `path` (the input as the user gave it) instead.
    fn with_path(self, path: &str) -> Self {
        match self {
            StorePathError::Invalid { reason, .. } => StorePathError::Invalid {
                path: path.to_owned(),
                reason,
            },
            other => other,
        }
    }
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
        let invalid = |reason: &str| StorePathError::Invalid {
            path: s.to_owned(),
            reason: reason.to_owned(),
        };
        if s.len() < HASH_PART_LEN + 2 || s.as_bytes()[HASH_PART_LEN] != b'-' {
            return Err(invalid("expected <32-character hash>-<name>"));
        }
        let (hash, name) = (&s[..HASH_PART_LEN], &s[HASH_PART_LEN + 1..]);
        crate::format::nix32::decode::<20>(hash.as_bytes())
            .map_err(|e| invalid(&format!("bad hash part: {e}")))?;
        if name.len() > MAX_NAME_LEN {
            return Err(invalid(&format!(
                "name is {} characters, more than {MAX_NAME_LEN}",
                name.len()
            )));
        }
        if let Some(c) = name
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
        {
            return Err(invalid(&format!(
                "name contains the forbidden character {c:?}"
            )));
        }
        if name == "." || name == ".." {
            return Err(invalid("name may not be `.` or `..`"));
        }
        Ok(StorePath {
            base_name: s.to_owned(),
        })
    }
    /// Parses an absolute path directly inside `store_dir` (a trailing `/` is accepted;
    /// a path below a store path, `/nix/store/x-foo/bin`, is rejected: use
    /// [`Self::from_absolute_path_prefix`] for that).
    pub fn from_absolute_path(path: &str, store_dir: &str) -> Result<Self, StorePathError> {
        let rest = Self::strip_store_dir(path, store_dir)?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(StorePathError::Invalid {
                path: path.to_owned(),
                reason: "is inside a store path, not a store path itself".into(),
            });
        }
        Self::from_base_name(rest).map_err(|e| e.with_path(path))
    }

    fn strip_store_dir<'a>(path: &'a str, store_dir: &str) -> Result<&'a str, StorePathError> {
        path.strip_prefix(store_dir)
            .and_then(|r| r.strip_prefix('/'))
            .filter(|r| !r.is_empty())
            .ok_or_else(|| StorePathError::NotInStore {
                path: path.to_owned(),
                store_dir: store_dir.to_owned(),
            })
    }
    /// Like [`Self::from_absolute_path`] but accepts paths below a store path and returns
    /// the store path that contains them.
    pub fn from_absolute_path_prefix(path: &str, store_dir: &str) -> Result<Self, StorePathError> {
        let rest = Self::strip_store_dir(path, store_dir)?;
        let base = rest.split('/').next().unwrap_or(rest);
        Self::from_base_name(base).map_err(|e| e.with_path(path))
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &str = "qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-hi.txt";

    #[test]
    fn parses_real_paths() {
        let p = StorePath::from_base_name(P).unwrap();
        assert_eq!(
            (p.hash_part(), p.name()),
            ("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28", "hi.txt")
        );
        let abs = format!("/nix/store/{P}");
        assert_eq!(
            StorePath::from_absolute_path(&abs, DEFAULT_STORE_DIR).unwrap(),
            p
        );
        assert_eq!(
            StorePath::from_absolute_path(&format!("{abs}/"), DEFAULT_STORE_DIR).unwrap(),
            p
        );
        assert_eq!(p.to_absolute(DEFAULT_STORE_DIR), abs);
        assert_eq!(
            StorePath::from_absolute_path_prefix(&format!("{abs}/bin/sh"), DEFAULT_STORE_DIR)
                .unwrap(),
            p
        );
    }

    #[test]
    fn rejects_with_reason() {
        let cases = [
            ("short", "expected <32-character hash>-<name>"),
            (
                "qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-",
                "expected <32-character hash>-<name>",
            ),
            ("qs2vcw1sd6lzsvgvq6gggnw1v31qrm2e-x", "bad hash part"),
            (
                "qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-a b",
                "forbidden character ' '",
            ),
            (
                "qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-..",
                "may not be `.` or `..`",
            ),
        ];
        for (input, reason) in cases {
            let e = StorePath::from_base_name(input).unwrap_err().to_string();
            assert!(e.contains(input) && e.contains(reason), "{input}: {e}");
        }
        let long = format!("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-{}", "a".repeat(212));
        assert!(
            StorePath::from_base_name(&long)
                .unwrap_err()
                .to_string()
                .contains("more than 211")
        );
        let e = StorePath::from_absolute_path("/tmp/x", DEFAULT_STORE_DIR).unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"/tmp/x\" is not in the Nix store /nix/store"
        );
        let e = StorePath::from_absolute_path(&format!("/nix/store/{P}/bin"), DEFAULT_STORE_DIR)
            .unwrap_err();
        assert!(e.to_string().contains("inside a store path"), "{e}");
        assert!(StorePath::from_absolute_path("/nix/store", DEFAULT_STORE_DIR).is_err());
        assert!(StorePath::from_absolute_path("/nix/storex/abc", DEFAULT_STORE_DIR).is_err());
    }

    #[test]
    fn order_is_bytewise_on_base_name() {
        let a = StorePath::from_base_name("0s2vcw1sd6lzsvgvq6gggnw1v31qrm28-z").unwrap();
        let b = StorePath::from_base_name("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-a").unwrap();
        assert!(a < b);
    }

    proptest! {
        #[test]
        fn round_trip(hash in proptest::array::uniform20(any::<u8>()), name in "[A-Za-z0-9+._?=-][A-Za-z0-9+._?=-]{0,80}") {
            prop_assume!(name != "." && name != "..");
            let base = format!("{}-{name}", crate::format::nix32::encode(&hash));
            let p = StorePath::from_base_name(&base).unwrap();
            prop_assert_eq!(p.base_name(), base.as_str());
            prop_assert_eq!(StorePath::from_absolute_path(&p.to_absolute("/nix/store"), "/nix/store").unwrap(), p);
        }
    }
}
