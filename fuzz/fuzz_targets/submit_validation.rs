#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| purgatory_sync_capi::fuzz::submit_validation(data));
