//! The C ABI of [purgatory-sync](purgatory_sync): opaque handles, status codes, JSON in and
//! out, results by polling.
//!
//! This crate builds `libpurgatory_sync_capi.{so,a}`; `capi/install.sh` installs them as
//! `libpurgatory_sync.{so,a}` with the header `purgatory_sync.h` and a pkg-config file
//! (`docs/c-abi.md`). The header is generated from this file by cbindgen
//! (`capi/tests/header.rs` checks it for drift).
//!
//! Every function runs its body behind a panic boundary (`catch_unwind`; the outcome
//! accessors only read a field, cannot panic and have none), checks its pointers for NULL first
//! and its strings for UTF-8, and reports failures as a [`psync_status`](PsyncStatus) plus a
//! per-thread message ([`psync_last_error_message`]).
//!
//! The functions are also callable from Rust, which is how `capi/tests/ffi.rs` tests them. The
//! Rust type names map to C names: [`PsyncStatus`] is `psync_status`, [`PsyncAdmission`] is
//! `psync_admission`, [`PsyncOutcomeKind`] is `psync_outcome_kind_t`, [`PsyncEngine`] and
//! [`PsyncOutcome`] are the opaque `psync_engine` and `psync_outcome`.

#![deny(missing_docs)]
#![warn(rust_2018_idioms)]
// Every function of the ABI takes raw pointers from C.
#![allow(unsafe_code)]

mod error;
#[doc(hidden)]
pub mod fuzz;
mod log;
mod outbox;

pub use error::{
    psync_error_free, psync_error_message, psync_error_status, psync_last_error_message, PsyncError,
};
pub use log::{psync_log_to_callback, psync_log_to_stderr, PsyncLogCallback, PsyncLogLevel};

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{guard, ErrorOut, Failure};
use crate::outbox::{Empty, Outbox};

use purgatory_sync::{
    Admission, BuildError, DomainLimits, Engine, EngineBuilder, Origin, PendingEvent, RefUpdate,
    Stats, SubmitError,
};

/// What a `psync_` call returned. `PSYNC_OK` is success; for every other value
/// `psync_last_error_message()` says more on the calling thread.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum PsyncStatus {
    /// Success.
    PSYNC_OK = 0,
    /// A required pointer was NULL.
    PSYNC_NULL_ARGUMENT = 1,
    /// A string argument was not UTF-8.
    PSYNC_INVALID_UTF8 = 2,
    /// Config or event JSON did not parse or had unknown or ill-typed fields.
    PSYNC_INVALID_JSON = 3,
    /// A configuration setting is out of range.
    PSYNC_INVALID_CONFIG = 4,
    /// The state file could not be read or written at start.
    PSYNC_STATE_FILE = 5,
    /// The engine's threads could not be spawned.
    PSYNC_SPAWN_FAILED = 6,
    /// poll: no outcome within the timeout.
    PSYNC_TIMEOUT = 7,
    /// poll: the engine is shut down and every outcome was taken.
    PSYNC_DISCONNECTED = 8,
    /// A Rust panic was caught at the boundary.
    PSYNC_PANIC = 9,
    /// Shutdown did not end cleanly (the engine is stopped anyway).
    PSYNC_SHUTDOWN_ERROR = 10,
    /// The call was made on an engine already shut down.
    PSYNC_ENGINE_SHUT_DOWN = 11,
    /// The state file is in use: another engine (in this process or another) holds its lock.
    PSYNC_STATE_FILE_LOCKED = 12,
    /// A failure this version of the header has no code of its own for (a newer library may
    /// report one); the message says what it was.
    PSYNC_OTHER_ERROR = 13,
    /// `psync_log_to_*`: Rust code in this process installed a logger of its own (the `log`
    /// crate allows one per process).
    PSYNC_LOGGER_UNAVAILABLE = 14,
    /// submit: the event id is empty, too long or has control or bidirectional formatting
    /// characters.
    PSYNC_INVALID_EVENT_ID = 20,
    /// submit: the identifier is empty, too long or has control or bidirectional formatting
    /// characters.
    PSYNC_INVALID_IDENTIFIER = 21,
    /// submit: the event lists no object id.
    PSYNC_NO_OBJECT_IDS = 22,
    /// submit: the event lists more object ids than allowed.
    PSYNC_TOO_MANY_OBJECT_IDS = 23,
    /// submit: an object id is not 40 hex digits.
    PSYNC_INVALID_OBJECT_ID = 24,
    /// submit: the event lists more clone URLs than allowed.
    PSYNC_TOO_MANY_CLONE_URLS = 25,
    /// submit: a clone URL is empty, too long or has whitespace, control or bidirectional
    /// formatting characters.
    PSYNC_INVALID_CLONE_URL = 26,
    /// submit: the repository path is not an existing bare git repository.
    PSYNC_INVALID_REPOSITORY = 27,
    /// submit: a synced event with this id expired recently and its objects are still
    /// missing; refused for the expired-id memory (`expired_memory_ms`, default 7 days).
    PSYNC_PREVIOUSLY_EXPIRED = 28,
    /// submit: the engine already holds as many waiting events as it accepts.
    PSYNC_QUEUE_FULL = 29,
    /// submit: the engine is shutting down.
    PSYNC_SHUTTING_DOWN = 30,
    /// submit: the event lists more ref updates than allowed.
    PSYNC_TOO_MANY_REF_UPDATES = 31,
    /// submit: a ref update has a bad name or target.
    PSYNC_INVALID_REF_UPDATE = 32,
    /// submit: the event's clone URLs would give its identifier more distinct URLs than
    /// allowed (`max_urls_per_identifier`).
    PSYNC_TOO_MANY_IDENTIFIER_URLS = 33,
    /// submit: `replace_refs` is set but the event has no ref update (an empty complete set
    /// would delete every branch and tag).
    PSYNC_REPLACE_REFS_WITHOUT_REF_UPDATES = 34,
    /// submit: a refusal added to the library after this header was written.
    PSYNC_OTHER_SUBMIT_ERROR = 39,
}

/// How `psync_engine_submit` admitted an event.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum PsyncAdmission {
    /// The event waits in purgatory; exactly one outcome follows unless it is cancelled.
    PSYNC_ADMISSION_PENDING = 0,
    /// Every object is already present (and its ref updates were written): no outcome follows.
    PSYNC_ADMISSION_ALREADY_SATISFIED = 1,
}

/// What finally happened to an event.
///
/// Named `psync_outcome_kind_t` in C: `psync_outcome_kind` is the function that returns it,
/// and C has one namespace for both.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum PsyncOutcomeKind {
    /// Every object arrived; the event may be served.
    PSYNC_OUTCOME_RELEASED = 0,
    /// The event left purgatory without all its objects.
    PSYNC_OUTCOME_EXPIRED = 1,
}

