//! The `purgatory-sync` command-line tool.
fn main() {}
