//! `purgatory_sync._native`: the C ABI of purgatory-sync (crate `purgatory-sync-capi`, linked
//! in) behind a safe PyO3 layer. It speaks the ABI's JSON; the typed API (classes, exceptions
//! per status, the outcome iterator) is `python/purgatory_sync/__init__.py`.
//!
//! Every call that can wait (building, submitting, polling, shutting down) releases the GIL,
//! so other Python threads run meanwhile and the engine's threads can log into Python's
//! `logging` without waiting for a thread that waits for them.

// pyo3 0.22's #[pymethods] expansion converts each method's PyResult into itself.
#![allow(clippy::useless_conversion)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::null_mut;
use std::sync::Arc;

use parking_lot::RwLock;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use purgatory_sync_capi::*;

create_exception!(
    _native,
    NativeError,
    PyException,
    "A failed call: args are (status, message), the C ABI's psync_status and message."
);

/// The status and message of a failed `_err` call, as a `NativeError`; frees the error.
fn error(status: PsyncStatus, err: *mut PsyncError) -> PyErr {
    let message = if err.is_null() {
        String::new()
    } else {
        // SAFETY: a live error from an `_err` call, freed right after.
        let m = unsafe { CStr::from_ptr(psync_error_message(err)) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above, freed once.
        unsafe { psync_error_free(err) };
        m
    };
    NativeError::new_err((status as i32, message))
}

fn check(status: PsyncStatus, err: *mut PsyncError) -> PyResult<()> {
    if status == PsyncStatus::PSYNC_OK {
        Ok(())
    } else {
        Err(error(status, err))
    }
}

fn c_string(s: &str) -> PyResult<CString> {
    CString::new(s).map_err(|_| {
        NativeError::new_err((
            PsyncStatus::PSYNC_INVALID_JSON as i32,
            "a string contains a NUL byte".to_owned(),
        ))
    })
}

/// An owned string from the library, copied and freed.
fn take_string(s: *mut c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    // SAFETY: a string the library handed over, freed right after.
    let copy = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
    // SAFETY: as above, freed once.
    unsafe { psync_string_free(s) };
    copy
}

/// The engine pointer. The C ABI's functions are thread-safe on one engine but for
/// `psync_engine_free`, which runs under the write lock, when no other call is in progress.
struct Handle(*mut PsyncEngine);

// SAFETY: the C ABI allows every call but `psync_engine_free` from any thread at once; `free`
// is only called under the write lock of `Engine::handle`.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

/// An engine, built from the C ABI's configuration JSON.
#[pyclass(module = "purgatory_sync._native")]
struct Engine {
    handle: RwLock<Handle>,
}

impl Engine {
    /// Runs `f` with the live engine, the GIL released.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(*mut PsyncEngine) -> T + Send,
    ) -> PyResult<T> {
        py.allow_threads(|| {
            let handle = self.handle.read();
            if handle.0.is_null() {
                return Err(NativeError::new_err((
                    PsyncStatus::PSYNC_ENGINE_SHUT_DOWN as i32,
                    "the engine is closed".to_owned(),
                )));
            }
            Ok(f(handle.0))
        })
    }
}

/// A raw pointer that may cross `allow_threads` (the C ABI's functions are thread-safe).
#[derive(Clone, Copy)]
struct Ptr<T>(*mut T);
// SAFETY: only passed to thread-safe C ABI functions.
unsafe impl<T> Send for Ptr<T> {}

#[pymethods]
impl Engine {
    #[new]
    fn new(py: Python<'_>, config_json: &str) -> PyResult<Engine> {
        let config = c_string(config_json)?;
        let (status, engine, err) = py.allow_threads(|| {
            let (mut engine, mut err) = (null_mut(), null_mut());
            // SAFETY: a valid string and out-pointers.
            let st = unsafe { psync_engine_new_err(config.as_ptr(), &mut engine, &mut err) };
            (st, Ptr(engine), Ptr(err))
        });
        check(status, err.0)?;
        Ok(Engine {
            handle: RwLock::new(Handle(engine.0)),
        })
    }

