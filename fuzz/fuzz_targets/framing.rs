#![no_main]
//! Header hygiene: framing checks, the raw CL+TE peek, the HTTP sniff, hop-by-hop stripping.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_sidecar::fuzzing::framing(data));
