//! ed25519 signing in Nix's formats.
//!
//! Secret key file: `<name>:<base64 of 64 bytes = 32-byte seed ‖ 32-byte public key>`.
//! Public key: `<name>:<base64 of 32 bytes>`. Signature: `<name>:<base64 of 64 bytes>`.
//! Fingerprint: `1;<store path>;<sha256:nix32 NarHash>;<NarSize>;<ref paths, sorted, comma-joined>`.
//!
//! This module owns key parsing, the fingerprint and the ed25519 operations. It never
//! prints, logs or puts into an error message any part of a secret key, and wipes the
//! decoded key bytes it handles once they are no longer needed.
use crate::format::hash::Sha256;
use crate::format::store_path::StorePath;
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use ed25519_dalek::Signer;
use std::fmt;
use zeroize::Zeroizing;

/// Standard base64. Nix always writes padding; on input we also take unpadded text, as
/// Nix's own decoder stops at the first `=` and does not require it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A key or signature that is not in Nix's `<name>:<base64>` form. Bad input: retrying
/// cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// `what` is `secret key`, `public key` or `signature`; `reason` says what is wrong and
    /// never contains secret material.
    #[error("{what}: expected <name>:<base64>, {reason}")]
    Malformed { what: &'static str, reason: String },
}

/// Splits `<name>:<base64>` and decodes the base64 into exactly `N` bytes.
///
/// `secret` keeps the base64 decoder's message (which quotes an offending character and
/// its offset) out of the error. The decoded bytes are wiped from memory when dropped,
/// here and in the result, since for a secret key they are the seed.
fn split_and_decode<const N: usize>(
    s: &str,
    what: &'static str,
    secret: bool,
) -> Result<(String, Zeroizing<[u8; N]>), KeyError> {
    let err = |reason: String| KeyError::Malformed { what, reason };
    let (name, b64) = s
        .split_once(':')
        .ok_or_else(|| err("but there is no `:`".into()))?;
    if name.is_empty() {
        return Err(err("but the key name before `:` is empty".into()));
    }
    if let Some(c) = name.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(err(format!(
            "but the key name {name:?} contains {c:?} (whitespace and control characters \
             would break narinfo and nix.conf)"
        )));
    }
    let bytes = Zeroizing::new(BASE64.decode(b64).map_err(|e| {
        err(if secret {
            "but the part after `:` is not valid base64".into()
        } else {
            format!("but the part after `:` is not valid base64 ({e})")
        })
    })?);
    if bytes.len() != N {
        let len = bytes.len();
        return Err(err(format!(
            "but the base64 decodes to {len} bytes, not {N}"
        )));
    }
    let mut arr = Zeroizing::new([0u8; N]);
    arr.copy_from_slice(&bytes);
    Ok((name.to_owned(), arr))
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
    /// Parses a Nix secret key (surrounding whitespace ignored), as written by
    /// `nix-store --generate-binary-cache-key`. Checks that the embedded public key
    /// matches the seed.
    ///
    /// # Errors
    /// [`KeyError::Malformed`] saying what is wrong: no `:`, an empty name, bad base64, a
    /// length other than 64 bytes, or a public half that does not belong to the seed. The
    /// message never contains the secret.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        const WHAT: &str = "secret key";
        let (name, bytes) = split_and_decode::<64>(s.trim(), WHAT, true)?;
        let (seed, public) = bytes.split_at(32);
        let mut seed_bytes = Zeroizing::new([0u8; 32]);
        seed_bytes.copy_from_slice(seed);
        // ed25519-dalek wipes its copy of the seed when the key is dropped.
        let key = ed25519_dalek::SigningKey::from_bytes(&seed_bytes);
        if key.verifying_key().as_bytes() != public {
            return Err(KeyError::Malformed {
                what: WHAT,
                reason: format!(
                    "but the public key half of {name:?} does not match its seed (a corrupt \
                     or hand-edited key file)"
                ),
            });
        }
        Ok(Self { name, key })
    }
    /// Builds a key from a 32-byte seed (tests, key generation).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        Self {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }
    /// The key name, the part before `:`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The secret key in Nix's file format, `<name>:<base64 of seed ‖ public key>`,
    /// without a trailing newline (as Nix writes it).
    pub fn to_nix_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }
    /// The public key, with the same name.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }
    /// Signs a fingerprint (see [`fingerprint`]): ed25519 over its bytes.
    pub fn sign(&self, fingerprint: &str) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(fingerprint.as_bytes()).to_bytes(),
        }
    }
}

