//! narinfo: the text file describing one store path in a binary cache.
//!
//! Rendered fields, in Nix's order, one `Key: value\n` per line: StorePath, URL,
//! Compression, FileHash, FileSize, NarHash, NarSize, References (basenames, sorted,
//! space-separated; `References: ` with a trailing space when empty), Deriver (basename,
//! only when known), Sig (repeatable), CA (only when set). Unknown keys are ignored on parse.
use crate::format::hash::Sha256;
use crate::format::signing::Signature;
use crate::format::store_path::StorePath;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    #[error("narinfo line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("narinfo: missing required field {0}")]
    Missing(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Relative to the cache root, e.g. `nar/<FileHash nix32>.nar.zst`.
    pub url: String,
    /// `zstd`, `xz`, `none`, ... as Nix names it.
    pub compression: String,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted (the set order of [`StorePath`]).
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
}

impl NarInfo {
    /// Parses narinfo text. `store_dir` is the cache's StoreDir.
    ///
    /// # Errors
    /// [`NarInfoError`] naming the line and field.
    pub fn parse(text: &str, store_dir: &str) -> Result<Self, NarInfoError> {
        let _ = (text, store_dir);
        unimplemented!()
    }
    /// Renders in Nix's exact field order.
    pub fn render(&self, store_dir: &str) -> String {
        let _ = store_dir;
        unimplemented!()
    }
    /// The fingerprint that signatures cover.
    pub fn fingerprint(&self, store_dir: &str) -> String {
        crate::format::signing::fingerprint(
            store_dir,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }
}
