//! Replays the committed fuzz corpus on stable: every file of `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` goes through the target's function, which asserts the target's
//! invariants. The library and the C ABI crate each replay their own targets.

use std::path::{Path, PathBuf};

/// A fuzz target's function: arbitrary bytes in, a panic when an invariant breaks.
pub type FuzzTarget = fn(&[u8]);

/// The cargo-fuzz project's folder (`fuzz/` at the top of the repository).
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test kit is a folder of the repository")
        .join("fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
pub fn files(dir: &Path) -> Vec<PathBuf> {
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

/// Runs every input of `target` in `kind` (`corpus` or `regressions`) and panics naming the
/// inputs that broke an invariant; returns how many inputs ran.
pub fn replay(kind: &str, name: &str, target: FuzzTarget) -> usize {
    let inputs = files(&fuzz_dir().join(kind).join(name));
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

/// The names of the fuzz targets (`fuzz/fuzz_targets/<name>.rs`) whose source calls
/// `<path>::<name>(data)`, sorted.
pub fn targets_calling(path: &str) -> Vec<String> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut found: Vec<String> = files(&dir)
        .iter()
        .filter_map(|p| {
            let name = p.file_stem()?.to_str()?.to_owned();
            let source = std::fs::read_to_string(p).ok()?;
            source
                .contains(&format!("{path}::{name}(data)"))
                .then_some(name)
        })
        .collect();
    found.sort();
    found
}

/// Replays `fuzz/corpus/<name>/` (which must not be empty) and `fuzz/regressions/<name>/` of
/// every target.
pub fn replay_all(targets: &[(&str, FuzzTarget)]) {
    for &(name, target) in targets {
        let n = replay("corpus", name, target);
        assert!(n > 0, "fuzz/corpus/{name}/ is empty or missing");
        replay("regressions", name, target);
    }
}
