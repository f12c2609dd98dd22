//! A pull parser for NAR streams from untrusted peers. It exists so that every check on an
//! archive happens in one place that touches no filesystem (and so can be fuzzed); it must
//! never panic on any input, never allocate more than the format's limits allow for a single
//! token, and never read past the archive's end, so a NAR can sit in the middle of a stream.

use std::io::{self, Read};

use super::{padding, MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, NAR_MAGIC};
use crate::error::{clip, BadNameReason, Error, NarError, Result};

/// Longest token (fixed keyword) in the grammar, with room to spare.
const MAX_TAG_LEN: u64 = 16;

/// One step through a NAR, in archive order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NarEvent<'a> {
    /// The current node is a directory; its entries follow until [`NarEvent::EndDirectory`].
    Directory,
    /// The next node is the entry `name` of the current directory (checked: non-empty, not
    /// `.` or `..`, no `/` or NUL, at most 255 bytes, after the previous entry in byte order).
    Entry {
        /// The entry's name.
        name: &'a [u8],
    },
    /// The current node is a regular file of `size` bytes; read them with
    /// [`NarParser::read_contents`] (or call `next_event` to skip them).
    File {
        /// Whether the file is executable.
        executable: bool,
        /// Length of the contents.
        size: u64,
    },
    /// The current node is a symlink (target checked: non-empty, no NUL, at most 4096 bytes).
    Symlink {
        /// Where the link points; it is never followed.
        target: &'a [u8],
    },
    /// The current directory has no more entries.
    EndDirectory,
    /// The archive is complete (and, if asked, nothing follows it).
    End,
}

/// Counts from a parsed NAR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NarStats {
    /// Bytes of NAR consumed.
    pub nar_size: u64,
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub directories: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Bytes of file contents.
    pub file_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Magic,
    Node,
    Contents { left: u64, size: u64 },
    NodeDone,
    Directory,
    Done,
}

/// Reads a NAR as a sequence of [`NarEvent`]s, checking it as it goes. After an error the
/// parser is in an unspecified (but safe) state and should be dropped.
#[derive(Debug)]
pub struct NarParser<R> {
    reader: R,
    offset: u64,
    state: State,
    /// For each open directory, its last entry name so far (empty before the first entry,
    /// which works because empty names are rejected).
    dirs: Vec<Vec<u8>>,
    name: Vec<u8>,
    target: Vec<u8>,
    exact_end: bool,
    stats: NarStats,
}

/// A keyword read into a stack buffer, so a hostile length costs nothing.
struct Tag {
    buf: [u8; MAX_TAG_LEN as usize],
    len: usize,
    offset: u64,
}

impl Tag {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn unexpected(&self, expected: &'static str) -> Error {
        invalid(
            self.offset,
            NarError::UnexpectedTag {
                expected,
                found: clip(self.bytes()),
            },
        )
    }
}

fn invalid(offset: u64, problem: NarError) -> Error {
    Error::InvalidNar { offset, problem }
}

impl<R: Read> NarParser<R> {
    /// A parser reading from `reader`. It reads exactly the archive's bytes, in small pieces
    /// for the framing: give it a buffered reader.
    pub fn new(reader: R) -> Self {
        NarParser {
            reader,
            offset: 0,
            state: State::Magic,
            dirs: Vec::new(),
            name: Vec::new(),
            target: Vec::new(),
            exact_end: false,
            stats: NarStats::default(),
        }
    }

