//! `nix-cache-info`: the file at a binary cache's root.
//!
//! Owns the text form only; it never reads or writes a cache. Nix 2.8 itself writes just
//! `StoreDir: /nix/store\n` when it creates a `file://` cache; narflow writes all three keys,
//! as cache.nixos.org serves them, with the values of the cache URL's `priority=` and
//! `want-mass-query=` when given ([`CacheInfoWanted`]).

/// The contents of `nix-cache-info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: String,
    pub want_mass_query: bool,
    pub priority: u32,
}

/// The values a writer wants `nix-cache-info` to have; `None` keeps what the file says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheInfoWanted {
    pub want_mass_query: Option<bool>,
    pub priority: Option<u32>,
}

impl Default for CacheInfo {
    fn default() -> Self {
        Self {
            store_dir: crate::format::store_path::DEFAULT_STORE_DIR.to_owned(),
            want_mass_query: true,
            priority: 40,
        }
    }
}

impl CacheInfo {
    /// `StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n`
    pub fn render(&self) -> String {
        format!(
            "StoreDir: {}\nWantMassQuery: {}\nPriority: {}\n",
            self.store_dir,
            u8::from(self.want_mass_query),
            self.priority
        )
    }
    /// `text` (a `nix-cache-info` that [`CacheInfo::parse`] accepts) with WantMassQuery
    /// and Priority set to the values `wanted` gives; every other line stays as it is, and
    /// a key the file lacks is added at the end. `None` when the file says so already.
    pub fn update_text(text: &str, wanted: &CacheInfoWanted) -> Option<String> {
        let want: Vec<(&str, String)> = [
            (
                "WantMassQuery",
                wanted.want_mass_query.map(|b| u8::from(b).to_string()),
            ),
            ("Priority", wanted.priority.map(|p| p.to_string())),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
        let mut seen = vec![false; want.len()];
        let mut changed = false;
        let mut out = String::with_capacity(text.len() + 32);
        for line in text.lines() {
            let key = line.split_once(": ").map_or(line, |(k, _)| k);
            if let Some(i) = want.iter().position(|(k, _)| *k == key) {
                let (k, v) = &want[i];
                if std::mem::replace(&mut seen[i], true) {
                    changed = true; // a repeated key: only the first, updated, stays
                    continue;
                }
                if line != format!("{k}: {v}") {
                    changed = true;
                    out.push_str(&format!("{k}: {v}\n"));
                    continue;
                }
            }
            out.push_str(line);
            out.push('\n');
        }
        for ((k, v), seen) in want.iter().zip(seen) {
            if !seen {
                changed = true;
                out.push_str(&format!("{k}: {v}\n"));
            }
        }
        changed.then_some(out)
    }

    /// Parses the file; unknown keys and blank lines are ignored, StoreDir is required.
    /// Absent WantMassQuery and Priority take [`CacheInfo::default`]'s values.
    ///
    /// # Errors
    /// A message naming the line, for a line that is not `Key: value` or a Priority that
    /// is not a number, or saying StoreDir is missing.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut info = CacheInfo {
            store_dir: String::new(),
            ..Default::default()
        };
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once(": ")
                .ok_or_else(|| format!("nix-cache-info line {}: expected `Key: value`", i + 1))?;
            match k {
                "StoreDir" => info.store_dir = v.to_owned(),
                "WantMassQuery" => info.want_mass_query = v == "1",
                "Priority" => {
                    info.priority = v
                        .parse()
                        .map_err(|_| format!("nix-cache-info line {}: bad Priority {v:?}", i + 1))?
                }
                _ => {}
            }
        }
        if info.store_dir.is_empty() {
            return Err("nix-cache-info: missing StoreDir".into());
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_exact_bytes() {
        assert_eq!(
            CacheInfo::default().render(),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
        );
        let other = CacheInfo {
            store_dir: "/gnu/store".into(),
            want_mass_query: false,
            priority: 10,
        };
        assert_eq!(
            other.render(),
            "StoreDir: /gnu/store\nWantMassQuery: 0\nPriority: 10\n"
        );
        assert_eq!(CacheInfo::parse(&other.render()).unwrap(), other);
    }

    #[test]
    fn parses_what_nix_and_caches_write() {
        // cache.nixos.org's file, and the one-line file Nix 2.8 itself writes for a new
        // `file://` cache. Absent keys take narflow's defaults.
        let info = CacheInfo::parse("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n");
        assert_eq!(info.unwrap(), CacheInfo::default());
        let info = CacheInfo::parse("StoreDir: /nix/store\n").unwrap();
        assert_eq!(info.store_dir, "/nix/store");
        // Unknown keys and blank lines are ignored; the last newline is optional.
        let info = CacheInfo::parse("X-Other: y\n\nPriority: 7\nStoreDir: /s").unwrap();
        assert_eq!((info.store_dir.as_str(), info.priority), ("/s", 7));
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            CacheInfo::parse("WantMassQuery: 1\n").unwrap_err(),
            "nix-cache-info: missing StoreDir"
        );
        let e = CacheInfo::parse("StoreDir: /nix/store\nPriority: high\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("Priority"), "{e}");
        let e = CacheInfo::parse("StoreDir /nix/store\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("Key: value"), "{e}");
    }

    #[test]
    fn update_sets_wanted_values_and_keeps_the_rest() {
        let both = CacheInfoWanted {
            want_mass_query: Some(false),
            priority: Some(10),
        };
        let text = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";
        assert_eq!(
            CacheInfo::update_text(text, &both).unwrap(),
            "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 10\n"
        );
        // Nothing wanted, or what is wanted is there already: no rewrite.
        assert_eq!(
            CacheInfo::update_text(text, &CacheInfoWanted::default()),
            None
        );
        let same = CacheInfoWanted {
            want_mass_query: Some(true),
            priority: None,
        };
        assert_eq!(CacheInfo::update_text(text, &same), None);
        // Keys the file lacks are added; unknown lines and their order stay; a repeated
        // key keeps only its first line; the missing last newline is added.
        let text = "X-Other: y\nStoreDir: /nix/store\nPriority: 5\nPriority: 6";
        let only_priority = CacheInfoWanted {
            want_mass_query: None,
            priority: Some(10),
        };
        assert_eq!(
            CacheInfo::update_text(text, &only_priority).unwrap(),
            "X-Other: y\nStoreDir: /nix/store\nPriority: 10\n"
        );
        assert_eq!(
            CacheInfo::update_text("StoreDir: /nix/store\n", &both).unwrap(),
            "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 10\n"
        );
    }
}