/// A public key with its Nix key name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl VerifyingKey {
    /// Parses `<name>:<base64 of 32 bytes>` (surrounding whitespace ignored), as in a
    /// `.pub` file or `trusted-public-keys`.
    ///
    /// # Errors
    /// [`KeyError::Malformed`] saying what is wrong: no `:`, an empty name, bad base64, a
    /// length other than 32 bytes, or bytes that are not an ed25519 point.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        const WHAT: &str = "public key";
        let (name, bytes) = split_and_decode::<32>(s.trim(), WHAT, false)?;
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Malformed {
                what: WHAT,
                reason: format!("but the 32 bytes of {name:?} are not an ed25519 public key"),
            })?;
        Ok(Self { name, key })
    }
    /// The key name, the part before `:`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// True when `sig` is by this key (same name) and valid over `fingerprint`.
    ///
    /// Verification is strict (it refuses weak keys and non-canonical signatures, as
    /// libsodium does for Nix); a signature Nix accepts, we accept.
    pub fn verify(&self, fingerprint: &str, sig: &Signature) -> bool {
        sig.key_name == self.name
            && self
                .key
                .verify_strict(
                    fingerprint.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&sig.bytes),
                )
                .is_ok()
    }
}

/// `<name>:<base64 32 bytes>`.
impl fmt::Display for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

/// A detached signature `<key name>:<base64 64 bytes>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub key_name: String,
    pub bytes: [u8; 64],
}

impl Signature {
    /// Parses `<key name>:<base64 of 64 bytes>`, the value of a narinfo `Sig:` line.
    /// Unlike keys, the text is taken as is (no trimming).
    ///
    /// # Errors
    /// [`KeyError::Malformed`] saying what is wrong: no `:`, an empty name, bad base64, or
    /// a length other than 64 bytes.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (key_name, bytes) = split_and_decode::<64>(s, "signature", false)?;
        Ok(Self {
            key_name,
            bytes: *bytes,
        })
    }
}

/// `<key name>:<base64 64 bytes>`.
impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, BASE64.encode(self.bytes))
    }
}

