//! ed25519 signing in Nix's formats.
//!
//! Secret key file: `<name>:<base64 of 64 bytes = 32-byte seed ‖ 32-byte public key>`.
//! Public key: `<name>:<base64 of 32 bytes>`. Signature: `<name>:<base64 of 64 bytes>`.
//! Fingerprint: `1;<store path>;<sha256:nix32 NarHash>;<NarSize>;<ref paths, sorted, comma-joined>`.
use crate::format::hash::Sha256;
use crate::format::store_path::StorePath;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{what}: expected <name>:<base64>, {reason}")]
    Malformed { what: &'static str, reason: String },
}

/// A secret signing key with its Nix key name.
pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secret material.
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Parses a Nix secret key (surrounding whitespace ignored). Checks that the embedded
    /// public key matches the seed.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let _ = s;
        unimplemented!()
    }
    /// Builds a key from a 32-byte seed (tests, key generation).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        Self {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The secret key in Nix's file format.
    pub fn to_nix_string(&self) -> String {
        unimplemented!()
    }
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }
    /// Signs a fingerprint.
    pub fn sign(&self, fingerprint: &str) -> Signature {
        let _ = fingerprint;
        unimplemented!()
    }
}

/// A public key with its Nix key name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl VerifyingKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let _ = s;
        unimplemented!()
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// True when `sig` is by this key (same name) and valid over `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &Signature) -> bool {
        let _ = (fingerprint, sig);
        unimplemented!()
    }
}

/// `<name>:<base64 32 bytes>`.
impl fmt::Display for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let _ = f;
        unimplemented!()
    }
}

/// A detached signature `<key name>:<base64 64 bytes>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub key_name: String,
    pub bytes: [u8; 64],
}

impl Signature {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let _ = s;
        unimplemented!()
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let _ = f;
        unimplemented!()
    }
}

/// The string Nix signs for a store path.
pub fn fingerprint(
    store_dir: &str,
    path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let _ = (store_dir, path, nar_hash, nar_size, references);
    unimplemented!()
}
