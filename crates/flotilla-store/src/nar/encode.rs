//! Writes a filesystem path as a NAR. It exists to hash and send store paths exactly as Nix
//! does; it must never follow a symlink, never reorder or skip an entry, and never hold a
//! whole file in memory.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{padding, BUF_SIZE, NAR_MAGIC};
use crate::error::{Error, Result};
use crate::hash::{HashingWriter, NarDigest};

/// Writes the NAR of `path` (not following a symlink at `path`) to `out`; returns its size.
pub fn encode_path<W: Write>(path: &Path, out: W) -> Result<u64> {
    let mut enc = Encoder {
        out,
        buf: vec![0; BUF_SIZE].into_boxed_slice(),
        fill: 0,
        written: 0,
    };
    enc.put_str(NAR_MAGIC)?;
    enc.node(&mut path.to_path_buf())?;
    enc.flush()?;
    enc.out
        .flush()
        .map_err(|source| Error::NarWrite { source })?;
    Ok(enc.written)
}

/// The NAR hash and size of `path`, computed without storing the NAR anywhere.
pub fn hash_path(path: &Path) -> Result<NarDigest> {
    let mut w = HashingWriter::new(io::sink());
    encode_path(path, &mut w)?;
    Ok(w.finish().1)
}

/// One buffer for both the small tokens and file contents: file data is read straight into
/// it, so each byte is copied once on its way out.
struct Encoder<W> {
    out: W,
    buf: Box<[u8]>,
    fill: usize,
    written: u64,
}

impl<W: Write> Encoder<W> {
    fn node(&mut self, path: &mut PathBuf) -> Result<()> {
        let meta = fs::symlink_metadata(&*path).map_err(|e| fs_err("stat", path, e))?;
        let ty = meta.file_type();
        self.put_str(b"(")?;
        self.put_str(b"type")?;
        if ty.is_file() {
            self.put_str(b"regular")?;
            if meta.permissions().mode() & 0o100 != 0 {
                self.put_str(b"executable")?;
                self.put_str(b"")?;
            }
            self.put_str(b"contents")?;
            let file = File::open(&*path).map_err(|e| fs_err("open", path, e))?;
            self.contents(file, meta.len(), path)?;
        } else if ty.is_symlink() {
            let target = fs::read_link(&*path).map_err(|e| fs_err("read symlink", path, e))?;
            self.put_str(b"symlink")?;
            self.put_str(b"target")?;
            self.put_str(target.as_os_str().as_bytes())?;
        } else if ty.is_dir() {
            self.put_str(b"directory")?;
            let mut names = fs::read_dir(&*path)
                .and_then(|rd| {
                    rd.map(|e| e.map(|e| e.file_name()))
                        .collect::<io::Result<Vec<_>>>()
                })
                .map_err(|e| fs_err("list", path, e))?;
            // Nix sorts entries as byte strings; OsString order is not promised to be that.
            names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                self.put_str(b"entry")?;
                self.put_str(b"(")?;
                self.put_str(b"name")?;
                self.put_str(name.as_bytes())?;
                self.put_str(b"node")?;
                path.push(&name);
                let r = self.node(path);
                path.pop();
                r?;
                self.put_str(b")")?;
            }
        } else {
            return Err(Error::UnsupportedFileType {
                path: path.to_path_buf(),
            });
        }
        self.put_str(b")")
    }

    /// Streams exactly `size` bytes of `file`; a file that shrank is an error, as in Nix.
    fn contents(&mut self, mut file: File, size: u64, path: &Path) -> Result<()> {
        self.put(&size.to_le_bytes())?;
        let mut left = size;
        while left > 0 {
            // Keep reads large: flush rather than read into a small remaining gap.
            if self.buf.len() - self.fill < self.buf.len() / 4 {
                self.flush()?;
            }
            let room =
                (self.buf.len() - self.fill).min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match file.read(&mut self.buf[self.fill..self.fill + room]) {
                Ok(0) => {
                    return Err(Error::FileChanged {
                        path: path.to_path_buf(),
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Fs {
                        op: "read",
                        path: path.to_path_buf(),
                        source,
                    })
                }
            };
            self.fill += n;
            self.written += n as u64;
            left -= n as u64;
        }
        self.put(&[0; 8][..padding(size)])
    }

    fn put_str(&mut self, s: &[u8]) -> Result<()> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s)?;
        self.put(&[0; 8][..padding(s.len() as u64)])
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        if self.buf.len() - self.fill < bytes.len() {
            self.flush()?;
        }
        if bytes.len() > self.buf.len() {
            self.out
                .write_all(bytes)
                .map_err(|source| Error::NarWrite { source })?;
        } else {
            self.buf[self.fill..self.fill + bytes.len()].copy_from_slice(bytes);
            self.fill += bytes.len();
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.fill > 0 {
            self.out
                .write_all(&self.buf[..self.fill])
                .map_err(|source| Error::NarWrite { source })?;
            self.fill = 0;
        }
        Ok(())
    }
}

fn fs_err(op: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Fs {
        op,
        path: path.to_path_buf(),
        source,
    }
}
