#![no_main]
//! See `buildkit_router::fuzzing::wire`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| buildkit_router::fuzzing::wire(data));
