//! Gives the shared library the SONAME hosts link against: `libpurgatory_sync.so.0.<minor>`
//! (the file cargo writes is `libpurgatory_sync_capi.so`; `install.sh` installs it under the
//! SONAME with the links `libpurgatory_sync.so.0.<minor>` and `libpurgatory_sync.so`). While
//! the version is 0.x a minor version may break the ABI, so the SONAME carries it.

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets the version");
    let minor = std::env::var("CARGO_PKG_VERSION_MINOR").expect("cargo sets the version");
    let abi = if major == "0" {
        format!("0.{minor}")
    } else {
        major
    };
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libpurgatory_sync.so.{abi}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
