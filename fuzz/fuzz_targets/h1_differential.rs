#![no_main]
//! Differential: weft's h1 server against hyper's HTTP/1 server on the same request bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_sidecar::fuzzing::h1_differential(data));
