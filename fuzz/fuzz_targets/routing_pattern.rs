//! The wildcard matcher never panics, `#` matches every key, and a pattern without wildcards
//! matches exactly itself.
#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|input: (&str, &str)| checks::pattern(input.0, input.1));
