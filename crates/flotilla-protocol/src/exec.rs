//! A command's stdio on a connection, after an `Exec` request: the one part of the protocol
//! where both sides send at once. It exists because a machine reached only over the agent
//! protocol (a VM's virtio-serial port: no ssh, no nsenter) must still run `flotilla exec`,
//! `shell` and `logs`, and it reuses the frames of bulk streams rather than a second framing.
//!
//! After the agent's `ExecStarted`:
//! - the client sends the command's stdin as one bulk stream ([`Connection::data_writer`]:
//!   `Data` frames, flushed as typed, and `DataEnd` at the end of its stdin), then nothing;
//!   it keeps the connection open until `Exited`, and closing it earlier tells the agent to
//!   kill the command;
//! - the agent sends the command's output as `Data` frames whose payload's first byte says
//!   which stream the rest belongs to ([`OutputStream`]), and ends with one message: `Exited`
//!   when the command ended and its output was all sent, or `Error`. Then it closes.
//!
//! Each direction runs on a thread of its own, so [`Connection::split`] cuts a connection in
//! two halves that keep their buffers. Like the rest of the crate this module does no I/O of
//! its own and must never let a frame through that breaks these rules.

use std::io::{self, BufReader, BufWriter, Read, Write};

use crate::connection::Connection;
use crate::data::DATA_CHUNK_SIZE;
use crate::error::{ProtocolError, Result};
use crate::frame::{self, FrameKind};
use crate::message::Response;

/// The first protocol version with [`crate::Request::Exec`]; an agent that welcomes a client
/// with an older one cannot run commands.
pub const EXEC_PROTOCOL_VERSION: u32 = 3;

/// Which of a command's outputs a chunk belongs to: the first byte of an output frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Its standard output (everything, on a terminal).
    Stdout,
    /// Its standard error.
    Stderr,
}

impl OutputStream {
    /// The tag byte on the wire.
    pub const fn to_byte(self) -> u8 {
        match self {
            OutputStream::Stdout => 1,
            OutputStream::Stderr => 2,
        }
    }

    /// The stream a tag byte stands for, if any.
    pub const fn from_byte(b: u8) -> Option<OutputStream> {
        match b {
            1 => Some(OutputStream::Stdout),
            2 => Some(OutputStream::Stderr),
            _ => None,
        }
    }
}

/// What the client receives next while a command runs.
#[derive(Debug, PartialEq, Eq)]
pub enum ExecEvent<'a> {
    /// Bytes of one of its outputs (never empty).
    Output(OutputStream, &'a [u8]),
    /// The message that ends the stream: `Exited`, or `Error` (a failure relaying it).
    End(Box<Response>),
}

/// The largest output chunk in one frame: the tag byte and the chunk fill a data frame.
const OUTPUT_CHUNK: usize = DATA_CHUNK_SIZE - 1;

impl<R: Read, W: Write> Connection<R, W> {
    /// Cuts the connection into a half that only reads and a half that only writes, each
    /// keeping what it had buffered, so that two threads can use the two directions at once.
    pub fn split(self) -> (Connection<R, io::Sink>, Connection<io::Empty, W>) {
        let abandoned = (self.read_abandoned, self.write_abandoned);
        let reading = Connection {
            reader: self.reader,
            writer: BufWriter::with_capacity(0, io::sink()),
            scratch: self.scratch,
            last_header: self.last_header,
            last_header_len: self.last_header_len,
            write_abandoned: true,
            read_abandoned: abandoned.0,
        };
        let writing = Connection {
            reader: BufReader::with_capacity(0, io::empty()),
            writer: self.writer,
            scratch: Vec::new(),
            last_header: [0; frame::HEADER_LEN],
            last_header_len: 0,
            write_abandoned: abandoned.1,
            read_abandoned: true,
        };
        (reading, writing)
    }

    /// Sends `bytes` of a command's `stream` (in as many frames as it takes) and flushes.
    pub fn send_output(&mut self, stream: OutputStream, bytes: &[u8]) -> Result<()> {
        self.check_writable()?;
        let mut payload = std::mem::take(&mut self.scratch);
        let mut result = Ok(());
        for chunk in bytes.chunks(OUTPUT_CHUNK) {
            payload.clear();
            payload.push(stream.to_byte());
            payload.extend_from_slice(chunk);
            result = frame::write_frame(&mut self.writer, FrameKind::Data, &payload);
            if result.is_err() {
                break;
            }
        }
        self.scratch = payload;
        result.and_then(|()| self.flush())
    }

    /// Receives the next output chunk of a command, or the message that ends them.
    pub fn recv_exec_event(&mut self) -> Result<ExecEvent<'_>> {
        self.check_readable()?;
        let kind = frame::read_frame(&mut self.reader, &mut self.scratch)?.ok_or(ProtocolError::Closed)?;
        match kind {
            FrameKind::Data => {
                let (&tag, bytes) = self.scratch.split_first().ok_or(ProtocolError::MalformedFrame {
                    reason: "a command's output frame must start with its stream's tag",
                })?;
                let stream = OutputStream::from_byte(tag).ok_or(ProtocolError::MalformedFrame {
                    reason: "a command's output frame names no known stream",
                })?;
                if bytes.is_empty() {
                    return Err(ProtocolError::MalformedFrame { reason: "a command's output frame must not be empty" });
                }
                Ok(ExecEvent::Output(stream, &self.scratch[1..]))
            }
            FrameKind::Message => {
                let response = serde_json::from_slice(&self.scratch)
                    .map_err(|source| ProtocolError::Decode { what: "response", source })?;
                Ok(ExecEvent::End(Box::new(response)))
            }
            FrameKind::DataEnd => Err(ProtocolError::UnexpectedFrame {
                expected: "a command's output or the message ending it",
                got: FrameKind::DataEnd,
            }),
        }
    }
}
