//! Pure Nix formats: nix32, hashes, store paths, NAR, narinfo, signing, nix-cache-info,
//! compression names.
//!
//! This module is synchronous and knows nothing of tokio, S3, the local store or the
//! pipeline. It reads from `BufRead`/`Read` and byte slices, writes to `Write`, handles file
//! names as bytes, and is tested byte for byte against real Nix.

pub mod cache_info;
pub mod compression;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nix32;
pub mod signing;
pub mod store_path;
