#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| purgatory_sync::internals::fuzz::nip34(data));
