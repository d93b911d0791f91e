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

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Reverse lookup: byte value to digit, 0xff for bytes outside the alphabet.
const DIGITS: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 32 {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// The 5-bit group `n` (counted from the least significant end) of `bytes`, read as one
/// little-endian number.
fn group(bytes: &[u8], n: usize) -> u8 {
    let bit = n * 5;
    let (i, j) = (bit / 8, bit % 8);
    let lo = bytes[i] >> j;
    let hi = match bytes.get(i + 1) {
        Some(&b) if j > 3 => b << (8 - j),
        _ => 0,
    };
    (lo | hi) & 0x1f
}

/// Encodes `bytes` in nix32. Group 0 (the lowest bits) is the last character.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    (0..len)
        .rev()
        .map(|n| ALPHABET[group(bytes, n) as usize] as char)
        .collect()
}

/// Decodes a nix32 string of exactly `encoded_len(N)` characters into `N` bytes.
///
/// # Errors
/// [`Nix32Error`] on a wrong length, a character outside the alphabet, or set bits beyond
/// the `N` bytes (a string Nix itself would never print).
pub fn decode<const N: usize>(s: &[u8]) -> Result<[u8; N], Nix32Error> {
    let expected = encoded_len(N);
    if s.len() != expected {
        return Err(Nix32Error::InvalidLength {
            expected,
            actual: s.len(),
        });
    }
    let mut out = [0u8; N];
    for (n, &c) in s.iter().rev().enumerate() {
        let digit = DIGITS[c as usize];
        if digit == 0xff {
            let index = s.len() - 1 - n;
            return Err(Nix32Error::InvalidChar(c as char, index));
        }
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        out[i] |= digit << j;
        let carry = if j > 3 { digit >> (8 - j) } else { 0 };
        match out.get_mut(i + 1) {
            Some(b) => *b |= carry,
            None if carry != 0 => return Err(Nix32Error::NonZeroPadding),
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vectors_from_nix() {
        // `nix-hash --type sha256 --to-base32` of the base16 digest of "hello\n" etc.
        let digest = [0u8; 32];
        assert_eq!(encode(&digest), "0".repeat(52));
        // sha256("") in nix32, as `nix hash to-base32` prints it.
        let empty: [u8; 32] = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ];
        assert_eq!(
            encode(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            decode::<32>(b"0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").unwrap(),
            empty
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            decode::<20>(b"abc"),
            Err(Nix32Error::InvalidLength {
                expected: 32,
                actual: 3
            })
        );
        let mut s = [b'0'; 32];
        s[5] = b'e';
        assert_eq!(decode::<20>(&s), Err(Nix32Error::InvalidChar('e', 5)));
        // 52 characters carry 260 bits; the top 4 must be zero for 32 bytes.
        let mut s = [b'0'; 52];
        s[0] = b'z';
        assert_eq!(decode::<32>(&s), Err(Nix32Error::NonZeroPadding));
    }

    proptest! {
        #[test]
        fn round_trip_32(bytes in proptest::array::uniform32(any::<u8>())) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), 52);
            prop_assert_eq!(decode::<32>(s.as_bytes()).unwrap(), bytes);
        }

        #[test]
        fn round_trip_20(bytes in proptest::array::uniform20(any::<u8>())) {
            let s = encode(&bytes);
            prop_assert_eq!(decode::<20>(s.as_bytes()).unwrap(), bytes);
        }
    }
}
