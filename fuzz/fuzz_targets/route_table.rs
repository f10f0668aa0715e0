#![no_main]
//! A discovery push from protobuf bytes, converted to a RouteTable and looked up.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_sidecar::fuzzing::route_table(data));
