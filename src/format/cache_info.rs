//! `nix-cache-info`: the file at a binary cache's root.
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
    /// Parses the file; unknown keys are ignored, StoreDir is required.
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
