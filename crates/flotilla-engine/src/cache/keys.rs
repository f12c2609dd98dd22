//! Signing keys on disk: `flotilla cache keygen` writes a pair in the files and format
//! `nix-store --generate-binary-cache-key` writes (`NAME:base64`, the secret one mode 0600),
//! and `cache push` reads a secret key back. The secret file is created with O_EXCL and
//! O_NOFOLLOW, so an existing key (or a link planted where it would go) is never overwritten
//! or followed; and key material never reaches an error message.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use flotilla_store::cache::{PublicKey, SecretKey};

use super::{io_err, CacheError, Result};

/// The two files `keygen` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyFiles {
    /// `DIR/NAME.secret` (mode 0600): give it to `cache push --key`.
    pub secret: PathBuf,
    /// `DIR/NAME.public`: its one line goes into Nix's `trusted-public-keys`.
    pub public: PathBuf,
    /// That line.
    pub public_key: String,
}

/// A key's name becomes a file name: letters, digits, `.`, `_`, `-`, not starting with `.`
/// (Nix's own names look like `cache.example.org-1`).
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 200
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CacheError::Input(format!(
            "the key name `{}` cannot be used: a key's name is also its file's name, so it takes letters, digits, `.`, `_` and `-`, and does not start with `.` (e.g. `cache.example.org-1`)",
            flotilla_model::escape_controls(name)
        )))
    }
}

/// Makes a new key pair named `name` from 32 bytes of the OS's randomness and writes
/// `dir/NAME.secret` and `dir/NAME.public`; refuses when either exists.
pub fn keygen(name: &str, dir: &Path) -> Result<KeyFiles> {
    check_name(name)?;
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::getrandom(&mut seed[..]).map_err(|e| CacheError::Input(format!("the OS gave no random bytes for a key: {e}")))?;
    let key = SecretKey::from_seed(name, &seed).map_err(|e| CacheError::Input(format!("key name `{name}`: {e}")))?;
    fs::create_dir_all(dir).map_err(io_err("create the directory", dir))?;
    let secret = dir.join(format!("{name}.secret"));
    let public = dir.join(format!("{name}.public"));
    let exists = |p: &Path| {
        CacheError::Input(format!(
            "{} exists already: keygen never overwrites a key (a cache's signatures would no longer verify); pick another name or directory, or remove the old pair first",
            p.display()
        ))
    };
    if fs::symlink_metadata(&public).is_ok() {
        return Err(exists(&public));
    }
    let create = |p: &Path, mode: u32| {
        fs::OpenOptions::new().write(true).create_new(true).mode(mode).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                exists(p)
            } else {
                CacheError::Io { what: "create", path: p.to_owned(), source: e }
            }
        })
    };
    // Nothing half-done: once the secret file is ours (O_EXCL made it), any later failure
    // removes what this call created, and only that.
    let mut f = create(&secret, 0o600)?;
    let mut made_public = false;
    let written = (|| {
        f.write_all(key.to_text().as_bytes()).and_then(|()| f.sync_all()).map_err(io_err("write", &secret))?;
        let text = key.public().to_text();
        let mut p = create(&public, 0o644)?;
        made_public = true;
        p.write_all(text.as_bytes()).and_then(|()| p.sync_all()).map_err(io_err("write", &public))?;
        Ok(text)
    })();
    match written {
        Ok(public_key) => Ok(KeyFiles { secret, public, public_key }),
        Err(e) => {
            let _ = fs::remove_file(&secret);
            if made_public {
                let _ = fs::remove_file(&public);
            }
            Err(e)
        }
    }
}

/// Reads the secret key in `file` (as `nix-store --generate-binary-cache-key` or `keygen`
/// wrote it). Errors name the file and the fix, never the key's bytes.
pub fn read_secret_key(file: &Path) -> Result<SecretKey> {
    let text = zeroize::Zeroizing::new(fs::read_to_string(file).map_err(|e| {
        CacheError::Input(format!(
            "cannot read the signing key {}: {e}; --key takes a secret key file, as `flotilla cache keygen NAME --out DIR` writes it (DIR/NAME.secret)",
            file.display()
        ))
    })?);
    SecretKey::parse(&text).map_err(|e| {
        let what = if PublicKey::parse(&text).is_ok() {
            "is a public key; --key takes the secret one (NAME.secret beside it)".to_owned()
        } else {
            format!("is not a Nix secret key: {e}")
        };
        CacheError::Input(format!(
            "the signing key {} {what}; make a key pair with `flotilla cache keygen NAME --out DIR` (or `nix-store --generate-binary-cache-key`)",
            file.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_pair_that_reads_back_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let files = keygen("test-1", dir.path()).unwrap();
        let key = read_secret_key(&files.secret).unwrap();
        assert_eq!(key.public().to_text(), fs::read_to_string(&files.public).unwrap());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(fs::metadata(&files.secret).unwrap().permissions().mode() & 0o777, 0o600);
        let before = fs::read(&files.secret).unwrap();
        assert!(matches!(keygen("test-1", dir.path()), Err(CacheError::Input(m)) if m.contains("exists already")));
        assert_eq!(fs::read(&files.secret).unwrap(), before);
    }

    #[test]
    fn a_key_name_that_is_a_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../x", "a/b", ".hidden", "", "a b"] {
            assert!(matches!(keygen(bad, dir.path()), Err(CacheError::Input(_))), "{bad}");
        }
    }

    #[test]
    fn a_public_key_given_as_the_secret_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let files = keygen("k", dir.path()).unwrap();
        let err = read_secret_key(&files.public).unwrap_err().to_string();
        assert!(err.contains("is a public key"), "{err}");
    }
}
