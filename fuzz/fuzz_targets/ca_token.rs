#![no_main]
//! The CA's bootstrap token verification (raw tokens, and claims signed with a test key).
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_ca::fuzzing::token(data));
