//! libgit2 calls that `git2` does not wrap, for the fetcher: the process-wide options
//! ([`set_git_timeouts`], [`set_max_object_size`]), a pack backend for the quarantine
//! ([`add_pack_backend`]), the server's capabilities ([`ids_allowed`]) and a connection that
//! follows no redirect ([`connect_for_fetch`]). The fetcher's other unsafe code is the socket
//! stream ([`super::stream`]) and libgit2's allocator ([`super::alloc`]).

use std::time::Duration;

/// The libgit2 series whose C layouts are copied by hand: `git_stream` and
/// `git_stream_registration` (`include/git2/sys/stream.h`, in [`super::stream`]) and
/// `git_allocator` (`include/git2/sys/alloc.h`, in [`super::alloc`]). libgit2-sys declares
/// neither, and a newer series may change them.
pub(crate) const LAYOUT_SERIES: (u32, u32) = (1, 9);

/// The version of the libgit2 linked in: `(major, minor, revision)`.
pub(crate) fn linked_version() -> (u32, u32, u32) {
    git2::Version::get().libgit2_version()
}

/// `Ok` when `found` is the [`LAYOUT_SERIES`] the hand-written layouts were written for;
/// otherwise why they must not be handed to it.
pub(crate) fn check_layouts(found: (u32, u32, u32)) -> Result<(), String> {
    let (major, minor, rev) = found;
    if (major, minor) == LAYOUT_SERIES {
        Ok(())
    } else {
        Err(format!(
            "libgit2 {major}.{minor}.{rev} is linked in, but the engine's socket stream and \
             allocator follow the C layouts of libgit2 {}.{}",
            LAYOUT_SERIES.0, LAYOUT_SERIES.1
        ))
    }
}

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
