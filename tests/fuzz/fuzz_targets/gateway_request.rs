#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| clawnode::fuzzing::gateway_request(data));
