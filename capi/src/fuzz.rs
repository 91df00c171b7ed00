//! Fuzz entry points of the C ABI's JSON parsers, for the cargo-fuzz project in `fuzz/` and for
//! `capi/tests/fuzz_corpus.rs`, which replays their committed corpus on every `cargo test`. Not
//! part of the API: may change at any time.

use crate::{builder_from_json, event_from_json, PsyncStatus};

/// The bytes as `psync_engine_submit`'s event JSON; an event that parses goes through the
/// library's submit validation (`purgatory_sync::internals::fuzz::submit_validation`, which
/// lists its invariants).
///
/// Invariants here: a JSON error is `PSYNC_INVALID_JSON` with a message.
pub fn submit_validation(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match event_from_json(text) {
        Ok(event) => purgatory_sync::internals::fuzz::submit_validation(&event),
        Err((status, message)) => {
            assert_eq!(status, PsyncStatus::PSYNC_INVALID_JSON, "{message}");
            assert!(!message.is_empty());
        }
    }
}

/// The bytes as `psync_engine_new`'s configuration JSON, turned into an
/// [`EngineBuilder`](purgatory_sync::EngineBuilder) the way `psync_engine_new` does it, without
/// building (no thread starts).
///
/// Invariants: the result is a builder, or `PSYNC_INVALID_JSON` with a message that starts
/// with `config_json: `.
pub fn capi_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err((status, message)) = builder_from_json(Some(text)) {
        assert_eq!(status, PsyncStatus::PSYNC_INVALID_JSON, "{message}");
        assert!(
            message.starts_with("config_json: ") && message.len() > "config_json: ".len(),
            "{message}"
        );
    }
}
