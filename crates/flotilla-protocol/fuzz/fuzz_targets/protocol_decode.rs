//! Fuzzes every entry point that reads bytes from a peer: message frames as requests and as
//! responses, both handshakes, and bulk streams raw and zstd-compressed. It exists because the
//! agent reads whatever arrives on its socket; the decoder must never panic, hang or allocate
//! beyond the frame limit, whatever the bytes.

#![no_main]

use std::io::{self, Read};

use flotilla_protocol::{
    client_handshake, server_handshake, Compression, Connection, Request, Response,
};
use libfuzzer_sys::fuzz_target;

/// Small buffers: the default 256 KiB ones would make allocation dominate each run, and
/// frame boundaries straddling buffer refills are worth exercising anyway.
fn connection(bytes: &[u8]) -> Connection<&[u8], io::Sink> {
    Connection::with_buffer_size(bytes, io::sink(), 512)
}

fuzz_target!(|bytes: &[u8]| {
    let mut conn = connection(bytes);
    while conn.recv::<Request>().is_ok() {}

    let mut conn = connection(bytes);
    while conn.recv::<Response>().is_ok() {}

    let mut conn = connection(bytes);
    let _ = server_handshake(&mut conn, "fuzz", "/");

    let mut conn = connection(bytes);
    let _ = client_handshake(&mut conn, "fuzz");

    for compression in [Compression::None, Compression::Zstd] {
        let mut conn = connection(bytes);
        if let Ok(mut reader) = conn.bulk_reader(compression) {
            let mut buf = [0u8; 4096];
            while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
            let _ = reader.finish();
        }
        let _ = conn.recv::<Request>();

        // As an agent does after a failure midway: skip the rest, then expect a message.
        let mut conn = connection(bytes);
        if let Ok(mut reader) = conn.bulk_reader(compression) {
            let _ = reader.read(&mut [0u8; 64]);
            let _ = reader.drain();
        }
        let _ = conn.recv::<Request>();
    }
});
