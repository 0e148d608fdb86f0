#![no_main]
//! See `buildkit_router::fuzzing::grpc_framing`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| buildkit_router::fuzzing::grpc_framing(data));
