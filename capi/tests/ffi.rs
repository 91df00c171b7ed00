//! The C ABI (`purgatory_sync_capi`), called from Rust exactly as a C host would: NULLs,
//! bad strings, bad JSON, every submit refusal, polling, shutdown, per-thread error messages
//! and concurrent calls. Clone URLs point at loopback ports where nothing listens.

use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant};

use purgatory_sync_capi::*;
use purgatory_sync_testkit::init_bare;
use serde_json::{json, Value};

use PsyncStatus::*;

fn cs(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn last_error() -> Option<String> {
    let p = psync_last_error_message();
    // SAFETY: NULL or a NUL-terminated string valid until the next call on this thread.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn new_engine(config: Value) -> *mut PsyncEngine {
    let c = cs(&config.to_string());
    let mut e = null_mut();
    // SAFETY: valid string and out-pointer.
    let st = unsafe { psync_engine_new(c.as_ptr(), &mut e) };
    assert_eq!(st, PSYNC_OK, "{:?}", last_error());
    assert!(!e.is_null());
    e
}

/// A config that never fetches on its own (long first delays) unless the test asks.
fn quiet() -> Value {
    json!({"allow_private_addresses": true, "sync_delay_ms": 3_600_000, "user_delay_ms": 3_600_000,
           "workers": 2, "tick_ms": 20})
}

fn event(id: &str, repo: &Path, oid: &str) -> Value {
    json!({"id": id, "identifier": format!("ident-{id}"), "repo": repo, "oids": [oid],
           "clone_urls": ["http://127.0.0.1:1/nothing.git"]})
}

fn missing_oid(n: u32) -> String {
    format!("{:040x}", 0xdead_0000_u64 + u64::from(n))
}

fn submit(
    e: *mut PsyncEngine,
    ev: &Value,
) -> (PsyncStatus, Option<PsyncAdmission>, Option<String>) {
    let c = cs(&ev.to_string());
    let mut adm = PsyncAdmission::PSYNC_ADMISSION_ALREADY_SATISFIED;
    let mut refused: *mut c_char = null_mut();
    // SAFETY: live engine, valid string and out-pointers.
    let st = unsafe { psync_engine_submit(e, c.as_ptr(), &mut adm, &mut refused) };
    let refused_json = (!refused.is_null()).then(|| {
        // SAFETY: an owned string from the library, freed right after.
        let s = unsafe { CStr::from_ptr(refused) }
            .to_str()
            .unwrap()
            .to_owned();
        unsafe { psync_string_free(refused) };
        s
    });
    (st, (st == PSYNC_OK).then_some(adm), refused_json)
}

struct Taken {
    kind: PsyncOutcomeKind,
    event_id: String,
    identifier: String,
    json: Value,
}

fn poll(e: *mut PsyncEngine, timeout_ms: u32) -> Result<Taken, PsyncStatus> {
    let mut o = null_mut();
    // SAFETY: live engine and out-pointer.
    let st = unsafe { psync_engine_poll(e, timeout_ms, &mut o) };
    if st != PSYNC_OK {
        assert!(o.is_null());
        return Err(st);
    }
    let s = |p: *const c_char| unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned();
    // SAFETY: a live outcome, freed at the end.
    let taken = unsafe {
        Taken {
            kind: psync_outcome_kind(o),
            event_id: s(psync_outcome_event_id(o)),
            identifier: s(psync_outcome_identifier(o)),
            json: serde_json::from_str(&s(psync_outcome_json(o))).unwrap(),
        }
    };
    unsafe { psync_outcome_free(o) };
    Ok(taken)
}

fn stats(e: *mut PsyncEngine) -> Value {
    serde_json::from_str(&owned_text(e, psync_engine_stats_json)).unwrap()
}

/// The Prometheus text of `psync_engine_metrics`, parsed.
fn metrics(e: *mut PsyncEngine) -> prometheus_parse::Scrape {
    let text = owned_text(e, psync_engine_metrics);
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The string a `psync_engine_stats_json`-like call hands over, copied and freed.
fn owned_text(
    e: *mut PsyncEngine,
    call: unsafe extern "C" fn(*mut PsyncEngine, *mut *mut c_char) -> PsyncStatus,
) -> String {
    let mut p = null_mut();
    // SAFETY: live engine and out-pointer.
    assert_eq!(unsafe { call(e, &mut p) }, PSYNC_OK, "{:?}", last_error());
    // SAFETY: an owned string from the library, freed right after.
    let text = unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned();
    unsafe { psync_string_free(p) };
    text
}

/// The value of the unlabelled sample `name` in a scrape.
fn scalar(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    use prometheus_parse::Value::*;
    let sample = scrape.samples.iter().find(|s| s.metric == name);
    match sample.map(|s| &s.value) {
        Some(Counter(v) | Gauge(v) | Untyped(v)) => *v,
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn null_arguments_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("r.git"));
    let e = new_engine(quiet());
    let ev = cs(&event("a", &repo, &missing_oid(1)).to_string());
    let id = cs("x");
    let mut out_e = null_mut();
    let mut out_o = null_mut();
    let mut out_s = null_mut();
    // SAFETY: NULLs are part of the contract; other pointers are valid.
    unsafe {
        assert_eq!(psync_engine_new(null(), null_mut()), PSYNC_NULL_ARGUMENT);
        assert!(last_error().unwrap().contains("out_engine"));
        assert_eq!(
            psync_engine_submit(null_mut(), ev.as_ptr(), null_mut(), null_mut()),
            PSYNC_NULL_ARGUMENT
        );
        assert_eq!(
            psync_engine_submit(e, null(), null_mut(), &mut out_s),
            PSYNC_NULL_ARGUMENT
        );
        assert!(out_s.is_null());
        assert!(last_error().unwrap().contains("event_json"));
        assert_eq!(
            psync_engine_git_data_arrived(null_mut(), id.as_ptr()),
            PSYNC_NULL_ARGUMENT
        );
        assert_eq!(
            psync_engine_git_data_arrived(e, null()),
            PSYNC_NULL_ARGUMENT
        );
        assert_eq!(
            psync_engine_cancel(null_mut(), id.as_ptr()),
            PSYNC_NULL_ARGUMENT
        );
        assert_eq!(psync_engine_cancel(e, null()), PSYNC_NULL_ARGUMENT);
        assert_eq!(
            psync_engine_poll(null_mut(), 0, &mut out_o),
            PSYNC_NULL_ARGUMENT
        );
        assert_eq!(psync_engine_poll(e, 0, null_mut()), PSYNC_NULL_ARGUMENT);
        assert_eq!(
            psync_engine_stats_json(null_mut(), &mut out_s),
            PSYNC_NULL_ARGUMENT
        );
        assert_eq!(psync_engine_stats_json(e, null_mut()), PSYNC_NULL_ARGUMENT);
        out_s = std::ptr::dangling_mut();
        assert_eq!(
            psync_engine_metrics(null_mut(), &mut out_s),
            PSYNC_NULL_ARGUMENT
        );
        assert!(out_s.is_null(), "the out-pointer is set to NULL on failure");
        assert_eq!(psync_engine_metrics(e, null_mut()), PSYNC_NULL_ARGUMENT);
        assert!(last_error().unwrap().contains("out_text"));
        assert_eq!(psync_engine_shutdown(null_mut()), PSYNC_NULL_ARGUMENT);
        assert_eq!(
            psync_outcome_kind(null()),
            PsyncOutcomeKind::PSYNC_OUTCOME_EXPIRED
        );
        assert!(psync_outcome_event_id(null()).is_null());
        assert!(psync_outcome_identifier(null()).is_null());
        assert!(psync_outcome_json(null()).is_null());
        psync_outcome_free(null_mut());
        psync_string_free(null_mut());
        psync_engine_free(null_mut());
        // A NULL config is the defaults.
        assert_eq!(psync_engine_new(null(), &mut out_e), PSYNC_OK);
        psync_engine_free(out_e);
        // Optional out-parameters of submit may be NULL.
        assert_eq!(
            psync_engine_submit(e, ev.as_ptr(), null_mut(), null_mut()),
            PSYNC_OK
        );
        assert!(!psync_version().is_null());
        assert_eq!(
            CStr::from_ptr(psync_version()).to_str().unwrap(),
            env!("CARGO_PKG_VERSION")
        );
        psync_engine_free(e);
    }
}

#[test]
fn invalid_utf8_is_refused() {
    let bad = c"\xff\xfe{}".as_ptr();
    let e = new_engine(quiet());
    let mut out_e = null_mut();
    // SAFETY: NUL-terminated byte strings and valid out-pointers.
    unsafe {
        assert_eq!(psync_engine_new(bad, &mut out_e), PSYNC_INVALID_UTF8);
        assert!(out_e.is_null());
        assert!(last_error().unwrap().contains("UTF-8"));
        assert_eq!(
            psync_engine_submit(e, bad, null_mut(), null_mut()),
            PSYNC_INVALID_UTF8
        );
        assert_eq!(psync_engine_git_data_arrived(e, bad), PSYNC_INVALID_UTF8);
        assert_eq!(psync_engine_cancel(e, bad), PSYNC_INVALID_UTF8);
        psync_engine_free(e);
    }
}

#[test]
fn invalid_json_and_config_are_refused() {
    let try_new = |cfg: &str| {
        let c = cs(cfg);
        let mut e = null_mut();
        // SAFETY: valid string and out-pointer.
        let st = unsafe { psync_engine_new(c.as_ptr(), &mut e) };
        assert!(e.is_null() || st == PSYNC_OK);
        // SAFETY: NULL or a live engine.
        unsafe { psync_engine_free(e) };
        (st, last_error().unwrap_or_default())
    };
    assert_eq!(try_new("{not json").0, PSYNC_INVALID_JSON);
    let (st, msg) = try_new(r#"{"workerz": 3}"#);
    assert_eq!(st, PSYNC_INVALID_JSON);
    assert!(msg.contains("workerz"), "{msg}");
    let (st, msg) =
        try_new(r#"{"domain_limits": {"max_concurrent": 1, "per_minute": 6, "bursty": 1}}"#);
    assert_eq!(st, PSYNC_INVALID_JSON);
    assert!(msg.contains("bursty"), "{msg}");
    let (st, msg) = try_new(r#"{"tick_ms": "fast"}"#);
    assert_eq!(st, PSYNC_INVALID_JSON);
    assert!(msg.contains("config_json"), "{msg}");
    let (st, msg) = try_new(r#"{"workers": 0}"#);
    assert_eq!(st, PSYNC_INVALID_CONFIG);
    assert!(msg.contains("workers"), "{msg}");
    let (st, msg) = try_new(r#"{"thread_name": "far-too-long-a-name"}"#);
    assert_eq!(st, PSYNC_INVALID_CONFIG, "{msg}");
    let (st, msg) = try_new(r#"{"our_domain": "relay.example.com:0"}"#);
    assert_eq!(st, PSYNC_INVALID_CONFIG, "{msg}");
    assert!(msg.contains("our_domain"), "{msg}");
    // Every knob is reachable.
    let all = json!({
        "workers": 2, "tick_ms": 50, "user_delay_ms": 1000, "sync_delay_ms": 100,
        "backoff_base_ms": 100, "backoff_cap_ms": 1000, "event_lifetime_ms": 60000,
        "expired_memory_ms": 1000, "fetch_deadline_ms": 5000, "connect_timeout_ms": 1000,
        "io_timeout_ms": 1000, "shutdown_timeout_ms": 1000, "checkpoint_interval_ms": 1000,
        "max_events": 10, "max_oids_per_event": 5, "max_urls_per_event": 5,
        "max_ref_updates_per_event": 5, "max_fetch_bytes": 1048576, "fetch_depth": null,
        "thread_name": "cfg", "domain_limits": {"max_concurrent": 2, "per_minute": 10, "burst": 2},
        "domain_overrides": {"git.example.com": {"max_concurrent": 1, "per_minute": 6}},
        "our_domain": "relay.example.com:8443", "naughty_duration_ms": 1000,
        "allow_private_addresses": true, "allowed_schemes": ["https", "http"],
        "move_unreadable_state_aside": true, "hide_temp_refs": false
    });
    let (st, msg) = try_new(&all.to_string());
    assert_eq!(st, PSYNC_OK, "{msg}");
    let dir = tempfile::tempdir().unwrap();
    let with_state = json!({"state_file": dir.path().join("state.json"), "fetch_depth": 1});
    assert_eq!(try_new(&with_state.to_string()).0, PSYNC_OK);

    // Bad event JSON.
    let e = new_engine(quiet());
    let repo = init_bare(&dir.path().join("r.git"));
    assert_eq!(submit(e, &json!("nope")).0, PSYNC_INVALID_JSON);
    let mut ev = event("a", &repo, &missing_oid(1));
    ev["colour"] = json!("red");
    assert_eq!(submit(e, &ev).0, PSYNC_INVALID_JSON);
    assert!(last_error().unwrap().contains("colour"));
    let mut ev = event("a", &repo, &missing_oid(1));
    ev["origin"] = json!("elsewhere");
    assert_eq!(submit(e, &ev).0, PSYNC_INVALID_JSON);
    let mut ev = event("a", &repo, &missing_oid(1));
    ev["ref_updates"] = json!([{"name": "HEAD"}]);
    assert_eq!(submit(e, &ev).0, PSYNC_INVALID_JSON);
    assert!(last_error().unwrap().contains("ref_updates[0]"));
    for (bad, says) in [
        (
            json!([{"name": "refs/heads/x", "delete": false}]),
            "ref_updates[0]",
        ),
        (
            json!([{"name": "refs/heads/x", "oid": missing_oid(1), "delete": true}]),
            "ref_updates[0]",
        ),
        (
            json!([{"name": "refs/heads/x", "delete": "yes"}]),
            "a boolean",
        ),
    ] {
        let mut ev = event("a", &repo, &missing_oid(1));
        ev["ref_updates"] = bad.clone();
        assert_eq!(submit(e, &ev).0, PSYNC_INVALID_JSON, "{bad}");
        let message = last_error().unwrap();
        assert!(message.contains(says), "{bad}: {message}");
    }
    let mut ev = event("a", &repo, &missing_oid(1));
    ev["replace_refs"] = json!("yes");
    assert_eq!(submit(e, &ev).0, PSYNC_INVALID_JSON);
    assert!(last_error().unwrap().contains("a boolean"));
    // SAFETY: a live engine.
    unsafe { psync_engine_free(e) };
}

#[test]
fn every_submit_error_has_its_own_status() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("r.git"));
    let e = new_engine(json!({
        "allow_private_addresses": true, "sync_delay_ms": 3_600_000, "user_delay_ms": 3_600_000,
        "tick_ms": 10, "max_events": 2, "max_oids_per_event": 2, "max_urls_per_event": 2,
        "max_ref_updates_per_event": 1, "event_lifetime_ms": 3_600_000
    }));
    let oid = missing_oid(1);
    let base = || event("ev", &repo, &oid);
    let with = |k: &str, v: Value| {
        let mut ev = base();
        ev[k] = v;
        ev
    };
    let cases = [
        (with("id", json!("")), PSYNC_INVALID_EVENT_ID),
        (with("identifier", json!("")), PSYNC_INVALID_IDENTIFIER),
        (with("oids", json!([])), PSYNC_NO_OBJECT_IDS),
        (
            with(
                "oids",
                json!([missing_oid(1), missing_oid(2), missing_oid(3)]),
            ),
            PSYNC_TOO_MANY_OBJECT_IDS,
        ),
        (with("oids", json!(["xyz"])), PSYNC_INVALID_OBJECT_ID),
        (
            with("clone_urls", json!(["http://a/", "http://b/", "http://c/"])),
            PSYNC_TOO_MANY_CLONE_URLS,
        ),
        (
            with("clone_urls", json!(["http://a b/"])),
            PSYNC_INVALID_CLONE_URL,
        ),
        (
            with("repo", json!(dir.path().join("nope.git"))),
            PSYNC_INVALID_REPOSITORY,
        ),
        (
            with(
                "ref_updates",
                json!([{"name": "refs/heads/a", "oid": oid}, {"name": "refs/heads/b", "oid": oid}]),
            ),
            PSYNC_TOO_MANY_REF_UPDATES,
        ),
        (
            with("ref_updates", json!([{"name": "not a ref", "oid": oid}])),
            PSYNC_INVALID_REF_UPDATE,
        ),
        (
            with("ref_updates", json!([{"name": "HEAD", "delete": true}])),
            PSYNC_INVALID_REF_UPDATE,
        ),
        (
            with("replace_refs", json!(true)),
            PSYNC_REPLACE_REFS_WITHOUT_REF_UPDATES,
        ),
    ];
    for (ev, want) in &cases {
        let (st, _, refused) = submit(e, ev);
        assert_eq!(st, *want, "{ev}: {:?}", last_error());
        assert!(refused.is_none());
        assert!(!last_error().unwrap().is_empty());
    }
    // A refused URL is reported, the event still waits.
    let mut ev = event("p1", &repo, &missing_oid(10));
    ev["clone_urls"] = json!(["ssh://git.example.com/x.git", "http://127.0.0.1:1/x.git"]);
    let (st, adm, refused) = submit(e, &ev);
    assert_eq!(
        (st, adm),
        (PSYNC_OK, Some(PsyncAdmission::PSYNC_ADMISSION_PENDING))
    );
    let refused: Value = serde_json::from_str(&refused.unwrap()).unwrap();
    assert_eq!(refused[0]["index"], 0);
    assert_eq!(refused[0]["url"], "ssh://git.example.com/x.git");
    assert!(refused[0]["reason"].as_str().unwrap().contains("ssh"));
    let (st, _, refused) = submit(e, &event("p2", &repo, &missing_oid(11)));
    assert_eq!(st, PSYNC_OK);
    assert_eq!(refused.as_deref(), Some("[]"));
    let (st, _, _) = submit(e, &event("p3", &repo, &missing_oid(12)));
    assert_eq!(st, PSYNC_QUEUE_FULL, "{:?}", last_error());
    // SAFETY: a live engine.
    unsafe { psync_engine_free(e) };

    // An expired event's id is refused for a while.
    let e = new_engine(
        json!({"allow_private_addresses": true, "sync_delay_ms": 3_600_000,
                              "tick_ms": 10, "event_lifetime_ms": 50}),
    );
    assert_eq!(
        submit(e, &event("old", &repo, &missing_oid(20))).0,
        PSYNC_OK
    );
    let t = poll(e, 10_000).expect("the event expires");
    assert_eq!(t.kind, PsyncOutcomeKind::PSYNC_OUTCOME_EXPIRED);
    assert_eq!(t.event_id, "old");
    assert_eq!(t.json["kind"], "expired");
    assert_eq!(t.json["reason"], "lifetime_ended");
    assert_eq!(t.json["missing"], json!([missing_oid(20)]));
    assert_eq!(
        submit(e, &event("old", &repo, &missing_oid(20))).0,
        PSYNC_PREVIOUSLY_EXPIRED
    );
    // SAFETY: a live engine.
    unsafe { psync_engine_free(e) };
}

/// The top-level field names of a `{:?}` rendering of a struct (`Name { a: .., b: .. }`).
fn debug_fields(debug: &str) -> Vec<String> {
    let body = &debug[debug.find('{').expect("a struct") + 1..];
    let (mut depth, mut fields, mut token) = (0usize, Vec::new(), String::new());
    let mut in_string = false;
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' if depth == 0 || in_string => in_string = !in_string,
            '\\' if in_string => {
                chars.next();
            }
            _ if in_string => {}
            '{' | '[' | '(' => depth += 1,
            '}' | ']' | ')' if depth > 0 => depth -= 1,
            ':' if depth == 0 && !token.trim().is_empty() => {
                fields.push(token.trim().to_owned());
                token.clear();
            }
            ',' if depth == 0 => token.clear(),
            _ if depth == 0 => token.push(c),
            _ => {}
        }
    }
    fields.sort();
    fields
}

/// `Stats` is non-exhaustive, so the C ABI cannot list its fields exhaustively at compile time:
/// every field of the Rust `Stats` must still be a key of `psync_engine_stats_json` (checked
/// against the fields its `Debug` output names).
#[test]
fn the_stats_json_has_every_field_of_stats() {
    let engine = purgatory_sync::Engine::builder()
        .build()
        .expect("a default engine");
    let rust = debug_fields(&format!("{:?}", engine.stats()));
    engine.shutdown().expect("shutdown");
    assert!(rust.len() > 20, "{rust:?}");
    let e = new_engine(quiet());
    let mut json: Vec<String> = stats(e).as_object().unwrap().keys().cloned().collect();
    json.sort();
    // SAFETY: a live engine.
    unsafe { psync_engine_free(e) };
    let missing: Vec<&String> = rust.iter().filter(|f| !json.contains(f)).collect();
    assert!(
        missing.is_empty(),
        "Stats fields missing from the JSON: {missing:?}"
    );
    // The one key computed from the others (`Stats::requests_per_release`).
    let derived: Vec<&String> = json.iter().filter(|k| !rust.contains(k)).collect();
    assert_eq!(derived, ["requests_per_release"]);
}

#[test]
fn poll_times_out_and_release_goes_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("r.git"));
    let e = new_engine(quiet());
    assert_eq!(poll(e, 0).err(), Some(PSYNC_TIMEOUT));
    assert!(last_error().unwrap().contains("no outcome"));
    let start = Instant::now();
    assert_eq!(poll(e, 50).err(), Some(PSYNC_TIMEOUT));
    assert!(start.elapsed() >= Duration::from_millis(40));

    let blob = b"arrives by push";
    let oid = git2::Oid::hash_object(git2::ObjectType::Blob, blob)
        .unwrap()
        .to_string();
    let mut ev = event("rel", &repo, &oid);
    ev["origin"] = json!("user");
    let (st, adm, _) = submit(e, &ev);
    assert_eq!(
        (st, adm),
        (PSYNC_OK, Some(PsyncAdmission::PSYNC_ADMISSION_PENDING))
    );
    // The scheduler counts the submit once it takes the command.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats(e)["submitted"] != 1 {
        assert!(Instant::now() < deadline, "the submit was not counted");
        std::thread::sleep(Duration::from_millis(5));
    }

    git2::Repository::open_bare(&repo)
        .unwrap()
        .blob(blob)
        .unwrap();
    let ident = cs("ident-rel");
    // SAFETY: a live engine and a valid string.
    assert_eq!(
        unsafe { psync_engine_git_data_arrived(e, ident.as_ptr()) },
        PSYNC_OK
    );
    let t = poll(e, 10_000).expect("the event is released");
    assert_eq!(t.kind, PsyncOutcomeKind::PSYNC_OUTCOME_RELEASED);
    assert_eq!(t.event_id, "rel");
    assert_eq!(t.identifier, "ident-rel");
    assert_eq!(t.json["kind"], "released");
    assert_eq!(t.json["event_id"], "rel");
    assert_eq!(t.json["repo"], repo.to_string_lossy().as_ref());
    assert!(t.json["waited_ms"].is_u64());
    assert_eq!(t.json["refs"], "none", "no ref updates");
    assert!(t.json.get("newer_created_at").is_none());

    // Now present: a second event for the same object is already satisfied.
    let (st, adm, _) = submit(e, &event("again", &repo, &oid));
    assert_eq!(
        (st, adm),
        (
            PSYNC_OK,
            Some(PsyncAdmission::PSYNC_ADMISSION_ALREADY_SATISFIED)
        )
    );

    let s = stats(e);
    assert_eq!(s["released"], 1);
    assert_eq!(s["already_satisfied"], 1);
    assert!(s["domains"].is_object() && s["failures"].is_object() && s["naughty"].is_array());
    for counter in [
        "fetches_started",
        "fetches_succeeded",
        "fetches_partial",
        "fetches_failed",
    ] {
        assert_eq!(
            s[counter], 0,
            "{counter}: released by a push, nothing fetched"
        );
    }
    let times = &s["release_times"];
    assert_eq!(times["count"], 1);
    assert_eq!(times["sum_ms"], t.json["waited_ms"]);
    let buckets = times["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 13);
    assert_eq!(buckets[0]["le_ms"], 100);
    assert_eq!(buckets[12], json!({"le_ms": null, "count": 1}));

    // The same counters as Prometheus text.
    let m = metrics(e);
    assert_eq!(scalar(&m, "purgatory_sync_released_total"), 1.0);
    assert_eq!(scalar(&m, "purgatory_sync_already_satisfied_total"), 1.0);
    assert_eq!(
        scalar(&m, "purgatory_sync_time_to_release_seconds_count"),
        1.0
    );
    // In seconds, to the nanosecond; `waited_ms` is whole milliseconds.
    let waited = t.json["waited_ms"].as_f64().unwrap() / 1000.0;
    let sum = scalar(&m, "purgatory_sync_time_to_release_seconds_sum");
    assert!((0.0..0.001).contains(&(sum - waited)), "{sum} vs {waited}");
    // SAFETY: a live engine.
    unsafe { psync_engine_free(e) };
}

/// Repository states through the C ABI: a complete ref set and an explicit deletion are
/// written on release, and the branch it does not list is gone; an older state released
/// afterwards is not written, and its outcome says so.
#[test]
fn a_complete_ref_set_with_a_deletion_is_written_on_release() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("r.git"));
    let old = purgatory_sync_testkit::commit(&repo, "old", &[("f", b"0")], "zero");
    let tip = purgatory_sync_testkit::commit(&repo, "topic", &[("f", b"1")], "one");
    let r = git2::Repository::open_bare(&repo).unwrap();
    let old_oid = git2::Oid::from_str(&old.to_string()).unwrap();
    r.reference("refs/tags/v0", old_oid, false, "test").unwrap();
    r.reference("refs/nostr/pr", old_oid, false, "test")
        .unwrap();
    let e = new_engine(quiet());
    let mut ev = event("state", &repo, &tip.to_string());
    ev["ref_updates"] = json!([
        {"name": "refs/heads/main", "oid": tip.to_string()},
        {"name": "refs/tags/v0", "delete": true},
        {"name": "HEAD", "symbolic": "refs/heads/main"},
    ]);
    ev["replace_refs"] = json!(true);
    ev["created_at"] = json!(1_700_000_200u64);
    let (st, adm, _) = submit(e, &ev);
    assert_eq!(
        (st, adm),
        (PSYNC_OK, Some(PsyncAdmission::PSYNC_ADMISSION_PENDING))
    );
    let t = poll(e, 10_000).expect("the event is released");
    assert_eq!(t.kind, PsyncOutcomeKind::PSYNC_OUTCOME_RELEASED);
    assert_eq!(t.json["refs"], "written");
    assert_eq!(
        purgatory_sync_testkit::refs_with_prefix(&repo, "refs/"),
        ["refs/heads/main", "refs/nostr/pr"]
    );

    let mut older = event("older", &repo, &old.to_string());
    older["ref_updates"] = json!([{"name": "refs/heads/main", "oid": old.to_string()}]);
    older["replace_refs"] = json!(true);
    older["created_at"] = json!(1_700_000_100u64);
    assert_eq!(submit(e, &older).0, PSYNC_OK);
    let t = poll(e, 10_000).expect("the older state is released");
    assert_eq!(t.event_id, "older");
    assert_eq!(t.json["refs"], "skipped_older_state");
    assert_eq!(t.json["newer_created_at"], 1_700_000_200u64);
    let main = r.refname_to_id("refs/heads/main").unwrap();
    assert_eq!(main.to_string(), tip.to_string(), "not rolled back");
    // SAFETY: a live engine.
    unsafe { psync_engine_free(e) };
}

