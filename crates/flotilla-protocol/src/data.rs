//! Bulk streams: the NARs that follow an `AddPaths` request, as `Data` frames ended by one
//! `DataEnd`, optionally zstd-compressed. This module exists so that gigabytes move with
//! plain `Read`/`Write` (and `io::copy`) instead of as JSON, in frames large enough to be
//! cheap and small enough to bound memory. It must never buffer a whole stream, never let a
//! message frame pass as data, and never leave a half-sent or half-read stream looking
//! complete: an unfinished writer or reader makes its connection refuse further use.

use std::io::{self, BufReader, Read, Write};

use crate::connection::Connection;
use crate::error::{ProtocolError, Result};
use crate::frame::{self, FrameHeader, FrameKind};
use crate::message::Compression;

/// The largest `Data` frame a [`DataWriter`] sends: 1 MiB.
pub const DATA_CHUNK_SIZE: usize = 1024 * 1024;

/// The zstd level bulk streams are compressed with: fast, and most of the gain on NARs.
pub const ZSTD_LEVEL: i32 = 3;

/// The largest zstd window a reader accepts, as a power of two (16 MiB). A frame header
/// chooses the window the decoder must allocate, so without a bound a peer could make this
/// side allocate 128 MiB or more with a few bytes. [`ZSTD_LEVEL`] uses far less.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Writes one bulk stream as `Data` frames; created by [`Connection::data_writer`].
///
/// Small writes are gathered into frames of [`DATA_CHUNK_SIZE`]; `flush` sends a partial
/// frame and flushes the transport. Call [`DataWriter::finish`] to end the stream.
pub struct DataWriter<'a, R: Read, W: Write> {
    conn: &'a mut Connection<R, W>,
    chunk: Vec<u8>,
    sent: u64,
    finished: bool,
}

impl<'a, R: Read, W: Write> DataWriter<'a, R, W> {
    pub(crate) fn new(conn: &'a mut Connection<R, W>) -> Self {
        let mut chunk = std::mem::take(&mut conn.scratch);
        chunk.clear();
        chunk.reserve(DATA_CHUNK_SIZE);
        DataWriter {
            conn,
            chunk,
            sent: 0,
            finished: false,
        }
    }

    /// Sends one `Data` frame holding `bytes`.
    fn send_frame(conn: &mut Connection<R, W>, bytes: &[u8]) -> io::Result<()> {
        frame::write_frame(&mut conn.writer, FrameKind::Data, bytes).map_err(|e| e.into_io())
    }

    /// Sends the gathered bytes, if any, as one frame.
    fn send_chunk(&mut self) -> io::Result<()> {
        if !self.chunk.is_empty() {
            Self::send_frame(self.conn, &self.chunk)?;
            self.chunk.clear();
        }
        Ok(())
    }

    /// Sends what is left, then `DataEnd`, and flushes. Returns the bytes the stream held.
    pub fn finish(mut self) -> Result<u64> {
        self.send_chunk()
            .map_err(|e| ProtocolError::from_io("writing bulk data", e))?;
        frame::write_frame(&mut self.conn.writer, FrameKind::DataEnd, &[])?;
        self.conn.flush()?;
        self.finished = true;
        Ok(self.sent)
    }
}

impl<R: Read, W: Write> Write for DataWriter<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.conn.check_writable().map_err(ProtocolError::into_io)?;
        if buf.is_empty() {
            return Ok(0);
        }
        // A large write with nothing gathered goes straight out, without a copy.
        if self.chunk.is_empty() && buf.len() >= DATA_CHUNK_SIZE {
            Self::send_frame(self.conn, &buf[..DATA_CHUNK_SIZE])?;
            self.sent += DATA_CHUNK_SIZE as u64;
            return Ok(DATA_CHUNK_SIZE);
        }
        let n = buf.len().min(DATA_CHUNK_SIZE - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..n]);
        if self.chunk.len() == DATA_CHUNK_SIZE {
            self.send_chunk()?;
        }
        self.sent += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.check_writable().map_err(ProtocolError::into_io)?;
        self.send_chunk()?;
        self.conn.writer.flush()
    }
}

impl<R: Read, W: Write> Drop for DataWriter<'_, R, W> {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.write_abandoned = true;
        }
        self.conn.scratch = std::mem::take(&mut self.chunk);
    }
}

