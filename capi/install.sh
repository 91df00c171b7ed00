#!/usr/bin/env bash
# Builds the C ABI (crate purgatory-sync-capi) and installs it the way C, Go and Python hosts
# expect it:
#
#   PREFIX/include/purgatory_sync.h
#   PREFIX/lib/libpurgatory_sync.so.<version>   SONAME libpurgatory_sync.so.0.<minor> (0.x: a
#   PREFIX/lib/libpurgatory_sync.so.0.<minor>   minor version may change the ABI), and the link
#   PREFIX/lib/libpurgatory_sync.so             -lpurgatory_sync finds
#   PREFIX/lib/libpurgatory_sync.a              exports psync_* only: libgit2, OpenSSL glue and
#                                               Rust's std are local, so a host may link another
#                                               libgit2 (git2go) beside it
#   PREFIX/lib/pkgconfig/purgatory_sync.pc      pkg-config --cflags --libs purgatory_sync
#
# Usage: capi/install.sh [--prefix DIR] [--libdir DIR] [--debug] [--no-build] [--from DIR]
#   --prefix DIR  where to install (default /usr/local)
#   --libdir DIR  where the libraries go (default PREFIX/lib)
#   --debug       build and install the debug profile (default: release)
#   --no-build    install what is already built (cargo build -p purgatory-sync-capi)
#   --from DIR    the folder holding the built libraries (default: cargo's target/<profile>)
# Needs cargo, and ld, objcopy and ar (binutils) for the static library. Linux only.
set -euo pipefail

prefix=/usr/local
libdir=
profile=release
build=1
from=
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --libdir) libdir=$2; shift 2 ;;
        --debug) profile=debug; shift ;;
        --no-build) build=0; shift ;;
        --from) from=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
libdir=${libdir:-$prefix/lib}
here=$(cd "$(dirname "$0")" && pwd)

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/Cargo.toml" | head -n 1)
major=${version%%.*}
minor=${version#*.}; minor=${minor%%.*}
if [ "$major" = 0 ]; then abi=0.$minor; else abi=$major; fi

if [ "$build" = 1 ]; then
    flags=(--locked -p purgatory-sync-capi --lib)
    [ "$profile" = release ] && flags+=(--release)
    (cd "$here" && cargo build "${flags[@]}")
fi
if [ -z "$from" ]; then
    target=${CARGO_TARGET_DIR:-$(cd "$here" && cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')}
    from=$target/$profile
fi
for f in libpurgatory_sync_capi.so libpurgatory_sync_capi.a; do
    if [ ! -f "$from/$f" ]; then
        echo "install.sh: $from/$f is missing (build it, or drop --no-build)" >&2
        exit 1
    fi
done

# Libraries the static library needs besides itself (rustc --print native-static-libs).
native_static_libs="-lssl -lcrypto -lz -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

mkdir -p "$prefix/include" "$libdir/pkgconfig"
install -m 644 "$here/include/purgatory_sync.h" "$prefix/include/purgatory_sync.h"

install -m 755 "$from/libpurgatory_sync_capi.so" "$libdir/libpurgatory_sync.so.$version"
if [ "$abi" != "$version" ]; then
    ln -sf "libpurgatory_sync.so.$version" "$libdir/libpurgatory_sync.so.$abi"
fi
ln -sf "libpurgatory_sync.so.$abi" "$libdir/libpurgatory_sync.so"

# One relocatable object with every member of the archive, then every global symbol but the
# C ABI's made local: references inside the library stay resolved, nothing else is exported.
# The LLVM bitcode rustc embeds in the standard library's objects goes too: no host links with
# Rust's LTO, and binutils' LLVM plugin (if installed) aborts on bitcode newer than itself.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ld -r --whole-archive "$from/libpurgatory_sync_capi.a" -o "$work/purgatory_sync.o"
objcopy --remove-section=.llvmbc --remove-section=.llvmcmd \
    --wildcard --keep-global-symbol='psync_*' "$work/purgatory_sync.o"
rm -f "$libdir/libpurgatory_sync.a"
ar rcs "$libdir/libpurgatory_sync.a" "$work/purgatory_sync.o"
chmod 644 "$libdir/libpurgatory_sync.a"

cat >"$libdir/pkgconfig/purgatory_sync.pc" <<PC
prefix=$prefix
libdir=$libdir
includedir=\${prefix}/include

Name: purgatory_sync
Description: Fetches missing git data for events waiting in a GRASP relay's purgatory (C ABI)
Version: $version
Libs: -L\${libdir} -lpurgatory_sync
Libs.private: $native_static_libs
Cflags: -I\${includedir}
PC

echo "installed purgatory_sync $version (SONAME libpurgatory_sync.so.$abi) in $prefix"
