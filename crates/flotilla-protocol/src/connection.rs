//! A framed, buffered conversation over any pair of byte streams. It exists so that the
//! deployer and the agent send messages and bulk data the same way whether the bytes travel
//! over a unix socket, ssh's stdio or a child's pipes. It must never read or write outside
//! frame boundaries, never leave a sent message sitting in a buffer (every message is flushed
//! when sent, so the peer is never left waiting), and never touch the filesystem except to
//! open the transport in the constructors below.

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::data::{DataReader, DataWriter};
use crate::error::{ProtocolError, Result};
use crate::frame::{self, FrameKind, HEADER_LEN, MAX_FRAME_PAYLOAD};
use crate::message::{Message, Request, Response};

/// Capacity of the read and write buffers: large, because closures run to gigabytes and
/// every system call saved counts.
pub const IO_BUFFER_SIZE: usize = 256 * 1024;

/// A connection whose streams are boxed: a child process's pipes, a test's in-memory pipe.
pub type BoxedConnection = Connection<Box<dyn Read + Send>, Box<dyn Write + Send>>;

/// One side of a flotilla conversation: messages and bulk streams, framed and buffered.
pub struct Connection<R: Read, W: Write> {
    pub(crate) reader: BufReader<R>,
    pub(crate) writer: BufWriter<W>,
    /// Reused for message payloads and data chunks, so steady traffic does not allocate.
    pub(crate) scratch: Vec<u8>,
    /// The raw bytes of the last header read (`last_header_len` of them, fewer if the stream
    /// ended midway), so a handshake can show what a non-agent sent.
    pub(crate) last_header: [u8; HEADER_LEN],
    pub(crate) last_header_len: usize,
    /// Set when a data writer was dropped midway: the peer's framing is lost.
    pub(crate) write_abandoned: bool,
    /// Set when a data reader was dropped midway: our framing is lost.
    pub(crate) read_abandoned: bool,
}

impl<R: Read, W: Write> fmt::Debug for Connection<R, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("write_abandoned", &self.write_abandoned)
            .field("read_abandoned", &self.read_abandoned)
            .finish_non_exhaustive()
    }
}

impl Connection<UnixStream, UnixStream> {
    /// A connection over a connected unix socket (the `local` platform's agent socket).
    pub fn unix(stream: UnixStream) -> Result<Self> {
        let reader = stream
            .try_clone()
            .map_err(ProtocolError::io("duplicating the unix socket"))?;
        Ok(Connection::new(reader, stream))
    }

    /// Connects to the agent's unix socket at `path`.
    pub fn connect_unix(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|source| ProtocolError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Connection::unix(stream)
    }
}

impl Connection<File, File> {
    /// A connection over this process's stdin and stdout (`ssh host flotilla-agent stdio`).
    ///
    /// The descriptors are duplicated and used unbuffered by std, so that `Stdout`'s line
    /// buffering does not split binary data at every newline byte. Call it before anything
    /// reads stdin (std's `Stdin` buffer would keep what it read), and let nothing else in
    /// the process write to stdout from now on, or the stream is corrupted.
    pub fn stdio() -> Result<Self> {
        let stdin = io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(ProtocolError::io("duplicating stdin"))?;
        let stdout = io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map_err(ProtocolError::io("duplicating stdout"))?;
        Ok(Connection::new(File::from(stdin), File::from(stdout)))
    }
}

impl BoxedConnection {
    /// A connection over any boxed pair of streams, e.g. a child process's stdout and stdin.
    pub fn boxed(reader: Box<dyn Read + Send>, writer: Box<dyn Write + Send>) -> Self {
        Connection::new(reader, writer)
    }
}

impl<R: Read, W: Write> Connection<R, W> {
    /// A connection over a reader and a writer, each buffered with [`IO_BUFFER_SIZE`].
    pub fn new(reader: R, writer: W) -> Self {
        Connection::with_buffer_size(reader, writer, IO_BUFFER_SIZE)
    }

    /// A connection with `size`-byte read and write buffers, for short-lived connections
    /// (tests, fuzzing) where [`IO_BUFFER_SIZE`] would cost more than it saves.
    pub fn with_buffer_size(reader: R, writer: W, size: usize) -> Self {
        Connection {
            reader: BufReader::with_capacity(size, reader),
            writer: BufWriter::with_capacity(size, writer),
            scratch: Vec::new(),
            last_header: [0; HEADER_LEN],
            last_header_len: 0,
            write_abandoned: false,
            read_abandoned: false,
        }
    }

    /// Sends one message and flushes it, so the peer sees it now.
    pub fn send<M: Message>(&mut self, message: &M) -> Result<()> {
        self.check_writable()?;
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        let result = serde_json::to_writer(&mut payload, message)
            .map_err(|e| ProtocolError::Encode {
                what: M::WHAT,
                reason: e.to_string(),
            })
            .and_then(|()| {
                if payload.len() > MAX_FRAME_PAYLOAD as usize {
                    return Err(ProtocolError::Encode {
                        what: M::WHAT,
                        reason: format!(
                            "it takes {} bytes, more than the {MAX_FRAME_PAYLOAD} one frame may carry; send it in parts",
                            payload.len()
                        ),
                    });
                }
                frame::write_frame(&mut self.writer, FrameKind::Message, &payload)
            })
            .and_then(|()| self.flush());
        self.scratch = payload;
        result
    }

