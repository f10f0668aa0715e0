#![no_main]
//! `pilot apply`'s YAML parse and validation, the analysis and translation of what it accepts; and
//! across the two crates: what pilot accepts and pushes, the sidecar converts (a NACK would leave it
//! on a stale table with no way for the operator to tell which object is to blame).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(config) = weft_pilot_config::fuzzing::apply_yaml(data)
        && let Err(e) = weft_sidecar::route::RouteTable::convert(String::new(), config)
    {
        panic!("pilot accepted objects the sidecar NACKs: {e}");
    }
});
