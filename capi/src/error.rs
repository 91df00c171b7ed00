//! Errors of one call: the per-thread message (`psync_last_error_message`) for C callers, and
//! an owned error object (`psync_error`) for hosts whose calls move between threads (Go's
//! goroutines, a thread pool): every `_err` function hands one over through an optional
//! `psync_error **` parameter, so that one call's error can never be read as another's.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::PsyncStatus;

/// A failure: its status and message.
pub(crate) type Failure = (PsyncStatus, String);

/// The error of one call (opaque): a status and a message. Handed over by the `_err`
/// functions, owned by the caller, released with `psync_error_free`.
pub struct PsyncError {
    status: PsyncStatus,
    message: CString,
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn c_string(message: &str) -> CString {
    CString::new(message.replace('\0', "\\0")).unwrap_or_default()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.as_str()
    } else {
        "a non-string payload"
    };
    format!("panic: {text}")
}

/// Where a call's `psync_error` goes: NULL, or a pointer valid for a write (set to NULL when
/// made).
pub(crate) struct ErrorOut(*mut *mut PsyncError);

impl ErrorOut {
    /// # Safety
    /// `error` is NULL or valid for a write for as long as the value lives.
    pub(crate) unsafe fn new(error: *mut *mut PsyncError) -> ErrorOut {
        if !error.is_null() {
            // SAFETY: non-NULL and valid for a write, by the contract.
            unsafe { *error = std::ptr::null_mut() };
        }
        ErrorOut(error)
    }
}

/// Runs `body` behind the panic boundary. A failure's message becomes the thread's last error
/// and, when `error` is not NULL, an owned `psync_error` in `*error` (NULL on success).
pub(crate) fn guard(error: ErrorOut, body: impl FnOnce() -> Result<(), Failure>) -> PsyncStatus {
    let (status, message) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return PsyncStatus::PSYNC_OK,
        Ok(Err(failure)) => failure,
        Err(payload) => (PsyncStatus::PSYNC_PANIC, panic_message(payload.as_ref())),
    };
    let message = c_string(&message);
    if !error.0.is_null() {
        let owned = Box::new(PsyncError {
            status,
            message: message.clone(),
        });
        // SAFETY: non-NULL and valid for a write (`ErrorOut::new`'s contract).
        unsafe { *error.0 = Box::into_raw(owned) };
    }
    LAST_ERROR.with(|slot| *slot.borrow_mut() = Some(message));
    status
}

/// The status of an error from an `_err` function; `PSYNC_OK` for NULL. Thread-safe.
///
/// # Safety
/// `error` is NULL or a live error from an `_err` function.
#[no_mangle]
pub unsafe extern "C" fn psync_error_status(error: *const PsyncError) -> PsyncStatus {
    // SAFETY: by the contract.
    unsafe { error.as_ref() }.map_or(PsyncStatus::PSYNC_OK, |e| e.status)
}

/// The message of an error from an `_err` function, owned by the error and valid until
/// `psync_error_free`; NULL for NULL. Thread-safe.
///
/// # Safety
/// `error` is NULL or a live error from an `_err` function.
#[no_mangle]
pub unsafe extern "C" fn psync_error_message(error: *const PsyncError) -> *const c_char {
    // SAFETY: by the contract.
    unsafe { error.as_ref() }.map_or(std::ptr::null(), |e| e.message.as_ptr())
}

/// Releases an error from an `_err` function. NULL is fine.
///
/// # Safety
/// `error` is NULL or a live error from an `_err` function, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn psync_error_free(error: *mut PsyncError) {
    if !error.is_null() {
        // SAFETY: from `Box::into_raw` in `guard`, released once by the contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(error) })));
    }
}

/// The calling thread's last error message, or NULL if no call on this thread has failed.
/// Set by every call that returns a status other than `PSYNC_OK`; left unchanged by
/// successful calls, so read it right after the failing call. Owned by the library: valid
/// until the next `psync_` call on this thread. Each thread has its own.
///
/// Hosts whose calls may move between threads between two calls (Go: a goroutine may run on
/// another OS thread for its next cgo call) must not use it: they call the `_err` variants and
/// read the `psync_error` they hand over.
#[no_mangle]
pub extern "C" fn psync_last_error_message() -> *const c_char {
    catch_unwind(|| {
        LAST_ERROR.with(|slot| {
            slot.borrow()
                .as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr())
        })
    })
    .unwrap_or(std::ptr::null())
}