/// An engine (opaque). Created by `psync_engine_new`, released by `psync_engine_free`.
pub struct PsyncEngine {
    engine: RwLock<Option<Engine>>,
    /// The outcomes not taken yet, and the readiness descriptor.
    outbox: Arc<Outbox>,
    /// Moves the engine's outcomes into `outbox`; ends when the engine is shut down.
    forwarder: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for PsyncEngine {
    fn drop(&mut self) {
        // Shutting the engine down closes its outcome channel, which ends the forwarder.
        drop(self.engine.get_mut().take());
        if let Some(forwarder) = self.forwarder.get_mut().take() {
            let _ = forwarder.join();
        }
    }
}

/// One outcome taken by `psync_engine_poll` (opaque). Owns the strings its accessors return;
/// released by `psync_outcome_free`.
pub struct PsyncOutcome {
    kind: PsyncOutcomeKind,
    event_id: CString,
    identifier: CString,
    json: CString,
}

pub(crate) fn null(name: &str) -> Failure {
    (
        PsyncStatus::PSYNC_NULL_ARGUMENT,
        format!("{name} must not be NULL"),
    )
}

/// # Safety
/// `ptr` is NULL or a NUL-terminated string valid for the call.
unsafe fn utf8<'a>(ptr: *const c_char, name: &str) -> Result<&'a str, Failure> {
    if ptr.is_null() {
        return Err(null(name));
    }
    // SAFETY: non-NULL and NUL-terminated, by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(ptr) };
    bytes.to_str().map_err(|e| {
        (
            PsyncStatus::PSYNC_INVALID_UTF8,
            format!("{name} is not valid UTF-8: {e}"),
        )
    })
}

/// # Safety
/// `engine` is NULL or a live handle from `psync_engine_new`.
unsafe fn engine_ref<'a>(engine: *const PsyncEngine) -> Result<&'a PsyncEngine, Failure> {
    // SAFETY: by the caller's contract.
    unsafe { engine.as_ref() }.ok_or_else(|| null("engine"))
}

fn shut_down() -> Failure {
    (
        PsyncStatus::PSYNC_ENGINE_SHUT_DOWN,
        "the engine is shut down".to_owned(),
    )
}

fn with_engine<T>(
    handle: &PsyncEngine,
    f: impl FnOnce(&Engine) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let guard = handle.engine.read();
    match guard.as_ref() {
        Some(engine) => f(engine),
        None => Err(shut_down()),
    }
}

fn json_err(what: &str, e: serde_json::Error) -> Failure {
    (PsyncStatus::PSYNC_INVALID_JSON, format!("{what}: {e}"))
}

fn owned_string(s: String) -> *mut c_char {
    CString::new(s.replace('\0', "\\u0000"))
        .unwrap_or_default()
        .into_raw()
}

// ---------------------------------------------------------------------------------------------
// Configuration JSON

/// A field given as `null` reads as if it were absent (Go's encoder writes a nil slice or map
/// as `null`); the `Option` fields do so already.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsJson {
    max_concurrent: usize,
    per_minute: u32,
    #[serde(default)]
    burst: Option<u32>,
}