/// Reads one bulk stream from `Data` frames; created by [`Connection::data_reader`].
///
/// Yields end of file at `DataEnd`. Call [`DataReader::finish`] to check that the stream
/// held nothing beyond what was read.
pub struct DataReader<'a, R: Read, W: Write> {
    conn: &'a mut Connection<R, W>,
    /// Payload bytes of the current `Data` frame not yet returned.
    remaining: u32,
    received: u64,
    done: bool,
}

impl<'a, R: Read, W: Write> DataReader<'a, R, W> {
    pub(crate) fn new(conn: &'a mut Connection<R, W>) -> Self {
        DataReader {
            conn,
            remaining: 0,
            received: 0,
            done: false,
        }
    }

    /// Reads headers until a non-empty `Data` frame starts or the stream ends.
    fn next_frame(&mut self) -> Result<()> {
        while self.remaining == 0 && !self.done {
            let raw = frame::read_raw_header(&mut self.conn.reader)?.ok_or(
                ProtocolError::DataStreamCut {
                    received: self.received,
                },
            )?;
            self.conn.last_header = raw;
            self.conn.last_header_len = raw.len();
            let header = FrameHeader::decode(raw)?;
            match header.kind {
                FrameKind::Data => self.remaining = header.len,
                FrameKind::DataEnd => self.done = true,
                FrameKind::Message => {
                    return Err(ProtocolError::UnexpectedFrame {
                        expected: "more bulk data or its end",
                        got: FrameKind::Message,
                    })
                }
            }
        }
        Ok(())
    }

    /// Checks that the stream has ended, reading its `DataEnd` if it is next. Returns the
    /// bytes the stream held; [`ProtocolError::TrailingData`] if more data follows.
    pub fn finish(mut self) -> Result<u64> {
        self.next_frame()?;
        if !self.done {
            return Err(ProtocolError::TrailingData {
                extra: u64::from(self.remaining),
            });
        }
        Ok(self.received)
    }
}

impl<R: Read, W: Write> Read for DataReader<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.check_readable().map_err(ProtocolError::into_io)?;
        if buf.is_empty() {
            return Ok(0);
        }
        self.next_frame().map_err(ProtocolError::into_io)?;
        if self.done {
            return Ok(0);
        }
        let want = buf.len().min(self.remaining as usize);
        let n = self.conn.reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(ProtocolError::DataStreamCut {
                received: self.received,
            }
            .into_io());
        }
        self.remaining -= n as u32;
        self.received += n as u64;
        Ok(n)
    }
}

impl<R: Read, W: Write> Drop for DataReader<'_, R, W> {
    fn drop(&mut self) {
        if !self.done {
            self.conn.read_abandoned = true;
        }
    }
}

/// How much a finished bulk stream held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkStats {
    /// Bytes before compression: what the writer was given.
    pub bytes: u64,
    /// Bytes in `Data` frames: what crossed the wire.
    pub wire_bytes: u64,
}

/// Writes one bulk stream, compressed as chosen; created by [`Connection::bulk_writer`].
pub struct BulkWriter<'a, R: Read, W: Write> {
    inner: BulkWriterInner<'a, R, W>,
    bytes: u64,
}

enum BulkWriterInner<'a, R: Read, W: Write> {
    Plain(DataWriter<'a, R, W>),
    Zstd(zstd::stream::write::Encoder<'static, DataWriter<'a, R, W>>),
}

impl<R: Read, W: Write> BulkWriter<'_, R, W> {
    /// Ends compression and the stream, and flushes. Returns the sizes it held.
    pub fn finish(self) -> Result<BulkStats> {
        let data = match self.inner {
            BulkWriterInner::Plain(w) => w,
            BulkWriterInner::Zstd(z) => z
                .finish()
                .map_err(|e| ProtocolError::from_io("finishing zstd compression", e))?,
        };
        let wire_bytes = data.finish()?;
        Ok(BulkStats {
            bytes: self.bytes,
            wire_bytes,
        })
    }
}

