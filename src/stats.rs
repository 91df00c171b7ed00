//! A snapshot of the engine's state and counters, for hosts, logs and metrics.

use std::collections::BTreeMap;

use crate::fetch::FailureKind;

/// What the engine holds and has done since it started. Taken by
/// [`Engine::stats`](crate::Engine::stats) under the scheduler's lock, so the counts agree with
/// each other. They describe the commands the scheduler has taken: a submit, cancel or
/// `git_data_arrived` still in the command channel is counted in
/// [`commands_pending`](Stats::commands_pending) and shows up in the other fields a moment
/// later. [`already_satisfied`](Stats::already_satisfied) and [`refused`](Stats::refused) are
/// decided on the caller's thread and count at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Commands sent by the host that the scheduler has not taken yet.
    pub commands_pending: usize,
    /// Queue entries: distinct (identifier, repository) pairs with waiting events.
    pub queued_identifiers: usize,
    /// Events waiting in purgatory, including those awaiting their refs.
    pub waiting_events: usize,
    /// Waiting events whose objects are all present and whose
    /// [ref updates](crate::PendingEvent::ref_updates) are not written yet (the repository is
    /// busy with a fetch, or writing them failed and is retried at the next tick).
    pub awaiting_refs: usize,
    /// Fetches running on workers now.
    pub in_flight: usize,
    /// Worker threads, the most fetches that can run at once.
    pub workers: usize,
    /// Events accepted as [`Admission::Pending`](crate::Admission::Pending) (re-submissions of a
    /// waiting event are not counted again).
    pub submitted: u64,
    /// Events answered [`Admission::AlreadySatisfied`](crate::Admission::AlreadySatisfied).
    pub already_satisfied: u64,
    /// Submits refused with a [`SubmitError`](crate::SubmitError).
    pub refused: u64,
    /// [`Outcome::Released`](crate::Outcome::Released) sent.
    pub released: u64,
    /// [`Outcome::Expired`](crate::Outcome::Expired) sent.
    pub expired: u64,
    /// Waiting events forgotten by [`Engine::cancel`](crate::Engine::cancel).
    pub cancelled: u64,
    /// Repository re-checks done for [`Engine::git_data_arrived`](crate::Engine::git_data_arrived).
    pub rechecks: u64,
    /// Events whose ref updates were written (each is then released).
    pub ref_updates_applied: u64,
    /// Attempts to write an event's ref updates that failed (nothing was written; retried).
    pub ref_update_failures: u64,
    /// Fetches started.
    pub fetches_started: u64,
    /// Fetches that ended without an error.
    pub fetches_succeeded: u64,
    /// Fetches that ended with an error (they may still have brought some objects).
    pub fetches_failed: u64,
    /// Failed fetches by kind of failure.
    pub failures: BTreeMap<FailureKind, u64>,
    /// Per-domain counters and state, by domain.
    pub domains: BTreeMap<String, DomainStats>,
    /// Domains skipped for a while because of DNS or TLS failures.
    pub naughty: Vec<NaughtyEntry>,
    /// The last 32 failed fetches, oldest first.
    pub recent_failures: Vec<FailureRecord>,
    /// Expired event ids currently refused on re-submission.
    pub expired_ids_remembered: usize,
}

/// One failed fetch, as kept in [`Stats::recent_failures`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailureRecord {
    /// The identifier fetched for.
    pub identifier: String,
    /// The URL fetched from.
    pub url: String,
    /// The class of failure.
    pub kind: FailureKind,
    /// What happened, with URLs stripped.
    pub message: String,
}

/// One domain's state and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DomainStats {
    /// Fetches in flight to this domain.
    pub in_flight: usize,
    /// Identifiers waiting for this domain's capacity.
    pub queued_identifiers: usize,
    /// Fetches started.
    pub requests_started: u64,
    /// Fetches that ended without an error.
    pub succeeded: u64,
    /// Failed fetches by kind.
    pub failed: BTreeMap<FailureKind, u64>,
    /// How long until the rate quota allows the next fetch start; zero when it allows one now.
    pub next_cell_in: std::time::Duration,
}

/// Why a domain is on the naughty list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NaughtyCategory {
    /// Its host name did not resolve.
    Dns,
    /// Its TLS handshake or certificate failed.
    Tls,
}

/// A domain skipped for a while: its URLs are not fetched until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NaughtyEntry {
    /// The domain.
    pub domain: String,
    /// Why.
    pub category: NaughtyCategory,
    /// The last failure's message.
    pub reason: String,
    /// When the first failure of this spell was seen.
    pub first_seen: std::time::SystemTime,
    /// When the last one was seen.
    pub last_seen: std::time::SystemTime,
    /// Failures seen in this spell.
    pub count: u64,
    /// When the domain is tried again.
    pub until: std::time::SystemTime,
}
