//! The NAR (Nix ARchive) format: the one serialisation of a store path that Nix hashes, signs
//! and copies. flotilla must produce it byte for byte as `nix-store --dump` does, or hashes
//! would not match, and must read it from untrusted peers, so the parser is a security
//! boundary: it must never let an archive name a path outside its destination, and it never
//! buffers a whole file. Parsing ([`NarParser`]) is kept apart from writing to disk
//! ([`decode_to_path`]) so the parser can be fuzzed without touching the filesystem.
//!
//! Grammar (every string is a little-endian u64 length, the bytes, then zero padding to 8):
//! ```text
//! nar   = "nix-archive-1" node
//! node  = "(" "type" ( "regular" ["executable" ""] "contents" bytes
//!                    | "symlink" "target" target
//!                    | "directory" { "entry" "(" "name" name "node" node ")" } ) ")"
//! ```

mod decode;
mod encode;
mod parse;

pub use decode::{decode_to_path, DecodeOptions};
pub use encode::{encode_path, hash_path};
pub use parse::{NarEvent, NarParser, NarStats};

/// The first string of every NAR.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";
/// Longest directory entry name accepted (Linux's NAME_MAX).
pub const MAX_NAME_LEN: u64 = 255;
/// Longest symlink target accepted (Linux's PATH_MAX).
pub const MAX_TARGET_LEN: u64 = 4096;
/// Deepest directory nesting accepted: a path deeper than this exceeds PATH_MAX, so neither
/// Nix nor flotilla could have written it.
pub const MAX_DEPTH: usize = 2048;
/// Size of the copy buffers: large enough that a 1 GB file costs few system calls.
pub(crate) const BUF_SIZE: usize = 256 * 1024;

/// Bytes of zero padding after a string of `len` bytes.
pub(crate) const fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `printf hello > f; nix-store --dump f` (Nix 2.8), kept here so the format is pinned
    /// even where Nix is not installed; the tests in `tests/golden.rs` check against live Nix.
    const HELLO_NAR: &[u8] = b"\x0d\0\0\0\0\0\0\0nix-archive-1\0\0\0\
        \x01\0\0\0\0\0\0\0(\0\0\0\0\0\0\0\x04\0\0\0\0\0\0\0type\0\0\0\0\
        \x07\0\0\0\0\0\0\0regular\0\x08\0\0\0\0\0\0\0contents\
        \x05\0\0\0\0\0\0\0hello\0\0\0\x01\0\0\0\0\0\0\0)\0\0\0\0\0\0\0";

    #[test]
    fn encodes_a_file_like_nix() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, "hello").unwrap();
        let mut out = Vec::new();
        assert_eq!(encode_path(&f, &mut out).unwrap(), HELLO_NAR.len() as u64);
        assert_eq!(out, HELLO_NAR);
        assert_eq!(
            hash_path(&f).unwrap().hash,
            crate::NarHash::digest(HELLO_NAR)
        );
    }

    #[test]
    fn parses_a_file_into_events() {
        let mut p = NarParser::new(HELLO_NAR).exact_end(true);
        assert_eq!(
            p.next_event().unwrap(),
            NarEvent::File {
                executable: false,
                size: 5
            }
        );
        let mut buf = [0u8; 3];
        assert_eq!(p.read_contents(&mut buf).unwrap(), 3);
        assert_eq!(&buf, b"hel");
        // The rest is skipped (and checked) by asking for the next event.
        assert_eq!(p.next_event().unwrap(), NarEvent::End);
        assert_eq!(p.next_event().unwrap(), NarEvent::End);
        let stats = p.stats();
        assert_eq!(
            (stats.nar_size, stats.files, stats.file_bytes),
            (HELLO_NAR.len() as u64, 1, 5)
        );
    }

    #[test]
    fn padding_rounds_to_eight() {
        assert_eq!([0, 1, 7, 8, 9, 13].map(padding), [0, 7, 1, 0, 7, 3]);
    }
}
