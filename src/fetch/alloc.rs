//! libgit2's allocator, replaced so that the memory a fetch makes libgit2 hold is counted and
//! bounded (the budget itself, and what it refuses, is `crate::fetch::conn`'s business).
//!
//! A pack's object headers and delta instructions decide how much libgit2 allocates while it
//! indexes: 80 KB on the wire can make it allocate gigabytes (a "delta bomb"), and none of that
//! passes through the socket stream. So every allocation libgit2 makes goes through the three
//! functions below, which ask the current thread's fetch, if any, whether it may grow, and tell
//! it what was allocated and freed. Outside a fetch they are plain `malloc`, `realloc` and
//! `free`.
//!
//! The blocks are the C library's own, sized with `malloc_usable_size`, not given a header of
//! ours: a block libgit2 allocated before the switch (with its standard allocator, which is
//! `malloc` too) can be freed or grown through these functions, and ours through the standard
//! ones. That is what makes the switch safe at any time, even after libgit2 has allocated.

use std::ffi::{c_char, c_int, c_void};

use crate::fetch::conn;

/// libgit2's `git_allocator` (`include/git2/sys/alloc.h` of libgit2 1.9).
#[repr(C)]
struct GitAllocator {
    gmalloc: unsafe extern "C" fn(usize, *const c_char, c_int) -> *mut c_void,
    grealloc: unsafe extern "C" fn(*mut c_void, usize, *const c_char, c_int) -> *mut c_void,
    gfree: unsafe extern "C" fn(*mut c_void),
}

/// `GIT_OPT_SET_ALLOCATOR` in `git_libgit2_opt_t`.
const GIT_OPT_SET_ALLOCATOR: c_int = libgit2_sys::GIT_OPT_SET_ALLOCATOR as c_int;

/// The usable size of a block from the C library's allocator.
///
/// # Safety
/// `p` is null or a live block from `malloc`/`realloc`.
unsafe fn usable(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    // SAFETY: the caller passes a live block of the C allocator.
    unsafe {
        libc::malloc_usable_size(p)
    }
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    // SAFETY: the caller passes a live block of the C allocator.
    unsafe {
        libc::malloc_size(p)
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos",
        target_os = "ios"
    )))]
    {
        // Never called: `install` leaves libgit2's allocator alone on these targets.
        0
    }
}

unsafe extern "C" fn gmalloc(len: usize, _file: *const c_char, _line: c_int) -> *mut c_void {
    if !conn::may_allocate(len, len) {
        return std::ptr::null_mut();
    }
    // SAFETY: plain `malloc`; a null result is libgit2's to handle (it reports out of memory).
    let p = unsafe { libc::malloc(len) };
    // SAFETY: `p` is null or the block just allocated.
    conn::allocated(unsafe { usable(p) }, 0);
    p
}

unsafe extern "C" fn grealloc(
    ptr: *mut c_void,
    len: usize,
    _file: *const c_char,
    _line: c_int,
) -> *mut c_void {
    // SAFETY: libgit2 passes null or a live block it allocated, with `malloc` either way.
    let before = unsafe { usable(ptr) };
    if !conn::may_allocate(len, len.saturating_sub(before)) {
        // `ptr` stays valid, as `realloc` leaves it on failure.
        return std::ptr::null_mut();
    }
    // SAFETY: `ptr` is null or a live `malloc` block; on failure it is left untouched.
    let p = unsafe { libc::realloc(ptr, len) };
    if !p.is_null() {
        // SAFETY: `p` is the block just (re)allocated.
        conn::allocated(unsafe { usable(p) }, before);
    }
    p
}

unsafe extern "C" fn gfree(ptr: *mut c_void) {
    // SAFETY: libgit2 passes null or a live block it allocated, with `malloc` either way.
    conn::allocated(0, unsafe { usable(ptr) });
    // SAFETY: as above; `free(NULL)` is a no-op.
    unsafe { libc::free(ptr) }
}

/// Makes libgit2 allocate through the functions above, for the whole process. `false` where
/// the C library cannot tell a block's size: there libgit2 keeps its own allocator and fetches
/// are not held to a memory budget.
pub(crate) fn install() -> Result<bool, String> {
    if !cfg!(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos",
        target_os = "ios"
    )) {
        return Ok(false);
    }
    let mut allocator = GitAllocator {
        gmalloc,
        grealloc,
        gfree,
    };
    // SAFETY: libgit2 is initialised (the caller made a git2 call first); it copies the struct,
    // whose three functions are valid for the life of the process. Blocks allocated before the
    // switch are `malloc` blocks, which these functions free and grow correctly.
    let rc = unsafe { libgit2_sys::git_libgit2_opts(GIT_OPT_SET_ALLOCATOR, &mut allocator) };
    if rc == 0 {
        Ok(true)
    } else {
        Err(git2::Error::last_error(rc).to_string())
    }
}
