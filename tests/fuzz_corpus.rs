//! Replays the fuzz corpus on stable, in every `cargo test`: each file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the matching
//! `purgatory_sync::__fuzz` function, which asserts the target's invariants. The fuzzers
//! themselves (`fuzz/`, cargo-fuzz on nightly) grow the corpus; this keeps what they found.

use std::path::{Path, PathBuf};

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    (
        "submit_validation",
        purgatory_sync::__fuzz::submit_validation,
    ),
    ("url_policy", purgatory_sync::__fuzz::url_policy),
    ("nip34", purgatory_sync::__fuzz::nip34),
    ("state_file", purgatory_sync::__fuzz::state_file),
    ("capi_config", purgatory_sync::__fuzz::capi_config),
];

/// The files of `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every input of `target` in `kind` (`corpus` or `regressions`); returns how many.
fn replay(kind: &str, name: &str, target: Target) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(name);
    let inputs = files(&dir);
    let broken: Vec<String> = inputs
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("a corpus file reads");
            std::panic::catch_unwind(|| target(&data)).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        broken.is_empty(),
        "{name}: these inputs broke an invariant (each panic is printed above): {broken:#?}"
    );
    inputs.len()
}

#[test]
fn every_corpus_input_keeps_the_invariants() {
    for &(name, target) in TARGETS {
        let n = replay("corpus", name, target);
        assert!(n > 0, "fuzz/corpus/{name}/ is empty or missing");
    }
}

#[test]
fn every_regression_input_keeps_the_invariants() {
    for &(name, target) in TARGETS {
        replay("regressions", name, target);
    }
}

/// The fuzz project has one target per entry of [`TARGETS`], and no other.
#[test]
fn the_fuzz_targets_are_the_ones_replayed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    let mut found: Vec<String> = files(&dir)
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    found.sort();
    let mut expected: Vec<String> = TARGETS.iter().map(|(n, _)| (*n).to_owned()).collect();
    expected.sort();
    assert_eq!(found, expected);
    for name in &expected {
        let source = std::fs::read_to_string(dir.join(format!("{name}.rs"))).unwrap();
        assert!(
            source.contains(&format!("purgatory_sync::__fuzz::{name}(data)")),
            "fuzz/fuzz_targets/{name}.rs does not call __fuzz::{name}"
        );
    }
}
