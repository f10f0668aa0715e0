#![no_main]
//! The CA's CSR parsing and vetting (DER wrapped in PEM, or PEM text as given).
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_ca::fuzzing::csr(data));
