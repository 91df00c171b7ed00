//! A snapshot of the engine's state and counters, for hosts, logs and metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::fetch::FailureKind;

/// What the engine holds and has done since it started. Taken by
/// [`Engine::stats`](crate::Engine::stats) under the scheduler's lock, so the counts agree with
/// each other. They describe the commands the scheduler has applied: a submit, cancel or
/// `git_data_arrived` not applied yet is counted in
/// [`commands_pending`](Stats::commands_pending) and shows up in the other fields a moment
/// later — every command is in one or the other, never in neither.
/// [`already_satisfied`](Stats::already_satisfied) and [`refused`](Stats::refused) are decided
/// on the caller's thread and count at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Commands sent by the host that the scheduler has not applied yet.
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
    /// Requests made to remote hosts, as they count them (see [`DomainStats::requests`]),
    /// summed over every domain.
    pub requests: u64,
    /// Fetches that ended without an error.
    pub fetches_succeeded: u64,
    /// Fetches that ended with an error after which some of the wanted objects were in the
    /// repository: typically a server that had only some of them. Every fetch that ended is
    /// counted once, in `fetches_succeeded`, `fetches_partial` or `fetches_failed`.
    pub fetches_partial: u64,
    /// Fetches that ended with an error and none of the wanted objects in the repository.
    pub fetches_failed: u64,
    /// Failed fetches (not partial ones) by kind of failure.
    pub failures: BTreeMap<FailureKind, u64>,
    /// Memory libgit2 lost for good on what servers sent (it leaks the object of a delta that
    /// duplicates another, which only a hostile server sends), summed over every fetch.
    /// It stays counted in the fetches' total budget (`max_total_fetch_memory`), and each such
    /// server's endpoint is skipped for the naughty duration. Only a restart gives it back.
    pub memory_leaked: u64,
    /// Per-domain counters and state, by domain.
    pub domains: BTreeMap<String, DomainStats>,
    /// Host names and endpoints skipped for a while after DNS or TLS failures or a hostile
    /// answer, sorted.
    pub naughty: Vec<NaughtyEntry>,
    /// The last 32 fetches that ended with an error, partial ones included, oldest first.
    pub recent_failures: Vec<FailureRecord>,
    /// Expired event ids currently remembered: a synced re-submission whose data is still
    /// missing is refused.
    pub expired_ids_remembered: usize,
    /// How long each released event waited in purgatory, from its submission to its
    /// [`Outcome::Released`](crate::Outcome::Released) (the `waited` it reports).
    pub release_times: ReleaseHistogram,
    /// How long each fetch ran, from its dispatch to its report (the same bounds as
    /// [`release_times`](Self::release_times)).
    pub fetch_durations: ReleaseHistogram,
    /// Bytes received from remote hosts by fetches that ended.
    pub bytes_received: u64,
}

impl Stats {
    /// Requests made for each event released: what a release costs the remote hosts. `None`
    /// before the first release.
    pub fn requests_per_release(&self) -> Option<f64> {
        (self.released > 0).then(|| self.requests as f64 / self.released as f64)
    }
}

/// A histogram of durations with fixed buckets ([`ReleaseHistogram::BOUNDS`]): how many
/// observations fell at or below each bound, their count and their sum.
///
/// The bounds suit purgatory waits, from a push that arrives at once to the 30-minute lifetime.
/// The sum is kept as a [`Duration`] (saturating), so the type is exact and `Eq`.
///
/// ```
/// use purgatory_sync::ReleaseHistogram;
/// use std::time::Duration;
///
/// let mut h = ReleaseHistogram::default();
/// h.observe(Duration::from_millis(300));
/// h.observe(Duration::from_secs(45));
/// assert_eq!(h.count(), 2);
/// assert_eq!(h.sum(), Duration::from_millis(45_300));
/// // Cumulative counts: one wait at or below 0.5 s, both at or below 60 s.
/// let le: Vec<(Option<Duration>, u64)> = h.cumulative().collect();
/// assert_eq!(le[1], (Some(Duration::from_millis(500)), 1));
/// assert_eq!(le[7], (Some(Duration::from_secs(60)), 2));
/// assert_eq!(le.last(), Some(&(None, 2)));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleaseHistogram {
    /// Observations per bucket, not cumulative: index `i` counts those above bound `i - 1`
    /// and at or below bound `i`; the last one those above every bound.
    buckets: [u64; BUCKETS + 1],
    count: u64,
    sum: Duration,
}

