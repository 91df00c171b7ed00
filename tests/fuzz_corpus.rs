//! Replays the fuzz corpus of the library's targets on stable, in every `cargo test`: each file
//! of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the matching
//! `purgatory_sync::internals::fuzz` function, which asserts the target's invariants. The
//! fuzzers themselves (`fuzz/`, cargo-fuzz on nightly) grow the corpus; this keeps what they
//! found. The C ABI's targets are replayed by `capi/tests/fuzz_corpus.rs`.

use purgatory_sync_testkit::fuzz::{self, FuzzTarget};

const TARGETS: &[(&str, FuzzTarget)] = &[
    ("url_policy", purgatory_sync::internals::fuzz::url_policy),
    ("nip34", purgatory_sync::internals::fuzz::nip34),
    ("state_file", purgatory_sync::internals::fuzz::state_file),
];

#[test]
fn every_corpus_and_regression_input_keeps_the_invariants() {
    fuzz::replay_all(TARGETS);
}

/// The fuzz targets that call the library are the ones replayed here, and every target calls
/// the library or the C ABI crate (whose targets `capi/tests/fuzz_corpus.rs` replays).
#[test]
fn the_fuzz_targets_are_the_ones_replayed() {
    let ours = fuzz::targets_calling("purgatory_sync::internals::fuzz");
    let mut expected: Vec<String> = TARGETS.iter().map(|(n, _)| (*n).to_owned()).collect();
    expected.sort();
    assert_eq!(ours, expected);
    let capi = fuzz::targets_calling("purgatory_sync_capi::fuzz");
    let mut all = fuzz::files(&fuzz::fuzz_dir().join("fuzz_targets"));
    all.retain(|p| {
        let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        !ours.iter().chain(&capi).any(|n| n == name)
    });
    assert!(all.is_empty(), "targets that call neither crate: {all:?}");
}