    /// Whether bytes after the archive are an error ([`NarError::TrailingData`]); checking
    /// reads to the end of the input.
    pub fn exact_end(mut self, exact: bool) -> Self {
        self.exact_end = exact;
        self
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Counts so far; complete once [`NarEvent::End`] was returned.
    pub fn stats(&self) -> NarStats {
        NarStats {
            nar_size: self.offset,
            ..self.stats
        }
    }

    /// The underlying reader, positioned after the archive if [`NarEvent::End`] was returned.
    pub fn into_inner(self) -> R {
        self.reader
    }

    /// Parses to the end without writing anything, e.g. to check an archive.
    pub fn drain(&mut self) -> Result<NarStats> {
        while self.next_event()? != NarEvent::End {}
        Ok(self.stats())
    }

    /// The next event; unread file contents are skipped (and still checked for length and
    /// padding). Returns [`NarEvent::End`] again once the archive is complete.
    pub fn next_event(&mut self) -> Result<NarEvent<'_>> {
        loop {
            match self.state {
                State::Magic => {
                    let tag = self.tag()?;
                    if tag.bytes() != NAR_MAGIC {
                        return Err(tag.unexpected("`nix-archive-1` (this is not a NAR)"));
                    }
                    self.state = State::Node;
                }
                State::Node => return self.node(),
                State::Contents { left, size } => {
                    let skipped = io::copy(&mut (&mut self.reader).take(left), &mut io::sink())
                        .map_err(|source| Error::NarRead {
                            offset: self.offset,
                            source,
                        })?;
                    self.offset += skipped;
                    if skipped < left {
                        return Err(invalid(self.offset, NarError::Truncated));
                    }
                    self.padding(size)?;
                    self.expect(b")", "`)` after file contents")?;
                    self.state = State::NodeDone;
                }
                State::NodeDone if self.dirs.is_empty() => {
                    self.check_end()?;
                    self.state = State::Done;
                }
                State::NodeDone => {
                    self.expect(b")", "`)` closing the entry")?;
                    self.state = State::Directory;
                }
                State::Directory => {
                    let tag = self.tag()?;
                    match tag.bytes() {
                        b"entry" => return self.entry(),
                        b")" => {
                            self.dirs.pop();
                            self.state = State::NodeDone;
                            return Ok(NarEvent::EndDirectory);
                        }
                        _ => return Err(tag.unexpected("`entry` or `)`")),
                    }
                }
                State::Done => return Ok(NarEvent::End),
            }
        }
    }

