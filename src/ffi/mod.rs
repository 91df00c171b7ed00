//! Every `unsafe` line of the crate lives under this module.
//!
//! - [`stream`]: the socket stream the engine registers with libgit2, so that every fetch's
//!   connections obey the engine's limits (see `crate::fetch::net`).
//! - [`alloc`]: libgit2's allocator, replaced so that each fetch's memory is counted and
//!   bounded (see `crate::fetch::net`).
//! - [`set_git_timeouts`]: libgit2's process-wide socket timeouts, for sockets the engine's
//!   stream does not serve; [`set_max_object_size`]: its limit on objects built from deltas.
//! - [`try_lock_exclusive`]: `flock` on the state file's lock file (`crate::persist::lock`).

#![allow(unsafe_code)]

pub(crate) mod alloc;
pub(crate) mod stream;

use std::time::Duration;

/// Sets libgit2's process-wide connect and read timeouts. Both are set together: setting only
/// the connect timeout breaks fetches ("Resource temporarily unavailable").
pub(crate) fn set_git_timeouts(connect: Duration, io: Duration) -> Result<(), git2::Error> {
    let ms = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: libgit2 reads these globals without synchronisation. The caller runs this once
    // per process (behind a `Once`) from `EngineBuilder::build`, before the engine's threads
    // exist and so before any fetch of ours can read them.
    unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(ms(connect))?;
        git2::opts::set_server_timeout_in_milliseconds(ms(io))
    }
}

/// Takes an exclusive advisory lock on `file` without waiting (`flock(LOCK_EX | LOCK_NB)`).
/// `Ok(false)`: another open file description holds it, in this process or another. The lock
/// lasts until this open file is closed (dropped), and the kernel drops it when the process
/// dies, so a crash never leaves it behind.
#[cfg(unix)]
pub(crate) fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    loop {
        // SAFETY: `flock` takes a descriptor and flags and touches no memory of ours; `file`
        // keeps the descriptor open for the length of the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock => return Ok(false),
            std::io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Sets libgit2's process-wide limit on the size of an object built from a delta
/// (`GIT_OPT_SET_PACK_MAX_OBJECT_SIZE`).
pub(crate) fn set_max_object_size(bytes: u64) -> Result<(), git2::Error> {
    let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
    // SAFETY: libgit2 is initialised (by the git2 call the caller makes first); the option
    // takes one `size_t`, and its global is written once per process, from `fetch::init`,
    // before any fetch of the engine reads it.
    let rc = unsafe {
        libgit2_sys::git_libgit2_opts(
            libgit2_sys::GIT_OPT_SET_PACK_MAX_OBJECT_SIZE as std::ffi::c_int,
            bytes as libc::size_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(git2::Error::last_error(rc))
    }
}

/// Adds a pack backend reading and writing the packs of `objects_dir/pack` to `odb`, ahead of
/// the repository's own backends (`priority` above theirs, which are 1 and 2): libgit2 writes
/// a fetched pack through the first backend that can, so the fetch's packs land there.
pub(crate) fn add_pack_backend(
    odb: &git2::Odb<'_>,
    objects_dir: &std::path::Path,
    priority: i32,
) -> Result<(), git2::Error> {
    use git2::Binding;
    let dir = std::ffi::CString::new(objects_dir.as_os_str().as_encoded_bytes())
        .map_err(|_| git2::Error::from_str("the objects directory's path contains a NUL byte"))?;
    let mut backend: *mut libgit2_sys::git_odb_backend = std::ptr::null_mut();
    // SAFETY: `dir` is a valid NUL-terminated path for the call; on success libgit2 hands us a
    // backend we own.
    let rc = unsafe { libgit2_sys::git_odb_backend_pack(&mut backend, dir.as_ptr()) };
    if rc < 0 {
        return Err(git2::Error::last_error(rc));
    }
    // SAFETY: `odb.raw()` is the live odb of a repository the caller holds; on success the odb
    // takes ownership of `backend` and frees it with itself.
    let rc = unsafe { libgit2_sys::git_odb_add_backend(odb.raw(), backend, priority) };
    if rc < 0 {
        // SAFETY: the odb did not take the backend; it is ours to free, once.
        unsafe {
            if let Some(free) = (*backend).free {
                free(backend);
            }
        }
        return Err(git2::Error::last_error(rc));
    }
    Ok(())
}

extern "C" {
    /// `include/git2/sys/remote.h` of libgit2 1.9; libgit2-sys does not declare it.
    fn git_remote_capabilities(
        out: *mut std::ffi::c_uint,
        remote: *mut libgit2_sys::git_remote,
    ) -> std::ffi::c_int;
}

/// `GIT_REMOTE_CAPABILITY_TIP_OID | GIT_REMOTE_CAPABILITY_REACHABLE_OID`.
const WANTS_BY_ID: std::ffi::c_uint = (1 << 0) | (1 << 1);

/// Whether the connected `remote`'s server allows wants of ids it does not advertise
/// (`allow-tip-sha1-in-want` or `allow-reachable-sha1-in-want`). `false` when unknown.
pub(crate) fn ids_allowed(remote: &git2::Remote<'_>) -> bool {
    use git2::Binding;
    let mut caps: std::ffi::c_uint = 0;
    // SAFETY: `remote.raw()` is a live remote the caller holds (connected: its capabilities
    // come from the advertisement); `caps` is valid for a write.
    let rc = unsafe { git_remote_capabilities(&mut caps, remote.raw()) };
    rc == 0 && caps & WANTS_BY_ID != 0
}

extern "C" {
    /// `include/git2/remote.h` of libgit2 1.9; libgit2-sys declares the struct, not these.
    fn git_remote_connect_options_init(
        opts: *mut libgit2_sys::git_remote_connect_options,
        version: std::ffi::c_uint,
    ) -> std::ffi::c_int;
    fn git_remote_connect_ext(
        remote: *mut libgit2_sys::git_remote,
        direction: libgit2_sys::git_direction,
        opts: *const libgit2_sys::git_remote_connect_options,
    ) -> std::ffi::c_int;
}

/// Connects `remote` for fetching, following no redirect (`git2`'s `connect_auth` follows the
/// first request's). The connection's limits are the engine's socket stream's.
pub(crate) fn connect_for_fetch(remote: &mut git2::Remote<'_>) -> Result<(), git2::Error> {
    use git2::Binding;
    let mut opts = std::mem::MaybeUninit::<libgit2_sys::git_remote_connect_options>::zeroed();
    // SAFETY: `opts` is writable memory of the struct's size; libgit2 initialises every field
    // (version 1 is libgit2 1.9's `GIT_REMOTE_CONNECT_OPTIONS_VERSION`).
    let rc = unsafe { git_remote_connect_options_init(opts.as_mut_ptr(), 1) };
    if rc < 0 {
        return Err(git2::Error::last_error(rc));
    }
    // SAFETY: initialised by the call above.
    let mut opts = unsafe { opts.assume_init() };
    opts.follow_redirects = libgit2_sys::GIT_REMOTE_REDIRECT_NONE;
    // SAFETY: `remote.raw()` is a live remote the caller holds mutably; `opts` lives for the
    // call, holds no pointer of ours (no callbacks, no headers), and libgit2 copies what it
    // keeps.
    let rc =
        unsafe { git_remote_connect_ext(remote.raw(), libgit2_sys::GIT_DIRECTION_FETCH, &opts) };
    if rc < 0 {
        return Err(git2::Error::last_error(rc));
    }
    Ok(())
}
