#![no_main]
//! The DNS proxy's query parser and its answers.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_sidecar::fuzzing::dns_query(data));
