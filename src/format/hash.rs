//! SHA-256 digests in Nix's textual forms: `sha256:<nix32>`, `sha256:<base16>`, SRI
//! `sha256-<base64>`. NarHash and FileHash are both this type.
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashParseError {
    #[error("hash {0:?}: unsupported algorithm (only sha256)")]
    Algorithm(String),
    #[error("hash {0:?}: bad encoding: {1}")]
    Encoding(String, String),
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// Digest of `data`.
    pub fn digest(data: &[u8]) -> Self {
        use sha2::Digest;
        Sha256(sha2::Sha256::digest(data).into())
    }
    /// Parses `sha256:<nix32|base16|base64>` or SRI `sha256-<base64>`.
    ///
    /// # Errors
    /// [`HashParseError`] naming the input.
    pub fn parse(s: &str) -> Result<Self, HashParseError> {
        let (algo, rest, sri) = match (s.split_once(':'), s.split_once('-')) {
            (Some((a, r)), _) => (a, r, false),
            (None, Some((a, r))) => (a, r, true),
            (None, None) => return Err(HashParseError::Algorithm(s.to_owned())),
        };
        if algo != "sha256" {
            return Err(HashParseError::Algorithm(s.to_owned()));
        }
        let bad = |why: String| HashParseError::Encoding(s.to_owned(), why);
        if sri {
            return Self::from_base64(rest).map_err(bad);
        }
        match rest.len() {
            52 => crate::format::nix32::decode::<32>(rest.as_bytes())
                .map(Sha256)
                .map_err(|e| bad(e.to_string())),
            64 => Self::from_base16(rest).map_err(bad),
            44 => Self::from_base64(rest).map_err(bad),
            n => Err(bad(format!(
                "{n} characters is none of nix32 (52), base16 (64) or base64 (44)"
            ))),
        }
    }

    fn from_base16(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| {
                (c as char)
                    .to_digit(16)
                    .ok_or_else(|| format!("invalid base16 character {:?}", c as char))
            };
            out[i] = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
        }
        Ok(Sha256(out))
    }

    fn from_base64(s: &str) -> Result<Self, String> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| e.to_string())?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("{} bytes, expected 32", b.len()))?;
        Ok(Sha256(arr))
    }

    /// Bare nix32 (52 characters), as in NAR file names.
    pub fn to_nix32(&self) -> String {
        crate::format::nix32::encode(&self.0)
    }
    /// Bare lowercase base16.
    pub fn to_base16(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    /// `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        use base64::Engine;
        format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }
}

/// `sha256:<nix32>`, the form narinfo and fingerprints use.
impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}
impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A `Write` that hashes what passes through and counts bytes.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    bytes: u64,
}

impl<W> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        use sha2::Digest;
        Self {
            inner,
            hasher: sha2::Sha256::new(),
            bytes: 0,
        }
    }
    /// The inner writer (bytes written straight into it are not hashed).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
    /// Returns the inner writer, the digest and the byte count.
    pub fn finish(self) -> (W, Sha256, u64) {
        use sha2::Digest;
        (
            self.inner,
            Sha256(self.hasher.finalize().into()),
            self.bytes,
        )
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The NarHash of a one-line file as real Nix 2.8 prints it in its three forms
    // (DB: base16; `nix path-info --json`: SRI; narinfo: nix32).
    const B16: &str = "sha256:10551daed7fa467d0b58826e7eb9a0f2af7d693de319f2ef775fffcda244b9f6";
    const SRI: &str = "sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=";

    #[test]
    fn all_forms_agree() {
        let h = Sha256::parse(B16).unwrap();
        assert_eq!(Sha256::parse(SRI).unwrap(), h);
        assert_eq!(h.to_sri(), SRI);
        assert_eq!(format!("sha256:{}", h.to_base16()), B16);
        assert_eq!(Sha256::parse(&h.to_string()).unwrap(), h);
        assert_eq!(
            Sha256::parse(&B16.to_uppercase().replace("SHA256", "sha256")).unwrap(),
            h
        );
    }

    #[test]
    fn errors_name_the_input() {
        let e = Sha256::parse("md5:abc").unwrap_err();
        assert_eq!(e, HashParseError::Algorithm("md5:abc".into()));
        let e = Sha256::parse("sha256:xyz").unwrap_err().to_string();
        assert!(
            e.contains("sha256:xyz") && e.contains("3 characters"),
            "{e}"
        );
        let bad16 = format!("sha256:{}", "g".repeat(64));
        assert!(
            Sha256::parse(&bad16)
                .unwrap_err()
                .to_string()
                .contains("invalid base16")
        );
        assert!(Sha256::parse("sha256").is_err());
    }

    #[test]
    fn hashing_writer_matches_digest() {
        use std::io::Write;
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (inner, digest, n) = w.finish();
        assert_eq!((inner.as_slice(), n), (&b"hello world"[..], 11));
        assert_eq!(digest, Sha256::digest(b"hello world"));
    }

    proptest! {
        #[test]
        fn every_form_round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
            let h = Sha256(bytes);
            prop_assert_eq!(Sha256::parse(&h.to_string()).unwrap(), h);
            prop_assert_eq!(Sha256::parse(&h.to_sri()).unwrap(), h);
            let b16 = format!("sha256:{}", h.to_base16());
            prop_assert_eq!(Sha256::parse(&b16).unwrap(), h);
        }
    }
}
