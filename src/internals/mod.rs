//! What the crate's fuzz targets (`fuzz/`) and benches (`benches/`) need of its inside. Not
//! part of the API: hidden from the documentation, and may change at any time.

pub mod bench;
pub mod fuzz;
