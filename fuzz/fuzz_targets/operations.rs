//! Operation sequences against a model, with power cuts inside operations: the recovered
//! database holds exactly what was acknowledged (plus, all or nothing, the operation in
//! flight) and goes on.
#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::operations(data));
