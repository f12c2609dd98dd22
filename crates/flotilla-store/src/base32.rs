//! Nix's base-32: the alphabet of store path hashes and of `sha256:` hashes in narinfo files.
//! It exists because Nix's variant is not RFC 4648: it omits `e o u t` and writes the *last*
//! 5-bit group first, so a naive base-32 codec produces strings Nix never matches. It must
//! never accept a string that Nix would reject (wrong length, unknown character, or bits set
//! beyond the byte length), so one hash has exactly one spelling.

use crate::error::{clip, Error, Result};
use crate::path::NIX_BASE32_CHARS;

/// Maps an ASCII byte to its digit value, or 0xff if it is not in the alphabet.
const DIGITS: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 32 {
        t[NIX_BASE32_CHARS[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Length of the nix-base32 spelling of `bytes` bytes (52 for a sha256).
pub const fn encoded_len(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else {
        (bytes * 8 - 1) / 5 + 1
    }
}

/// Encodes bytes as Nix prints them (`nix-hash --to-base32`).
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut s = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = u16::from(bytes[i]) >> j;
        let hi = bytes.get(i + 1).map_or(0, |&x| u16::from(x) << (8 - j));
        s.push(NIX_BASE32_CHARS[usize::from((lo | hi) & 0x1f)] as char);
    }
    s
}

/// Decodes a nix-base32 string into exactly `out.len()` bytes.
pub fn decode_into(s: &str, out: &mut [u8]) -> Result<()> {
    let bad = |reason| Error::InvalidBase32 {
        input: clip(s.as_bytes()),
        reason,
    };
    if s.len() != encoded_len(out.len()) {
        return Err(bad("wrong length"));
    }
    out.fill(0);
    for (n, &c) in s.as_bytes().iter().rev().enumerate() {
        let digit = DIGITS[usize::from(c)];
        if digit == 0xff {
            return Err(bad("character outside the nix-base32 alphabet"));
        }
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let wide = u16::from(digit) << j;
        out[i] |= wide as u8;
        let carry = (wide >> 8) as u8;
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry,
            None if carry != 0 => return Err(bad("bits set beyond the last byte")),
            None => {}
        }
    }
    Ok(())
}

/// Decodes a nix-base32 string, inferring the byte length from the string length.
pub fn decode(s: &str) -> Result<Vec<u8>> {
    let mut out = vec![0; s.len() * 5 / 8];
    decode_into(s, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Each pair is `nix-hash --type T --to-base32 HEX` from Nix 2.8.
    const CASES: &[(&str, &str)] = &[
        (
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic",
        ),
        (
            "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d",
            "9m1skbnr5i43n3yypvda5s65vhfwdx5a",
        ),
        (
            "5d41402abc4b2a76b9719d911017c592",
            "4jqlbi14cxf6wpcajbphm40hax",
        ),
    ];

    #[test]
    fn matches_nix_hash() {
        for (h, b32) in CASES {
            assert_eq!(encode(&hex(h)), *b32);
            assert_eq!(decode(b32).unwrap(), hex(h));
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(16), 26);
        assert_eq!(encode(&[]), "");
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn rejects_bad_input() {
        let good = CASES[0].1;
        let mut out = [0u8; 32];
        assert!(decode_into(&good[1..], &mut out).is_err());
        assert!(decode_into(&format!("e{}", &good[1..]), &mut out).is_err());
        // The first character holds the top 4 bits of the last 5-bit group: 256 bits need only
        // one of them, so `1`..`z` up front would set bits beyond the 32 bytes.
        assert!(decode_into(&format!("z{}", &good[1..]), &mut out).is_err());
        assert!(decode_into(&format!("1{}", &good[1..]), &mut out).is_ok());
        assert!(decode_into(&format!("2{}", &good[1..]), &mut out).is_err());
    }

    #[test]
    fn round_trips_every_length() {
        for n in 0..70usize {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let s = encode(&bytes);
            assert_eq!(s.len(), encoded_len(n));
            assert_eq!(decode(&s).unwrap(), bytes, "{n}");
        }
    }
}
