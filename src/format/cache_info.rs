//! `nix-cache-info`: the file at a binary cache's root.
//!
//! Owns the text form only; it never reads or writes a cache. Nix 2.8 itself writes just
//! `StoreDir: /nix/store\n` when it creates a `file://` cache; narflow writes all three keys,
//! as cache.nixos.org serves them.

/// The contents of `nix-cache-info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: String,
    pub want_mass_query: bool,
    pub priority: u32,
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
}
