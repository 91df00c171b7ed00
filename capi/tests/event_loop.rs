//! The C ABI for event loops and for hosts whose calls move between threads: per-call error
//! objects (`_err` functions), the readiness descriptor (`psync_engine_ready_fd`) waited on
//! with `poll(2)`, and JSON `null` read as an absent field. Clone URLs point at a loopback port
//! where nothing listens, so every event expires on its own.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use purgatory_sync_capi::*;
use purgatory_sync_testkit::init_bare;
use serde_json::json;

use PsyncStatus::*;

fn cs(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// Takes an error object's status and message, and frees it.
fn take_error(error: *mut PsyncError) -> (PsyncStatus, String) {
    assert!(!error.is_null());
    // SAFETY: a live error from an `_err` function, freed right after.
    unsafe {
        let message = CStr::from_ptr(psync_error_message(error))
            .to_string_lossy()
            .into_owned();
        let status = psync_error_status(error);
        psync_error_free(error);
        (status, message)
    }
}

fn new_engine(config: serde_json::Value) -> *mut PsyncEngine {
    let c = cs(&config.to_string());
    let (mut e, mut error) = (null_mut(), null_mut());
    // SAFETY: valid string and out-pointers.
    let st = unsafe { psync_engine_new_err(c.as_ptr(), &mut e, &mut error) };
    assert_eq!(
        st,
        PSYNC_OK,
        "{:?}",
        (!error.is_null()).then(|| take_error(error))
    );
    assert!(error.is_null(), "success leaves no error object");
    e
}

fn submit(e: *mut PsyncEngine, event: &serde_json::Value) -> Result<(), (PsyncStatus, String)> {
    let c = cs(&event.to_string());
    let mut error = null_mut();
    let mut admission = PsyncAdmission::PSYNC_ADMISSION_ALREADY_SATISFIED;
    // SAFETY: live engine, valid string and out-pointers.
    let st =
        unsafe { psync_engine_submit_err(e, c.as_ptr(), &mut admission, null_mut(), &mut error) };
    if st == PSYNC_OK {
        assert!(error.is_null());
        assert_eq!(admission, PsyncAdmission::PSYNC_ADMISSION_PENDING);
        Ok(())
    } else {
        let (status, message) = take_error(error);
        assert_eq!(status, st);
        Err((status, message))
    }
}

/// Whether `fd` is readable now (`poll(2)` with `timeout_ms`).
fn readable(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    n == 1 && p.revents & libc::POLLIN != 0
}

/// Each call's error object carries that call's status and message, whatever other threads
/// do meanwhile; the per-thread message is set too, and success leaves `*error` NULL.
#[test]
fn every_call_gets_its_own_error_object() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("r.git"));
    let e = new_engine(json!({"allow_private_addresses": true, "sync_delay_ms": 3_600_000}));
    let handle = e as usize;
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let repo = repo.clone();
            std::thread::spawn(move || {
                let e = handle as *mut PsyncEngine;
                for i in 0..200 {
                    // A bad object id naming this call: the message must be this call's.
                    let bad = format!("not-an-oid-{t}-{i}");
                    let ev = json!({"id": format!("e{t}-{i}"), "identifier": "x", "repo": repo,
                                    "oids": [bad], "clone_urls": []});
                    let (status, message) = submit(e, &ev).expect_err("a bad oid is refused");
                    assert_eq!(status, PSYNC_INVALID_OBJECT_ID);
                    assert!(message.contains(&bad), "{message} is not about {bad}");
                    // A NULL argument, with its own status.
                    let mut error = null_mut();
                    // SAFETY: NULL identifier on purpose; valid error pointer.
                    let st = unsafe {
                        psync_engine_git_data_arrived_err(e, std::ptr::null(), &mut error)
                    };
                    assert_eq!(st, PSYNC_NULL_ARGUMENT);
                    let (status, message) = take_error(error);
                    assert_eq!(status, PSYNC_NULL_ARGUMENT);
                    assert_eq!(message, "identifier must not be NULL");
                    // Success: no error object.
                    let id = cs("x");
                    // SAFETY: live engine, valid string.
                    let st =
                        unsafe { psync_engine_git_data_arrived_err(e, id.as_ptr(), &mut error) };
                    assert_eq!(st, PSYNC_OK);
                    assert!(error.is_null());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // The per-thread message is still set for C callers.
    let ev = json!({"id": "", "identifier": "x", "repo": repo, "oids": []});
    assert_eq!(submit(e, &ev).unwrap_err().0, PSYNC_INVALID_EVENT_ID);
    // SAFETY: the string is valid until the next call on this thread.
    let last = unsafe { CStr::from_ptr(psync_last_error_message()) }.to_string_lossy();
    assert!(last.contains("event id"), "{last}");
    let mut error = null_mut();
    // SAFETY: a live engine, shut down once.
    assert_eq!(
        unsafe { psync_engine_shutdown_err(e, &mut error) },
        PSYNC_OK
    );
    assert!(error.is_null());
    // SAFETY: as above; the second shutdown fails with its own status.
    assert_eq!(
        unsafe { psync_engine_shutdown_err(e, &mut error) },
        PSYNC_ENGINE_SHUT_DOWN
    );
    assert_eq!(take_error(error).0, PSYNC_ENGINE_SHUT_DOWN);
    // SAFETY: a live engine, freed once.
    unsafe { psync_engine_free(e) };
}

/// A host waits on the readiness descriptor with `poll(2)` and takes outcomes without
/// blocking: it gets every outcome exactly once, the descriptor is not readable while nothing
/// waits, and once the engine is shut down it is readable again for `PSYNC_DISCONNECTED`.
#[test]
fn the_ready_fd_wakes_a_poll_loop_for_every_outcome_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("r.git"));
    let e = new_engine(json!({"allow_private_addresses": true, "sync_delay_ms": 0,
                              "event_lifetime_ms": 300, "tick_ms": 20}));
    let (mut fd, mut error) = (-1, null_mut());
    // SAFETY: live engine and out-pointers.
    assert_eq!(
        unsafe { psync_engine_ready_fd(e, &mut fd, &mut error) },
        PSYNC_OK
    );
    assert!(fd >= 0 && error.is_null());
    assert!(!readable(fd, 0), "nothing waits yet");

    const N: usize = 40;
    for i in 0..N {
        // Each event in its own identifier; nothing listens on port 1, so each expires.
        let ev = json!({"id": format!("ev-{i}"), "identifier": format!("id-{i}"), "repo": repo,
                        "oids": [format!("{:040x}", 0xbeef_0000_u64 + i as u64)],
                        "clone_urls": ["git://127.0.0.1:1/none.git"]});
        submit(e, &ev).unwrap();
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut wakeups = 0;
    while seen.values().sum::<usize>() < N && Instant::now() < deadline {
        if !readable(fd, 1000) {
            continue;
        }
        wakeups += 1;
        loop {
            let mut o = null_mut();
            // SAFETY: live engine and out-pointer; 0 ms never blocks.
            let st = unsafe { psync_engine_poll(e, 0, &mut o) };
            if st == PSYNC_TIMEOUT {
                break;
            }
            assert_eq!(st, PSYNC_OK);
            // SAFETY: a live outcome, freed right after.
            let id = unsafe { CStr::from_ptr(psync_outcome_event_id(o)) }
                .to_string_lossy()
                .into_owned();
            unsafe { psync_outcome_free(o) };
            *seen.entry(id).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), N, "{seen:?}");
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    assert!(wakeups >= 1);
    assert!(
        !readable(fd, 200),
        "no outcome waits: the descriptor is not readable"
    );

    // SAFETY: a live engine.
    assert_eq!(unsafe { psync_engine_shutdown(e) }, PSYNC_OK);
    assert!(
        readable(fd, 5000),
        "a shut-down, drained engine wakes the loop"
    );
    let mut o = null_mut();
    // SAFETY: as above.
    assert_eq!(
        unsafe { psync_engine_poll(e, 0, &mut o) },
        PSYNC_DISCONNECTED
    );
    assert!(readable(fd, 0), "it stays readable");
    // SAFETY: a live engine, freed once.
    unsafe { psync_engine_free(e) };
}

/// Go's encoder writes a nil slice or map as `null`: every list, map and flag of the event
/// and configuration JSON reads `null` as absent.
#[test]
fn null_reads_as_an_absent_field() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("r.git"));
    let e = new_engine(
        json!({"allow_private_addresses": true, "sync_delay_ms": 3_600_000,
                              "domain_overrides": null, "allowed_schemes": null}),
    );
    let ev = json!({"id": "n1", "identifier": "x", "repo": repo,
                    "oids": [format!("{:040x}", 7)], "clone_urls": null, "ref_updates": null,
                    "replace_refs": null, "origin": null, "created_at": null});
    submit(e, &ev).unwrap();
    let ev = json!({"id": "n2", "identifier": "x", "repo": repo, "oids": [format!("{:040x}", 8)],
                    "ref_updates": [{"name": "refs/heads/a", "oid": format!("{:040x}", 8),
                                     "delete": null, "symbolic": null}]});
    submit(e, &ev).unwrap();
    // `null` object ids are no object ids.
    let ev = json!({"id": "n3", "identifier": "x", "repo": repo, "oids": null});
    assert_eq!(submit(e, &ev).unwrap_err().0, PSYNC_NO_OBJECT_IDS);
    // SAFETY: a live engine, freed once.
    unsafe { psync_engine_free(e) };
}
