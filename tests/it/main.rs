//! narflow's integration suite: one binary, real Nix (Debian nix-bin, set up by
//! `scripts/setup-nix`), shared helpers in `helpers`.

mod backfill;
mod config;
mod daemon;
mod docs;
mod durability;
mod first_contact;
mod gc;
mod gc_writers;
mod helpers;
mod hol;
mod layers;
mod logs;
mod make_store;
mod memory;
mod nar_golden;
mod narinfo_nix;
mod params;
mod proxy;
mod push_nix;
mod rate;
mod repair;
mod resume;
mod s3;
mod s3_faults;
mod s3_known;
mod s3_resume;
mod store_nix;
mod verify;
mod watch;
mod writers;
