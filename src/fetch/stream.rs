//! The C side of the engine's socket stream: a `git_stream` vtable whose callbacks forward to
//! the safe [`Conn`](crate::fetch::conn::Conn).
//!
//! Layouts follow `include/git2/sys/stream.h` of libgit2 1.9 (`GIT_STREAM_VERSION` 1); the
//! stream is registered only when that series is linked in (`super::libgit2::check_layouts`). Every
//! callback catches panics (unwinding into C is undefined behaviour) and reports errors through
//! `git_error_set_str`, as libgit2's own streams do.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::fetch::conn::Conn;

const GIT_STREAM_VERSION: c_int = 1;
const GIT_STREAM_STANDARD: c_int = 1;
const GIT_ERROR_NET: c_int = 12;

#[repr(C)]
struct GitStream {
    version: c_int,
    /// The `encrypted : 1, proxy_support : 1` bit-fields: both zero for a plain socket.
    flags: c_uint,
    timeout: c_int,
    connect_timeout: c_int,
    connect: Option<unsafe extern "C" fn(*mut GitStream) -> c_int>,
    certificate: Option<unsafe extern "C" fn(*mut *mut c_void, *mut GitStream) -> c_int>,
    set_proxy: Option<unsafe extern "C" fn(*mut GitStream, *const c_void) -> c_int>,
    read: Option<unsafe extern "C" fn(*mut GitStream, *mut c_void, usize) -> isize>,
    write: Option<unsafe extern "C" fn(*mut GitStream, *const c_char, usize, c_int) -> isize>,
    close: Option<unsafe extern "C" fn(*mut GitStream) -> c_int>,
    free: Option<unsafe extern "C" fn(*mut GitStream)>,
}

/// Our stream: libgit2's header first, so that a `*mut GitStream` is a `*mut OurStream`.
#[repr(C)]
struct OurStream {
    parent: GitStream,
    conn: Conn,
}

#[repr(C)]
struct Registration {
    version: c_int,
    init: Option<unsafe extern "C" fn(*mut *mut GitStream, *const c_char, *const c_char) -> c_int>,
    wrap: Option<unsafe extern "C" fn(*mut *mut GitStream, *mut GitStream, *const c_char) -> c_int>,
}

extern "C" {
    fn git_stream_register(kind: c_int, registration: *mut Registration) -> c_int;
}

fn set_error(message: &str) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    // SAFETY: `text` is a valid NUL-terminated string; libgit2 copies it.
    unsafe {
        libgit2_sys::git_error_set_str(GIT_ERROR_NET, text.as_ptr());
    }
}

/// Runs a callback body, turning a panic into a libgit2 error.
fn guarded<T>(failure: T, body: impl FnOnce() -> Result<T, String>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        Ok(Err(message)) => {
            set_error(&message);
            failure
        }
        Err(_) => {
            set_error("purgatory-sync stream panicked");
            failure
        }
    }
}

/// # Safety
/// libgit2 passes a stream it got from [`init`], not yet freed.
unsafe fn conn<'a>(stream: *mut GitStream) -> &'a mut Conn {
    // SAFETY: every stream libgit2 hands back to these callbacks was allocated by `init` as an
    // `OurStream`, whose first field is the `GitStream` header (`repr(C)`).
    unsafe { &mut (*stream.cast::<OurStream>()).conn }
}

unsafe extern "C" fn init(
    out: *mut *mut GitStream,
    host: *const c_char,
    port: *const c_char,
) -> c_int {
    guarded(-1, || {
        if out.is_null() || host.is_null() || port.is_null() {
            return Err("stream init without host or port".into());
        }
        // SAFETY: libgit2 passes NUL-terminated host and port strings valid for this call.
        let (host, port) = unsafe { (CStr::from_ptr(host), CStr::from_ptr(port)) };
        let stream = Box::new(OurStream {
            parent: GitStream {
                version: GIT_STREAM_VERSION,
                flags: 0,
                timeout: 0,
                connect_timeout: 0,
                connect: Some(connect),
                certificate: None,
                set_proxy: None,
                read: Some(read),
                write: Some(write),
                close: Some(close),
                free: Some(free),
            },
            conn: Conn::new(&host.to_string_lossy(), &port.to_string_lossy()),
        });
        // SAFETY: `out` is non-null and points to libgit2's out-parameter.
        unsafe { *out = Box::into_raw(stream).cast::<GitStream>() };
        Ok(0)
    })
}

unsafe extern "C" fn connect(stream: *mut GitStream) -> c_int {
    // SAFETY: see `conn`.
    guarded(-1, || unsafe { conn(stream) }.connect().map(|()| 0))
}

unsafe extern "C" fn read(stream: *mut GitStream, data: *mut c_void, len: usize) -> isize {
    guarded(-1, || {
        if len == 0 {
            return Ok(0);
        }
        // SAFETY: libgit2 passes a writable buffer of `len` bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(data.cast::<u8>(), len) };
        // SAFETY: see `conn`.
        let n = unsafe { conn(stream) }.read(buf)?;
        Ok(isize::try_from(n).unwrap_or(isize::MAX))
    })
}

unsafe extern "C" fn write(
    stream: *mut GitStream,
    data: *const c_char,
    len: usize,
    _flags: c_int,
) -> isize {
    guarded(-1, || {
        if len == 0 {
            return Ok(0);
        }
        // SAFETY: libgit2 passes a readable buffer of `len` bytes.
        let buf = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
        // SAFETY: see `conn`.
        let n = unsafe { conn(stream) }.write(buf)?;
        Ok(isize::try_from(n).unwrap_or(isize::MAX))
    })
}

unsafe extern "C" fn close(stream: *mut GitStream) -> c_int {
    // SAFETY: see `conn`.
    guarded(-1, || {
        unsafe { conn(stream) }.close();
        Ok(0)
    })
}

unsafe extern "C" fn free(stream: *mut GitStream) {
    if stream.is_null() {
        return;
    }
    // SAFETY: allocated by `init` with `Box::into_raw`; libgit2 frees each stream once.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        drop(unsafe { Box::from_raw(stream.cast::<OurStream>()) })
    }));
}

/// Registers the engine's stream as libgit2's standard socket stream, for the whole process.
/// libgit2's TLS stream wraps it for `https://`.
pub(crate) fn register() -> Result<(), String> {
    let mut registration = Registration {
        version: GIT_STREAM_VERSION,
        init: Some(init),
        wrap: None,
    };
    // SAFETY: libgit2 is initialised by the caller (`git2` does it on first use); the
    // registration is copied by libgit2 under its registry lock, so a stack value is fine.
    let rc = unsafe { git_stream_register(GIT_STREAM_STANDARD, &mut registration) };
    if rc == 0 {
        Ok(())
    } else {
        Err(git2::Error::last_error(rc).to_string())
    }
}
