#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| purgatory_sync::internals::fuzz::state_file(data));