impl LimitsJson {
    fn limits(&self) -> DomainLimits {
        let l = DomainLimits::new(self.max_concurrent, self.per_minute);
        match self.burst {
            Some(b) => l.burst(b),
            None => l,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigJson {
    workers: Option<usize>,
    tick_ms: Option<u64>,
    user_delay_ms: Option<u64>,
    sync_delay_ms: Option<u64>,
    backoff_base_ms: Option<u64>,
    backoff_cap_ms: Option<u64>,
    event_lifetime_ms: Option<u64>,
    expired_memory_ms: Option<u64>,
    fetch_deadline_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    io_timeout_ms: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    checkpoint_interval_ms: Option<u64>,
    max_events: Option<usize>,
    max_oids_per_event: Option<usize>,
    max_urls_per_event: Option<usize>,
    max_urls_per_identifier: Option<usize>,
    max_ref_updates_per_event: Option<usize>,
    max_fetch_bytes: Option<u64>,
    max_fetch_memory: Option<u64>,
    max_total_fetch_memory: Option<u64>,
    max_object_size: Option<u64>,
    max_advertisement_bytes: Option<u64>,
    fetch_depth: Option<u32>,
    thread_name: Option<String>,
    domain_limits: Option<LimitsJson>,
    #[serde(default, deserialize_with = "null_as_default")]
    domain_overrides: BTreeMap<String, LimitsJson>,
    our_domain: Option<String>,
    naughty_duration_ms: Option<u64>,
    domain_retention_ms: Option<u64>,
    allow_private_addresses: Option<bool>,
    allowed_schemes: Option<Vec<String>>,
    state_file: Option<PathBuf>,
    move_unreadable_state_aside: Option<bool>,
    hide_temp_refs: Option<bool>,
}

impl ConfigJson {
    fn builder(self) -> EngineBuilder {
        let ms = Duration::from_millis;
        let mut b = Engine::builder();
        macro_rules! set {
            ($field:ident => $knob:ident) => {
                if let Some(v) = self.$field {
                    b = b.$knob(v);
                }
            };
            ($field:ident ms => $knob:ident) => {
                if let Some(v) = self.$field {
                    b = b.$knob(ms(v));
                }
            };
        }
        set!(workers => workers);
        set!(tick_ms ms => tick);
        set!(user_delay_ms ms => user_delay);
        set!(sync_delay_ms ms => sync_delay);
        set!(backoff_base_ms ms => backoff_base);
        set!(backoff_cap_ms ms => backoff_cap);
        set!(event_lifetime_ms ms => event_lifetime);
        set!(expired_memory_ms ms => expired_memory);
        set!(fetch_deadline_ms ms => fetch_deadline);
        set!(connect_timeout_ms ms => connect_timeout);
        set!(io_timeout_ms ms => io_timeout);
        set!(shutdown_timeout_ms ms => shutdown_timeout);
        set!(checkpoint_interval_ms ms => checkpoint_interval);
        set!(max_events => max_events);
        set!(max_oids_per_event => max_oids_per_event);
        set!(max_urls_per_event => max_urls_per_event);
        set!(max_urls_per_identifier => max_urls_per_identifier);
        set!(max_ref_updates_per_event => max_ref_updates_per_event);
        set!(max_fetch_bytes => max_fetch_bytes);
        set!(max_fetch_memory => max_fetch_memory);
        set!(max_total_fetch_memory => max_total_fetch_memory);
        set!(max_object_size => max_object_size);
        set!(max_advertisement_bytes => max_advertisement_bytes);
        set!(naughty_duration_ms ms => naughty_duration);
        set!(domain_retention_ms ms => domain_retention);
        set!(allow_private_addresses => allow_private_addresses);
        set!(state_file => state_file);
        set!(move_unreadable_state_aside => move_unreadable_state_aside);
        set!(hide_temp_refs => hide_temp_refs);
        if self.fetch_depth.is_some() {
            b = b.fetch_depth(self.fetch_depth);
        }
        if let Some(name) = self.thread_name {
            b = b.thread_name(name);
        }
        if let Some(l) = self.domain_limits {
            let l = l.limits();
            b = b
                .domain_limits(l.max_concurrent, l.per_minute)
                .domain_burst(l.burst);
        }
        for (domain, l) in &self.domain_overrides {
            b = b.domain_override(domain, l.limits());
        }
        if let Some(d) = self.our_domain {
            b = b.our_domain(&d);
        }
        if let Some(s) = self.allowed_schemes {
            b = b.allowed_schemes(s);
        }
        b
    }
}

/// The builder a configuration JSON describes (`None`: every default), without building it:
/// the part of `psync_engine_new` before any thread starts.
pub(crate) fn builder_from_json(config_json: Option<&str>) -> Result<EngineBuilder, Failure> {
    let config: ConfigJson = match config_json {
        None => ConfigJson::default(),
        Some(text) => serde_json::from_str(text).map_err(|e| json_err("config_json", e))?,
    };
    Ok(config.builder())
}

fn build_failure(e: BuildError) -> Failure {
    let status = match &e {
        BuildError::InvalidSetting { .. } => PsyncStatus::PSYNC_INVALID_CONFIG,
        BuildError::Spawn(_) => PsyncStatus::PSYNC_SPAWN_FAILED,
        BuildError::StateFile { .. } => PsyncStatus::PSYNC_STATE_FILE,
        BuildError::StateFileLocked { .. } => PsyncStatus::PSYNC_STATE_FILE_LOCKED,
        // `BuildError` is non-exhaustive: a kind added later has no code of its own yet.
        _ => PsyncStatus::PSYNC_OTHER_ERROR,
    };
    (status, e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Event JSON

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefUpdateJson {
    name: String,
    oid: Option<String>,
    symbolic: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    delete: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum OriginJson {
    User,
    Sync,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventJson {
    id: String,
    identifier: String,
    repo: PathBuf,
    #[serde(default, deserialize_with = "null_as_default")]
    oids: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    clone_urls: Vec<String>,
    origin: Option<OriginJson>,
    #[serde(default, deserialize_with = "null_as_default")]
    ref_updates: Vec<RefUpdateJson>,
    #[serde(default, deserialize_with = "null_as_default")]
    replace_refs: bool,
    created_at: Option<u64>,
}

impl EventJson {
    fn event(self) -> Result<PendingEvent, Failure> {
        let mut ref_updates = Vec::with_capacity(self.ref_updates.len());
        for (i, r) in self.ref_updates.into_iter().enumerate() {
            ref_updates.push(match (r.oid, r.symbolic, r.delete) {
                (Some(oid), None, false) => RefUpdate::oid(r.name, oid),
                (None, Some(target), false) => RefUpdate::symbolic(r.name, target),
                (None, None, true) => RefUpdate::delete(r.name),
                _ => {
                    return Err((
                        PsyncStatus::PSYNC_INVALID_JSON,
                        format!(
                            "ref_updates[{i}]: exactly one of `oid`, `symbolic` and \
                             `\"delete\": true` is needed"
                        ),
                    ))
                }
            });
        }
        Ok(PendingEvent {
            id: self.id,
            identifier: self.identifier,
            repo: self.repo,
            oids: self.oids,
            clone_urls: self.clone_urls,
            origin: match self.origin {
                Some(OriginJson::User) => Origin::User,
                Some(OriginJson::Sync) | None => Origin::Sync,
            },
            ref_updates,
            replace_refs: self.replace_refs,
            created_at: self.created_at,
        })
    }
}

/// The event an event JSON describes, as `psync_engine_submit` reads it.
pub(crate) fn event_from_json(event_json: &str) -> Result<PendingEvent, Failure> {
    let parsed: EventJson =
        serde_json::from_str(event_json).map_err(|e| json_err("event_json", e))?;
    parsed.event()
}

fn submit_status(e: &SubmitError) -> PsyncStatus {
    use PsyncStatus::*;
    match e {
        SubmitError::InvalidEventId { .. } => PSYNC_INVALID_EVENT_ID,
        SubmitError::InvalidIdentifier { .. } => PSYNC_INVALID_IDENTIFIER,
        SubmitError::NoObjectIds => PSYNC_NO_OBJECT_IDS,
        SubmitError::TooManyObjectIds { .. } => PSYNC_TOO_MANY_OBJECT_IDS,
        SubmitError::InvalidObjectId { .. } => PSYNC_INVALID_OBJECT_ID,
        SubmitError::TooManyCloneUrls { .. } => PSYNC_TOO_MANY_CLONE_URLS,
        SubmitError::InvalidCloneUrl { .. } => PSYNC_INVALID_CLONE_URL,
        SubmitError::TooManyIdentifierUrls { .. } => PSYNC_TOO_MANY_IDENTIFIER_URLS,
        SubmitError::TooManyRefUpdates { .. } => PSYNC_TOO_MANY_REF_UPDATES,
        SubmitError::InvalidRefUpdate { .. } => PSYNC_INVALID_REF_UPDATE,
        SubmitError::ReplaceRefsWithoutRefUpdates => PSYNC_REPLACE_REFS_WITHOUT_REF_UPDATES,
        SubmitError::InvalidRepository { .. } => PSYNC_INVALID_REPOSITORY,
        SubmitError::PreviouslyExpired { .. } => PSYNC_PREVIOUSLY_EXPIRED,
        SubmitError::QueueFull { .. } => PSYNC_QUEUE_FULL,
        SubmitError::ShuttingDown => PSYNC_SHUTTING_DOWN,
        // `SubmitError` is non-exhaustive: a kind added later has no code of its own yet.
        _ => PSYNC_OTHER_SUBMIT_ERROR,
    }
}

// ---------------------------------------------------------------------------------------------
// Output JSON

/// Milliseconds in `d`, saturating.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, ms)
}

/// A duration histogram: `{"count", "sum_ms", "buckets": [{"le_ms", "count"}]}`, cumulative.
fn histogram(h: &purgatory_sync::ReleaseHistogram) -> Value {
    json!({
        "count": h.count(),
        "sum_ms": ms(h.sum()),
        "buckets": h
            .cumulative()
            .map(|(le, n)| json!({"le_ms": le.map(ms), "count": n}))
            .collect::<Vec<_>>(),
    })
}

fn stats_json(s: &Stats) -> Value {
    let Stats {
        commands_pending,
        queued_identifiers,
        waiting_events,
        awaiting_refs,
        in_flight,
        workers,
        submitted,
        already_satisfied,
        refused,
        released,
        expired,
        cancelled,
        rechecks,
        ref_updates_applied,
        ref_update_failures,
        fetches_started,
        requests,
        fetches_succeeded,
        fetches_partial,
        fetches_failed,
        memory_leaked,
        failures,
        domains,
        naughty,
        recent_failures,
        expired_ids_remembered,
        release_times,
        fetch_durations,
        bytes_received,
        // `Stats` is non-exhaustive; `capi/tests/ffi.rs` checks that every field is in the JSON.
        ..
    } = s;
    let by_kind = |m: &BTreeMap<purgatory_sync::FailureKind, u64>| -> Value {
        m.iter()
            .map(|(k, n)| (k.as_str().to_owned(), json!(n)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let domains: serde_json::Map<String, Value> = domains
        .iter()
        .map(|(d, st)| {
            (
                d.clone(),
                json!({
                    "in_flight": st.in_flight,
                    "queued_identifiers": st.queued_identifiers,
                    "requests_started": st.requests_started,
                    "requests": st.requests,
                    "succeeded": st.succeeded,
                    "partial": st.partial,
                    "failed": by_kind(&st.failed),
                    "bytes_received": st.bytes_received,
                    "next_cell_in_ms": ms(st.next_cell_in),
                }),
            )
        })
        .collect();
    let naughty: Vec<Value> = naughty
        .iter()
        .map(|n| {
            json!({
                "domain": n.domain,
                "scheme": n.scheme,
                "port": n.port,
                "category": n.category.as_str(),
                "reason": n.reason,
                "first_seen_unix_ms": unix_ms(n.first_seen),
                "last_seen_unix_ms": unix_ms(n.last_seen),
                "count": n.count,
                "until_unix_ms": unix_ms(n.until),
            })
        })
        .collect();
    let recent: Vec<Value> = recent_failures
        .iter()
        .map(|f| {
            json!({
                "identifier": f.identifier,
                "url": f.url,
                "kind": f.kind.as_str(),
                "message": f.message,
            })
        })
        .collect();
    json!({
        "commands_pending": commands_pending,
        "queued_identifiers": queued_identifiers,
        "waiting_events": waiting_events,
        "awaiting_refs": awaiting_refs,
        "in_flight": in_flight,
        "workers": workers,
        "submitted": submitted,
        "already_satisfied": already_satisfied,
        "refused": refused,
        "released": released,
        "expired": expired,
        "cancelled": cancelled,
        "rechecks": rechecks,
        "ref_updates_applied": ref_updates_applied,
        "ref_update_failures": ref_update_failures,
        "fetches_started": fetches_started,
        "requests": requests,
        "requests_per_release": s.requests_per_release(),
        "fetches_succeeded": fetches_succeeded,
        "fetches_partial": fetches_partial,
        "fetches_failed": fetches_failed,
        "memory_leaked": memory_leaked,
        "failures": by_kind(failures),
        "domains": domains,
        "naughty": naughty,
        "recent_failures": recent,
        "expired_ids_remembered": expired_ids_remembered,
        "release_times": histogram(release_times),
        "fetch_durations": histogram(fetch_durations),
        "bytes_received": bytes_received,
    })
}

// ---------------------------------------------------------------------------------------------
// The functions

/// Builds and starts an engine.
///
/// `config_json` is NULL or a JSON object (`"{}"` for every default); unknown fields are
/// refused (`PSYNC_INVALID_JSON`, the message names the field), and a field given as `null`
/// is as if absent. A value out of its range is `PSYNC_INVALID_CONFIG`, the message naming the
/// setting. Every field is optional (durations in milliseconds, sizes in bytes):
///
/// | field | default | range |
/// |---|---|---|
/// | `workers`: fetches in flight | 32 | 1 ..= 1024 |
/// | `tick_ms`: scheduler tick | 1000 | 1 ..= 3600000 |
/// | `user_delay_ms`: first attempt after a user's event | 180000 | 0 ..= 1 year |
/// | `sync_delay_ms`: first attempt after a synced event | 500 | 0 ..= 1 year |
/// | `backoff_base_ms`, `backoff_cap_ms`: backoff after an incomplete attempt | 20000, 120000 | 1 ..= 1 year, base ..= 1 year |
/// | `event_lifetime_ms`: lifetime in purgatory | 1800000 | 1 ..= 1 year |
/// | `expired_memory_ms`: an expired id is refused as a synced event meanwhile | 604800000 | 0 ..= 1 year |
/// | `fetch_deadline_ms`: hard limit on one fetch | 120000 | 1 ..= 3600000 |
/// | `connect_timeout_ms`, `io_timeout_ms` | 10000, 30000 | 1 ..= 3600000 |
/// | `shutdown_timeout_ms`: wait for fetches at shutdown | 10000 | 0 ..= 3600000 |
/// | `checkpoint_interval_ms`: state file writes | 60000 | 1 ..= 86400000 |
/// | `max_events`: waiting events (`PSYNC_QUEUE_FULL` beyond) | 1000000 | 1 ..= 2^63 |
/// | `max_oids_per_event` / `max_urls_per_event` | 1024 / 64 | 1 ..= 2^20 / 1 ..= 4096 |
/// | `max_urls_per_identifier` / `max_ref_updates_per_event` | 256 / 256 | 1 ..= 65536 |
/// | `max_fetch_bytes`: received by one fetch | 1073741824 | 1024 ..= 2^64-1 |
/// | `max_fetch_memory` / `max_total_fetch_memory`: libgit2's memory for one / all fetches | 536870912 / 4294967296 | 16 MiB ..= 1 TiB / max_fetch_memory ..= 16 TiB |
/// | `max_object_size`: largest object a delta may build (process-wide) | 104857600 | 1 MiB ..= 4 GiB |
/// | `max_advertisement_bytes`: largest ref advertisement | 33554432 | 64 KiB ..= 1 GiB |
/// | `fetch_depth`: shallow fetch depth, `null` for full history | null | 1 ..= 2^32-1 |
/// | `thread_name`: prefix of the engine's thread names | `"psync"` | 1 to 8 ASCII letters, digits or `-` |
/// | `domain_limits`: `{"max_concurrent", "per_minute", "burst"?}` per domain | 5, 30, 5 | 1 ..= 1024, 1 ..= 600000, 1 ..= 100000 |
/// | `domain_overrides`: `{"host": {"max_concurrent", "per_minute", "burst"?}}` | `{}` | as `domain_limits` |
/// | `our_domain`: never fetched from: `"host"` (every port), `"host:port"` or `"[v6]:port"` | none | a host |
/// | `naughty_duration_ms`: a failing host or endpoint is skipped | 43200000 | 0 ..= 1 year |
/// | `domain_retention_ms`: an idle domain keeps its statistics and metrics series | 3600000 | 1000 ..= 1 year |
/// | `allow_private_addresses`: loopback, private, link-local URLs | false | |
/// | `allowed_schemes` | `["https", "http", "git"]` | not empty |
/// | `state_file`: path of the durable state (docs/state-file.md) | none | |
/// | `move_unreadable_state_aside`: start afresh instead of failing on a bad state file | false | |
/// | `hide_temp_refs`: add `transfer.hideRefs = refs/purgatory-sync/` to a repository's configuration before pinning objects there | true | |
///
/// On `PSYNC_OK`, `*out_engine` is a new engine owned by the caller: release it with
/// `psync_engine_free`. On failure it is set to NULL. Errors: `PSYNC_NULL_ARGUMENT`,
/// `PSYNC_INVALID_UTF8`, `PSYNC_INVALID_JSON`, `PSYNC_INVALID_CONFIG`, `PSYNC_STATE_FILE`,
/// `PSYNC_STATE_FILE_LOCKED` (another engine uses `state_file`), `PSYNC_SPAWN_FAILED`,
/// `PSYNC_PANIC`. May be called from any thread. An engine runs a scheduler thread, up to
/// `workers` fetch threads and one thread that forwards outcomes to `psync_engine_poll` and the
/// readiness descriptor.
///
/// Process-wide effects of the first engine of a process (they stay after it is freed): the
/// first libgit2 call sets the environment variables `SSL_CERT_FILE` and `SSL_CERT_DIR` to the
/// system's certificates (for OpenSSL; values naming existing paths are kept), so create the first engine before the host starts threads
/// that read or write the environment; libgit2's socket timeouts and largest object size
/// (`connect_timeout_ms`, `io_timeout_ms`, `max_object_size`) are set for the process;
/// libgit2's allocator is replaced with one that counts each fetch's memory (plain `malloc`,
/// `realloc` and `free` outside a fetch) and the engine's socket stream is registered as
/// libgit2's standard stream (a plain socket outside a fetch). Both apply to the copy of
/// libgit2 inside this library only, and only when it is the 1.9 series they were written for.
///
/// # Safety
/// `config_json` is NULL or a NUL-terminated string; `out_engine` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_new(
    config_json: *const c_char,
    out_engine: *mut *mut PsyncEngine,
) -> PsyncStatus {
    // SAFETY: the same contract.
    unsafe { psync_engine_new_err(config_json, out_engine, std::ptr::null_mut()) }
}

/// Like `psync_engine_new`, with this call's error in `*error` when `error` is not NULL: an owned
/// `psync_error` on failure (release it with `psync_error_free`), NULL on success. Safe
/// to use from threads a call may move between (goroutines).
///
/// # Safety
/// As `psync_engine_new`; `error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_new_err(
    config_json: *const c_char,
    out_engine: *mut *mut PsyncEngine,
    error: *mut *mut PsyncError,
) -> PsyncStatus {
    // SAFETY: `error` is NULL or valid for a write, by the contract.
    let error = unsafe { ErrorOut::new(error) };
    guard(error, || {
        if out_engine.is_null() {
            return Err(null("out_engine"));
        }
        // SAFETY: non-NULL and valid for a write, by the contract.
        unsafe { *out_engine = std::ptr::null_mut() };
        let text = if config_json.is_null() {
            None
        } else {
            // SAFETY: non-NULL and NUL-terminated, by the contract.
            Some(unsafe { utf8(config_json, "config_json") }?)
        };
        let spawn_failed = |what: &str, e: std::io::Error| {
            (PsyncStatus::PSYNC_SPAWN_FAILED, format!("{what}: {e}"))
        };
        let outbox = Arc::new(Outbox::new().map_err(|e| spawn_failed("pipe", e))?);
        let engine = builder_from_json(text)?.build().map_err(build_failure)?;
        let outcomes = engine.outcomes();
        let forwarding = Arc::clone(&outbox);
        let forwarder = std::thread::Builder::new()
            .name("psync-outcomes".to_owned())
            .spawn(move || forwarding.forward(outcomes))
            .map_err(|e| spawn_failed("the outcome forwarding thread", e))?;
        let handle = Box::new(PsyncEngine {
            engine: RwLock::new(Some(engine)),
            outbox,
            forwarder: Mutex::new(Some(forwarder)),
        });
        // SAFETY: as above.
        unsafe { *out_engine = Box::into_raw(handle) };
        Ok(())
    })
}

/// Submits an event that waits in purgatory.
///
/// `event_json` is a JSON object: `{"id", "identifier", "repo", "oids": [..],
/// "clone_urls": [..], "origin": "user"|"sync" (default "sync"), "ref_updates":
/// [{"name": "refs/heads/main", "oid": "<40 hex>"} | {"name": "HEAD", "symbolic":
/// "refs/heads/main"} | {"name": "refs/heads/old", "delete": true}], "replace_refs": false,
/// "created_at": <Unix seconds>}`; unknown fields are refused, and a field given as `null` is as
/// if absent (Go encodes a nil slice as `null`). `"replace_refs": true` says the
/// ref updates are the repository's complete set of branches and tags: writing them deletes
/// every other ref under `refs/heads/` and `refs/tags/`, in the same all-or-none transaction.
/// `created_at` (optional, the Nostr event's) orders complete sets of one repository: a set
/// older than one written before is released without being written (the outcome's `"refs"`
/// says `"skipped_older_state"`).
///
/// On `PSYNC_OK`, `*out_admission` (if not NULL) says whether the event waits
/// (`PSYNC_ADMISSION_PENDING`: one outcome follows on `psync_engine_poll`) or was already
/// satisfied, and `*out_refused_urls_json` (if not NULL) is an owned JSON array
/// `[{"index", "url", "reason"}]` (possibly `"[]"`) of the clone URLs the URL policy refused:
/// release it with `psync_string_free`. On failure `*out_refused_urls_json` is NULL. Each
/// refusal of the event has its own status (`PSYNC_INVALID_EVENT_ID` ..
/// `PSYNC_REPLACE_REFS_WITHOUT_REF_UPDATES`). Never blocks on fetches. Thread-safe.
///
/// Calls from one thread take effect in the order made: a submit right after
/// `psync_engine_cancel` of the same id waits again; a submit of an id that still waits is
/// a re-submission (`PSYNC_ADMISSION_PENDING`, still one outcome; a user's re-submission of a
/// synced event makes it a user event and starts its lifetime again) and is never refused as
/// `PSYNC_QUEUE_FULL` or `PSYNC_TOO_MANY_IDENTIFIER_URLS`.
///
/// # Safety
/// `engine` is NULL or a live engine; `event_json` is NULL or a NUL-terminated string; the
/// out-pointers are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_submit(
    engine: *mut PsyncEngine,
    event_json: *const c_char,
    out_admission: *mut PsyncAdmission,
    out_refused_urls_json: *mut *mut c_char,
) -> PsyncStatus {
    // SAFETY: the same contract.
    unsafe {
        psync_engine_submit_err(
            engine,
            event_json,
            out_admission,
            out_refused_urls_json,
            std::ptr::null_mut(),
        )
    }
}

/// Like `psync_engine_submit`, with this call's error in `*error` when `error` is not NULL: an owned
/// `psync_error` on failure (release it with `psync_error_free`), NULL on success. Safe
/// to use from threads a call may move between (goroutines).
///
/// # Safety
/// As `psync_engine_submit`; `error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_submit_err(
    engine: *mut PsyncEngine,
    event_json: *const c_char,
    out_admission: *mut PsyncAdmission,
    out_refused_urls_json: *mut *mut c_char,
    error: *mut *mut PsyncError,
) -> PsyncStatus {
    // SAFETY: `error` is NULL or valid for a write, by the contract.
    let error = unsafe { ErrorOut::new(error) };
    guard(error, || {
        if !out_refused_urls_json.is_null() {
            // SAFETY: non-NULL and valid for a write, by the contract.
            unsafe { *out_refused_urls_json = std::ptr::null_mut() };
        }
        // SAFETY: by the contract.
        let handle = unsafe { engine_ref(engine) }?;
        // SAFETY: by the contract.
        let text = unsafe { utf8(event_json, "event_json") }?;
        let event = event_from_json(text)?;
        let admission = with_engine(handle, |e| {
            e.submit(event)
                .map_err(|err| (submit_status(&err), err.to_string()))
        })?;
        let (kind, refused) = match &admission {
            Admission::AlreadySatisfied => {
                (PsyncAdmission::PSYNC_ADMISSION_ALREADY_SATISFIED, &[][..])
            }
            _ => (
                PsyncAdmission::PSYNC_ADMISSION_PENDING,
                admission.refused_urls(),
            ),
        };
        if !out_admission.is_null() {
            // SAFETY: non-NULL and valid for a write, by the contract.
            unsafe { *out_admission = kind };
        }
        if !out_refused_urls_json.is_null() {
            let list: Vec<Value> = refused
                .iter()
                .map(|r| json!({"index": r.index, "url": r.url, "reason": r.reason.to_string()}))
                .collect();
            // SAFETY: as above.
            unsafe { *out_refused_urls_json = owned_string(Value::from(list).to_string()) };
        }
        Ok(())
    })
}

/// Tells the engine that git data for `identifier` arrived (a push): its repositories are
/// re-checked at once, without a fetch. Returns at once. Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine; `identifier` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_git_data_arrived(
    engine: *mut PsyncEngine,
    identifier: *const c_char,
) -> PsyncStatus {
    // SAFETY: the same contract.
    unsafe { psync_engine_git_data_arrived_err(engine, identifier, std::ptr::null_mut()) }
}

/// Like `psync_engine_git_data_arrived`, with this call's error in `*error` when `error` is not NULL: an owned
/// `psync_error` on failure (release it with `psync_error_free`), NULL on success. Safe
/// to use from threads a call may move between (goroutines).
///
/// # Safety
/// As `psync_engine_git_data_arrived`; `error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_git_data_arrived_err(
    engine: *mut PsyncEngine,
    identifier: *const c_char,
    error: *mut *mut PsyncError,
) -> PsyncStatus {
    // SAFETY: `error` is NULL or valid for a write, by the contract.
    let error = unsafe { ErrorOut::new(error) };
    guard(error, || {
        // SAFETY: by the contract.
        let handle = unsafe { engine_ref(engine) }?;
        // SAFETY: by the contract.
        let identifier = unsafe { utf8(identifier, "identifier") }?;
        with_engine(handle, |e| {
            e.git_data_arrived(identifier);
            Ok(())
        })
    })
}

/// Forgets a waiting event: no outcome follows for it. Unknown ids are ignored. Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine; `event_id` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_cancel(
    engine: *mut PsyncEngine,
    event_id: *const c_char,
) -> PsyncStatus {
    // SAFETY: the same contract.
    unsafe { psync_engine_cancel_err(engine, event_id, std::ptr::null_mut()) }
}

/// Like `psync_engine_cancel`, with this call's error in `*error` when `error` is not NULL: an owned
/// `psync_error` on failure (release it with `psync_error_free`), NULL on success. Safe
/// to use from threads a call may move between (goroutines).
///
/// # Safety
/// As `psync_engine_cancel`; `error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_cancel_err(
    engine: *mut PsyncEngine,
    event_id: *const c_char,
    error: *mut *mut PsyncError,
) -> PsyncStatus {
    // SAFETY: `error` is NULL or valid for a write, by the contract.
    let error = unsafe { ErrorOut::new(error) };
    guard(error, || {
        // SAFETY: by the contract.
        let handle = unsafe { engine_ref(engine) }?;
        // SAFETY: by the contract.
        let event_id = unsafe { utf8(event_id, "event_id") }?;
        with_engine(handle, |e| {
            e.cancel(event_id);
            Ok(())
        })
    })
}

/// Takes the next outcome, waiting up to `timeout_ms` (0: do not wait).
///
/// On `PSYNC_OK`, `*out_outcome` is an outcome owned by the caller: release it with
/// `psync_outcome_free`. Otherwise it is NULL and the status is `PSYNC_TIMEOUT` (nothing
/// within the timeout) or `PSYNC_DISCONNECTED` (the engine is shut down and every outcome was
/// taken). Works after `psync_engine_shutdown`, to drain the last outcomes. Thread-safe: each
/// outcome goes to exactly one caller.
///
/// # Safety
/// `engine` is NULL or a live engine; `out_outcome` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_poll(
    engine: *mut PsyncEngine,
    timeout_ms: u32,
    out_outcome: *mut *mut PsyncOutcome,
) -> PsyncStatus {
    // SAFETY: the same contract.
    unsafe { psync_engine_poll_err(engine, timeout_ms, out_outcome, std::ptr::null_mut()) }
}

