#![no_main]
//! See `buildkit_router::fuzzing::discovery_flags`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| buildkit_router::fuzzing::discovery_flags(data));
