//! Maintenance of a cache read from its listing: `verify` (what is wrong with it). It
//! reads the cache and never writes to it.
pub mod verify;
