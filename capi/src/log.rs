//! The engine's log for C hosts: to a callback of the host's, or to stderr.
//!
//! The engine logs through the `log` crate. The first `psync_log_to_*` call installs this
//! library's logger for the process (the `log` crate allows one per process); later calls
//! change where it writes and at which level. A host that also links Rust code with a logger
//! of its own gets `PSYNC_LOGGER_UNAVAILABLE`.

use std::ffi::{c_char, c_void, CString};
use std::io::Write;
use std::sync::OnceLock;

use parking_lot::RwLock;

use crate::error::{guard, ErrorOut, Failure, PsyncError};
use crate::PsyncStatus;

/// A log level. `PSYNC_LOG_OFF` turns the log off; each other level lets through itself and
/// the more severe ones.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum PsyncLogLevel {
    /// Nothing is logged.
    PSYNC_LOG_OFF = 0,
    /// Failures the engine cannot work around (a state file it cannot write, say).
    PSYNC_LOG_ERROR = 1,
    /// Failures it works around (a failed fetch, an expired event, a naughty host).
    PSYNC_LOG_WARN = 2,
    /// Engine start and stop, releases.
    PSYNC_LOG_INFO = 3,
    /// Every decision: dispatches, backoffs, visits.
    PSYNC_LOG_DEBUG = 4,
    /// Everything.
    PSYNC_LOG_TRACE = 5,
}

impl PsyncLogLevel {
    fn filter(self) -> log::LevelFilter {
        match self {
            PsyncLogLevel::PSYNC_LOG_OFF => log::LevelFilter::Off,
            PsyncLogLevel::PSYNC_LOG_ERROR => log::LevelFilter::Error,
            PsyncLogLevel::PSYNC_LOG_WARN => log::LevelFilter::Warn,
            PsyncLogLevel::PSYNC_LOG_INFO => log::LevelFilter::Info,
            PsyncLogLevel::PSYNC_LOG_DEBUG => log::LevelFilter::Debug,
            PsyncLogLevel::PSYNC_LOG_TRACE => log::LevelFilter::Trace,
        }
    }

    fn of(level: log::Level) -> PsyncLogLevel {
        match level {
            log::Level::Error => PsyncLogLevel::PSYNC_LOG_ERROR,
            log::Level::Warn => PsyncLogLevel::PSYNC_LOG_WARN,
            log::Level::Info => PsyncLogLevel::PSYNC_LOG_INFO,
            log::Level::Debug => PsyncLogLevel::PSYNC_LOG_DEBUG,
            log::Level::Trace => PsyncLogLevel::PSYNC_LOG_TRACE,
        }
    }
}

/// A host's log function: `level`, the module the record comes from (`target`, such as
/// `purgatory_sync::scheduler`) and the message, both NUL-terminated and valid only for the
/// call; `user_data` as given to `psync_log_to_callback`.
pub type PsyncLogCallback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        level: PsyncLogLevel,
        target: *const c_char,
        message: *const c_char,
    ),
>;

enum Sink {
    Off,
    Stderr,
    Callback {
        callback: unsafe extern "C" fn(*mut c_void, PsyncLogLevel, *const c_char, *const c_char),
        /// The host's pointer, passed back as it was given.
        user_data: usize,
    },
}

static SINK: RwLock<Sink> = RwLock::new(Sink::Off);

struct CLogger;

static LOGGER: CLogger = CLogger;

impl log::Log for CLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        match &*SINK.read() {
            Sink::Off => {}
            Sink::Stderr => {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "[purgatory-sync {} {}] {message}",
                    record.level(),
                    record.target()
                );
            }
            Sink::Callback {
                callback,
                user_data,
            } => {
                let c = |s: &str| CString::new(s.replace('\0', "\\0")).unwrap_or_default();
                let (target, message) = (c(record.target()), c(&message));
                // SAFETY: the host's function, given with this contract: it takes these
                // arguments from any thread; the strings live for the call.
                unsafe {
                    callback(
                        *user_data as *mut c_void,
                        PsyncLogLevel::of(record.level()),
                        target.as_ptr(),
                        message.as_ptr(),
                    )
                }
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once per process; `Err` when another one is installed.
fn install(level: PsyncLogLevel, sink: Sink) -> Result<(), Failure> {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    if !*INSTALLED.get_or_init(|| log::set_logger(&LOGGER).is_ok()) {
        return Err((
            PsyncStatus::PSYNC_LOGGER_UNAVAILABLE,
            "another logger of Rust's `log` crate is installed in this process".to_owned(),
        ));
    }
    *SINK.write() = sink;
    log::set_max_level(level.filter());
    Ok(())
}

/// Sends the engine's log to standard error, one line a record (`[purgatory-sync LEVEL
/// target] message`), at `level` and more severe; `PSYNC_LOG_OFF` stops it. Process-wide: it
/// applies to every engine, and replaces an earlier `psync_log_to_*` choice. Nothing is logged
/// until a host calls one of them.
///
/// Errors: `PSYNC_LOGGER_UNAVAILABLE` (Rust code in the process installed a logger of its own).
/// `error`: NULL, or where an owned `psync_error` goes on failure (NULL on success).
///
/// # Safety
/// `error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_log_to_stderr(
    level: PsyncLogLevel,
    error: *mut *mut PsyncError,
) -> PsyncStatus {
    // SAFETY: `error` is NULL or valid for a write, by the contract.
    let error = unsafe { ErrorOut::new(error) };
    guard(error, || install(level, Sink::Stderr))
}

/// Sends the engine's log to `callback`, at `level` and more severe; `PSYNC_LOG_OFF` stops it.
/// Process-wide, like `psync_log_to_stderr`, which it replaces.
///
/// The callback is called on the engine's threads (the scheduler, the workers), several at
/// once: it must be thread-safe, return quickly (a fetch waits for it) and not call
/// `psync_log_to_*`. `user_data` is passed back untouched; it must stay valid until another
/// `psync_log_to_*` call has returned.
///
/// Errors: `PSYNC_NULL_ARGUMENT` (`callback`), `PSYNC_LOGGER_UNAVAILABLE`.
///
/// # Safety
/// `callback` is NULL or a function with this signature that may be called from any thread;
/// `error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_log_to_callback(
    level: PsyncLogLevel,
    callback: PsyncLogCallback,
    user_data: *mut c_void,
    error: *mut *mut PsyncError,
) -> PsyncStatus {
    // SAFETY: `error` is NULL or valid for a write, by the contract.
    let error = unsafe { ErrorOut::new(error) };
    guard(error, || {
        let callback = callback.ok_or_else(|| crate::null("callback"))?;
        install(
            level,
            Sink::Callback {
                callback,
                user_data: user_data as usize,
            },
        )
    })
}
