//! The engine's log reaches a C host's sink (`psync_log_to_callback`), from the engine's
//! threads, at the level the host chose. Its own test binary: the logger is process-wide.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::null_mut;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use purgatory_sync_capi::*;
use purgatory_sync_testkit::init_bare;
use serde_json::json;

use PsyncStatus::*;

/// What the sink received: level, target, message, and the user data it came with.
static RECORDS: Mutex<Vec<(PsyncLogLevel, String, String, usize)>> = Mutex::new(Vec::new());

unsafe extern "C" fn sink(
    user_data: *mut c_void,
    level: PsyncLogLevel,
    target: *const c_char,
    message: *const c_char,
) {
    // SAFETY: NUL-terminated strings valid for the call, by the contract.
    let (target, message) = unsafe {
        (
            CStr::from_ptr(target).to_string_lossy().into_owned(),
            CStr::from_ptr(message).to_string_lossy().into_owned(),
        )
    };
    RECORDS
        .lock()
        .unwrap()
        .push((level, target, message, user_data as usize));
}

#[test]
fn the_logs_of_a_failed_fetch_reach_the_hosts_sink() {
    let mut error = null_mut();
    // SAFETY: a valid callback for any thread; the user data is a plain number.
    let st = unsafe {
        psync_log_to_callback(
            PsyncLogLevel::PSYNC_LOG_INFO,
            Some(sink),
            0x5eed as *mut c_void,
            &mut error,
        )
    };
    assert_eq!(st, PSYNC_OK);
    // SAFETY: NULL callback on purpose.
    let st = unsafe {
        psync_log_to_callback(PsyncLogLevel::PSYNC_LOG_INFO, None, null_mut(), &mut error)
    };
    assert_eq!(st, PSYNC_NULL_ARGUMENT);
    // SAFETY: a live error, freed once.
    unsafe { psync_error_free(error) };

    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("r.git"));
    let config = CString::new(
        json!({"allow_private_addresses": true, "sync_delay_ms": 0, "event_lifetime_ms": 2000,
               "tick_ms": 20})
        .to_string(),
    )
    .unwrap();
    let mut e = null_mut();
    // SAFETY: valid string and out-pointer.
    assert_eq!(
        unsafe { psync_engine_new(config.as_ptr(), &mut e) },
        PSYNC_OK
    );
    let url = "git://127.0.0.1:1/nowhere.git";
    let event = CString::new(
        json!({"id": "e1", "identifier": "alice/x", "repo": repo,
               "oids": [format!("{:040x}", 1)], "clone_urls": [url]})
        .to_string(),
    )
    .unwrap();
    // SAFETY: live engine, valid string, no out-pointers.
    let st = unsafe { psync_engine_submit(e, event.as_ptr(), null_mut(), null_mut()) };
    assert_eq!(st, PSYNC_OK);
    let failed = |records: &[(PsyncLogLevel, String, String, usize)]| {
        records
            .iter()
            .any(|(_, _, message, _)| message.contains(url) && message.contains("failed"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !failed(&RECORDS.lock().unwrap()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a live engine, freed once.
    unsafe { psync_engine_free(e) };
    let records = RECORDS.lock().unwrap().clone();
    assert!(
        failed(&records),
        "no record of the failed fetch: {records:#?}"
    );
    for (level, target, _, user_data) in &records {
        assert!(
            *level <= PsyncLogLevel::PSYNC_LOG_INFO,
            "{level:?} is above the level set"
        );
        assert!(target.starts_with("purgatory_sync"), "{target}");
        assert_eq!(*user_data, 0x5eed);
    }

    // Off: nothing more arrives.
    let before = records.len();
    // SAFETY: as above.
    let st = unsafe {
        psync_log_to_callback(
            PsyncLogLevel::PSYNC_LOG_OFF,
            Some(sink),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(st, PSYNC_OK);
    // SAFETY: valid string and out-pointer.
    assert_eq!(
        unsafe { psync_engine_new(config.as_ptr(), &mut e) },
        PSYNC_OK
    );
    // SAFETY: a live engine, freed once.
    unsafe { psync_engine_free(e) };
    assert_eq!(RECORDS.lock().unwrap().len(), before);
}