/// Like `psync_engine_poll`, with this call's error in `*error` when `error` is not NULL: an owned
/// `psync_error` on failure (release it with `psync_error_free`), NULL on success. Safe
/// to use from threads a call may move between (goroutines).
///
/// # Safety
/// As `psync_engine_poll`; `error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_poll_err(
    engine: *mut PsyncEngine,
    timeout_ms: u32,
    out_outcome: *mut *mut PsyncOutcome,
    error: *mut *mut PsyncError,
) -> PsyncStatus {
    // SAFETY: `error` is NULL or valid for a write, by the contract.
    let error = unsafe { ErrorOut::new(error) };
    guard(error, || {
        if out_outcome.is_null() {
            return Err(null("out_outcome"));
        }
        // SAFETY: non-NULL and valid for a write, by the contract.
        unsafe { *out_outcome = std::ptr::null_mut() };
        // SAFETY: by the contract.
        let handle = unsafe { engine_ref(engine) }?;
        let timeout = || {
            (
                PsyncStatus::PSYNC_TIMEOUT,
                format!("no outcome within {timeout_ms} ms"),
            )
        };
        let disconnected = || {
            (
                PsyncStatus::PSYNC_DISCONNECTED,
                "the engine is shut down and every outcome was taken".to_owned(),
            )
        };
        let wait = Duration::from_millis(u64::from(timeout_ms));
        let outcome = handle.outbox.take(wait).map_err(|e| match e {
            Empty::Timeout => timeout(),
            Empty::Disconnected => disconnected(),
        })?;
        let c = |s: &str| CString::new(s.replace('\0', "\\0")).unwrap_or_default();
        let boxed = Box::new(PsyncOutcome {
            kind: if outcome.is_released() {
                PsyncOutcomeKind::PSYNC_OUTCOME_RELEASED
            } else {
                PsyncOutcomeKind::PSYNC_OUTCOME_EXPIRED
            },
            event_id: c(outcome.event_id()),
            identifier: c(outcome.identifier()),
            json: c(&serde_json::to_string(&outcome).expect("an outcome serialises")),
        });
        // SAFETY: as above.
        unsafe { *out_outcome = Box::into_raw(boxed) };
        Ok(())
    })
}

