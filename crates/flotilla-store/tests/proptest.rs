//! Property tests: random trees survive encode → decode → encode unchanged and match
//! `nix-store --dump`; random damage to a valid NAR never panics and never writes outside
//! the destination.

mod common;

use common::*;
use flotilla_store::{decode_to_path, encode_path, DecodeOptions, Error, NarParser};
use proptest::prelude::*;
use proptest::sample::Index;

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Mostly short readable names, so siblings collide and sort interestingly.
        prop::collection::vec(prop::sample::select(b"abAB.-_ x".to_vec()), 1..4),
        // Any legal byte at all.
        prop::collection::vec(
            any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
            1..12
        ),
    ]
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"../outside".to_vec()),
        Just(b"../../outside/sentinel".to_vec()),
        Just(b"/".to_vec()),
        prop::collection::vec(any::<u8>().prop_filter("no NUL", |b| *b != 0), 1..20),
    ]
}

/// Random trees whose files hold up to `max_data` bytes.
fn tree(max_data: usize) -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..max_data)
        )
            .prop_map(|(exec, data)| Node::File { exec, data }),
        target().prop_map(Node::Link),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop::collection::btree_map(name(), inner, 0..6)
            .prop_map(|m| Node::Dir(m.into_iter().collect()))
    })
}

fn encode(path: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    encode_path(path, &mut out).unwrap();
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1..24usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(nar: &mut Vec<u8>, m: &Mutation) {
    if nar.is_empty() {
        return;
    }
    match m {
        Mutation::Set(i, b) => {
            let i = i.index(nar.len());
            nar[i] = *b;
        }
        Mutation::Insert(i, bytes) => {
            let i = i.index(nar.len());
            nar.splice(i..i, bytes.iter().copied());
        }
        Mutation::Delete(i, n) => {
            let i = i.index(nar.len());
            nar.drain(i..(i + n).min(nar.len()));
        }
        Mutation::Truncate(i) => nar.truncate(i.index(nar.len())),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn encode_decode_encode_round_trips(t in tree(40)) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        build(&src, &t);
        let first = encode(&src);
        let dst = tmp.path().join("dst");
        let options = DecodeOptions { canonicalise: false, exact_end: true };
        let stats = decode_to_path(&first[..], &dst, options).unwrap();
        prop_assert_eq!(stats.nar_size, first.len() as u64);
        prop_assert_eq!(read_tree(&dst), normalise(&t));
        prop_assert!(encode(&dst) == first);
    }

    #[test]
    fn damaged_nars_never_panic_or_escape(
        // Larger files, so that a fair share of mutations lands in contents and decodes.
        t in tree(400),
        muts in prop::collection::vec(mutation(), 1..3),
        canonicalise in any::<bool>(),
    ) {
        let src_dir = tempfile::tempdir().unwrap();
        let src = src_dir.path().join("src");
        build(&src, &t);
        let mut bytes = encode(&src);
        for m in &muts {
            apply(&mut bytes, m);
        }
        let parsed = NarParser::new(&bytes[..]).exact_end(true).drain();
        let sb = Sandbox::new();
        let options = DecodeOptions { canonicalise, exact_end: true };
        let decoded = decode_to_path(&bytes[..], &sb.dest(), options);
        sb.assert_untouched(decoded.is_ok());
        match (&parsed, &decoded) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(Error::InvalidNar { .. }), Err(Error::InvalidNar { .. })) => {}
            // The parser accepts names the filesystem may still refuse; none arise here.
            _ => prop_assert!(false, "parser {:?} vs decoder {:?}", parsed, decoded),
        }
        if decoded.is_ok() {
            make_writable(&sb.dest());
        }
    }
}

proptest! {
    // Each case runs `nix-store`, so fewer of them.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_encode_like_nix(t in tree(40)) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        build(&src, &t);
        prop_assert!(encode(&src) == nix_dump(&src));
    }
}
