#![no_main]
//! pilot's admission webhooks: AdmissionReview bodies from the API server (or anyone who reaches
//! the port) through `/inject` and `/validate`: refused with a reason or answered, never a panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_pilot::webhook::fuzzing::admission_review(data));