/// A file descriptor that is readable while an outcome waits to be taken, for hosts with an
/// event loop (`poll(2)`, epoll, libuv, Go's netpoller): wait for it, then take outcomes with
/// `psync_engine_poll(engine, 0, ...)` until `PSYNC_TIMEOUT`. It is readable again as soon as
/// another outcome arrives, and stays readable once the engine is shut down and its last
/// outcome was taken, so that the waiter wakes to get `PSYNC_DISCONNECTED`. Only readiness
/// matters: never read from it, write to it or close it. The same descriptor for the life of
/// the engine, valid until `psync_engine_free` (non-blocking, close-on-exec: the read end of a
/// pipe). Thread-safe; blocking `psync_engine_poll` calls may be mixed with it.
///
/// On `PSYNC_OK`, `*out_fd` is the descriptor; otherwise -1. `error`: NULL, or where an owned
/// `psync_error` goes on failure (NULL on success).
///
/// # Safety
/// `engine` is NULL or a live engine; `out_fd` and `error` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_ready_fd(
    engine: *mut PsyncEngine,
    out_fd: *mut c_int,
    error: *mut *mut PsyncError,
) -> PsyncStatus {
    // SAFETY: `error` is NULL or valid for a write, by the contract.
    let error = unsafe { ErrorOut::new(error) };
    guard(error, || {
        if out_fd.is_null() {
            return Err(null("out_fd"));
        }
        // SAFETY: non-NULL and valid for a write, by the contract.
        unsafe { *out_fd = -1 };
        // SAFETY: by the contract.
        let handle = unsafe { engine_ref(engine) }?;
        // SAFETY: as above.
        unsafe { *out_fd = handle.outbox.ready_fd() };
        Ok(())
    })
}