    /// Receives the next message, which must be a `Message` frame holding an `M`.
    /// A clean end of stream between frames is [`ProtocolError::Closed`].
    pub fn recv<M: Message>(&mut self) -> Result<M> {
        self.check_readable()?;
        let mut payload = std::mem::take(&mut self.scratch);
        let result = self.recv_into(M::A_WHAT, &mut payload);
        let decoded = result.and_then(|()| {
            serde_json::from_slice(&payload).map_err(|source| ProtocolError::Decode {
                what: M::WHAT,
                source,
            })
        });
        self.scratch = payload;
        decoded
    }

    /// Reads the next frame, which must be a `Message`, into `payload`.
    fn recv_into(&mut self, expected: &'static str, payload: &mut Vec<u8>) -> Result<()> {
        let mut raw = [0u8; HEADER_LEN];
        let got = frame::read_full(&mut self.reader, &mut raw, "reading a frame header")?;
        self.last_header = raw;
        self.last_header_len = got;
        match got {
            0 => return Err(ProtocolError::Closed),
            HEADER_LEN => {}
            _ => {
                return Err(ProtocolError::Truncated {
                    part: "header",
                    expected: HEADER_LEN as u64,
                    got: got as u64,
                })
            }
        }
        let header = frame::FrameHeader::decode(raw)?;
        if header.kind != FrameKind::Message {
            return Err(ProtocolError::UnexpectedFrame {
                expected,
                got: header.kind,
            });
        }
        frame::read_payload(&mut self.reader, header.len, payload)
    }

    /// Sends a request and waits for its final response, passing each `Progress` message to
    /// `on_progress` on the way. An `Error` response becomes [`ProtocolError::Agent`], and a
    /// response that does not answer this request [`ProtocolError::UnexpectedResponse`].
    ///
    /// Not for `AddPaths` (its bulk stream goes between the request and the response: use
    /// [`Connection::send`], a [`Connection::bulk_writer`], then
    /// [`Connection::wait_response`]) nor `Goodbye` (it has no answer: use
    /// [`Connection::goodbye`]).
    pub fn call(&mut self, request: &Request, on_progress: impl FnMut(&str)) -> Result<Response> {
        self.send(request)?;
        let response = self.wait_response(on_progress)?;
        if !request.is_answered_by(&response) {
            return Err(ProtocolError::unexpected_response(request, &response));
        }
        Ok(response)
    }

    /// Waits for the final response to the request just sent, passing each `Progress`
    /// message to `on_progress`. An `Error` response becomes [`ProtocolError::Agent`].
    pub fn wait_response(&mut self, mut on_progress: impl FnMut(&str)) -> Result<Response> {
        loop {
            match self.recv::<Response>()? {
                Response::Progress { message } => on_progress(&message),
                Response::Error { kind, message } => {
                    return Err(ProtocolError::Agent { kind, message })
                }
                response => return Ok(response),
            }
        }
    }

    /// Ends the conversation politely: sends `Goodbye` and closes this side.
    pub fn goodbye(mut self) -> Result<()> {
        self.send(&Request::Goodbye)
    }

    /// A writer for one bulk stream: bytes written are cut into `Data` frames of up to
    /// 1 MiB; [`DataWriter::finish`] ends the stream. Dropping it unfinished leaves the
    /// connection unusable.
    pub fn data_writer(&mut self) -> DataWriter<'_, R, W> {
        DataWriter::new(self)
    }

    /// A reader for one bulk stream: it yields the bytes of `Data` frames until `DataEnd`,
    /// then end of file; a `Message` frame inside the stream is an error.
    pub fn data_reader(&mut self) -> DataReader<'_, R, W> {
        DataReader::new(self)
    }

    /// Flushes everything written so far to the underlying stream.
    pub fn flush(&mut self) -> Result<()> {
        self.writer
            .flush()
            .map_err(ProtocolError::io("flushing the connection"))
    }

    /// Gives back the underlying reader and writer, after flushing. Bytes the reader had
    /// buffered but not yet returned are lost.
    pub fn into_inner(mut self) -> Result<(R, W)> {
        self.flush()?;
        let reader = self.reader.into_inner();
        let writer = self.writer.into_inner().map_err(|e| ProtocolError::Io {
            during: "flushing the connection",
            source: e.into_error(),
        })?;
        Ok((reader, writer))
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.write_abandoned {
            return Err(ProtocolError::Abandoned("written"));
        }
        Ok(())
    }

    pub(crate) fn check_readable(&self) -> Result<()> {
        if self.read_abandoned {
            return Err(ProtocolError::Abandoned("read"));
        }
        Ok(())
    }

    /// What the peer sent last, escaped for an error message: the payload of the last
    /// message frame if `payload` (it held no valid message), else the last header's bytes
    /// and whatever followed it into the read buffer (it was not a valid header).
    pub(crate) fn preview_of_last_read(&self, payload: bool) -> String {
        const MAX: usize = 80;
        let mut bytes = Vec::with_capacity(MAX + 1);
        if payload {
            bytes.extend_from_slice(&self.scratch);
        } else {
            bytes.extend_from_slice(&self.last_header[..self.last_header_len]);
            bytes.extend_from_slice(self.reader.buffer());
        }
        let cut = bytes.len() > MAX;
        bytes.truncate(MAX);
        let text = String::from_utf8_lossy(&bytes);
        let escaped: String = text.chars().flat_map(char::escape_debug).collect();
        format!("\"{escaped}{}\"", if cut { "…" } else { "" })
    }
}
