#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| clawnode::fuzzing::peer_cache(data));
