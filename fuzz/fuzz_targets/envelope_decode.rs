//! Decoding arbitrary bytes never panics; whatever decodes re-encodes to the same bytes.
#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::envelope(data));
