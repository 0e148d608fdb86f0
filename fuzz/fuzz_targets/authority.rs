#![no_main]
//! See `buildkit_router::fuzzing::authority`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| buildkit_router::fuzzing::authority(data));
