//! The hand-off from a finished build to the daemon: the post-build-hook client
//! ([`hook`]), the line protocol both ends speak ([`protocol`]), the spool the hook falls
//! back to ([`spool`]), and the three keys of the config file the hook reads ([`config`]).
//!
//! Std, rustix and sha2 only, and compiled without the `full` feature: the
//! `narflow-hook` binary, which Nix runs after every build, links this module and nothing
//! that needs a runtime, the store or a cache. It must never grow an optional dependency
//! (`cargo build --bin narflow-hook --no-default-features` checks it).

pub mod config;
pub mod hook;
pub mod protocol;
pub mod spool;
