//! The wire framing: how messages and bulk data share one byte stream. It exists so that
//! message boundaries survive any transport (a unix socket, ssh's stdio, a serial line) and so
//! that a gigabyte of NAR data can follow a request without being turned into JSON. It must
//! never allocate more than [`MAX_FRAME_PAYLOAD`] for one frame, never trust a length before
//! checking it, and never panic on any input.
//!
//! A frame is a 4-byte big-endian payload length, one kind byte, then the payload:
//!
//! ```text
//! +----------------+------+------------------------+
//! | len: u32 (BE)  | kind | payload (len bytes)    |
//! +----------------+------+------------------------+
//! ```
//!
//! The length counts the payload only, not the kind byte.

use std::fmt;
use std::io::{self, Read, Write};

use crate::error::{ProtocolError, Result};

/// The largest payload one frame may carry: 16 MiB.
pub const MAX_FRAME_PAYLOAD: u32 = 16 * 1024 * 1024;

/// The size of a frame header: the length and the kind byte.
pub const HEADER_LEN: usize = 5;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// One JSON-serialised message.
    Message,
    /// Raw bytes of the current bulk stream.
    Data,
    /// The end of the current bulk stream; the payload is empty.
    DataEnd,
}

impl FrameKind {
    /// The kind's byte on the wire.
    pub const fn to_byte(self) -> u8 {
        match self {
            FrameKind::Message => 1,
            FrameKind::Data => 2,
            FrameKind::DataEnd => 3,
        }
    }

    /// The kind a byte on the wire stands for, if any.
    pub const fn from_byte(b: u8) -> Option<FrameKind> {
        match b {
            1 => Some(FrameKind::Message),
            2 => Some(FrameKind::Data),
            3 => Some(FrameKind::DataEnd),
            _ => None,
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameKind::Message => "message",
            FrameKind::Data => "data",
            FrameKind::DataEnd => "data-end",
        })
    }
}

/// A decoded and checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame carries.
    pub kind: FrameKind,
    /// The payload length, at most [`MAX_FRAME_PAYLOAD`].
    pub len: u32,
}

impl FrameHeader {
    /// Encodes the header for the wire.
    pub fn encode(self) -> [u8; HEADER_LEN] {
        let l = self.len.to_be_bytes();
        [l[0], l[1], l[2], l[3], self.kind.to_byte()]
    }

    /// Decodes and checks a header: the length is bounded, the kind known, `DataEnd` empty.
    pub fn decode(raw: [u8; HEADER_LEN]) -> Result<FrameHeader> {
        let len = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        if len > MAX_FRAME_PAYLOAD {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: MAX_FRAME_PAYLOAD,
            });
        }
        let kind =
            FrameKind::from_byte(raw[4]).ok_or(ProtocolError::UnknownFrameKind { kind: raw[4] })?;
        if kind == FrameKind::DataEnd && len != 0 {
            return Err(ProtocolError::MalformedFrame {
                reason: "a data-end frame must be empty",
            });
        }
        Ok(FrameHeader { kind, len })
    }
}

/// Reads the raw bytes of the next frame header. Returns `None` on a clean end of stream
/// (no byte of a new frame arrived) and [`ProtocolError::Truncated`] if it ends midway.
pub fn read_raw_header(r: &mut impl Read) -> Result<Option<[u8; HEADER_LEN]>> {
    let mut raw = [0u8; HEADER_LEN];
    let got = read_full(r, &mut raw, "reading a frame header")?;
    match got {
        0 => Ok(None),
        HEADER_LEN => Ok(Some(raw)),
        _ => Err(ProtocolError::Truncated {
            part: "header",
            expected: HEADER_LEN as u64,
            got: got as u64,
        }),
    }
}

/// Reads and checks the next frame header; `None` on a clean end of stream.
pub fn read_header(r: &mut impl Read) -> Result<Option<FrameHeader>> {
    read_raw_header(r)?.map(FrameHeader::decode).transpose()
}

/// Reads a payload of `len` bytes into `buf` (cleared first). Memory grows with the bytes
/// that actually arrive, so a peer announcing 16 MiB and sending nothing costs nothing.
pub fn read_payload(r: &mut impl Read, len: u32, buf: &mut Vec<u8>) -> Result<()> {
    buf.clear();
    let got = r
        .take(u64::from(len))
        .read_to_end(buf)
        .map_err(ProtocolError::io("reading a frame payload"))?;
    if got != len as usize {
        return Err(ProtocolError::Truncated {
            part: "payload",
            expected: u64::from(len),
            got: got as u64,
        });
    }
    Ok(())
}