    /// Submits an event (JSON); returns (already_satisfied, refused URLs as JSON).
    fn submit(&self, py: Python<'_>, event_json: &str) -> PyResult<(bool, String)> {
        let event = c_string(event_json)?;
        let (status, admission, refused, err) = self.with(py, |e| {
            let mut admission = PsyncAdmission::PSYNC_ADMISSION_PENDING;
            let (mut refused, mut err) = (null_mut(), null_mut());
            // SAFETY: a live engine, a valid string and out-pointers.
            let st = unsafe {
                psync_engine_submit_err(e, event.as_ptr(), &mut admission, &mut refused, &mut err)
            };
            (st, admission, Ptr(refused), Ptr(err))
        })?;
        check(status, err.0)?;
        Ok((
            admission == PsyncAdmission::PSYNC_ADMISSION_ALREADY_SATISFIED,
            take_string(refused.0),
        ))
    }

    /// Forgets a waiting event.
    fn cancel(&self, py: Python<'_>, event_id: &str) -> PyResult<()> {
        let id = c_string(event_id)?;
        let (status, err) = self.with(py, |e| {
            let mut err = null_mut();
            // SAFETY: a live engine, a valid string and out-pointer.
            let st = unsafe { psync_engine_cancel_err(e, id.as_ptr(), &mut err) };
            (st, Ptr(err))
        })?;
        check(status, err.0)
    }

    /// Re-checks an identifier's repositories at once (a push arrived).
    fn git_data_arrived(&self, py: Python<'_>, identifier: &str) -> PyResult<()> {
        let identifier = c_string(identifier)?;
        let (status, err) = self.with(py, |e| {
            let mut err = null_mut();
            // SAFETY: a live engine, a valid string and out-pointer.
            let st = unsafe { psync_engine_git_data_arrived_err(e, identifier.as_ptr(), &mut err) };
            (st, Ptr(err))
        })?;
        check(status, err.0)
    }