/// The outcome's kind. A NULL `outcome` gives `PSYNC_OUTCOME_EXPIRED`. Thread-safe.
///
/// # Safety
/// `outcome` is NULL or a live outcome from `psync_engine_poll`.
#[no_mangle]
pub unsafe extern "C" fn psync_outcome_kind(outcome: *const PsyncOutcome) -> PsyncOutcomeKind {
    // SAFETY: by the contract.
    unsafe { outcome.as_ref() }
        .map(|o| o.kind)
        .unwrap_or(PsyncOutcomeKind::PSYNC_OUTCOME_EXPIRED)
}

/// The outcome's event id, owned by the outcome and valid until `psync_outcome_free`; NULL if
/// `outcome` is NULL.
///
/// # Safety
/// `outcome` is NULL or a live outcome from `psync_engine_poll`.
#[no_mangle]
pub unsafe extern "C" fn psync_outcome_event_id(outcome: *const PsyncOutcome) -> *const c_char {
    // SAFETY: by the contract.
    unsafe { outcome.as_ref() }.map_or(std::ptr::null(), |o| o.event_id.as_ptr())
}

/// The outcome's repository identifier, owned by the outcome and valid until
/// `psync_outcome_free`; NULL if `outcome` is NULL.
///
/// # Safety
/// `outcome` is NULL or a live outcome from `psync_engine_poll`.
#[no_mangle]
pub unsafe extern "C" fn psync_outcome_identifier(outcome: *const PsyncOutcome) -> *const c_char {
    // SAFETY: by the contract.
    unsafe { outcome.as_ref() }.map_or(std::ptr::null(), |o| o.identifier.as_ptr())
}

