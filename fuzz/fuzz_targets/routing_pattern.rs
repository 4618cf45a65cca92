//! The wildcard matcher never panics, `#` matches every key, and a pattern without wildcards
//! matches exactly itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (pattern, key) = input;
    let matched = mqlite::pattern_matches(pattern, key);
    assert!(mqlite::pattern_matches("#", key));
    if !pattern.split('.').any(|w| w == "*" || w == "#") {
        assert_eq!(matched, pattern == key);
    }
});
