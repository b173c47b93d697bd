//! What a guest's agent may send the host: any bytes as frames. No panic, no
//! allocation past the frame bound, and what is accepted is within the bounds and
//! writes back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_agent::protocol::{read, write, MAX_DEVICES};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(m) = read(&mut r) {
        let mut again = Vec::new();
        write(&mut again, &m).expect("an accepted message is within the bounds");
        assert_eq!(read(&mut again.as_slice()).unwrap(), m);
        if let vm_agent::protocol::Message::Hello { devices, .. } = &m {
            assert!(devices.len() <= MAX_DEVICES);
        }
    }
});
