//! One test per way a NAR from a hostile peer can be malformed. Each asserts the error, and
//! that nothing was left at the destination or written anywhere else.

mod common;

use std::fs;
use std::io::Read;

use common::*;
use flotilla_store::nar::{MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN};
use flotilla_store::{decode_to_path, BadNameReason, DecodeOptions, Error, NarError, NarParser};

const EXACT: DecodeOptions = DecodeOptions {
    canonicalise: false,
    exact_end: true,
};

/// Decodes `bytes` into a fresh sandbox, expects a format error, checks nothing was left
/// anywhere, and checks the parser alone reports the same. Returns (offset, problem).
fn reject_with(bytes: &[u8], options: DecodeOptions) -> (u64, NarError) {
    let sb = Sandbox::new();
    let err = decode_to_path(bytes, &sb.dest(), options).expect_err("malformed NAR accepted");
    sb.assert_untouched(false);
    let Error::InvalidNar { offset, problem } = err else {
        panic!("expected InvalidNar, got {err:?}");
    };
    let parsed = NarParser::new(bytes).exact_end(options.exact_end).drain();
    match parsed {
        Err(Error::InvalidNar {
            offset: o,
            problem: p,
        }) => assert_eq!((o, &p), (offset, &problem)),
        other => panic!("parser alone gave {other:?}"),
    }
    (offset, problem)
}

fn reject(bytes: &[u8]) -> NarError {
    reject_with(bytes, EXACT).1
}

/// A directory NAR holding a first file entry `a` and then `entries` (tokens) after it.
fn dir_nar(entries: &[&[u8]]) -> Vec<u8> {
    let mut t: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
    t.extend_from_slice(entries);
    t.push(b")");
    nar(&t)
}

fn bad_name(name: &[u8]) -> BadNameReason {
    let mut entries = file_entry(b"a", b"first");
    entries.extend(file_entry(name, b"x"));
    match reject(&dir_nar(&entries)) {
        NarError::BadName { reason, .. } => reason,
        other => panic!("{other:?}"),
    }
}

#[test]
fn name_with_slash() {
    assert_eq!(bad_name(b"b/c"), BadNameReason::Slash);
    assert_eq!(bad_name(b"b/../../outside/x"), BadNameReason::Slash);
}

#[test]
fn name_with_nul() {
    assert_eq!(bad_name(b"b\0c"), BadNameReason::Nul);
}

#[test]
fn name_dot() {
    let nar = dir_nar(&file_entry(b".", b"x"));
    assert!(matches!(
        reject(&nar),
        NarError::BadName {
            reason: BadNameReason::Dot,
            ..
        }
    ));
}

#[test]
fn name_dot_dot() {
    let nar = dir_nar(&file_entry(b"..", b"x"));
    assert!(matches!(
        reject(&nar),
        NarError::BadName {
            reason: BadNameReason::Dot,
            ..
        }
    ));
}

#[test]
fn empty_name() {
    let nar = dir_nar(&file_entry(b"", b"x"));
    assert!(matches!(
        reject(&nar),
        NarError::BadName {
            reason: BadNameReason::Empty,
            ..
        }
    ));
}

#[test]
fn entries_out_of_order() {
    let mut e = file_entry(b"b", b"x");
    e.extend(file_entry(b"a", b"y"));
    let (offset, problem) = reject_with(&dir_nar(&e), EXACT);
    assert_eq!(
        problem,
        NarError::Unsorted {
            previous: "b".into(),
            name: "a".into()
        }
    );
    // The offset points at the second entry's name, after its `entry` `(` `name`.
    let before = nar(&[b"nix-archive-1", b"(", b"type", b"directory"]).len()
        + nar(&file_entry(b"b", b"x")).len()
        + nar(&[b"entry", b"(", b"name"]).len();
    assert_eq!(offset, before as u64);
}

#[test]
fn duplicate_entries() {
    let mut e = file_entry(b"a", b"x");
    e.extend(file_entry(b"a", b"y"));
    assert!(matches!(reject(&dir_nar(&e)), NarError::Unsorted { .. }));
}

#[test]
fn byte_order_not_locale_order() {
    // `B` (0x42) sorts before `a` (0x61) in byte order: accepted. The reverse is not.
    let sb = Sandbox::new();
    let mut e = file_entry(b"B", b"x");
    e.extend(file_entry(b"a", b"y"));
    decode_to_path(&dir_nar(&e)[..], &sb.dest(), EXACT).unwrap();
    let mut e = file_entry(b"a", b"x");
    e.extend(file_entry(b"B", b"y"));
    assert!(matches!(reject(&dir_nar(&e)), NarError::Unsorted { .. }));
}

