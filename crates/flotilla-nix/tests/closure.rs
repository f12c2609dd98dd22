//! The two ways of reading a closure's metadata agree: the store database read in-process
//! and `nix path-info --recursive`, on a real closure in the real local store.

use std::path::Path;
use std::process::Command;

use flotilla_nix::{Nix, NixOptions};
use flotilla_store::StorePath;

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn nix() -> Nix {
    Nix::new(NixOptions { include: vec![], substituters: Some(String::new()), show_trace: false, library: Some(repo().join("nix")) }).unwrap()
}

/// Builds something with a non-trivial closure from the demo package set.
fn built() -> StorePath {
    let expr = format!(
        "let pkgs = import {}/nix/demo-pkgs.nix {{}}; in pkgs.writeShellScript \"closure-test\" \"${{pkgs.busybox}}/bin/true\"",
        repo().display()
    );
    let out = Command::new("nix-build")
        .args(["--option", "substituters", "", "--no-out-link", "-E", &expr])
        .output()
        .expect("prerequisite missing: nix-build (Debian: nix-bin); run scripts/install-deps.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    StorePath::parse(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

#[test]
fn the_store_database_and_nix_path_info_agree() {
    let nix = nix();
    let root = built();
    let from_db = nix.closure_info_from_store_db(std::slice::from_ref(&root)).expect("the store database is readable").expect("valid");
    let from_nix = nix.closure_info_from_nix(std::slice::from_ref(&root)).unwrap().expect("valid");
    assert_eq!(from_db, from_nix);
    assert!(from_db.len() >= 2, "the script refers to busybox: {from_db:?}");
    assert_eq!(from_db.last().unwrap().path, root, "references come first");
}

#[test]
fn an_invalid_root_is_none_both_ways() {
    let nix = nix();
    let missing = StorePath::parse("/nix/store/00000000000000000000000000000000-never-built").unwrap();
    let roots = [built(), missing];
    assert_eq!(nix.closure_info_from_store_db(&roots).expect("the store database is readable"), None);
    assert_eq!(nix.closure_info_from_nix(&roots).unwrap(), None);
}

/// What a build that failed outside the sandbox leaves: a directory at the output's path that
/// Nix never registered. It is not built.
#[test]
fn a_directory_at_a_store_path_that_nix_never_registered_is_invalid() {
    let nix = nix();
    let name = format!("{:032}-left-by-a-failed-build", std::process::id()).replace(['0'], "a");
    let partial = StorePath::parse(&format!("/nix/store/{}", &name)).unwrap();
    std::fs::create_dir(partial.to_absolute()).unwrap();
    let result = nix.invalid(&[built(), partial.clone()]);
    std::fs::remove_dir(partial.to_absolute()).unwrap();
    assert_eq!(result.unwrap(), vec![partial.clone()], "only the unregistered directory is invalid");
    assert!(!nix.is_valid(&partial).unwrap());
}
