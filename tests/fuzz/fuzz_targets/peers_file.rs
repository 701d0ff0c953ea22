#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| clawnode::fuzzing::peers_file(data));
