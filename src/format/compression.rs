//! NAR compression as Nix names it: zstd, xz or none, with the narinfo `Compression:` value,
//! the file extension and the valid levels of each. Names and numbers only, no codec.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Xz,
    None,
}

impl Compression {
    /// Parses a Nix compression name.
    ///
    /// # Errors
    /// A message naming the value and the accepted ones.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "xz" => Ok(Compression::Xz),
            "none" => Ok(Compression::None),
            other => Err(format!(
                "unsupported compression {other:?} (zstd, xz or none)"
            )),
        }
    }
    /// The narinfo `Compression:` value.
    pub fn nix_name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::None => "none",
        }
    }
    /// The NAR file extension, as Nix names NAR files.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => ".nar.zst",
            Compression::Xz => ".nar.xz",
            Compression::None => ".nar",
        }
    }
    /// Default level: zstd 3 (zstd's own default, fast), xz 6 (xz's default).
    pub fn default_level(self) -> i32 {
        match self {
            Compression::Zstd => 3,
            Compression::Xz => 6,
            Compression::None => 0,
        }
    }
    /// Valid levels.
    pub fn levels(self) -> std::ops::RangeInclusive<i32> {
        match self {
            Compression::Zstd => 1..=19,
            Compression::Xz => 0..=9,
            Compression::None => 0..=0,
        }
    }
}

/// Compression and level, validated together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressionSettings {
    pub kind: Compression,
    pub level: i32,
}

impl CompressionSettings {
    /// # Errors
    /// A message when `level` is outside the range `kind` accepts.
    pub fn new(kind: Compression, level: Option<i32>) -> Result<Self, String> {
        let level = level.unwrap_or_else(|| kind.default_level());
        if !kind.levels().contains(&level) {
            let r = kind.levels();
            return Err(format!(
                "compression level {level} is out of range for {} ({}..={})",
                kind.nix_name(),
                r.start(),
                r.end()
            ));
        }
        Ok(Self { kind, level })
    }
}

impl Default for CompressionSettings {
    fn default() -> Self {
        Self {
            kind: Compression::Zstd,
            level: 3,
        }
    }
}
