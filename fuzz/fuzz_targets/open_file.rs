//! Arbitrary bytes opened as a database file (with the integrity check): an error or a
//! readable database, never a panic.
#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys aborts on any panic, even one mqlite catches and turns into an error; a
    // quiet hook instead, so that only a panic escaping mqlite is a crash (libFuzzer still
    // saves that input).
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    checks::open_file(data);
});
