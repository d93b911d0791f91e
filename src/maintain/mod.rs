//! Maintaining a cache: `narflow verify` (what is wrong with it; it reads the cache and
//! never writes to it) and `narflow gc`'s mark and sweep. gc's planner decides what may go
//! and in which order and never touches a cache; the run lists the cache into an
//! [`index::CacheIndex`] and hands the planner's batches to the cache in order.
//!
//! - [`verify`]: checks a cache from one listing.
//! - [`problem`]: the kinds of problem verify reports, and one problem.
//! - [`contents`]: `verify --contents`'s check of one NAR, streamed, and its ceiling.
//! - [`repair`]: `verify --repair`: what the local store can mend goes up again through
//!   the push pipeline; what it cannot is deleted referrers first, when asked.
//! - [`index`]: the compact in-memory index of a cache's narinfos, NARs, `.ls` files and
//!   logs that the planner reads (hash parts as 20 bytes, sizes, modification times).
//! - [`roots`]: the roots as the user names them (`--keep-closure-of`, `--keep-file`).
//! - [`gc_plan`]: roots, reachability through References, and the deletion batches,
//!   referrers first.
//! - [`gc`]: one run of gc: its marker and heartbeat, the listing, the plan and the
//!   deletions, batch after batch.

pub mod contents;
pub mod gc;
pub mod gc_plan;
pub mod index;
pub mod problem;
pub mod repair;
pub mod roots;
pub mod verify;

#[cfg(test)]
mod tests;
