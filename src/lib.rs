//! narflow: upload Nix store paths to binary caches, fast and with bounded memory.
//!
//! Modules, lowest layer first; a module uses only modules of lower layers
//! (`tests/it/layers.rs` checks it):
//! - [`format`](mod@format): pure Nix formats (nix32, hashes, store paths, NAR, narinfo, signing,
//!   compression names).
//! - [`handoff`]: what `narflow hook` and `narflow-hook` need to hand `$OUT_PATHS` to the
//!   daemon, or spool them: the hook, the line protocol, the spool (std only, built
//!   without `full`).
//! - [`memory`]: the one memory budget (`--memory`): its default, its shares and its floor.
//! - [`nar_fs`]: the NAR walker: archives, hashes and lists trees on disk (std only).
//! - `store`: the local Nix store, read-only (path info, closures, order, arguments).
//! - `cache`: binary cache destinations (`file://`, `s3://`, a null sink).
//! - `pipeline`: pushing a set of paths to a cache (plan, upload, publish).
//! - `maintain`: verifying a cache from its listing (`narflow verify`).
//! - `logs`: build logs of uploaded paths to `log/<drv>` (`--upload-logs`).
//! - `settings`: one `Settings` type for every command: defaults < config file < env < flags.
//! - `backfill`: `narflow backfill`: a whole store (or closures) in resumable windows.
//! - `daemon`: `narflow daemon`: the durable queue, the socket and the upload worker.
//! - `maintain`: cache maintenance: gc's mark and sweep planned over an index of the cache.
//! - `bench`: synthetic store-shaped workloads and the `narflow bench` measurements.
//!
//! ```text
//! // Public API:
//! let store = store::LocalStore::open("/nix/store", Path::new("/nix/var/nix/db/db.sqlite"));
//! let url = cache::url::CacheUrl::parse("file:///var/cache/nix")?;
//! let cache = cache::open(&url, &opts.cache_options(cache::S3Tuning::from_url(&url)?))?;
//! let report = pipeline::push(&store, cache.as_ref(), &paths, &opts, &NoProgress)?;
//! ```

#[cfg(feature = "full")]
pub mod backfill;
#[cfg(feature = "full")]
pub mod bench;
#[cfg(feature = "full")]
pub mod cache;
#[cfg(feature = "full")]
pub mod daemon;
pub mod format;
pub mod handoff;
#[cfg(feature = "full")]
pub mod logs;
#[cfg(feature = "full")]
pub mod maintain;
pub mod memory;
pub mod nar_fs;
#[cfg(feature = "full")]
pub mod pipeline;
#[cfg(feature = "full")]
pub mod settings;
#[cfg(feature = "full")]
pub mod store;
