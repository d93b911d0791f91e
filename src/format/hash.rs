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
        let _ = data;
        unimplemented!()
    }
    /// Parses `sha256:<nix32|base16|base64>` or SRI `sha256-<base64>`.
    ///
    /// # Errors
    /// [`HashParseError`] naming the input.
    pub fn parse(s: &str) -> Result<Self, HashParseError> {
        let _ = s;
        unimplemented!()
    }
    /// Bare nix32 (52 characters), as in NAR file names.
    pub fn to_nix32(&self) -> String {
        unimplemented!()
    }
    /// Bare lowercase base16.
    pub fn to_base16(&self) -> String {
        unimplemented!()
    }
    /// `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        unimplemented!()
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
        Self { inner, hasher: sha2::Sha256::new(), bytes: 0 }
    }
    /// Returns the inner writer, the digest and the byte count.
    pub fn finish(self) -> (W, Sha256, u64) {
        use sha2::Digest;
        (self.inner, Sha256(self.hasher.finalize().into()), self.bytes)
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
