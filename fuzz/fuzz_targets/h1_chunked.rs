#![no_main]
//! The sidecar's chunked body decoder, fed in pieces the input chooses.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_sidecar::fuzzing::h1_chunked(data));