    /// The next outcome as JSON, waiting up to `timeout_ms` with the GIL released; None when
    /// nothing came. Raises NativeError with PSYNC_DISCONNECTED once the engine is shut down
    /// and drained.
    fn poll(&self, py: Python<'_>, timeout_ms: u32) -> PyResult<Option<String>> {
        let (status, outcome, err) = self.with(py, |e| {
            let (mut outcome, mut err) = (null_mut(), null_mut());
            // SAFETY: a live engine and out-pointers.
            let st = unsafe { psync_engine_poll_err(e, timeout_ms, &mut outcome, &mut err) };
            (st, Ptr(outcome), Ptr(err))
        })?;
        if status == PsyncStatus::PSYNC_TIMEOUT {
            // SAFETY: the call's error object, freed once.
            unsafe { psync_error_free(err.0) };
            return Ok(None);
        }
        check(status, err.0)?;
        // SAFETY: a live outcome, freed right after.
        let json = unsafe { CStr::from_ptr(psync_outcome_json(outcome.0)) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above, freed once.
        unsafe { psync_outcome_free(outcome.0) };
        Ok(Some(json))
    }

    /// The statistics JSON.
    fn stats_json(&self, py: Python<'_>) -> PyResult<String> {
        let (status, text, err) = self.with(py, |e| {
            let (mut text, mut err) = (null_mut(), null_mut());
            // SAFETY: a live engine and out-pointers.
            let st = unsafe { psync_engine_stats_json_err(e, &mut text, &mut err) };
            (st, Ptr(text), Ptr(err))
        })?;
        check(status, err.0)?;
        Ok(take_string(text.0))
    }

    /// The Prometheus text.
    fn metrics(&self, py: Python<'_>) -> PyResult<String> {
        let (status, text, err) = self.with(py, |e| {
            let (mut text, mut err) = (null_mut(), null_mut());
            // SAFETY: a live engine and out-pointers.
            let st = unsafe { psync_engine_metrics_err(e, &mut text, &mut err) };
            (st, Ptr(text), Ptr(err))
        })?;
        check(status, err.0)?;
        Ok(take_string(text.0))
    }

    /// Stops the engine and joins its threads; outcomes not taken can still be polled.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let (status, err) = self.with(py, |e| {
            let mut err = null_mut();
            // SAFETY: a live engine and out-pointer.
            let st = unsafe { psync_engine_shutdown_err(e, &mut err) };
            (st, Ptr(err))
        })?;
        check(status, err.0)
    }

    /// Shuts down if needed and frees the engine; later calls raise. Idempotent.
    fn close(&self, py: Python<'_>) {
        py.allow_threads(|| {
            let mut handle = self.handle.write();
            if !handle.0.is_null() {
                // SAFETY: a live engine; the write lock excludes every other call.
                unsafe { psync_engine_free(handle.0) };
                handle.0 = null_mut();
            }
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let handle = self.handle.get_mut();
        if !handle.0.is_null() {
            // SAFETY: a live engine, and `&mut self`: no call is in progress.
            unsafe { psync_engine_free(handle.0) };
            handle.0 = null_mut();
        }
    }
}

/// The Python callable that receives log records: `handler(level, target, message)`.
static HANDLER: RwLock<Option<Arc<Py<PyAny>>>> = RwLock::new(None);

unsafe extern "C" fn python_log(
    _user_data: *mut c_void,
    level: PsyncLogLevel,
    target: *const c_char,
    message: *const c_char,
) {
    // SAFETY: NUL-terminated strings valid for the call, by the C ABI's contract.
    let (target, message) = unsafe {
        (
            CStr::from_ptr(target).to_string_lossy().into_owned(),
            CStr::from_ptr(message).to_string_lossy().into_owned(),
        )
    };
    // Not holding the lock while waiting for the GIL: `set_log_handler` takes it without.
    let handler = HANDLER.read().clone();
    if let Some(handler) = handler {
        Python::with_gil(|py| {
            if let Err(e) = handler.call1(py, (level as i32, target, message)) {
                e.print(py);
            }
        });
    }
}

/// Sends the engine's log at `level` (0 off .. 5 trace) to `handler(level, target, message)`,
/// called on the engine's threads with the GIL taken; None stops it.
#[pyfunction]
#[pyo3(signature = (level, handler))]
fn set_log_handler(py: Python<'_>, level: i32, handler: Option<PyObject>) -> PyResult<()> {
    let level = log_level(if handler.is_some() { level } else { 0 })?;
    let handler = handler.map(Arc::new);
    // Without the GIL: a record being logged holds the GIL and may wait for nothing else.
    let (status, err) = py.allow_threads(move || {
        *HANDLER.write() = handler;
        let mut err = null_mut();
        // SAFETY: a callback for any thread; no user data.
        let st = unsafe { psync_log_to_callback(level, Some(python_log), null_mut(), &mut err) };
        (st, Ptr(err))
    });
    check(status, err.0)
}

/// Sends the engine's log at `level` (0 off .. 5 trace) to stderr.
#[pyfunction]
fn log_to_stderr(py: Python<'_>, level: i32) -> PyResult<()> {
    let level = log_level(level)?;
    let (status, err) = py.allow_threads(|| {
        let mut err = null_mut();
        // SAFETY: a valid out-pointer.
        let st = unsafe { psync_log_to_stderr(level, &mut err) };
        (st, Ptr(err))
    });
    check(status, err.0)
}

fn log_level(level: i32) -> PyResult<PsyncLogLevel> {
    use PsyncLogLevel::*;
    Ok(match level {
        0 => PSYNC_LOG_OFF,
        1 => PSYNC_LOG_ERROR,
        2 => PSYNC_LOG_WARN,
        3 => PSYNC_LOG_INFO,
        4 => PSYNC_LOG_DEBUG,
        5 => PSYNC_LOG_TRACE,
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "log level {other} is outside 0 ..= 5"
            )))
        }
    })
}

/// The library's version.
#[pyfunction]
fn version() -> String {
    // SAFETY: a static NUL-terminated string.
    unsafe { CStr::from_ptr(psync_version()) }
        .to_string_lossy()
        .into_owned()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add("NativeError", m.py().get_type_bound::<NativeError>())?;
    m.add_function(wrap_pyfunction!(set_log_handler, m)?)?;
    m.add_function(wrap_pyfunction!(log_to_stderr, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
