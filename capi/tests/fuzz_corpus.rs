//! Replays the fuzz corpus of the C ABI's targets (its JSON parsers) on stable, in every
//! `cargo test`: each file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes
//! through the matching `purgatory_sync_capi::fuzz` function. The library's targets are
//! replayed by the library's `tests/fuzz_corpus.rs`.

use purgatory_sync_testkit::fuzz::{self, FuzzTarget};

const TARGETS: &[(&str, FuzzTarget)] = &[
    (
        "submit_validation",
        purgatory_sync_capi::fuzz::submit_validation,
    ),
    ("capi_config", purgatory_sync_capi::fuzz::capi_config),
];

#[test]
fn every_corpus_and_regression_input_keeps_the_invariants() {
    fuzz::replay_all(TARGETS);
}

/// The fuzz targets that call this crate are the ones replayed here.
#[test]
fn the_fuzz_targets_are_the_ones_replayed() {
    let mut expected: Vec<String> = TARGETS.iter().map(|(n, _)| (*n).to_owned()).collect();
    expected.sort();
    assert_eq!(fuzz::targets_calling("purgatory_sync_capi::fuzz"), expected);
}