const BUCKETS: usize = 12;

impl ReleaseHistogram {
    /// The buckets' upper bounds, inclusive, ascending: 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
    /// 300, 600 and 1800 seconds. A last bucket without bound (`+Inf`) takes the rest.
    pub const BOUNDS: [Duration; BUCKETS] = [
        Duration::from_millis(100),
        Duration::from_millis(500),
        Duration::from_secs(1),
        Duration::from_millis(2_500),
        Duration::from_secs(5),
        Duration::from_secs(10),
        Duration::from_secs(30),
        Duration::from_secs(60),
        Duration::from_secs(120),
        Duration::from_secs(300),
        Duration::from_secs(600),
        Duration::from_secs(1_800),
    ];

    /// Records one duration.
    pub fn observe(&mut self, value: Duration) {
        let bucket = Self::BOUNDS.partition_point(|bound| *bound < value);
        self.buckets[bucket] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(value);
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The sum of the recorded durations (saturating at [`Duration::MAX`]).
    pub fn sum(&self) -> Duration {
        self.sum
    }

    /// For each bound of [`BOUNDS`](Self::BOUNDS), then for `None` (no bound, `+Inf`): how
    /// many recorded durations are at or below it. The last count equals
    /// [`count`](Self::count).
    pub fn cumulative(&self) -> impl Iterator<Item = (Option<Duration>, u64)> + '_ {
        let bounds = Self::BOUNDS.iter().copied().map(Some).chain([None]);
        bounds.zip(&self.buckets).scan(0, |total, (bound, n)| {
            *total += n;
            Some((bound, *total))
        })
    }
}

/// One fetch that ended with an error, as kept in [`Stats::recent_failures`].
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
    /// Requests made, as the remote host counts them: each fetch's first one, and every
    /// further connection (`git://`) or GET and POST (HTTP) it made. The domain's rate quota
    /// counts these.
    pub requests: u64,
    /// Fetches that ended without an error.
    pub succeeded: u64,
    /// Fetches that ended with an error after which some of the wanted objects were in the
    /// repository (see [`Stats::fetches_partial`]).
    pub partial: u64,
    /// Failed fetches (not partial ones) by kind.
    pub failed: BTreeMap<FailureKind, u64>,
    /// How long until the rate quota allows the next fetch start; zero when it allows one now.
    pub next_cell_in: std::time::Duration,
    /// Bytes received from the domain by fetches that ended.
    pub bytes_received: u64,
}

/// Why a domain is on the naughty list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NaughtyCategory {
    /// Its host name did not resolve.
    Dns,
    /// Its TLS handshake or certificate failed.
    Tls,
    /// What it sent made libgit2 lose memory for good (a pack with objects that duplicate
    /// others, which no real server sends).
    Hostile,
}

impl NaughtyCategory {
    /// A short stable name, for logs, metrics and the state file: `dns`, `tls`, `hostile`.
    pub fn as_str(self) -> &'static str {
        match self {
            NaughtyCategory::Dns => "dns",
            NaughtyCategory::Tls => "tls",
            NaughtyCategory::Hostile => "hostile",
        }
    }
}

/// A host name, or one endpoint of a host, skipped for a while: the URLs it covers are not
/// fetched until `until`.
///
/// A DNS failure skips the whole name (`scheme` and `port` are `None`): nothing on it can be
/// reached. A TLS failure or a hostile answer skips only that scheme, host and port, so that
/// one URL with a wrong port or scheme cannot take a host's other URLs out.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NaughtyEntry {
    /// The host (canonical, as the connection resolved it).
    pub domain: String,
    /// The scheme of the skipped endpoint; `None` when the whole name is skipped.
    pub scheme: Option<String>,
    /// The port of the skipped endpoint; `None` when the whole name is skipped.
    pub port: Option<u16>,
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
