//! Decoding arbitrary bytes never panics; whatever decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = mqlite::fuzz_decode_message(data) {
        assert_eq!(mqlite::fuzz_encode_message(&message), data);
    }
});