#[test]
fn shutdown_then_calls_and_drain() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("r.git"));
    let e = new_engine(
        json!({"allow_private_addresses": true, "sync_delay_ms": 3_600_000,
                              "tick_ms": 10, "event_lifetime_ms": 30}),
    );
    for i in 0..3 {
        assert_eq!(
            submit(e, &event(&format!("d{i}"), &repo, &missing_oid(i))).0,
            PSYNC_OK
        );
    }
    // Wait until all three expired, without taking the outcomes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats(e)["expired"] != 3 {
        assert!(Instant::now() < deadline, "events did not expire");
        std::thread::sleep(Duration::from_millis(10));
    }
    let id = cs("x");
    let ev = cs(&event("late", &repo, &missing_oid(9)).to_string());
    let mut s = null_mut();
    // SAFETY: a live engine (shut down but not freed) and valid arguments.
    unsafe {
        assert_eq!(psync_engine_shutdown(e), PSYNC_OK, "{:?}", last_error());
        assert_eq!(psync_engine_shutdown(e), PSYNC_ENGINE_SHUT_DOWN);
        assert!(last_error().unwrap().contains("shut down"));
        assert_eq!(
            psync_engine_submit(e, ev.as_ptr(), null_mut(), null_mut()),
            PSYNC_ENGINE_SHUT_DOWN
        );
        assert_eq!(
            psync_engine_git_data_arrived(e, id.as_ptr()),
            PSYNC_ENGINE_SHUT_DOWN
        );
        assert_eq!(psync_engine_cancel(e, id.as_ptr()), PSYNC_ENGINE_SHUT_DOWN);
        assert_eq!(psync_engine_stats_json(e, &mut s), PSYNC_ENGINE_SHUT_DOWN);
        assert!(s.is_null());
        assert_eq!(psync_engine_metrics(e, &mut s), PSYNC_ENGINE_SHUT_DOWN);
        assert!(s.is_null());
    }
    let mut drained = Vec::new();
    for _ in 0..3 {
        drained.push(poll(e, 1000).expect("a remaining outcome").event_id);
    }
    drained.sort();
    assert_eq!(drained, ["d0", "d1", "d2"]);
    assert_eq!(poll(e, 0).err(), Some(PSYNC_DISCONNECTED));
    assert_eq!(poll(e, 100).err(), Some(PSYNC_DISCONNECTED));
    // SAFETY: a live engine, not used afterwards.
    unsafe { psync_engine_free(e) };
}

