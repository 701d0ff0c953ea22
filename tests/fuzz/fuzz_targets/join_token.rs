#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| clawnode::fuzzing::join_token(data));
