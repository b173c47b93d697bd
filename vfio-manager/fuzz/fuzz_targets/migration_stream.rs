//! The migration stream as a destination reads it: the header and every chunk. No
//! panic, no allocation past the format's bounds, a corrupt stream is an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mediated_dev::migration::StreamReader;

fuzz_target!(|data: &[u8]| {
    let Ok((mut r, _header)) = StreamReader::new(data) else {
        return;
    };
    let mut buf = Vec::new();
    while let Ok(true) = r.next_chunk(&mut buf) {
        assert!(buf.len() <= mediated_dev::migration::stream::MAX_CHUNK);
    }
});