/// The string Nix signs for a store path:
/// `1;<store_dir>/<path>;sha256:<nix32 NarHash>;<NarSize>;<references as full paths,
/// sorted, comma-joined>`.
///
/// `references` need not be sorted or unique: they are sorted and deduplicated here, since
/// Nix signs its reference *set*, and a fingerprint in any other order would not verify.
pub fn fingerprint(
    store_dir: &str,
    path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let mut refs: Vec<&StorePath> = references.iter().collect();
    refs.sort_unstable();
    refs.dedup();
    let mut out = format!("1;{};{nar_hash};{nar_size};", path.to_absolute(store_dir));
    for (i, r) in refs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(store_dir);
        out.push('/');
        out.push_str(r.base_name());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // A throwaway key pair made by `nix-store --generate-binary-cache-key exp-1 sec pub`
    // (Nix 2.8), and the signature Nix wrote for a path signed with it (`nix store sign`,
    // then `nix copy --to file://`).
    const SEC: &str = "exp-1:IZLB2s9QKUFleB8TiLmsyuq/l5LLVUoG41OXdgN9NFbMk6LEUquqpHNeXD9suIIqEnwQNYBrij8kO161sJAtiQ==";
    const PUB: &str = "exp-1:zJOixFKrqqRzXlw/bLiCKhJ8EDWAa4o/JDtetbCQLYk=";
    const NIX_FP: &str = "1;/nix/store/nv3v6fjvj5dhh814srann0mh8hw0g41v-nfx-top;\
        sha256:0jf45dphcrr30yq5sva8gdakxa9cyclhshqjm3p79k236p4ianif;168;\
        /nix/store/9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep";
    const NIX_SIG: &str = "exp-1:0UncwSqRiGw1lPJJmWB5QSrxeeevmGGB+qBCKN3sr0jDmszTs6qhalOAVpId2PVczvR2XLPLgknBmPGosC4ODQ==";

    fn sp(base: &str) -> StorePath {
        StorePath::from_base_name(base).unwrap()
    }

    #[test]
    fn nix_key_pair_and_signature() {
        let sk = SigningKey::parse(SEC).unwrap();
        assert_eq!(sk.name(), "exp-1");
        assert_eq!(sk.to_nix_string(), SEC.trim());
        assert_eq!(sk.verifying_key().to_string(), PUB);
        let vk = VerifyingKey::parse(PUB).unwrap();
        assert_eq!(vk, sk.verifying_key());
        let sig = Signature::parse(NIX_SIG).unwrap();
        assert_eq!(sig.to_string(), NIX_SIG);
        assert!(vk.verify(NIX_FP, &sig));
        // ed25519 is deterministic: we make the very signature Nix made.
        assert_eq!(sk.sign(NIX_FP), sig);
    }

    #[test]
    fn fingerprint_golden() {
        let fp = fingerprint(
            "/nix/store",
            &sp("nv3v6fjvj5dhh814srann0mh8hw0g41v-nfx-top"),
            &Sha256::parse("sha256:0jf45dphcrr30yq5sva8gdakxa9cyclhshqjm3p79k236p4ianif").unwrap(),
            168,
            &[sp("9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep")],
        );
        assert_eq!(fp, NIX_FP);
    }

    #[test]
    fn fingerprint_sorts_references_and_handles_none() {
        let h = Sha256([0; 32]);
        let p = sp("9zfkprp7xigl4ny63bvmiva5p5sk290q-p");
        let a = sp("0zfkprp7xigl4ny63bvmiva5p5sk290q-a");
        let b = sp("1zfkprp7xigl4ny63bvmiva5p5sk290q-b");
        let fp = fingerprint("/s", &p, &h, 5, &[b.clone(), a.clone(), b.clone()]);
        assert_eq!(
            fp,
            format!(
                "1;/s/9zfkprp7xigl4ny63bvmiva5p5sk290q-p;sha256:{};5;\
                 /s/0zfkprp7xigl4ny63bvmiva5p5sk290q-a,/s/1zfkprp7xigl4ny63bvmiva5p5sk290q-b",
                "0".repeat(52)
            )
        );
        assert_eq!(
            fingerprint("/s", &p, &h, 5, &[]),
            format!(
                "1;/s/9zfkprp7xigl4ny63bvmiva5p5sk290q-p;sha256:{};5;",
                "0".repeat(52)
            )
        );
    }

    #[test]
    fn parse_trims_whitespace_and_accepts_missing_padding() {
        let sk = SigningKey::parse(&format!("  {}\n\n", SEC.trim())).unwrap();
        assert_eq!(sk.to_nix_string(), SEC.trim());
        let vk = VerifyingKey::parse(&format!("{PUB}\n")).unwrap();
        assert_eq!(vk.to_string(), PUB);
        let vk2 = VerifyingKey::parse(PUB.trim_end_matches('=')).unwrap();
        assert_eq!(vk2, vk);
    }

    fn malformed(r: Result<impl fmt::Debug, KeyError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn secret_key_errors_say_what_is_wrong_without_the_secret() {
        let sec = SEC.trim();
        let b64 = sec.split_once(':').unwrap().1;
        let cases = [
            (b64.to_owned(), "no `:`"),
            (format!(":{b64}"), "key name before `:` is empty"),
            (format!("a b:{b64}"), "contains ' '"),
            (format!("k:{}!", &b64[..87]), "not valid base64"),
            (format!("k:{}", &b64[..40]), "decodes to 30 bytes, not 64"),
        ];
        for (input, reason) in &cases {
            let e = malformed(SigningKey::parse(input));
            assert!(e.starts_with("secret key: "), "{e}");
            assert!(e.contains(reason), "{input}: {e}");
            assert!(!e.contains(&b64[..20]), "secret leaked: {e}");
        }
        // A key whose public half belongs to another seed.
        let other = SigningKey::from_seed("exp-1", [7; 32]);
        let mut bytes = BASE64.decode(b64).unwrap();
        bytes[32..].copy_from_slice(other.verifying_key().key.as_bytes());
        let e = malformed(SigningKey::parse(&format!(
            "exp-1:{}",
            BASE64.encode(&bytes)
        )));
        assert!(e.contains("does not match its seed"), "{e}");
        assert!(!e.contains(&BASE64.encode(&bytes)[..20]), "{e}");
    }

    #[test]
    fn public_key_and_signature_errors() {
        let e = malformed(VerifyingKey::parse("exp-1"));
        assert!(e.starts_with("public key: ") && e.contains("no `:`"), "{e}");
        let e = malformed(VerifyingKey::parse("exp-1:AAAA"));
        assert!(e.contains("decodes to 3 bytes, not 32"), "{e}");
        let e = malformed(VerifyingKey::parse("exp-1:***"));
        assert!(e.contains("not valid base64"), "{e}");
        let e = malformed(Signature::parse(PUB));
        assert!(
            e.starts_with("signature: ") && e.contains("32 bytes, not 64"),
            "{e}"
        );
        let e = malformed(Signature::parse(":abc"));
        assert!(e.contains("empty"), "{e}");
        // Not a point on the curve: y = 2 has no x.
        let mut not_point = [0u8; 32];
        not_point[0] = 2;
        let e = malformed(VerifyingKey::parse(&format!(
            "k:{}",
            BASE64.encode(not_point)
        )));
        assert!(e.contains("not an ed25519 public key"), "{e}");
    }

    #[test]
    fn debug_hides_the_secret() {
        let sk = SigningKey::parse(SEC).unwrap();
        let d = format!("{sk:?}");
        assert!(
            d.contains("exp-1") && !d.contains(&SEC.trim()[6..26]),
            "{d}"
        );
    }

    proptest! {
        #[test]
        fn sign_then_verify(
            seed in proptest::array::uniform32(any::<u8>()),
            other_seed in proptest::array::uniform32(any::<u8>()),
            name in "[A-Za-z0-9._-]{1,20}",
            fp in ".{0,200}",
            bit in 0usize..512,
        ) {
            prop_assume!(seed != other_seed);
            let sk = SigningKey::from_seed(&name, seed);
            let vk = sk.verifying_key();
            let sig = sk.sign(&fp);
            prop_assert!(vk.verify(&fp, &sig));
            prop_assert_eq!(Signature::parse(&sig.to_string()).unwrap(), sig.clone());

            let mut flipped = sig.clone();
            flipped.bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(!vk.verify(&fp, &flipped));

            let mut renamed = sig.clone();
            renamed.key_name.push('x');
            prop_assert!(!vk.verify(&fp, &renamed));

            let other = SigningKey::from_seed(&name, other_seed).verifying_key();
            prop_assert!(!other.verify(&fp, &sig));
            let longer = format!("{fp}x");
            prop_assert!(!vk.verify(&longer, &sig));
        }

        #[test]
        fn key_strings_round_trip(
            seed in proptest::array::uniform32(any::<u8>()),
            name in "[A-Za-z0-9._-]{1,20}",
        ) {
            let sk = SigningKey::from_seed(&name, seed);
            let back = SigningKey::parse(&sk.to_nix_string()).unwrap();
            prop_assert_eq!(back.to_nix_string(), sk.to_nix_string());
            prop_assert_eq!(back.verifying_key(), sk.verifying_key());
            let vk = sk.verifying_key();
            prop_assert_eq!(VerifyingKey::parse(&vk.to_string()).unwrap(), vk);
        }
    }
}
