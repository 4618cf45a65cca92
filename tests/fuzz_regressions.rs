//! Replays every input saved under `fuzz/regressions/<target>/` (crashes the fuzzers found)
//! and `fuzz/seeds/<target>/` (the starting corpus) through the checks the fuzz targets run.
#![allow(clippy::unwrap_used, reason = "tests")]

mod fuzz_checks;

use std::path::Path;

fn inputs(target: &str) -> Vec<Vec<u8>> {
    let mut files = Vec::new();
    for kind in ["regressions", "seeds"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(kind)
            .join(target);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            files.extend(entries.map(|e| e.unwrap().path()));
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect()
}

#[test]
fn envelope_decode() {
    for input in inputs("envelope_decode") {
        fuzz_checks::envelope(&input);
    }
}

#[test]
fn routing_pattern() {
    for input in inputs("routing_pattern") {
        let text = String::from_utf8_lossy(&input);
        let (pattern, key) = text.split_once('\n').unwrap_or((&text, ""));
        fuzz_checks::pattern(pattern, key);
    }
}

#[test]
fn open_file() {
    let mut found = inputs("open_file");
    assert!(!found.is_empty(), "the seed file is missing");
    // The test fixtures (files of older formats, a journal left by a crash) are seeds too.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for entry in std::fs::read_dir(fixtures).unwrap() {
        found.push(std::fs::read(entry.unwrap().path()).unwrap());
    }
    for input in &found {
        fuzz_checks::open_file(input);
    }
}

#[test]
fn operations() {
    for input in inputs("operations") {
        fuzz_checks::operations(&input);
    }
    // A few fixed sequences, so the check runs even before any input is saved.
    fuzz_checks::operations(&[0, 5, 2, 3, 3, 2, 4, 0, 6, 4, 0, 9, 2, 7, 5, 1]);
    fuzz_checks::operations(&[2, 1, 2, 2, 3, 3, 6, 10, 4, 1, 5, 0, 3, 1, 1, 200]);
    // Batches of enqueues into the FIFO lane, consumed in the same transactions, with a
    // power cut in the middle.
    fuzz_checks::operations(&[6, 7, 7, 14, 6, 3, 8, 40, 7, 20, 3, 2, 4, 0, 7, 41, 6, 8]);
    fuzz_checks::operations(&[
        6, 8, 7, 5, 5, 0, 7, 47, 8, 5, 6, 2, 3, 3, 7, 13, 8, 90, 4, 1,
    ]);
}
