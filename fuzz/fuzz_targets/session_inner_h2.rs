#![no_main]
//! See `buildkit_router::fuzzing::session_inner_h2`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| buildkit_router::fuzzing::session_inner_h2(data));
