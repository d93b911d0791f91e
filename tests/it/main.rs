//! narflow's integration suite: one binary, real Nix (Debian nix-bin, set up by
//! `scripts/setup-nix`), shared helpers in `helpers`.

mod helpers;
mod nar_golden;
mod narinfo_nix;
mod push_nix;
mod store_nix;
