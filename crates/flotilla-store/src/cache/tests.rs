//! Held to real Nix's bytes: the golden files in `tests/golden/cache/` were written by Nix 2.8
//! (see the README there).

use super::*;
use crate::{NarHash, StorePath};

const A: &str = include_str!("../../tests/golden/cache/3rdbzg114kn3qj0k3bqb8gq806szhj4i.narinfo");
const B: &str = include_str!("../../tests/golden/cache/gav1jzyr0h57gwv1ykqb5jnrxiv1bjh7.narinfo");
const SECRET: &str = include_str!("../../tests/golden/cache/golden-1.secret");
const PUBLIC: &str = include_str!("../../tests/golden/cache/golden-1.public");
const CACHE_INFO: &str = include_str!("../../tests/golden/cache/nix-cache-info");

#[test]
fn narinfos_nix_wrote_render_back_byte_for_byte() {
    for text in [A, B] {
        let info = NarInfo::parse(text).unwrap();
        assert_eq!(info.to_text(), text);
    }
    let b = NarInfo::parse(B).unwrap();
    assert_eq!(b.store_path.to_absolute(), "/nix/store/gav1jzyr0h57gwv1ykqb5jnrxiv1bjh7-golden-b");
    assert_eq!(b.references, vec![StorePath::parse("/nix/store/3rdbzg114kn3qj0k3bqb8gq806szhj4i-golden-a").unwrap()]);
    assert_eq!(b.nar_size, 176);
    assert_eq!(b.file_size, Some(136));
    assert_eq!(b.compression, "zstd");
    assert_eq!(b.url, "nar/0sjbycrwp7fhs0kkba705xv0g0ybjhr6cv4fjkrciiajrfw74nyx.nar.zst");
    assert_eq!(narinfo_url(&b.store_path), "gav1jzyr0h57gwv1ykqb5jnrxiv1bjh7.narinfo");
}

#[test]
fn cache_info_nix_wrote_renders_back() {
    let info = CacheInfo::parse(CACHE_INFO).unwrap();
    assert_eq!(info.store_dir, "/nix/store");
    assert_eq!(info.to_text(), CACHE_INFO);
    let ours = CacheInfo::flotilla();
    assert_eq!(CacheInfo::parse(&ours.to_text()).unwrap(), ours);
}

#[test]
fn signatures_nix_made_verify_and_ours_are_identical() {
    let secret = SecretKey::parse(SECRET).unwrap();
    let public = PublicKey::parse(PUBLIC).unwrap();
    assert_eq!(secret.public(), public);
    assert_eq!(secret.to_text().as_str(), SECRET.trim());
    assert_eq!(public.to_text(), PUBLIC.trim());
    for text in [A, B] {
        let info = NarInfo::parse(text).unwrap();
        assert_eq!(trusted_signer(&info, std::slice::from_ref(&public)), Some("golden-1"));
        // ed25519 is deterministic: signing Nix's fingerprint again gives Nix's signature, which
        // proves the fingerprint is spelled exactly as Nix spells it.
        let mut resigned = info.clone();
        resigned.sigs.clear();
        secret.sign_narinfo(&mut resigned);
        assert_eq!(resigned.sigs, info.sigs);
    }
}

#[test]
fn a_tampered_narinfo_or_a_foreign_key_does_not_verify() {
    let public = PublicKey::parse(PUBLIC).unwrap();
    let other = SecretKey::from_seed("golden-1", &[7; 32]).unwrap();
    let info = NarInfo::parse(B).unwrap();

    let mut bigger = info.clone();
    bigger.nar_size += 1;
    assert_eq!(trusted_signer(&bigger, std::slice::from_ref(&public)), None);
    let mut rehashed = info.clone();
    rehashed.nar_hash = NarHash::digest(b"something else");
    assert_eq!(trusted_signer(&rehashed, std::slice::from_ref(&public)), None);
    let mut fewer = info.clone();
    fewer.references.clear();
    assert_eq!(trusted_signer(&fewer, std::slice::from_ref(&public)), None);
    // Same name, other key: refused.
    assert_eq!(trusted_signer(&info, &[other.public()]), None);
    // A valid signature under a name the key does not have: refused.
    let renamed = info.sigs[0].replacen("golden-1:", "golden-2:", 1);
    assert!(!public.verifies(&info.fingerprint(), &renamed));
}

#[test]
fn keys_round_trip_and_bad_keys_say_why_without_their_material() {
    let key = SecretKey::from_seed("cache.example.org-1", &[42; 32]).unwrap();
    let again = SecretKey::parse(&key.to_text()).unwrap();
    assert_eq!(again.public(), key.public());
    assert_eq!(PublicKey::parse(&key.public().to_text()).unwrap(), key.public());
    let sig = key.sign("1;x;y;0;");
    assert!(key.public().verifies("1;x;y;0;", &sig));

    for bad in ["nocolon", ":AAAA", "name:not base64!", "name:AAAA"] {
        let err = SecretKey::parse(bad).unwrap_err().to_string();
        assert!(err.contains("<name>:<base64>"), "{err}");
    }
    // A secret key whose public half was edited.
    let mut text = key.to_text().to_string();
    let last = text.pop().unwrap();
    let swapped = if text.ends_with('A') { 'B' } else { 'A' };
    text.pop();
    text.push(swapped);
    text.push(last);
    let err = SecretKey::parse(&text).unwrap_err().to_string();
    assert!(!err.contains(&text), "{err}");
    assert!(SecretKey::from_seed("bad name", &[1; 32]).is_err());
}

#[test]
fn malformed_narinfos_are_refused_with_the_line() {
    let err = NarInfo::parse("StorePath: /nix/store/3rdbzg114kn3qj0k3bqb8gq806szhj4i-golden-a\nURL: nar/x.nar\n").unwrap_err();
    assert!(err.to_string().contains("NarHash"), "{err}");
    let err = NarInfo::parse(&A.replace("NarSize: 120", "NarSize: many")).unwrap_err();
    assert_eq!(err.line, 7, "{err}");
    let err = NarInfo::parse(&format!("{A}StorePath: /nix/store/3rdbzg114kn3qj0k3bqb8gq806szhj4i-golden-a\n")).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    let err = NarInfo::parse(&A.replace("References: ", "References: ../../etc")).unwrap_err();
    assert_eq!(err.line, 8, "{err}");
}
