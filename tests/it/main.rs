//! narflow's integration suite: one binary, real Nix (Debian nix-bin, set up by
//! `scripts/setup-nix`), shared helpers in `helpers`.

mod helpers;
mod store_nix;