/// The whole outcome as JSON, owned by the outcome and valid until `psync_outcome_free`; NULL
/// if `outcome` is NULL. `{"kind": "released", "event_id", "identifier", "repo", "waited_ms",
/// "refs": "none"|"written"|"skipped_older_state", "newer_created_at"?}` (`refs`: the event
/// had no ref updates, they were written, or none was because a newer state of the
/// repository, created at `newer_created_at`, was written before) or `{"kind": "expired",
/// "event_id", "identifier", "repo", "missing": [..], "reason":
/// "lifetime_ended"|"ref_update_failed"|"repository_gone", "message"?}`.
///
/// # Safety
/// `outcome` is NULL or a live outcome from `psync_engine_poll`.
#[no_mangle]
pub unsafe extern "C" fn psync_outcome_json(outcome: *const PsyncOutcome) -> *const c_char {
    // SAFETY: by the contract.
    unsafe { outcome.as_ref() }.map_or(std::ptr::null(), |o| o.json.as_ptr())
}

/// Releases an outcome and its strings. NULL is fine.
///
/// # Safety
/// `outcome` is NULL or a live outcome from `psync_engine_poll`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn psync_outcome_free(outcome: *mut PsyncOutcome) {
    if !outcome.is_null() {
        // SAFETY: from `Box::into_raw` in `psync_engine_poll`, released once by the contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(outcome) })));
    }
}

/// The engine's state and counters as a JSON object:
///
/// | field | what |
/// |---|---|
/// | `commands_pending` | calls made but not yet applied by the scheduler |
/// | `queued_identifiers`, `waiting_events`, `awaiting_refs` | the queue: identifiers, events waiting for objects, events whose ref updates wait to be written |
/// | `in_flight`, `workers` | fetches running now; fetch threads (`workers`) |
/// | `submitted`, `already_satisfied`, `refused`, `released`, `expired`, `cancelled` | events, counted since the engine started |
/// | `rechecks` | repositories re-checked after `psync_engine_git_data_arrived` |
/// | `ref_updates_applied`, `ref_update_failures` | ref transactions written / failed |
/// | `fetches_started`, `fetches_succeeded`, `fetches_partial`, `fetches_failed` | fetches; partial: it failed but brought some of its objects |
/// | `requests` | requests to remote hosts (connections over `git://`, GETs and POSTs over HTTP) |
/// | `requests_per_release` | `requests` / `released`; null before the first release |
/// | `memory_leaked` | bytes libgit2 lost in fetches (counted against `max_total_fetch_memory`) |
/// | `failures` | `{"<kind>": count}` of failed fetches by kind: `dns`, `tls`, `connection_refused`, `timeout`, `not_found`, ... |
/// | `domains` | `{"<domain>": {"in_flight", "queued_identifiers", "requests_started", "requests", "succeeded", "partial", "failed": {"<kind>": n}, "bytes_received", "next_cell_in_ms"}}`; a domain idle for `domain_retention_ms` leaves |
/// | `naughty` | `[{"domain", "scheme", "port", "category": "dns"|"tls"|"hostile", "reason", "first_seen_unix_ms", "last_seen_unix_ms", "count", "until_unix_ms"}]`; `scheme` and `port` null for a whole host name |
/// | `recent_failures` | the last 32: `[{"identifier", "url", "kind", "message"}]` |
/// | `expired_ids_remembered` | expired ids still refused as synced events |
/// | `release_times` | time from submit to release: `{"count", "sum_ms", "buckets": [{"le_ms", "count"}]}`, cumulative, `le_ms` null for the last, unbounded bucket |
/// | `fetch_durations` | how long each fetch ran, dispatch to report: as `release_times` |
/// | `bytes_received` | bytes received from remote hosts by fetches that ended (also per domain) |
///
/// Fields may be added; none is removed within a version. On `PSYNC_OK`, `*out_json` is an
/// owned string: release it with `psync_string_free`; otherwise NULL. Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine; `out_json` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_stats_json(
    engine: *mut PsyncEngine,
    out_json: *mut *mut c_char,
) -> PsyncStatus {
    // SAFETY: the same contract.
    unsafe { psync_engine_stats_json_err(engine, out_json, std::ptr::null_mut()) }
}

