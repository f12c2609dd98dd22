//! Runs the NAR parser over arbitrary bytes with a null sink: it must never panic, never read
//! past what it reports, and agree with itself about sizes. It never touches the disk.
#![no_main]

use flotilla_store::{NarEvent, NarParser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parser = NarParser::new(data).exact_end(true);
    let mut buf = [0u8; 4096];
    let mut file_bytes = 0u64;
    loop {
        match parser.next_event() {
            Ok(NarEvent::End) => break,
            // Read some contents through the API and let the parser skip the rest.
            Ok(NarEvent::File { size, .. }) => {
                let n = parser.read_contents(&mut buf).unwrap_or(0);
                assert!(n as u64 <= size);
                file_bytes += size;
            }
            Ok(NarEvent::Entry { name }) => assert!(!name.is_empty() && name.len() <= 255),
            Ok(_) => {}
            Err(_) => return,
        }
    }
    let stats = parser.stats();
    assert_eq!(stats.nar_size, data.len() as u64);
    assert_eq!(stats.file_bytes, file_bytes);
});