    /// Reads file contents after a [`NarEvent::File`]; returns 0 once all are read.
    pub fn read_contents(&mut self, buf: &mut [u8]) -> Result<usize> {
        let State::Contents { left, size } = self.state else {
            return Ok(0);
        };
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = loop {
            match self.reader.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::NarRead {
                        offset: self.offset,
                        source,
                    })
                }
            }
        };
        if n == 0 {
            return Err(invalid(self.offset, NarError::Truncated));
        }
        self.offset += n as u64;
        self.state = State::Contents {
            left: left - n as u64,
            size,
        };
        Ok(n)
    }

    fn node(&mut self) -> Result<NarEvent<'_>> {
        self.expect(b"(", "`(` opening a node")?;
        self.expect(b"type", "`type`")?;
        let tag = self.tag()?;
        match tag.bytes() {
            b"regular" => {
                let mut tag = self.tag()?;
                let executable = tag.bytes() == b"executable";
                if executable {
                    self.expect(b"", "an empty string after `executable`")?;
                    tag = self.tag()?;
                }
                if tag.bytes() != b"contents" {
                    return Err(tag.unexpected(if executable {
                        "`contents`"
                    } else {
                        "`executable` or `contents`"
                    }));
                }
                let at = self.offset;
                let size = self.u64()?;
                if size > i64::MAX as u64 {
                    return Err(invalid(
                        at,
                        NarError::TooLong {
                            what: "file",
                            len: size,
                            max: i64::MAX as u64,
                        },
                    ));
                }
                self.stats.files += 1;
                self.stats.file_bytes += size;
                self.state = State::Contents { left: size, size };
                Ok(NarEvent::File { executable, size })
            }
            b"symlink" => {
                self.expect(b"target", "`target`")?;
                let at = self.offset;
                let mut target = std::mem::take(&mut self.target);
                let r = self.string(&mut target, "symlink target", MAX_TARGET_LEN);
                self.target = target;
                r?;
                if self.target.is_empty() {
                    return Err(invalid(at, NarError::BadSymlinkTarget("empty")));
                }
                if self.target.contains(&0) {
                    return Err(invalid(at, NarError::BadSymlinkTarget("containing NUL")));
                }
                self.expect(b")", "`)` after the symlink target")?;
                self.stats.symlinks += 1;
                self.state = State::NodeDone;
                Ok(NarEvent::Symlink {
                    target: &self.target,
                })
            }
            b"directory" => {
                if self.dirs.len() >= MAX_DEPTH {
                    return Err(invalid(tag.offset, NarError::TooDeep { max: MAX_DEPTH }));
                }
                self.dirs.push(Vec::new());
                self.stats.directories += 1;
                self.state = State::Directory;
                Ok(NarEvent::Directory)
            }
            _ => Err(tag.unexpected("`regular`, `symlink` or `directory`")),
        }
    }

    fn entry(&mut self) -> Result<NarEvent<'_>> {
        self.expect(b"(", "`(` opening the entry")?;
        self.expect(b"name", "`name`")?;
        let at = self.offset;
        let mut name = std::mem::take(&mut self.name);
        let r = self.string(&mut name, "name", MAX_NAME_LEN);
        self.name = name;
        r?;
        let reason = if self.name.is_empty() {
            Some(BadNameReason::Empty)
        } else if self.name == b"." || self.name == b".." {
            Some(BadNameReason::Dot)
        } else if self.name.contains(&b'/') {
            Some(BadNameReason::Slash)
        } else if self.name.contains(&0) {
            Some(BadNameReason::Nul)
        } else {
            None
        };
        if let Some(reason) = reason {
            let name = clip(&self.name);
            return Err(invalid(at, NarError::BadName { name, reason }));
        }
        let Some(previous) = self.dirs.last_mut() else {
            unreachable!("entries are only read inside a directory")
        };
        if self.name <= *previous {
            let problem = NarError::Unsorted {
                previous: clip(previous),
                name: clip(&self.name),
            };
            return Err(invalid(at, problem));
        }
        std::mem::swap(previous, &mut self.name);
        self.expect(b"node", "`node`")?;
        self.state = State::Node;
        let name = self.dirs.last().map_or(&[][..], |n| &n[..]);
        Ok(NarEvent::Entry { name })
    }

    fn check_end(&mut self) -> Result<()> {
        if !self.exact_end {
            return Ok(());
        }
        let mut byte = [0u8; 1];
        loop {
            match self.reader.read(&mut byte) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(invalid(self.offset, NarError::TrailingData)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::NarRead {
                        offset: self.offset,
                        source,
                    })
                }
            }
        }
    }

    fn expect(&mut self, want: &[u8], expected: &'static str) -> Result<()> {
        let tag = self.tag()?;
        if tag.bytes() == want {
            Ok(())
        } else {
            Err(tag.unexpected(expected))
        }
    }

    fn tag(&mut self) -> Result<Tag> {
        let offset = self.offset;
        let len = self.u64()?;
        if len > MAX_TAG_LEN {
            let problem = NarError::TooLong {
                what: "keyword",
                len,
                max: MAX_TAG_LEN,
            };
            return Err(invalid(offset, problem));
        }
        let mut tag = Tag {
            buf: [0; MAX_TAG_LEN as usize],
            len: len as usize,
            offset,
        };
        self.fill(&mut tag.buf[..tag.len])?;
        self.padding(len)?;
        Ok(tag)
    }

    fn string(&mut self, out: &mut Vec<u8>, what: &'static str, max: u64) -> Result<()> {
        let offset = self.offset;
        let len = self.u64()?;
        if len > max {
            return Err(invalid(offset, NarError::TooLong { what, len, max }));
        }
        out.clear();
        out.resize(len as usize, 0);
        self.fill(out)?;
        self.padding(len)
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64) -> Result<()> {
        let offset = self.offset;
        let mut pad = [0u8; 8];
        let pad = &mut pad[..padding(len)];
        self.fill(pad)?;
        if pad.iter().any(|&b| b != 0) {
            return Err(invalid(offset, NarError::BadPadding));
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        match self.reader.read_exact(buf) {
            Ok(()) => {
                self.offset += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(invalid(self.offset, NarError::Truncated))
            }
            Err(source) => Err(Error::NarRead {
                offset: self.offset,
                source,
            }),
        }
    }
}
