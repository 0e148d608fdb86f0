#![no_main]
//! See `buildkit_router::fuzzing::session_tunnel`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| buildkit_router::fuzzing::session_tunnel(data));
