//! nix32: Nix's base-32 encoding (alphabet `0123456789abcdfghijklmnpqrsvwxyz`, no e/o/u/t),
//! with Nix's own bit order (the last character holds the lowest bits of byte 0).

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nix32Error {
    #[error("invalid nix32 character {0:?} at index {1}")]
    InvalidChar(char, usize),
    #[error("nix32 string has length {actual}, expected {expected}")]
    InvalidLength { expected: usize, actual: usize },
    #[error("nix32 string has non-zero padding bits")]
    NonZeroPadding,
}

/// Length of the nix32 encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

pub fn encode(bytes: &[u8]) -> String {
    let _ = bytes;
    unimplemented!()
}

/// Decodes a nix32 string of exactly `encoded_len(N)` characters into `N` bytes.
pub fn decode<const N: usize>(s: &[u8]) -> Result<[u8; N], Nix32Error> {
    let _ = s;
    unimplemented!()
}
