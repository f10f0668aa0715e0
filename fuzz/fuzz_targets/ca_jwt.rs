#![no_main]
//! Kubernetes service-account tokens checked offline (`ca serve --auth jwks`), and the JWKS parser.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_ca::fuzzing::jwt(data));