/// The classic escape: a symlink `a` to outside, then `a` again as a directory with a file.
#[test]
fn symlink_then_directory_of_the_same_name_cannot_escape() {
    let sb = Sandbox::new();
    let outside = sb.outside();
    let target = outside.to_str().unwrap().as_bytes();
    let e: Vec<&[u8]> = vec![
        b"entry",
        b"(",
        b"name",
        b"a",
        b"node",
        b"(",
        b"type",
        b"symlink",
        b"target",
        target,
        b")",
        b")",
        b"entry",
        b"(",
        b"name",
        b"a",
        b"node",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"pwned",
        b"node",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"gotcha",
        b")",
        b")",
        b")",
        b")",
    ];
    let err = decode_to_path(&dir_nar(&e)[..], &sb.dest(), EXACT).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidNar {
                problem: NarError::Unsorted { .. },
                ..
            }
        ),
        "{err:?}"
    );
    sb.assert_untouched(false);
}

/// The same through a path: a symlink `a` to outside, then an entry `a/pwned`.
#[test]
fn symlink_then_path_through_it_cannot_escape() {
    let sb = Sandbox::new();
    let target = sb.outside().to_str().unwrap().as_bytes().to_vec();
    let mut e: Vec<&[u8]> = vec![
        b"entry", b"(", b"name", b"a", b"node", b"(", b"type", b"symlink", b"target", &target,
        b")", b")",
    ];
    e.extend(file_entry(b"a/pwned", b"gotcha"));
    let err = decode_to_path(&dir_nar(&e)[..], &sb.dest(), EXACT).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidNar {
                problem: NarError::BadName {
                    reason: BadNameReason::Slash,
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    sb.assert_untouched(false);
}

#[test]
fn symlinks_are_created_not_followed() {
    let sb = Sandbox::new();
    let target = sb.outside().join("sentinel");
    let target = target.to_str().unwrap().as_bytes();
    let mut e: Vec<&[u8]> = vec![
        b"entry", b"(", b"name", b"a", b"node", b"(", b"type", b"symlink", b"target", target, b")",
        b")",
    ];
    e.extend(file_entry(b"b", b"inside"));
    decode_to_path(&dir_nar(&e)[..], &sb.dest(), EXACT).unwrap();
    sb.assert_untouched(true);
    assert_eq!(
        fs::read_link(sb.dest().join("a"))
            .unwrap()
            .as_os_str()
            .as_encoded_bytes(),
        target
    );
    assert_eq!(fs::read(sb.dest().join("b")).unwrap(), b"inside");
}

#[test]
fn bad_magic() {
    let (offset, problem) = reject_with(&nar(&[b"nix-archive-2", b"(", b")"]), EXACT);
    assert_eq!(offset, 0);
    assert!(
        matches!(problem, NarError::UnexpectedTag { .. }),
        "{problem:?}"
    );
    assert!(matches!(
        reject(b"GET / HTTP/1.1\r\n\r\n"),
        NarError::TooLong { .. }
    ));
}

#[test]
fn unknown_node_type() {
    let p = reject(&nar(&[b"nix-archive-1", b"(", b"type", b"fifo", b")"]));
    assert_eq!(
        p,
        NarError::UnexpectedTag {
            expected: "`regular`, `symlink` or `directory`",
            found: "fifo".into()
        }
    );
}

#[test]
fn unknown_directory_tag() {
    let p = reject(&dir_nar(&[b"entries"]));
    assert!(
        matches!(p, NarError::UnexpectedTag { ref found, .. } if found == "entries"),
        "{p:?}"
    );
}

#[test]
fn unknown_file_tag() {
    let p = reject(&nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"mode",
        b"0644",
    ]));
    assert!(matches!(p, NarError::UnexpectedTag { .. }), "{p:?}");
    // `executable` must be followed by an empty string.
    let p = reject(&nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"yes",
        b"contents",
        b"",
        b")",
    ]));
    assert!(matches!(p, NarError::UnexpectedTag { .. }), "{p:?}");
}

#[test]
fn missing_close_paren() {
    let p = reject(&nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"x",
        b"(",
    ]));
    assert!(matches!(p, NarError::UnexpectedTag { .. }), "{p:?}");
}

#[test]
fn oversized_name() {
    let long = vec![b'n'; MAX_NAME_LEN as usize + 1];
    let p = reject(&dir_nar(&file_entry(&long, b"x")));
    assert_eq!(
        p,
        NarError::TooLong {
            what: "name",
            len: 256,
            max: 255
        }
    );
}

#[test]
fn oversized_symlink_target() {
    let target = vec![b't'; MAX_TARGET_LEN as usize + 1];
    let p = reject(&nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"symlink",
        b"target",
        &target,
        b")",
    ]));
    assert_eq!(
        p,
        NarError::TooLong {
            what: "symlink target",
            len: 4097,
            max: 4096
        }
    );
    // The limit itself is accepted by the parser.
    let target = vec![b't'; MAX_TARGET_LEN as usize];
    NarParser::new(
        &nar(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"target",
            &target,
            b")",
        ])[..],
    )
    .drain()
    .unwrap();
}

