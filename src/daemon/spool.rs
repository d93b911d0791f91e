//! The hook's spool lives in [`crate::handoff`], which the `narflow-hook` binary builds
//! without optional dependencies; this is its old path, for the daemon that drains it.
pub use crate::handoff::spool::*;
