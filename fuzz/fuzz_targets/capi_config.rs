#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| purgatory_sync_capi::fuzz::capi_config(data));
