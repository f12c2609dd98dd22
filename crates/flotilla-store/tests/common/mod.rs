//! Helpers shared by the integration tests: running the real `nix-store`, building trees on
//! disk, describing trees for comparison, and spelling NARs token by token.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `nix-store ARGS` and returns its stdout; panics loudly if Nix is missing or fails.
pub fn nix_store(args: &[&OsStr]) -> Vec<u8> {
    let out = Command::new("nix-store")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `nix-store` ({e}): these golden tests compare against real Nix and \
             are never skipped; install it (Debian: `apt-get install nix-bin`) and put \
             `nix-store` on PATH"
            )
        });
    assert!(
        out.status.success(),
        "nix-store {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `nix-store --dump PATH`.
pub fn nix_dump(path: &Path) -> Vec<u8> {
    nix_store(&["--dump".as_ref(), path.as_os_str()])
}

/// One node of a tree to build on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A regular file.
    File { exec: bool, data: Vec<u8> },
    /// A symlink.
    Link(Vec<u8>),
    /// A directory, entries in any order.
    Dir(Vec<(Vec<u8>, Node)>),
}

/// A non-executable file.
pub fn file(data: &[u8]) -> Node {
    Node::File {
        exec: false,
        data: data.to_vec(),
    }
}

/// An executable file.
pub fn exe(data: &[u8]) -> Node {
    Node::File {
        exec: true,
        data: data.to_vec(),
    }
}

/// A symlink.
pub fn link(target: &[u8]) -> Node {
    Node::Link(target.to_vec())
}

/// A directory.
pub fn dir(entries: Vec<(&[u8], Node)>) -> Node {
    Node::Dir(entries.into_iter().map(|(n, e)| (n.to_vec(), e)).collect())
}

/// Creates `node` at `path`.
pub fn build(path: &Path, node: &Node) {
    match node {
        Node::File { exec, data } => {
            fs::write(path, data).unwrap();
            let mode = if *exec { 0o755 } else { 0o644 };
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
        }
        Node::Link(target) => std::os::unix::fs::symlink(OsStr::from_bytes(target), path).unwrap(),
        Node::Dir(entries) => {
            fs::create_dir(path).unwrap();
            for (name, child) in entries {
                build(&path.join(OsStr::from_bytes(name)), child);
            }
        }
    }
}

/// What is on disk at `path`, as a [`Node`] with sorted entries (exec = owner x bit).
pub fn read_tree(path: &Path) -> Node {
    let meta = fs::symlink_metadata(path).unwrap();
    if meta.file_type().is_symlink() {
        Node::Link(
            fs::read_link(path)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes(),
        )
    } else if meta.is_dir() {
        let mut entries: Vec<(Vec<u8>, Node)> = fs::read_dir(path)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().as_bytes().to_vec(), read_tree(&e.path()))
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Node::Dir(entries)
    } else {
        Node::File {
            exec: meta.permissions().mode() & 0o100 != 0,
            data: fs::read(path).unwrap(),
        }
    }
}

/// Sorts a model tree's entries the way [`read_tree`] reports them.
pub fn normalise(node: &Node) -> Node {
    match node {
        Node::Dir(entries) => {
            let mut e: Vec<_> = entries
                .iter()
                .map(|(n, c)| (n.clone(), normalise(c)))
                .collect();
            e.sort_by(|a, b| a.0.cmp(&b.0));
            Node::Dir(e)
        }
        other => other.clone(),
    }
}

/// Every path under `root` (relative, sorted), not following symlinks.
pub fn listing(root: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Makes every directory under `root` writable again so a TempDir can delete it when the
/// tests run as a normal user.
pub fn make_writable(root: &Path) {
    if fs::symlink_metadata(root)
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
        for e in fs::read_dir(root).unwrap() {
            make_writable(&e.unwrap().path());
        }
    }
}

/// A NAR spelled as a list of strings, each framed as the format wants.
pub fn nar(tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        out.extend_from_slice(&(t.len() as u64).to_le_bytes());
        out.extend_from_slice(t);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

/// The tokens of a directory entry `name` holding a plain file with `data`.
pub fn file_entry<'a>(name: &'a [u8], data: &'a [u8]) -> Vec<&'a [u8]> {
    vec![
        b"entry",
        b"(",
        b"name",
        name,
        b"node",
        b"(",
        b"type",
        b"regular",
        b"contents",
        data,
        b")",
        b")",
    ]
}

/// A sandbox: `root/outside` holds a sentinel file, `root/dest` is where NARs go.
pub struct Sandbox {
    pub tmp: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("outside")).unwrap();
        fs::write(tmp.path().join("outside/sentinel"), b"untouched").unwrap();
        Sandbox { tmp }
    }

    /// Where the NAR is unpacked.
    pub fn dest(&self) -> PathBuf {
        self.tmp.path().join("dest")
    }

    /// The directory malicious archives aim symlinks at.
    pub fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }

    /// Asserts nothing but `dest` (when `dest_may_exist`) changed in the sandbox.
    pub fn assert_untouched(&self, dest_may_exist: bool) {
        let mut top: Vec<_> = fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        top.sort();
        let allowed: &[&str] = if dest_may_exist {
            &["dest", "outside"]
        } else {
            &["outside"]
        };
        let top: Vec<_> = top.iter().map(|n| n.to_str().unwrap()).collect();
        assert!(
            top.iter().all(|n| allowed.contains(n)) && top.contains(&"outside"),
            "sandbox top level changed: {top:?}"
        );
        assert_eq!(listing(&self.outside()), vec![PathBuf::from("sentinel")]);
        assert_eq!(
            fs::read(self.outside().join("sentinel")).unwrap(),
            b"untouched"
        );
    }
}

/// (files, symlinks, directories) in a model tree.
pub fn count(node: &Node) -> (u64, u64, u64) {
    match node {
        Node::File { .. } => (1, 0, 0),
        Node::Link(_) => (0, 1, 0),
        Node::Dir(entries) => entries.iter().fold((0, 0, 1), |(f, l, d), (_, c)| {
            let (cf, cl, cd) = count(c);
            (f + cf, l + cl, d + cd)
        }),
    }
}