#[test]
fn oversized_lengths_do_not_allocate() {
    // A keyword announcing u64::MAX bytes, a name announcing 2^40, a file of 2^63 bytes.
    let mut b = nar(&[b"nix-archive-1", b"("]);
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        reject(&b),
        NarError::TooLong {
            what: "keyword",
            ..
        }
    ));

    let mut b = dir_nar(&[]);
    b.truncate(b.len() - 16);
    b.extend_from_slice(&nar(&[b"entry", b"(", b"name"]));
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(reject(&b), NarError::TooLong { what: "name", .. }));

    let mut b = nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    b.extend_from_slice(&(1u64 << 63).to_le_bytes());
    assert!(matches!(reject(&b), NarError::TooLong { what: "file", .. }));
}

#[test]
fn empty_or_nul_symlink_target() {
    let p = reject(&nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"",
        b")",
    ]));
    assert_eq!(p, NarError::BadSymlinkTarget("empty"));
    let p = reject(&nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"a\0b",
        b")",
    ]));
    assert_eq!(p, NarError::BadSymlinkTarget("containing NUL"));
}

#[test]
fn nonzero_padding_after_a_string() {
    let mut b = nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"x",
        b")",
    ]);
    b[8 + 13] = 1; // first padding byte after the magic
    let (offset, p) = reject_with(&b, EXACT);
    assert_eq!((offset, p), (8 + 13, NarError::BadPadding));
}

#[test]
fn nonzero_padding_after_file_contents() {
    let good = dir_nar(&file_entry(b"f", b"abc"));
    let at = good.windows(3).position(|w| w == b"abc").unwrap() + 3;
    let mut b = good.clone();
    b[at + 4] = 0xff;
    assert_eq!(reject(&b), NarError::BadPadding);
}

#[test]
fn truncated_anywhere() {
    let good = dir_nar(
        &[
            file_entry(b"a", b"contents of a").as_slice(),
            &[
                b"entry",
                b"(",
                b"name",
                b"d",
                b"node",
                b"(",
                b"type",
                b"directory",
                b")",
                b")",
            ],
        ]
        .concat(),
    );
    let sb = Sandbox::new();
    decode_to_path(&good[..], &sb.dest(), EXACT).unwrap();
    for len in 0..good.len() {
        let (offset, p) = reject_with(&good[..len], EXACT);
        assert_eq!(p, NarError::Truncated, "prefix of {len}");
        assert!(offset <= len as u64);
    }
}

#[test]
fn trailing_data_when_exact_end_is_asked() {
    let mut b = nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"x",
        b")",
    ]);
    let len = b.len() as u64;
    b.extend_from_slice(b"garbage");
    assert_eq!(reject_with(&b, EXACT), (len, NarError::TrailingData));

    // Without the check, decoding stops right after the archive and leaves the rest unread.
    let sb = Sandbox::new();
    let mut input = &b[..];
    let stats = decode_to_path(&mut input, &sb.dest(), DecodeOptions::default()).unwrap();
    assert_eq!(stats.nar_size, len);
    let mut rest = Vec::new();
    input.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"garbage");
}

#[test]
fn nesting_deeper_than_the_limit() {
    let mut t: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
    for _ in 0..MAX_DEPTH {
        t.extend_from_slice(&[
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
            b"(",
            b"type",
            b"directory",
        ]);
    }
    let err = NarParser::new(&nar(&t)[..]).drain().unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidNar {
                problem: NarError::TooDeep { max: MAX_DEPTH },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn destination_that_exists_is_never_touched() {
    let good = nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"x",
        b")",
    ]);
    let sb = Sandbox::new();
    // A dangling symlink: following it would create a file outside.
    std::os::unix::fs::symlink(sb.outside().join("created"), sb.dest()).unwrap();
    let err = decode_to_path(&good[..], &sb.dest(), EXACT).unwrap_err();
    assert!(matches!(err, Error::DestinationExists { .. }), "{err:?}");
    sb.assert_untouched(true);
    fs::remove_file(sb.dest()).unwrap();
    fs::create_dir(sb.dest()).unwrap();
    let err = decode_to_path(&good[..], &sb.dest(), EXACT).unwrap_err();
    assert!(matches!(err, Error::DestinationExists { .. }), "{err:?}");
    assert!(fs::read_dir(sb.dest()).unwrap().next().is_none());
}

#[test]
fn error_after_many_files_removes_them_all() {
    let mut e = Vec::new();
    let names: Vec<String> = (0..50).map(|i| format!("f{i:02}")).collect();
    for n in &names {
        e.extend(file_entry(n.as_bytes(), b"data"));
    }
    e.extend(file_entry(b"zz/top", b"x"));
    let sb = Sandbox::new();
    let opts = DecodeOptions {
        canonicalise: true,
        exact_end: true,
    };
    let err = decode_to_path(&dir_nar(&e)[..], &sb.dest(), opts).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidNar {
            problem: NarError::BadName { .. },
            ..
        }
    ));
    sb.assert_untouched(false);
}
