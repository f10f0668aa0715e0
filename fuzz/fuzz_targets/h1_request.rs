#![no_main]
//! The sidecar's HTTP/1.1 request head parser (outbound, the app's bytes).
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_sidecar::fuzzing::h1_request(data));