/// Reads one whole frame, its payload into `buf`. `None` on a clean end of stream.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<FrameKind>> {
    let Some(header) = read_header(r)? else {
        return Ok(None);
    };
    read_payload(r, header.len, buf)?;
    Ok(Some(header.kind))
}

/// Writes one frame. Does not flush: the caller decides when a batch of frames is complete.
pub fn write_frame(w: &mut impl Write, kind: FrameKind, payload: &[u8]) -> Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME_PAYLOAD)
        .ok_or(ProtocolError::Encode {
            what: "frame",
            reason: format!(
                "its payload of {} bytes exceeds the {MAX_FRAME_PAYLOAD}-byte frame limit",
                payload.len()
            ),
        })?;
    let header = FrameHeader { kind, len }.encode();
    w.write_all(&header)
        .and_then(|()| w.write_all(payload))
        .map_err(ProtocolError::io("writing a frame"))
}

/// Like `read_exact`, but reports how many bytes arrived before the end of the stream
/// instead of failing, so the caller can tell a clean end from a cut one.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8], during: &'static str) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io { during, source: e }),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for kind in [FrameKind::Message, FrameKind::Data] {
            for len in [0, 1, 65_535, MAX_FRAME_PAYLOAD] {
                let h = FrameHeader { kind, len };
                assert_eq!(FrameHeader::decode(h.encode()).unwrap(), h);
            }
        }
        let end = FrameHeader {
            kind: FrameKind::DataEnd,
            len: 0,
        };
        assert_eq!(FrameHeader::decode(end.encode()).unwrap(), end);
    }

    #[test]
    fn oversize_frame_is_rejected_before_reading_its_payload() {
        let mut wire = (MAX_FRAME_PAYLOAD + 1).to_be_bytes().to_vec();
        wire.push(FrameKind::Data.to_byte());
        let mut buf = Vec::new();
        let err = read_frame(&mut wire.as_slice(), &mut buf).unwrap_err();
        assert!(
            matches!(err, ProtocolError::FrameTooLarge { len, .. } if len == MAX_FRAME_PAYLOAD + 1),
            "{err}"
        );
        assert!(
            err.to_string().contains("more than the 16777216 allowed"),
            "{err}"
        );
        assert_eq!(
            buf.capacity(),
            0,
            "nothing may be allocated for a rejected frame"
        );
    }

    #[test]
    fn huge_announced_length_allocates_only_what_arrives() {
        let mut wire = MAX_FRAME_PAYLOAD.to_be_bytes().to_vec();
        wire.push(FrameKind::Message.to_byte());
        wire.extend_from_slice(b"{}");
        let mut buf = Vec::new();
        let err = read_frame(&mut wire.as_slice(), &mut buf).unwrap_err();
        assert!(
            matches!(err, ProtocolError::Truncated { got: 2, .. }),
            "{err}"
        );
        assert!(buf.capacity() < 1024 * 1024, "capacity {}", buf.capacity());
    }

    #[test]
    fn truncated_frames_are_reported() {
        let mut buf = Vec::new();
        let err = read_frame(&mut &[0u8, 0, 0][..], &mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Truncated {
                    part: "header",
                    expected: 5,
                    got: 3
                }
            ),
            "{err}"
        );
        let mut wire = 100u32.to_be_bytes().to_vec();
        wire.push(FrameKind::Data.to_byte());
        wire.extend_from_slice(&[7; 10]);
        let err = read_frame(&mut wire.as_slice(), &mut buf).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the connection ended in the middle of a frame (10 of 100 bytes of the payload)"
        );
    }

    #[test]
    fn clean_end_is_not_an_error() {
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut &[][..], &mut buf).unwrap(), None);
    }

    #[test]
    fn unknown_kind_and_nonempty_data_end_are_rejected() {
        let mut buf = Vec::new();
        let err = read_frame(&mut &[0u8, 0, 0, 0, 9][..], &mut buf).unwrap_err();
        assert!(
            matches!(err, ProtocolError::UnknownFrameKind { kind: 9 }),
            "{err}"
        );
        assert!(err.to_string().contains("0x09"), "{err}");
        let err = read_frame(&mut &[0u8, 0, 0, 1, 3, 0][..], &mut buf).unwrap_err();
        assert!(matches!(err, ProtocolError::MalformedFrame { .. }), "{err}");
    }
}
