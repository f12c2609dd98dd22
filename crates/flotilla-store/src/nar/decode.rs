//! Unpacks a NAR into a new filesystem path: the writing half of receiving a store path. It
//! exists apart from the parser so that all checks on the bytes stay in one pure place; it
//! must never write outside its destination, never follow or replace an existing file (every
//! create is exclusive), and never leave a partial tree behind when the archive is bad.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{NarEvent, NarParser, NarStats, BUF_SIZE};
use crate::error::{Error, Result};

/// How [`decode_to_path`] unpacks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Make the tree look like Nix's store: mtime 1 on files and directories, files 0444 or
    /// 0555, directories 0555. (Symlink mtimes are left alone: std cannot set them.)
    pub canonicalise: bool,
    /// Treat bytes after the archive as an error; this reads the input to its end.
    pub exact_end: bool,
}

/// Unpacks the NAR read from `input` to `dest`, which must not exist (its parent must). On
/// any error, whatever was written is removed again. Reads exactly the archive, in small pieces
/// for the framing, so pass a buffered reader (a `BufReader` over a file or socket).
pub fn decode_to_path<R: Read>(input: R, dest: &Path, options: DecodeOptions) -> Result<NarStats> {
    match fs::symlink_metadata(dest) {
        Ok(_) => return Err(Error::DestinationExists { path: dest.into() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Fs {
                op: "stat",
                path: dest.into(),
                source,
            })
        }
    }
    let mut parser = NarParser::new(input).exact_end(options.exact_end);
    let mut sink = FsSink {
        path: dest.to_path_buf(),
        depth: 0,
        created: false,
        dirs: Vec::new(),
        canonicalise: options.canonicalise,
    };
    match sink.run(&mut parser) {
        Ok(()) => Ok(parser.stats()),
        Err(e) => {
            if sink.created {
                sink.remove(dest);
            }
            Err(e)
        }
    }
}

/// Consumes parser events and creates what they describe under one root.
struct FsSink {
    /// The path of the node being written.
    path: PathBuf,
    /// How many entry names are pushed onto `path`.
    depth: usize,
    /// Whether the root was created by us, so cleanup may remove it.
    created: bool,
    /// Directories created, in creation order (only kept when canonicalising).
    dirs: Vec<PathBuf>,
    canonicalise: bool,
}

const MTIME: Duration = Duration::from_secs(1);

impl FsSink {
    fn run<R: Read>(&mut self, parser: &mut NarParser<R>) -> Result<()> {
        let mut buf = Vec::new();
        loop {
            match parser.next_event()? {
                NarEvent::Directory => {
                    fs::create_dir(&self.path)
                        .map_err(|e| fs_err("create directory", &self.path, e))?;
                    self.created = true;
                    if self.canonicalise {
                        self.dirs.push(self.path.clone());
                    }
                }
                NarEvent::Entry { name } => {
                    // The parser guarantees one plain component: no `/`, `.`, `..` or NUL.
                    self.path.push(OsStr::from_bytes(name));
                    self.depth += 1;
                }
                NarEvent::File { executable, size } => {
                    // create_new is O_CREAT|O_EXCL: it never follows or reuses what is there.
                    let mut file = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(if executable { 0o777 } else { 0o666 })
                        .open(&self.path)
                        .map_err(|e| fs_err("create file", &self.path, e))?;
                    self.created = true;
                    if size > 0 && buf.is_empty() {
                        buf = vec![0; BUF_SIZE];
                    }
                    loop {
                        let n = parser.read_contents(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        file.write_all(&buf[..n])
                            .map_err(|e| fs_err("write", &self.path, e))?;
                    }
                    if self.canonicalise {
                        let mode = if executable { 0o555 } else { 0o444 };
                        canonicalise(&file, mode, &self.path)?;
                    }
                    self.node_done();
                }
                NarEvent::Symlink { target } => {
                    std::os::unix::fs::symlink(OsStr::from_bytes(target), &self.path)
                        .map_err(|e| fs_err("create symlink", &self.path, e))?;
                    self.created = true;
                    self.node_done();
                }
                NarEvent::EndDirectory => self.node_done(),
                NarEvent::End => break,
            }
        }
        // Last, and children before parents: a read-only directory takes no new entries.
        for dir in self.dirs.iter().rev() {
            let file = File::open(dir).map_err(|e| fs_err("open directory", dir, e))?;
            canonicalise(&file, 0o555, dir)?;
        }
        Ok(())
    }

    fn node_done(&mut self) {
        if self.depth > 0 {
            self.path.pop();
            self.depth -= 1;
        }
    }

    /// Best-effort removal of a partial unpack; `remove_dir_all` does not follow symlinks.
    fn remove(&self, dest: &Path) {
        for dir in &self.dirs {
            let _ = fs::set_permissions(dir, Permissions::from_mode(0o755));
        }
        let _ = match fs::symlink_metadata(dest) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(dest),
            Ok(_) => fs::remove_file(dest),
            Err(_) => Ok(()),
        };
    }
}

/// Nix's store metadata: the given mode and mtime 1.
fn canonicalise(file: &File, mode: u32, path: &Path) -> Result<()> {
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|e| fs_err("set permissions of", path, e))?;
    file.set_modified(SystemTime::UNIX_EPOCH + MTIME)
        .map_err(|e| fs_err("set mtime of", path, e))
}

fn fs_err(op: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Fs {
        op,
        path: path.to_path_buf(),
        source,
    }
}
