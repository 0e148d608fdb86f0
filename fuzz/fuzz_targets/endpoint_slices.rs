#![no_main]
//! See `buildkit_router::fuzzing::endpoint_slices`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| buildkit_router::fuzzing::endpoint_slices(data));