#[test]
fn last_error_message_is_per_thread() {
    let fresh = std::thread::spawn(|| psync_last_error_message().is_null())
        .join()
        .unwrap();
    assert!(fresh, "a thread without failures has no message");
    // SAFETY: NULL is part of the contract.
    assert_eq!(
        unsafe { psync_engine_cancel(null_mut(), null()) },
        PSYNC_NULL_ARGUMENT
    );
    let mine = last_error().unwrap();
    assert!(mine.contains("engine"), "{mine}");
    let other = std::thread::spawn(|| {
        let c = cs("{\"bogus\": 1}");
        let mut e = null_mut();
        // SAFETY: valid string and out-pointer.
        assert_eq!(
            unsafe { psync_engine_new(c.as_ptr(), &mut e) },
            PSYNC_INVALID_JSON
        );
        last_error().unwrap()
    })
    .join()
    .unwrap();
    assert!(other.contains("bogus"), "{other}");
    assert_eq!(last_error().unwrap(), mine);
    // A success leaves the message as it was.
    let e = new_engine(quiet());
    assert_eq!(last_error().unwrap(), mine);
    // SAFETY: a live engine.
    unsafe { psync_engine_free(e) };
}

#[test]
fn eight_threads_share_one_engine() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("r.git"));
    let e = new_engine(
        json!({"allow_private_addresses": true, "sync_delay_ms": 5, "tick_ms": 10,
                              "workers": 2, "fetch_deadline_ms": 2000, "backoff_base_ms": 50,
                              "backoff_cap_ms": 100, "event_lifetime_ms": 300}),
    );
    struct Shared(*mut PsyncEngine);
    // SAFETY: the engine handle is thread-safe for every call but free, which comes after join.
    unsafe impl Sync for Shared {}
    let shared = Shared(e);
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let shared = &shared;
            let repo = &repo;
            s.spawn(move || {
                let e = shared.0;
                for i in 0..40u32 {
                    let id = format!("t{t}-{i}");
                    let (st, _, _) = submit(e, &event(&id, repo, &missing_oid(t * 1000 + i)));
                    assert_eq!(st, PSYNC_OK, "{:?}", last_error());
                    let ident = cs(&format!("ident-{id}"));
                    let cid = cs(&id);
                    // SAFETY: a live engine and valid strings.
                    unsafe {
                        assert_eq!(psync_engine_git_data_arrived(e, ident.as_ptr()), PSYNC_OK);
                        if i % 2 == 0 {
                            assert_eq!(psync_engine_cancel(e, cid.as_ptr()), PSYNC_OK);
                        }
                    }
                    assert!(stats(e)["waiting_events"].is_u64());
                    match poll(e, 0) {
                        Ok(t) => assert!(t.event_id.starts_with('t')),
                        Err(st) => assert_eq!(st, PSYNC_TIMEOUT),
                    }
                }
            });
        }
    });
    // SAFETY: every other thread has finished.
    unsafe {
        assert_eq!(psync_engine_shutdown(e), PSYNC_OK, "{:?}", last_error());
        psync_engine_free(e);
    }
}

/// A state file another engine holds has its own status, and is free again once that engine
/// is released.
#[test]
fn a_state_file_in_use_has_its_own_status() {
    let dir = tempfile::tempdir().unwrap();
    let config = json!({"state_file": dir.path().join("state.json")});
    let first = new_engine(config.clone());
    let c = cs(&config.to_string());
    let mut second = null_mut();
    // SAFETY: valid string and out-pointer.
    let st = unsafe { psync_engine_new(c.as_ptr(), &mut second) };
    assert_eq!(st, PSYNC_STATE_FILE_LOCKED, "{:?}", last_error());
    assert!(second.is_null());
    let message = last_error().unwrap();
    assert!(message.contains("another engine"), "{message}");
    // SAFETY: a live engine, not used afterwards.
    unsafe { psync_engine_free(first) };
    let again = new_engine(config);
    // SAFETY: a live engine, not used afterwards.
    unsafe { psync_engine_free(again) };
}
