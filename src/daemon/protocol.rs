//! The daemon's side of the line protocol lives with the hook in [`crate::handoff`], which
//! the `narflow-hook` binary builds without optional dependencies; this is its old path.
pub use crate::handoff::protocol::*;
