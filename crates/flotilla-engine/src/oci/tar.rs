//! Reproducible tar streams of layers: entries in a fixed order, mtime 1 (the store's own
//! time), no user or group names, no device numbers, owners as given (0 unless the machine
//! layer's listing says otherwise). The same inputs give the same bytes on any host: nothing
//! of the host (its clock, its users, the order its filesystem lists a directory in) reaches
//! the archive. Long names and link targets go in PAX headers, whose content is as fixed.
//!
//! It only reads: a store path is walked without following links, and a file is read through
//! the descriptor opened for it, never reopened by name.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The time every entry has.
pub const MTIME: u64 = 1;

/// The largest owner id a ustar header holds (7 octal digits); a larger one is a PAX record.
const MAX_ID: u64 = 0o7777777;

/// What an entry is.
pub enum Kind<'a> {
    /// A directory.
    Dir,
    /// A regular file of `size` bytes read from `reader`.
    File {
        /// Its size.
        size: u64,
        /// Its content.
        reader: &'a mut dyn Read,
    },
    /// A symbolic link to `target`.
    Symlink {
        /// Where it points.
        target: &'a [u8],
    },
}

/// Writes tar entries to `out`.
pub struct TarWriter<W: Write> {
    out: W,
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0width$o}\0", v, width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

impl<W: Write> TarWriter<W> {
    /// A writer to `out`.
    pub fn new(out: W) -> TarWriter<W> {
        TarWriter { out }
    }

    fn header(&mut self, name: &[u8], (mode, uid, gid): (u32, u32, u32), size: u64, flag: u8, link: &[u8]) -> io::Result<()> {
        let mut h = [0u8; 512];
        h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], if u64::from(uid) <= MAX_ID { u64::from(uid) } else { 0 });
        octal(&mut h[116..124], if u64::from(gid) <= MAX_ID { u64::from(gid) } else { 0 });
        octal(&mut h[124..136], if size < 0o77777777777 { size } else { 0 });
        octal(&mut h[136..148], MTIME);
        h[156] = flag;
        h[157..157 + link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.out.write_all(&h)
    }

    /// One entry at `name` (relative, `/`-separated; a directory's gets a trailing `/`).
    pub fn entry(&mut self, name: &[u8], mode: u32, uid: u32, gid: u32, kind: Kind<'_>) -> io::Result<()> {
        let mut name = name.to_vec();
        if matches!(kind, Kind::Dir) && !name.ends_with(b"/") {
            name.push(b'/');
        }
        let (size, flag, link): (u64, u8, &[u8]) = match &kind {
            Kind::Dir => (0, b'5', b""),
            Kind::File { size, .. } => (*size, b'0', b""),
            Kind::Symlink { target } => (0, b'2', target),
        };
        let mut pax = Vec::new();
        if name.len() > 100 {
            pax_record(&mut pax, "path", &name);
        }
        if link.len() > 100 {
            pax_record(&mut pax, "linkpath", link);
        }
        if size >= 0o77777777777 {
            pax_record(&mut pax, "size", size.to_string().as_bytes());
        }
        // An owner past the header's 7 octal digits (ids of user namespaces, e.g. 100000000)
        // is a PAX record, and 0 in the header.
        if u64::from(uid) > MAX_ID {
            pax_record(&mut pax, "uid", uid.to_string().as_bytes());
        }
        if u64::from(gid) > MAX_ID {
            pax_record(&mut pax, "gid", gid.to_string().as_bytes());
        }
        if !pax.is_empty() {
            self.header(b"././@PaxHeader", (0o644, 0, 0), pax.len() as u64, b'x', b"")?;
            self.out.write_all(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        self.header(&name, (mode, uid, gid), size, flag, link)?;
        if let Kind::File { size, reader } = kind {
            let copied = io::copy(&mut reader.take(size), &mut self.out)?;
            if copied != size {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} changed while it was read ({copied} of {size} bytes)", String::from_utf8_lossy(&name))));
            }
            self.pad(size)?;
        }
        Ok(())
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let pad = (512 - size % 512) % 512;
        self.out.write_all(&vec![0u8; pad as usize])
    }

    /// Writes `path` (a file, link or directory on this host, not followed) and everything
    /// under it as `name`, children in byte order, modes as they are, owned by root.
    pub fn tree(&mut self, path: &Path, name: &[u8]) -> io::Result<()> {
        let meta = fs::symlink_metadata(path)?;
        let mode = meta.mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(path)?;
            self.entry(name, 0o777, 0, 0, Kind::Symlink { target: target.as_os_str().as_bytes() })
        } else if meta.is_dir() {
            self.entry(name, mode, 0, 0, Kind::Dir)?;
            let mut children: Vec<_> = fs::read_dir(path)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
            children.sort();
            for c in children {
                let mut child = name.to_vec();
                if !child.ends_with(b"/") {
                    child.push(b'/');
                }
                child.extend_from_slice(c.as_bytes());
                self.tree(&path.join(&c), &child)?;
            }
            Ok(())
        } else if meta.is_file() {
            let (mut f, size) = super::open_regular(path)?;
            self.entry(name, mode, 0, 0, Kind::File { size, reader: &mut f })
        } else {
            Err(io::Error::other(format!("{} is neither a file, a directory nor a link; a store path holds nothing else", path.display())))
        }
    }

    /// The end of the archive; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 1024])?;
        Ok(self.out)
    }
}

fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    // "<len> key=value\n", the length counting its own digits.
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len.to_string().len() + rest != len {
        len = len.to_string().len() + rest;
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_lengths_count_themselves() {
        let mut v = Vec::new();
        pax_record(&mut v, "path", &[b'a'; 95]);
        let s = String::from_utf8(v).unwrap();
        let n: usize = s.split(' ').next().unwrap().parse().unwrap();
        assert_eq!(n, s.len());
    }

    #[test]
    fn owners_past_seven_octal_digits_are_pax_records() {
        let mut t = TarWriter::new(Vec::new());
        t.entry(b"etc/big", 0o640, 0o10000000, 4_000_000_000, Kind::File { size: 1, reader: &mut &b"x"[..] }).unwrap();
        t.entry(b"etc/small", 0o640, 1000, 100, Kind::Dir).unwrap();
        let bytes = t.finish().unwrap();
        let pax = String::from_utf8_lossy(&bytes[512..1024]);
        assert!(pax.contains(" uid=2097152\n") && pax.contains(" gid=4000000000\n"), "{pax}");
        let h = &bytes[1024..1536];
        assert_eq!(&h[..7], b"etc/big");
        assert_eq!((&h[108..116], &h[116..124]), (&b"0000000\0"[..], &b"0000000\0"[..]));
        let small = &bytes[2048..2560];
        assert_eq!((&small[108..116], &small[116..124]), (&b"0001750\0"[..], &b"0000144\0"[..]));
        // GNU tar reads the owners back from the PAX records.
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a.tar"), &bytes).unwrap();
        let out = std::process::Command::new("tar").args(["--numeric-owner", "-tvf"]).arg(d.path().join("a.tar")).output().expect("tar runs");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && listing.contains("2097152/4000000000"), "{listing}{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn a_tree_is_the_same_bytes_whatever_its_times() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("b")).unwrap();
        fs::write(d.path().join("b/x"), "x").unwrap();
        fs::write(d.path().join("a"), "a").unwrap();
        std::os::unix::fs::symlink("a", d.path().join("c")).unwrap();
        let once = || {
            let mut t = TarWriter::new(Vec::new());
            t.tree(d.path(), b"nix/store/p").unwrap();
            t.finish().unwrap()
        };
        let first = once();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(d.path().join("a"), "a").unwrap();
        assert_eq!(first, once());
        let names: Vec<String> = first.chunks(512).filter(|h| h[257..262] == *b"ustar").map(|h| String::from_utf8_lossy(&h[..100]).trim_end_matches('\0').to_owned()).collect();
        assert_eq!(names, ["nix/store/p/", "nix/store/p/a", "nix/store/p/b/", "nix/store/p/b/x", "nix/store/p/c"]);
    }
}