impl<R: Read, W: Write> Write for BulkWriter<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.inner {
            BulkWriterInner::Plain(w) => w.write(buf)?,
            BulkWriterInner::Zstd(z) => z.write(buf)?,
        };
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            BulkWriterInner::Plain(w) => w.flush(),
            BulkWriterInner::Zstd(z) => z.flush(),
        }
    }
}

/// Reads one bulk stream, decompressed as announced; created by [`Connection::bulk_reader`].
pub struct BulkReader<'a, R: Read, W: Write> {
    inner: BulkReaderInner<'a, R, W>,
    bytes: u64,
}

enum BulkReaderInner<'a, R: Read, W: Write> {
    Plain(DataReader<'a, R, W>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<DataReader<'a, R, W>>>),
}

impl<R: Read, W: Write> BulkReader<'_, R, W> {
    /// Checks that the stream held nothing beyond what was read and consumes its end.
    /// Returns the sizes it held; [`ProtocolError::TrailingData`] if more followed.
    pub fn finish(mut self) -> Result<BulkStats> {
        let mut probe = [0u8; 8192];
        let extra = loop {
            match self.read(&mut probe) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProtocolError::from_io("reading bulk data", e)),
            }
        };
        if extra > 0 {
            return Err(ProtocolError::TrailingData {
                extra: extra as u64,
            });
        }
        let data = match self.inner {
            BulkReaderInner::Plain(r) => r,
            BulkReaderInner::Zstd(z) => {
                let buffered = z.finish();
                if !buffered.buffer().is_empty() {
                    return Err(ProtocolError::TrailingData {
                        extra: buffered.buffer().len() as u64,
                    });
                }
                buffered.into_inner()
            }
        };
        let wire_bytes = data.finish()?;
        Ok(BulkStats {
            bytes: self.bytes,
            wire_bytes,
        })
    }
}

impl<R: Read, W: Write> BulkReader<'_, R, W> {
    /// Skips the rest of the stream unread (not even decompressed) and consumes its end, so
    /// the connection can carry an `Error` answer after a failure midway through the stream.
    /// Returns the sizes that were read before the skip, and all that crossed the wire.
    pub fn drain(self) -> Result<BulkStats> {
        let mut data = match self.inner {
            BulkReaderInner::Plain(r) => r,
            BulkReaderInner::Zstd(z) => z.finish().into_inner(),
        };
        io::copy(&mut data, &mut io::sink())
            .map_err(|e| ProtocolError::from_io("skipping bulk data", e))?;
        let wire_bytes = data.finish()?;
        Ok(BulkStats {
            bytes: self.bytes,
            wire_bytes,
        })
    }
}

impl<R: Read, W: Write> Read for BulkReader<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match &mut self.inner {
            BulkReaderInner::Plain(r) => r.read(buf)?,
            BulkReaderInner::Zstd(z) => z.read(buf)?,
        };
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<R: Read, W: Write> Connection<R, W> {
    /// A writer for one bulk stream compressed with `compression`; the request that announces
    /// the stream must name the same compression.
    pub fn bulk_writer(&mut self, compression: Compression) -> Result<BulkWriter<'_, R, W>> {
        self.check_writable()?;
        let data = self.data_writer();
        let inner = match compression {
            Compression::None => BulkWriterInner::Plain(data),
            Compression::Zstd => BulkWriterInner::Zstd(
                zstd::stream::write::Encoder::new(data, ZSTD_LEVEL)
                    .map_err(ProtocolError::io("starting zstd compression"))?,
            ),
        };
        Ok(BulkWriter { inner, bytes: 0 })
    }

    /// A reader for one bulk stream compressed with `compression`, as its request announced.
    pub fn bulk_reader(&mut self, compression: Compression) -> Result<BulkReader<'_, R, W>> {
        self.check_readable()?;
        let data = self.data_reader();
        let inner = match compression {
            Compression::None => BulkReaderInner::Plain(data),
            Compression::Zstd => {
                let mut decoder = zstd::stream::read::Decoder::new(data)
                    .map_err(ProtocolError::io("starting zstd decompression"))?;
                decoder
                    .window_log_max(ZSTD_WINDOW_LOG_MAX)
                    .map_err(ProtocolError::io("starting zstd decompression"))?;
                BulkReaderInner::Zstd(decoder)
            }
        };
        Ok(BulkReader { inner, bytes: 0 })
    }
}