/// Like `psync_engine_stats_json`, with this call's error in `*error` when `error` is not
/// NULL (see `psync_engine_new_err`).
///
/// # Safety
/// As `psync_engine_stats_json`; `error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_stats_json_err(
    engine: *mut PsyncEngine,
    out_json: *mut *mut c_char,
    error: *mut *mut PsyncError,
) -> PsyncStatus {
    // SAFETY: the same contract.
    unsafe {
        stats_string(engine, out_json, "out_json", error, |s| {
            stats_json(s).to_string()
        })
    }
}

/// The engine's state and counters in the Prometheus text exposition format 0.0.4, ready to
/// serve on a `/metrics` endpoint with `Content-Type: text/plain; version=0.0.4;
/// charset=utf-8` (metric names as in the Rust `metrics` module). On `PSYNC_OK`, `*out_text`
/// is an owned string: release it with `psync_string_free`; otherwise NULL. Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine; `out_text` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_metrics(
    engine: *mut PsyncEngine,
    out_text: *mut *mut c_char,
) -> PsyncStatus {
    // SAFETY: the same contract.
    unsafe { psync_engine_metrics_err(engine, out_text, std::ptr::null_mut()) }
}

/// Like `psync_engine_metrics`, with this call's error in `*error` when `error` is not NULL
/// (see `psync_engine_new_err`).
///
/// # Safety
/// As `psync_engine_metrics`; `error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_metrics_err(
    engine: *mut PsyncEngine,
    out_text: *mut *mut c_char,
    error: *mut *mut PsyncError,
) -> PsyncStatus {
    // SAFETY: the same contract.
    unsafe {
        stats_string(
            engine,
            out_text,
            "out_text",
            error,
            purgatory_sync::metrics::render,
        )
    }
}

/// Takes the engine's stats and hands `render`'s text over as an owned string in `*out`
/// (NULL on failure); `out_name` names `out` in the NULL-argument message.
///
/// # Safety
/// `engine` is NULL or a live engine; `out` and `error` are NULL or valid for a write.
unsafe fn stats_string(
    engine: *mut PsyncEngine,
    out: *mut *mut c_char,
    out_name: &str,
    error: *mut *mut PsyncError,
    render: impl FnOnce(&Stats) -> String,
) -> PsyncStatus {
    // SAFETY: `error` is NULL or valid for a write, by the contract.
    let error = unsafe { ErrorOut::new(error) };
    guard(error, || {
        if out.is_null() {
            return Err(null(out_name));
        }
        // SAFETY: non-NULL and valid for a write, by the contract.
        unsafe { *out = std::ptr::null_mut() };
        // SAFETY: by the contract.
        let handle = unsafe { engine_ref(engine) }?;
        let stats = with_engine(handle, |e| Ok(e.stats()))?;
        // SAFETY: as above.
        unsafe { *out = owned_string(render(&stats)) };
        Ok(())
    })
}

/// Releases a string returned by this library (`psync_engine_stats_json`,
/// `psync_engine_metrics`, `psync_engine_submit`). NULL is fine.
///
/// # Safety
/// `s` is NULL or a string this library handed over, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn psync_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: from `CString::into_raw`, released once by the contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { CString::from_raw(s) })));
    }
}

/// Stops the engine and joins its threads (waiting for fetches in flight up to the shutdown
/// timeout), persisting its state if configured. The handle stays valid until
/// `psync_engine_free`: further calls give `PSYNC_ENGINE_SHUT_DOWN`, and `psync_engine_poll`
/// drains the remaining outcomes, then gives `PSYNC_DISCONNECTED`. Returns
/// `PSYNC_SHUTDOWN_ERROR` if shutdown was not clean (the engine is stopped anyway). Waits for
/// calls in progress on other threads. Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_shutdown(engine: *mut PsyncEngine) -> PsyncStatus {
    // SAFETY: the same contract.
    unsafe { psync_engine_shutdown_err(engine, std::ptr::null_mut()) }
}

/// Like `psync_engine_shutdown`, with this call's error in `*error` when `error` is not NULL: an owned
/// `psync_error` on failure (release it with `psync_error_free`), NULL on success. Safe
/// to use from threads a call may move between (goroutines).
///
/// # Safety
/// As `psync_engine_shutdown`; `error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_shutdown_err(
    engine: *mut PsyncEngine,
    error: *mut *mut PsyncError,
) -> PsyncStatus {
    // SAFETY: `error` is NULL or valid for a write, by the contract.
    let error = unsafe { ErrorOut::new(error) };
    guard(error, || {
        // SAFETY: by the contract.
        let handle = unsafe { engine_ref(engine) }?;
        let taken = handle.engine.write().take();
        match taken {
            Some(e) => e
                .shutdown()
                .map_err(|err| (PsyncStatus::PSYNC_SHUTDOWN_ERROR, err.to_string())),
            None => Err(shut_down()),
        }
    })
}

/// Releases an engine, shutting it down first if needed, and the outcomes not taken. NULL is
/// fine. Must not race any other call on the same engine.
///
/// # Safety
/// `engine` is NULL or a live engine from `psync_engine_new`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn psync_engine_free(engine: *mut PsyncEngine) {
    if !engine.is_null() {
        // SAFETY: from `Box::into_raw` in `psync_engine_new`, released once by the contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(engine) })));
    }
}

/// The library's version, a static string (never freed).
#[no_mangle]
pub extern "C" fn psync_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"",
        };
    VERSION.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Variants the C tests cannot reach (`ShuttingDown` is `PSYNC_ENGINE_SHUT_DOWN` there)
    /// still get their own status.
    #[test]
    fn submit_errors_map_to_distinct_statuses() {
        let errors = [
            SubmitError::InvalidEventId {
                value: String::new(),
                reason: "",
            },
            SubmitError::InvalidIdentifier {
                value: String::new(),
                reason: "",
            },
            SubmitError::NoObjectIds,
            SubmitError::TooManyObjectIds { count: 2, max: 1 },
            SubmitError::InvalidObjectId {
                index: 0,
                value: String::new(),
            },
            SubmitError::TooManyCloneUrls { count: 2, max: 1 },
            SubmitError::InvalidCloneUrl {
                index: 0,
                value: String::new(),
                reason: "",
            },
            SubmitError::TooManyRefUpdates { count: 2, max: 1 },
            SubmitError::InvalidRefUpdate {
                index: 0,
                name: String::new(),
                reason: "",
            },
            SubmitError::ReplaceRefsWithoutRefUpdates,
            SubmitError::InvalidRepository {
                path: PathBuf::new(),
                reason: String::new(),
            },
            SubmitError::PreviouslyExpired {
                event_id: String::new(),
                refused_for: Duration::ZERO,
            },
            SubmitError::QueueFull { max_events: 1 },
            SubmitError::ShuttingDown,
        ];
        let mut seen: Vec<i32> = errors.iter().map(|e| submit_status(e) as i32).collect();
        assert!(seen.iter().all(|&s| (20..39).contains(&s)));
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), errors.len());
        assert_eq!(
            submit_status(&SubmitError::ShuttingDown),
            PsyncStatus::PSYNC_SHUTTING_DOWN
        );
    }
}
