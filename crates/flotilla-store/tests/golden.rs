//! Golden tests against real Nix: the encoder must produce `nix-store --dump`'s bytes, the
//! decoder must restore what Nix dumped, and NAR hashes must equal `nix-store -q --hash`.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;
use flotilla_store::{
    decode_to_path, encode_path, hash_path, DecodeOptions, HashingReader, NarHash, NarParser,
    StorePath,
};

/// A tree with every kind of node and the awkward cases of the format.
fn sample() -> Node {
    let long = vec![b'l'; 255];
    let deep = dir(vec![(
        b"b",
        dir(vec![(b"c", dir(vec![(b"leaf", file(b"deep\n"))]))]),
    )]);
    Node::Dir(
        [
            (&b"regular"[..], file(b"hello\n")),
            (b"empty", file(b"")),
            (b"script.sh", exe(b"#!/bin/sh\necho hi\n")),
            (b"empty-exe", exe(b"")),
            (b"eight", file(b"12345678")),
            (b"nine", file(b"123456789")),
            (b"8bytesnm", file(b"name of 8 bytes")),
            (b"9bytesnam", file(b"name of 9 bytes")),
            (b"link", link(b"regular")),
            (
                b"abs-link",
                link(b"/nix/store/lyklk3c3m7576knld0dg2rpspz1x9apk-busybox/bin/sh"),
            ),
            (b"dangling", link(b"../../nowhere at all")),
            (b"dir-link", link(b"a")),
            (b"a", deep),
            (b"empty-dir", dir(vec![])),
            (b"with space", file(b"s")),
            (b"new\nline", file(b"n")),
            (b"tab\tand\\back", file(b"t")),
            (b"\xff\xfe not utf-8", file(b"bytes")),
            ("ünïcödé".as_bytes(), file(b"u")),
            (b"-dash", file(b"d")),
            (b"...", file(b"dots")),
            (b".hidden", file(b"h")),
            (b"B", file(b"upper")),
            (b"Z", file(b"upper z")),
            (b"_", file(b"underscore")),
            (b"~", file(b"tilde")),
            (b"*?[", file(b"glob")),
            (&long[..], file(b"255-byte name")),
            (
                b"big",
                file(
                    &(0..300_000u32)
                        .map(|i| (i * 7 % 253) as u8)
                        .collect::<Vec<_>>(),
                ),
            ),
        ]
        .into_iter()
        .map(|(n, e)| (n.to_vec(), e))
        .collect(),
    )
}

fn encode(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let n = encode_path(path, &mut out).unwrap();
    assert_eq!(n, out.len() as u64);
    out
}

#[test]
fn encoder_matches_nix_store_dump_for_a_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    build(&root, &sample());
    let ours = encode(&root);
    let nix = nix_dump(&root);
    assert_eq!(ours.len(), nix.len());
    assert!(ours == nix, "NAR differs from nix-store --dump");
}

#[test]
fn encoder_matches_nix_store_dump_for_single_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Node)> = vec![
        ("file", file(b"hello")),
        ("empty", file(b"")),
        ("exe", exe(b"\x7fELF")),
        ("eight", file(b"abcdefgh")),
        ("nine", file(b"abcdefghi")),
        ("link", link(b"/etc/passwd")),
        ("emptydir", dir(vec![])),
    ];
    for (name, node) in cases {
        let p = tmp.path().join(name);
        build(&p, &node);
        assert!(encode(&p) == nix_dump(&p), "{name}");
    }
}

#[test]
fn decoder_restores_what_nix_dumped() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    build(&root, &sample());
    let nix = nix_dump(&root);
    let dest = tmp.path().join("restored");
    let stats = decode_to_path(
        &nix[..],
        &dest,
        DecodeOptions {
            exact_end: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(read_tree(&dest), normalise(&sample()));
    assert_eq!(stats.nar_size, nix.len() as u64);
    let (files, symlinks, directories) = count(&sample());
    assert_eq!(
        (stats.files, stats.symlinks, stats.directories),
        (files, symlinks, directories)
    );
    assert_eq!((files, symlinks, directories), (24, 4, 5));
    // And Nix agrees the restored tree is the same archive.
    assert!(nix_dump(&dest) == nix);
}

#[test]
fn nix_restores_what_we_encoded() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    build(&root, &sample());
    let nar_file = tmp.path().join("tree.nar");
    fs::write(&nar_file, encode(&root)).unwrap();
    let dest = tmp.path().join("by-nix");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"nix-store --restore "$1" < "$2""#)
        .arg("sh")
        .arg(&dest)
        .arg(&nar_file)
        .status()
        .expect("sh");
    assert!(status.success(), "nix-store --restore failed");
    assert_eq!(read_tree(&dest), normalise(&sample()));
}

/// Adds `sample()` to the real store (content-addressed, so repeat runs reuse it).
fn store_path(tmp: &Path) -> String {
    let root = tmp.join("flotilla-store-golden");
    build(&root, &sample());
    let out = nix_store(&["--add".as_ref(), root.as_os_str()]);
    String::from_utf8(out).unwrap().trim().to_owned()
}

#[test]
fn nar_hash_matches_nix_store_query_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let path = store_path(tmp.path());
    StorePath::parse(&path).expect("nix-store --add printed a store path");
    let q = |what: &str| {
        let out = nix_store(&["-q".as_ref(), what.as_ref(), path.as_ref()]);
        String::from_utf8(out).unwrap().trim().to_owned()
    };
    let nix_hash: NarHash = q("--hash").parse().unwrap();
    let nix_size: u64 = q("--size").parse().unwrap();

    let digest = hash_path(Path::new(&path)).unwrap();
    assert_eq!(digest.hash, nix_hash);
    assert_eq!(digest.hash.to_string(), q("--hash"));
    assert_eq!(digest.size, nix_size);
    // The tree outside the store hashes the same: the NAR carries no metadata Nix resets.
    assert_eq!(
        hash_path(&tmp.path().join("flotilla-store-golden")).unwrap(),
        digest
    );

    // Hashing while decoding, as the agent does on receipt.
    let nar = nix_dump(Path::new(&path));
    let mut reader = HashingReader::new(&nar[..]);
    NarParser::new(&mut reader).exact_end(true).drain().unwrap();
    assert_eq!(reader.finish().1, digest);
}

#[test]
fn canonicalised_decode_matches_store_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let path = store_path(tmp.path());
    let dest = tmp.path().join("canon");
    let nar = nix_dump(Path::new(&path));
    let options = DecodeOptions {
        canonicalise: true,
        exact_end: true,
    };
    decode_to_path(&nar[..], &dest, options).unwrap();
    let theirs = listing(Path::new(&path));
    assert_eq!(listing(&dest), theirs);
    for rel in std::iter::once(Path::new("").to_path_buf()).chain(theirs) {
        let a = fs::symlink_metadata(dest.join(&rel)).unwrap();
        let b = fs::symlink_metadata(Path::new(&path).join(&rel)).unwrap();
        if a.file_type().is_symlink() {
            continue; // symlink mode is always 0777; std cannot set a symlink's mtime
        }
        assert_eq!(
            a.permissions().mode() & 0o7777,
            b.permissions().mode() & 0o7777,
            "{rel:?}"
        );
        assert_eq!(a.mtime(), 1, "{rel:?}");
        assert_eq!(b.mtime(), 1, "{rel:?}");
    }
    make_writable(&dest);
}
